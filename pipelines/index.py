"""The list of (file, label) pairs that every pipeline reads, built once the same way for all.

Class indices follow torchvision's ImageFolder: class folders sorted by name, files with an image
extension (case-insensitive) sorted within each folder. Both the DALI and the torchvision pipeline
read this list, so their labels agree by construction.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")
# The first line of a list that launch/scan.py writes: load_file_list reads the split back from it.
_LIST_HEADER = re.compile(r"# (\S+) files of (.+) that decode, written by launch/scan\.py")


class DataError(RuntimeError):
    """The data folder is not usable; the message names the folder or file."""


@dataclass(frozen=True)
class FileIndex:
    files: list[str]
    labels: list[int]
    classes: list[str]
    # Folders inside class folders ("<class>/<folder>"): nothing in them is read (ImageFolder
    # would read their images), which the caller says.
    unread_folders: tuple[str, ...] = ()
    # Files of other extensions in class folders ("<class>/<name>"): skipped, as ImageFolder
    # skips them, which the caller says too (a class of GIFs trained on its JPEGs alone).
    unread_files: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.files)

    @cached_property
    def fingerprint(self) -> str:
        """What an epoch's order is a permutation of: each file as <class folder>/<name>, in list
        order. A checkpoint's loader state keeps it, so that a resume notices a list of as many
        files that is not the same (a file renamed, moved to another class, replaced), where the
        saved position no longer names the images already trained. The folder above the classes
        is left out: a dataset moved or mounted elsewhere is the same list."""
        digest = hashlib.sha256()
        for path in self.files:
            head, name = os.path.split(path)
            digest.update(f"{os.path.basename(head)}/{name}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()[:16]

    def subset(self, keep: list[int]) -> FileIndex:
        return FileIndex([self.files[i] for i in keep], [self.labels[i] for i in keep], self.classes)


def find_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DataError(f"data folder {split_dir} does not exist or is not a folder")
    classes, broken = split_entries(split_dir)
    if broken:
        raise DataError(
            f"{broken[0]}; {BROKEN_CLASS_ADVICE}" + (f" ({len(broken)} such entries)" if len(broken) > 1 else "")
        )
    if not classes:
        raise DataError(f"data folder {split_dir} has no class folders (expected {split_dir}/<class>/<image>)")
    return classes


BROKEN_CLASS_ADVICE = "restore its target (a file system not mounted?) or remove the link"


def split_entries(split_dir: Path) -> tuple[list[str], list[str]]:
    """A split folder's class folders (sorted), and what in it may have been one, each as a
    sentence naming it: a symbolic link whose target is gone (not a hidden one: an editor's lock
    file, such as Emacs's .#name, is such a link), or a link loop. `DirEntry.is_dir()` is False
    for the first and raises for the second; a class whose folder is missing from a mount was
    silently dropped, training one class fewer."""
    classes, broken = [], []
    for entry in os.scandir(split_dir):
        try:
            if entry.is_dir():
                classes.append(entry.name)
            elif entry.is_symlink() and not entry.name.startswith(".") and not os.path.exists(entry.path):
                target = printable(os.readlink(entry.path))
                broken.append(f"{printable(entry.path)} is a symbolic link to {target}, which does not exist")
        except OSError as exc:  # ELOOP: a link that leads back to itself
            broken.append(f"{printable(entry.path)} cannot be read: {exc.strerror}")
    return sorted(classes), sorted(broken)


@dataclass(frozen=True)
class ClassFolder:
    """One class folder's entries, each list sorted, hidden ones (.DS_Store) aside."""

    images: list[str]  # the files every pipeline reads
    folders: list[str]  # whose files no pipeline reads
    others: list[str]  # files of other extensions (.gif, .jfif, .heic: ImageFolder skips them too)


def scan_class_folder(folder: Path) -> ClassFolder:
    """A class folder's entries, in one pass over it. A symbolic link whose target is gone is
    listed with the images (as ImageFolder lists it), so that the scan and the decoders name it
    instead of the split silently losing the image."""
    images, folders, others = [], [], []
    for entry in os.scandir(folder):
        hidden = entry.name.startswith(".")
        if _is_dir(entry):
            if not hidden:
                folders.append(entry.name)
        # is_symlink first: it never follows the link, and is_file raises on a loop
        elif (entry.is_symlink() or entry.is_file()) and entry.name.lower().endswith(IMAGE_EXTENSIONS):
            images.append(entry.name)  # hidden ones too (._x.jpg), as ImageFolder reads them
        elif not hidden:
            others.append(entry.name)
    return ClassFolder(sorted(images), sorted(folders), sorted(others))


def _is_dir(entry: os.DirEntry) -> bool:
    """`entry.is_dir()`, False for a link loop (which raises): listed with the images, where the
    scan and the decoders name it, instead of a traceback out of the index."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def is_utf8(name: str) -> bool:
    """Whether a name from the file system is valid UTF-8. Python hands other bytes over as lone
    surrogates, which DALI's readers (and any UTF-8 text file, such as scan.py's lists) refuse."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def fits_one_line(name: str) -> bool:
    """Whether a name survives a file list of one name a line: str.splitlines (what
    load_file_list reads with) breaks lines at \\n and \\r, and at \\v, \\f, \\x1c-\\x1e, \\x85,
    U+2028 and U+2029 as well."""
    return name.splitlines() == [name]


def name_problem(name: str) -> str:
    """Why launch/scan.py's lists cannot hold a file or folder name; "" when they can."""
    if not is_utf8(name):
        return "the name is not valid UTF-8, which DALI cannot read"
    if not fits_one_line(name):
        return "the name holds a line break, which a file list (one name a line) cannot hold"
    return ""


def printable(name: str) -> str:
    """`name` with the bytes that are not UTF-8 written as \\xNN and the characters that are not
    printable (line breaks, tabs) as escapes, so that a message or report line stays one line."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def list_header(split: str, split_dir: Path) -> str:
    """The first line of the list of `split`'s files in `split_dir`, which check_list_split reads
    (printable: a line break in the data folder's path would end the comment early)."""
    return f"# {split} files of {printable(str(split_dir))} that decode, written by launch/scan.py"


def check_list_split(list_file: Path, first_line: str, split_dir: Path) -> None:
    """A list whose header names another split than `split_dir`'s (val.txt given for training):
    its entries would resolve to files of the wrong split that happen to share their names."""
    header = _LIST_HEADER.fullmatch(first_line.strip())
    expected = split_dir.name
    if header is None or expected not in SPLITS or header.group(1) == expected:
        return  # a list without scan's header, or a folder that is no split: nothing to compare
    raise DataError(
        f"file list {list_file} line 1: it lists the {header.group(1)} files of {header.group(2)}, but it is given "
        f"for the {expected} split ({split_dir}); pass the {expected} list (launch/scan.py writes it beside this one: "
        f"{list_file.with_name(expected + '.txt')})"
    )


def check_utf8_names(split_dir: Path, files: list[str]) -> None:
    bad = [printable(f) for f in files if not is_utf8(f)]
    if bad:
        raise DataError(
            f"{len(bad)} file or class folder name(s) under {printable(str(split_dir))} are not valid UTF-8, "
            f"which DALI cannot read: {some_names(bad)}. Rename them (for example with convmv), or run "
            "launch/scan.py, whose lists leave them out"
        )


def some_names(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def check_split_classes(split_dir: Path, found: list[str], classes: list[str]) -> None:
    """A split indexed with the training split's classes may not bring classes of its own."""
    extra = sorted(set(found) - set(classes))
    if extra:
        raise DataError(
            f"{split_dir} has class folders absent from the training data: {some_names(extra)}"
            + normalization_hint(extra, classes)
        )


def normalization_hint(names: list[str], other: list[str]) -> str:
    """What to add to a message about class names of one side missing on the other, where some
    differ only in Unicode normalisation (macOS writes "café" decomposed, most tools composed):
    printed, the two spellings look the same."""
    composed = {unicodedata.normalize("NFC", n): n for n in other}
    twins = [(n, composed.get(unicodedata.normalize("NFC", n))) for n in names]
    twins = [(n, twin) for n, twin in twins if twin is not None]
    if not twins:
        return ""
    name, twin = twins[0]
    return (
        f" ({len(twins)} of them differ from a class of the other side only in Unicode normalisation, e.g. "
        f"{ascii(name)} and {ascii(twin)}: rename one side's folders to the same form, NFC for most tools)"
    )


def check_val_covers_train(val_dir: Path, classes: list[str]) -> None:
    """Training validates on every training class: each needs a folder in the validation split."""
    found = find_classes(val_dir)
    missing = sorted(set(classes) - set(found))
    if missing:
        raise DataError(
            f"{len(missing)} training class(es) have no folder in {val_dir}: {some_names(missing)}; "
            "every training class needs a validation folder (validation accuracy would leave them out)"
            + normalization_hint(missing, found)
        )


def read_list_lines(list_file: Path) -> list[str]:
    try:
        # utf-8-sig: a list saved by Notepad or PowerShell starts with a byte-order mark
        return list_file.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read file list {list_file}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"file list {list_file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def load_file_list(
    list_file: str | Path, split_dir: str | Path, classes: list[str] | None = None, every_class: bool = True
) -> FileIndex:
    """A file list written by `launch/scan.py`: one path per line, relative to `split_dir` or
    absolute; '#' starts a comment. A file's class is the name of its parent folder, and class
    indices are those of `split_dir`'s class folders (or `classes`, the training split's), so a
    list labels its files exactly as the folder index would. `every_class`: each class folder of
    `split_dir` must have a listed file (a training list; a validation or evaluation list may name
    a few classes' files)."""
    list_file, split_dir = Path(list_file).expanduser(), Path(split_dir)
    lines = read_list_lines(list_file)
    check_list_split(list_file, lines[0] if lines else "", split_dir)
    found = find_classes(split_dir)
    if classes is None:
        classes = found
    else:
        check_split_classes(split_dir, found, classes)
    label_of = {name: i for i, name in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    first_line: dict[str, int] = {}  # each file's line, by its absolute path
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry) if Path(entry).is_absolute() else split_dir / entry
        seen = first_line.setdefault(os.path.abspath(path), number)  # abspath: also normalised
        if seen != number:  # read twice an epoch; in a validation list, counted twice
            raise DataError(
                f"file list {list_file} line {number}: {entry} is line {seen}'s file again; list each file once"
            )
        label = label_of.get(path.parent.name)
        if label is None:
            raise DataError(
                f"file list {list_file} line {number}: {entry} is in folder {path.parent.name!r}, "
                f"which is not a class folder of {split_dir}"
            )
        files.append(str(path))
        labels.append(label)
    if not files:
        raise DataError(f"file list {list_file} names no files")
    if every_class:
        check_every_class_listed(list_file, split_dir, found, [classes[i] for i in sorted(set(labels))])
    check_extractions_finished(split_dir, found)  # a list names what a half-filled folder held at its scan
    return FileIndex(files, labels, list(classes))


def check_disjoint(train: FileIndex, val: FileIndex, train_source: str, val_source: str) -> None:
    """No file may be both a training and a validation image: a validation list of training
    images (absolute paths, so no header tells its split) scored the images the model trained
    on. Paths are compared as written, made absolute: a file reached through two spellings of a
    symbolic link is not found (resolving each of ImageNet's 1.3 M paths on a network file
    system would take minutes). A list of training images that the training list leaves out
    (a hold-out) is allowed."""
    shared = set(map(os.path.abspath, train.files)).intersection(map(os.path.abspath, val.files))
    if shared:
        raise DataError(
            f"{len(shared)} file(s) are both training data ({train_source}) and validation data ({val_source}), "
            f"e.g. {printable(min(shared))}: validation would score images the model trained on; validate on "
            "other files"
        )


def check_every_class_listed(list_file: Path, split_dir: Path, folders: list[str], listed: list[str]) -> None:
    """A class folder none of whose files a list names (the scan left them all out) would be a
    class the model keeps an output for and never sees as a target: refused, as an empty class
    folder is when the folders are indexed."""
    unlisted = sorted(set(folders) - set(listed))
    if unlisted:
        raise DataError(
            f"file list {list_file} names no file of class folder(s) {', '.join(map(repr, unlisted[:5]))}"
            + (" ..." if len(unlisted) > 5 else "")
            + f" of {split_dir}: every class needs images (launch/scan.py reports such a class as a folder "
            "problem; give it usable images, or move its folder out of the split)"
        )


def unfinished_extractions(split_dir: Path, classes: Iterable[str] | Mapping[str, int]) -> list[str]:
    """A sentence for each class whose archive `<class>.tar` lies beside its folder holding more
    images than the folder (`classes` a mapping: class -> images in its folder, already counted): the
    README's extraction loop removes each archive after extracting it, so a killed loop leaves one
    beside a half-filled folder, which would otherwise train as a class with a fraction of its
    images. A stat per class; a folder is listed and an archive's headers read only where an
    archive lies."""
    found = []
    for name in classes:
        archive = split_dir / f"{name}.tar"
        if not os.path.isfile(archive):  # False for a name too long to have an archive beside it, too
            continue
        folder = split_dir / name
        try:
            with tarfile.open(archive) as tar:
                held = sum(1 for m in tar if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS))
            if isinstance(classes, Mapping):
                count = classes[name]
            else:
                count = len(scan_class_folder(folder).images) if folder.is_dir() else 0
        except (OSError, tarfile.TarError) as exc:
            found.append(f"{printable(str(archive))} lies beside class folder {name} and cannot be read ({exc})")
            continue
        if held > count:
            found.append(
                f"class folder {printable(str(folder))} holds {count} image(s), the archive "
                f"{printable(str(archive))} beside it {held}: its extraction did not finish"
            )
    return found


UNFINISHED_ADVICE = "extract the archive again into its folder and remove it, or move it out of the split folder"


def check_extractions_finished(split_dir: Path, classes: Iterable[str] | Mapping[str, int]) -> None:
    """A DataError naming the classes of `unfinished_extractions`, with what to do."""
    unfinished = unfinished_extractions(split_dir, classes)
    if unfinished:
        raise DataError(f"{'; '.join(unfinished[:3])}: {UNFINISHED_ADVICE}")


def build_file_index(split_dir: str | Path, classes: list[str] | None = None) -> FileIndex:
    """Index `split_dir/<class>/<image>`. Pass `classes` (from the training split) to index a
    validation split with the training split's class indices."""
    split_dir = Path(split_dir)
    found = find_classes(split_dir)
    if classes is None:
        classes = found
    else:
        check_split_classes(split_dir, found, classes)
    files: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    unread: list[str] = []
    skipped: list[str] = []
    counts: dict[str, int] = {}
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        entries = scan_class_folder(folder)
        counts[name] = len(entries.images)
        if not entries.images:
            # a layout of class/images/*.JPEG (Tiny ImageNet's): say where the images are
            empty.append(f"{name} (only folder(s) {', '.join(entries.folders[:3])})" if entries.folders else name)
        files.extend(str(folder / n) for n in entries.images)
        labels.extend([label] * len(entries.images))
        unread.extend(f"{name}/{f}" for f in entries.folders)
        skipped.extend(f"{name}/{f}" for f in entries.others)
    check_utf8_names(split_dir, files)
    check_extractions_finished(split_dir, counts)  # an empty folder beside its archive: this says why
    if empty:
        raise DataError(
            f"class folders without images in {split_dir}: {', '.join(empty[:5])}"
            + (" ..." if len(empty) > 5 else "")
            + " (a class folder holds its images itself; images in its subfolders are not read)"
        )
    return FileIndex(files, labels, list(classes), tuple(unread), tuple(skipped))
