"""From the data section of the config to the train and val loaders of this rank."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from alexnet.config import DataConfig
from alexnet.parallel.mesh import Mesh
from pipelines.base import ImageSpec, Loader, ShardSpec, Split, check_trainable
from pipelines.demo import ensure_demo_dataset
from pipelines.index import FileIndex, build_file_index


@dataclass(frozen=True)
class DataSplits:
    train: FileIndex | None  # None for the synthetic pipeline
    val: FileIndex | None
    classes: list[str]


def resolve_data_root(cfg: DataConfig) -> Path:
    """The configured folder, or the built-in demo dataset (generated on first use)."""
    return Path(cfg.root).expanduser() if cfg.root else ensure_demo_dataset()


def build_splits(cfg: DataConfig, num_classes: int) -> DataSplits:
    if cfg.pipeline == "synthetic":
        n = num_classes or 1000
        return DataSplits(None, None, [f"class_{i}" for i in range(n)])
    root = resolve_data_root(cfg)
    train = build_file_index(root / "train")
    val = build_file_index(root / "val", classes=train.classes)
    return DataSplits(train, val, train.classes)


def image_spec(cfg: DataConfig) -> ImageSpec:
    return ImageSpec(cfg.crop, cfg.resize, cfg.train_crop, tuple(cfg.mean), tuple(cfg.std))  # type: ignore[arg-type]


def build_loader(
    cfg: DataConfig,
    split: Split,
    splits: DataSplits,
    mesh: Mesh,
    device: torch.device,
    decoder: str,
    channels_last: bool,
) -> Loader:
    shard = ShardSpec(mesh.data_rank, mesh.data_size, cfg.batch_size, cfg.seed)
    if cfg.pipeline == "synthetic":
        from pipelines.synthetic import SyntheticLoader

        return SyntheticLoader(split, cfg.crop, len(splits.classes), shard, cfg.synthetic_steps, device, channels_last)
    index = splits.train if split == "train" else splits.val
    assert index is not None
    if split == "train":
        check_trainable(len(index), mesh.data_size, cfg.batch_size, "config key 'data.batch_size'")
    if cfg.pipeline == "torchvision":
        from pipelines.torchvision_loader import TorchvisionLoader

        return TorchvisionLoader(
            index, split, image_spec(cfg), shard, device, cfg.num_threads, cfg.prefetch, channels_last
        )
    from pipelines.dali import DaliLoader

    return DaliLoader(
        index,
        split,
        image_spec(cfg),
        shard,
        device,
        cfg.num_threads,
        cfg.prefetch,
        decoder,  # type: ignore[arg-type]
        cfg.hw_decoder_load,
        channels_last,
    )
