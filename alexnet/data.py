"""From the data section of the config to the train and val loaders of this rank."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from alexnet.config import ConfigError, DataConfig, existing_file, naming_key
from alexnet.parallel.mesh import Mesh
from pipelines.base import ImageSpec, Loader, ShardSpec, Split, check_shardable, check_trainable
from pipelines.demo import ensure_demo_dataset
from pipelines.index import (
    IMAGE_EXTENSIONS,
    DataError,
    FileIndex,
    build_file_index,
    check_disjoint,
    check_val_covers_train,
    load_file_list,
    some_names,
)
from pipelines.lighting import Lighting, LightingStatsError, resolve_lighting_stats
from pipelines.steps import StepLoader

log = logging.getLogger("alexnet")


@dataclass(frozen=True)
class DataSplits:
    train: FileIndex | None  # None for the synthetic pipeline
    val: FileIndex | None
    classes: list[str]
    # Section 4.1's PCA lighting of the DALI training graph (None where off, or not DALI's): read
    # with the data, once, so that the trainer can check that every rank read the same numbers.
    lighting: Lighting | None = None

    @property
    def folder_classes(self) -> list[str] | None:
        """The class folders' names in output order, as checkpoints store them; None for
        synthetic data, whose classes are only numbered."""
        return self.classes if self.train is not None else None

    @property
    def validated_classes(self) -> list[str]:
        """The classes the validation images cover: the paper's comparison needs its 1000, and a
        1000-way model validated on a few classes' images is not comparable (evaluate.py's rule)."""
        if self.val is None:
            return list(self.classes)
        return [self.classes[label] for label in sorted(set(self.val.labels))]


DALI_INSTALL_HINT = "`pip install nvidia-dali-cuda130`; `pip install -e .` installs it on x86-64 Linux only"


def dali_problem() -> str | None:
    """Why NVIDIA DALI cannot be used here ("NVIDIA DALI is not installed (...)"), or None. Found
    is not enough: a DALI whose library fails to load, or an empty nvidia/dali folder an uninstall
    left behind, passed a find_spec and failed at the first batch with a traceback."""
    try:
        if importlib.util.find_spec("nvidia.dali") is None:
            return f"NVIDIA DALI is not installed ({DALI_INSTALL_HINT})"
    except ImportError:  # no `nvidia` package at all
        return f"NVIDIA DALI is not installed ({DALI_INSTALL_HINT})"
    try:
        import nvidia.dali.fn  # noqa: F401  (what the pipelines import; a bare namespace folder lacks it)
    except (ImportError, OSError) as exc:
        return f"NVIDIA DALI is installed but does not import ({type(exc).__name__}: {exc}; {DALI_INSTALL_HINT})"
    return None


def dali_installed() -> bool:
    return dali_problem() is None


def check_pipeline_installed(cfg: DataConfig) -> None:
    """Before a run starts: the pipeline it trains with can be imported (`pip install -e .`
    installs DALI on x86-64 Linux only)."""
    problem = dali_problem() if cfg.pipeline == "dali" else None
    if problem is not None:
        # Ten crops exist in DALI only: "use data.pipeline=torchvision" alone led to the error that
        # data.val_ten_crop needs data.pipeline=dali.
        way_out = "data.pipeline=torchvision" + (" data.val_ten_crop=false" if cfg.val_ten_crop else "")
        raise ConfigError(f"config key 'data.pipeline' is 'dali' but {problem}; use {way_out}")


# data.root of a recipe that leaves it to the command line (OmegaConf's and Hydra's mark for a value
# that must be given): the ImageNet recipes, which trained on the demo data when it was left out.
# Asked for only where real files are read: synthetic data (the step benchmark) needs no folder.
ROOT_REQUIRED = "???"


def resolve_data_root(cfg: DataConfig) -> Path:
    """The configured folder, or the built-in demo dataset (generated on first use)."""
    if cfg.root == ROOT_REQUIRED:
        raise ConfigError(
            f"config key 'data.root' must be given: the recipe leaves it to the command line (root: {ROOT_REQUIRED}); "
            "add data.root=/path/to/the/dataset (a folder with train/ and val/)"
        )
    return Path(cfg.root).expanduser() if cfg.root else ensure_demo_dataset()


def build_splits(cfg: DataConfig, num_classes: int, warn_unread: bool = True) -> DataSplits:
    """The class folders and the files of both splits, checked. `warn_unread`: name the files and
    folders in class folders that are not read (rank 0 only: every rank indexes the same folders,
    and a job of 8 ranks printed each warning 8 times)."""
    if cfg.pipeline == "synthetic":
        n = num_classes or 1000
        return DataSplits(None, None, [f"class_{i}" for i in range(n)])
    root = resolve_data_root(cfg)
    train_dir, val_dir = split_folder(root, "train"), split_folder(root, "val")
    if cfg.train_files:
        train = _load_named_list("data.train_files", cfg.train_files, train_dir)
    else:
        train = build_file_index(train_dir)
    check_val_covers_train(val_dir, train.classes)
    if cfg.val_files:
        # A validation list may cover some classes (the paper comparison then says it cannot compare).
        val = _load_named_list("data.val_files", cfg.val_files, val_dir, classes=train.classes, every_class=False)
    else:
        val = build_file_index(val_dir, classes=train.classes)
    train_source = f"file list {cfg.train_files}" if cfg.train_files else f"{train_dir}"
    check_disjoint(train, val, train_source, f"file list {cfg.val_files}" if cfg.val_files else f"{val_dir}")
    check_enough_classes(train.classes, train_source)
    check_num_classes(num_classes, len(train.classes), train_dir)
    if warn_unread:
        warn_unread_files(train_dir, train)
        warn_unread_files(val_dir, val)
    return DataSplits(train, val, train.classes, build_lighting(cfg) if cfg.pipeline == "dali" else None)


def warn_unread_files(split_dir: Path, index: FileIndex) -> None:
    """Name the files and folders in class folders that training does not read."""
    if index.unread_folders:
        log.warning("%s: %d folder(s) inside class folders, none of whose files are read (only the images "
                    "directly in a class folder are; ImageFolder would read these too): %s", split_dir,
                    len(index.unread_folders), some_names(index.unread_folders))  # fmt: skip
    if index.unread_files:
        log.warning("%s: %d file(s) in class folders are not read, their extension being none of %s (as "
                    "ImageFolder skips them): %s",
                    split_dir, len(index.unread_files), " ".join(IMAGE_EXTENSIONS),
                    some_names(index.unread_files))  # fmt: skip


def check_enough_classes(classes: list[str], source: str) -> None:
    """One class alone is refused: every label would be the same and the run would learn nothing
    (the torchvision variant reported 100% top-1, the paper model refused one output with a
    traceback)."""
    if len(classes) < 2:
        raise DataError(f"{source} has {len(classes)} class ({', '.join(classes)}); a classifier needs at least 2")


def check_num_classes(num_classes: int, found: int, train_dir: Path) -> None:
    """model.num_classes against the data's class folders: fewer outputs than classes fail at the
    first step (a label beyond the logits); more are allowed (a 1000-way head on a subset of
    ImageNet's classes) with a warning, since the extra outputs are never a target."""
    if num_classes and num_classes < found:
        raise ConfigError(
            f"config key 'model.num_classes' is {num_classes}, but {train_dir} has {found} class folders; "
            "set it to 0 (from the data) or at least the number of classes"
        )
    if num_classes > found:
        log.warning("model.num_classes is %d for %d class folders in %s: %d outputs are never a target",
                    num_classes, found, train_dir, num_classes - found)  # fmt: skip


def _load_named_list(
    key: str, list_file: str, split_dir: Path, classes: list[str] | None = None, every_class: bool = True
) -> FileIndex:
    """load_file_list, its errors starting with the config key that named the list."""
    path = existing_file(key, list_file, "file list")
    with naming_key(key, DataError):
        return load_file_list(path, split_dir, classes=classes, every_class=every_class)


def split_folder(root: Path, split: str) -> Path:
    """root/split, or a DataError that says which of the two is missing (before any work starts)."""
    if not root.is_dir():  # a wrong value, as a missing file a key names is (exit 2)
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise ConfigError(f"data folder {root} (config key 'data.root') {state}", ("data.root",))
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"data folder {root} has no {split}/ folder (expected {folder}/<class>/<image>)")
    return folder


def image_spec(cfg: DataConfig) -> ImageSpec:
    return ImageSpec(cfg.crop, cfg.resize, cfg.train_crop, tuple(cfg.mean), tuple(cfg.std))  # type: ignore[arg-type]


def build_lighting(cfg: DataConfig) -> Lighting | None:
    """Section 4.1's PCA lighting for the training graph, or None when data.lighting_std is 0."""
    if cfg.lighting_std == 0.0:
        return None
    if not cfg.lighting_stats:  # <data root>/pca_lighting.json or ImageNet's, named by no key
        return Lighting(cfg.lighting_std, resolve_lighting_stats("", resolve_data_root(cfg)))
    existing_file("data.lighting_stats", cfg.lighting_stats, "lighting statistics")
    with naming_key("data.lighting_stats", LightingStatsError):
        return Lighting(cfg.lighting_std, resolve_lighting_stats(cfg.lighting_stats, resolve_data_root(cfg)))


@dataclass(frozen=True)
class ReadSettings:
    """How a loader reads and decodes files: the pipeline, its decoder and threads (DataLoader
    workers for torchvision), and its prefetch depth."""

    pipeline: str  # "dali" or "torchvision"
    decoder: str  # DALI's: "cpu" or "mixed"
    num_threads: int
    prefetch: int
    hw_decoder_load: float
    channels_last: bool


def build_file_loader(
    index: FileIndex,
    split: Split,
    image: ImageSpec,
    shard: ShardSpec,
    device: torch.device,
    read: ReadSettings,
    ten_crop: bool = False,
    lighting: Lighting | None = None,
) -> Loader:
    """The loader of one split's files for this shard: torchvision's, DALI's ten-crop one (val
    batches of [B, 10, 3, crop, crop]: evaluate them with alexnet.evaluate.eval_batch), or DALI's.
    torchvision's has neither ten crops nor PCA lighting (`ten_crop` and `lighting` are ignored
    there: the callers' checks say so), and the ten-crop loader is for validation only."""
    if split == "train":
        index.fingerprint  # noqa: B018 - computed now (1-2 s for ImageNet), not in the first checkpoint's step
    if read.pipeline == "torchvision":
        from pipelines.torchvision_loader import TorchvisionLoader

        return TorchvisionLoader(
            index, split, image, shard, device, read.num_threads, read.prefetch, read.channels_last
        )
    rest = (shard, device, read.num_threads, read.prefetch, read.decoder, read.hw_decoder_load, read.channels_last)
    if ten_crop:
        from pipelines.tencrop import TenCropLoader

        return TenCropLoader(index, image, *rest)
    from pipelines.dali import DaliLoader

    return DaliLoader(index, split, image, *rest, lighting=lighting)  # type: ignore[arg-type]


def build_loader(
    cfg: DataConfig,
    split: Split,
    splits: DataSplits,
    mesh: Mesh,
    device: torch.device,
    decoder: str,
    channels_last: bool,
    batches_per_step: int = 1,
) -> Loader:
    """This rank's loader of `split`'s batches of data.batch_size: a training epoch holds whole
    optimizer steps of `batches_per_step` batches."""
    shard = ShardSpec(mesh.data_rank, mesh.data_size, cfg.batch_size, cfg.seed, batches_per_step)
    if cfg.pipeline == "synthetic":
        from pipelines.synthetic import SyntheticLoader

        steps = cfg.synthetic_steps * batches_per_step  # data.synthetic_steps counts optimizer steps
        return SyntheticLoader(split, cfg.crop, len(splits.classes), shard, steps, device, channels_last)
    index = splits.train if split == "train" else splits.val
    assert index is not None
    if split == "train":
        where = "config key 'data.batch_size'"
        if batches_per_step > 1:
            where = "config keys 'data.batch_size' and 'train.accum_steps'"
        check_trainable(len(index), mesh.data_size, cfg.batch_size, where, batches_per_step)
    elif cfg.pipeline != "torchvision":
        remedy = "add validation images, use fewer data-parallel ranks, or data.pipeline=torchvision"
        check_shardable(len(index), mesh.data_size, "the validation split", remedy)
    if cfg.pipeline == "torchvision" and split == "train" and cfg.lighting_std > 0:
        log.warning("data.lighting_std is set but PCA lighting exists only in the DALI pipeline: not applied")
    prefetch = step_prefetch(cfg, batches_per_step) if split == "train" else cfg.prefetch
    read = ReadSettings(cfg.pipeline, decoder, cfg.num_threads, prefetch, cfg.hw_decoder_load, channels_last)
    lighting = splits.lighting if split == "train" and cfg.pipeline == "dali" else None
    if split == "train" and cfg.pipeline == "dali" and cfg.lighting_std > 0 and lighting is None:
        raise ValueError("the data splits were read for another pipeline than DALI's: without its PCA lighting")
    ten_crop = split == "val" and cfg.val_ten_crop
    return build_file_loader(index, split, image_spec(cfg), shard, device, read, ten_crop, lighting)


def step_prefetch(cfg: DataConfig, batches_per_step: int) -> int:
    """data.prefetch, deepened so that a whole step's batches are decoded ahead: the trainer takes
    a step's batches together before it computes, so with a queue shallower than the step, the
    batches beyond it would be decoded while the device waits instead of during the previous
    step. DALI's queue counts batches; a DataLoader's prefetch_factor counts them per worker."""
    if cfg.pipeline == "torchvision":
        return max(cfg.prefetch, -(-batches_per_step // max(cfg.num_threads, 1)))
    return max(cfg.prefetch, batches_per_step)


def build_train_loader(
    cfg: DataConfig,
    splits: DataSplits,
    mesh: Mesh,
    device: torch.device,
    decoder: str,
    channels_last: bool,
    accum_steps: int,
) -> StepLoader:
    """This rank's training loader for the trainer: each item is one optimizer step's
    `accum_steps` batches (train.accum_steps)."""
    batches = build_loader(cfg, "train", splits, mesh, device, decoder, channels_last, accum_steps)
    return StepLoader(batches, accum_steps)
