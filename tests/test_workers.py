"""DataLoader workers forked next to DALI pipelines (pipelines/workers.py)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from pipelines.workers import ForkSafeDataLoader

pytest.importorskip("nvidia.dali")


class _CollectsGarbageInTheWorker(Dataset):
    """Runs a full collection in the worker before each sample, as a worker's allocations sooner
    or later do by themselves."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        gc.collect()
        return i


def _leave_a_dali_pipeline_in_a_cycle() -> None:
    """A built, run CPU pipeline that only a reference cycle holds, as a failed run's traceback does."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=2, num_threads=2, device_id=None)
    def graph():
        return fn.random.uniform(range=[0.0, 1.0], shape=[4])

    pipe = graph()
    pipe.build()
    pipe.run()
    cycle: dict = {"pipe": pipe}
    cycle["self"] = cycle


def _batches(loader_class: type[DataLoader], timeout: float) -> list[list[int]]:
    gc.disable()  # the cycle must live until the fork, as it may between two automatic collections
    try:
        _leave_a_dali_pipeline_in_a_cycle()
        loader = loader_class(
            _CollectsGarbageInTheWorker(), batch_size=2, num_workers=1, timeout=timeout, multiprocessing_context="fork"
        )
        return [batch.tolist() for batch in loader]
    finally:
        gc.enable()


def test_a_plain_dataloader_worker_hangs_on_an_uncollected_dali_pipeline():
    """The hazard itself: if this stops failing, DALI's destructor no longer waits in a forked
    child, and ForkSafeDataLoader's collection is no longer needed."""
    with pytest.raises(RuntimeError, match="timed out"):
        _batches(DataLoader, timeout=5)


def test_fork_safe_dataloader_collects_the_pipeline_before_its_workers_start():
    assert _batches(ForkSafeDataLoader, timeout=60) == [[0, 1], [2, 3]]


def test_the_loaders_that_fork_next_to_dali_use_it(tiny_data):
    from alexnet.bench.pipeline_bench import PipelineSettings, _image_spec, _pil_decode_batches
    from pipelines.base import ShardSpec
    from pipelines.index import build_file_index
    from pipelines.torchvision_loader import TorchvisionLoader

    index = build_file_index(tiny_data / "train")
    settings = PipelineSettings(data=tiny_data, batch_size=4, threads=1, prefetch=1, resize=40, crop=32)
    image, shard = _image_spec(settings), ShardSpec(0, 1, 4, seed=0)
    loader = TorchvisionLoader(index, "train", image, shard, torch.device("cpu"), num_workers=1, prefetch=1)
    assert isinstance(loader._loader, ForkSafeDataLoader)
    assert next(iter(loader))[0].shape == (4, 3, 32, 32)
    assert next(_pil_decode_batches(index, settings)) == 4


def test_workers_that_persist_are_started_and_collected_for_once(monkeypatch):
    """The collection costs a fraction of a second: once per worker start, not once per epoch."""
    from pipelines import workers

    collections: list[int] = []
    monkeypatch.setattr(workers.gc, "collect", lambda *a: collections.append(1) or 0)
    kinds = {"persistent": True, "per epoch": False}
    for kind, persistent in kinds.items():
        collections.clear()
        loader = ForkSafeDataLoader(list(range(4)), batch_size=2, num_workers=1, persistent_workers=persistent)
        for _ in range(3):
            assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]
        assert len(collections) == (1 if persistent else 3), kind
    collections.clear()
    assert [b.tolist() for b in ForkSafeDataLoader(list(range(4)), batch_size=2)] == [[0, 1], [2, 3]]
    assert collections == []  # no workers, nothing forked
