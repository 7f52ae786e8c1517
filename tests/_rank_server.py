"""A process that starts a test's ranks as torchrun does, but forked from an interpreter that has
imported torch, DALI and the project already (tests/_helpers.launch is its client).

Why: a 2-rank `torchrun --standalone` launch costs about 6 s of wall time and 8.5 s of CPU before
the script's first line (the agent and every rank import torch), and the suite launches a hundred
times on 2 cores. A fork of this process costs 0.1 s.

What a rank sees is what torchrun gives a worker: `python -u SCRIPT ARGS` in its own session,
torchrun's environment variables, and a store hosted outside the ranks (torchrun's agent store;
here a process forked for the launch). When a rank fails, the others get SIGTERM and, 30 s later,
SIGKILL, and the launch exits 1. What it cannot give: a hash seed per rank (every rank has this
process's), an agent to restart a group or receive signals, and import-time settings other than
this process's (tests/_helpers.launch runs such launches under real torchrun). The tests of
torchrun's own behaviour (restarts, signals, its store across sessions) use real torchrun.

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import runpy
import signal
import sys
import time
import uuid

import numpy
import torch  # the point of this process: imported once, before every fork
import torch.distributed as dist

# The modules every rank of the suite's scripts imports; DALI only where it is installed.
PRELOAD = ("alexnet.run", "alexnet.evaluate", "alexnet.bench", "pipelines.torchvision_loader")
DALI_PRELOAD = ("nvidia.dali", "nvidia.dali.fn", "nvidia.dali.plugin.pytorch", "pipelines.dali")
GRACE_S = 30  # torchrun's wait between SIGTERM and SIGKILL


@dataclasses.dataclass(frozen=True)
class Request:
    script: str
    args: list[str]
    nproc: int
    env: dict[str, str]
    cwd: str
    stdout: str
    stderr: str
    timeout: float


@dataclasses.dataclass(frozen=True)
class Rank:
    """What a forked rank runs, once it has left the server's loop."""

    request: Request
    rank: int


def preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    try:
        for name in DALI_PRELOAD:
            importlib.import_module(name)
    except ImportError:
        pass  # the ranks import it themselves, or say it is missing, as in a fresh interpreter
    # fork() copies only the calling thread: a helper thread of an import would leave its locks
    # taken in every rank.
    assert len(os.listdir("/proc/self/task")) == 1, "an import started a thread: forking it is unsafe"


def start_store(world: int) -> tuple[int, int]:
    """A forked process that hosts the launch's TCPStore, as torchrun's agent does (the store's
    server thread must not live in this process, which forks the ranks next): (pid, port)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            os.setsid()
            store = dist.TCPStore("localhost", 0, world, is_master=True, wait_for_workers=False)
            os.write(write_fd, f"{store.port}\n".encode())
            signal.pause()  # until the server kills it
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        line = pipe.readline()
    if not line:
        os.waitpid(pid, 0)
        raise RuntimeError("the store process ended before it listened")
    return pid, int(line)


def rank_env(request: Request, rank: int, port: int, run_id: str) -> dict[str, str]:
    world = str(request.nproc)
    return {
        **request.env,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "ROLE_RANK": str(rank),
        "ROLE_NAME": "default",
        "WORLD_SIZE": world,
        "LOCAL_WORLD_SIZE": world,
        "ROLE_WORLD_SIZE": world,
        "GROUP_WORLD_SIZE": "1",
        "MASTER_ADDR": "localhost",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_RUN_ID": run_id,
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }


def become_rank(request: Request, rank: int, port: int, run_id: str) -> None:
    """In the forked child: the process torchrun would have started."""
    os.setsid()  # torchrun starts each worker in a session of its own
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request.stdout, os.O_WRONLY | os.O_APPEND),
                            (2, request.stderr, os.O_WRONLY | os.O_APPEND)):  # fmt: skip
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(rank_env(request, rank, port, run_id))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # A fresh interpreter seeds these from the OS: the ranks' must differ, as under torchrun.
    random.seed()
    numpy.random.seed()
    torch.seed()
    dist.set_debug_level_from_env()  # torch.distributed reads TORCH_DISTRIBUTED_DEBUG at import
    sys.argv = [request.script, *request.args]
    sys.path[0] = os.path.dirname(os.path.abspath(request.script))


def run_rank(rank: Rank) -> None:
    """`python -u SCRIPT`: its exit status and an uncaught exception's traceback are the
    interpreter's own, at the top of this process."""
    runpy.run_path(rank.request.script, run_name="__main__")


def wait_all(pids: list[int], timeout: float) -> tuple[list[int], bool]:
    """Exit statuses (as subprocess reports them) once every rank has ended; the first failure
    stops the others as torchrun's agent does. True with them where the launch ran past timeout."""
    statuses: dict[int, int] = {}
    deadline, failed_at = time.monotonic() + timeout, None
    while len(statuses) < len(pids):
        for pid in pids:
            if pid not in statuses:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    statuses[pid] = os.waitstatus_to_exitcode(status)
        now = time.monotonic()
        if failed_at is None and any(statuses.values()):
            failed_at = now
            signal_all(pids, statuses, signal.SIGTERM)
        if now > deadline or (failed_at is not None and now > failed_at + GRACE_S):
            signal_all(pids, statuses, signal.SIGKILL)
            if now > deadline:
                for pid in pids:
                    if pid not in statuses:
                        statuses[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                return [statuses[pid] for pid in pids], True
        time.sleep(0.02)
    return [statuses[pid] for pid in pids], False


def signal_all(pids: list[int], statuses: dict[int, int], sig: signal.Signals) -> None:
    """`sig` to the ranks still running; SIGKILL to their sessions (a DataLoader worker would
    outlive its rank)."""
    for pid in pids:
        if pid not in statuses:
            try:
                (os.killpg if sig == signal.SIGKILL else os.kill)(pid, sig)
            except ProcessLookupError:
                pass


def serve() -> Rank | None:
    """Answer requests until stdin closes (None); returns a Rank in each forked child."""
    preload()
    for line in sys.stdin:
        request = Request(**json.loads(line))
        store_pid, port = start_store(request.nproc)
        run_id = str(uuid.uuid4())
        pids = []
        for rank in range(request.nproc):
            pid = os.fork()
            if pid == 0:
                become_rank(request, rank, port, run_id)
                return Rank(request, rank)
            pids.append(pid)
        statuses, timed_out = wait_all(pids, request.timeout)
        os.kill(store_pid, signal.SIGKILL)
        os.waitpid(store_pid, 0)
        sys.stdout.write(json.dumps({"statuses": statuses, "timed_out": timed_out}) + "\n")
        sys.stdout.flush()
    return None


if __name__ == "__main__":
    forked = serve()
    if forked is not None:
        run_rank(forked)
