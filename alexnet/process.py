"""Process-wide settings of a training process, applied in one place by the trainer and by the
benchmark's step and e2e commands, so that the benchmark times the steps the trainer runs; and
how the launchers read their timeouts and end a process (its error line, its exit)."""

from __future__ import annotations

import argparse
import gc
import math
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from alexnet.config import TIMEOUT_RANGE_S, TrainConfig
from alexnet.hostmem import apply_host_memory
from alexnet.interrupt import print_error, status_of
from alexnet.stop import STOP_SIGNALS

# cuBLAS is deterministic only with a fixed workspace (NVIDIA's cuBLAS docs, "Results
# reproducibility"); torch only warns without it. Read when cuBLAS starts: before any CUDA work.
CUBLAS_DETERMINISTIC = ":4096:8"


def set_determinism(enabled: bool) -> None:
    """Deterministic kernels, or cuDNN's autotuner (which picks each convolution's fastest
    algorithm for its shapes once, then reuses it: the step's speed on a GPU depends on it)."""
    if enabled:
        # A value the user set (":16:8", less memory) is theirs.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        # Off is the process's default. Switching (either way) imports torch._inductor, about a
        # second of every process's start, so it is only done to undo an earlier switch on.
        if torch.are_deterministic_algorithms_enabled():
            torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def apply_process_settings(train: TrainConfig) -> None:
    """Call first: before the first big tensor (host memory) and before loaders fork."""
    apply_host_memory(train.host_memory)
    set_determinism(train.deterministic)
    # train.amp=off is float32 throughout, the paper's precision: torch lets cuDNN run float32
    # convolutions in TF32 (a 10-bit mantissa) on Ampere and later by default. Matrix products
    # are float32 by default already (torch.backends.cuda.matmul.allow_tf32 is False).
    torch.backends.cudnn.allow_tf32 = train.amp != "off"


@dataclass(frozen=True)
class ProcessState:
    """What a run changes of its process beyond its own objects: the settings
    apply_process_settings makes and torch's CPU generator, which the run seeds (alexnet.plan)
    and a resume sets. The allocator's policy is not in it: each run applies its own
    (alexnet.hostmem), and a trim at a run's end would hand back the heap the next run reuses."""

    cudnn_benchmark: bool
    cudnn_allow_tf32: bool
    deterministic: bool
    deterministic_warn_only: bool
    cpu_rng: torch.Tensor
    cublas_workspace: str | None  # CUBLAS_WORKSPACE_CONFIG, which train.deterministic sets


def read_process_state() -> ProcessState:
    return ProcessState(
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_rng_state(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )


def put_back_process_state(state: ProcessState) -> None:
    """For a run in a process that goes on (a notebook): after it, the caller's random numbers
    are those it would have drawn without the run, and its cuDNN and determinism settings stay
    its own. CUDA's generators stay as the run left them (reading them would start CUDA in a
    process that had not)."""
    torch.backends.cudnn.benchmark = state.cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = state.cudnn_allow_tf32
    switched = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if switched != (state.deterministic, state.deterministic_warn_only):  # a switch imports torch._inductor
        torch.use_deterministic_algorithms(state.deterministic, warn_only=state.deterministic_warn_only)
    torch.set_rng_state(state.cpu_rng)
    if state.cublas_workspace is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = state.cublas_workspace


def positive_seconds(text: str) -> float:
    """An argparse type for a timeout: 0 or less made a process group's store time out at once
    (a 100-line traceback), nan compares false everywhere, and inf overflows a timedelta."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def collective_seconds(text: str) -> float:
    """An argparse type for a collective timeout, held to parallel.timeout_s's range: 0.001 s
    timed the rendezvous out with C++ stack frames and an error naming parallel.timeout_s."""
    value = positive_seconds(text)
    low, high = TIMEOUT_RANGE_S
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be in [{low}, {high}] seconds (as parallel.timeout_s), got {text}")
    return value


class StoreOnce(argparse.Action):
    """A flag that may be given once: `--config a.yaml --config b.yaml` kept b.yaml and dropped
    a.yaml without a word (a recipe that builds on another says so with `extends:`)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        earlier = getattr(namespace, self.dest, self.default)
        if earlier is not self.default:  # the default object itself until the flag is given (even if equal)
            parser.error(f"{option_string} is given twice ({earlier} and {values}); give it once")
        setattr(namespace, self.dest, values)


def print_result(text: str) -> None:
    """`text` and a newline on stdout, for a result that is also written to a file: a stdout that
    fails (a full log disk, a closed pipe) no longer stops the command before its file is written.
    After a failure stdout goes to /dev/null, so that the interpreter's last flush fails quietly."""
    try:
        sys.stdout.write(f"{text}\n")
        sys.stdout.flush()
    except OSError as exc:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # a stdout without a file descriptor (captured)
            pass
        print_error(f"stdout failed ({exc.strerror or exc}); the result goes to its file only")


def run_command(main: Callable[[], int]) -> NoReturn:
    """A launcher's `main`, its status the process's; Ctrl-C (SIGINT) ends it with one line and
    130 (alexnet.interrupt). launch/train.py has its own: a stop request with a checkpoint."""
    exit_process(status_of(main))


def exit_process(code: int) -> NoReturn:
    """`sys.exit(code)` without the interpreter's final garbage collections, for the launchers'
    last line.

    A training process holds about 400,000 Python objects (most from torch._dynamo, which
    torch.optim imports) and the collections the interpreter runs as it shuts down walk them
    all: 1.0-1.2 s of every process's exit on a 2-core machine, against 0.36-0.46 s for one
    collection here and the survivors frozen (`gc.freeze`: later collections skip them). That
    one collection still destroys what is unreachable, such as a DALI pipeline held by a
    reference cycle, whose destructor joins its threads; what is still reachable is released
    by reference counting, as before, or with the process."""
    gc.collect()
    gc.freeze()
    if code == 0:
        # The work is done and saved. As the interpreter shuts down it puts the default action
        # back for signals with a Python handler (the stop handlers), so a SIGTERM in the last
        # moment of the exit (torchrun's or Slurm's at a job's end) turned a completed run's 0
        # into death by SIGTERM. Ignored signals stay ignored.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)
