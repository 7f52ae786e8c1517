"""Interleaved timing windows: the only fair way to compare things on a shared, noisy machine.

Contenders run in turns, A B C A B C ..., each turn one window of fixed work; the first rounds
are warm-up and are thrown away. Slow drifts of the machine's load then hit every contender alike,
and a paired ratio (A/B within each round, then the median) cancels most of what is left.
Between turns the machine is let settle: work a contender left in flight (DALI's prefetch queue,
DataLoader workers filling theirs) would otherwise run during the next contender's window.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class BenchSettingsError(ValueError):
    """A benchmark option or input the command must change (exit 2). Its own type: benchmark.py
    caught every ValueError as one, so a programming error read as advice to change the command."""


@dataclass(frozen=True)
class Window:
    """One timed turn: `images` processed in `seconds`, plus contender-specific seconds/bytes."""

    images: int
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class Contender(Protocol):
    name: str

    def run_window(self) -> Window: ...


@dataclass(frozen=True)
class Schedule:
    warmup: int = 1  # untimed rounds (every contender once per round), thrown away
    windows: int = 5  # timed rounds

    def __post_init__(self) -> None:
        if self.windows < 1:
            raise BenchSettingsError(f"--windows must be at least 1, got {self.windows}")
        if self.warmup < 0:
            raise BenchSettingsError(f"--warmup must be at least 0, got {self.warmup}")


def interleaved_order(names: Sequence[str], schedule: Schedule) -> list[tuple[int, str]]:
    """(round, name) in the order the turns run: round-major, contenders in their given order."""
    return [(r, name) for r in range(schedule.warmup + schedule.windows) for name in names]


def run_interleaved(
    contenders: Sequence[Contender],
    schedule: Schedule,
    between: Callable[[], object] | None = None,
    progress: Callable[[int, str, Window], None] | None = None,
) -> dict[str, list[Window]]:
    """Run the turns of `interleaved_order`; returns the timed windows of each contender, in
    round order (so that index i of two contenders comes from the same round)."""
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be unique: {names}")
    by_name = {c.name: c for c in contenders}
    timed: dict[str, list[Window]] = {name: [] for name in names}
    for rnd, name in interleaved_order(names, schedule):
        if between is not None:
            between()
        window = by_name[name].run_window()
        if rnd >= schedule.warmup:
            timed[name].append(window)
        if progress is not None:
            progress(rnd, name, window)
    return timed


@dataclass(frozen=True)
class Stats:
    median: float
    min: float
    max: float
    n: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}median": self.median,
            f"{prefix}min": self.min,
            f"{prefix}max": self.max,
            f"{prefix}n": self.n,
        }


def summarize(values: Sequence[float]) -> Stats:
    if not values:
        raise ValueError("no timed windows to summarize")
    return Stats(statistics.median(values), min(values), max(values), len(values))


def paired_ratio(numerator: Sequence[Window], denominator: Sequence[Window]) -> Stats:
    """Images/s of A over B within each round, summarized over the rounds."""
    if len(numerator) != len(denominator):
        raise ValueError(f"paired ratio needs the same rounds: {len(numerator)} vs {len(denominator)} windows")
    return summarize([a.images_per_sec / b.images_per_sec for a, b in zip(numerator, denominator)])


def tree_cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds used so far by a process, its threads and all its descendants (Linux /proc;
    elsewhere only this process). DataLoader workers are child processes and DALI's workers are
    threads, so this sees both."""
    root = pid or os.getpid()
    if not Path(f"/proc/{root}/stat").exists():
        return time.process_time()
    ticks = os.sysconf("SC_CLK_TCK")
    total, stack = 0, [root]
    while stack:
        p = stack.pop()
        try:
            # Fields after the command name: state is the first, utime and stime the 12th and 13th.
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError, IndexError):
            continue  # a process that ended while we looked
    return total / ticks


def wait_until_idle(
    sync: Callable[[], object] | None = None,
    interval_s: float = 0.1,
    busy_share: float = 0.2,
    timeout_s: float = 3.0,
) -> float:
    """Wait until this process tree used less than `busy_share` of one core over `interval_s`
    (at most `timeout_s`); returns the seconds waited. `sync` first drains device work."""
    start = time.perf_counter()
    if sync is not None:
        sync()
    before = tree_cpu_seconds()
    while time.perf_counter() - start < timeout_s:
        time.sleep(interval_s)
        now = tree_cpu_seconds()
        if now - before <= busy_share * interval_s:
            break
        before = now
    return time.perf_counter() - start
