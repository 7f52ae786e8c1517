import pytest
import torch
from torch import nn

from alexnet.config import ConfigError, OptimConfig, ScheduleConfig, load_config
from alexnet.engine import build_amp
from alexnet.model import PaperAlexNet
from alexnet.optim import LrSchedule, build_optimizer, rate_change, scaled_lr, schedule_problems, warmup_problem


def test_linear_scaling_of_the_learning_rate():
    assert scaled_lr(OptimConfig(lr=0.01, lr_reference_batch=128), 1024) == pytest.approx(0.08)


def test_weight_decay_on_weights_only():
    model = PaperAlexNet(10, input_size=67)
    opt = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.01)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_a_device_without_the_fused_kernel_gets_the_default_sgd_that_steps():
    """The fused kernel checks its parameters at its first step, not when it is built: the
    choice is made up front, so a device without the kernel trains instead of failing at step 1
    ('meta' has no fused SGD and stands in for such a device)."""
    model = nn.Linear(3, 2, device="meta")
    opt = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.01)
    assert [g["fused"] for g in opt.param_groups] == [None, None]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # the fused kernel raised here


def test_the_update_is_the_papers_rule_in_the_fused_kernel():
    """Two steps of the fused SGD against section 5's rule written out (torch's form:
    v <- 0.9 v + g + decay * w, w <- w - lr v, decay on weights only), float64."""
    torch.manual_seed(0)
    model = PaperAlexNet(10, input_size=67).double()
    opt = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.01)
    assert [g["fused"] for g in opt.param_groups] == [True, True]  # the CPU has the fused kernel
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    velocity = {n: torch.zeros_like(p) for n, p in weights.items()}
    for _ in range(2):
        grads = {n: torch.randn_like(p) for n, p in weights.items()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        for n, w in weights.items():
            decay = 5e-4 if w.ndim > 1 else 0.0
            velocity[n] = 0.9 * velocity[n] + grads[n] + decay * w
            weights[n] = w - 0.01 * velocity[n]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), weights[n], rtol=1e-12, atol=1e-14)


def schedule(**kw):
    return LrSchedule(ScheduleConfig(**kw), peak_lr=1.0, steps_per_epoch=10, epochs=10)


def test_warmup_then_step():
    s = schedule(name="step", warmup_epochs=1, warmup_start_factor=0.1, step_epochs=3, factor=0.1)
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(5) == pytest.approx(0.55)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert (
        s.lr_at(29) == pytest.approx(1.0) and s.lr_at(30) == pytest.approx(0.1) and s.lr_at(60) == pytest.approx(0.01)
    )


def test_cosine_reaches_the_floor():
    s = schedule(name="cosine", min_lr_factor=0.1)
    assert s.lr_at(0) == pytest.approx(1.0)
    assert s.lr_at(50) == pytest.approx(0.55)
    assert s.lr_at(100) == pytest.approx(0.1)


def test_cosine_after_a_warmup_starts_at_the_peak_and_spans_the_rest_of_the_run():
    """The cosine runs from the end of the warm-up to the end of the run: at the warm-up's last
    step the rate is the peak, half-way through the 80 steps left it is halfway between the peak
    and the floor. Every cosine test ran without a warm-up, so a cosine timed from step 0 (the
    warm-up's steps counted as its own) went unnoticed."""
    s = schedule(name="cosine", warmup_epochs=2, min_lr_factor=0.1)  # 100 steps, 20 of them warm-up
    assert s.lr_at(20) == pytest.approx(1.0, rel=1e-12)  # cos(0) = 1: the peak, 1.0
    # half-way through steps 20..100 (step 60): cos(pi / 2) = 0, so floor + (peak - floor) / 2
    assert s.lr_at(60) == pytest.approx((1 + 0.1) / 2, rel=1e-12)
    # a quarter of the way (step 40): floor + (peak - floor) * (1 + cos(pi / 4)) / 2
    assert s.lr_at(40) == pytest.approx(0.1 + 0.9 * (1 + 2**-0.5) / 2, rel=1e-12)
    assert s.lr_at(100) == pytest.approx(0.1, rel=1e-12)  # the floor at the run's end, not before
    assert s.lr_at(90) > s.lr_at(100)


def test_plateau_divides_when_validation_stops_improving_at_most_three_times():
    s = schedule(name="plateau", patience=1, factor=0.1, max_reductions=3)
    assert [s.observe_validation(v) for v in (10.0, 20.0, 30.0)] == [False, False, False]
    assert s.lr_at(0) == 1.0
    assert s.observe_validation(29.0) is True and s.lr_at(0) == pytest.approx(0.1)
    assert s.observe_validation(35.0) is False  # improved again at the new rate
    assert [s.observe_validation(v) for v in (34.0, 33.0, 32.0, 31.0)] == [True, True, False, False]
    assert s.plateau.reductions == 3 and s.lr_at(0) == pytest.approx(1e-3)
    restored = schedule(name="plateau")
    restored.load_state_dict(s.state_dict())
    assert restored.lr_at(0) == s.lr_at(0)


def test_plateau_with_patience_counts_again_after_each_reduction():
    """patience=3: three validations without a gain divide the rate, and the count starts over
    from the reduction, so the next division needs three more. Every plateau test used patience 1,
    where a count left at 3 after a reduction looked the same as one reset to 0."""
    s = schedule(name="plateau", patience=3, factor=0.1, max_reductions=3)
    assert s.observe_validation(10.0) is False  # the best so far
    # no gain, three times: counts 1, 2, 3 -> the third divides (1.0 -> 0.1) and resets the count
    assert [s.observe_validation(v) for v in (9.0, 10.0, 8.0)] == [False, False, True]
    assert s.plateau.bad_evals == 0 and s.lr_at(0) == pytest.approx(0.1)
    # counts 1, 2: not yet (a count kept at 3 would divide at each of these)
    assert [s.observe_validation(v) for v in (9.5, 9.0)] == [False, False]
    assert s.plateau.bad_evals == 2 and s.lr_at(0) == pytest.approx(0.1)
    assert s.observe_validation(7.0) is True and s.lr_at(0) == pytest.approx(0.01)  # count 3: the second division
    # count 1, then a gain (12 > 10) resets it: the third division needs three misses after the gain
    assert [s.observe_validation(v) for v in (6.0, 12.0)] == [False, False] and s.plateau.bad_evals == 0
    assert [s.observe_validation(v) for v in (11.0, 10.0, 9.0)] == [False, False, True]
    assert s.plateau.reductions == 3 and s.lr_at(0) == pytest.approx(0.001)


def test_apply_sets_every_group():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.01)
    schedule(name="constant").apply(opt, 3)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 1.0]


def test_a_skipped_first_fp16_step_never_reaches_the_fused_optimizer():
    """A GradScaler's first steps often overflow. Handed a skipped step, PyTorch's fused SGD
    creates its momentum buffers uninitialized and leaves them so (NaN weights on an H100); the
    engine keeps skipped steps from it, so the first applied step is a fresh optimizer's."""
    from alexnet.engine import AmpPolicy, train_step
    from alexnet.layers import DropoutContext

    def run(poison_first: bool) -> tuple[PaperAlexNet, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = PaperAlexNet(10, input_size=67)
        opt = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.01)
        amp = AmpPolicy("cpu", None, torch.amp.GradScaler("cpu"))
        armed = [poison_first]

        def overflow(p: torch.Tensor) -> None:
            if armed[0]:
                p.grad.view(-1)[0] = float("inf")

        model.fc8[0].weight.register_post_accumulate_grad_hook(overflow)
        torch.manual_seed(1)
        x, y = torch.randn(4, 3, 67, 67), torch.randint(0, 10, (4,))
        ids = torch.arange(4)
        if poison_first:
            assert not train_step(model, x, y, opt, amp, DropoutContext(0, 1, ids)).applied
            assert opt.state == {} and amp.scaler.get_scale() == 32768.0
            armed[0] = False
        assert train_step(model, x, y, opt, amp, DropoutContext(0, 1, ids)).applied
        return model, opt

    skipped, skipped_opt = run(poison_first=True)
    fresh, fresh_opt = run(poison_first=False)
    for (name, a), b in zip(skipped.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(skipped_opt.state[a]["momentum_buffer"], fresh_opt.state[b]["momentum_buffer"]), name


def test_fp16_overflows_are_the_scalers_back_off_while_its_scale_is_above_one():
    """A step skipped for overflowed gradients under a loss scale above 1 is marked `overflow`
    (the trainer does not count it toward train.max_nonfinite); at a scale of 1 an overflow is
    the gradient's own, and a non-finite loss never is an overflow."""
    from alexnet.engine import AmpPolicy, train_step
    from alexnet.layers import DropoutContext

    torch.manual_seed(0)
    model = PaperAlexNet(10, input_size=67)
    opt = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.01)
    amp = AmpPolicy("cpu", None, torch.amp.GradScaler("cpu", init_scale=4.0))

    def overflow(p: torch.Tensor) -> None:
        p.grad.view(-1)[0] = float("inf")

    model.fc8[0].weight.register_post_accumulate_grad_hook(overflow)
    x, y = torch.randn(2, 3, 67, 67), torch.randint(0, 10, (2,))
    seen = []
    for step in range(3):
        result = train_step(model, x, y, opt, amp, DropoutContext(0, step, torch.arange(2)))
        seen.append((result.applied, result.overflow, amp.scaler.get_scale()))
    assert seen == [(False, True, 2.0), (False, True, 1.0), (False, False, 0.5)]
    nan_loss = train_step(model, x.fill_(float("nan")), y, opt, amp, DropoutContext(0, 3, torch.arange(2)))
    assert not nan_loss.applied and not nan_loss.overflow


@pytest.mark.filterwarnings("ignore:.*CUDA is not available")  # the fp16 policy's GradScaler, built here without a GPU
def test_amp_auto_picks_bf16_only_where_the_gpu_runs_it_natively(monkeypatch):
    """torch reports bf16 as supported on pre-Ampere GPUs (V100, T4) through emulation, slower
    than their fp16 tensor cores: auto chose it there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert build_amp("auto", torch.device("cuda")).name == "fp16"  # a V100
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert build_amp("auto", torch.device("cuda")).name == "bf16"  # an A100 or later
    assert build_amp("auto", torch.device("cpu")).name == "off"


def test_a_warmup_as_long_as_the_run_is_named_and_a_negative_min_delta_refused():
    assert warmup_problem(ScheduleConfig(name="cosine", warmup_epochs=2), 3, 0.08) == ""  # the 8-GPU recipes'
    assert warmup_problem(ScheduleConfig(name="cosine", warmup_epochs=2), 2, 0.08) == (  # a 2-epoch trial of one
        "schedule.warmup_epochs (2) is not below train.epochs (2): the learning rate never reaches its peak of 0.08"
    )
    schedule = LrSchedule(ScheduleConfig(name="cosine", warmup_epochs=2), 0.08, 10, 2)
    assert max(schedule.lr_at(step) for step in range(20)) < 0.08  # what the warning is about
    with pytest.raises(ConfigError, match=r"'schedule.min_delta' must be >= 0; got -0.5"):
        load_config(None, ["schedule.min_delta=-0.5"])  # a fall in top-1 counted as an improvement


def test_a_factor_changed_on_resume_applies_to_the_reductions_still_to_come():
    """The rate was peak * factor**reductions with the current factor: a plateau run reduced once
    at 0.1 and resumed with 0.5 trained its next step at five times the rate of its last."""
    s = schedule(name="plateau", patience=1, factor=0.1)
    assert [s.observe_validation(v) for v in (10.0, 9.0)] == [False, True]
    resumed = schedule(name="plateau", patience=1, factor=0.5)
    resumed.load_state_dict(s.state_dict())
    assert resumed.lr_at(0) == pytest.approx(0.1)  # the rate reached stays
    assert resumed.observe_validation(8.0) is True and resumed.lr_at(0) == pytest.approx(0.05)  # 0.1 x 0.5
    older = {k: v for k, v in s.state_dict().items() if k != "multiplier"}  # a checkpoint from before it was kept
    restored = schedule(name="plateau", factor=0.1)
    restored.load_state_dict(older)
    assert restored.lr_at(0) == pytest.approx(0.1)


@pytest.mark.parametrize("min_delta, reached", [(1.0, True), (1.5, False), (0.0, True)])
def test_a_gain_of_exactly_min_delta_counts_as_an_improvement(min_delta, reached):
    """12.3% -> 13.3% is one point (ten images of 1000); 12.3 + 1.0 > 13.3 in floats called it none."""
    s = schedule(name="plateau", patience=1, min_delta=min_delta)
    assert s.observe_validation(12.3) is False
    assert s.observe_validation(13.3) is (not reached)
    assert s.plateau.best_top1 == (13.3 if reached else 12.3)
    assert s.observe_validation(13.3 if reached else 12.3) is True  # an equal top-1 is no gain, also with 0


def test_settings_the_schedule_does_not_read_are_named():
    assert schedule_problems(ScheduleConfig(name="plateau"), 90, 0.01) == []  # imagenet.yaml's
    assert schedule_problems(ScheduleConfig(name="cosine", warmup_epochs=2), 8, 0.01) == []
    assert schedule_problems(ScheduleConfig(name="plateau", min_lr_factor=0.1, step_epochs=5), 90, 0.01) == [
        "schedule.min_lr_factor, schedule.step_epochs are not read by schedule.name=plateau: they have no effect"
    ]
    assert schedule_problems(ScheduleConfig(name="cosine", factor=0.5, patience=3), 90, 0.01) == [
        "schedule.factor, schedule.patience are not read by schedule.name=cosine: they have no effect"
    ]
    assert schedule_problems(ScheduleConfig(name="step", step_epochs=30), 30, 0.01) == [
        "schedule.step_epochs (30) is not below train.epochs (30): the step schedule never divides the rate"
    ]
    # The plateau's first division follows the validation of epoch eval_every x (patience + 1).
    assert schedule_problems(ScheduleConfig(name="plateau", patience=1), 5, 0.01, eval_every=2) == []  # epoch 4
    assert schedule_problems(ScheduleConfig(name="plateau", patience=1), 4, 0.01, eval_every=2) == [
        "the plateau schedule can first divide the rate after the validation of epoch 4 (train.eval_every 2 x "
        "(schedule.patience 1 + 1)), not before train.epochs (4): the rate never changes in this run"
    ]
    assert schedule_problems(ScheduleConfig(name="plateau", max_reductions=0), 90, 0.01) == [
        "schedule.max_reductions is 0: the plateau schedule never divides the rate"
    ]
    assert schedule_problems(ScheduleConfig(name="cosine", warmup_start_factor=0.5), 90, 0.01) == [
        "schedule.warmup_start_factor is set, but schedule.warmup_epochs is 0: there is no warm-up for it to start"
    ]


def test_a_resume_says_where_changed_settings_move_the_rate():
    """A finished 8-epoch cosine run extended to 16: its step 33 trained at half the peak, 200
    times the rate of step 32, and only 'train.epochs: 8 -> 16' was said."""
    cosine = ScheduleConfig(name="cosine")
    extended = LrSchedule(cosine, 1.0, 4, 16)
    moved = rate_change(cosine, 8, extended, 32)
    assert moved == (0.0, pytest.approx(0.5))  # 8 epochs: past the end (the floor, 0); 16: the middle
    assert rate_change(cosine, 16, extended, 32) is None  # nothing that moves it
    plateau = LrSchedule(ScheduleConfig(name="plateau", factor=0.5), 1.0, 4, 16)
    plateau.observe_validation(10.0)
    plateau.observe_validation(9.0)  # one reduction at 0.5
    assert rate_change(ScheduleConfig(name="plateau", factor=0.1), 16, plateau, 40) is None  # factor: later ones
    warm = LrSchedule(ScheduleConfig(name="constant", warmup_epochs=4), 1.0, 4, 16)
    assert rate_change(ScheduleConfig(name="constant"), 16, warm, 8) == (pytest.approx(1.0), pytest.approx(0.55))


def test_build_optimizer_takes_named_parameters_as_a_generator():
    """named_params was read twice: given model.named_parameters() itself, the biases' group was
    empty and every bias stayed at its initial value."""
    model = PaperAlexNet(10, input_size=67, fc_width=16)
    opt = build_optimizer(model.named_parameters(), OptimConfig(), lr=0.01)
    sizes = {g["name"]: len(g["params"]) for g in opt.param_groups}
    assert sizes == {"weights": 16, "biases": 16}


@pytest.mark.parametrize("mode", ["BF16", "bf-16", "fp32"])
def test_build_amp_refuses_an_unknown_mode(mode):
    """Anything not auto, bf16 or off took the fp16 branch: fp16 with a loss scaler on a GPU."""
    with pytest.raises(ConfigError, match=f"'train.amp' must be auto, bf16, fp16 or off; got '{mode}'"):
        build_amp(mode, torch.device("cpu"))
