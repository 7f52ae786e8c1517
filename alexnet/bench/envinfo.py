"""What a benchmark figure depends on: library versions, devices, world size, layout, commit.

Every report carries this block, so that two figures are only ever compared knowing whether they
came from the same software on the same hardware.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


def _version(module: str) -> str | None:
    try:
        mod = __import__(module, fromlist=["__version__"])
    except Exception:  # noqa: BLE001 - a missing or broken optional library is reported as absent
        return None
    return getattr(mod, "__version__", None)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def git_commit(repo: Path = REPO) -> dict[str, Any]:
    """HEAD and whether the tree has uncommitted changes (None where git or the repo is absent)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _library_versions() -> dict[str, Any]:
    """NCCL and cuDNN as built into this torch (readable without a GPU; None where absent)."""
    out: dict[str, Any] = {"nccl": None, "cudnn": None}
    try:
        out["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
    except Exception:  # noqa: BLE001 - a build without NCCL
        pass
    try:
        out["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001 - a build without cuDNN
        pass
    return out


def cuda_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    info.update(_library_versions())
    if torch.cuda.is_available():
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:  # no accelerator: the CPU is the device the figures were measured on
        info["devices"] = [f"CPU: {cpu_model()} ({usable_cores()} cores)"]
    return info


def collect_environment(world_size: int = 1, layout: str | list[str] = "single process") -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_cores": usable_cores(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "dali": _version("nvidia.dali"),
        "pillow": _version("PIL"),
        "torch_threads": torch.get_num_threads(),
        # the process settings the trainer applies (alexnet/process.py): a GPU step's speed depends on them
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "world_size": world_size,
        "layout": layout,
    }
    info.update(cuda_info())
    info.update(git_commit())
    return info


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()
