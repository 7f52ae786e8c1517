"""Which operations a training step's time goes to: a contender's steps under torch.profiler.

Run after a contender's timed windows (the profiler's overhead never enters a timed figure). On
CUDA the ranking is by the kernels' own device time, elsewhere by the operators' own CPU time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

TOP_OPS = 8  # entries per contender in the report
TABLE_ROWS = 20  # rows of the printed table


def _self_time_us(event: Any, on_cuda: bool) -> float:
    if not on_cuda:
        return float(event.self_cpu_time_total)
    # torch >= 2.4 says device; older releases said cuda
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))


def profile_steps(
    run_steps: Callable[[int], object], steps: int, device: torch.device
) -> tuple[str, list[dict[str, Any]]]:
    """`run_steps(n)` runs n training steps and waits for the device. Returns the printed table
    and the top operations: name, own milliseconds per step, share of all operations' own time."""
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        run_steps(steps)
    ranked = sorted(((_self_time_us(e, on_cuda), e) for e in prof.key_averages()), key=lambda p: p[0], reverse=True)
    total = sum(us for us, _ in ranked) or 1.0
    top = [
        {"op": e.key, "self_ms_per_step": us / 1000 / steps, "share": us / total, "calls_per_step": e.count / steps}
        for us, e in ranked[:TOP_OPS]
        if us > 0
    ]
    sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort_by, row_limit=TABLE_ROWS)
    except (AttributeError, KeyError):  # an older torch names the column cuda
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=TABLE_ROWS)
    return table, top
