"""DataLoader workers forked next to DALI pipelines (pipelines/workers.py)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipelines.workers import ForkSafeDataLoader


class _CollectsGarbageInTheWorker(Dataset):
    """Runs a full collection in the worker before each sample, as a worker's allocations sooner
    or later do by themselves."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        gc.collect()
        return i


def _leave_a_failed_dali_pipeline_in_a_cycle(folder: Path) -> None:
    """A CPU pipeline stopped by a JPEG cut short, held only by a reference cycle, as the
    traceback of a failed run holds it (pipelines.dali.run_checked's)."""
    from nvidia.dali import fn, pipeline_def

    image = folder / "cut.jpg"
    Image.new("RGB", (64, 48), (200, 30, 90)).save(image, quality=90)
    image.write_bytes(image.read_bytes()[:400])

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        jpegs, _ = fn.readers.file(files=[str(image)])
        return fn.decoders.image(jpegs, device="cpu")

    pipe = graph()
    pipe.build()
    with pytest.raises(RuntimeError):
        pipe.run()
    cycle: dict = {"pipe": pipe}
    cycle["self"] = cycle


def _batches(loader_class: type[DataLoader], folder: Path, timeout: float) -> list[list[int]]:
    gc.disable()  # the cycle must live until the fork, as it may between two automatic collections
    try:
        _leave_a_failed_dali_pipeline_in_a_cycle(folder)
        loader = loader_class(
            _CollectsGarbageInTheWorker(), batch_size=2, num_workers=1, timeout=timeout, multiprocessing_context="fork"
        )
        return [batch.tolist() for batch in loader]
    finally:
        gc.enable()


@pytest.mark.dali
def test_a_plain_dataloader_worker_breaks_on_an_uncollected_dali_pipeline(tmp_path):
    """The hazard itself: the worker hangs (DataLoader's timeout) or aborts, depending on what the
    process's DALI did before. If this stops failing, a DALI pipeline can be destroyed in a forked
    child, and ForkSafeDataLoader's collection is no longer needed."""
    with pytest.raises(RuntimeError, match="timed out|killed by signal|exited unexpectedly"):
        _batches(DataLoader, tmp_path, timeout=5)


@pytest.mark.dali
def test_fork_safe_dataloader_collects_the_pipeline_before_its_workers_start(tmp_path):
    assert _batches(ForkSafeDataLoader, tmp_path, timeout=60) == [[0, 1], [2, 3]]


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


def test_a_run_on_the_torchvision_pipeline_leaves_no_worker_folders_behind(tiny_data, tmp_path):
    """Persistent workers left to the interpreter's exit are terminated by multiprocessing before
    they remove their temporary folders: every run left a /tmp/pymp-* folder (with a socket) per
    worker of each split. Stopped mid-epoch (max_steps), the training workers are busy too."""
    from _helpers import TINY_TRAIN, TRAIN, check, one_process

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    check(one_process([TRAIN, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=tv",
                       "data.pipeline=torchvision", "data.num_threads=2", "train.epochs=2", "train.max_steps=17"],
                      env={"TMPDIR": str(scratch)}))  # fmt: skip
    assert (tmp_path / "tv" / "checkpoints" / "last.pt").exists()  # epoch 1 validated, stopped in epoch 2
    assert sorted(p.name for p in scratch.iterdir() if p.name.startswith("pymp-")) == []


def test_a_fork_safe_loader_closed_stops_its_persistent_workers():
    loader = ForkSafeDataLoader(_CollectsGarbageInTheWorker(), num_workers=2, persistent_workers=True)
    assert list(loader) == [torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), torch.tensor([3])]
    workers = loader._iterator._workers
    assert all(w.is_alive() for w in workers)
    loader.close()
    assert not any(w.is_alive() for w in workers) and all(w.exitcode == 0 for w in workers)  # left by themselves
    assert len(list(loader)) == 4 and loader._iterator._workers[0] not in workers  # iterated again: new workers
    loader.close()
