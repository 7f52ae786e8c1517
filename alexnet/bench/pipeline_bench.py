"""The input pipeline alone: DALI (mixed and CPU decoding) against torchvision's ImageFolder +
DataLoader with the same transforms, batch, prefetch depth and threads (= DataLoader workers), next
to a decode-only ceiling of each decoding library on the same files with the same threads.

Each loader is built once and iterated across epoch boundaries as training would. A window is
timed between batch arrivals after a lead-in: once the machine has settled, a loader holds its
whole prefetch queue ready (DALI: `prefetch` batches; DataLoader: workers x prefetch), which would
arrive for free. So the lead-in takes those, one more batch starts the clock, and the clock stops
when the window's last batch has arrived; the window counts only the batches in between.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from alexnet.bench.envinfo import collect_environment
from alexnet.bench.output import Column, Report
from alexnet.bench.timing import (
    BenchSettingsError,
    Schedule,
    Window,
    paired_ratio,
    run_interleaved,
    summarize,
    wait_until_idle,
)
from alexnet.bench.training import endless
from alexnet.config import IMAGENET_MEAN, IMAGENET_STD, MAX_BATCH, MAX_PREFETCH, MAX_THREADS
from alexnet.data import dali_problem
from pipelines.base import ImageSpec, ShardSpec
from pipelines.filecheck import PIL_READ_ERRORS, how_to_exclude, open_rgb, stopped_by, without_worker_traceback
from pipelines.index import DataError, FileIndex, build_file_index
from pipelines.workers import ForkSafeDataLoader

LOADERS = ("dali-mixed", "dali-cpu", "torchvision")
# The decode-only ceiling each loader is held against: same library, same files, same threads.
CEILING_OF = {
    "dali-mixed": "decode-only/dali-mixed",
    "dali-cpu": "decode-only/dali-cpu",
    "torchvision": "decode-only/pil",
}
CEILINGS = tuple(CEILING_OF.values())
# Diagnostics (opt-in): the loader's own DALI graph run by itself, its outputs left in DALI, so
# that the loader's hand-over to torch and the graph's work beyond decoding can be told apart.
GRAPH_OF = {"dali-mixed": "graph-only/dali-mixed", "dali-cpu": "graph-only/dali-cpu"}
# Diagnostics (opt-in): the training graph cut after each of its costly stages, so that each
# stage's cost is the difference between neighbours: the ceiling (full decode), the paper crop's
# window decoded alone, the window decoded and resized, the whole graph (graph-only).
# Two cuts after the resize weigh the output type, the "emit uint8/fp16" levers: the
# random mirror alone, left uint8 (what the graph would cost if torch normalised), and the mirror
# with the normalization to float16 instead of the loader's float32 (graph-only).
# On the CPU decoder one what-if as well: the window resized by torch's SIMD uint8 kernel in the
# consuming thread instead of DALI's fn.resize (left uint8, not normalised), which tells how far
# a faster resize alone would take the pipeline towards its ceiling.
STAGES = (
    "window-decode",
    "window-decode+resize",
    "window-decode+resize+mirror",
    "window-decode+resize+fp16",
    "window-decode+torch-resize",
)
STAGES_OF = {
    "dali-mixed": tuple(f"stage/dali-mixed/{stage}" for stage in STAGES[:-1]),
    "dali-cpu": tuple(f"stage/dali-cpu/{stage}" for stage in STAGES),
}


def ceiling_of(name: str) -> str | None:
    """The decode-only ceiling a loader, or one of its diagnostics, is held against."""
    for loader, ceiling in CEILING_OF.items():
        if name == loader or name == GRAPH_OF.get(loader) or name in STAGES_OF.get(loader, ()):
            return ceiling
    return None


@dataclass(frozen=True)
class PipelineSettings:
    data: Path  # an ImageFolder split: <data>/<class>/<image>
    batch_size: int = 32
    threads: int = 2  # DALI CPU threads = DataLoader workers
    prefetch: int = 2  # DALI prefetch queue depth = DataLoader prefetch_factor
    resize: int = 256
    crop: int = 227
    batches: int = 8  # timed batches per window, at least
    min_window_s: float = 0.5  # and at least this long
    schedule: Schedule = Schedule()
    pipelines: tuple[str, ...] = ()  # () = all that this machine can run
    ceilings: bool = True
    graph_only: bool = False  # add the graph-only diagnostics
    stages: bool = False  # add the stage diagnostics
    hw_decoder_load: float = 0.65
    seed: int = 0
    channels_last: bool = True  # what the trainer asks for by default (HWC out of DALI, no transpose)

    def __post_init__(self) -> None:
        # The trainer's own upper ends (alexnet.config): past them DALI aborted without a message.
        for flag, value, high in (
            ("--batch-size", self.batch_size, MAX_BATCH),
            ("--threads", self.threads, MAX_THREADS),
            ("--prefetch", self.prefetch, MAX_PREFETCH),
            ("--batches", self.batches, None),
        ):
            if value < 1 or (high is not None and value > high):
                most = f" and at most {high}" if high else ""
                raise BenchSettingsError(f"{flag} must be at least 1{most}, got {value}")
        if not (math.isfinite(self.min_window_s) and self.min_window_s >= 0):
            raise BenchSettingsError(f"--min-window must be a finite number of seconds >= 0, got {self.min_window_s}")
        if not 1 <= self.crop <= self.resize:
            raise BenchSettingsError(f"--crop must be between 1 and --resize ({self.resize}), got {self.crop}")


def chosen_pipelines(
    requested: tuple[str, ...],
    cuda: bool,
    ceilings: bool,
    graph_only: bool = False,
    stages: bool = False,
    no_dali: str | None = None,
) -> tuple[str, ...]:
    """The contenders: `requested` (every loader this machine runs when empty), each loader among
    them with its decode-only ceiling (unless --no-ceiling) and the diagnostics asked for;
    ceilings and diagnostics named in `requested` run as named. (A list of loaders used to drop
    the ceilings and the --graph-only and --stages rows without a word.) `no_dali`: why DALI
    cannot run here (alexnet.data.dali_problem), which leaves its loaders out of the default."""
    if no_dali is not None and (graph_only or stages):
        raise BenchSettingsError(f"--graph-only and --stages time DALI's graphs, and {no_dali}")
    runs_here = [n for n in LOADERS if (cuda or n != "dali-mixed") and (no_dali is None or "dali" not in n)]
    loaders = [n for n in requested if n in LOADERS] if requested else runs_here
    names = list(requested or loaders)
    if graph_only:
        names += [GRAPH_OF[n] for n in loaders if n in GRAPH_OF]
    if stages:
        names += [stage for n in loaders for stage in STAGES_OF.get(n, ())]
    if ceilings:
        names += [CEILING_OF[n] for n in loaders]
    return tuple(dict.fromkeys(names))  # once each, in order


def check_pipelines(requested: tuple[str, ...], cuda: bool, no_dali: str | None = None) -> None:
    known = (*LOADERS, *GRAPH_OF.values(), *(n for names in STAGES_OF.values() for n in names), *CEILINGS)
    for name in requested:
        if name not in known:
            raise BenchSettingsError(f"--pipelines: unknown pipeline {name!r} (choose from {', '.join(known)})")
        if "mixed" in name and not cuda:
            raise BenchSettingsError(f"--pipelines: {name} decodes on the GPU and needs a CUDA device")
        if "dali" in name and no_dali is not None:
            raise BenchSettingsError(
                f"--pipelines: {name} runs DALI, and {no_dali}; --pipelines torchvision times "
                "torchvision's DataLoader alone"
            )


def checked_pipelines(
    requested: tuple[str, ...], cuda: bool, ceilings: bool, graph_only: bool = False, stages: bool = False
) -> tuple[str, ...]:
    """The contenders on this machine (chosen_pipelines), checked: before any data is generated."""
    problem = dali_problem()
    names = chosen_pipelines(requested, cuda, ceilings, graph_only, stages, problem)
    check_pipelines(names, cuda, problem)
    return names


def resolve_split_dir(path: Path) -> Path:
    """`path/train` when it exists (a dataset root), else `path` itself (a split folder)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise BenchSettingsError(f"--data: {path} does not exist or is not a folder")  # a usage error: exit 2
    return path / "train" if (path / "train").is_dir() else path


def describe_files(index: FileIndex, sample: int = 200) -> dict[str, Any]:
    """File count, mean size and mean resolution (of an evenly spread sample) of the data."""
    sizes = [os.path.getsize(f) for f in index.files]
    picks = index.files[:: max(1, len(index.files) // sample)]
    dims = []
    for f in picks:
        try:
            with Image.open(f) as img:  # reads the header only
                dims.append(img.size)
        except PIL_READ_ERRORS as exc:
            raise DataError(f"cannot read the image header of {f} ({exc}). {how_to_exclude(f)}") from exc
    return {
        "files": len(index.files),
        "classes": len(index.classes),
        "mean_kb": statistics.fmean(sizes) / 1000,
        "mean_width": statistics.fmean(w for w, _ in dims),
        "mean_height": statistics.fmean(h for _, h in dims),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BatchStream:
    """A window over any stream of batches: lead-in, one batch to start the clock, then timed
    batches: at least `timed` of them and at least `min_seconds` of them (short windows on fast
    pipelines are mostly timer and scheduling noise)."""

    def __init__(
        self, name: str, batches: Iterator[int], lead_in: int, timed: int, device: torch.device, min_seconds: float
    ) -> None:
        self.name = name
        self._batches = batches  # yields the number of images in each batch
        self._lead_in = lead_in
        self._timed = timed
        self._device = device
        self._min_seconds = min_seconds

    def run_window(self) -> Window:
        for _ in range(self._lead_in):
            next(self._batches)
        next(self._batches)
        _sync(self._device)
        t0 = time.perf_counter()
        images, count = 0, 0
        while count < self._timed or time.perf_counter() - t0 < self._min_seconds:
            images += next(self._batches)
            count += 1
        _sync(self._device)
        return Window(images, time.perf_counter() - t0, {"batches": count})

    def close(self) -> None:
        """Ends the stream: a loader's worker processes stop with it."""
        close = getattr(self._batches, "close", None)  # a generator's
        if close is not None:
            close()


def _endless(loader):
    if len(loader) == 0:
        raise BenchSettingsError("the data holds fewer images than one batch of --batch-size")
    return endless(loader)


def _count(loader) -> Iterator[int]:
    try:
        for images, _ in _endless(loader):
            yield images.shape[0]
    finally:  # BatchStream.close: the loader's workers stop before the process exits
        loader.close()


class _PilDecode(Dataset):
    """Opens and decodes a file as the torchvision pipeline does, and returns nothing but its index."""

    def __init__(self, files: list[str]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> int:
        open_rgb(self.files[i])  # Image.open reads the header only; convert decodes the whole image
        return i


def _pil_decode_batches(index: FileIndex, s: PipelineSettings) -> Iterator[int]:
    loader = ForkSafeDataLoader(
        _PilDecode(index.files),
        batch_size=s.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(s.seed),
        num_workers=s.threads,
        persistent_workers=True,
        prefetch_factor=s.prefetch,
    )
    try:
        for batch in without_worker_traceback(_endless(loader)):
            yield batch.shape[0]
    finally:
        loader.close()


def _graph_batches(loader) -> Iterator[int]:
    """The loader's own pipeline (built exactly as the loader builds it) run by itself."""
    if not hasattr(loader, "_build"):
        raise RuntimeError("--graph-only: pipelines.dali.DaliLoader no longer has _build(); update pipeline_bench")
    pipe = loader._build()
    while True:
        images, _ = pipe.run()
        yield len(images)


def _dali_decode_batches(
    index: FileIndex, s: PipelineSettings, decoder: str, device: torch.device, stage: str | None = None
) -> Iterator[int]:
    """The decode-only ceiling (`stage` None), or the training graph cut after `stage`."""
    if stage is not None and stage not in STAGES:
        raise BenchSettingsError(f"unknown pipeline stage {stage!r} (choose from {', '.join(STAGES)})")
    torch_resize = stage == "window-decode+torch-resize"
    if torch_resize and decoder != "cpu":
        raise BenchSettingsError(f"pipeline stage {stage} resizes on the CPU and needs the CPU decoder")
    from nvidia.dali import fn, pipeline_def

    from pipelines.dali import decode_paper_window, decoder_args, headers_checked, resize_patch, run_checked

    decode = decoder_args(decoder, s.hw_decoder_load)  # type: ignore[arg-type]
    image = _image_spec(s)
    layout = "HWC" if s.channels_last else "CHW"

    @pipeline_def
    def decode_graph():
        jpegs, _ = fn.readers.file(files=index.files, shuffle_after_epoch=True)
        if stage is None:  # after the header check every loader graph does: a file that is no image crashed DALI
            return fn.decoders.image(headers_checked(jpegs), **decode)
        window = decode_paper_window(jpegs, image, decode)
        if stage in ("window-decode", "window-decode+torch-resize"):
            return window
        return output_stage(resize_patch(window, image), stage, image, layout)

    pipe = decode_graph(
        batch_size=s.batch_size,
        num_threads=s.threads,
        seed=s.seed,
        prefetch_queue_depth=s.prefetch,
        device_id=(device.index or 0) if decoder == "mixed" else None,
    )
    pipe.build()
    resized = torch.empty(s.batch_size, 3, s.crop, s.crop, dtype=torch.uint8) if torch_resize else None
    while True:
        (images,) = run_checked(pipe, index.files)  # outputs discarded
        if resized is not None:
            with torch_threads(1):
                resize_windows_with_torch(images, resized)
        yield len(images)


def output_stage(resized, stage: str, image: ImageSpec, layout: str):
    """The resized window (a DALI node) as `stage` leaves it: as it is, mirrored at random and
    left uint8, or mirrored and normalised to float16."""
    from nvidia.dali import fn, types

    from pipelines.dali import mirror_normalize

    if stage == "window-decode+resize+mirror":
        mirror = fn.random.coin_flip(probability=0.5)
        return fn.crop_mirror_normalize(resized, mirror=mirror, dtype=types.UINT8, output_layout=layout)
    if stage == "window-decode+resize+fp16":
        return mirror_normalize(resized, image, layout, dtype=types.FLOAT16)
    return resized


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` for a block. The what-if resize runs on one: an
    image is too small to share, and idle OpenMP workers spin on the cores the decoder threads
    need: on two cores, one thread per core took the stage to 47-48% of the ceiling, one thread
    in all to 75-79%."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resize_windows_with_torch(windows, out: torch.Tensor) -> torch.Tensor:
    """Each decoded HWC uint8 window of a DALI CPU batch scaled into `out` [B, 3, crop, crop] by
    torch's antialiased bilinear resize, whose uint8 kernel (the one PIL-compatible tensor
    resizes use) is vectorised where DALI's CPU resize is not."""
    size = tuple(out.shape[-2:])
    for i in range(len(windows)):
        hwc = torch.from_numpy(np.asarray(windows[i]))  # a view of DALI's buffer, valid until its next run
        nchw = hwc.permute(2, 0, 1).unsqueeze(0)
        out[i : i + 1] = F.interpolate(nchw, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out


def _image_spec(s: PipelineSettings) -> ImageSpec:
    return ImageSpec(s.crop, s.resize, "paper", tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))  # type: ignore[arg-type]


def _batches_of(name: str, index: FileIndex, s: PipelineSettings, device: torch.device) -> tuple[Iterator[int], int]:
    """The stream of batch sizes of one pipeline, and how many batches its prefetch holds ready."""
    image = _image_spec(s)
    shard = ShardSpec(0, 1, s.batch_size, s.seed)
    if name.startswith("stage/"):
        _, loader, stage = name.split("/")
        return _dali_decode_batches(index, s, loader.rsplit("-", 1)[1], device, stage), s.prefetch
    if name in ("dali-mixed", "dali-cpu", *GRAPH_OF.values()):
        from pipelines.dali import DaliLoader

        decoder = "mixed" if name.endswith("dali-mixed") else "cpu"
        loader = DaliLoader(
            index, "train", image, shard, device, num_threads=s.threads, prefetch=s.prefetch, decoder=decoder,
            hw_decoder_load=s.hw_decoder_load, channels_last=s.channels_last,
        )  # fmt: skip
        if name.startswith("graph-only"):
            return _graph_batches(loader), s.prefetch
        return _count(loader), s.prefetch
    if name == "torchvision":
        from pipelines.torchvision_loader import TorchvisionLoader

        loader = TorchvisionLoader(
            index, "train", image, shard, device, num_workers=s.threads, prefetch=s.prefetch,
            channels_last=s.channels_last,
        )  # fmt: skip
        return _count(loader), s.threads * s.prefetch
    if name == "decode-only/pil":
        return _pil_decode_batches(index, s), s.threads * s.prefetch
    return _dali_decode_batches(index, s, name.rsplit("-", 1)[1], device), s.prefetch


def build_contenders(
    index: FileIndex, s: PipelineSettings, names: tuple[str, ...], device: torch.device
) -> list[BatchStream]:
    out = []
    for name in names:
        batches, lead_in = _batches_of(name, index, s, device)
        out.append(BatchStream(name, batches, lead_in, s.batches, device, s.min_window_s))
    return out


def _result(name: str, windows: list[Window], s: PipelineSettings) -> dict[str, Any]:
    stats = summarize([w.images_per_sec for w in windows])
    library = "pil" if name.endswith("pil") else ("torchvision" if name == "torchvision" else "dali")
    return {
        "name": name,
        "kind": name.split("/")[0] if "/" in name else "pipeline",
        "library": library,
        "decoder": "mixed" if "mixed" in name else "cpu",
        "threads": s.threads,
        "batch_size": s.batch_size,
        "images_per_sec": stats.median,
        "images_per_sec_min": stats.min,
        "images_per_sec_max": stats.max,
        "windows": stats.n,
        "window_images_per_sec": [w.images_per_sec for w in windows],
    }


def compare(timed: dict[str, list[Window]]) -> dict[str, Any]:
    """Paired ratios (within each round, then the median): each DALI loader over torchvision,
    and each loader over its decode-only ceiling."""
    summary: dict[str, Any] = {}
    for dali in ("dali-mixed", "dali-cpu"):
        if dali in timed and "torchvision" in timed:
            summary[f"{dali}/torchvision"] = paired_ratio(timed[dali], timed["torchvision"]).as_dict()
    for name in timed:
        ceiling = ceiling_of(name)
        if ceiling in timed:
            summary[f"{name}/{ceiling}"] = paired_ratio(timed[name], timed[ceiling]).as_dict()
    for loader, graph in GRAPH_OF.items():
        if loader in timed and graph in timed:
            summary[f"{loader}/{graph}"] = paired_ratio(timed[loader], timed[graph]).as_dict()
    return summary


TABLE = [
    Column("name", "pipeline"),
    Column("images_per_sec", "images/s", "{:.0f}"),
    Column("images_per_sec_min", "min", "{:.0f}"),
    Column("images_per_sec_max", "max", "{:.0f}"),
    Column("fraction_of_ceiling", "of ceiling", "{:.0%}"),
    Column("over_torchvision", "x torchvision", "{:.2f}"),
]


def run_pipeline_bench(s: PipelineSettings, device: torch.device) -> Report:
    cuda = device.type == "cuda"
    names = checked_pipelines(s.pipelines, cuda, s.ceilings, s.graph_only, s.stages)
    index = build_file_index(resolve_split_dir(s.data))
    if len(index) < s.batch_size:  # before the bad-file handling below, which this is not
        raise BenchSettingsError(
            f"--batch-size {s.batch_size}: {s.data} holds {len(index)} images, fewer than one batch"
        )

    def progress(rnd: int, name: str, w: Window) -> None:
        tag = "warm-up" if rnd < s.schedule.warmup else f"window {rnd - s.schedule.warmup + 1}"
        print(f"  {tag:>9}  {name:<24} {w.images_per_sec:8.0f} images/s", file=sys.stderr, flush=True)

    contenders: list[BatchStream] = []
    try:
        files = describe_files(index)
        contenders = build_contenders(index, s, names, device)
        timed = run_interleaved(
            contenders, s.schedule, between=lambda: wait_until_idle(lambda: _sync(device)), progress=progress
        )
    except DataError as exc:  # a bad file: the scan's lists serve training, this command reads a folder
        reads_all = "The pipeline benchmark stopped; it reads every file under --data: move the bad ones out."
        raise stopped_by(exc, reads_all) from exc
    finally:
        for contender in contenders:
            contender.close()
    summary = compare(timed)
    results = [_result(name, windows, s) for name, windows in timed.items()]
    for r in results:
        ceiling = ceiling_of(r["name"])
        if ceiling and f"{r['name']}/{ceiling}" in summary:
            r["ceiling"] = ceiling
            r["fraction_of_ceiling"] = summary[f"{r['name']}/{ceiling}"]["median"]
        if f"{r['name']}/torchvision" in summary:
            r["over_torchvision"] = summary[f"{r['name']}/torchvision"]["median"]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()}
    settings.update({"device": str(device), "pipelines": list(names), "files": files})
    notes = [
        "images/s: median over timed windows; ratios: median over rounds of the within-round ratio "
        "(contenders interleaved, machine settled between turns)",
        "decode-only: the same reader/files and threads, outputs discarded (DALI: fn.decoders.image after "
        "the headers' check, fn.peek_image_shape, as in every loader graph; "
        "PIL: Image.open + convert('RGB') in DataLoader workers)",
    ]
    if not s.pipelines and not any("dali" in name for name in names):
        notes.append(f"DALI's pipelines left out: {dali_problem()}")
    return Report("pipeline", results, collect_environment(1, "single process"), settings, summary, notes)
