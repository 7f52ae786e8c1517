"""torchrun's environment -> DistEnv: who am I, on which device, over which backend."""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("alexnet")
# TORCH_DISTRIBUTED_DEBUG=DETAIL on gloo (apply_debug_level), logged by rank 0.
GLOO_DETAIL_NOTE = (
    "TORCH_DISTRIBUTED_DEBUG=DETAIL lowered to INFO: on gloo, torch's DistributedDataParallel crashes "
    "(SIGSEGV) under DETAIL's collective checker, taking the checker for the gloo group; INFO keeps "
    "DDP's setup log, without the collective checks"
)
# torchrun --max-restarts over several nodes with the agents' shared store (_restart_safe_store).
SHARED_STORE_NOTE = (
    "torchrun's --max-restarts over several nodes: a restarted worker group may fail to form again, as torchrun "
    "shares one store among the rounds (pytorch/pytorch#135712); set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
    "torchrun's environment on every node (slurm/alexnet.sh does)"
)


LAUNCHER_ENV = "TORCHELASTIC_RUN_ID"  # torchrun sets it in its workers' environment


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str
    # parallel.timeout_s, for the process groups made after the world's (torch gives those its
    # own default, 30 minutes under gloo, whatever the world's timeout is).
    timeout_s: float = 1800.0
    # The torchrun agent that started this process (its parent), None without torchrun. torchrun
    # starts its workers in sessions of their own, so a torchrun killed by SIGKILL (kill -9, the
    # OOM killer) signals none of them: they trained on unsupervised to the run's end, holding
    # the run folder's lock (a relaunch was refused) and their devices. Orphaned, a worker's
    # parent pid changes: alexnet.stop takes that as a stop request, with a checkpoint. Only under
    # torchrun: a process started with nohup outlives its shell by design.
    launcher_pid: int | None = None
    # Whether init_distributed started the world's process group: one the caller started (a
    # script, a notebook, a test harness) is the caller's to destroy, not the run's.
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from exc


class LaunchError(ValueError):
    """The processes were started in a way this machine cannot run (more ranks than GPUs, say)."""


def log_rank() -> int:
    """RANK for the launchers' logging level, read before init_distributed: empty counts as
    unset (`export RANK=$SLURM_PROCID` outside Slurm), malformed as rank 0, so that
    init_distributed's one-line error names it instead of int()'s traceback."""
    try:
        return env_int("RANK", 0)
    except LaunchError:
        return 0


def accept_legacy_local_rank(parser: argparse.ArgumentParser) -> None:
    """`python -m torch.distributed.launch` (without --use-env) passes --local-rank=N before the
    script's own arguments; it also sets LOCAL_RANK, which init_distributed reads, so the flag is
    accepted and ignored (hidden from --help: torchrun, which passes none, is the launcher to use)."""
    parser.add_argument("--local-rank", "--local_rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def init_distributed(
    timeout_s: float,
    force_cpu: bool = False,
    timeout_setting: str = "parallel.timeout_s",
    started_under: int | None = None,
) -> DistEnv:
    """Read torchrun's variables (LOCAL_RANK from the environment: the --local-rank flag changed
    in PyTorch 2.0), pick the device, and start the process group when WORLD_SIZE > 1.

    CUDA: NCCL, device = cuda:LOCAL_RANK, set before init_process_group so NCCL binds the right
    GPU. Otherwise gloo on the CPU. The timeout is finite so that a dead rank ends the others.
    `started_under`: the parent pid as the launcher read it before its imports (launch/train.py).
    """
    # The parent this worker started under, read as early as its launcher could: a few seconds of
    # imports after its start, torchrun may have died already, and its pid would not be known.
    launcher_pid = (started_under or os.getppid()) if LAUNCHER_ENV in os.environ else None
    if launcher_pid is not None and os.getppid() != launcher_pid:
        # Its workers, left running, waited for the store for twice the timeout, or (a fixed
        # --master_port) joined the next torchrun's store and trained the run without it.
        raise LaunchError(f"torchrun (pid {launcher_pid}), which started this worker, has ended: nothing to do")
    rank = env_int("RANK", 0)
    world = env_int("WORLD_SIZE", 1)
    local_rank = env_int("LOCAL_RANK", 0)
    local_world = env_int("LOCAL_WORLD_SIZE", world)
    check_launch(rank, world)
    if local_world < 1:  # a layout divides by it
        raise LaunchError(f"environment variable LOCAL_WORLD_SIZE={local_world} must be at least 1")
    use_cuda = torch.cuda.is_available() and not force_cpu
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        if use_cuda:
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        apply_debug_level(backend, rank)
        try:
            dist.init_process_group(
                backend=backend,
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=device if use_cuda else None,
                **_restart_safe_store(rank, world, timeout_s),
            )
        except (dist.DistStoreError, dist.DistNetworkError) as exc:  # torch's 30-line traceback otherwise
            raise LaunchError(
                f"rank {rank} of WORLD_SIZE={world} could not meet the other ranks at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_setting}={timeout_s:g} s "
                f"({exc}); start every rank (torchrun starts them all), with the same MASTER_ADDR and MASTER_PORT"
            ) from exc
    return DistEnv(rank, local_rank, world, local_world, device, backend, timeout_s, launcher_pid, owns_group)


def apply_debug_level(backend: str, rank: int) -> None:
    """TORCH_DISTRIBUTED_DEBUG as torch read it at import, made safe for `backend` before any
    process group exists (the level decides how each group is built). DETAIL on gloo crashed
    every DDP construction of torch 2.14.1 (GLOO_DETAIL_NOTE); NCCL takes another branch there
    and keeps DETAIL."""
    if backend == "gloo" and dist.get_debug_level() == dist.DebugLevel.DETAIL:
        dist.set_debug_level(dist.DebugLevel.INFO)
        if rank == 0:
            log.warning(GLOO_DETAIL_NOTE)


def check_launch(rank: int, world: int) -> None:
    """torchrun's variables as a hand-made launch may lack them: a RANK without its WORLD_SIZE
    failed deep in DALI's sharding, a RANK beyond the world waited silently for the whole
    parallel.timeout_s, and no MASTER_ADDR gave torch's 27-line traceback."""
    if world < 1:
        raise LaunchError(f"environment variable WORLD_SIZE={world} must be at least 1")
    if not 0 <= rank < world:
        raise LaunchError(
            f"environment variable RANK={rank} is not a rank of WORLD_SIZE={world} (0 to {world - 1}); "
            "start the processes with torchrun, which sets both"
        )
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not os.environ.get(name)]
    if missing:
        raise LaunchError(
            f"WORLD_SIZE={world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
            "start the processes with torchrun, which sets them"
        )
    if world > 1 and not 0 < env_int("MASTER_PORT", 0) < 65536:
        raise LaunchError(f"environment variable MASTER_PORT={os.environ['MASTER_PORT']} is not a port (1 to 65535)")


def _restart_safe_store(rank: int, world: int, timeout_s: float) -> dict:
    """Under torchrun (which shares its rendezvous store with the workers since torch 2.5), a
    worker group restarted by --max-restarts would read the dead group's addresses from that
    store and fail to connect about half the time (pytorch/pytorch#135712). On one node, keys
    under a prefix per restart keep every attempt to itself. Across nodes no such prefix exists:
    each node's agent counts its own restarts (a node whose worker crashed is at 1, the others
    still at 0), so prefixed groups never met again; there the store is left as torch uses it,
    and the fix is torch's own, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment
    (a fresh store each round, hosted by rank 0: slurm/alexnet.sh sets it). Rank 0 says so where
    restarts are allowed without it."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    if env_int("GROUP_WORLD_SIZE", 1) > 1:
        if rank == 0 and env_int("TORCHELASTIC_MAX_RESTARTS", 0) > 0:
            log.warning(SHARED_STORE_NOTE)
        return {}
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    # And per process group of the attempt: a second run in the same worker (a script or notebook
    # that trains twice) read the first group's keys and hung for parallel.timeout_s, then failed
    # in gloo. Every rank creates its groups in the same order, so its own count agrees with the
    # others' (kept in the store: nothing per process to reset).
    session = store.add(f"alexnet-attempt-{attempt}-rank-{rank}-groups", 1)
    prefix = f"alexnet-attempt-{attempt}-group-{session}"
    return {"store": dist.PrefixStore(prefix, store), "rank": rank, "world_size": world}


def shutdown_distributed(env: DistEnv | None = None) -> None:
    """Destroy the process group (with `env`: only one its init_distributed started), after the
    DDP wrappers that are garbage. A wrapper in a
    reference cycle otherwise outlived it, to be destroyed by the interpreter's own shutdown,
    which then aborted now and then ("terminate called without an active exception", SIGABRT
    after a run that had finished: 4 of 45 runs of tests/dist/powersgd_skip.py, none of 40
    with this collection)."""
    if env is not None and not env.owns_group:
        return
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
