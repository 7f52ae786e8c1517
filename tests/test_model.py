import math

import pytest
import torch
import torchvision
from torch.nn import functional as F

from alexnet.layers import CounterDropout, DropoutContext, LRNConstants, apply_dropout_context, counter_uniform_bits
from alexnet.model import (
    LRN_ALPHA,
    LRN_BETA,
    LRN_K,
    LRN_SIZE,
    PaperAlexNet,
    build_model,
    min_input_size,
    pool5_size,
)
from alexnet.torchvision_variant import TorchvisionAlexNet

PAPER_LRN = LRNConstants(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)


def test_paper_parameter_count_at_1000_classes():
    model = PaperAlexNet(1000)
    assert sum(p.numel() for p in model.parameters()) == 60_965_224
    conv = sum(p.numel() for n, p in model.named_parameters() if n.startswith("conv"))
    assert conv == 2_334_080  # the ~2.3M parameters the hybrid layout all-reduces


def test_fc_width_sets_fc6_and_fc7_in_both_variants_and_keeps_the_parameter_names():
    """model.fc_width: the paper model holds half of each layer in each tower; torchvision's
    variant keeps torchvision's parameter names, and its default is torchvision's model."""
    paper = PaperAlexNet(10, input_size=67, fc_width=512)
    assert [tuple(paper.fc6[t].weight.shape) for t in (0, 1)] == [(256, 256), (256, 256)]  # pool5 1x1 at 67
    assert [tuple(paper.fc7[t].weight.shape) for t in (0, 1)] == [(256, 512), (256, 512)]
    assert [tuple(paper.fc8[t].weight.shape) for t in (0, 1)] == [(5, 512), (5, 512)]
    assert list(paper.state_dict()) == list(PaperAlexNet(10, input_size=67).state_dict())
    conv = sum(p.numel() for n, p in paper.named_parameters() if n.startswith("conv"))
    fc = 256 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    assert sum(p.numel() for p in paper.parameters()) == conv + fc
    assert paper(torch.randn(2, 3, 67, 67)).shape == (2, 10)
    with pytest.raises(ValueError, match="fc_width must be even"):
        PaperAlexNet(10, input_size=67, fc_width=511)

    narrow = build_model("torchvision", 10, fc_width=300)
    assert [tuple(narrow.classifier[i].weight.shape) for i in (1, 4, 6)] == [(300, 9216), (300, 300), (10, 300)]
    assert list(narrow.state_dict()) == list(torchvision.models.alexnet(num_classes=10).state_dict())
    stock = build_model("torchvision", 10)
    assert [tuple(stock.classifier[i].weight.shape) for i in (1, 4, 6)] == [(4096, 9216), (4096, 4096), (10, 4096)]


def test_paper_layer_shapes_at_227():
    model = PaperAlexNet(1000).eval()
    x = torch.randn(2, 3, 227, 227)
    assert model(x).shape == (2, 1000)  # the fused single-device path
    model.exchange = lambda parts, point: torch.cat(parts, dim=1)  # tower by tower, so hooks see each layer
    seen = {}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        for t, layer in enumerate(getattr(model, name)):
            layer.register_forward_hook(lambda m, i, o, key=f"{name}.{t}": seen.__setitem__(key, tuple(o.shape)))
    features = model.forward_features(x)
    assert seen["conv1.0"] == (2, 48, 55, 55)
    assert seen["conv2.1"] == (2, 128, 27, 27)
    assert seen["conv3.0"] == (2, 192, 13, 13)
    assert seen["conv4.1"] == (2, 192, 13, 13)
    assert seen["conv5.0"] == (2, 128, 13, 13)
    assert features.shape == (2, 256 * 6 * 6)  # pool5: 6x6 per channel
    assert model(x).shape == (2, 1000)


def test_small_inputs_work_and_too_small_fails():
    assert pool5_size(227) == 6 and pool5_size(67) == 1 and pool5_size(99) == 2
    for variant in ("paper", "torchvision"):
        size = min_input_size(variant)
        model = build_model(variant, 10, input_size=size).eval()
        assert model(torch.randn(3, 3, size, size)).shape == (3, 10)
    with pytest.raises(ValueError, match="smallest"):
        PaperAlexNet(10, input_size=66)


def test_paper_init_statistics():
    torch.manual_seed(0)
    model = PaperAlexNet(1000)
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        for layer in getattr(model, name):
            w = layer.weight.detach()
            assert abs(w.mean().item()) < 3 * 0.01 / w.numel() ** 0.5 + 1e-4
            assert w.std().item() == pytest.approx(0.01, rel=0.05 if w.numel() > 10_000 else 0.15)
            expected_bias = 1.0 if name in ones else 0.0
            assert torch.all(layer.bias == expected_bias), name


def test_model_init_applies_to_the_torchvision_variant_and_auto_is_each_variants_own():
    """model.init=paper and kaiming were ignored by the torchvision variant (it kept torchvision's
    init whatever the config said); auto, the default, is section 5's for the paper model and
    torchvision's own for its variant."""
    torch.manual_seed(0)
    own = torchvision.models.alexnet(num_classes=10).state_dict()
    torch.manual_seed(0)
    auto = build_model("torchvision", 10, init="auto").state_dict()
    assert all(torch.equal(auto[k], v) for k, v in own.items())
    paper = build_model("torchvision", 10, init="paper")
    convs = [m for m in paper.features if isinstance(m, torch.nn.Conv2d)]
    fcs = [m for m in paper.classifier if isinstance(m, torch.nn.Linear)]
    for layer, bias in zip(convs + fcs, (0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0), strict=True):
        assert layer.weight.std().item() == pytest.approx(0.01, rel=0.15) and torch.all(layer.bias == bias)
    kaiming = build_model("torchvision", 10, init="kaiming")
    conv2 = kaiming.features[3]
    fan_in = conv2.weight[0].numel()
    assert conv2.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05) and torch.all(conv2.bias == 0)
    torch.manual_seed(0)
    paper_model = build_model("paper", 10, input_size=67, init="auto").state_dict()
    torch.manual_seed(0)
    explicit = PaperAlexNet(10, input_size=67, init="paper").state_dict()
    assert all(torch.equal(v, paper_model[k]) for k, v in explicit.items())


def test_towers_see_only_their_own_tower_in_conv2_conv4_conv5():
    """Perturbing tower 1's conv1 must not change tower 0's conv2 output (conv2 sees its own
    tower only) but must change conv3 outputs of both towers (conv3 sees both)."""
    torch.manual_seed(0)
    model = PaperAlexNet(10, input_size=99).eval()
    x = torch.randn(2, 3, 99, 99) * 50
    before_t0 = model._conv1_2(0, x)
    x3_before = torch.cat([model._conv1_2(t, x) for t in (0, 1)], 1)
    with torch.no_grad():
        model.conv1[1].weight.add_(0.05)
    assert torch.equal(model._conv1_2(0, x), before_t0)
    x3_after = torch.cat([model._conv1_2(t, x) for t in (0, 1)], 1)
    for t in (0, 1):
        assert not torch.allclose(model.conv3[t](x3_before), model.conv3[t](x3_after))


def test_torchvision_weights_interchange():
    torch.manual_seed(0)
    reference = torchvision.models.alexnet(weights=None).eval()
    ours = TorchvisionAlexNet(1000).eval()
    result = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert list(ours.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))
    # and back: our weights load into torchvision
    torchvision.models.alexnet(weights=None).load_state_dict(ours.state_dict(), strict=True)


def test_counter_dropout_mask_is_a_function_of_sample_ids():
    drop = CounterDropout(0.5, stream=6).train()
    x = torch.ones(8, 1000)
    drop.context = DropoutContext(seed=3, step=11, sample_ids=torch.arange(8))
    full = drop(x)
    # the same samples computed in two halves (two data-parallel ranks) give the same rows
    drop.context = DropoutContext(seed=3, step=11, sample_ids=torch.arange(4, 8))
    assert torch.equal(drop(x[4:]), full[4:])
    keep = (full > 0).float().mean().item()
    assert keep == pytest.approx(0.5, abs=0.02)
    assert set(full.unique().tolist()) == {0.0, 2.0}  # inverted dropout scales kept units by 1/(1-p)
    # another step or another layer draws another mask
    drop.context = DropoutContext(seed=3, step=12, sample_ids=torch.arange(8))
    assert not torch.equal(drop(x), full)
    bits_a = counter_uniform_bits(3, 11, 6, torch.arange(8), 1000)
    bits_b = counter_uniform_bits(3, 11, 7, torch.arange(8), 1000)
    assert (bits_a != bits_b).float().mean() > 0.99
    # a feature slice of the layer draws the same bits as the whole layer does there
    assert torch.equal(counter_uniform_bits(3, 11, 6, torch.arange(8), 300, feature_offset=500), bits_a[:, 500:800])


def test_dropout_off_in_eval_and_context_applied_model_wide():
    model = PaperAlexNet(10, input_size=67)
    ctx = DropoutContext(seed=0, step=0, sample_ids=torch.arange(2))
    apply_dropout_context(model, ctx)
    assert model.drop6.context is ctx and model.drop7.context is ctx
    model.eval()
    x = torch.randn(2, 3, 67, 67)
    torch.manual_seed(1)
    undropped = PaperAlexNet(10, dropout=0.0, input_size=67).eval()
    undropped.load_state_dict(model.state_dict())
    assert torch.equal(model(x), undropped(x))  # eval: the same function as no dropout at all
    model.train()
    assert not torch.equal(model(x), undropped(x))  # and the context does drop in training


def test_paper_dropout_zeroes_the_outputs_of_fc6_and_fc7():
    """Section 4.2: the first two fully-connected layers' outputs are dropped (fc7's and fc8's
    inputs); fc6 reads the conv features undropped. Kept units are scaled by 2."""
    torch.manual_seed(0)
    model = PaperAlexNet(10, input_size=67, init="kaiming").train()
    apply_dropout_context(model, DropoutContext(seed=0, step=0, sample_ids=torch.arange(4)))
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in ("fc6", "fc7", "fc8"):
        for t, layer in enumerate(getattr(model, name)):
            layer.register_forward_hook(lambda m, i, o, key=f"{name}.{t}": seen.__setitem__(key, (i[0], o)))
    x = torch.randn(4, 3, 67, 67)
    model(x)
    assert torch.equal(seen["fc6.0"][0], model.forward_features(x))  # no dropout before fc6
    for layer, previous in (("fc7", "fc6"), ("fc8", "fc7")):
        produced = torch.cat([F.relu(seen[f"{previous}.{t}"][1]) for t in (0, 1)], dim=1)
        consumed = seen[f"{layer}.0"][0]
        kept = consumed != 0
        assert torch.allclose(consumed[kept], 2 * produced[kept])  # inverted dropout's scale
        active = produced > 0
        assert 0.4 < (kept & active).sum() / active.sum() < 0.6  # about half of the live units dropped


def test_initial_loss_is_about_log_num_classes():
    """Pitfall 12: the initial loss must be about ln(1000) = 6.91. With the paper's init the fc7
    units sit near their bias of 1, so fc8's logits spread with std s ~ 0.01 * sqrt(4096) ~ 1 and
    the expected loss is ln(1000) + s^2 / 2 (log-sum-exp of Gaussian logits)."""
    torch.manual_seed(0)
    model = PaperAlexNet(1000).eval()
    logits = model(torch.randn(4, 3, 227, 227) * 50)
    # the loss averaged over every possible label, so that no label draw decides the test
    loss = (torch.logsumexp(logits, dim=1) - logits.mean(dim=1)).mean().item()
    spread = logits.std(dim=1).mean().item()
    assert 0.5 < spread < 1.5
    assert loss == pytest.approx(math.log(1000) + spread**2 / 2, abs=0.1)
    assert 6.9 < loss < 8.0


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_lrn_is_the_papers_formula_with_the_right_gradient(memory_format):
    from alexnet.layers import LocalResponseNorm

    x = (torch.randn(2, 10, 5, 5, dtype=torch.float64) * 40).contiguous(memory_format=memory_format)
    x.requires_grad_()
    ours = LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    # torch divides alpha by n: alpha * n there is the paper's alpha here
    reference = torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    torch.testing.assert_close(ours(x), reference(x))
    g = torch.randn_like(x)
    (ga,) = torch.autograd.grad(ours(x), x, g)
    (gb,) = torch.autograd.grad(reference(x), x, g)
    torch.testing.assert_close(ga, gb)
    assert torch.autograd.gradcheck(lambda t: ours(t, 2), (x.detach()[:, :, :2, :2].requires_grad_(),))
    # groups: the window stops at each group's edge (each tower normalizes its own kernels)
    halves = torch.cat([reference(x[:, :5]), reference(x[:, 5:])], 1)
    torch.testing.assert_close(ours(x, 2), halves)
    # the output and the input gradient keep the input's memory format (no hidden layout copies)
    assert ours(x, 2).is_contiguous(memory_format=memory_format)
    assert torch.autograd.grad(ours(x, 2), x, g.contiguous(memory_format=memory_format))[0].is_contiguous(
        memory_format=memory_format
    )


def test_lrn_window_sizes_and_sliced_channels_last_input():
    from alexnet.layers import LocalResponseNorm

    reference = torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    x = (torch.randn(2, 10, 4, 4, dtype=torch.float64) * 40).contiguous(memory_format=torch.channels_last)
    sliced = x[:, :6]  # channels_last, but contiguous in neither format
    out = LocalResponseNorm(5, 1e-4, 0.75, 2.0)(sliced)
    torch.testing.assert_close(out, reference(sliced))
    assert out.is_contiguous(memory_format=torch.channels_last)
    # every window size and group width, also groups narrower than the window, values and gradient
    g = torch.randn_like(x)
    for size in (3, 5, 7):
        torch_lrn = torch.nn.LocalResponseNorm(size, alpha=1e-4 * size, beta=0.75, k=2.0)
        for groups in (1, 2, 5):
            leaf, ref_leaf = x.detach().requires_grad_(), x.detach().requires_grad_()
            ours = LocalResponseNorm(size, 1e-4, 0.75, 2.0)(leaf, groups)
            expected = torch.cat([torch_lrn(part) for part in ref_leaf.chunk(groups, 1)], 1)
            torch.testing.assert_close(ours, expected)
            grads = torch.autograd.grad(ours, leaf, g)[0], torch.autograd.grad(expected, ref_leaf, g)[0]
            torch.testing.assert_close(*grads)
    # size 1: each channel normalised by itself alone
    torch.testing.assert_close(LocalResponseNorm(1, 1e-4, 0.75, 2.0)(x), x / (2 + 1e-4 * x * x) ** 0.75)
    for size in (0, 4):  # the window must be centred on its channel
        with pytest.raises(ValueError, match="odd"):
            LocalResponseNorm(size, 1e-4, 0.75, 2.0)


def reference_window_sum(x: torch.Tensor, size: int, groups: int) -> torch.Tensor:
    """Each channel's window sum within its group, from a zero-padded copy of each group."""
    sums = []
    for part in x.chunk(groups, 1):
        padded = torch.nn.functional.pad(part, (0, 0, 0, 0, size // 2, size // 2))
        sums.append(sum(padded.narrow(1, i, part.shape[1]) for i in range(size)))
    return torch.cat(sums, 1)


def test_lrn_in_half_precision_stays_finite_at_the_activations_its_constants_are_for():
    """fp16 (CUDA autocast) and the paper's k = 2, alpha = 1e-4: activations around 200 make
    alpha * sum(x^2) about 10, where LRN really divides; x^2 itself (40,000) and its window sum
    overflow float16. Squaring x * sqrt(alpha) keeps s finite, both window sums, within fp16's
    rounding of the float64 values (the band path runs on the CPU here as it does on CUDA)."""
    from alexnet.layers import _LRNFunction, build_window_band

    torch.manual_seed(0)
    x = torch.rand(2, 12, 3, 3, dtype=torch.float64) * 250
    reference = _LRNFunction.apply(x, PAPER_LRN, 2, None, 2)
    for band in (None, build_window_band(6, 5, x.half())):
        y = _LRNFunction.apply(x.half(), PAPER_LRN, 2, band, 2)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.double(), reference, rtol=4e-3, atol=4e-3)


def test_lrn_in_half_precision_keeps_its_output_and_gradient_up_to_large_activations():
    """Up to |x| of about 11,000 s stays finite in float16; s * sqrt(s), an intermediate of s^-0.75,
    overflowed from s of about 1625 (five channels of 2000, or one of 4100) and the output fell to
    0; backward's g * x overflowed where the gradient itself is small (x = 1000, g = 100). Forward
    (the training Function and the plain inference path) and backward against float64."""
    from alexnet.layers import LocalResponseNorm, _LRNFunction

    x = torch.full((1, 5, 2, 2), 2000.0, dtype=torch.float64)
    x[0, :, 1, 1] = torch.tensor([0.0, 0.0, 4100.0, 0.0, 0.0], dtype=torch.float64)  # one active channel
    x[0, :, 0, 1] = torch.tensor([8000.0, 3.0, 8000.0, 7.0, 8000.0], dtype=torch.float64)
    lrn = LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    reference = lrn(x)
    for y in (_LRNFunction.apply(x.half(), PAPER_LRN, 1, None, 1), lrn(x.half())):
        torch.testing.assert_close(y.double(), reference, rtol=4e-3, atol=0.0)
    big = torch.full((1, 5, 1, 1), 1000.0, dtype=torch.float64)
    peak = torch.tensor([0.0, 0.0, 141.0, 0.0, 0.0], dtype=torch.float64).view(1, 5, 1, 1)  # the largest x / s
    # g * x overflowed at 100; g * s^-0.75 / s underflows at 1e-4; (x / s) * g overflowed at 2000 (a
    # loss-scaled gradient), and inf times a zero channel made NaN
    for x0, upstream in ((big, 100.0), (big, 1e-3), (big, 1e-4), (peak, 2000.0), (peak, 5000.0)):
        x1 = x0.clone().requires_grad_()
        g = torch.full_like(x1, upstream)
        (expected,) = torch.autograd.grad(_LRNFunction.apply(x1, PAPER_LRN, 1, None, 1), x1, g)
        xh = x1.detach().half().requires_grad_()
        (got,) = torch.autograd.grad(_LRNFunction.apply(xh, PAPER_LRN, 1, None, 1), xh, g.half())
        assert torch.isfinite(got).all(), (upstream, got)
        # within 1% of the gradient's scale, or 4 steps of float16's subnormal spacing (2^-24), which
        # gradients of 1e-6 are made of; the edge channels' tiny ones (a difference of two
        # near-equal terms) are below float16's resolution at any order of the products
        atol = 1e-2 * expected.abs().max().item() + 2**-22
        torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=atol)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_lrn_banded_window_sum_and_the_shifted_adds_agree(memory_format):
    """The matrix-product window sum (what LRN uses on CUDA) and the shifted in-place adds (the
    CPU's): the same sums, memory format, values and gradient, for each window size and grouping."""
    from alexnet.layers import _LRNFunction, _window_sum_banded, _window_sum_shifted, build_window_band

    x = (torch.randn(2, 12, 5, 4, dtype=torch.float64) * 40).contiguous(memory_format=memory_format)
    for size in (1, 3, 5):
        for groups in (1, 2, 3):
            band = build_window_band(12 // groups, size, x)
            banded = _window_sum_banded(x, band, groups)
            torch.testing.assert_close(banded, reference_window_sum(x, size, groups))
            torch.testing.assert_close(_window_sum_shifted(x, size, groups), reference_window_sum(x, size, groups))
            assert banded.is_contiguous(memory_format=memory_format)
    sliced = x.contiguous(memory_format=torch.channels_last)[:, :6]
    torch.testing.assert_close(
        _window_sum_banded(sliced, build_window_band(3, 5, x), 2), reference_window_sum(sliced, 5, 2)
    )
    band = build_window_band(6, 5, x)
    small = x.detach()[:, :, :2, :2].requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _LRNFunction.apply(t, PAPER_LRN, 2, band, 2), (small,))
    g = torch.randn_like(x)
    xb = x.detach().requires_grad_()
    yb = _LRNFunction.apply(xb, PAPER_LRN, 2, band, 2)
    xs = x.detach().requires_grad_()
    ys = _LRNFunction.apply(xs, PAPER_LRN, 2, None, 1)
    torch.testing.assert_close(yb, ys)
    torch.testing.assert_close(torch.autograd.grad(yb, xb, g)[0], torch.autograd.grad(ys, xs, g)[0])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_lrn_in_batch_chunks_equals_the_whole_batch(memory_format):
    """The CPU runs the LRN a few samples at a time (cache-sized chunks): the values and the
    gradient are bitwise those of the whole batch at once, also with an uneven last chunk."""
    from alexnet.layers import _LRNFunction

    x = (torch.randn(5, 12, 6, 5) * 40).relu_().contiguous(memory_format=memory_format)
    g = torch.randn_like(x).contiguous(memory_format=memory_format)

    def run(chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.detach().requires_grad_()
        y = _LRNFunction.apply(leaf, PAPER_LRN, 2, None, chunk)
        return y, torch.autograd.grad(y, leaf, g)[0]

    whole_y, whole_grad = run(5)
    for chunk in (1, 2, 3, 8):
        y, grad = run(chunk)
        assert torch.equal(y, whole_y) and torch.equal(grad, whole_grad), chunk
        assert y.is_contiguous(memory_format=memory_format) and grad.is_contiguous(memory_format=memory_format)
    small = (x.double()[:3, :, :2, :2] * 1.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _LRNFunction.apply(t, PAPER_LRN, 2, None, 2), (small,))


def test_lrn_chunk_is_cache_sized_on_a_cpu():
    from alexnet.layers import CPU_CHUNK_BYTES, lrn_batch_chunk

    floats = CPU_CHUNK_BYTES // 4
    assert lrn_batch_chunk(torch.zeros(8, floats + 1, 1, 1)) == 1  # a sample over the budget: one at a time
    assert lrn_batch_chunk(torch.zeros(8, floats // 3, 1, 1)) == 3  # as many whole samples as fit
    assert lrn_batch_chunk(torch.zeros(4, 8, 4, 4)) == CPU_CHUNK_BYTES // 512  # beyond the batch: one chunk
    assert lrn_batch_chunk(torch.zeros(0, 8, 4, 4)) == 1
    # elsewhere (an accelerator; here the shape-only meta device) the whole batch in one go
    assert lrn_batch_chunk(torch.zeros(8, floats + 1, 1, 1, device="meta")) == 8


def test_lrn_uses_the_band_on_cuda_only():
    from alexnet.layers import LocalResponseNorm

    lrn = LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    assert lrn.window_band(torch.zeros(1, 8, 2, 2), 2) is None
    assert lrn.state_dict() == {}  # the band is a cache, not a weight: checkpoints stay as they were


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lrn_on_cuda_matches_the_cpu(dtype):
    """On CUDA the LRN sums its window with a matrix product: the same values and gradient as the
    CPU's shifted adds (to the dtype's rounding), in the input's memory format."""
    from alexnet.layers import LocalResponseNorm

    lrn = LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    torch.manual_seed(0)
    x = (torch.randn(4, 96, 13, 13) * 40).contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    xc = x.clone().requires_grad_()
    yc = lrn(xc, 2)
    (gc,) = torch.autograd.grad(yc, xc, g)
    xg = x.to("cuda", dtype).requires_grad_()
    yg = lrn(xg, 2)
    (gg,) = torch.autograd.grad(yg, xg, g.to("cuda", dtype))
    assert lrn.window_band(xg, 2) is not None and yg.dtype == dtype
    assert yg.is_contiguous(memory_format=torch.channels_last)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(yg.float().cpu(), yc, **tol)
    torch.testing.assert_close(gg.float().cpu(), gc, **tol)


def test_fused_single_device_path_equals_the_written_out_towers():
    torch.manual_seed(0)
    model = PaperAlexNet(10, input_size=99)
    x = torch.randn(3, 3, 99, 99) * 50
    fused = model.forward_features(x)
    (g_fused,) = torch.autograd.grad(fused.square().sum(), model.conv2[1].weight)
    model.exchange = lambda parts, point: torch.cat(parts, dim=1)  # not concat_towers: tower by tower
    assert not model._both_towers_here()
    towers = model.forward_features(x)
    (g_towers,) = torch.autograd.grad(towers.square().sum(), model.conv2[1].weight)
    torch.testing.assert_close(fused, towers, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, g_towers, rtol=1e-4, atol=1e-4)


def test_lrn_constants_are_section_3_3s():
    """Section 3.3 of Krizhevsky et al. 2012: "k = 2, n = 5, alpha = 10^-4, and beta = 0.75"."""
    assert (LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K) == (5, 1e-4, 0.75, 2.0)
    model = PaperAlexNet(10, input_size=67, fc_width=16)
    assert model.lrn.constants == LRNConstants(5, 1e-4, 0.75, 2.0)  # what the model's layer holds


def paper_lrn(a: torch.Tensor) -> torch.Tensor:
    """Section 3.3 written out: b_i = a_i / (k + alpha * sum_{j = max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2)^beta
    with the paper's literals k = 2, n = 5, alpha = 1e-4, beta = 0.75 (alpha not divided by n:
    torch.nn.functional.local_response_norm divides it, so it would need alpha = 5e-4 to match)."""
    channels = a.shape[1]
    out = torch.empty_like(a)
    for i in range(channels):
        window = a[:, max(0, i - 2) : min(channels, i + 3)]
        out[:, i] = a[:, i] / (2.0 + 1e-4 * window.square().sum(1)) ** 0.75
    return out


def paper_logits(model: PaperAlexNet, x: torch.Tensor) -> torch.Tensor:
    """Figure 2 and sections 3.3-3.5 in functional ops, from the model's parameters: each tower's
    conv1 (11x11, stride 4) and conv2 (5x5) see their own tower, each followed by ReLU, LRN and
    overlapping max pooling (z = 3, s = 2); conv3 reads both towers; conv4 and conv5 (3x3) their
    own; pool5; fc6 and fc7 read both towers' halves, fc8 both. Paddings 2 (conv2) and 1 (conv3-5)
    keep the map sizes of section 3.5 (27 and 13 at 227 px)."""

    def conv(layer, h, **kw):
        return F.relu(F.conv2d(h, layer.weight, layer.bias, **kw))

    def pool(h):
        return F.max_pool2d(h, kernel_size=3, stride=2)

    towers = (0, 1)
    h = [pool(paper_lrn(conv(model.conv1[t], x, stride=4))) for t in towers]
    h = [pool(paper_lrn(conv(model.conv2[t], h[t], padding=2))) for t in towers]
    both = torch.cat(h, 1)
    h = [conv(model.conv3[t], both, padding=1) for t in towers]
    h = [conv(model.conv4[t], h[t], padding=1) for t in towers]
    z = torch.cat([pool(conv(model.conv5[t], h[t], padding=1)).flatten(1) for t in towers], 1)
    f6 = torch.cat([F.relu(F.linear(z, m.weight, m.bias)) for m in model.fc6], 1)
    f7 = torch.cat([F.relu(F.linear(f6, m.weight, m.bias)) for m in model.fc7], 1)
    return torch.cat([F.linear(f7, m.weight, m.bias) for m in model.fc8], 1)


def test_paper_model_computes_the_papers_network():
    """The model's logits against figure 2 written out in functional ops with the paper's literal
    constants (paper_logits). Pooling with kernel 2 instead of section 3.4's overlapping 3 gives
    the same map sizes at 67, 99 and 227 pixels, so the shape tests could not tell them apart;
    nor did any test notice other LRN constants than section 3.3's, or a ReLU left out. Both the
    fused single-device path and the written-out towers are checked, in float64. The input is
    scaled so that alpha * sum(a^2) is about 5 after conv1 (He init, pixels of std 100), where LRN
    really divides, not the near-constant 2^-0.75 it is on small activations."""
    torch.manual_seed(0)
    model = PaperAlexNet(10, input_size=67, init="kaiming", fc_width=16).double().eval()
    x = torch.randn(2, 3, 67, 67, dtype=torch.float64) * 100
    with torch.no_grad():
        expected = paper_logits(model, x)
        assert expected.std() > 1.0  # logits that differ between classes, not a constant the check would miss
        torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-9)
        model.exchange = lambda parts, point: torch.cat(list(parts), dim=1)  # tower by tower
        assert not model._both_towers_here()
        torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-9)


def test_a_batch_of_another_size_than_the_model_s_is_refused_by_name():
    """224 images into a model built for 227 failed in fc6 ("mat1 and mat2 shapes cannot be
    multiplied (1x6400 and 9216x2048)"), an unbatched image inside the LRN."""
    model = build_model("paper", 10, fc_width=16).eval()
    assert model(torch.randn(1, 3, 230, 229)).shape == (1, 10)  # the same 6x6 pool5
    for shape in [(1, 3, 224, 224), (3, 227, 227), (1, 1, 227, 227), (1, 3, 227, 66)]:
        with pytest.raises(ValueError, match=r"input_size=227 \(its data.crop\).*got \(" + ", ".join(map(str, shape))):
            model(torch.randn(shape))


def test_an_unknown_init_is_refused():
    for variant in ("paper", "torchvision"):
        with pytest.raises(ValueError, match="init must be paper, kaiming or auto; got 'xavier'"):
            build_model(variant, 10, input_size=67, init="xavier")


@pytest.mark.parametrize("record", ["trace", "export"])
def test_the_paper_model_is_recorded_by_trace_and_export_with_gradients_on(record, tmp_path):
    """PyTorch's recipes trace or export a model in eval mode without torch.no_grad(): the LRN's
    autograd Function was recorded with its batch-dependent loop (trace: "Graphs differed across
    invocations"; saving: "Could not export Python function call") or refused (export: out=
    arguments under autograd). The recorded graph now computes the model's own values."""
    torch.manual_seed(0)
    model = build_model("paper", 10, input_size=67, fc_width=16).eval()
    x = torch.randn(4, 3, 67, 67)
    with torch.no_grad():
        expected = model(x)
    if record == "trace":
        traced = torch.jit.trace(model, x)
        torch.jit.save(traced, tmp_path / "m.pt")
        recorded = torch.jit.load(tmp_path / "m.pt")
    else:
        batch = torch.export.Dim("batch")
        recorded = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}}).module()
    with torch.no_grad():
        assert torch.equal(recorded(x), expected)
        assert torch.allclose(recorded(x[:3]), expected[:3], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_lrn_for_tracers_is_the_inference_arithmetic_bitwise(dtype, memory_format):
    from alexnet.layers import _lrn_out_of_place, _lrn_scale

    torch.manual_seed(0)
    a = (torch.randn(3, 96, 9, 9).abs() * 30).to(dtype).contiguous(memory_format=memory_format)
    for groups in (1, 2):
        assert torch.equal(_lrn_out_of_place(a, PAPER_LRN, groups, None), a * _lrn_scale(a, PAPER_LRN, groups, None)[1])
