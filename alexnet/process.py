"""Process-wide settings of a training process, applied in one place by the trainer and by the
benchmark's step and e2e commands, so that the benchmark times the steps the trainer runs."""

from __future__ import annotations

import torch

from alexnet.config import TrainConfig
from alexnet.hostmem import apply_host_memory


def set_determinism(enabled: bool) -> None:
    """Deterministic kernels, or cuDNN's autotuner (which picks each convolution's fastest
    algorithm for its shapes once, then reuses it: the step's speed on a GPU depends on it)."""
    if enabled:
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
