"""Shards follow the data-parallel rank: disjoint, covering, equal step counts on every rank."""

import pytest
import torch
from _helpers import dali_missing

from pipelines.base import PAD_LABEL, ImageSpec, ShardSpec, check_trainable, train_steps, val_steps
from pipelines.index import DataError, FileIndex, build_file_index
from pipelines.torchvision_loader import TorchvisionLoader, step_major_share

if not dali_missing():  # for the tests marked dali (skipped where DALI is not installed)
    from pipelines.dali import DaliLoader

CPU = torch.device("cpu")
IMAGE = ImageSpec(67, 76, "paper", (124.0, 116.0, 104.0), (58.0, 57.0, 57.0))


def numbered(tiny_data, n: int) -> FileIndex:
    """The first n training files, each labelled with its own position, so labels identify files."""
    files = build_file_index(tiny_data / "train").files[:n]
    return FileIndex(files, list(range(n)), [str(i) for i in range(n)])


def build(kind, index, split, shard, shards, batch, seed=3):
    shard_spec = ShardSpec(shard, shards, batch, seed=seed)
    if kind == "dali":
        return DaliLoader(index, split, IMAGE, shard_spec, CPU, 1, 2, "cpu")
    return TorchvisionLoader(index, split, IMAGE, shard_spec, CPU, 0, 2)


def epoch_labels(loader) -> tuple[list[int], int]:
    labels = [y for _, y in loader]
    return [int(v) for y in labels for v in y if v != PAD_LABEL], len(labels)


@pytest.mark.parametrize("kind", [pytest.param("dali", marks=pytest.mark.dali), "torchvision"])
def test_two_ranks_train_epochs_are_disjoint_and_cover(tiny_data, kind):
    n, batch = 64, 8  # 32 per rank: whole batches, nothing dropped
    index = numbered(tiny_data, n)
    ranks = [build(kind, index, "train", r, 2, batch) for r in range(2)]
    for epoch in range(2):
        (a, steps_a), (b, steps_b) = (epoch_labels(r) for r in ranks)
        assert steps_a == steps_b == 4
        assert not set(a) & set(b), f"epoch {epoch}: a sample is on both ranks"
        assert sorted(a + b) == list(range(n)), f"epoch {epoch}: the ranks do not cover the data"
    # the order changes between epochs (a fresh shuffle, not a fixed one)
    first = epoch_labels(build(kind, index, "train", 0, 2, batch))[0]
    second_loader = build(kind, index, "train", 0, 2, batch)
    list(second_loader)
    assert epoch_labels(second_loader)[0] != first


@pytest.mark.parametrize("kind", [pytest.param("dali", marks=pytest.mark.dali), "torchvision"])
def test_data_seed_sets_the_training_order(tiny_data, kind):
    """data.seed reaches the order of the batches (DALI's own shuffle ignores every seed); the same
    seed gives the same order, and each epoch still reads every file once."""
    index = numbered(tiny_data, 24)

    def two_epochs(seed):
        loader = build(kind, index, "train", 0, 1, 4, seed=seed)
        return [epoch_labels(loader)[0] for _ in range(2)]

    first, again, other = two_epochs(0), two_epochs(0), two_epochs(1)
    assert first == again and first[0] != other[0] and first[1] != other[1]
    assert all(sorted(epoch) == list(range(24)) for epoch in first + other)


@pytest.mark.parametrize("kind", [pytest.param("dali", marks=pytest.mark.dali), "torchvision"])
@pytest.mark.parametrize("n", [61, 63, 64, 71])
def test_unequal_shards_give_equal_step_counts(tiny_data, kind, n):
    """Whole batches of the smallest shard on every rank (n // 2 // 8: 30, 31, 32 and 35 per
    rank), every batch full and real, no sample twice in an epoch."""
    batch, shards = 8, 2
    expected = {61: 3, 63: 3, 64: 4, 71: 4}[n]
    assert train_steps(n, shards, batch) == expected
    index = numbered(tiny_data, n)
    loaders = [build(kind, index, "train", r, shards, batch) for r in range(shards)]
    for _ in range(2):  # the second epoch, too
        epochs = [[y.tolist() for _, y in ld] for ld in loaders]
        assert [len(e) for e in epochs] == [expected] * shards
        assert all(len(b) == batch and PAD_LABEL not in b for e in epochs for b in e)
        labels = [v for e in epochs for b in e for v in b]
        assert len(labels) == len(set(labels)) == expected * batch * shards  # none twice, across ranks


@pytest.mark.parametrize("kind", [pytest.param("dali", marks=pytest.mark.dali), "torchvision"])
@pytest.mark.parametrize("shards", [2, 3])
def test_validation_counts_every_image_exactly_once(tiny_data, kind, shards):
    n, batch = 50, 8  # 50 = 25+25 or 16+17+17: the last batch of each shard is padded
    index = numbered(tiny_data, n)
    all_labels, steps = [], []
    for r in range(shards):
        loader = build(kind, index, "val", r, shards, batch)
        for _ in range(2):  # and again next epoch
            labels, count = epoch_labels(loader)
            all_labels.append(labels)
            steps.append(count)
    assert steps == [val_steps(n, shards, batch)] * (2 * shards)
    first_epoch = [lab for i, lab in enumerate(all_labels) if i % 2 == 0]
    assert sorted(sum(first_epoch, [])) == list(range(n))
    assert all_labels[0] == all_labels[1]  # validation is the same every epoch


def test_data_rank_comes_from_the_global_rank_not_local_rank():
    """Two nodes x one process each: LOCAL_RANK is 0 on both, the data ranks must differ."""
    from alexnet.parallel.env import DistEnv
    from alexnet.parallel.mesh import build_mesh

    nodes = [
        DistEnv(rank=r, local_rank=0, world_size=2, local_world_size=1, device=CPU, backend="gloo") for r in range(2)
    ]
    meshes = [build_mesh(env, "dp") for env in nodes]
    assert [m.data_rank for m in meshes] == [0, 1]
    assert all(m.data_size == 2 for m in meshes)


def test_too_few_images_for_one_batch_per_shard_is_a_data_error():
    """A DataError is what launch/train.py reports in one line (it was a ValueError: a traceback)."""
    with pytest.raises(DataError, match=r"data\.batch_size'?: 30 training images over 4 .* 7 per shard, fewer"):
        check_trainable(30, 4, 8, "config key 'data.batch_size'")
    check_trainable(32, 4, 8, "config key 'data.batch_size'")  # one whole batch each: fine


@pytest.mark.dali
@pytest.mark.parametrize(("n", "shards"), [(3, 4), (2, 3)])
def test_fewer_validation_images_than_dali_shards_is_a_data_error_before_training(tiny_data, n, shards):
    """DALI's reader asserts when it has fewer samples than shards, and the validation pipeline is
    first built after a whole training epoch. build_loader refuses such a split at once (the
    torchvision loader, which pads empty shards, takes it); the torchvision loader counts each
    image once."""
    from types import SimpleNamespace

    from alexnet.config import DataConfig
    from alexnet.data import DataSplits, build_loader

    val = numbered(tiny_data, n)
    splits = DataSplits(train=None, val=val, classes=val.classes)
    mesh = SimpleNamespace(data_rank=0, data_size=shards)
    with pytest.raises(DataError, match=rf"validation split: {n} image\(s\) for {shards} data-parallel shards"):
        build_loader(DataConfig(batch_size=2), "val", splits, mesh, CPU, "cpu", False)
    with pytest.raises(RuntimeError, match="num_shards"):  # what DALI itself says
        list(build("dali", val, "val", 0, shards, 2))
    in_process = DataConfig(batch_size=2, pipeline="torchvision", num_threads=0)  # no worker processes
    tv = [
        build_loader(in_process, "val", splits, SimpleNamespace(data_rank=r, data_size=shards), CPU, "cpu", False)
        for r in range(shards)
    ]
    assert sorted(sum((epoch_labels(loader)[0] for loader in tv), [])) == list(range(n))


@pytest.mark.parametrize("n", [7, 60, 61, 129])
def test_each_step_of_the_torchvision_shards_is_one_process_s_batch_rank_after_rank(n):
    """Every k-th image per rank put an image at another row of the step's global batch than one
    process at the whole batch gives it, and counter-based dropout masks by that row: a
    data-parallel run dropped other units. Each step's global batch, in row order (rank, then
    accumulated batch), is now the order's next images, and what any number of steps has read
    is a prefix of the order (what a resume under another world size converts by)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist()
    for world in (1, 2, 3, 4):
        for batch in (1, 2, 5):
            for accum in (1, 3):
                batches = train_steps(n, world, batch, accum)
                shares = [step_major_share(order, ShardSpec(r, world, batch, 0, accum), batches) for r in range(world)]
                per_rank = batch * accum
                assert all(len(s) == batches * batch for s in shares)
                steps = [sum((s[i * per_rank : (i + 1) * per_rank] for s in shares), [])
                         for i in range(batches // accum)]  # fmt: skip
                one_process = world * per_rank
                assert steps == [order[i * one_process : (i + 1) * one_process] for i in range(len(steps))]
                assert train_steps(n, 1, one_process) == len(steps)  # as many steps as one process takes
