"""Train AlexNet: `torchrun --nproc_per_node=N launch/train.py [--config FILE] [key=value ...]`.

Without --config it trains on the built-in demo dataset (launch/configs/demo.yaml).
"""
# ruff: noqa: E402 - the parent pid is read before the imports

from __future__ import annotations

import os
import signal

if __name__ == "__main__":  # the imports below take seconds, and a Ctrl-C during them is one line too
    from alexnet.interrupt import quiet_ctrl_c_while_starting

    quiet_ctrl_c_while_starting()
# Before the imports below (torch's take seconds): the torchrun agent this worker started under,
# whose end is a stop request, and whose end before the process group exists ends the worker.
STARTED_UNDER = os.getppid()
# slurm/alexnet.sh has torchrun ignore SIGUSR1, and its workers inherited that: a SIGUSR1 sent to
# the job step while they imported torch and formed the process group was discarded, and the job
# ran into its time limit, not requeued. Blocked, it stays pending until alexnet.stop.StopRequest.
# install unblocks it under its handler, and is served after the first step as any request during
# the setup. Its action is set to the default too: POSIX leaves it open whether a blocked signal
# whose action is "ignore" is kept (Linux keeps it).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
signal.signal(signal.SIGUSR1, signal.SIG_DFL)

import argparse
import sys
from pathlib import Path

from alexnet.checkpoint import CheckpointError
from alexnet.config import ConfigError, load_config
from alexnet.interrupt import status_of
from alexnet.model import ModelSizeError
from alexnet.parallel.agree import LoaderError
from alexnet.parallel.env import LaunchError, accept_legacy_local_rank
from alexnet.parallel.mesh import LayoutError
from alexnet.process import StoreOnce, exit_process, print_error
from alexnet.reporting import MetricsWriteError
from alexnet.run import run_training
from alexnet.trainer import NonFiniteLossError
from pipelines.index import DataError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", action=StoreOnce, default=str(DEFAULT_CONFIG), help="YAML recipe (default: the demo)"
    )
    accept_legacy_local_rank(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5")
    return parser.parse_intermixed_args(argv)  # overrides before and after --config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = run_training(cfg, args.config, keep_stop_handlers=True, started_under=STARTED_UNDER)
    except (
        ConfigError,
        ModelSizeError,
        LayoutError,
        LaunchError,
        DataError,
        LoaderError,
        CheckpointError,
        MetricsWriteError,
        NonFiniteLossError,
    ) as exc:
        print_error(str(exc))
        return 2 if isinstance(exc, (ConfigError, ModelSizeError, LayoutError, LaunchError)) else 1
    except OSError as exc:  # a run folder that filled up or went away: the file and the reason, no traceback
        print_error(str(exc))
        return 1
    return 0 if summary["completed"] or summary["steps"] > 0 else 1


if __name__ == "__main__":
    # status_of: a second Ctrl-C (the first asks for a stop with a checkpoint) interrupts at once,
    # with one line and 130 instead of a traceback of wherever the step was.
    exit_process(status_of(main))
