"""torchvision ImageFolder-style pipeline: PIL decoding in DataLoader workers.

The fallback where DALI is missing, and the baseline the benchmark compares DALI with. Same file
index (so the same class indices), same transforms and the same batching contract as the DALI
loader. Augmentation is seeded per (run seed, epoch, sample), so a sample is augmented the same way
whichever worker decodes it and whether or not the run was resumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from pipelines.base import PAD_LABEL, ImageSpec, ShardSpec, Split, position_state, shard_bounds, train_steps, val_steps
from pipelines.filecheck import open_rgb, without_worker_traceback
from pipelines.index import FileIndex
from pipelines.workers import ForkSafeDataLoader


class ResizeShorter:
    """Shorter side to `size`, the longer side rounded to nearest as DALI's resize_shorter does
    (torchvision's Resize truncates, which differs by a pixel for some aspect ratios)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w <= h:
            new = (self.size, int(h * self.size / w + 0.5))
        else:
            new = (int(w * self.size / h + 0.5), self.size)
        return TF.resize(img, [new[1], new[0]], interpolation=T.InterpolationMode.BILINEAR)


class CenterCropHalfUp:
    """Centre crop whose offset rounds halves up, as DALI's crop does (torchvision's CenterCrop
    rounds halves to even, one pixel away for odd margins)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        top, left = (h - self.size + 1) // 2, (w - self.size + 1) // 2
        return TF.crop(img, top, left, self.size, self.size)


def build_transform(image: ImageSpec, split: Split) -> T.Compose:
    normalize = [T.ToTensor(), T.Normalize([m / 255 for m in image.mean], [s / 255 for s in image.std])]
    if split == "val":
        return T.Compose([ResizeShorter(image.resize), CenterCropHalfUp(image.crop), *normalize])
    if image.train_crop == "random_resized":
        return T.Compose([T.RandomResizedCrop(image.crop), T.RandomHorizontalFlip(), *normalize])
    # Section 2 and 4.1 of the paper, as in the DALI graph.
    return T.Compose(
        [
            ResizeShorter(image.resize),
            CenterCropHalfUp(image.resize),
            T.RandomCrop(image.crop),
            T.RandomHorizontalFlip(),
            *normalize,
        ]
    )


def sample_seed(seed: int, epoch: int, sample: int) -> int:
    # Modulo 2**64: torch.manual_seed refuses integers beyond 64 bits, which the product reaches
    # from data.seed >= about 1.85 million (a date such as 20241205), and takes every other seed
    # (negative ones too) modulo 2**64 itself, so every seed that worked gives the same draws.
    return ((seed * 1_000_003 + epoch) * 10_000_019 + sample) % (2**64)


class IndexedImages(Dataset):
    """Items are keyed by (sample index, augmentation seed); index PAD_LABEL gives a padding row."""

    def __init__(self, index: FileIndex, transform: T.Compose, crop: int) -> None:
        self.index = index
        self.transform = transform
        self.crop = crop

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, seed = key
        if i == PAD_LABEL:
            return torch.zeros(3, self.crop, self.crop), PAD_LABEL
        rgb = open_rgb(self.index.files[i])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(rgb), self.index.labels[i]


def step_major_share(order: list[int], shard: ShardSpec, batches: int) -> list[int]:
    """This rank's `batches` batches of an epoch's `order`, taken one optimizer step at a time:
    each step takes the next world x accum_steps x batch entries, and rank r the r-th run of
    accum_steps x batch of them. A step's global batch is then `order`'s next entries in the
    order of its rows (rank, then batch: the sample ids counter-based dropout masks by), as for
    one process reading the whole global batch, so a data-parallel or accumulated run takes the
    same steps as that process, dropout included. (Every k-th entry, DistributedSampler's
    scheme, put the same images at other rows, so other units were dropped.) The entries read
    after any number of steps are `order`'s first ones, whatever the world size, which is what
    a resume under another world size converts the position by."""
    per_rank = shard.batches_per_step * shard.batch_size
    per_step = shard.num_shards * per_rank
    first = shard.shard_id * per_rank
    steps = batches // shard.batches_per_step
    return [i for s in range(steps) for i in order[s * per_step + first : s * per_step + first + per_rank]]


class _EpochBatches:
    """Batch sampler over this shard, starting at the loader's current position."""

    def __init__(self, loader: TorchvisionLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader) - self.loader._pos

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        ld = self.loader
        b = ld._shard.batch_size
        order = ld._shard_order(ld._epoch)
        seeds = [sample_seed(ld._shard.seed, ld._epoch, i) for i in order]
        for step in range(ld._pos, len(ld)):
            yield list(zip(order[step * b : (step + 1) * b], seeds[step * b : (step + 1) * b]))


class TorchvisionLoader:
    # One permutation per epoch for every shard count: a converted position goes on in its order.
    keeps_epoch_order = True

    def __init__(
        self,
        index: FileIndex,
        split: Split,
        image: ImageSpec,
        shard: ShardSpec,
        device: torch.device,
        num_workers: int,
        prefetch: int,
        channels_last: bool = False,
    ) -> None:
        self.split = split
        self.num_samples = len(index)
        self._index = index
        self._shard = shard
        self._device = device
        self._channels_last = channels_last
        n, k, b = len(index), shard.num_shards, shard.batch_size
        self._steps = train_steps(n, k, b, shard.batches_per_step) if split == "train" else val_steps(n, k, b)
        self._epoch = 0
        self._pos = 0
        dataset = IndexedImages(index, build_transform(image, split), image.crop)
        self._loader = ForkSafeDataLoader(
            dataset,
            batch_sampler=_EpochBatches(self),
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch if num_workers > 0 else None,
        )

    def __len__(self) -> int:
        return self._steps

    def _shard_order(self, epoch: int) -> list[int]:
        n, k, b = self.num_samples, self._shard.num_shards, self._shard.batch_size
        if self.split == "train":
            # One permutation per epoch, shared by all ranks.
            g = torch.Generator().manual_seed(self._shard.seed * 1_000_003 + epoch)
            return step_major_share(torch.randperm(n, generator=g).tolist(), self._shard, self._steps)
        start, end = shard_bounds(n, self._shard.shard_id, k)
        return list(range(start, end)) + [PAD_LABEL] * (self._steps * b - (end - start))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in without_worker_traceback(self._loader):
            self._pos += 1
            # Copied first, then converted: the copy reads the pinned batch (asynchronous on
            # CUDA), and the layout change runs on the device. A channels_last copy made on the
            # host first would be unpinned memory, copied synchronously.
            images = images.to(self._device, non_blocking=True)
            if self._channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels.to(self._device, non_blocking=True)
        self._pos = 0
        self._epoch += 1

    def state_dict(self) -> dict[str, Any]:
        return position_state(self._epoch, self._pos, self._shard, self._steps, self._index)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The order of an epoch depends only on (seed, epoch): the sampler picks the epoch up at
        # `pos` under whatever sharding this loader has, and later epochs need nothing restored.
        self._epoch = int(state["epoch"])
        self._pos = int(state["pos"])

    def close(self) -> None:
        """Stops the worker processes now (ForkSafeDataLoader.close); iterated again, the loader
        starts new ones, as a DaliLoader rebuilds its pipeline (it failed: "'NoneType' object is
        not iterable")."""
        self._loader.close()
