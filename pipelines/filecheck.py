"""One image file against what the decoders need: the check behind `launch/scan.py`, and the
explanation of a decoder failure that names the file.

DALI cannot drop a bad sample from a batch: on the CPU decoder an empty, truncated or non-image
file stops the pipeline ("Critical error in pipeline"), and only some of its messages name the
file. PNG data named .JPEG, CMYK and grayscale JPEGs decode on DALI's CPU decoder, GIF data
named .JPEG does not; tools that trust the extension, or handle CMYK/YCCK differently, disagree
on the others, so they are reported as fixable (the scanner can convert them to RGB JPEG).
ILSVRC-2012's training set holds one PNG named .JPEG (n02105855_2933.JPEG) and 22 CMYK JPEGs.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from pipelines.index import DataError, is_utf8, name_problem, printable

Item = TypeVar("Item")
Stopping = TypeVar("Stopping", bound=RuntimeError)  # an error whose constructor takes its message

# kind -> what it means; the fixable ones decode after conversion to RGB JPEG.
KINDS = {
    "empty": "zero bytes",
    "unreadable": "cannot be read",
    "not_image": "not an image",
    "wrong_format": "another image format under a JPEG name",
    "truncated": "truncated or corrupt image data",
    "dimensions": "absurd dimensions",
    "cmyk": "CMYK JPEG",
    "grayscale": "grayscale image",
    "bad_name": "file name not valid UTF-8 or holding a line break",
}
FIXABLE = frozenset({"wrong_format", "cmyk", "grayscale"})
JPEG_SUFFIXES = (".jpg", ".jpeg")

# Leading bytes of the formats a decoder might meet; the first match names the format.
MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"\xffO\xffQ", "JPEG2000"),
)


@dataclass(frozen=True)
class Limits:
    """What counts as absurd dimensions. A side below min_side, above max_side, an aspect ratio
    beyond max_aspect or more than max_pixels pixels (the decoder allocates all of them before
    the resize) is reported."""

    min_side: int = 10
    max_side: int = 20000
    max_aspect: float = 25.0
    max_pixels: int = 150_000_000


@dataclass(frozen=True)
class Finding:
    path: str
    kind: str  # a key of KINDS
    detail: str

    @property
    def fixable(self) -> bool:
        return self.kind in FIXABLE


def sniff_format(head: bytes) -> str | None:
    """The image format from the first bytes, or None when it is none of those decoders read."""
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"123456":
        return "PNM"
    return None


def _describe_non_image(head: bytes) -> str:
    text = head[:64].lstrip()
    if text[:1] == b"<":
        return "HTML/XML text, not image data"
    if text and all(32 <= b < 127 or b in (9, 10, 13) for b in text):
        return "plain text, not image data"
    return f"unknown data (starts with {head[:8].hex(' ')})"


def check_file(path: str | Path, limits: Limits = Limits()) -> Finding | None:
    """None when the file decodes to a usable RGB image, else the first problem found."""
    path = str(path)
    # A byte that is not UTF-8 anywhere in the path stops DALI; a line break matters only in the
    # file's own name, the part of the path that a list line holds (class folders are scan's).
    problem = name_problem(path) if not is_utf8(path) else name_problem(os.path.basename(path))
    if problem:
        return Finding(printable(path), "bad_name", f"{problem}: rename it")
    try:
        st = os.stat(path)
    except OSError as exc:
        return Finding(path, "unreadable", f"cannot stat: {exc.strerror}")
    if st.st_size == 0:
        return Finding(path, "empty", "zero bytes")
    if not st.st_mode & (stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH):
        # Root reads it anyway, the training user will not.
        return Finding(path, "unreadable", f"no read permission for anyone (mode {stat.S_IMODE(st.st_mode):03o})")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        return Finding(path, "unreadable", f"cannot open: {exc.strerror}")
    fmt = sniff_format(head)
    if fmt is None:
        return Finding(path, "not_image", _describe_non_image(head))
    return _check_image(path, fmt, limits)


def _check_image(path: str, fmt: str, limits: Limits) -> Finding | None:
    try:
        with Image.open(path) as im:
            w, h = im.size
            problem = _dimension_problem(w, h, limits)
            if problem:
                # Checked from the header, before decoding: a forged size must not allocate.
                return Finding(path, "dimensions", problem)
            mode = im.mode
            if im.format == "JPEG":
                im.draft(mode, (max(1, w // 8), max(1, h // 8)))  # still reads every byte
            im.load()
    except Image.DecompressionBombError as exc:  # PIL refuses to open it at all
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "a size"
        return Finding(path, "dimensions", f"the header declares {size}, above {limits.max_pixels:,}")
    except (OSError, SyntaxError, ValueError) as exc:
        return Finding(path, "truncated", f"{fmt} data does not decode: {exc}")
    if path.lower().endswith(JPEG_SUFFIXES) and fmt != "JPEG":
        return Finding(path, "wrong_format", f"{fmt} data in a file named {Path(path).suffix}")
    if mode == "CMYK":
        return Finding(path, "cmyk", "CMYK JPEG (4 channels)")
    if mode in ("L", "LA", "1") or mode in _WIDE_GRAY_MODES:
        return Finding(path, "grayscale", f"grayscale ({mode}), one channel")
    return None


def _dimension_problem(w: int, h: int, limits: Limits) -> str:
    short, long = min(w, h), max(w, h)
    if short < limits.min_side:
        return f"{w}x{h}: a side below {limits.min_side} pixels"
    if long > limits.max_side:
        return f"{w}x{h}: a side above {limits.max_side} pixels"
    if long / short > limits.max_aspect:
        return f"{w}x{h}: aspect ratio {long / short:.0f}:1 above {limits.max_aspect:g}:1"
    if w * h > limits.max_pixels:
        return f"{w}x{h}: {w * h:,} pixels, above {limits.max_pixels:,}"
    return ""


# PIL's modes for grayscale wider than 8 bits (16-bit PNG and TIFF; "I" holds 32-bit integers).
_WIDE_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def as_rgb(im: Image.Image) -> Image.Image:
    """`im` as 8-bit RGB. PIL's own convert("RGB") clips 16-bit grayscale at 255, which turns
    almost every pixel white; this scales 0-65535 to 0-255 as DALI's decoder does (v / 257,
    rounded), so that every pipeline and tool sees the same image."""
    if im.mode in _WIDE_GRAY_MODES:
        wide = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def convert_to_rgb_jpeg(src: str | Path, dst: str | Path, quality: int = 95) -> None:
    """Write an RGB JPEG of `src` (PNG, CMYK or grayscale) to `dst`."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        as_rgb(im).save(dst, "JPEG", quality=quality)


# ---- a decoder failure while reading ----------------------------------------------------------
# What PIL raises for a file it cannot open or decode (DecompressionBombError: a header that
# declares more pixels than PIL agrees to allocate).
PIL_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_rgb(path: str) -> Image.Image:
    """The file decoded by PIL as RGB, or a DataError naming it, with PIL's reason and how to
    leave it out."""
    try:
        with Image.open(path) as img:
            return as_rgb(img)
    except PIL_READ_ERRORS as exc:
        raise DataError(f"cannot decode {path} ({exc}). {how_to_exclude(path)}") from exc


def without_worker_traceback(batches: Iterable[Item]) -> Iterator[Item]:
    """`batches` (from a DataLoader) as they come; a DataError a worker raised comes out as the
    worker's own message, without the worker's traceback that DataLoader puts into the message
    it raises again in the main process."""
    try:
        yield from batches
    except DataError as exc:
        marker = f"{DataError.__module__}.{DataError.__qualname__}: "
        text = str(exc)
        if marker not in text:
            raise
        raise DataError(text.rsplit(marker, 1)[-1].strip()) from None


def stopped_by(exc: Stopping, what_stopped: str) -> Stopping:
    """`exc` (a DataError, or another rank's loader failure) with a last sentence saying what it
    stopped: the loaders do not know who reads them (training, evaluation, a benchmark), their
    callers do."""
    return type(exc)(f"{str(exc).rstrip('.')}. {what_stopped}")


_DECODER_ERROR = re.compile(r"decoders|readers\.file|nvImageCodec|Failed to decode|File mapping failed")


def explain_decode_failure(message: str, files: list[str], sniff_limit: int = 200_000) -> DataError | None:
    """A DataError naming the bad file behind a DALI decoder failure; None when `message` is not
    about decoding or reading a file.

    DALI names the file for data truncated after its header ("Failed to decode sample #i : PATH")
    and empty files ("File mapping failed: PATH"), not for data it cannot identify or a header cut
    short ("nvImageCodec failure"): then the files (up to `sniff_limit` of them) are checked for
    leading bytes of no image format, then for a header PIL cannot parse (about 50 us a file).
    """
    if not _DECODER_ERROR.search(message):
        return None
    cause = dali_cause(message)
    if _NOT_THE_DATA.search(cause):
        return None  # the device failed, not a file: DALI's own error says more than a scan would
    bad = _named_files(message, set(files))
    dali_line = next((line.strip() for line in message.splitlines() if _DECODER_ERROR.search(line)), "")
    if cause and cause not in dali_line:
        dali_line = f"{dali_line.rstrip(',')}: {cause}" if dali_line else cause
    if bad:
        return DataError(f"cannot decode {_with_reasons(bad, dali_line)}. {how_to_exclude(bad[0])}")
    candidates = files[:sniff_limit]
    suspects = _first_five(candidates, _unrecognised) or _first_five(candidates, _header_unreadable)
    if suspects:
        return DataError(
            f"the image decoder failed ({dali_line}) without naming the file; these files hold no image "
            f"data it can decode: {_with_reasons(suspects, dali_line)}. {how_to_exclude(suspects[0])}"
        )
    return DataError(
        f"the image decoder failed on a file it does not name ({dali_line}). "
        + how_to_exclude(files[0] if files else "")
    )


# Failures inside a decoder operator that are about the machine, not the file being decoded.
_NOT_THE_DATA = re.compile(r"CUDA allocation|out of memory|cudaError|CUDA error|CUDA driver", re.IGNORECASE)


def dali_cause(message: str) -> str:
    """The first line after DALI's "encountered:": what actually went wrong in the operator."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        if line.strip().endswith("encountered:"):
            return next((rest.strip() for rest in lines[i + 1 :] if rest.strip()), "")
    return ""


def _named_files(message: str, known: set[str]) -> list[str]:
    """The files of `known` that `message` names, as the text between two of DALI's separators
    (" : ", ": ") or after one up to the end of a line: a path may hold a separator itself."""
    found = []
    for line in message.splitlines():
        found += [part.strip() for part in re.split(r" : |: ", line)]
        found += [line[sep.end() :].strip() for sep in re.finditer(r" : |: ", line)]
    return list(dict.fromkeys(p for p in found if p in known))


def _with_reasons(paths: list[str], fallback: str) -> str:
    parts = []
    for path in paths:
        finding = check_file(path)
        parts.append(f"{path} ({finding.detail if finding else fallback})")
    return "; ".join(parts)


def _first_five(paths: list[str], is_bad) -> list[str]:
    return list(itertools.islice((path for path in paths if is_bad(path)), 5))


def _header_unreadable(path: str) -> bool:
    """True for a file whose header PIL cannot parse (Image.open reads no further than it)."""
    try:
        with Image.open(path):
            return False
    except Image.DecompressionBombError:
        return False  # a parsable header, only large: not what stopped the decoder
    except PIL_READ_ERRORS:
        return True


def _unrecognised(path: str) -> bool:
    """True for a file DALI's decoders cannot identify: no data, or none of their formats."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return True
    return sniff_format(head) in (None, "GIF")


def how_to_exclude(path: str) -> str:
    # data.root/<split>/<class>/<file>: the scanner takes data.root
    parts = Path(path).parents
    root = str(parts[2]) if len(parts) > 2 else "DATA_ROOT"
    if path and not os.path.lexists(path):
        # Not a bad file to exclude: the list (or the folder index made at start) is out of date.
        return (
            f"The file does not exist: it was removed or renamed after it was listed (by a file list, or the folder's "
            f"index at the start); rewrite the lists with `python launch/scan.py {root} --out SCAN_DIR`, or start "
            "again from the folder"
        )
    return (
        f"To exclude bad files, run `python launch/scan.py {root} --out SCAN_DIR` and train with "
        "data.train_files=SCAN_DIR/train.txt data.val_files=SCAN_DIR/val.txt "
        "(launch/evaluate.py: --files SCAN_DIR/val.txt)"
    )
