"""Helpers for tests that start real processes."""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
DEMO_CONFIG = REPO / "launch" / "configs" / "demo.yaml"  # train.py's default

# A small, fast recipe: the paper model at its smallest input on the tiny dataset, with fc6 and
# fc7 512 wide (at 4096 they hold 17.9 of its 20.2 million parameters, and each test step would
# all-reduce and checkpoint them: about 30% of an end-to-end test's time).
TINY_FC_WIDTH = 512
TINY_TRAIN = [
    f"model.fc_width={TINY_FC_WIDTH}",
    "data.batch_size=8",
    "data.resize=76",
    "data.crop=67",
    "data.num_threads=1",
    "model.init=kaiming",
    "train.log_every=2",
    "run.progress=log",
    # training_curves.png is 1-2 s of rank 0 at every session's end, with the other ranks waiting:
    # drawn only by the tests that look at it (run.plot=true after these).
    "run.plot=false",
]
# Synthetic data, 2 steps of 4 images per epoch: seconds per in-process run (each epoch validates
# the same batch, which the model soon predicts: no accuracy to read anything from).
SYNTHETIC_TRAIN = [
    "data.pipeline=synthetic",
    "data.synthetic_steps=2",
    "data.batch_size=4",
    "data.resize=67",
    "data.crop=67",
    "model.fc_width=16",
    "model.num_classes=10",
    "model.init=kaiming",
    "checkpoint.every_steps=0",
    "run.progress=log",
    "run.plot=false",
]


def launch_env(env: dict | None = None) -> dict[str, str]:
    """This process's environment with `env` over it, and one intra-op thread per process (as
    torchrun sets for more than one worker) unless `env` says otherwise."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}


def torchrun(
    args: list[str], nproc: int = 2, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc ARGS` with this interpreter; output captured.
    Past the timeout torchrun gets SIGTERM, on which its agent stops the workers (SIGTERM, then
    SIGKILL 30 s later): killed itself, it would leave them running, in sessions of their own."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    full_env = launch_env(env)
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with subprocess.Popen(cmd, text=True, env=full_env, cwd=REPO, **pipes) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                stdout, stderr = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def launch(args: list[str], nproc: int = 2, timeout: float = 300, env: dict | None = None) -> Launched:
    """`torchrun --standalone --nproc_per_node=nproc SCRIPT ARGS` as its ranks see it, output
    captured, with the ranks forked from tests/_rank_server.py, which has imported torch and the
    project already: 0.1 s a launch instead of about 6 s. Exits 1 where a rank failed, as torchrun
    does. A launch whose environment changes what a process reads as it starts (PYTHONPATH,
    OMP_NUM_THREADS ...) runs under torchrun itself, as does every launch on a machine with a GPU
    (forks_ranks); the tests of torchrun's own behaviour (restarts, signals to its agent) call
    torchrun()."""
    script, *rest = map(str, args)
    server = rank_server()  # first: starting it can set a variable of this process (RankServer)
    full_env = launch_env(env)
    if server is None or server.starts_differently(full_env):
        proc = torchrun(args, nproc=nproc, timeout=timeout, env=env)
        return Launched(proc.args, proc.returncode, proc.stdout, proc.stderr, reported_statuses(proc.stderr, nproc))
    return server.launch(script, rest, nproc, full_env, timeout)


def reported_statuses(stderr: str, nproc: int) -> list[int]:
    """Each rank's exit status from torchrun's report of a failed launch, which lists the ranks
    that failed (`rank : 1 (local_rank: 1)` then `exitcode : 2 (pid: ...)`); 0 for the others."""
    statuses = [0] * nproc
    for rank, status in re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*exitcode\s*:\s*(-?\d+)", stderr):
        statuses[int(rank)] = int(status)
    return statuses


class RankServer:
    """The client of one tests/_rank_server.py process (one per pytest worker, started on first
    use, ended with the worker: it stops at the end of its stdin)."""

    SCRIPT = REPO / "tests" / "_rank_server.py"
    # What a process reads as it starts, which a fork cannot change (torch.distributed's debug
    # level it can: the server sets it again in each rank).
    STARTUP_PREFIXES = ("PYTHON", "LD_", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "MALLOC_", "TORCH", "PYTORCH",
                        "CUDA", "NCCL", "DALI", "LANG", "LC_")  # fmt: skip
    RESET_IN_RANK = ("TORCH_DISTRIBUTED_DEBUG",)

    def __init__(self) -> None:
        # Importing torch._dynamo (building an optimizer does) sets TORCHINDUCTOR_CACHE_DIR in
        # os.environ: set first by a test's in-process run after this server started, it sent
        # every later launch of the pytest worker to torchrun (a test file run alone).
        importlib.import_module("torch._dynamo")
        self.env = launch_env()
        self.lock = threading.Lock()  # one launch at a time
        self.proc = self.start()

    def start(self) -> subprocess.Popen:
        """In pytest's process group, as torchrun's agent is in its caller's: a Ctrl-C ends the
        launch in progress (its ranks' sessions and store killed) and the server."""
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        return subprocess.Popen([sys.executable, "-u", str(self.SCRIPT)], text=True, env=self.env, cwd=REPO, **pipes)

    def starts_differently(self, env: dict[str, str]) -> bool:
        keys = {k for k in {*env, *self.env} if k.startswith(self.STARTUP_PREFIXES) and k not in self.RESET_IN_RANK}
        return any(env.get(k) != self.env.get(k) for k in keys)

    def launch(self, script: str, args: list[str], nproc: int, env: dict, timeout: float) -> Launched:
        cmd = [sys.executable, "-u", script, *args]
        with tempfile.TemporaryDirectory(prefix="launch_") as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"  # the server appends to them
            request = {"script": script, "args": args, "nproc": nproc, "env": env, "cwd": str(REPO),
                       "stdout": str(out), "stderr": str(err), "timeout": timeout}  # fmt: skip
            with self.lock:
                reply = self.ask(request, timeout)
            stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
        return Launched(cmd, 1 if any(reply["statuses"]) else 0, stdout, stderr, reply["statuses"])

    def ask(self, request: dict, timeout: float) -> dict:
        if self.proc.poll() is not None:  # ended (killed, out of memory): a new one
            self.proc = self.start()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        # The server ends a launch at its timeout, and its ranks' sessions 30 s after a failure.
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 120)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            raise RuntimeError(f"{self.SCRIPT.name} gave no reply (status {self.proc.wait()}): see the worker's stderr")
        return json.loads(line)


class Launched(subprocess.CompletedProcess):
    """A launch's result with each rank's exit status (-N: ended by signal N), which torchrun
    prints in its report of a failed launch."""

    def __init__(self, args, returncode: int, stdout: str, stderr: str, statuses: list[int]) -> None:
        super().__init__(args, returncode, stdout, stderr)
        self.statuses = statuses


@functools.cache
def rank_server() -> RankServer | None:
    """This worker's rank server, started on first use; None where forks_ranks() is False."""
    return RankServer() if forks_ranks() else None


def forks_ranks() -> bool:
    """False on a machine with an NVIDIA GPU, where launch runs torchrun: CUDA does not work in a
    process forked after its parent initialized it, and importing DALI may initialize it."""
    return not glob.glob("/dev/nvidia[0-9]*")


def one_process(args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python ARGS`: one process without torchrun's agent, whose own import of torch is 1.5-2 s of
    every launch; output captured."""
    full_env = launch_env(env)
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO
    )


def launcher(name: str):
    """launch/<name>.py loaded into this process as a module (the launchers are scripts, not a
    package): its main() and helpers, for a check that needs no process of its own."""
    spec = importlib.util.spec_from_file_location(f"{name}_command", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_tiny(tiny_data: Path, run_root: Path, name: str, *extra: str, nproc: int = 2, env: dict | None = None):
    """launch/train.py on the tiny dataset with TINY_TRAIN, run folder `run_root/name`; one process
    runs without torchrun."""
    args = [TRAIN, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={run_root}", f"run.name={name}", *extra]
    return launch(args, nproc=nproc, env=env) if nproc > 1 else one_process(args, env=env)


def tiny_run_config(tiny_data: Path, run_root: Path, name: str, *extra: str):
    """The Config that train_tiny's command trains (train.py's default demo recipe), for a run in
    this process: its interpreter has torch, DALI and the model imported already, which a launch
    of its own takes longer to do than a tiny run's failure or a few steps."""
    from alexnet.config import load_config

    return load_config(
        DEMO_CONFIG, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={run_root}", f"run.name={name}", *extra]
    )


def launch_per_world(tmp_path_factory, script: Path, cases: dict[int, list[str]]) -> Callable[[int], Path]:
    """The output folder of a world size's cases (`script OUT_DIR CASE ...`, which writes each
    case's results into OUT_DIR/CASE), all of them run in one torchrun launch on first use: a
    launch's start, every rank importing torch, took longer than a case."""
    folders: dict[int, Path] = {}

    def folder(world: int) -> Path:
        if world not in folders:
            folders[world] = tmp_path_factory.mktemp(f"{script.stem}_{world}_ranks")
            check(launch([script, folders[world], *cases[world]], nproc=world))
        return folders[world]

    return folder


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    )
    return proc


# The reason of a test marked `dali` where this Python has no DALI (tests/conftest.py skips it).
NEEDS_DALI = "needs NVIDIA DALI (x86-64 Linux)"


@functools.cache
def dali_missing() -> str | None:
    """Why this Python cannot import NVIDIA DALI (`pip install -e .` installs it on x86-64 Linux
    only; an ARM Mac or aarch64 Linux trains with data.pipeline=torchvision), or None where it can.
    Not installed is NEEDS_DALI; installed but failing to import adds the error to it, so a broken
    install that turns the DALI tests into skips says why. Asked only where a test needs the
    answer: importing DALI takes a second or more."""
    try:
        if importlib.util.find_spec("nvidia.dali") is None:
            return NEEDS_DALI
    except ImportError:  # no `nvidia` package, or an import hook that hides DALI (without_dali's)
        return NEEDS_DALI
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        return f"{NEEDS_DALI}: it is installed but `import nvidia.dali` failed: {err}"
    return None


def without_dali(folder: Path) -> dict[str, str]:
    """The environment of a Python that behaves as one where DALI is not installed (`pip install
    -e .` installs it on x86-64 Linux only): a sitecustomize.py in `folder`, first on its path."""
    (folder / "sitecustomize.py").write_text(_NO_DALI)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{folder}{os.pathsep}{os.environ['PYTHONPATH']}"}


_NO_DALI = """import sys


class NoDali:  # this interpreter behaves as one where DALI is not installed (not x86-64, say)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[:2] == ["nvidia", "dali"]:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NoDali())
"""


def rank_1_sees(tmp_path: Path, script: Path, flag: str, value: Path) -> Path:
    """A wrapper that runs `script` with the argument after `flag` replaced by `value` on rank 1
    alone: a path that rank 1's node does not have."""
    wrapper = tmp_path / "rank_1_elsewhere.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        f"if os.environ['RANK'] == '1': sys.argv[sys.argv.index({flag!r}) + 1] = {str(value)!r}\n"
        f"sys.argv[0] = {str(script)!r}\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    return wrapper


def rank_1_differs(tmp_path: Path, script: Path, args: tuple[str, ...] = (), env: dict | None = None) -> Path:
    """A wrapper that runs `script` with `args` added to its command line and `env` set on rank 1
    alone: an agent started with other settings, or on a node that runs another process count."""
    wrapper = tmp_path / "rank_1_differs.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        "if os.environ['RANK'] == '1':\n"
        f"    sys.argv += {list(args)!r}\n"
        f"    os.environ.update({dict(env or {})!r})\n"
        f"sys.argv[0] = {str(script)!r}\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    return wrapper


def loader_failing_on_rank_1(tmp_path: Path, script: Path, split: str, at_batch: int = 3) -> Path:
    """A wrapper that runs `script` with rank 1's DALI loader of `split` failing at its
    `at_batch`-th batch as nothing foreseen fails (a DALI internal error, memory run out)."""
    wrapper = tmp_path / "rank_1_loader_fails.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        "if os.environ['RANK'] == '1':\n"
        "    import pipelines.dali as dali\n"
        "    run, calls = dali.DaliLoader._run_pipeline, [0]\n"
        "    def failing(self):\n"
        f"        calls[0] += self.split == {split!r}\n"
        f"        if self.split == {split!r} and calls[0] == {at_batch}:\n"
        "            raise RuntimeError('Critical error in pipeline: injected')\n"
        "        return run(self)\n"
        "    dali.DaliLoader._run_pipeline = failing\n"
        f"sys.argv[0] = {str(script)!r}\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    return wrapper


def running(pid: int) -> bool:
    """Whether the process runs (not ended, nor a zombie waiting for its parent)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent` now."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return pids
