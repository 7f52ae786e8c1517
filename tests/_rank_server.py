"""A process that starts a test's ranks as torchrun does, but forked from an interpreter that has
imported torch, DALI and the project already (tests/_helpers.launch is its client).

Why: a 2-rank `torchrun --standalone` launch costs about 6 s of wall time and 8.5 s of CPU before
the script's first line (the agent and every rank import torch), and the suite launches a hundred
times on 2 cores. A fork of this process costs 0.1 s.

What a rank sees is what torchrun gives a worker: `python -u SCRIPT ARGS` in its own session,
torchrun's environment variables, stdout and stderr shared with the other ranks, and a store
hosted outside the ranks (torchrun's agent store; here a process forked for the launch). When a
rank fails, the others' sessions get SIGTERM and, 30 s later, SIGKILL, and the launch exits 1.
A launch ends when its ranks and every process that holds their output have ended, as a torchrun
launch whose output is captured. What it cannot give: a hash seed per rank (every rank has this
process's), an agent to restart a group or receive signals, import-time settings other than this
process's (tests/_helpers.launch runs such launches under real torchrun), and tracebacks without
this module's and runpy's frames above the script's. The tests of torchrun's own behaviour
(restarts, signals, its store across sessions) use real torchrun.

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import json
import os
import random
import runpy
import selectors
import signal
import sys
import tempfile
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


def preload() -> None:
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
    server thread must not live in this process, which forks the ranks next): (pid, port). It
    holds none of this process's pipes, and dies with it."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            die_with_parent()
            os.close(read_fd)
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1):  # the server's stdin and stdout: the client waits for their end
                os.dup2(null, fd)
            store = dist.TCPStore("localhost", 0, world, is_master=True, wait_for_workers=False)
            os.write(write_fd, f"{store.port}\n".encode())
            os.close(write_fd)
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


def die_with_parent() -> None:
    """SIGKILL when the server dies (prctl PR_SET_PDEATHSIG): a store left behind would hold
    its port and wait forever."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() == 1:  # the server died before prctl
        os._exit(0)


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


def become_rank(request: Request, rank: int, port: int, run_id: str, pipes: Pipes) -> None:
    """In the forked child: the process torchrun would have started."""
    os.setsid()  # torchrun starts each worker in a session of its own
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    pipes.become_stdout_and_stderr()
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
    tempfile.tempdir = None  # found again from TMPDIR on first use, as in a fresh interpreter
    sys.argv = [request.script, *request.args]
    sys.path[0] = os.path.dirname(os.path.abspath(request.script))


def run_rank(request: Request) -> None:
    """`python -u SCRIPT`: its exit status and an uncaught exception's traceback are the
    interpreter's own, at the top of this process."""
    runpy.run_path(request.script, run_name="__main__")


class Pipes:
    """The ranks' shared stdout and stderr, as torchrun's are (the output its caller captures),
    copied by the server into the request's files. Open until every process that holds them has
    ended: a rank's children too, which keep a torchrun launch's output open after the ranks."""

    def __init__(self, request: Request) -> None:
        self.ends = [os.pipe(), os.pipe()]  # (read, write) for stdout, stderr
        self.files = [open(request.stdout, "ab", buffering=0), open(request.stderr, "ab", buffering=0)]
        self.selector = selectors.DefaultSelector()

    def become_stdout_and_stderr(self) -> None:
        """In a rank: its fds 1 and 2 are the pipes' write ends, and it holds nothing else of them."""
        for fd, (read, write) in zip((1, 2), self.ends):
            os.dup2(write, fd)
            os.close(read)
            os.close(write)
        for file in self.files:
            file.close()

    def start_copying(self) -> None:
        for (read, write), file in zip(self.ends, self.files):
            os.close(write)
            self.selector.register(read, selectors.EVENT_READ, file)

    @property
    def open(self) -> bool:
        return bool(self.selector.get_map())

    def copy(self, wait_s: float) -> None:
        for key, _ in self.selector.select(wait_s):
            data = os.read(key.fd, 1 << 16)
            if data:
                key.data.write(data)
            else:
                self.selector.unregister(key.fd)
                os.close(key.fd)

    def close(self) -> None:
        for fd in list(self.selector.get_map()):
            self.selector.unregister(fd)
            os.close(fd)
        for file in self.files:
            file.close()


def supervise(pids: list[int], pipes: Pipes, timeout: float) -> tuple[list[int], bool]:
    """Exit statuses (as subprocess reports them) once every rank has ended and its output has
    closed; the first failure stops the sessions of the ranks still running as torchrun's agent
    does (SIGTERM, then SIGKILL). True with them where the launch ran past timeout, which kills
    every session of the launch."""
    statuses: dict[int, int] = {}
    deadline, failed_at = time.monotonic() + timeout, None
    while len(statuses) < len(pids) or pipes.open:
        pipes.copy(0.02 if len(statuses) < len(pids) else 0.2)
        for pid in pids:
            if pid not in statuses:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    statuses[pid] = os.waitstatus_to_exitcode(status)
        now, running = time.monotonic(), [pid for pid in pids if pid not in statuses]
        if failed_at is None and any(statuses.values()):  # as torchrun: the sessions of ranks still running
            failed_at = now
            signal_sessions(running, signal.SIGTERM)
        if failed_at is not None and now > failed_at + GRACE_S:
            signal_sessions(running, signal.SIGKILL)
        if now > deadline:
            signal_sessions(pids, signal.SIGKILL)
            for pid in pids:
                if pid not in statuses:
                    statuses[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            return [statuses[pid] for pid in pids], True
    return [statuses[pid] for pid in pids], False


def signal_sessions(pids: list[int], sig: signal.Signals) -> None:
    """`sig` to every process of the ranks' sessions, as torchrun sends it (os.killpg): a
    DataLoader worker gets a rank's SIGTERM too."""
    for pid in pids:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass  # the session has ended


def serve() -> Request | None:
    """Answer requests until stdin closes (None); returns its Request in each forked rank."""
    preload()
    for line in sys.stdin:
        reply = run_launch(Request(**json.loads(line)))
        if isinstance(reply, Request):
            return reply
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return None


def run_launch(request: Request) -> dict | Request:
    """The launch's reply, in this process; the request, in each forked rank (which leaves the
    server's loop to run it)."""
    server = os.getpid()
    store_pid, port = start_store(request.nproc)
    pipes, pids = Pipes(request), []
    try:
        run_id = str(uuid.uuid4())
        for rank in range(request.nproc):
            pid = os.fork()
            if pid == 0:
                become_rank(request, rank, port, run_id, pipes)
                return request
            pids.append(pid)
        pipes.start_copying()
        statuses, timed_out = supervise(pids, pipes, request.timeout)
        return {"statuses": statuses, "timed_out": timed_out}
    finally:
        if os.getpid() == server:  # also where this process fails: nothing of the launch stays
            signal_sessions(pids, signal.SIGKILL)
            os.kill(store_pid, signal.SIGKILL)
            os.waitpid(store_pid, 0)
            pipes.close()


if __name__ == "__main__":
    forked = serve()
    if forked is not None:
        run_rank(forked)
