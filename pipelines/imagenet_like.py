"""ImageNet-like JPEG files for throughput benchmarks, generated on first use.

Decoding cost follows a JPEG's pixel count and its entropy-coded size, so a benchmark on tiny or
flat images says little about ILSVRC-2012. These files match it where decoders care: about
500x375 pixels (the most common ImageNet shape, with landscape and portrait sizes around it),
quality 90, and photo-like content whose mean file size is close to ILSVRC-2012 train's (about
110 KB): smooth illumination gradients, objects with hard edges and their own shading, band-limited
texture and fine sensor noise. The texture and noise amplitudes are the calibration knobs
(`texture`, `noise`; `measure_mean_kb` checks a sample).

Files are in ImageFolder layout (`train/<class>/*.JPEG`, `val/<class>/*.JPEG`). Every file's
content is a function of (seed, split, class, index) alone, so parallel generation gives the same
bytes on every machine; a file lock lets many ranks ask at once, as for the demo dataset.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipelines.generated import cache_root, encode_jpeg, ensure_generated
from pipelines.workers import end_with_the_parent

VERSION = "imagenet-like-v1"


@dataclass(frozen=True)
class ImageNetLikeSpec:
    classes: int = 10
    train_per_class: int = 100
    val_per_class: int = 5
    long_side: int = 500  # ILSVRC's most common long side
    short_side: int = 375  # 4:3, jittered by +-short_jitter
    short_jitter: int = 40
    portrait_share: float = 0.2
    quality: int = 90
    texture: float = 50.0  # amplitude of the texture (0-255 units): the main file-size knob
    noise: float = 5.0  # std of per-pixel sensor noise
    seed: int = 2012

    def key(self) -> str:
        """Short hash of the spec: a cache folder per spec, so different specs never mix."""
        return hashlib.sha256(repr(sorted(asdict(self).items())).encode()).hexdigest()[:10]


def default_imagenet_like_dir(spec: ImageNetLikeSpec) -> Path:
    return cache_root() / f"{VERSION}-{spec.key()}"


def ensure_imagenet_like(
    root: Path | None = None, spec: ImageNetLikeSpec = ImageNetLikeSpec(), workers: int | None = None
) -> Path:
    """The dataset folder, generated first if needed (safe under many ranks and processes)."""
    root = Path(root) if root is not None else default_imagenet_like_dir(spec)
    count = spec.classes * (spec.train_per_class + spec.val_per_class)
    return ensure_generated(
        root, lambda folder: write_imagenet_like(folder, spec, workers), f"{count} ImageNet-like JPEGs"
    )


def class_name(label: int) -> str:
    return f"n{label:08d}"  # WordNet-id look-alike, sorted as ImageFolder sorts


def _jobs(root: Path, spec: ImageNetLikeSpec) -> list[tuple[Path, int, int, int]]:
    jobs = []
    for split_id, (split, count) in enumerate((("train", spec.train_per_class), ("val", spec.val_per_class))):
        for label in range(spec.classes):
            folder = root / split / class_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            jobs.extend((folder / f"{class_name(label)}_{i:05d}.JPEG", split_id, label, i) for i in range(count))
    return jobs


def _write_one(job: tuple[Path, int, int, int], spec: ImageNetLikeSpec) -> None:
    path, split_id, label, i = job
    path.write_bytes(encode_jpeg(draw_image(spec, split_id, label, i), spec.quality))


def write_imagenet_like(root: Path, spec: ImageNetLikeSpec, workers: int | None = None) -> None:
    jobs = _jobs(root, spec)
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        for job in jobs:
            _write_one(job, spec)
        return
    # fork, whatever the default (forkserver from Python 3.14): cheap, and a forked worker's parent
    # is this process, which end_with_the_parent watches (a fork server's worker ended at once).
    fork = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, fork, initializer=end_with_the_parent, initargs=(os.getpid(),)) as pool:
        list(pool.map(_write_one, jobs, [spec] * len(jobs), chunksize=16))


def image_size(spec: ImageNetLikeSpec, rng: np.random.Generator) -> tuple[int, int]:
    short = int(spec.short_side + rng.integers(-spec.short_jitter, spec.short_jitter + 1))
    if rng.random() < spec.portrait_share:
        return short, spec.long_side
    return spec.long_side, short


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cell: int, channels: int) -> np.ndarray:
    """Unit noise of wavelength about `cell` pixels: a coarse random grid upsampled bicubically."""
    gw, gh = max(2, w // cell + 2), max(2, h // cell + 2)
    grid = rng.normal(0.0, 1.0, size=(gh, gw, channels)).astype(np.float32)
    layers = [np.asarray(Image.fromarray(grid[..., c]).resize((w, h), Image.BICUBIC)) for c in range(channels)]
    return np.stack(layers, axis=-1)


@dataclass(frozen=True)
class NoiseBank:
    """Noise fields made once per process and spec; each image takes a crop at its own offset
    (and flips), which costs a slice instead of hundreds of thousands of random draws."""

    soft: np.ndarray  # large soft blobs (sky, walls, out-of-focus background)
    mask: np.ndarray  # where texture is strong and where the picture stays smooth
    texture: np.ndarray  # foliage, fabric, fur: wavelengths of about 8, 3 and 1 pixels
    grain: np.ndarray  # sensor noise, one value per pixel and channel

    @property
    def side(self) -> int:
        return self.soft.shape[0]


@functools.lru_cache(maxsize=2)
def build_noise_bank(seed: int, side: int) -> NoiseBank:
    rng = np.random.default_rng([seed, 7777])
    # Texture lives mostly in luminance (as in photographs): one field for all three channels,
    # plus a weak colour component.
    luma = _smooth_noise(rng, side, side, 8, 1) + _smooth_noise(rng, side, side, 3, 1)
    luma += 0.8 * _smooth_noise(rng, side, side, 1, 1)
    texture = luma + 0.25 * _smooth_noise(rng, side, side, 4, 3)
    mask = 0.25 + 0.75 * (0.5 + 0.5 * np.tanh(1.5 * _smooth_noise(rng, side, side, 70, 1)))
    return NoiseBank(
        soft=_smooth_noise(rng, side, side, 120, 3),
        mask=mask.astype(np.float32),
        texture=texture.astype(np.float32),
        grain=rng.normal(0.0, 1.0, size=(side, side, 3)).astype(np.float32),
    )


def _crop(field: np.ndarray, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    y = int(rng.integers(0, field.shape[0] - h + 1))
    x = int(rng.integers(0, field.shape[1] - w + 1))
    out = field[y : y + h, x : x + w]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1]
    return out


def draw_image(spec: ImageNetLikeSpec, split_id: int, label: int, index: int) -> Image.Image:
    """One photo-like picture; the same arguments always give the same pixels."""
    rng = np.random.default_rng([spec.seed, split_id, label, index])
    w, h = image_size(spec, rng)
    bank = build_noise_bank(spec.seed, 2 * spec.long_side)
    # Illumination: a linear gradient between two colours of the class's palette.
    palette = np.random.default_rng([spec.seed, 99, label]).uniform(40, 215, size=(4, 3)).astype(np.float32)
    a = palette[rng.integers(0, 4)]
    b = palette[rng.integers(0, 4)] + rng.normal(0, 25, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    xs = np.linspace(0, np.cos(angle), w, dtype=np.float32)[None, :]
    ys = np.linspace(0, np.sin(angle), h, dtype=np.float32)[:, None]
    t = ((xs + ys + 1.0) / 2.0)[..., None]
    img = a + (b - a) * t + 30.0 * _crop(bank.soft, rng, w, h)
    img = _draw_objects(img.clip(0, 255).astype(np.uint8), rng, palette).astype(np.float32)
    img += spec.texture * _crop(bank.mask, rng, w, h) * _crop(bank.texture, rng, w, h)
    img += spec.noise * _crop(bank.grain, rng, w, h)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def _draw_objects(base: np.ndarray, rng: np.random.Generator, palette: np.ndarray) -> np.ndarray:
    """Shapes with hard, partly blurred edges and their own shading: the edges JPEG pays for."""
    img = Image.fromarray(base)
    h, w = base.shape[:2]
    for _ in range(int(rng.integers(4, 12))):
        r = rng.uniform(0.05, 0.35) * min(w, h)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        x0, y0 = int(max(0, cx - r - 8)), int(max(0, cy - r - 8))  # the object's box, blur margin included
        x1, y1 = int(min(w, cx + r + 8)), int(min(h, cy + r + 8))
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        bw, bh = x1 - x0, y1 - y0
        mask = Image.new("L", (bw, bh), 0)
        draw = ImageDraw.Draw(mask)
        cx, cy = cx - x0, cy - y0
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r), fill=255)
        elif kind == 1:
            corners = int(rng.integers(3, 8))
            radii = r * rng.uniform(0.6, 1.0, corners)
            angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(corners) / corners
            draw.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=255)
        else:
            draw.rectangle((cx - r, cy - r / 2, cx + r, cy + r / 2), fill=255)
        if rng.random() < 0.5:
            mask = mask.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 4.0)))
        colour = palette[rng.integers(0, 4)] + rng.normal(0, 30, 3).astype(np.float32)
        shade = np.linspace(rng.uniform(0.6, 1.0), rng.uniform(0.9, 1.3), bh, dtype=np.float32)[:, None, None]
        fill = np.ascontiguousarray(np.broadcast_to((colour * shade).clip(0, 255).astype(np.uint8), (bh, bw, 3)))
        img.paste(Image.fromarray(fill), (x0, y0), mask)
    return np.asarray(img)


def measure_mean_kb(spec: ImageNetLikeSpec, samples: int = 16) -> float:
    """Mean encoded size (KB = 1000 bytes) of `samples` training images, without writing files."""
    sizes = [
        len(encode_jpeg(draw_image(spec, 0, i % spec.classes, i // spec.classes), spec.quality)) for i in range(samples)
    ]
    return float(np.mean(sizes)) / 1000.0
