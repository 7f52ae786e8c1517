"""Resuming under another number of data shards: the interrupted epoch's position is converted,
every later epoch reads each sample exactly once, and the learning rate goes on where it was."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _helpers import TINY_TRAIN, TRAIN, check, launch
from test_sharding import build, epoch_labels, numbered

from alexnet.config import ScheduleConfig
from alexnet.metrics import read_metrics
from alexnet.optim import LrSchedule
from alexnet.resume import restore_loader
from pipelines.base import EpochLayout, convert_position
from pipelines.index import FileIndex, build_file_index

# 48 files in batches of 4: whole batches for 1, 2 and 3 shards (12, 6 and 4 steps), so that an
# epoch under any of them covers every file.
N, BATCH = 48, 4


@pytest.mark.parametrize(
    ("pos", "old", "new", "expected"),
    [
        (3, EpochLayout(2, 4, 5), EpochLayout(1, 4, 10), 6),  # the same samples, in batches of half the size
        (5, EpochLayout(2, 4, 5), EpochLayout(1, 4, 10), 10),  # a finished epoch stays finished...
        (3, EpochLayout(3, 4, 3), EpochLayout(1, 4, 11), 11),  # ...without the other layout's dropped tails
        (2, EpochLayout(3, 4, 3), EpochLayout(1, 4, 11), 6),  # 24 samples: not 7 of 11 by the step fraction
        (5, EpochLayout(1, 4, 12), EpochLayout(2, 4, 6), 2),  # 20 samples: rounded down, never skipped
        (0, EpochLayout(2, 4, 6), EpochLayout(1, 4, 12), 0),
        (3, EpochLayout(2, 8, 6), EpochLayout(1, 4, 12), 12),  # a larger batch, clamped to the epoch
        (4, EpochLayout(1, 8, 6), EpochLayout(2, 4, 6), 4),
    ],
)
def test_convert_position_by_samples_consumed(pos, old, new, expected):
    assert convert_position(pos, old, new) == expected


def run_old_ranks(kind: str, index, shards: int, pos: int) -> dict[str, dict]:
    """Every rank of an `shards`-rank run stopped after `pos` batches of its first epoch, as
    gather_loader_states saves them; also the samples they consumed."""
    states, consumed = {}, []
    for rank in range(shards):
        loader = build(kind, index, "train", rank, shards, BATCH)
        batches = iter(loader)
        consumed += [int(v) for _ in range(pos) for v in next(batches)[1]]
        states[str(rank)] = loader.state_dict()
    return {"states": states, "consumed": consumed}


def restored_ranks(kind: str, index, states: dict, shards: int) -> list:
    loaders = [build(kind, index, "train", rank, shards, BATCH) for rank in range(shards)]
    for rank, loader in enumerate(loaders):
        mesh = SimpleNamespace(data_rank=rank, data_size=shards)
        restore_loader(loader, states, mesh, Path("last.pt"))
    return loaders


RESHARDS = [(2, 3, 1), (1, 5, 2), (3, 2, 2), (2, 6, 1)]  # (old shards, batches done, new shards)


@pytest.mark.parametrize("kind", [pytest.param("dali", marks=pytest.mark.dali), "torchvision"])
@pytest.mark.parametrize(("old_shards", "pos", "new_shards"), RESHARDS)
def test_interrupted_epoch_goes_on_for_the_converted_number_of_steps(tiny_data, kind, old_shards, pos, new_shards):
    index = numbered(tiny_data, N)
    old = run_old_ranks(kind, index, old_shards, pos)
    new = restored_ranks(kind, index, old["states"], new_shards)
    steps = N // new_shards // BATCH
    left = steps - min(pos * old_shards // new_shards, steps)  # the samples consumed, in new batches
    interrupted = [epoch_labels(loader) for loader in new]
    assert [count for _, count in interrupted] == [left] * new_shards
    resumed = sum((labels for labels, _ in interrupted), [])
    assert len(set(resumed)) == len(resumed) == left * new_shards * BATCH


@pytest.mark.parametrize("kind", [pytest.param("dali", marks=pytest.mark.dali), "torchvision"])
@pytest.mark.parametrize(("old_shards", "pos", "new_shards"), RESHARDS)
def test_epochs_after_the_interrupted_one_read_each_file_once(tiny_data, kind, old_shards, pos, new_shards):
    index = numbered(tiny_data, N)
    new = restored_ranks(kind, index, run_old_ranks(kind, index, old_shards, pos)["states"], new_shards)
    for loader in new:
        list(loader)  # the rest of the interrupted epoch
    for epoch in (1, 2):
        labels = sum((epoch_labels(loader)[0] for loader in new), [])
        repeated = sorted(k for k, c in Counter(labels).items() if c > 1)
        missed = sorted(set(range(N)) - set(labels))
        assert not repeated and not missed, f"epoch {epoch}: files read twice {repeated}, missed {missed}"
        assert len(labels) == N


@pytest.mark.parametrize(("old_shards", "pos", "new_shards"), [(2, 3, 1), (1, 5, 2), (3, 2, 2)])
def test_torchvision_interrupted_epoch_skips_no_sample(tiny_data, old_shards, pos, new_shards):
    """One permutation per epoch for every shard count: what the old ranks consumed is a prefix of
    it, and the converted position starts the new ranks at or before its end."""
    index = numbered(tiny_data, N)
    old = run_old_ranks("torchvision", index, old_shards, pos)
    new = restored_ranks("torchvision", index, old["states"], new_shards)
    resumed = sum((epoch_labels(loader)[0] for loader in new), [])
    assert sorted(set(old["consumed"]) | set(resumed)) == list(range(N)), "a sample of the epoch was skipped"
    assert len(set(old["consumed"]) & set(resumed)) < new_shards * BATCH  # under one global batch again


@pytest.mark.parametrize("kind", [pytest.param("dali", marks=pytest.mark.dali), "torchvision"])
def test_a_converted_state_saved_again_before_any_batch_still_resumes_whole_epochs(tiny_data, kind):
    """A converted state carries no DALI checkpoint; saved again before the loader ran (a
    checkpoint right at the resume) and restored under the same sharding, the fresh reader is
    still caught up to the position, so later epochs stay whole."""
    index = numbered(tiny_data, N)
    states = run_old_ranks(kind, index, 2, 3)["states"]
    saved_again = restored_ranks(kind, index, states, 1)[0].state_dict()
    loader = build(kind, index, "train", 0, 1, BATCH)
    mesh = SimpleNamespace(data_rank=0, data_size=1)
    assert restore_loader(loader, {"0": saved_again}, mesh, Path("last.pt")) is None  # an exact resume
    assert epoch_labels(loader)[1] == N // BATCH - 6
    for _ in range(2):
        assert sorted(epoch_labels(loader)[0]) == list(range(N))


@pytest.mark.parametrize("kind", [pytest.param("dali", marks=pytest.mark.dali), "torchvision"])
def test_a_checkpoint_over_another_file_list_is_converted_not_replayed(tiny_data, kind, caplog):
    """Bad files left out after a crash (data.train_files): the same shards and batch, but each
    epoch's order is a permutation of another list. The saved position (and DALI's reader
    checkpoint) is not replayed as if exact: the epoch goes on by samples consumed, with a
    warning, and the later epochs read each file of the new list once."""
    old = run_old_ranks(kind, numbered(tiny_data, N), 1, 3)["states"]
    assert old["0"]["num_samples"] == N
    smaller = numbered(tiny_data, N - BATCH)  # 11 batches
    loader = build(kind, smaller, "train", 0, 1, BATCH)
    mesh = SimpleNamespace(data_rank=0, data_size=1)
    assert restore_loader(loader, old, mesh, Path("last.pt")) == 3
    assert f"written with {N} training images, this run has {N - BATCH}" in caplog.text
    assert loader.state_dict()["pos"] == 3 and loader.state_dict().get("dali") is None
    assert epoch_labels(loader)[1] == (N - BATCH) // BATCH - 3
    for _ in range(2):
        assert sorted(epoch_labels(loader)[0]) == list(range(N - BATCH))


@pytest.mark.parametrize("kind", [pytest.param("dali", marks=pytest.mark.dali), "torchvision"])
def test_a_list_of_as_many_files_that_is_not_the_same_is_converted_not_replayed(tiny_data, tmp_path, kind, caplog):
    """A file renamed (or moved to another class) between sessions keeps the count: the resume was
    taken as exact, and the saved position then named other files (7 of the rest of an epoch
    already trained, in a tester's run). A dataset moved elsewhere is the same list."""
    index = numbered(tiny_data, N)
    old = run_old_ranks(kind, index, 1, 3)["states"]
    mesh = SimpleNamespace(data_rank=0, data_size=1)
    other = build_file_index(tiny_data / "train").files[N]  # a file the old list does not hold
    renamed = FileIndex([*index.files[:5], other, *index.files[6:]], index.labels, index.classes)
    loader = build(kind, renamed, "train", 0, 1, BATCH)
    with caplog.at_level("WARNING", logger="alexnet"):
        assert restore_loader(loader, old, mesh, Path("last.pt")) == 3
    assert f"written with another list of {N} training images (files renamed, moved or replaced)" in caplog.text
    assert loader.state_dict().get("dali") is None and loader.state_dict()["files"] != old["0"]["files"]
    shutil.copytree(tiny_data / "train", tmp_path / "moved" / "train")
    moved = FileIndex([str(tmp_path / "moved" / Path(f).relative_to(tiny_data)) for f in index.files],
                      index.labels, index.classes)  # fmt: skip
    exact = build(kind, moved, "train", 0, 1, BATCH)
    assert restore_loader(exact, old, mesh, Path("last.pt")) is None
    assert epoch_labels(exact)[1] == N // BATCH - 3 and sorted(epoch_labels(exact)[0]) == list(range(N))


@pytest.mark.parametrize("kind", [pytest.param("dali", marks=pytest.mark.dali), "torchvision"])
def test_a_checkpoint_at_an_epoch_s_end_resumes_under_another_layout_without_a_warning(tiny_data, kind, caplog):
    """No epoch was interrupted: the warning that its order is not replayed (printed by every
    rank, at every such resume, also with nothing left to train) said something false."""
    index = numbered(tiny_data, N)
    old = run_old_ranks(kind, index, 2, 0)["states"]
    loader = build(kind, index, "train", 0, 1, BATCH)
    mesh = SimpleNamespace(data_rank=0, data_size=1)
    with caplog.at_level("WARNING", logger="alexnet"):
        assert restore_loader(loader, old, mesh, Path("last.pt")) == 0
    assert caplog.text == ""
    assert sorted(epoch_labels(loader)[0]) == list(range(N))  # a whole epoch follows
    with caplog.at_level("INFO", logger="alexnet"):
        restore_loader(build(kind, index, "train", 0, 1, BATCH), run_old_ranks(kind, index, 2, 3)["states"], mesh,
                       Path("last.pt"))  # fmt: skip
    # Of the pipeline in use alone; the same images in the torchvision loader's order are no warning
    said = {
        "torchvision": ("INFO", "in the epoch's order, no image trained twice; later epochs are whole"),
        "dali": ("WARNING", "DALI's reader starts afresh, so some of its images are trained twice"),
    }[kind]
    assert [r.levelname for r in caplog.records] == [said[0]] and said[1] in caplog.text
    assert "the interrupted epoch goes on after its step 6 of " in caplog.text
    if kind == "torchvision":  # 6 batches' images over 4 shards: one step of 4 batches, the other 2 trained again
        caplog.clear()
        restore_loader(build(kind, index, "train", 0, 4, BATCH), run_old_ranks(kind, index, 2, 3)["states"],
                       SimpleNamespace(data_rank=0, data_size=4), Path("last.pt"))  # fmt: skip
        assert [r.levelname for r in caplog.records] == ["WARNING"], caplog.text
        assert f"after its step 1 of {N // 4 // BATCH} (3 of " in caplog.text
        assert f"in the epoch's order, {2 * BATCH} images trained twice; later" in caplog.text


def cosine(steps_per_epoch: int) -> LrSchedule:
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1.0)
    return LrSchedule(cfg, peak_lr=1.0, steps_per_epoch=steps_per_epoch, epochs=4)


def test_lr_follows_epoch_progress_across_a_change_of_epoch_length():
    """2 ranks to step 30 (epoch 1, 10 of 20 batches), resumed on 1 rank (40 steps per epoch):
    the rate goes on from 1.5 epochs, where the global step alone would put it at 0.75."""
    before = cosine(20)
    after = cosine(40)
    after.load_state_dict(before.state_dict())
    after.realign(30, 1 * 40 + 20)
    assert after.lr_at(30) == pytest.approx(before.lr_at(30), abs=1e-12)
    lrs = [after.lr_at(s) for s in range(30, 30 + 2 * 40 + 20 + 1)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:])), "the cosine went back up"
    assert lrs[-1] == pytest.approx(after.lr_at(10**6))  # and it ends where the run ends
    restored = cosine(40)
    restored.load_state_dict(after.state_dict())  # the offset is saved with the schedule
    assert restored.lr_at(55) == after.lr_at(55)


def test_lr_of_an_unchanged_layout_is_the_global_step_schedule():
    fresh, resumed = cosine(20), cosine(20)
    resumed.load_state_dict(fresh.state_dict())
    assert [resumed.lr_at(s) for s in range(90)] == [fresh.lr_at(s) for s in range(90)]


@pytest.mark.dali
@pytest.mark.slow
def test_torchrun_two_ranks_resumed_on_one_keeps_the_lr_and_the_epoch_length(tiny_data, tmp_path):
    """120 images of batch 8: 7 steps per epoch on 2 ranks, 15 on 1. Stopped at step 10 (epoch 2,
    3 of 7 done: 48 images), resumed on 1 rank: epoch 2 has 15 - 6 steps left, epoch 3 all 15,
    and the cosine rate (relative to each world's linearly scaled peak) keeps falling."""
    common = [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=reshard",
              "train.epochs=3", "train.log_every=1", "schedule.name=cosine", "optim.lr=0.01",
              "optim.lr_reference_batch=8"]  # fmt: skip
    check(launch([TRAIN, *common, "train.max_steps=10"], nproc=2))
    resumed = check(launch([TRAIN, *common, "checkpoint.resume=auto"], nproc=1))
    # no config key changes, but the batch and its rate do: named with the changed settings
    said = "global batch: 16 -> 8 (2 -> 1 data-parallel replicas), its peak learning rate 0.02 -> 0.01"
    assert said in resumed.stderr
    run = tmp_path / "reshard"
    records = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    # peak lr: 0.01 * global batch / 8, i.e. 0.02 on 2 ranks, 0.01 on 1
    relative = [(r["step"], r["lr"] / (0.02 if r["step"] <= 10 else 0.01)) for r in records]
    rates = [lr for _, lr in relative]
    assert all(b <= a + 1e-12 for a, b in zip(rates, rates[1:])), relative
    assert rates[9] - rates[10] <= rates[8] - rates[9] + 1e-9  # about one step's fall, not a jump
    steps = [s for s, _ in relative]
    assert steps == list(range(1, 35)), steps  # 10 + 9 + 15: no epoch stretched
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 34
    # bytes per step are the last layout's: one process sends nothing (not the 2 ranks' average)
    assert summary["world_size"] == 1 and summary["comm_sent_mb_per_step"] == {}


@pytest.mark.parametrize("kind", [pytest.param("dali", marks=pytest.mark.dali), "torchvision"])
def test_another_data_seed_mid_epoch_is_said_and_takes_its_augmentation_too(tiny_data, kind, caplog):
    """The position was restored as if the order were the same, without a word, and DALI's
    checkpoint brought back the old seed's random state: crops and mirrors went on drawing from
    it for the rest of the run. Now the new seed's order goes on from the step (said, as for
    another file list), read by a fresh reader that draws from the new seed."""
    index = numbered(tiny_data, N)
    old = build(kind, index, "train", 0, 1, BATCH, seed=0)
    batches = iter(old)
    next(batches), next(batches)
    resumed = build(kind, index, "train", 0, 1, BATCH, seed=5)
    with caplog.at_level("WARNING", logger="alexnet"):
        restore_loader(resumed, {"0": old.state_dict()}, SimpleNamespace(data_rank=0, data_size=1), Path("last.pt"))
    said = "written with data.seed 0, this run has 5: the interrupted epoch goes on after its step 2 of 12"
    assert said in caplog.text
    fresh = iter(build(kind, index, "train", 0, 1, BATCH, seed=5))
    next(fresh), next(fresh)
    for (images, labels), (fresh_images, fresh_labels) in zip(resumed, fresh):
        assert labels.tolist() == fresh_labels.tolist() and torch.equal(images, fresh_images)


def test_a_converted_position_at_the_end_of_the_shorter_epoch_trains_nothing_again(caplog):
    """Stopped after step 14 of 15 (1 shard, batch 8), resumed on 4 shards (3 steps of 32): the
    position is the epoch's end, so none of its images is trained again; "16 images trained
    twice" was said. Otherwise, those of the last partial step are."""
    from alexnet.resume import _log_converted_position
    from pipelines.base import EpochLayout, convert_position

    loader = SimpleNamespace(keeps_epoch_order=True)
    old, new = EpochLayout(1, 8, 15), EpochLayout(4, 8, 3)
    for saved, said in ((14, "no image trained twice"), (5, "8 images trained twice")):  # 40 = 32 + 8
        caplog.clear()
        with caplog.at_level("INFO", logger="alexnet"):
            _log_converted_position(Path("c.pt"), loader, old, new, (1, 1), saved, convert_position(saved, old, new))
        assert f"in the epoch's order, {said}; later" in caplog.text
