"""Checks that need a CUDA device; skipped without one (run by launch/gpu_check.sh)."""

import pytest
import torch
from _helpers import TINY_TRAIN, TRAIN, check, dali_missing, torchrun

from alexnet.config import OptimConfig
from alexnet.engine import AmpPolicy, MicroBatch, accumulated_step, build_amp, train_step
from alexnet.layers import DropoutContext
from alexnet.model import build_model
from alexnet.optim import build_optimizer
from pipelines.base import ImageSpec, ShardSpec
from pipelines.index import build_file_index

if not dali_missing():  # for the tests marked dali (skipped where DALI is not installed)
    from pipelines.dali import DaliLoader

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
MEAN, STD = (124.0, 116.0, 104.0), (58.0, 57.0, 57.0)


@pytest.mark.dali
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


def _cuda_model_and_batch(seed: int = 0):
    device = torch.device("cuda", 0)
    torch.manual_seed(seed)
    model = build_model("paper", 10, input_size=67, init="kaiming").to(device, memory_format=torch.channels_last)
    x = torch.randn(16, 3, 67, 67, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device=device)
    return model, x, y


def test_sgd_runs_the_fused_kernel_on_cuda_with_the_default_path_s_update():
    """build_optimizer picks PyTorch's fused SGD where the device has it; on CUDA its update
    (decay on weights only, momentum, lr) must be the default path's, to float rounding."""
    fused_model, x, y = _cuda_model_and_batch()
    plain_model, _, _ = _cuda_model_and_batch()
    fused = build_optimizer(list(fused_model.named_parameters()), OptimConfig(), lr=0.05)
    assert fused.defaults["fused"] is True
    # The reference: PyTorch's default (for-loop) path with the same groups, built by hand.
    params = list(plain_model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": OptimConfig().weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    plain = torch.optim.SGD(groups, lr=0.05, momentum=OptimConfig().momentum, foreach=False)
    amp = build_amp("off", x.device)
    for step in range(4):
        ids = torch.arange(len(y), device=x.device)
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            assert train_step(model, x, y, opt, amp, DropoutContext(0, step, ids)).applied
    start, _, _ = _cuda_model_and_batch()
    for (name, a), b, s in zip(fused_model.named_parameters(), plain_model.parameters(), start.parameters()):
        assert not torch.equal(a, s), name  # every parameter moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_fp16_overflow_and_nan_loss_skip_the_step_on_cuda(clip):
    """The CUDA GradScaler with the fused SGD: an inf gradient skips the step and halves the
    scale, also on the very first step (where the fused SGD once left its momentum uninitialized,
    and the next steps wrote NaN into the weights); a NaN loss skips it and leaves the scale;
    normal steps apply, also when clipped. A small initial scale keeps real fp16 overflows out."""
    model, x, y = _cuda_model_and_batch()
    optimizer = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.002)
    amp = AmpPolicy("cuda", torch.float16, torch.amp.GradScaler("cuda", init_scale=256.0))
    armed = [False]
    fc8 = dict(model.named_parameters())["fc8.0.weight"]

    def overflow(p: torch.Tensor) -> None:
        if armed[0]:
            p.grad.view(-1)[0] = float("inf")

    fc8.register_post_accumulate_grad_hook(overflow)
    applied, changed, scales = [], [], []
    for step, kind in enumerate(("grad_overflow", "normal", "nan_loss", "normal", "normal")):
        images = x.clone()
        if kind == "nan_loss":
            images.fill_(float("nan"))
        armed[0] = kind == "grad_overflow"
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ids = torch.arange(len(y), device=x.device)
        result = train_step(model, images, y, optimizer, amp, DropoutContext(0, step, ids), clip)
        applied.append(result.applied)
        changed.append(any(not torch.equal(v, before[k]) for k, v in model.state_dict().items()))
        scales.append(amp.scaler.get_scale())
        assert all(torch.isfinite(p).all() for p in model.parameters()), (kind, step)
    assert applied == [False, True, False, True, True]
    assert changed == applied
    assert scales == [128.0] * 5
    if clip:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
        assert norm == pytest.approx(clip, rel=1e-3)  # clipped after unscaling: the true gradient's norm


def test_fp16_resume_mid_run_on_cuda_gives_identical_weights(tiny_data, tmp_path):
    """launch/train.py on the GPU with fp16: 8 steps straight vs 4, stop, resume, 4 more, with
    deterministic kernels. The loss scale, which starts where fp16 overflows (a first-step skip),
    the momentum and the weights must come out bitwise equal. The torchvision loader keeps this
    check independent of DALI; the DALI loaders' resume is tested on the CPU."""
    common = (
        *TINY_TRAIN,
        f"data.root={tiny_data}",
        f"run.root={tmp_path}",
        "data.pipeline=torchvision",
        "train.amp=fp16",
        "train.deterministic=true",
        "train.epochs=2",
        "checkpoint.every_steps=0",
    )
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # cuBLAS's deterministic mode
    check(torchrun([TRAIN, *common, "run.name=straight", "train.max_steps=8"], nproc=1, env=env))
    check(torchrun([TRAIN, *common, "run.name=resumed", "train.max_steps=4"], nproc=1, env=env))
    second = check(torchrun([TRAIN, *common, "run.name=resumed", "train.max_steps=8"], nproc=1, env=env))
    assert "resumed from" in second.stderr + second.stdout
    a, b = (torch.load(tmp_path / n / "checkpoints" / "last.pt", weights_only=True) for n in ("straight", "resumed"))
    assert a["progress"]["step"] == b["progress"]["step"] == 8
    assert a["scaler"] and a["scaler"]["scale"] == b["scaler"]["scale"]
    assert all(torch.isfinite(w).all() for w in a["model"].values())
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name, buffer in a["optimizer"]["momentum"].items():
        assert torch.equal(buffer, b["optimizer"]["momentum"][name]), name


def _halves(x, y, step: int) -> list[MicroBatch]:
    """The batch of 16 as two batches of 8, each dropped at its rows' places in it."""
    ids = torch.arange(len(y), device=x.device)
    return [MicroBatch(x[r], y[r], DropoutContext(0, step, ids[r])) for r in (slice(0, 8), slice(8, 16))]


def test_an_accumulated_fp16_step_on_cuda_is_the_whole_batch_s():
    """The GradScaler over several backward passes (train.accum_steps): each batch's loss scaled,
    one unscale and one check per step. Two batches of 8 against one of 16, one step from the
    same weights: the same update to float16's rounding, and the same scale. (Under autocast each
    half's weight gradients are rounded to float16 apart, about 5e-4 of the update; four steps from
    this kaiming start amplified that to 2-8% and failed an element-wise tolerance, on the CPU's
    float16 autocast too, where the whole batch against itself is bitwise equal.)"""
    runs = []
    for accumulate in (False, True):
        model, x, y = _cuda_model_and_batch()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.002)
        amp = AmpPolicy("cuda", torch.float16, torch.amp.GradScaler("cuda", init_scale=256.0))
        for step in range(1):
            if accumulate:
                assert accumulated_step(model, _halves(x, y, step), optimizer, amp).applied
            else:
                ids = torch.arange(len(y), device=x.device)
                assert train_step(model, x, y, optimizer, amp, DropoutContext(0, step, ids)).applied
        runs.append(({k: v - start[k] for k, v in model.state_dict().items()}, amp.scaler.get_scale()))
    (whole, whole_scale), (parts, parts_scale) = runs
    assert whole_scale == parts_scale == 256.0
    for name, update in whole.items():
        assert (parts[name] - update).norm() <= 5e-3 * update.norm(), name


def test_an_fp16_overflow_in_a_step_s_last_batch_skips_the_step_and_halves_the_scale_once():
    model, x, y = _cuda_model_and_batch()
    optimizer = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.002)
    amp = AmpPolicy("cuda", torch.float16, torch.amp.GradScaler("cuda", init_scale=256.0))
    backward_passes = []

    def overflow_in_the_second(p: torch.Tensor) -> None:
        backward_passes.append(1)
        if len(backward_passes) == 2:
            p.grad.view(-1)[0] = float("inf")

    dict(model.named_parameters())["fc8.0.weight"].register_post_accumulate_grad_hook(overflow_in_the_second)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = accumulated_step(model, _halves(x, y, 0), optimizer, amp)
    assert (result.applied, result.overflow, amp.scaler.get_scale()) == (False, True, 128.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and optimizer.state == {}
