"""Crash states of a checkpoint write, one per file-system operation of `atomic_save`.

Usage: python tests/dist/ckpt_crash.py OUT

OUT/base gets two checkpoints (step 0, then step 1). Then, for every file-system operation k of
a third write (step 2): a forked child copies base to OUT/point-<k>, starts the write there and
SIGKILLs itself just before operation k (a write of the data counts as four operations, each a
quarter of the bytes). The last point lets the write finish. OUT/points.json lists the
operations; the test checks what each folder holds.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

from alexnet.checkpoint import atomic_save

WRAPPED = ("fsync", "link", "replace", "rename", "unlink", "remove")


def payload(step: int) -> dict:
    return {"format": 1, "model": {"w": torch.full((256, 1024), float(step))}, "progress": {"step": step}}


def instrument(die_at: int | None, log: list[str]) -> None:
    """Count every file-system operation; SIGKILL this process just before number `die_at`."""

    def op(name: str) -> None:
        if die_at is not None and len(log) == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        log.append(name)

    for name in WRAPPED:
        real = getattr(os, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            op(_name)
            return _real(*args, **kwargs)

        setattr(os, name, wrapper)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        for i in range(4):
            op(f"write {i + 1}/4")
            f.write(data[i * len(data) // 4 : (i + 1) * len(data) // 4])
            f.flush()

    torch.save = save


def in_child(work, *args) -> int:
    """Run work(*args) in a forked child; returns its wait status. The parent never computes
    with torch, so no torch thread holds a lock at the fork (a forked child would wait on it)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work(*args)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def write_base(base: Path) -> None:
    atomic_save(payload(0), base)
    atomic_save(payload(1), base)


def write_instrumented(target: Path, die_at: int | None, log_file: Path | None = None) -> None:
    log: list[str] = []
    instrument(die_at, log)
    atomic_save(payload(2), target)
    if log_file is not None:
        log_file.write_text(json.dumps(log))


def main(out: Path) -> None:
    base = out / "base"
    assert in_child(write_base, base) == 0
    dry = out / "dry-run"
    shutil.copytree(base, dry)
    assert in_child(write_instrumented, dry, None, out / "operations.json") == 0
    operations = json.loads((out / "operations.json").read_text())
    killed = []
    for k in range(len(operations) + 1):
        point = out / f"point-{k}"
        shutil.copytree(base, point)
        status = in_child(write_instrumented, point, k if k < len(operations) else None)
        killed.append(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL)
    (out / "points.json").write_text(json.dumps({"operations": operations, "killed": killed}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
