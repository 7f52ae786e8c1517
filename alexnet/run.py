"""One training run, start to finish, in the calling process (one torchrun worker)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from alexnet.config import Config, check_config, config_to_dict
from alexnet.data import check_pipeline_installed
from alexnet.parallel.agree import SETUP_ERRORS, check_same_settings, flat_settings, share_setup_failure
from alexnet.parallel.env import init_distributed, log_rank, shutdown_distributed
from alexnet.parallel.mesh import Mesh, build_mesh, release_mesh
from alexnet.plan import build_plan, with_run_name
from alexnet.process import apply_process_settings, put_back_process_state, read_process_state
from alexnet.reporting import check_tensorboard_installed
from alexnet.stop import StopRequest, put_back_handlers, stop_handlers
from alexnet.trainer import Trainer


class _RunLogHandler(logging.StreamHandler):
    """The run's own handler on the "alexnet" logger (one: a run after a run replaces it)."""


def init_logging(rank: int) -> None:
    """The run's log lines, "HH:MM:SS [rank R] ...", INFO on rank 0 and warnings elsewhere, on the
    "alexnet" logger alone: logging.basicConfig(force=True) removed and closed the handlers of the
    calling process's root logger (a notebook's log file) and set its level. The lines still
    propagate, so a root handler the caller set up sees them too; where one of them writes to the
    console already (a notebook's logging.basicConfig), the run adds none of its own, which
    printed every line twice."""
    logger = logging.getLogger("alexnet")
    _remove_run_handlers(logger)  # an earlier run's (launch/train.py keeps it), if any
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if any(_writes_to_console(h) for h in logging.getLogger().handlers):
        return
    handler = _RunLogHandler()  # the sys.stderr of the moment (a test's captured one too)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)


def _writes_to_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.stdout)


def put_back_logging(level: int) -> None:
    """The "alexnet" logger as a run found it: its own handler removed, its level `level` (a
    notebook's logger went on at INFO, with the run's handler, after the run)."""
    logger = logging.getLogger("alexnet")
    _remove_run_handlers(logger)
    logger.setLevel(level)


def _remove_run_handlers(logger: logging.Logger) -> None:
    for handler in [h for h in logger.handlers if isinstance(h, _RunLogHandler)]:
        logger.removeHandler(handler)


def run_training(
    cfg: Config, config_path: str | None, keep_stop_handlers: bool = False, started_under: int | None = None
) -> dict[str, Any]:
    """The run; the signal handlers it installs, the process-wide settings it applies and torch's
    CPU generator (alexnet.process.ProcessState) are put back as they were unless
    `keep_stop_handlers` (launch/train.py, whose process ends with the run: `exit_process`
    ignores the signals then, and until then a late SIGTERM must not kill a completed run).
    `started_under`: the process's parent at its start (init_distributed). A process group the
    caller started is left to the caller."""
    caller_level = logging.getLogger("alexnet").level
    init_logging(log_rank())
    caller_state = None if keep_stop_handlers else read_process_state()
    try:
        cfg = with_run_name(check_config(cfg), config_path)
        return _train(cfg, config_path, keep_stop_handlers, started_under)
    finally:
        if caller_state is not None:
            put_back_process_state(caller_state)
            put_back_logging(caller_level)


def _train(cfg: Config, config_path: str | None, keep_stop_handlers: bool, started_under: int | None) -> dict[str, Any]:
    apply_process_settings(cfg.train)
    handlers = stop_handlers()
    env = init_distributed(cfg.parallel.timeout_s, started_under=started_under)
    mesh: Mesh | None = None
    try:
        stop = StopRequest.from_environment(env.device, env.launcher_pid)
        stop.install()  # before the setup, which can take minutes
        check_same_settings(flat_settings(config_to_dict(cfg)), "settings")
        mesh = build_mesh(env, cfg.parallel.mode, cfg.parallel.fc_group)
        plan, failure = None, None
        try:  # what this machine has: a node's own decoder (data.decoder may differ), its installs
            plan = build_plan(cfg, env, mesh, config_path)
            check_pipeline_installed(cfg.data)  # before the run folder, with the config's key
            check_tensorboard_installed(cfg.run.tensorboard)
        except SETUP_ERRORS as exc:  # one node's alone: the others would wait for it in the next collective
            failure = exc
        share_setup_failure(failure)
        assert plan is not None  # else that raised
        return Trainer(cfg, env, mesh, plan, stop).fit()
    finally:
        if mesh is not None:
            release_mesh(mesh, env)  # its groups: the caller's world group outlives the run
        shutdown_distributed(env)
        if not keep_stop_handlers:
            put_back_handlers(handlers)
