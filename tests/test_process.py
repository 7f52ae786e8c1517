"""The process-wide settings the trainer and the benchmark apply (alexnet/process.py), and what a
run leaves of the calling process's own (its logging)."""

import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
from _helpers import REPO, SYNTHETIC_TRAIN, TRAIN, torchrun

from alexnet.config import TrainConfig, load_config
from alexnet.process import apply_process_settings
from alexnet.run import run_training


def test_determinism_switches_the_cudnn_autotuner_both_ways(monkeypatch):
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        apply_process_settings(TrainConfig(deterministic=True, host_memory="system"))
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        # cuBLAS is deterministic only with a fixed workspace, which torch merely warned about
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own is kept
        apply_process_settings(TrainConfig(deterministic=True, host_memory="system"))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        # a later run in the same process that is not deterministic gets the autotuner back
        apply_process_settings(TrainConfig(deterministic=False, host_memory="system"))
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def test_amp_off_turns_off_cudnn_s_tf32_convolutions_and_a_later_run_gets_them_back():
    """train.amp=off is documented as the paper's float32, but torch lets cuDNN run float32
    convolutions in TF32 on Ampere and later GPUs unless told otherwise."""
    before = torch.backends.cudnn.allow_tf32
    try:
        apply_process_settings(TrainConfig(amp="off", host_memory="system"))
        assert torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is False  # torch's default: float32 products
        apply_process_settings(TrainConfig(amp="auto", host_memory="system"))
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = before


def test_the_default_settings_and_the_paper_model_leave_the_heavy_modules_unloaded():
    """Switching determinism imports torch._inductor and importing torchvision loads torch._dynamo,
    about a second each in every process (rank, evaluation, export) that does neither."""
    code = (
        "import sys\n"
        "from alexnet.config import TrainConfig\n"
        "from alexnet.model import build_model\n"
        "from alexnet.process import apply_process_settings\n"
        "apply_process_settings(TrainConfig(host_memory='system'))\n"
        "build_model('paper', 10, input_size=67)\n"
        "print(sorted(m for m in ('torch._inductor', 'torch._dynamo', 'torchvision') if m in sys.modules))\n"
        "build_model('torchvision', 10)\n"
        "print('torchvision' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.splitlines() == ["[]", "True"]


def test_exit_process_still_destroys_what_a_reference_cycle_holds(tmp_path):
    """The launchers leave through exit_process, which freezes what survives one collection: an
    unreachable object in a reference cycle (a DALI pipeline whose destructor joins its threads)
    must still be destroyed, and the exit code kept."""
    marker = tmp_path / "destroyed"
    code = (
        "from alexnet.process import exit_process\n"
        "class Pipeline:\n"
        f"    def __del__(self): open({str(marker)!r}, 'w').write('joined')\n"
        "p = Pipeline(); p.me = p; del p\n"
        "exit_process(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stderr == ""
    assert marker.read_text() == "joined"


@pytest.mark.parametrize("code", [0, 3])
def test_a_stop_signal_in_the_last_moment_of_a_completed_run_s_exit_keeps_its_status(code):
    """The interpreter's shutdown puts the default action back for signals with a Python handler
    (the stop handlers) after the atexit handlers; a SIGTERM then (a job's end) killed a completed
    run: exit status -15. Emulated here: the last atexit handler does what the shutdown does, then
    the signal comes. A failed run's status is no success to keep: its signals keep their handlers."""
    code_text = (
        "import atexit, os, signal\n"
        "from alexnet.process import exit_process\n"
        "from alexnet.stop import STOP_SIGNALS\n"
        "def shutdown_then_sigterm():\n"
        "    for sig in STOP_SIGNALS:\n"
        "        if callable(signal.getsignal(sig)):\n"
        "            signal.signal(sig, signal.SIG_DFL)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "atexit.register(shutdown_then_sigterm)\n"
        "for sig in STOP_SIGNALS:\n"
        "    signal.signal(sig, lambda *_: None)  # as StopRequest.install\n"
        f"exit_process({code})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code_text], capture_output=True, text=True, timeout=120)
    assert proc.returncode == (0 if code == 0 else -signal.SIGTERM), proc.stderr


def test_a_run_leaves_the_caller_s_logging_as_it_was(tmp_path, capfd):
    """A notebook's own logging: logging.basicConfig(force=True) removed and closed its root
    handlers and set the root level. The run's lines now have a handler of their own on the
    "alexnet" logger while it runs, and still reach the caller's handler; after the run the
    logger is as it was (it went on at INFO, with the run's handler). Where the caller's own
    handler writes to the console (logging.basicConfig), the run adds none: every line was
    printed twice."""

    class Kept(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    root, ours = logging.getLogger(), logging.getLogger("alexnet")
    kept, level, our_level = Kept(), root.level, ours.level
    root.addHandler(kept)
    try:
        for name in ("one", "two"):
            cfg = load_config(None, [*SYNTHETIC_TRAIN, "train.epochs=1", f"run.root={tmp_path}", f"run.name={name}"])
            run_training(cfg, None)
            assert not [h for h in ours.handlers if type(h).__name__ == "_RunLogHandler"] and ours.level == our_level
        assert kept in root.handlers and root.level == level
        assert sum("finished after 1 epoch" in line for line in kept.lines) == 2
        assert capfd.readouterr().err.count("[rank 0] finished after 1 epoch") == 2  # once per run, not twice
        console = logging.StreamHandler(sys.stderr)  # as logging.basicConfig makes it
        root.addHandler(console)
        try:
            cfg = load_config(None, [*SYNTHETIC_TRAIN, "train.epochs=1", f"run.root={tmp_path}", "run.name=three"])
            run_training(cfg, None)
        finally:
            root.removeHandler(console)
        assert capfd.readouterr().err.count("finished after 1 epoch") == 1  # the caller's handler alone
    finally:
        root.removeHandler(kept)


def test_a_run_leaves_the_caller_s_process_settings_and_random_numbers_as_they_were(tmp_path):
    """A notebook kept the run's cuDNN autotuner, TF32 and deterministic-kernel settings, and its
    next torch.rand went on from where the run's seeded generator had stopped."""
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)

    def settings():
        cudnn = torch.backends.cudnn
        # CUBLAS_WORKSPACE_CONFIG: set by deterministic kernels, and kept in os.environ after the run
        cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        return cudnn.benchmark, cudnn.allow_tf32, torch.are_deterministic_algorithms_enabled(), cublas

    found = settings()
    # The caller's: each differs from what one of the runs sets (the default train.amp turns TF32 on).
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = False, False
    assert not torch.are_deterministic_algorithms_enabled()
    cublas = os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)  # unset, as a caller's may be (a test before set it)
    caller = settings()
    try:
        # Deterministic kernels on, then the autotuner on (the settings of a run without them).
        for name, deterministic in (("det", "true"), ("tuned", "false")):
            cfg = load_config(None, [*SYNTHETIC_TRAIN, "train.epochs=1", f"run.root={tmp_path}", f"run.name={name}",
                                     f"train.deterministic={deterministic}"])  # fmt: skip
            run_training(cfg, None)
            assert settings() == caller, name
        assert torch.equal(torch.rand(3), expected)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = found[:2]
        if cublas is not None:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def test_a_run_given_no_config_says_what_it_expects():
    """A dict (a config read by hand) failed inside dataclasses.asdict: "asdict() should be called
    on dataclass instances"."""
    with pytest.raises(TypeError, match=r"^expected a Config \(alexnet.config.load_config builds one\), got dict$"):
        run_training({"data": {}}, None)


def test_a_run_leaves_the_caller_s_process_group_and_refuses_an_unchecked_config(tmp_path):
    """A script's or notebook's own process group: the run destroyed it at its end (a later
    barrier failed: "Default process group has not been initialized"). And a Config changed in
    Python after load_config was trained unchecked: momentum 1.5 ran, and wrote a config.yaml
    that neither its resume nor evaluate.py could load."""
    code_text = (
        "import torch.distributed as dist\n"
        "from alexnet.config import ConfigError, load_config\n"
        "from alexnet.run import run_training\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/store', rank=0, world_size=1)\n"
        f"cfg = load_config(None, {[*SYNTHETIC_TRAIN, 'train.epochs=1', f'run.root={tmp_path}', 'run.name=kept']!r})\n"
        "run_training(cfg, None)\n"
        "assert dist.is_initialized()\n"
        "dist.barrier()\n"
        "cfg.optim.momentum = 1.5\n"
        "cfg.run.name = 'unchecked'\n"
        "try:\n"
        "    run_training(cfg, None)\n"
        "except ConfigError as exc:\n"
        "    print('refused:', exc)\n"
        "assert dist.is_initialized()\n"
        "dist.destroy_process_group()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code_text], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "refused: config key 'optim.momentum' must be in [0, 1); got 1.5" in proc.stdout
    assert (tmp_path / "kept" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "unchecked").exists()


def test_runs_in_a_caller_s_process_group_leave_no_groups_of_their_own(tmp_path):
    """With the world group the caller's, the towers' pair and slice groups a run made outlived it:
    two more gloo or NCCL groups per run in a worker that trains many times."""
    script = tmp_path / "twice.py"
    script.write_text(
        "import sys\n"
        "import torch.distributed as dist\n"
        "from torch.distributed import distributed_c10d as c10d\n"
        "from alexnet.config import load_config\n"
        "from alexnet.run import run_training\n"
        "dist.init_process_group('gloo')\n"
        "for name in ('one', 'two'):\n"
        f"    overrides = {[*SYNTHETIC_TRAIN, 'train.epochs=1', 'parallel.mode=towers', f'run.root={tmp_path}']!r}\n"
        "    run_training(load_config(None, [*overrides, f'run.name={name}']), None)\n"
        "    print(f'rank {dist.get_rank()} groups after {name}: {len(c10d._world.pg_map)}', flush=True)\n"
        "dist.barrier()\n"
        "dist.destroy_process_group()\n"
    )
    proc = torchrun([script], env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        for name in ("one", "two"):
            assert f"rank {rank} groups after {name}: 1" in proc.stdout, proc.stdout
    assert all((tmp_path / name / "checkpoints" / "last.pt").exists() for name in ("one", "two"))


def test_a_command_interrupted_by_ctrl_c_ends_with_one_line_and_130():
    """evaluate.py, export.py, benchmark.py ... printed a KeyboardInterrupt traceback."""
    code_text = "from alexnet.process import run_command\ndef main():\n    raise KeyboardInterrupt\nrun_command(main)\n"
    proc = subprocess.run([sys.executable, "-c", code_text], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (130, "error: interrupted\n")


# Ctrl-C while the launcher runs: its argument parsing (inside `main`) raises KeyboardInterrupt.
INTERRUPTED_LAUNCH = """
import argparse, runpy, sys
def interrupt(*args, **kwargs):
    raise KeyboardInterrupt
argparse.ArgumentParser.parse_args = interrupt
sys.argv = [sys.argv[1]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("torch imported" if "torch" in sys.modules else "no torch")
"""


# Ctrl-C while the launcher imports: the first import after the launcher's first lines (argparse,
# which every launcher imports next) sends SIGINT and waits for it to end the process.
INTERRUPTED_IMPORT = """
import importlib.abc, os, runpy, signal, sys, time
class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "argparse":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        return None
sys.meta_path.insert(0, CtrlC())
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize(
    "launcher", ["train.py", "evaluate.py", "export.py", "benchmark.py", "lighting_stats.py", "plot_run.py",
                 "microbench.py"]
)  # fmt: skip
def test_a_ctrl_c_while_a_launcher_imports_is_one_line_and_130(launcher):
    """The launchers import torch (and DALI, matplotlib) for 3-5 s before `main` runs: a Ctrl-C
    then printed a KeyboardInterrupt traceback of 10 to 60 lines from importlib's and torch's
    frames, and the process died of SIGINT."""
    assert "argparse" not in subprocess.run([sys.executable, "-c", "import sys; print(*sys.modules)"],
                                            capture_output=True, text=True).stdout.split()  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT, str(REPO / "launch" / launcher)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "error: interrupted\n", "")


def test_a_second_ctrl_c_in_training_is_one_line_and_130():
    """The first Ctrl-C asks for a stop with a checkpoint; the second interrupts at once, and
    printed a traceback of wherever the step was (the LRN's loop, a DALI call)."""
    code_text = (
        "import runpy, sys, alexnet.run\n"
        "def interrupted(*args, **kwargs):\n"
        "    raise KeyboardInterrupt\n"
        "alexnet.run.run_training = interrupted\n"
        f"sys.argv = [{str(TRAIN)!r}]\n"
        f"runpy.run_path({str(TRAIN)!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code_text], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (130, "error: interrupted\n")


@pytest.mark.parametrize("launcher", ["scan.py", "prepare_imagenet.py"])
def test_the_tools_without_torch_end_a_ctrl_c_with_one_line_and_130_and_stay_without_it(launcher):
    """They printed a 25-line KeyboardInterrupt traceback (a scan's ProcessPoolExecutor among it)
    and died of SIGINT; alexnet.process's run_command, which the other launchers use, would have
    added torch's import (2-3 s) to their start."""
    script = str(REPO / "launch" / launcher)
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_LAUNCH, script], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "error: interrupted\n", "no torch\n")
