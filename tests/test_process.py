"""The process-wide settings the trainer and the benchmark apply (alexnet/process.py)."""

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
