"""The built-in demo dataset: real JPEG files in ImageFolder layout, generated on first use.

Ten classes, each a shape or texture with its own hue range, drawn at a random position, size and
rotation on a noisy background, so a CNN has to look at the picture (not at a constant) to tell
them apart, and AlexNet learns them in a few CPU minutes. Generation is deterministic (fixed
seed), so every machine gets the same files; a file lock lets many ranks ask at once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipelines.generated import cache_root, encode_jpeg, ensure_generated

DEMO_VERSION = "demo-v1"
CLASSES = (
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "stripes_horizontal",
    "stripes_vertical",
    "checkerboard",
    "stripes_diagonal",
    "dots",
)


@dataclass(frozen=True)
class DemoSpec:
    train_per_class: int = 260
    val_per_class: int = 50
    min_side: int = 80
    max_side: int = 128
    quality: int = 90
    seed: int = 2012


# How to put the demo dataset elsewhere, for the error when it cannot be written.
DEMO_HINT = (
    "set ALEXNET_DEMO_DIR to a new or empty writable folder, or XDG_CACHE_HOME to a writable folder, "
    "or use your own data (data.root=, or --data for launch/benchmark.py)"
)


def default_demo_dir() -> Path:
    """ALEXNET_DEMO_DIR, or the cache's folder where it is unset or empty (an empty one named the
    current folder: a stray lock file there, and the current folder refused as not the dataset).
    A leading ~ is the home folder, as in data.root (quoted, it made a folder named "~" here)."""
    named = os.environ.get("ALEXNET_DEMO_DIR", "")
    return Path(named).expanduser() if named else cache_root() / DEMO_VERSION


def ensure_demo_dataset(root: Path | None = None, spec: DemoSpec = DemoSpec()) -> Path:
    """Return the demo dataset folder, generating it first if needed (safe under many ranks)."""
    root = Path(root) if root is not None else default_demo_dir()
    return ensure_generated(root, lambda folder: write_demo_dataset(folder, spec), "the demo dataset", DEMO_HINT)


def write_demo_dataset(root: Path, spec: DemoSpec) -> None:
    rng = np.random.default_rng(spec.seed)
    for split, count in (("train", spec.train_per_class), ("val", spec.val_per_class)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = draw_sample(label, rng, spec)
                # Encoded first, then written: PIL saving to a path ignores a short write (a
                # file-size limit, a quota), and a generation "succeeded" with cut files.
                (folder / f"{name}_{i:04d}.jpg").write_bytes(encode_jpeg(img, spec.quality))


def _hue_rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    h = (hue % 1.0) * 6
    c = value * saturation
    x = c * (1 - abs(h % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    m = value - c
    return tuple(int(255 * (v + m)) for v in rgb)  # type: ignore[return-value]


def draw_sample(label: int, rng: np.random.Generator, spec: DemoSpec) -> Image.Image:
    w, h = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, size=2))
    background = rng.normal(rng.uniform(60, 190), 18, size=(h, w, 3)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    hue = label / len(CLASSES) + rng.uniform(-0.03, 0.03)
    color = _hue_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
    side = min(w, h)
    size = rng.uniform(0.45, 0.75) * side
    cx = rng.uniform(size / 2, w - size / 2)
    cy = rng.uniform(size / 2, h - size / 2)
    box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    angle = rng.uniform(0, 2 * math.pi)
    name = CLASSES[label]
    if name.startswith("stripes"):
        _stripes(img, box, color, size, name.split("_")[1][0])
    else:
        _SHAPES[name](draw, box, color, angle, size)
    return img


def _polygon(draw, box, color, angle, corners):
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    r = (box[2] - box[0]) / 2
    points = [
        (cx + r * math.cos(angle + 2 * math.pi * k / corners), cy + r * math.sin(angle + 2 * math.pi * k / corners))
        for k in range(corners)
    ]
    draw.polygon(points, fill=color)


def _stripes(img, box, color, size, direction):
    """Stripes confined to the motif's box, drawn on a mask and pasted in one colour."""
    n = max(8, int(size))
    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    step = max(3, n // 6)
    for offset in range(-n, 2 * n, 2 * step):
        if direction == "h":
            draw.rectangle((0, offset, n, offset + step - 1), fill=255)
        elif direction == "v":
            draw.rectangle((offset, 0, offset + step - 1, n), fill=255)
        else:
            draw.polygon([(offset, 0), (offset + step, 0), (offset + step - n, n), (offset - n, n)], fill=255)
    img.paste(color, (int(box[0]), int(box[1])), mask)


def _checker(draw, box, color, angle, size):
    cells = 4
    cell = size / cells
    for i in range(cells):
        for j in range(cells):
            if (i + j) % 2 == 0:
                draw.rectangle(
                    (box[0] + i * cell, box[1] + j * cell, box[0] + (i + 1) * cell, box[1] + (j + 1) * cell), fill=color
                )


def _dots(draw, box, color, angle, size):
    r = size / 10
    for i in range(3):
        for j in range(3):
            x = box[0] + (i + 0.5) * size / 3
            y = box[1] + (j + 0.5) * size / 3
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)


def _cross(draw, box, color, angle, size):
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    t = size / 6
    draw.rectangle((box[0], cy - t, box[2], cy + t), fill=color)
    draw.rectangle((cx - t, box[1], cx + t, box[3]), fill=color)


_SHAPES = {
    "circle": lambda d, b, c, a, s: d.ellipse(b, fill=c),
    "square": lambda d, b, c, a, s: _polygon(d, b, c, a, 4),
    "triangle": lambda d, b, c, a, s: _polygon(d, b, c, a, 3),
    "cross": _cross,
    "ring": lambda d, b, c, a, s: d.ellipse(b, outline=c, width=max(3, int(s / 8))),
    "checkerboard": _checker,
    "dots": _dots,
}
