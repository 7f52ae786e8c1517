"""Checks that need a CUDA device; skipped without one (run by launch/gpu_check.sh)."""

import pytest
import torch

from alexnet.config import OptimConfig
from alexnet.engine import build_amp, train_step
from alexnet.layers import DropoutContext
from alexnet.model import build_model
from alexnet.optim import build_optimizer
from pipelines.base import ImageSpec, ShardSpec
from pipelines.dali import DaliLoader
from pipelines.index import build_file_index

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
MEAN, STD = (124.0, 116.0, 104.0), (58.0, 57.0, 57.0)


def test_mixed_decoding_matches_cpu_decoding(tiny_data):
    """nvJPEG and libjpeg-turbo (and the GPU and CPU resizes after them) differ by rounding only:
    the same images within a few levels of 255. Measured on an H200: 2.3 levels on average. Two
    different images of this set differ by 16 levels or more, so a wrong order or shard fails."""
    index = build_file_index(tiny_data / "val")
    image = ImageSpec(67, 76, "paper", MEAN, STD)
    shard = ShardSpec(0, 1, 8, 0)
    gpu = DaliLoader(index, "val", image, shard, torch.device("cuda", 0), 2, 2, "mixed", channels_last=True)
    cpu = DaliLoader(index, "val", image, shard, torch.device("cpu"), 2, 2, "cpu")
    for (xg, yg), (xc, yc) in zip(gpu, cpu):
        assert xg.is_cuda and xg.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(yg.cpu(), yc)
        diff = ((xg.float().cpu() - xc) * torch.tensor(STD).view(1, 3, 1, 1)).abs()
        assert diff.mean().item() < 4.0
        assert diff.flatten(1).mean(1).max().item() < 8.0


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_train_steps_learn_on_gpu(amp):
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = build_model("paper", 10, input_size=67, init="kaiming").to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.01)
    policy = build_amp(amp, device)
    x = torch.randn(32, 3, 67, 67, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device=device)
    losses = []
    for step in range(20):
        ids = torch.arange(32, device=device)
        result = train_step(model, x, y, optimizer, policy, DropoutContext(0, step, ids))
        losses.append(result.loss_sum.item() / 32)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # the same batch, 20 steps: it memorizes
    assert (policy.scaler is not None) == (amp == "fp16")
