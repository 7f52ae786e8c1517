"""PCA lighting augmentation (Krizhevsky et al. 2012, section 4.1) inside the DALI graph.

The paper adds to every RGB pixel of a training image the same vector

    [p1, p2, p3] [a1 * l1, a2 * l2, a3 * l3]^T,    a_i ~ N(0, 0.1) drawn each time the image is used,

where p_i and l_i are the eigenvectors and eigenvalues of the 3x3 covariance of the RGB pixel
values of the training set. The size of that shift depends on the pixel scale the covariance was
taken in (l grows with the square of the scale, the pixels only linearly), which the paper does not
state. We follow the convention of fb.resnet.torch, whose ImageNet values nearly every PyTorch
reimplementation copies: pixels in [0, 1]. With statistics kept in 0-255 units (what
`compute_lighting_stats` measures and the JSON stores), the shift in 0-255 units is therefore

    shift = 255 * P (a * l / 255^2) = P (a * l / 255),

so component j moves every pixel by a_j * l_j / 255 along p_j: with ImageNet's statistics and
a ~ N(0, 0.1) the first component's shift has a standard deviation of about 5.5 (of 255). Like the
paper and fb.resnet.torch, the lit pixels are not clipped to [0, 255].

The shift is drawn with `fn.random.normal` and built with DALI arithmetic from CPU argument
nodes, so it runs in CPU and GPU graphs alike; `build_lit_mean` folds it into the mean that
`fn.crop_mirror_normalize` subtracts (x + shift - mean = x - (mean - shift)), so lighting costs no
extra pass over the pixels.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.filecheck import PIL_READ_ERRORS, as_rgb
from pipelines.index import DataError
from pipelines.outputs import write_text_atomic

log = logging.getLogger("alexnet")

STATS_FILE = "pca_lighting.json"  # default place: <data root>/pca_lighting.json
FORMAT = "alexnet-dist/pca-lighting/1"
PIXEL_SCALE = 255.0  # statistics are kept for pixel values in 0-255


class LightingStatsError(DataError):
    """A lighting statistics file is missing or malformed; the message names the file and key."""


@dataclass(frozen=True)
class LightingStats:
    """Eigen-decomposition of the RGB covariance of training pixels, in 0-255 units."""

    eigval: tuple[float, float, float]  # covariance eigenvalues, descending (0-255 units squared)
    eigvec: tuple[tuple[float, float, float], ...]  # rows R, G, B; column j belongs to eigval[j]
    mean: tuple[float, float, float] | None = None  # mean pixel of the sample (None: not measured)
    num_images: int = 0
    num_pixels: int = 0
    source: str = ""  # where the numbers come from

    def component_std(self, alpha_std: float) -> np.ndarray:
        """Standard deviation of the shift along each eigenvector, in 0-255 pixel units."""
        return alpha_std * np.asarray(self.eigval, dtype=np.float64) / PIXEL_SCALE

    def shift_covariance(self, alpha_std: float) -> np.ndarray:
        """Covariance of the per-image RGB shift: P diag(component_std^2) P^T (0-255 units)."""
        p = np.asarray(self.eigvec, dtype=np.float64)
        return p @ np.diag(self.component_std(alpha_std) ** 2) @ p.T


# fb.resnet.torch (Facebook, BSD licence), datasets/imagenet.lua, table `pca`: eigenvalues of the
# ImageNet RGB covariance for pixels in [0, 1] and its eigenvectors (columns). The same numbers
# are in most PyTorch ImageNet "Lighting" transforms. Not measured by this project.
_FB_EIGVAL_01 = (0.2175, 0.0188, 0.0045)
_FB_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
IMAGENET_DEFAULT = LightingStats(
    eigval=tuple(v * PIXEL_SCALE**2 for v in _FB_EIGVAL_01),  # type: ignore[arg-type]
    eigvec=_FB_EIGVEC,
    source="ImageNet defaults of fb.resnet.torch (eigval [0.2175, 0.0188, 0.0045] for 0-1 pixels)",
)


@dataclass(frozen=True)
class Lighting:
    """What the training graph needs: the statistics and the std of a (section 4.1: 0.1)."""

    alpha_std: float
    stats: LightingStats


# ---- the DALI side -----------------------------------------------------------------------------
def _own_seed() -> dict[str, int]:
    """A seed derived from the pipeline's. Without one, DALI hands the lighting op the next seed
    of the pipeline's sequence and shifts the seeds (so the draws) of the crop and mirror ops
    visited after it; with one, turning lighting on leaves every other augmentation as it was."""
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline.current()
    seed = getattr(pipe, "seed", None) if pipe is not None else None
    if seed is None or seed < 0:
        return {}
    return {"seed": (int(seed) * 2_654_435_761 + 0x5EED) % (2**31)}


def build_lighting_shift(lighting: Lighting):
    """Per-sample RGB shift (a float32 [3] DataNode on the CPU, 0-255 units): P (a * l / 255)."""
    from nvidia.dali import fn

    alpha = fn.random.normal(shape=[3], stddev=float(lighting.alpha_std), **_own_seed())  # one draw per image
    scale = lighting.stats.eigval
    p = lighting.stats.eigvec
    weighted = [alpha[j] * float(scale[j] / PIXEL_SCALE) for j in range(3)]
    rows = [
        weighted[0] * float(p[c][0]) + weighted[1] * float(p[c][1]) + weighted[2] * float(p[c][2]) for c in range(3)
    ]
    return fn.stack(*rows)


def build_lit_mean(mean: tuple[float, ...] | list[float], lighting: Lighting, shift=None):
    """The per-sample mean for `fn.crop_mirror_normalize` that adds the lighting shift to the
    pixels before normalizing: (x + shift - mean) / std = (x - (mean - shift)) / std."""
    from nvidia.dali import types

    shift = build_lighting_shift(lighting) if shift is None else shift
    return types.Constant(np.asarray(mean, dtype=np.float32)) - shift


def apply_lighting(images, lighting: Lighting, layout: str = "HWC", shift=None):
    """Lit float32 images: `images` (uint8 or float, HWC or CHW, CPU or GPU) plus the shift."""
    from nvidia.dali import fn

    shift = build_lighting_shift(lighting) if shift is None else shift
    if layout == "CHW":
        shift = fn.reshape(shift, shape=[3, 1, 1])
    elif layout != "HWC":
        raise ValueError(f"apply_lighting: layout must be HWC or CHW, got {layout!r}")
    if getattr(images, "device", "cpu") == "gpu":
        shift = shift.gpu()
    return images + shift


# ---- measuring the statistics ------------------------------------------------------------------
@dataclass
class _Moments:
    """Running sums of pixels and their outer products (float64: exact enough for 1e10 pixels)."""

    total: np.ndarray
    outer: np.ndarray
    count: int = 0

    @classmethod
    def empty(cls) -> _Moments:
        return cls(np.zeros(3), np.zeros((3, 3)))

    def add(self, other: _Moments) -> None:
        self.total += other.total
        self.outer += other.outer
        self.count += other.count


def _image_moments(path: str, decode_size: int) -> _Moments:
    with Image.open(path) as img:
        # JPEG DCT scaling: decode at 1/2..1/8 size when that still covers decode_size. Pixel
        # statistics barely change and decoding gets several times faster.
        img.draft("RGB", (decode_size, decode_size))
        pixels = np.asarray(as_rgb(img), dtype=np.float64).reshape(-1, 3)
    return _Moments(pixels.sum(axis=0), pixels.T @ pixels, pixels.shape[0])


def stats_from_moments(moments: _Moments, num_images: int, source: str) -> LightingStats:
    if moments.count == 0:
        raise LightingStatsError(f"no pixels to measure lighting statistics from ({source})")
    mean = moments.total / moments.count
    cov = moments.outer / moments.count - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(cov)  # ascending
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    # Eigenvectors are defined up to sign (a ~ N(0, s) is symmetric); fix the sign so that the
    # largest component is positive, to make files comparable.
    for j in range(3):
        if vectors[np.argmax(np.abs(vectors[:, j])), j] < 0:
            vectors[:, j] = -vectors[:, j]
    return LightingStats(
        eigval=tuple(float(v) for v in values),  # type: ignore[arg-type]
        eigvec=tuple(tuple(float(x) for x in row) for row in vectors),
        mean=tuple(float(m) for m in mean),  # type: ignore[arg-type]
        num_images=num_images,
        num_pixels=int(moments.count),
        source=source,
    )


def compute_lighting_stats(
    files: list[str],
    num_images: int = 5000,
    seed: int = 0,
    decode_size: int = 256,
    workers: int = 4,
    progress: Callable[[int], Any] | None = None,
    source: str = "",
) -> LightingStats:
    """Covariance of the RGB values of every pixel of `num_images` files sampled without
    replacement (all files when there are fewer), 0-255 units. `progress(n)` is called after each
    image (a tqdm bar's `update`). Unreadable files are skipped with a warning naming them."""
    if not files:
        raise LightingStatsError(f"no image files to measure lighting statistics from ({source})")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(files), size=min(num_images, len(files)), replace=False).tolist())
    moments = _Moments.empty()
    used = 0

    def measure(path: str) -> _Moments | None:
        try:
            return _image_moments(path, decode_size)
        except PIL_READ_ERRORS as exc:  # a bomb-sized header too: a file scan.py would report
            log.warning("lighting statistics: skipping %s (%s)", path, exc)
            return None

    # PIL decodes without holding the GIL, so threads scale; map keeps file order, so the sums
    # (and the result) do not depend on the number of workers.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for result in pool.map(measure, [files[i] for i in chosen]):
            if result is not None:
                moments.add(result)
                used += 1
            if progress is not None:
                progress(1)
    if 0 < used < len(chosen):  # the lines above name each file; this says what the result rests on
        log.warning("lighting statistics: %d of the %d sampled files could not be read and were skipped (not "
                    "replaced by others); the statistics come from the other %d (launch/scan.py lists the bad files)",
                    len(chosen) - used, len(chosen), used)  # fmt: skip
    return stats_from_moments(moments, used, source)


# ---- storage -----------------------------------------------------------------------------------
def save_lighting_stats(stats: LightingStats, path: str | Path) -> Path:
    path = Path(path)
    doc = {"format": FORMAT, "pixel_units": "0-255", **asdict(stats)}
    doc["eigvec_layout"] = "rows R, G, B; column j is the eigenvector of eigval[j]"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")
    return path


# The top-level keys of every file save_lighting_stats has written (since the first format): what
# tells an earlier statistics file, which launch/lighting_stats.py may replace, from any other file.
SAVED_KEYS = frozenset({"format", "pixel_units", "eigvec_layout", *(f.name for f in fields(LightingStats))})


def load_lighting_stats(path: str | Path) -> LightingStats:
    """Read and check a statistics file; errors name the file and the key."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise LightingStatsError(f"cannot read lighting statistics {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise LightingStatsError(f"lighting statistics {path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LightingStatsError(f"lighting statistics {path}: key 'format' must be {FORMAT!r}")
    try:
        eigval = np.asarray(doc["eigval"], dtype=np.float64)
        eigvec = np.asarray(doc["eigvec"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise LightingStatsError(
            f"lighting statistics {path}: keys 'eigval' and 'eigvec' must hold numbers ({exc})"
        ) from exc
    if eigval.shape != (3,) or not np.all(np.isfinite(eigval)) or np.any(eigval < 0):
        raise LightingStatsError(f"lighting statistics {path}: key 'eigval' must be 3 finite values >= 0")
    if eigvec.shape != (3, 3) or not np.allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-3):
        raise LightingStatsError(
            f"lighting statistics {path}: key 'eigvec' must be a 3x3 matrix of orthonormal columns"
        )
    mean = doc.get("mean")
    return LightingStats(
        eigval=tuple(float(v) for v in eigval),  # type: ignore[arg-type]
        eigvec=tuple(tuple(float(x) for x in row) for row in eigvec),
        mean=tuple(float(m) for m in mean) if mean is not None else None,  # type: ignore[arg-type]
        num_images=int(doc.get("num_images", 0)),
        num_pixels=int(doc.get("num_pixels", 0)),
        source=str(doc.get("source", path)),
    )


def resolve_lighting_stats(configured: str, data_root: Path) -> LightingStats:
    """`data.lighting_stats`: a file, or "" for <data root>/pca_lighting.json when it exists and
    the ImageNet defaults (with a notice) when it does not."""
    if configured:
        return load_lighting_stats(Path(configured).expanduser())
    beside = data_root / STATS_FILE
    if beside.is_file():
        return load_lighting_stats(beside)
    log.info(
        "PCA lighting: no %s in %s, using the %s; measure your data's with `python launch/lighting_stats.py --data %s`",
        STATS_FILE,
        data_root,
        IMAGENET_DEFAULT.source,
        data_root,
    )
    return IMAGENET_DEFAULT


def describe(stats: LightingStats, alpha_std: float) -> str:
    comp = stats.component_std(alpha_std)
    spread = np.sqrt(np.diag(stats.shift_covariance(alpha_std)))
    return (
        f"eigenvalues {', '.join(f'{v:.1f}' for v in stats.eigval)} (0-255 units^2); with alpha std {alpha_std:g} "
        f"the shift along each eigenvector has std {', '.join(f'{c:.3f}' for c in comp)} and each of R, G, B "
        f"moves by std {', '.join(f'{s:.3f}' for s in spread)} (of 255)"
        + (f"; mean pixel (for data.mean) [{', '.join(f'{m:.2f}' for m in stats.mean)}]" if stats.mean else "")
    )


def with_lighting(normalize: dict[str, Any], lighting: Lighting | None) -> dict[str, Any]:
    """`fn.crop_mirror_normalize` arguments with the lit per-sample mean (unchanged without lighting)."""
    if lighting is None or lighting.alpha_std == 0.0:
        return normalize
    return {**normalize, "mean": build_lit_mean(normalize["mean"], lighting)}
