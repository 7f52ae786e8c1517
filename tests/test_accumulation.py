"""Gradient accumulation (train.accum_steps): an optimizer step over several batches is the step
of their concatenation, in the engine, the loader, the config, resumes and launch/train.py. The
layouts' accumulated steps (DDP's no_sync, the hybrid's FC slices, the towers) are checked
against the single-device model in test_layouts.py."""

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _helpers import REPO, check
from _helpers import train_tiny as train

from alexnet.config import Config, ConfigError, DataConfig, OptimConfig, ParallelConfig, TrainConfig, load_config
from alexnet.data import step_prefetch
from alexnet.engine import AmpPolicy, MicroBatch, accumulated_step, train_step
from alexnet.layers import DropoutContext, apply_dropout_context
from alexnet.metrics import read_metrics
from alexnet.model import build_model
from alexnet.optim import build_optimizer
from alexnet.parallel.apply import ddp_settings
from alexnet.resume import batch_change, restore_loader
from alexnet.trainer import comm_setup
from pipelines.base import ShardSpec, check_trainable, train_steps
from pipelines.index import DataError
from pipelines.steps import StepLoader, describe_step_batch
from pipelines.synthetic import SyntheticLoader

CPU = torch.device("cpu")
AMP_OFF = AmpPolicy("cpu", None, None)
SEED = 3


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return build_model("paper", 7, dropout=0.5, input_size=67, init="kaiming", fc_width=64)


def step_batch(step: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(rows, 3, 67, 67, generator=g), torch.randint(0, 7, (rows,), generator=g)


def micro_batches(images, labels, step: int, sizes: list[int]) -> list[MicroBatch]:
    """The batch cut into batches of `sizes` rows, each dropped at its rows' places in it."""
    out, first = [], 0
    for n in sizes:
        rows = torch.arange(first, first + n)
        out.append(MicroBatch(images[rows], labels[rows], DropoutContext(SEED, step, rows)))
        first += n
    return out


# The gradient norms of the three steps are about 72, 147 and 212: a clip of 100 binds at the
# last two, and the first would bind only on gradients summed wrongly (4 batches: 4 x 72).
@pytest.mark.parametrize(("sizes", "clip"), [([4, 4], 0.0), ([3, 5], 0.0), ([2, 2, 2, 2], 100.0)])
def test_an_accumulated_step_is_the_step_of_the_whole_batch(sizes, clip):
    """Three steps of SGD with momentum and dropout, in float64: the batches' summed gradients
    (each batch's mean loss weighted by its share of rows, also for batches of unequal size)
    are the whole batch's, and so are the weights, the loss, the hits and the clipping. The loss
    is float32 in both (the engine's cross-entropy of float logits), and so is its gradient up to
    the logits: the weights agree to float32's rounding of it."""
    torch.set_default_dtype(torch.float64)
    try:
        whole, parts = fresh_model(), fresh_model()
        opts = [build_optimizer(list(m.named_parameters()), OptimConfig(), lr=0.05) for m in (whole, parts)]
        for step in range(3):
            images, labels = step_batch(step)
            ids = torch.arange(8)
            a = train_step(whole, images, labels, opts[0], AMP_OFF, DropoutContext(SEED, step, ids), clip)
            b = accumulated_step(parts, micro_batches(images, labels, step, sizes), opts[1], AMP_OFF, clip)
            assert a.applied and b.applied and a.count == b.count == 8
            assert torch.allclose(a.loss_sum, b.loss_sum, rtol=1e-6) and torch.equal(a.correct, b.correct)
        initial = fresh_model().state_dict()
        for (name, w), v in zip(whole.state_dict().items(), parts.state_dict().values()):
            assert (w - v).abs().max() <= 1e-7, name
        assert max((w - initial[n]).abs().max() for n, w in whole.state_dict().items()) > 1e-3  # it did train
    finally:
        torch.set_default_dtype(torch.float32)


def test_a_training_step_minimises_the_plain_cross_entropy_of_its_batch():
    """The step's loss and gradients against the softmax cross-entropy written out, mean over
    the batch of logsumexp(logits) - logits[label] (section 4's objective: the log-probability of
    the correct label, no label smoothing), differentiated by autograd on a twin of the model
    dropped with the same context. Every other engine test compared two paths of the engine
    itself, so a changed loss (label smoothing, a sum instead of a mean) passed all of them."""
    model, twin = fresh_model(), fresh_model()
    images, labels = step_batch(0)
    dropout = DropoutContext(SEED, 0, torch.arange(8))
    apply_dropout_context(twin, dropout)
    logits = twin(images)
    picked = logits.gather(1, labels[:, None]).squeeze(1)
    loss = (torch.logsumexp(logits, 1) - picked).mean()
    grads = dict(zip([n for n, _ in twin.named_parameters()], torch.autograd.grad(loss, list(twin.parameters()))))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # plain SGD: the step leaves .grad as it was
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_step(model, images, labels, opt, AMP_OFF, dropout)
    assert result.applied and result.count == 8
    torch.testing.assert_close(result.loss_sum, loss.detach() * 8, rtol=1e-5, atol=1e-5)  # summed over rows
    assert result.correct[0].item() == (logits.argmax(1) == labels).sum().item()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(p.detach(), before[name] - 0.1 * grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert max(g.abs().max().item() for g in grads.values()) > 1e-3  # gradients the comparison can see


def test_a_step_s_batches_are_decoded_ahead_while_the_step_before_computes():
    """The trainer takes a step's batches together: the loaders' queues hold at least a step."""
    dali, tv = DataConfig(prefetch=2), DataConfig(pipeline="torchvision", prefetch=2, num_threads=3)
    assert [step_prefetch(dali, a) for a in (1, 2, 5)] == [2, 2, 5]
    assert [step_prefetch(tv, a) for a in (1, 6, 7)] == [2, 2, 3]  # per worker: 3 workers x 3 >= 7


def test_a_non_finite_batch_skips_the_whole_step():
    model = fresh_model()
    opt = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.05)
    before = {n: w.clone() for n, w in model.state_dict().items()}
    images, labels = step_batch(0)
    images[6] = float("nan")  # a row of the second batch
    result = accumulated_step(model, micro_batches(images, labels, 0, [4, 4]), opt, AMP_OFF)
    assert not result.applied and opt.state == {}
    assert all(torch.equal(w, before[n]) for n, w in model.state_dict().items())


class ListLoader:
    """A loader of numbered batches in the protocol's shape (its position counts batches)."""

    split = "train"
    num_samples = 40
    keeps_epoch_order = True

    def __init__(self, batches: int) -> None:
        self.batches, self.epoch, self.pos, self.closed = batches, 0, 0, False

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        while self.pos < self.batches:
            self.pos += 1
            yield torch.tensor([self.pos - 1]), torch.tensor([self.epoch])
        self.pos, self.epoch = 0, self.epoch + 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "steps": self.batches, "batch_size": 4, "files": "f"}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]

    def close(self) -> None:
        self.closed = True


def test_the_step_loader_yields_a_step_s_batches_together_and_counts_in_steps():
    batches = ListLoader(6)
    loader = StepLoader(batches, 3)
    assert len(loader) == 2 and loader.num_samples == 40
    steps = list(loader)
    assert [[int(images) for images, _ in step] for step in steps] == [[0, 1, 2], [3, 4, 5]]
    it = iter(loader)
    next(it)  # one step into epoch 1: three batches
    state = loader.state_dict()
    assert state == {"epoch": 1, "pos": 1, "steps": 2, "batch_size": 12, "files": "f", "accum_steps": 3}
    again = StepLoader(ListLoader(6), 3)
    again.load_state_dict(state)
    assert (again.batch_loader.epoch, again.batch_loader.pos) == (1, 3)  # back in batches
    assert [int(images) for images, _ in next(iter(again))] == [3, 4, 5]
    loader.close()
    assert batches.closed
    with pytest.raises(ValueError, match="7 batches per epoch are not whole steps of 3 batches"):
        StepLoader(ListLoader(7), 3)


def test_an_epoch_holds_whole_steps_and_too_few_images_for_one_name_both_keys():
    assert train_steps(100, 2, 8) == 6 and train_steps(100, 2, 8, 4) == 4 and train_steps(100, 2, 8, 7) == 0
    check_trainable(100, 2, 8, "x", 6)
    with pytest.raises(DataError, match=r"leave 50 per shard, fewer than 7 batches \(train.accum_steps\) of "
                                         r"data.batch_size=8"):  # fmt: skip
        check_trainable(100, 2, 8, "x", 7)
    with pytest.raises(DataError, match="fewer than one batch of data.batch_size=64"):
        check_trainable(100, 2, 64, "x")


@pytest.mark.parametrize("value", ["0", "-1", "1025"])
def test_accum_steps_outside_1_to_1024_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=rf"'train.accum_steps' must be in \[1, 1024\]; got {value}"):
        load_config(None, [f"train.accum_steps={value}"])


def test_accumulation_builds_ddp_without_its_static_graph_and_says_so(caplog):
    """DDP's static graph fails under no_sync() (an INTERNAL ASSERT at the first backward, torch
    2.14.1): accumulation leaves it out, once with a warning."""
    static = ParallelConfig(static_graph=True)
    assert ddp_settings(static, 1, True) is static
    assert ddp_settings(ParallelConfig(), 4, True) == ParallelConfig()
    with caplog.at_level(logging.WARNING, logger="alexnet"):
        assert ddp_settings(static, 2, True) == ParallelConfig(static_graph=False)
        assert ddp_settings(static, 2, False) == ParallelConfig(static_graph=False)
    assert caplog.text.count("parallel.static_graph=true is not applied with train.accum_steps=2") == 1


def test_a_resume_that_changes_the_accumulation_names_it_as_the_global_batch_s_cause():
    cfg = Config(train=TrainConfig(accum_steps=4))
    cfg.data.batch_size = 8
    before = {"global_batch": 16, "batch_size": 8, "accum_steps": 1}
    saved = {"optim": {"lr": 0.01, "lr_reference_batch": 128}}
    assert batch_change(before, saved, cfg, 2 * 8 * 4)[0].startswith(
        "global batch: 16 -> 64 (train.accum_steps 1 -> 4), its peak learning rate"
    )
    # 2 replicas of 8 x 1 -> 4 replicas of 4 x 2
    cfg = Config(train=TrainConfig(accum_steps=2))
    cfg.data.batch_size = 4
    line = batch_change(before, saved, cfg, 4 * 4 * 2)[0]
    assert "(2 -> 4 data-parallel replicas, data.batch_size 8 -> 4, train.accum_steps 1 -> 2)" in line
    # A setup recorded before accumulation existed had none, whatever a later config says.
    later = {**saved, "train": {"accum_steps": 4}}
    line = batch_change({"global_batch": 16, "batch_size": 8}, later, cfg, 4 * 4 * 2)[0]
    assert "(2 -> 4 data-parallel replicas, data.batch_size 8 -> 4, train.accum_steps 1 -> 2)" in line
    assert describe_step_batch(16, 1) == "16" and describe_step_batch(8, 2) == "16 (2 accumulated batches of 8)"


def test_a_synthetic_run_resumed_under_another_accumulation_goes_on_by_images(caplog):
    """The synthetic loader says what its position counts in, as the file loaders do: two steps
    of 2 x 8 images (32) are one step of 4 x 8 in the resumed run."""

    def synthetic(accum: int) -> StepLoader:
        shard = ShardSpec(0, 1, 8, 0, accum)
        return StepLoader(SyntheticLoader("train", 8, 3, shard, 4 * accum, CPU), accum)

    old = synthetic(2)
    steps = iter(old)
    next(steps), next(steps)
    new = synthetic(4)
    with caplog.at_level(logging.INFO, logger="alexnet"):
        pos = restore_loader(new, {"0": old.state_dict()}, SimpleNamespace(data_rank=0, data_size=1), Path("c.pt"), 8)
    assert pos == 1 and new.batch_loader.state_dict()["pos"] == 4
    assert ("written with 1 data shard of batch 16 (2 accumulated batches of 8) (4 steps per epoch), this run has "
            "1 of batch 32 (4 accumulated batches of 8) (4 steps): the interrupted epoch goes on after its step 1 "
            "of 4 (2 of 4 before; the run's step count goes on), in the epoch's order, no image trained twice"
            in caplog.text)  # fmt: skip
    assert [r.levelname for r in caplog.records] == ["INFO"]  # it goes on exactly: no warning


def test_summary_comm_totals_restart_when_a_step_s_images_change():
    """Under towers and hybrid a step's exchanges grow with its images: the totals summary.json
    carries over from earlier sessions restart when train.accum_steps changes."""
    env, cfg = SimpleNamespace(world_size=4), Config()
    mesh = SimpleNamespace(mode="hybrid", data_size=4, shape=SimpleNamespace(model_size=4))
    one = comm_setup(cfg, env, mesh, "off")
    assert " batch 128 crop " in one  # as before accumulation existed
    cfg.train.accum_steps = 2
    assert " batch 128x2 crop " in comm_setup(cfg, env, mesh, "off")


def test_summary_comm_totals_restart_when_the_fc_groups_or_the_precision_in_use_change():
    """parallel.fc_group=0 (a node's ranks) and train.amp=auto name other settings on other
    machines: a hybrid run of 4 ranks on one node, resumed on two nodes of 2, averaged the
    bytes per step of FC groups of 4 and of 2."""
    env, cfg = SimpleNamespace(world_size=4), Config()
    # The hybrid's convolutions are data-parallel over the whole world: 4 data shards either way.
    one_node = SimpleNamespace(mode="hybrid", data_size=4, shape=SimpleNamespace(model_size=4))
    two_nodes = SimpleNamespace(mode="hybrid", data_size=4, shape=SimpleNamespace(model_size=2))
    assert cfg.parallel.fc_group == 0 and cfg.train.amp == "auto"
    assert comm_setup(cfg, env, one_node, "off") != comm_setup(cfg, env, two_nodes, "off")
    assert comm_setup(cfg, env, one_node, "off") != comm_setup(cfg, env, one_node, "bf16")


def test_the_benchmarks_refuse_accumulation_they_would_not_time(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "launch"))
    from benchmark import main

    assert main(["step", "--out", str(tmp_path / "out"), "train.accum_steps=2"]) == 2
    assert "config key 'train.accum_steps' is 2: the benchmarks time steps of one batch" in capsys.readouterr().err


def weights(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def resume_from_step_4(run) -> str:
    """checkpoint.resume= run's checkpoint of step 4: with checkpoint.every_steps=4 it is written
    mid-epoch 2, and the epoch-end checkpoint of step 6 rotates it into previous.pt."""
    return f"checkpoint.resume={run / 'checkpoints' / 'previous.pt'}"


@pytest.mark.dali
@pytest.mark.slow
def test_accumulated_runs_train_as_the_whole_batch_and_resume_exactly(tiny_data, tmp_path):
    """2 ranks of 60 tiny images, 2 epochs of 3 steps of 32 images:
    - batch 8 x 2 accumulated (torchvision: each image's augmentation is its own, whatever the
      batch) trains as one process at batch 32 does, dropout included (the ranks' shards read
      every other image of the epoch's order before, so one image was at another row of the
      global batch and other units were dropped), also resumed from its step-4 checkpoint (mid
      epoch 2) as batch 16 (the position converted from the step's batches);
    - DALI, batch 8 x 2, resumed from its step-4 checkpoint: bitwise the uninterrupted run.
    An uninterrupted run's step-4 checkpoint is the resumed run's start (checkpoint.resume=): a
    launch less than a run stopped at step 4."""
    common = ("train.epochs=2", "schedule.name=cosine", "checkpoint.every_steps=4")
    tv = ("data.pipeline=torchvision", *common)
    accumulated = check(train(tiny_data, tmp_path, "accumulated", *tv, "data.batch_size=8", "train.accum_steps=2"))
    said = accumulated.stderr + accumulated.stdout
    assert "batch 16 (2 accumulated batches of 8) per replica (global 32), 3 steps per epoch" in said
    mixed = check(train(tiny_data, tmp_path, "mixed", *tv, "data.batch_size=16",
                        resume_from_step_4(tmp_path / "accumulated")))  # fmt: skip
    said = mixed.stderr + mixed.stdout
    assert "data.batch_size: 8 -> 16;" in said and "train.accum_steps: 2 -> 1" in said and "global batch:" not in said
    assert "of batch 16 (2 accumulated batches of 8) (3 steps per epoch), this run has 2 of batch 16 (3 steps)" in said
    assert "batch 16 per replica (global 32)" in said
    check(train(tiny_data, tmp_path, "one", *tv, "data.batch_size=32", nproc=1))
    reference = weights(tmp_path / "one")
    for run in ("accumulated", "mixed"):
        for name, w in weights(tmp_path / run).items():
            assert (w - reference[name]).abs().max() <= 1e-5 * max(reference[name].abs().max(), 1.0), (run, name)
    # The resumed run's own records (its folder holds none of the first run's): steps 5-6 alone.
    for run, steps in (("accumulated", 6), ("mixed", 2)):
        train_records = [r for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["split"] == "train"]
        assert sum(r["count"] for r in train_records) == steps * 32 and train_records[-1]["step"] == 6

    dali = (*common, "data.batch_size=8", "train.accum_steps=2")
    check(train(tiny_data, tmp_path, "straight", *dali))
    half = torch.load(tmp_path / "straight" / "checkpoints" / "previous.pt", weights_only=True)
    assert half["progress"]["step"] == 4
    assert half["loaders"]["train"]["0"]["pos"] == 1 and half["loaders"]["train"]["0"]["accum_steps"] == 2
    check(train(tiny_data, tmp_path, "resumed", *dali, resume_from_step_4(tmp_path / "straight")))
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(w, resumed[name]) for name, w in straight.items())
    assert not torch.equal(straight["fc8.0.weight"], half["model"]["fc8.0.weight"])


@pytest.mark.usefixtures("gloo_world_of_one")
def test_the_first_step_s_batches_accumulate_in_ddp_s_buckets():
    """The settling pass left every gradient None, and the first step's batches under no_sync()
    summed into fresh tensors beside the buckets (a second copy of the gradients, 244 MB for the
    paper model under dp) until its all-reduce: every session's first step, where the peak is set.
    DDP's buckets and no_sync() are the same for any number of ranks: checked here in a gloo group
    of this one process, with no launch of its own."""
    sys.path.insert(0, str(REPO / "tests" / "dist"))
    from accum_grads import same_storage_per_step

    result = {"bucket_view": same_storage_per_step(True), "own_grads": same_storage_per_step(False)}
    assert result["bucket_view"] == [True, True, True], result
    assert result["own_grads"] == [True, True, True], result  # zeroed in place from the second step: kept


def test_a_step_leaves_the_model_s_dropout_plain():
    """The step's dropout context stayed on the model: a later forward in train mode outside a step
    (a user's own loop) drew the same mask every call, and another batch size failed."""
    torch.manual_seed(0)
    model = build_model("paper", 10, input_size=67, fc_width=16)
    opt = build_optimizer(list(model.named_parameters()), OptimConfig(), 0.01)
    images, labels = torch.randn(8, 3, 67, 67), torch.randint(0, 10, (8,))
    accumulated_step(model, micro_batches(images, labels, 0, [4, 4]), opt, AMP_OFF)
    x = torch.randn(3, 3, 67, 67)
    assert not torch.equal(model(x), model(x))  # fresh masks, at a batch size the step did not use
