"""The process-wide settings the trainer and the benchmark apply (alexnet/process.py)."""

import subprocess
import sys

import torch

from alexnet.config import TrainConfig
from alexnet.process import apply_process_settings


def test_determinism_switches_the_cudnn_autotuner_both_ways():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    try:
        apply_process_settings(TrainConfig(deterministic=True, host_memory="system"))
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        # a later run in the same process that is not deterministic gets the autotuner back
        apply_process_settings(TrainConfig(deterministic=False, host_memory="system"))
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


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
