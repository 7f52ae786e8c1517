"""ILSVRC-2012 knowledge: human class names, and the validation set's ground truth and layout.

Class names: `alexnet/data/imagenet_classes.json` lists the 1000 classes in sorted-WordNet-id
order (the class index of an ImageFolder over train/<wnid>/) with torchvision's short English
names (BSD-3-Clause; they tell the two "crane" and two "maillot" synsets apart) and WordNet's
lemmas (taken from timm's synset files, Apache-2.0). The file says where each column comes from.

Validation layout: the official archive ILSVRC2012_img_val.tar holds 50,000 files in one folder
(ILSVRC2012_val_00000001.JPEG ...). Their labels come either from the devkit
(ILSVRC2012_devkit_t12.tar.gz: data/ILSVRC2012_validation_ground_truth.txt has one ILSVRC2012_ID
per line in file order, and data/meta.mat maps ILSVRC2012_ID -> WNID) or from Kaggle's
LOC_val_solution.csv (ImageId,PredictionString with the wnid as the first word).
`convert_val_folder` lays the files out as val/<wnid>/<file> so ImageFolder-style indexing works.
"""

from __future__ import annotations

import csv
import errno
import filecmp
import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from pipelines.outputs import copy_file_atomic, process_runs, staged_of, write_bytes_atomic

try:
    from lzma import LZMAError
except ImportError:  # pragma: no cover - a Python built without lzma opens no .xz at all
    LZMAError = tarfile.TarError  # type: ignore[misc,assignment]

WNID = re.compile(r"^n\d{8}$")
GROUND_TRUTH_TXT = "ILSVRC2012_validation_ground_truth.txt"
META_MAT = "meta.mat"
VAL_ID = re.compile(r"^ILSVRC2012_val_(\d{8})$", re.IGNORECASE)
Mode = Literal["symlink", "copy", "move"]
# What tarfile lets through from a damaged archive besides its own errors: the decompressors'
# (a cut gzip or xz stream raises EOFError, bad deflate data zlib.error, bad xz data LZMAError;
# a bad gzip CRC or bzip2 stream is an OSError without an errno, handled apart).
DAMAGED_TAR = (tarfile.TarError, EOFError, zlib.error, LZMAError)
ARCHIVE_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


class ImageNetLayoutError(RuntimeError):
    """A devkit, ground-truth file or validation folder is not what ILSVRC-2012 ships; the message
    names the file."""


class NotATarError(ImageNetLayoutError):
    """The file is no tar archive at all (a CSV, a text file): given in the wrong place, not
    damaged. `path` lets the command say which option takes what."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} is not a tar archive")
        self.path = path


# ---- tar archives ------------------------------------------------------------------------------
def _starts_as_archive(path: Path) -> bool:
    """Whether `path` begins as a tar (its ustar magic) or a compressed stream does: one that then
    fails to read is damaged or cut, not some other kind of file."""
    with path.open("rb") as f:
        head = f.read(tarfile.BLOCKSIZE)
    return head.startswith(ARCHIVE_MAGIC) or head[257:262] == b"ustar"


def _damaged(path: Path, exc: BaseException) -> ImageNetLayoutError:
    lines = str(exc).splitlines()  # tarfile's "could not be opened" lists every method it tried
    why = f" ({lines[0]})" if len(lines) == 1 else ""
    return ImageNetLayoutError(f"{path} is damaged or truncated{why}")


@contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """`path` as a tar; whatever fails while it is read, in the `with` block too, becomes one line
    naming it: not an archive, damaged or truncated, or unreadable (no permission, I/O error)."""
    try:
        with tarfile.open(path) as tar:
            yield tar
    except DAMAGED_TAR as exc:
        raise (_damaged(path, exc) if _starts_as_archive(path) else NotATarError(path)) from exc
    except OSError as exc:
        if exc.errno is None:  # gzip.BadGzipFile (CRC, bad header) or bz2's "Invalid data stream"
            raise _damaged(path, exc) from exc
        raise ImageNetLayoutError(f"cannot read {path}: {exc.strerror}") from exc


def _refuse_if_cut(tar: tarfile.TarFile, path: Path) -> None:
    """tarfile ends the member list silently at a cut or damaged header, so a truncated archive
    reads as one with files missing. A whole one has a zero block (its end marker) where the
    reading stopped. `offset` is that place; only called on the way to an error (a seek back in
    a compressed archive decompresses it again)."""
    assert tar.fileobj is not None
    tar.fileobj.seek(tar.offset)
    if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
        members = tar.getmembers()
        where = f" (it stops after {members[-1].name})" if members else ""
        raise ImageNetLayoutError(f"{path} is damaged or truncated{where}")


# ---- class names -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageNetClass:
    wnid: str
    name: str  # short English name, e.g. "tench"
    lemmas: str  # WordNet's synonyms, e.g. "tench, Tinca tinca"


def load_imagenet_classes() -> list[ImageNetClass]:
    """The 1000 ILSVRC-2012 classes in class-index order (sorted wnids)."""
    text = resources.files("alexnet").joinpath("data", "imagenet_classes.json").read_text(encoding="utf-8")
    return [ImageNetClass(**row) for row in json.loads(text)["classes"]]


def is_ilsvrc_2012(folders: Iterable[str]) -> bool:
    """Whether class folders are exactly the 1000 ILSVRC-2012 classes (named by their WordNet ids,
    as the official archives and launch/prepare_imagenet.py lay them out)."""
    return set(folders) == {c.wnid for c in load_imagenet_classes()}


def class_names(folders: list[str], known: list[ImageNetClass] | None = None) -> list[str]:
    """A readable name for each class folder: the English name where the folder is an ILSVRC-2012
    WordNet id (n01440764 -> "tench"), the folder's own name otherwise."""
    by_wnid = {c.wnid: c.name for c in (known if known is not None else load_imagenet_classes())}
    return [by_wnid.get(folder, folder) if WNID.match(folder) else folder for folder in folders]


# ---- validation ground truth -------------------------------------------------------------------
def _devkit_member(devkit: Path, name: str) -> bytes:
    """data/<name> from an extracted devkit folder or from the devkit .tar.gz itself."""
    if devkit.is_dir():
        for candidate in (devkit / "data" / name, devkit / name):
            if candidate.is_file():
                return candidate.read_bytes()
        found = sorted(devkit.rglob(name))
        if found:
            return found[0].read_bytes()
        raise ImageNetLayoutError(f"devkit folder {devkit} has no data/{name}")
    with _open_tar(devkit) as tar:
        member = next((m for m in tar.getmembers() if m.isfile() and Path(m.name).name == name), None)
        if member is None:
            _refuse_if_cut(tar, devkit)
            raise ImageNetLayoutError(f"devkit archive {devkit} has no data/{name}")
        extracted = tar.extractfile(member)
        assert extracted is not None
        return extracted.read()


def read_devkit_ids(devkit: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid for the 1000 leaf classes of meta.mat (those with no children)."""
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # pragma: no cover - scipy is in the extras
        raise ImageNetLayoutError("reading the devkit's meta.mat needs scipy (pip install scipy)") from exc
    raw = _devkit_member(devkit, META_MAT)
    try:
        synsets = loadmat(io.BytesIO(raw), squeeze_me=True)["synsets"]
        ids = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets.ravel() if int(s["num_children"]) == 0}
    except Exception as exc:  # noqa: BLE001 - scipy raises MatReadError, IndexError, ... on a damaged file
        raise ImageNetLayoutError(f"{devkit}: data/{META_MAT} has no usable 'synsets' table ({exc})") from exc
    if not ids:
        raise ImageNetLayoutError(f"{devkit}: data/{META_MAT} lists no leaf synsets")
    # The wnids become folder names under --out: one such as "../../x" would write outside it.
    bad = sorted(wnid for wnid in ids.values() if not WNID.match(wnid))
    if bad:
        raise ImageNetLayoutError(
            f"{devkit}: data/{META_MAT} gives the leaf WNID {bad[0]!r}, not a WordNet id (n and 8 digits)"
        )
    return ids


def read_devkit_ground_truth(devkit: Path) -> dict[str, str]:
    """File stem (ILSVRC2012_val_00000001) -> wnid, from the devkit."""
    ids = read_devkit_ids(devkit)
    lines = _devkit_member(devkit, GROUND_TRUTH_TXT).decode().split()
    truth: dict[str, str] = {}
    for number, text in enumerate(lines, start=1):
        try:
            truth[f"ILSVRC2012_val_{number:08d}"] = ids[int(text)]
        except (ValueError, KeyError) as exc:
            raise ImageNetLayoutError(
                f"{devkit}: line {number} of {GROUND_TRUTH_TXT} is {text!r}, not an ILSVRC2012_ID of meta.mat"
            ) from exc
    return truth


def _canonical_id(text: str) -> str | None:
    """ILSVRC2012_val_00000001 as the ground truth spells it, from that ID in any case of its
    letters; None for other text."""
    match = VAL_ID.match(text)
    return f"ILSVRC2012_val_{match.group(1)}" if match else None


def _image_id(text: str) -> str:
    """An ImageId of the CSV as the ground truth's key: ILSVRC2012_val_00000001 whatever its case
    (file names are matched case-insensitively, so the IDs are too); other text as it is."""
    return _canonical_id(text.strip()) or text.strip()


def read_loc_solution(path: Path) -> dict[str, str]:
    """File stem -> wnid from Kaggle's LOC_val_solution.csv (the first word of PredictionString).
    An image listed twice under two classes is refused: which row is right cannot be told, and a
    wrong label is silent. Twice under the same class is taken: the labels agree."""
    truth: dict[str, str] = {}
    first_line: dict[str, int] = {}
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts the file with a byte-order mark, which would
        # otherwise become part of the first column's name
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is not None:  # "ImageId, PredictionString" as a spreadsheet may write it
                reader.fieldnames = [name.strip() for name in reader.fieldnames]
            if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
                raise ImageNetLayoutError(f"{path} needs the columns ImageId,PredictionString")
            for line, row in enumerate(reader, start=2):
                words = (row["PredictionString"] or "").split()
                if not words or not WNID.match(words[0]):
                    raise ImageNetLayoutError(f"{path}: line {line} has no wnid in PredictionString")
                image = _image_id(row["ImageId"] or "")
                if truth.setdefault(image, words[0]) != words[0]:
                    raise ImageNetLayoutError(
                        f"{path}: line {line} gives {image} the class {words[0]}, "
                        f"line {first_line[image]} gave it {truth[image]}"
                    )
                first_line.setdefault(image, line)
    except OSError as exc:
        raise ImageNetLayoutError(f"cannot read {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ImageNetLayoutError(f"{path} is not a CSV text file ({exc})") from exc
    return truth


def read_ground_truth(source: Path) -> dict[str, str]:
    """A devkit (folder or .tar.gz) or a LOC_val_solution.csv, chosen by what `source` is."""
    if source.suffix.lower() == ".csv":
        return read_loc_solution(source)
    return read_devkit_ground_truth(source)


# ---- layout conversion -------------------------------------------------------------------------
def _val_id(name: str) -> str | None:
    """The ground truth's key (ILSVRC2012_val_00000001) of an image file name, whatever the case of
    its letters (ilsvrc2012_val_00000001.jpeg too); None for a name that is no validation image."""
    stem, dot, extension = name.rpartition(".")
    return _canonical_id(stem) if dot and extension.lower() == "jpeg" else None


@dataclass(frozen=True)
class Conversion:
    images: int
    classes: int
    out_dir: Path
    already_placed: int = 0  # images found in place from an earlier (complete or interrupted) run


def _check_coverage(stems: Iterable[str], truth: dict[str, str], where: Path) -> None:
    stems = set(stems)
    unknown = sorted(stems - set(truth))
    if unknown:
        raise ImageNetLayoutError(f"{where}: {len(unknown)} files have no ground truth, e.g. {', '.join(unknown[:3])}")
    missing = sorted(set(truth) - stems)
    if missing:
        raise ImageNetLayoutError(
            f"{where}: {len(missing)} validation files of the ground truth are missing, e.g. {', '.join(missing[:3])}"
        )


def _same_image_twice(where: Path, stem: str, first: str, second: str) -> ImageNetLayoutError:
    """Two files of one image: which one is meant cannot be told, and taking either is silent."""
    both = f"{first} twice" if first == second else f"both {first} and {second}"
    return ImageNetLayoutError(f"{where} holds {both}, two files of {stem}: keep one and run again")


def _flat_files(val_dir: Path) -> dict[str, Path]:
    """Stem -> the folder's own entry. The entry is kept, not its resolved target: in a checkout of
    a content-addressed store (git-annex, datalad, a Hugging Face cache) the entries are symlinks
    to files named by their hash, and the output must keep the ILSVRC2012_val_*.JPEG name."""
    files: dict[str, Path] = {}
    for entry in sorted(os.scandir(val_dir), key=lambda e: e.name):  # sorted: the same name in an error
        stem = _val_id(entry.name)
        if stem is None or not entry.is_file():  # follows a symlink: a dangling one is missing, not an image
            continue
        if stem in files:  # e.g. ILSVRC2012_val_00000001.JPEG beside ILSVRC2012_val_00000001.jpeg
            raise _same_image_twice(val_dir, stem, files[stem].name, entry.name)
        files[stem] = Path(entry.path)
    return files


def _class_folders(out_dir: Path) -> list[Path]:
    """The subfolders of out_dir, each a class to an ImageFolder over it (a link to a folder too)."""
    if not out_dir.is_dir():
        return []
    try:
        return sorted(Path(entry.path) for entry in os.scandir(out_dir) if entry.is_dir())
    except OSError as exc:
        raise ImageNetLayoutError(f"cannot read {out_dir}: {exc.strerror or exc}") from exc


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    """The entries of an output folder; one that cannot be listed is named as the output's."""
    try:
        return list(os.scandir(folder))
    except OSError as exc:
        raise ImageNetLayoutError(f"cannot read {folder}: {exc.strerror or exc}") from exc


Listing = dict[Path, list[os.DirEntry[str]]]


def _output_listing(out_dir: Path) -> Listing:
    """Each class folder of out_dir with its entries, listed once for the checks a run makes
    before it writes (misplaced images, images in place, staged files of a killed run)."""
    return {folder: _entries(folder) for folder in _class_folders(out_dir)}


@dataclass(frozen=True)
class _Placed:
    """An image's entry already in its ground-truth class folder."""

    name: str  # as spelled there: a re-run writes to that name, whatever the case of its source's
    is_file: bool  # a file, or a link to one (a dangling link is not an image in place)


def _placed_entries(listing: Listing, truth: dict[str, str]) -> dict[str, _Placed]:
    """Stem -> its entry at out_dir/<its wnid>/. A move moved the images out of the flat folder,
    so an interrupted or completed move is resumed, not refused as missing files; and a re-run
    whose source spells a name in other letters (ilsvrc2012_val_00000001.jpeg) finds the image
    in place instead of adding a second file of it. Two entries of one image in its folder are
    refused: every loader would read it twice."""
    placed: dict[str, _Placed] = {}
    for folder, entries in listing.items():
        for entry in sorted(entries, key=lambda e: e.name):
            stem = _val_id(entry.name)
            if stem is None or truth.get(stem) != folder.name or entry.is_dir(follow_symlinks=False):
                continue
            if stem in placed:
                raise _same_image_twice(folder, stem, placed[stem].name, entry.name)
            placed[stem] = _Placed(entry.name, entry.is_file())
    return placed


def _misplaced_images(listing: Listing, truth: dict[str, str]) -> list[tuple[Path, str]]:
    """(entry, its ground-truth wnid) for each image of the ground truth in a class folder of
    the output other than its own, a dangling link too (a loader would still list it there)."""
    found = []
    for folder, entries in listing.items():
        for entry in entries:
            stem = _val_id(entry.name)
            if stem is None or entry.is_dir(follow_symlinks=False):
                continue
            if truth.get(stem, folder.name) != folder.name:
                found.append((Path(entry.path), truth[stem]))
    return sorted(found)


def _refuse_misplaced(out_dir: Path, listing: Listing, truth: dict[str, str]) -> None:
    """Images in another class than the ground truth's, left by an earlier run with other labels:
    placing this run's beside them would give the same image two classes. Refused rather than
    repaired, because which labels are right, the earlier run's or these, cannot be told (a wrong
    --ground-truth now would otherwise scramble a right layout), and such an entry may be the only
    copy of its image (after a move) or a file this tool never wrote: one command of the user's
    costs less than an image silently mislabelled or lost."""
    misplaced = _misplaced_images(listing, truth)
    if misplaced:
        path, wnid = misplaced[0]
        raise ImageNetLayoutError(
            f"{len(misplaced)} validation images under {out_dir} are not in their ground-truth class folder, "
            f"e.g. {path} (ground truth: {wnid}), probably from an earlier run with other labels: remove them "
            "(or, after a --mode move, move them back into the flat folder), then run again"
        )


def _remove_stale_staged_files(listing: Listing) -> None:
    """Images a killed run had staged as .<name>.tmp<pid> (renamed to their name only once whole):
    nothing renames them later, so each re-run would leave them. One whose process still runs is
    another run's work in progress and stays. The pid is this machine's: with --out on a file
    system shared by two machines running this tool at once, the other's may be taken as gone."""
    for entries in listing.values():
        for entry in entries:
            staged = staged_of(entry.name)  # how write_bytes_atomic and copy_file_atomic stage an image
            if staged is None or _val_id(staged[0]) is None or entry.is_dir(follow_symlinks=False):
                continue
            if process_runs(staged[1]):
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass  # another re-run removed it first
            except OSError as exc:
                raise _cannot_write(Path(entry.path), exc) from exc


def _refuse_val_inside_out(val_dir: Path, out_dir: Path, listing: Listing) -> None:
    """A flat folder below --out would be one more class folder there, holding every image (an
    ImageFolder over --out indexes each subfolder, through links too). The flat folder as --out
    itself is fine: its images lie at the top, and only subfolders are classes. Compared through
    the class folders themselves, resolved, so that a link to or from either place is caught."""
    val_real = val_dir.resolve()
    for folder in listing:
        if val_real.is_relative_to(folder.resolve()):
            raise ImageNetLayoutError(
                f"{val_dir} is inside the output folder {out_dir} (as {folder}), which would make it one "
                "more class holding every image: choose an output folder outside it, or the folder itself"
            )


def _links_to(dst: Path, src: Path) -> bool:
    return dst.is_symlink() and Path(os.readlink(dst)) == src.resolve()


def _done_before(src: Path, dst: Path, mode: Mode) -> bool:
    """Whether `dst` is what placing `src` in `mode` makes: an earlier run placed it."""
    if mode == "symlink" or (mode == "move" and src.is_symlink()):
        return _links_to(dst, src)
    if dst.is_symlink() or not dst.is_file():
        return False  # a copy or a moved file is a regular file
    if mode == "copy":
        # copy_file_atomic renames only a whole copy into place: a regular file of the right size is one
        return dst.stat().st_size == src.stat().st_size
    # a move across file systems interrupted after its copy, before the source was removed; the
    # source is removed next, so the contents are compared, not only the sizes
    return filecmp.cmp(src, dst, shallow=False)


def _move(src: Path, dst: Path) -> None:
    """The folder's entry itself to `dst`. A symlink becomes a link to its resolved target (a
    relative one moved a folder deeper would point nowhere); the file it points to stays where
    it is. Across file systems the copy is renamed into place whole before the source goes."""
    if src.is_symlink():
        dst.symlink_to(src.resolve())
        src.unlink()
        return
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        copy_file_atomic(src, dst)
        src.unlink()


def _earlier_dangling_link(src: Path, dst: Path) -> bool:
    """Whether `dst` is a link of an earlier symlink run to a file that has since gone (the flat
    folder moved or renamed): a link whose target has the name of `src` (in any case) or of what `src` leads to
    (a store's hash), pointing nowhere. Replacing it loses nothing."""
    if not dst.is_symlink() or dst.exists():
        return False
    target = Path(os.readlink(dst)).name
    return target in {src.name, src.resolve().name} or _val_id(target) == _val_id(src.name)  # renamed in case


def _place(src: Path, dst: Path, mode: Mode) -> bool:
    """`src` (an entry of the flat folder) as `dst`; False where an earlier run already did it."""
    try:
        if _earlier_dangling_link(src, dst):
            dst.unlink()  # placed anew below: a re-run after the flat folder moved
        if dst.is_symlink() or dst.exists():
            if os.path.samestat(os.lstat(src), os.lstat(dst)):
                return False  # dst is src itself or a hard link of it: in place, nothing to remove
            if not _done_before(src, dst, mode):
                raise ImageNetLayoutError(f"{dst} already exists; remove it or choose another output folder")
            if mode == "move":
                src.unlink()  # the move was interrupted between placing dst and removing src
            return False
        if mode == "symlink":
            dst.symlink_to(src.resolve())  # absolute: the link works from out_dir/<wnid>/
        elif mode == "copy":
            copy_file_atomic(src, dst)  # a full disk leaves no torn image under the final name
        else:
            _move(src, dst)
    except OSError as exc:
        raise _cannot_write(dst, exc) from exc
    return True


def _cannot_write(dst: Path, exc: OSError) -> ImageNetLayoutError:
    """An output-side failure (a full disk, no permission, a file where a folder should be), named
    as such: not blamed on the input."""
    return ImageNetLayoutError(f"cannot write {dst}: {exc.strerror or exc}")


def _write_file(dst: Path, data: bytes) -> None:
    """`data` as `dst`, through a temporary file renamed over it: an interrupted extraction leaves
    no half-written image, and a symlink left by an earlier `--mode symlink` run is replaced, not
    written through into the original file it points to."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(dst, data)
    except OSError as exc:
        raise _cannot_write(dst, exc) from exc


def convert_val_folder(val_dir: Path, truth: dict[str, str], out_dir: Path, mode: Mode = "symlink") -> Conversion:
    """Lay the flat ILSVRC-2012 validation folder out as out_dir/<wnid>/<file> (symlinks to the
    originals by default: no second copy of 6.4 GB). Running it again, after a complete or an
    interrupted run, finishes the same layout: the files already in place count as done."""
    listing = _output_listing(out_dir)
    _refuse_val_inside_out(val_dir, out_dir, listing)
    files = _flat_files(val_dir)
    _refuse_misplaced(out_dir, listing, truth)  # first: a move's misplaced image would read as a missing one
    entries = _placed_entries(listing, truth)
    placed = {stem for stem, entry in entries.items() if entry.is_file} - set(files)
    if not files and not placed:
        raise ImageNetLayoutError(f"{val_dir} holds no ILSVRC2012_val_*.JPEG files{_subfolder_hint(val_dir)}")
    _check_coverage(set(files) | placed, truth, val_dir)
    _remove_stale_staged_files(listing)
    for wnid in sorted(set(truth.values())):
        try:
            (out_dir / wnid).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _cannot_write(out_dir / wnid, exc) from exc
    already = len(placed)
    # before a move unlinks them: the entries that are links, and where they lead
    linked = {stem: (src.name, src.resolve()) for stem, src in files.items() if src.is_symlink()}
    for stem in sorted(files):
        src = files[stem]
        name = entries[stem].name if stem in entries else src.name
        if not _place(src, out_dir / truth[stem] / name, mode):
            already += 1
    _remove_copies_named_after_targets(out_dir, linked, truth)
    return Conversion(len(files) + len(placed), len(set(truth.values())), out_dir, already)


def _remove_copies_named_after_targets(
    out_dir: Path, linked: dict[str, tuple[str, Path]], truth: dict[str, str]
) -> None:
    """Versions of this tool before 253fb33 named the image of a symlinked entry (a git-annex or
    datalad checkout) after the entry's target, a hash (a link, a copy, or the store's file moved);
    the image is now in place under its own name beside it, and the old one would have every
    loader read it twice. What goes: a link to that target, or a file of that name with the
    image's very bytes; anything else stays."""
    for stem, (name, target) in sorted(linked.items()):
        placed, old = out_dir / truth[stem] / name, out_dir / truth[stem] / target.name
        if old.name == placed.name or not (old.is_symlink() or old.is_file()):
            continue
        same = _links_to(old, target) if old.is_symlink() else _same_bytes(old, placed)
        if same:
            try:
                old.unlink()
            except OSError as exc:
                raise _cannot_write(old, exc) from exc


def _same_bytes(a: Path, b: Path) -> bool:
    return b.exists() and filecmp.cmp(a, b, shallow=False)


def _val_members(tar: tarfile.TarFile, archive: Path) -> dict[str, tarfile.TarInfo]:
    """Stem -> the archive's file of that image, in archive order; two files of one image (in two
    folders, or the same name twice) are refused, as an extraction would keep the later silently."""
    members: dict[str, tarfile.TarInfo] = {}
    for member in tar.getmembers():
        stem = _val_id(Path(member.name).name)
        if stem is None or not member.isfile():
            continue
        if stem in members:
            raise _same_image_twice(archive, stem, members[stem].name, member.name)
        members[stem] = member
    return members


def _subfolder_hint(val_dir: Path) -> str:
    """Where the images are one folder down (a tar unpacked into a folder of its own, as
    nest/ILSVRC2012_img_val/): that folder, to pass instead."""
    try:
        holding = [d for d in sorted(val_dir.iterdir()) if d.is_dir() and _flat_files(d)]
    except (OSError, ImageNetLayoutError):  # a hint, never an error of its own
        return ""
    return f"; its subfolder {holding[0]} does: pass that as --val" if holding else ""


def extract_val_archive(archive: Path, truth: dict[str, str], out_dir: Path) -> Conversion:
    """ILSVRC2012_img_val.tar straight into out_dir/<wnid>/<file>, without a flat copy first."""
    listing = _output_listing(out_dir)
    _refuse_misplaced(out_dir, listing, truth)  # before the archive's listing, which decompresses all of it
    entries = _placed_entries(listing, truth)
    with _open_tar(archive) as tar:
        stems = _val_members(tar, archive)
        if set(truth) - set(stems):
            _refuse_if_cut(tar, archive)
        if not stems:  # e.g. the devkit given as --val
            raise ImageNetLayoutError(f"{archive} holds no ILSVRC2012_val_*.JPEG files")
        _check_coverage(stems, truth, archive)
        _remove_stale_staged_files(listing)
        # In archive order: a compressed archive reads forward only, and each step back decompresses
        # it again from its start (quadratic time for an archive not in name order).
        for stem, member in stems.items():
            source = tar.extractfile(member)
            assert source is not None
            with source:
                data = source.read()  # one image (~130 KB): read and write errors stay apart
            name = entries[stem].name if stem in entries else Path(member.name).name
            _write_file(out_dir / truth[stem] / name, data)
    return Conversion(len(stems), len(set(truth.values())), out_dir)
