"""One image file against what the decoders need: the check behind `launch/scan.py`, and the
explanation of a decoder failure that names the file.

DALI cannot drop a bad sample from a batch: on the CPU decoder an empty, truncated or non-image
file stops the pipeline ("Critical error in pipeline"), and only some of its messages name the
file. PNG data named .JPEG, CMYK and grayscale JPEGs decode on DALI's CPU decoder; GIF and AVIF
data (whatever the file's name) and TIFFs of some sample layouts do not (checked with DALI 2.4:
1-bit without a BitsPerSample tag, as PIL writes them uncompressed; 2- or 4-bit, signed, 32-bit
integer samples), though PIL, and so the torchvision pipeline, reads them all. Tools that trust
the extension, or handle CMYK/YCCK differently, disagree on the others. All of these are reported
as fixable: the scanner can convert them to RGB JPEG. Floating-point pixels (PIL's mode "F") are
not: whether 1.0 or 255 means white is written nowhere, DALI stretches them and PIL clips them.
ILSVRC-2012's training set holds one PNG named .JPEG (n02105855_2933.JPEG) and 22 CMYK JPEGs.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import stat
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, TiffImagePlugin

from pipelines.index import DataError, is_utf8, name_problem, printable
from pipelines.outputs import write_bytes_atomic

Item = TypeVar("Item")
Stopping = TypeVar("Stopping", bound=RuntimeError)  # an error whose constructor takes its message

# kind -> what it means, for one file and for several (the scan's summary counts them); the
# fixable ones decode after conversion to RGB JPEG.
KINDS = {
    "empty": ("empty file", "empty files"),
    "unreadable": ("unreadable file", "unreadable files"),
    "not_image": ("file that is not an image", "files that are not images"),
    "wrong_format": (
        "image DALI cannot decode, or under another format's name",
        "images DALI cannot decode, or under another format's name",
    ),
    "truncated": ("truncated or corrupt image", "truncated or corrupt images"),
    "dimensions": ("image of absurd dimensions", "images of absurd dimensions"),
    "cmyk": ("CMYK image", "CMYK images"),
    "grayscale": ("grayscale image", "grayscale images"),
    "float_pixels": ("image of floating-point pixels", "images of floating-point pixels"),
    "bad_name": (
        "file name not valid UTF-8 or holding a line break",
        "file names not valid UTF-8 or holding a line break",
    ),
}
FIXABLE = frozenset({"wrong_format", "cmyk", "grayscale"})
JPEG_SUFFIXES = (".jpg", ".jpeg")
# The formats (as sniff_format names them) that DALI's image decoders read.
DALI_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "JPEG2000", "WEBP", "PNM"})
# Formats PIL may identify where sniff_format finds none: only those with a signature of their own
# (PIL's TGA, for one, has none and would take some random data for an image).
PIL_ONLY_FORMATS = ("AVIF", "HEIF", "ICO", "PSD", "QOI", "DDS", "ICNS")

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
    if head[4:8] == b"ftyp":  # ISO media: HEIC (without a PIL plugin for it), MP4, ...
        brand = head[8:12].decode("ascii", "replace").strip()
        return f"ISO media data (brand {brand!r}: a HEIF image or a video, which no pipeline decodes)"
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
    fmt = sniff_format(head) or _identified_by_pil(path)
    if fmt is None:
        return Finding(path, "not_image", _describe_non_image(head))
    return _check_image(path, fmt, limits)


def _identified_by_pil(path: str) -> str | None:
    """The format of data whose first bytes are none that sniff_format knows, where PIL tells it
    from a signature (AVIF, ICO, ...): DALI decodes none of these, but PIL does, so the scanner
    can convert the file instead of calling it "unknown data"."""
    Image.init()  # registers PIL's plugins (once): Image.OPEN lists the formats this PIL reads
    formats = [f for f in PIL_ONLY_FORMATS if f in Image.OPEN]  # HEIF only with the pillow-heif plugin
    try:
        with Image.open(path, formats=formats) as im:
            return im.format
    except PIL_READ_ERRORS:
        return None


def _check_image(path: str, fmt: str, limits: Limits) -> Finding | None:
    try:
        with Image.open(path) as im:
            w, h = im.size
            problem = _dimension_problem(w, h, limits)
            if problem:
                # Checked from the header, before decoding: a forged size must not allocate.
                return Finding(path, "dimensions", problem)
            mode = im.mode
            refused = _dali_refuses(im, fmt, Path(path).suffix)
            if im.format == "JPEG":
                im.draft(mode, (max(1, w // 8), max(1, h // 8)))  # still reads every byte
            im.load()
        broken = png_problem(path) if fmt == "PNG" else ""
        if broken:
            return Finding(path, "truncated", f"PNG data does not decode: {broken}")
    except Image.DecompressionBombError as exc:  # PIL refuses to open it at all
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "a size"
        return Finding(path, "dimensions", f"the header declares {size}, above {limits.max_pixels:,}")
    except (OSError, SyntaxError, ValueError) as exc:
        return Finding(path, "truncated", f"{fmt} data does not decode: {exc}")
    # Before the fixable kinds: a conversion cannot know the scale of these either.
    if mode == "F":
        return Finding(path, "float_pixels", FLOAT_PIXELS)
    if refused:
        return Finding(path, "wrong_format", refused)
    if path.lower().endswith(JPEG_SUFFIXES) and fmt != "JPEG":
        return Finding(path, "wrong_format", f"{fmt} data in a file named {Path(path).suffix}")
    if mode == "CMYK":
        return Finding(path, "cmyk", f"CMYK {fmt} (4 channels)")  # a TIFF too: DALI decodes it, warning each time
    if mode in ("L", "LA", "1") or mode in _WIDE_GRAY_MODES:
        return Finding(path, "grayscale", f"grayscale ({mode}), one channel")
    return None


FLOAT_PIXELS = (
    "floating-point pixels (PIL mode F): their scale (1.0 or 255 for white) is written nowhere, so no pipeline "
    "can decode them as meant (DALI stretches them, PIL clips them)"
)


def _dali_refuses(im: Image.Image, fmt: str, suffix: str) -> str:
    """Why DALI's decoder fails on an image PIL has opened (its header read), "" when it does not:
    a format it has no decoder for, a TIFF sample layout its TIFF decoder rejects, or a TIFF
    whose colours it gets wrong."""
    if fmt not in DALI_FORMATS:
        return f"{fmt} data in a file named {suffix or 'without extension'}, which DALI cannot decode"
    if not isinstance(im, TiffImagePlugin.TiffImageFile):
        return ""
    lab = _TIFF_LAB.get(im.tag_v2.get(TiffImagePlugin.PHOTOMETRIC_INTERPRETATION))
    if lab:
        return f"TIFF of {lab} colour, which DALI's TIFF decoder decodes as if it were RGB"
    layout = _tiff_layout_refused(im)
    return f"{layout}, which DALI's TIFF decoder refuses" if layout else ""


# PNG's colour types -> samples per pixel (grey, RGB, palette, grey + alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7's passes: first column, first row, column step, row step.
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_problem(path: str) -> str:
    """Why a PNG that PIL decodes is damaged for DALI's decoder, "" when it is whole. PIL's load
    neither checks the chunks' CRCs nor looks for IEND, the zlib stream's end (its Adler-32) or
    whether the stream holds every row (it fills missing rows with black); DALI stops on each,
    mostly without naming the file. So: every chunk whole up to IEND, the CRCs of those libpng
    checks (IHDR, PLTE, IDAT: a bad one of an ancillary chunk, or of IEND, decodes), and the
    image data one complete zlib stream of at least the size the header declares. Read a chunk
    at a time and inflated in pieces, only counted: a large PNG costs no copy of its pixels."""
    with open(path, "rb") as f:
        f.seek(8)
        header, stream, size = None, zlib.decompressobj(), 0
        while True:
            head = f.read(8)
            if len(head) < 8:
                return "the file ends before its IEND chunk (truncated)"
            length, kind = struct.unpack(">I4s", head)
            name = kind.decode("latin-1")
            body, crc = f.read(length), f.read(4)
            if len(body) < length or len(crc) < 4:
                return f"its {name} chunk is cut short (truncated)"
            if kind in _PNG_CHECKED_CRC and zlib.crc32(body, zlib.crc32(kind)) != int.from_bytes(crc, "big"):
                return f"its {name} chunk's checksum (CRC) does not match: the data is damaged"
            if kind == b"IHDR":
                if length != 13:
                    return f"its IHDR chunk holds {length} bytes, not 13"
                header = struct.unpack(">IIBBBBB", body)
            elif kind == b"IDAT":
                try:
                    size += _inflated_size(stream, body)
                except zlib.error as exc:
                    return f"its image data does not decompress ({exc})"
            elif kind == b"IEND":
                break
    if header is None or not size:
        return "it has no IHDR or no image data"
    if not stream.eof:
        return "its image data stream ends early (no end of stream or checksum)"
    width, height, depth, color, _compression, _filter, interlace = header
    expected = _png_raw_size(width, height, depth, color, interlace)
    if size < expected:
        return f"its image data holds {size:,} of the {expected:,} bytes its {width}x{height} header declares"
    return ""


# The chunks whose CRC libpng (under DALI's decoder) checks before it decodes the image.
_PNG_CHECKED_CRC = (b"IHDR", b"PLTE", b"IDAT")


def _inflated_size(stream: zlib._Decompress, data: bytes) -> int:
    """The bytes `data` inflates to in `stream`, a megabyte at a time."""
    total = 0
    while data:
        total += len(stream.decompress(data, 1 << 20))
        data = stream.unconsumed_tail
    return total


def _png_raw_size(width: int, height: int, depth: int, color: int, interlace: int) -> int:
    """Bytes of a PNG's decompressed image data: each row's filter byte and samples, per pass."""
    bits = depth * _PNG_CHANNELS.get(color, 4)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        columns, rows = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if columns > 0 and rows > 0:
            total += rows * (1 + (columns * bits + 7) // 8)
    return total


def _tiff_layout_refused(im: TiffImagePlugin.TiffImageFile) -> str:
    """The TIFF sample layouts DALI 2.4's CPU decoder failed on: no BitsPerSample tag (which PIL
    leaves out of the 1-bit TIFFs it writes uncompressed: the default is 1, DALI wants the tag),
    signed integers, integers of other than 1, 8 or 16 bits, floats of other than 32 bits."""
    tags = im.tag_v2
    if TiffImagePlugin.BITSPERSAMPLE not in tags:
        return "1-bit TIFF without a BitsPerSample tag (PIL writes them so uncompressed)"
    bits = set(_tag_values(tags[TiffImagePlugin.BITSPERSAMPLE]))
    formats = set(_tag_values(tags.get(TiffImagePlugin.SAMPLEFORMAT, 1)))
    width = "/".join(str(b) for b in sorted(bits))
    if 2 in formats:
        return f"TIFF of signed {width}-bit integer samples"
    if 3 in formats:
        return "" if bits == {32} else f"TIFF of {width}-bit floating-point samples"
    return "" if bits <= {1, 8, 16} else f"TIFF of {width}-bit integer samples"


# PhotometricInterpretation values of L*a*b* colour. DALI 2.4's TIFF decoder refuses them and
# falls back to a decoder that takes the three channels for RGB (a mean error of 12-14 of 255
# against PIL's conversion); PIL converts them to RGB properly, so the scan's copies are right.
_TIFF_LAB = {8: "CIELab", 9: "ICCLab", 10: "ITULab"}


def _tag_values(value: object) -> tuple:
    return value if isinstance(value, tuple) else (value,)


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
    rounded), so that every pipeline and tool sees the same image. Floating-point pixels are
    refused (ValueError, which PIL_READ_ERRORS holds): convert("RGB") clips them, turning 0-1
    values black, and no scale is known to apply instead."""
    if im.mode == "F":
        raise ValueError(FLOAT_PIXELS)
    if im.mode in _WIDE_GRAY_MODES:
        wide = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def convert_to_rgb_jpeg(src: str | Path, dst: str | Path, quality: int = 95) -> None:
    """Write an RGB JPEG of `src` (PNG, CMYK or grayscale) to `dst`, atomically: a scan run
    again rewrites its copies while the earlier lists still name them, so a scan stopped
    mid-write must leave the earlier copy whole."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    encoded = io.BytesIO()
    with Image.open(src) as im:
        as_rgb(im).save(encoded, "JPEG", quality=quality)
    write_bytes_atomic(Path(dst), encoded.getvalue())


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


# peek_image_shape first: where the header check fails, DALI's "Error in CPU operator ..." line is
# the one to quote, not the pipeline's source line below it that names the decoder.
_DECODER_ERROR = re.compile(
    r"peek_image_shape|decoders|readers\.file|nvImageCodec|Failed to decode|File mapping failed"
)


def explain_decode_failure(message: str, files: list[str], sniff_limit: int = 200_000) -> DataError | None:
    """A DataError naming the bad file behind a DALI decoder failure; None when `message` is not
    about decoding or reading a file.

    DALI names the file for data truncated after its header ("Failed to decode sample #i : PATH")
    and empty files ("File mapping failed: PATH"), not for data it cannot identify or a header cut
    short ("nvImageCodec failure"), nor for some TIFF sample layouts it refuses: then the files
    are checked for leading bytes of no format DALI decodes (16 bytes a file, for up to
    LEADING_BYTES_SECONDS: the commonest damage, a web page or an empty download saved as .JPEG,
    is found wherever it lies in ImageNet's 1.28 million files on a local disk), then the first
    `sniff_limit` files for a header PIL cannot parse (about 50 us a file), for a JPEG that ends
    before its first scan (which PIL opens), for a TIFF layout DALI refuses, for a PNG cut short
    (its last bytes read; the whole file only where they are not its IEND chunk). The bounds keep
    a failing rank from reading a million files while the others wait for it in a collective.
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
    suspects = (
        _first_five(_for_at_most(files, LEADING_BYTES_SECONDS), _unrecognised)
        or _first_five(candidates, _header_unreadable)
        or _first_five(candidates, _jpeg_without_scan)
        or _first_five(candidates, _tiff_refused)
        or _first_five(candidates, _png_cut_short)
    )
    if suspects:
        return DataError(
            f"DALI could not read an image ({dali_line}) and did not name the file; these files hold no image "
            f"data it can decode: {_with_reasons(suspects, dali_line)}. {how_to_exclude(suspects[0])}"
        )
    return DataError(
        f"DALI could not read an image and did not name the file ({dali_line}). "
        + how_to_exclude(files[0] if files else "")
    )


# The leading-bytes check's time on a failing rank, which the other ranks wait out in a collective
# (parallel.timeout_s): ImageNet's 1.28 M files take about 35 s on a local disk, minutes on a
# network file system (0.3-1 ms an open).
LEADING_BYTES_SECONDS = 90.0


def _for_at_most(items: list[str], seconds: float) -> Iterator[str]:
    """`items` until `seconds` have passed."""
    end = time.monotonic() + seconds
    for item in items:
        if time.monotonic() > end:
            return
        yield item


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
    return sniff_format(head) not in DALI_FORMATS


def _png_cut_short(path: str) -> bool:
    """True for a PNG that does not end with its IEND chunk and fails png_problem: DALI's message
    names no file for a PNG cut short (the other damage png_problem finds, it names). The end is
    read first (about as cheap as a header), so that the whole-file check runs on few files."""
    try:
        with open(path, "rb") as f:
            if sniff_format(f.read(8)) != "PNG":
                return False
            f.seek(-12, os.SEEK_END)
            if f.read(12)[4:8] == b"IEND":
                return False
        return bool(png_problem(path))
    except OSError:  # shorter than 12 bytes (a bad seek), or unreadable
        return True


def _jpeg_without_scan(path: str) -> bool:
    """True for a JPEG that ends before its first scan (SOS): PIL opens it, as it reads the header
    only as far as the frame (SOF), and no decoder can decode it. The markers are walked by their
    lengths, so only the header's few KB are read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if f.read(2) != b"\xff\xd8":
                return False
            while True:
                marker = f.read(2)
                if len(marker) < 2:
                    return True
                if marker[0] != 0xFF:
                    return False  # no marker where one must be: damage of another kind
                if marker[1] == 0xDA:
                    return False  # a scan begins: the header is whole
                if marker[1] == 0xFF:  # a fill byte: the marker's code follows
                    f.seek(-1, os.SEEK_CUR)
                    continue
                if marker[1] in _STANDALONE_MARKERS:
                    continue
                length = f.read(2)
                if len(length) < 2:
                    return True
                f.seek(int.from_bytes(length, "big") - 2, os.SEEK_CUR)
                if f.tell() > size:
                    return True
    except OSError:
        return False


# JPEG markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xDA)})


def _tiff_refused(path: str) -> bool:
    """True for a TIFF whose sample layout DALI refuses (read from the header only)."""
    try:
        with open(path, "rb") as f:
            if sniff_format(f.read(4)) != "TIFF":
                return False  # most files: no need to parse the header
        with Image.open(path) as im:
            return isinstance(im, TiffImagePlugin.TiffImageFile) and bool(_tiff_layout_refused(im))
    except PIL_READ_ERRORS:  # OSError among them
        return False


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
