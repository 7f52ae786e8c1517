"""Evaluate a checkpoint: centre-crop or ten-crop (section 4.1) top-1/top-5 and per-class accuracy.

Counts are exact across ranks: each rank reads its own padded shard of the split (sharded by rank,
as the trainer's data-parallel ranks are), rows that only pad a shard carry PAD_LABEL and are not
counted, and the per-class (correct, count) vectors are summed with one all_reduce. Accuracy is
(sum of correct) / (sum of counted), and the count must equal the number of files.
`eval_batch` is also what the trainer's validation calls, so that ten-crop batches
([B, 10, 3, H, W]) are scored on the softmax averaged over their crops.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from alexnet.config import Config, ConfigError
from alexnet.data import (
    ReadSettings,
    build_file_loader,
    dali_installed,
    dali_problem,
    image_spec,
    resolve_data_root,
)
from alexnet.engine import AmpPolicy, StepResult, build_amp, eval_step
from alexnet.imagenet import class_names
from alexnet.inference import LoadedModel, build_model_from_checkpoint
from alexnet.metrics import topk_correct
from alexnet.parallel.agree import (
    SETUP_ERRORS,
    CheckpointChangedError,
    agreed_batches,
    check_same_checkpoint,
    check_same_files,
    check_same_settings,
    option_settings,
    share_setup_failure,
)
from alexnet.parallel.env import DistEnv
from alexnet.report import error_pct, paper_comparison
from pipelines.base import PAD_LABEL, Loader, ShardSpec, check_shardable
from pipelines.index import DataError, FileIndex, build_file_index, find_classes, load_file_list

log = logging.getLogger("alexnet")


# ---- scoring a batch ---------------------------------------------------------------------------
def predict_log_probs(model: nn.Module, images: Tensor, amp: AmpPolicy) -> Tensor:
    """Log class probabilities [B, K] (float32). For ten-crop batches [B, N, 3, H, W] the softmax
    outputs of the N crops are averaged (section 4.1) before the log."""
    if images.ndim == 4:
        with amp.autocast():
            logits = model(images)
        return F.log_softmax(logits.float(), dim=1)
    if images.ndim != 5:
        raise ValueError(f"expected images [B, 3, H, W] or [B, crops, 3, H, W], got {tuple(images.shape)}")
    b, n = images.shape[:2]
    with amp.autocast():
        logits = model(images.flatten(0, 1))
    # log(mean of the N softmaxes), formed in log space: the mean itself underflows float32 for
    # classes far below the best (a floor there capped the loss and let top-5 ties go by index).
    log_probs = F.log_softmax(logits.float(), dim=1).view(b, n, -1)
    return torch.logsumexp(log_probs, dim=1) - math.log(n)


@torch.no_grad()
def eval_batch(model: nn.Module, images: Tensor, labels: Tensor, amp: AmpPolicy) -> StepResult:
    """engine.eval_step for [B, 3, H, W] batches; for ten-crop batches the loss is the negative log
    of the averaged softmax and top-k ranks the averaged softmax."""
    if images.ndim == 4:
        return eval_step(model, images, labels, amp)
    log_probs = predict_log_probs(model, images, amp)
    loss_sum = F.nll_loss(log_probs, labels, ignore_index=PAD_LABEL, reduction="sum")
    count = (labels != PAD_LABEL).sum()
    return StepResult(loss_sum, topk_correct(log_probs, labels), count, True)


# ---- per-class counts --------------------------------------------------------------------------
@dataclass
class ClassTally:
    """Per-class top-1 hits, top-5 hits and images, plus the loss sum; float64 on the device."""

    num_classes: int
    device: torch.device
    sums: Tensor = field(init=False)  # [3, K]: top-1 hits, top-5 hits, images
    loss_sum: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sums = torch.zeros(3, self.num_classes, dtype=torch.float64, device=self.device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, log_probs: Tensor, labels: Tensor) -> None:
        valid = labels != PAD_LABEL
        log_probs, labels = log_probs[valid], labels[valid]
        top = log_probs.topk(min(5, self.num_classes), dim=1).indices
        hit1 = (top[:, 0] == labels).double()
        hit5 = (top == labels[:, None]).any(dim=1).double()
        ones = torch.ones_like(hit1)
        for row, values in enumerate((hit1, hit5, ones)):
            self.sums[row].index_add_(0, labels, values)
        self.loss_sum += F.nll_loss(log_probs, labels, reduction="sum").double()

    def reduce(self) -> tuple[Tensor, float]:
        """Sums over all ranks (one all_reduce): ([3, K] on the CPU, loss sum)."""
        packed = torch.cat([self.sums.flatten(), self.loss_sum.reshape(1)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
        packed = packed.cpu()
        return packed[:-1].view(3, self.num_classes), float(packed[-1])


# ---- a whole evaluation ------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalOptions:
    checkpoint: Path
    data: str = ""  # dataset root (with val/ and train/) or a folder of class folders; "" = the run's
    split: str = "val"
    ten_crop: bool = False
    batch_size: int = 0  # 0 = the run's data.batch_size
    num_threads: int = 0  # 0 = the run's data.num_threads
    decoder: str = "auto"  # auto: mixed (GPU) on CUDA, else cpu
    files: str = ""  # a file list of the split (launch/scan.py); "" = the run's own list of its own split
    amp: str = "run"  # run: the checkpoint's train.amp (fp16 falls back to off without CUDA)
    pipeline: str = "run"  # run: the checkpoint's data.pipeline (DALI for ten crops); dali; torchvision


# The options each node may give its own way: paths (a node's own copy of the checkpoint or the
# data, checked for what they lead to) and its own tuning.
EVAL_MAY_DIFFER = frozenset({"--checkpoint", "--data", "--files", "--num-threads", "--decoder"})


def eval_file_list(cfg: Config, opts: EvalOptions) -> str:
    """The file list to evaluate: --files, else the run's own list of the split evaluated when it
    is one of the run's own (data.val_files, data.train_files: they leave out the files
    launch/scan.py found bad); a list of another dataset's files would not name the files of --data."""
    if opts.files or opts.data:
        return opts.files
    return {"val": cfg.data.val_files, "train": cfg.data.train_files}.get(opts.split, "")


def holds_class_folders(folder: Path) -> bool:
    return folder.is_dir() and any(entry.is_dir() for entry in os.scandir(folder))


def run_data_root(cfg: Config, checkpoint: str | Path) -> Path:
    """The run's own data.root, or a DataError that says to pass --data: a relative data.root was
    relative to the folder the run was started in, which evaluate.py may not be run from."""
    root = resolve_data_root(cfg.data)
    if root.is_dir():
        return root
    relative = "" if root.is_absolute() else f", read from this folder, {Path.cwd()}, as it is relative"
    raise DataError(
        f"the run's data folder {cfg.data.root} (data.root in the config of checkpoint {checkpoint}{relative}) "
        "does not exist: pass --data <the dataset root or a folder of class folders>"
    )


def resolve_eval_index(
    cfg: Config, opts: EvalOptions, trained_classes: list[str] | None = None
) -> tuple[FileIndex, Path, str]:
    """The files to evaluate, their folder and the file list they came from ("" for the whole
    folder). Class indices are the model's: the class folders it was trained on, by name, as the
    checkpoint lists them (a folder with some of them is labelled as training labelled them);
    for a checkpoint without that list (written before the list was stored, or trained on
    synthetic data), <root>/train's classes when it exists, else the evaluated folder's own
    class folders, in sorted order."""
    if not opts.data and cfg.data.pipeline == "synthetic":
        raise ConfigError(  # the command must change (exit 2)
            f"checkpoint {opts.checkpoint} was trained on synthetic data (data.pipeline=synthetic): "
            "pass --data with the folder to evaluate"
        )
    root = Path(opts.data).expanduser() if opts.data else run_data_root(cfg, opts.checkpoint)
    # A dataset root's splits hold class folders; in a folder of classes, a class that happens to
    # be named train or val (CIFAR-100 has "train") holds images.
    split_dir = root / opts.split if holds_class_folders(root / opts.split) else root
    if split_dir == root and any(holds_class_folders(root / name) for name in ("train", "val")):
        # a dataset root without that split (a typo, an unprepared split): not a folder of classes
        if (root / opts.split).is_dir():
            raise DataError(
                f"{root / opts.split} holds no class folders: the images of a split go in <split>/<class>/ "
                "(for ILSVRC-2012's flat validation folder, see launch/prepare_imagenet.py)"
            )
        raise DataError(f"{root / opts.split} does not exist: --split names a subfolder of {root}")
    classes = trained_classes
    if classes is None and holds_class_folders(root / "train") and split_dir != root:
        classes = find_classes(root / "train")
    files = eval_file_list(cfg, opts)
    if files:
        return load_file_list(files, split_dir, classes=classes, every_class=False), split_dir, files
    return build_file_index(split_dir, classes=classes), split_dir, ""


def resolve_eval_amp(cfg: Config, mode: str, device: torch.device) -> AmpPolicy:
    """--amp run takes the precision the run validated with; a GPU run's fp16 on a machine without
    CUDA is evaluated in full precision instead of failing (the weights are float32 either way)."""
    if mode == "run":
        mode = cfg.train.amp
        if mode == "fp16" and device.type != "cuda":
            log.info("the run trained with train.amp=fp16, which needs CUDA: evaluating in float32")
            mode = "off"
    elif mode == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp off or bf16 on the CPU")
    return build_amp(mode, device)  # type: ignore[arg-type]


def resolve_eval_pipeline(cfg: Config, opts: EvalOptions) -> str:
    """What reads the images: by default the run's own pipeline, so that the figures are those of
    its validation (DALI and torchvision resize with different filters); ten crops exist in DALI
    only, and a run on synthetic data is evaluated with DALI where it is installed."""
    if opts.pipeline != "run":
        pipeline = opts.pipeline
    elif opts.ten_crop or cfg.data.pipeline == "dali":
        pipeline = "dali"
    elif cfg.data.pipeline == "synthetic":
        pipeline = "dali" if dali_installed() else "torchvision"
    else:
        pipeline = cfg.data.pipeline
    problem = dali_problem() if pipeline == "dali" or opts.ten_crop else None
    if problem is not None and opts.ten_crop:  # each hint led to the other's error
        raise ConfigError(
            f"--ten-crop reads the images with DALI, and {problem}; without --ten-crop, "
            "--pipeline torchvision gives the centre crop's figures"
        )
    if pipeline == "torchvision" and opts.ten_crop:
        raise ConfigError("--ten-crop reads the images with DALI; use --pipeline dali (or run)")
    if problem is not None:
        raise ConfigError(
            f"evaluation reads images with DALI, and {problem}; --pipeline torchvision reads them with PIL"
        )
    return pipeline


def build_eval_loader(cfg: Config, index: FileIndex, opts: EvalOptions, env: DistEnv, channels_last: bool) -> Loader:
    batch = opts.batch_size or cfg.data.batch_size
    shard = ShardSpec(env.rank, env.world_size, batch, seed=0)
    if opts.pipeline == "torchvision" and opts.decoder != "auto":
        raise ConfigError("--decoder sets DALI's decoder; --pipeline torchvision decodes with PIL")
    decoder = opts.decoder if opts.decoder != "auto" else ("mixed" if env.device.type == "cuda" else "cpu")
    if decoder == "mixed" and env.device.type != "cuda":
        raise ConfigError("--decoder mixed decodes on the GPU and needs a CUDA device; use --decoder cpu or auto")
    # Threads (DataLoader workers for torchvision) as in training, unless --num-threads says otherwise.
    read = ReadSettings(opts.pipeline, decoder, opts.num_threads or cfg.data.num_threads, cfg.data.prefetch,
                        cfg.data.hw_decoder_load, channels_last)  # fmt: skip
    return build_file_loader(index, "val", image_spec(cfg.data), shard, env.device, read, opts.ten_crop)


@dataclass
class EvalInputs:
    """What each rank reads on its own, and can fail at alone (a checkpoint or data folder its
    node lacks): the checkpoint, the files and the precision."""

    loaded: LoadedModel
    opts: EvalOptions
    index: FileIndex
    split_dir: Path
    files: str
    amp: AmpPolicy


@dataclass
class EvalSetup:
    """The agreed inputs and each rank's loader."""

    inputs: EvalInputs
    loader: Loader


def read_eval_inputs(opts: EvalOptions, env: DistEnv) -> EvalInputs:
    """No collectives: a rank that fails here alone must reach share_setup_failure with the others
    (a rank that raised out of a collective met the others' next one: tracebacks on every rank)."""
    loaded = build_model_from_checkpoint(opts.checkpoint, env.device)
    cfg = loaded.config
    opts = replace(opts, pipeline=resolve_eval_pipeline(cfg, opts))
    if cfg.data.val_ten_crop and not opts.ten_crop and env.rank == 0:
        log.info("the run validated with ten crops (data.val_ten_crop): these are centre-crop figures; "
                 "--ten-crop gives the run's own")  # fmt: skip
    index, split_dir, files = resolve_eval_index(cfg, opts, loaded.classes)
    if opts.pipeline == "dali":  # the torchvision loader pads a rank's shard however short it is
        check_shardable(len(index), env.world_size, str(files or split_dir), "evaluate with fewer processes")
    if len(index.classes) > loaded.num_classes:  # only a checkpoint without its class names gets here
        raise DataError(
            f"{split_dir}: {len(index.classes)} classes, but checkpoint {opts.checkpoint} predicts {loaded.num_classes}"
        )
    amp = resolve_eval_amp(cfg, opts.amp, env.device)
    return EvalInputs(loaded, opts, index, split_dir, files, amp)


# Reads of a checkpoint that a run still training replaces (its last.pt) before the ranks give up.
CHECKPOINT_READS = 3


def read_same_checkpoint(opts: EvalOptions, env: DistEnv) -> EvalInputs:
    """Collective: every rank's inputs, of one checkpoint (--checkpoint may name a node's own copy,
    but of the same one). Where every rank read the same path and found different checkpoints, a
    run still training most likely replaced it between their reads: they read it again, together
    (the comparison's collectives line them up), up to CHECKPOINT_READS times in all."""
    for _ in range(CHECKPOINT_READS - 1):
        try:
            return _read_checked_inputs(opts, env)
        except CheckpointChangedError:
            if env.rank == 0:
                log.warning("the ranks read different checkpoints from %s (replaced by a run still training?); "
                            "reading it again", opts.checkpoint)  # fmt: skip
    return _read_checked_inputs(opts, env)


def _read_checked_inputs(opts: EvalOptions, env: DistEnv) -> EvalInputs:
    inputs, failure = None, None
    try:
        inputs = read_eval_inputs(opts, env)
    except SETUP_ERRORS as exc:
        failure = exc
    share_setup_failure(failure)
    assert inputs is not None  # else that raised
    loaded = inputs.loaded
    check_same_checkpoint(
        (loaded.path, loaded.progress), "loaded different checkpoints", "give every rank the same one"
    )
    return inputs


def read_eval_setup(opts: EvalOptions, env: DistEnv) -> EvalSetup:
    """Collective: every rank's inputs, checked to be the same, and its loader; any rank's failure
    is every rank's error."""
    # --ten-crop on one node only printed a blend of centre and ten-crop figures, exit 0.
    check_same_settings(option_settings(asdict(opts)), "evaluate.py options", may_differ=EVAL_MAY_DIFFER)
    inputs = read_same_checkpoint(opts, env)
    check_same_files(str(inputs.split_dir), {"": inputs.index})
    loaded = inputs.loaded
    loader, failure = None, None
    try:  # in the run's train.channels_last: its layout is faster on GPUs and CPUs alike
        loader = build_eval_loader(loaded.config, inputs.index, inputs.opts, env, loaded.config.train.channels_last)
    except SETUP_ERRORS as exc:
        failure = exc
    try:
        share_setup_failure(failure)
    except BaseException:
        if loader is not None:  # its workers would leave their /tmp/pymp-* folders
            loader.close()
        raise
    assert loader is not None  # else that raised
    return EvalSetup(inputs, loader)


def run_evaluation(opts: EvalOptions, env: DistEnv) -> dict[str, Any]:
    """Evaluate on every rank; every rank returns the same result (rank 0 writes it)."""
    setup = read_eval_setup(opts, env)
    inputs = setup.inputs
    loaded, cfg = inputs.loaded, inputs.loaded.config
    try:
        model = loaded.model.to(memory_format=torch.channels_last) if cfg.train.channels_last else loaded.model
        tally = ClassTally(loaded.num_classes, env.device)
        start = time.perf_counter()
        with torch.no_grad():
            for images, labels in agreed_batches(setup.loader, env.device):  # a bad file on one rank stops every rank
                tally.add(predict_log_probs(model, images, inputs.amp), labels)
    finally:  # also after a bad file or another rank's failure: workers left to the interpreter's exit
        setup.loader.close()  # leave their /tmp/pymp-* folders
    sums, loss_sum = tally.reduce()
    seconds = time.perf_counter() - start
    return build_result(inputs.opts, loaded.progress, cfg, inputs.index, inputs.split_dir, inputs.files, inputs.amp,
                        sums, loss_sum, env, seconds)  # fmt: skip


def build_result(
    opts: EvalOptions,
    progress: dict[str, Any],
    cfg: Config,
    index: FileIndex,
    split_dir: Path,
    files: str,
    amp: AmpPolicy,
    sums: Tensor,
    loss_sum: float,
    env: DistEnv,
    seconds: float,
) -> dict[str, Any]:
    hits1, hits5, counts = (sums[i].round().long().tolist() for i in range(3))
    total = sum(counts)
    if total != len(index):
        raise RuntimeError(f"evaluation counted {total} images but the split has {len(index)}")
    top1, top5 = 100.0 * sum(hits1) / total, 100.0 * sum(hits5) / total
    evaluated = [name for name, c in zip(index.classes, counts) if c]  # a folder may hold some classes
    names = class_names(index.classes)
    per_class = [
        {
            "index": k,
            "folder": folder,
            "name": names[k],
            "images": counts[k],
            "top1": 100.0 * hits1[k] / counts[k] if counts[k] else None,
            "top5": 100.0 * hits5[k] / counts[k] if counts[k] else None,
        }
        for k, folder in enumerate(index.classes)
    ]
    return {
        "checkpoint": str(opts.checkpoint),
        "variant": cfg.model.variant,
        # epochs trained: one more than validated after a stop during a validation
        "epoch": None if "epoch" not in progress else progress["epoch"] + int(progress.get("epoch_trained", False)),
        "step": progress.get("step"),
        "data": str(split_dir),
        "files": files or None,
        "amp": amp.name,
        "pipeline": opts.pipeline,
        "crops": "ten" if opts.ten_crop else "centre",
        "crop": cfg.data.crop,
        "resize": cfg.data.resize,
        "images": total,
        "num_classes": len(index.classes),  # the classes the images are labelled among, as per_class lists
        "classes_evaluated": len(evaluated),
        "top1": top1,
        "top5": top5,
        "top1_error": error_pct(top1),
        "top5_error": error_pct(top5),
        "loss": loss_sum / total,
        "paper": paper_comparison(top1, top5, evaluated, opts.ten_crop),
        "world_size": env.world_size,
        "device": env.device.type,
        "seconds": seconds,
        "images_per_sec": total / max(seconds, 1e-9),
        "per_class": per_class,
    }


def format_result(result: dict[str, Any], worst: int = 5) -> str:
    lines = [
        f"{result['checkpoint']}: {result['images']} images, {result['crops']}-crop, "
        f"top-1 {result['top1']:.2f}% (error {result['top1_error']:.2f}%), "
        f"top-5 {result['top5']:.2f}% (error {result['top5_error']:.2f}%), loss {result['loss']:.4f}"
        + (f", autocast {result['amp']}" if result["amp"] != "off" else "")
        + f", read by {result['pipeline']}",
        result["paper"]["note"],
    ]
    if result["files"]:
        lines.append(f"files: those listed in {result['files']}")
    scored = [c for c in result["per_class"] if c["top1"] is not None]
    if len(scored) > worst:
        hardest = sorted(scored, key=lambda c: (c["top1"], c["index"]))[:worst]
        lines.append(
            "hardest classes (top-1): " + ", ".join(f"{c['name']} ({c['folder']}) {c['top1']:.0f}%" for c in hardest)
        )
    return "\n".join(lines)
