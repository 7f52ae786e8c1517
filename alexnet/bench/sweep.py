"""Scaling: one torchrun of the step (or e2e) benchmark per process count, one report.

Scaling efficiency of a result at P processes is its images/s per process over the images/s per
process of the same result at the smallest count P0 (normally 1): (ips(P) / P) / (ips(P0) / P0).
A layout that cannot run on P0 processes (towers and hybrid need 2) is held against the one-process
data-parallel run of the same model variant, which is what "against one process" means for it.
On a CPU each process gets cores / P intra-op threads (unless OMP_NUM_THREADS is set), so that
the sweep compares the same machine split differently, not an oversubscribed one.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alexnet.bench.envinfo import collect_environment, usable_cores
from alexnet.bench.output import Column, Report, ReportError, load_report
from alexnet.bench.timing import BenchSettingsError

KILL_GRACE_S = 10.0  # from SIGTERM to SIGKILL when a point outlives --timeout


@dataclass(frozen=True)
class SweepSettings:
    nprocs: tuple[int, ...]
    mode: str  # "step" or "e2e"
    args: tuple[str, ...]  # passed to every point's command
    entry: Path  # launch/benchmark.py
    out: Path  # one folder per point below it
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if not self.nprocs or any(p < 1 for p in self.nprocs):
            raise BenchSettingsError(f"--nproc: process counts must be positive integers, got {list(self.nprocs)}")
        twice = sorted({p for p in self.nprocs if self.nprocs.count(p) > 1})
        if twice:  # the second run replaced the first's report, and was held against it as its baseline
            raise BenchSettingsError(f"--nproc: {', '.join(map(str, twice))} given twice in {list(self.nprocs)}")
        if self.mode not in ("step", "e2e"):
            raise BenchSettingsError(f"--mode must be step or e2e, got {self.mode!r}")
        for arg in self.args:
            name = arg.split("=", 1)[0]
            if len(name) > 2 and "--out".startswith(name):  # argparse takes "--ou" for --out too
                raise BenchSettingsError("options after --: --out is set by the sweep (use the sweep's own --out)")


def point_command(s: SweepSettings, nproc: int, out: Path) -> list[str]:
    """The command of one point: an argument list, never a shell string."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(s.entry), s.mode, "--out", str(out), *s.args,
    ]  # fmt: skip


def point_env(nproc: int, cuda: bool) -> dict[str, str]:
    env = dict(os.environ)
    if not cuda and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // nproc))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _baseline(results: list[dict[str, Any]], entry: dict[str, Any], p0: int) -> dict[str, Any] | None:
    at_p0 = [r for r in results if r["nproc"] == p0]
    same = next((r for r in at_p0 if r["name"] == entry["name"]), None)
    if same is not None:
        return same
    variant = entry.get("variant")
    return next((r for r in at_p0 if r.get("mode") == "dp" and r.get("variant") == variant), None)


def add_efficiency(results: list[dict[str, Any]], p0: int | None = None) -> list[dict[str, Any]]:
    """Each entry needs `nproc`, `name`, `images_per_sec` (and `mode`, `variant` for the dp
    fallback); adds `baseline`, `baseline_nproc`, `baseline_per_proc`, `scaling_efficiency`.
    `p0`: the sweep's smallest count (default: the smallest in `results`). When its point failed,
    nothing has an efficiency (held against the next count instead, 2 processes would read as 100%)."""
    if not results:
        return results
    p0 = min(r["nproc"] for r in results) if p0 is None else p0
    for entry in results:
        base = _baseline(results, entry, p0)
        if base is None or base["images_per_sec"] <= 0:
            entry.update({"baseline": None, "baseline_nproc": None, "baseline_per_proc": None,
                          "scaling_efficiency": None})  # fmt: skip
            continue
        per_proc = base["images_per_sec"] / p0
        entry["baseline"] = base["name"]
        entry["baseline_nproc"] = p0
        entry["baseline_per_proc"] = per_proc
        entry["scaling_efficiency"] = entry["images_per_sec"] / entry["nproc"] / per_proc
    return results


TABLE = [
    Column("nproc", "procs"),
    Column("name", "contender"),
    Column("images_per_sec", "images/s", "{:.1f}"),
    Column("images_per_sec_per_gpu", "per proc", "{:.1f}"),
    Column("scaling_efficiency", "efficiency", "{:.0%}"),
    Column("baseline", "against"),
]


def run_point(s: SweepSettings, nproc: int, cuda: bool) -> tuple[dict[str, Any] | None, str]:
    """Runs one point; returns its report (None on failure) and an error text."""
    out = s.out / f"nproc{nproc}"
    report = out / f"{s.mode}.json"
    report.unlink(missing_ok=True)  # an earlier sweep's report is never taken for this point's
    command = point_command(s, nproc, out)
    print(f"sweep: {nproc} process(es): {shlex.join(command)}", file=sys.stderr, flush=True)
    returncode, stderr = run_process_group(command, point_env(nproc, cuda), s.timeout_s)
    if returncode is None:
        return None, f"{nproc} processes: no result within --timeout {s.timeout_s:.0f} s"
    if returncode != 0:
        return None, f"{nproc} processes: exit {returncode}: {failure_text(stderr)}"
    try:
        return load_report(report), ""
    except ReportError as exc:
        return None, f"{nproc} processes: {exc}"


# A worker's own error line: print_error's `error: ...`, or argparse's `<prog> [<command>]: error: ...`
# (prog is a file name, so no colon or space inside a word of it).
ERROR_LINE = re.compile(r"^(?:[^\s:]+(?: [^\s:]+)*: )?error: ")


def failure_text(stderr: str, tail: int = 1500) -> str:
    """What a failed point said: the workers' own error lines, once each (every rank prints the
    same), else the tail of stderr. torchrun's ChildFailedError traceback alone fills the tail and
    says nothing of why the worker stopped."""
    errors = [line.strip() for line in stderr.splitlines() if ERROR_LINE.match(line.strip())]
    return " | ".join(dict.fromkeys(errors)) if errors else stderr.strip()[-tail:]


def run_process_group(
    command: list[str], env: dict[str, str], timeout_s: float, grace_s: float = KILL_GRACE_S
) -> tuple[int | None, str]:
    """Runs `command` in a session of its own and returns (exit code, stderr); (None, stderr) when
    it outlives `timeout_s`. Then the whole group is stopped, not only torchrun: a killed launcher
    cannot pass the signal on, and its workers would keep their cores and GPUs through the next
    points. The group goes down with the sweep too (Ctrl-C reaches only the sweep's own group)."""
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
        return proc.returncode, stderr
    except subprocess.TimeoutExpired:
        return None, stop_process_group(proc, grace_s)
    except BaseException:
        stop_process_group(proc, 0.0)
        raise


def stop_process_group(proc: subprocess.Popen, grace_s: float) -> str:
    """SIGTERM to the group (torchrun forwards it; workers can let go of NCCL), SIGKILL after
    `grace_s`, and SIGKILL again to any worker that outlived its launcher; returns stderr."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
    _signal_group(proc.pid, signal.SIGKILL)
    return stderr or ""


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the group is gone already


def run_sweep(s: SweepSettings) -> Report:
    import torch

    cuda = torch.cuda.is_available()
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    environment: dict[str, Any] | None = None
    for nproc in s.nprocs:
        report, error = run_point(s, nproc, cuda)
        if report is None:
            failures.append(error)
            print(f"sweep: {error}", file=sys.stderr, flush=True)
            continue
        environment = environment or report["environment"]
        for r in report["results"]:
            # per point: the environment block is the first point's (versions, devices), and
            # its thread count would be that point's alone
            results.append({"nproc": nproc, "torch_threads": report["environment"].get("torch_threads"), **r})
    add_efficiency(results, min(s.nprocs))
    env = dict(environment or collect_environment())
    env["world_size"] = list(s.nprocs)
    env["layout"] = sorted({r.get("mode", "") for r in results})
    env["torch_threads"] = sorted({r["torch_threads"] for r in results if r.get("torch_threads") is not None})
    settings = {"nprocs": list(s.nprocs), "mode": s.mode, "args": list(s.args), "points": str(s.out)}
    summary: dict[str, Any] = {"failed": failures} if failures else {}
    notes = [
        "scaling_efficiency = (images/s at P / P) / (images/s at P0 / P0), P0 = the smallest count; layouts "
        "that need 2 processes are held against the dp run of the same variant at P0; without a result at P0 "
        "(its point failed) there is no efficiency",
        "on a CPU each process gets cores / P threads unless OMP_NUM_THREADS is set",
    ]
    return Report("sweep", results, env, settings, summary, notes)
