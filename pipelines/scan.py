"""Find the files a decoder would choke on, before training starts.

`python launch/scan.py DATA_ROOT [--out DIR]` checks every file the pipelines would read
(DATA_ROOT/{train,val}/<class>/<image>, as `pipelines.index` lists them) in parallel, reports
each bad file with its reason, and writes file lists that training reads instead of the folders:

    DIR/train.txt, DIR/val.txt   one path per line (relative to the split folder; absolute for
                                 converted copies); the class is the file's parent folder
    DIR/report.json              every finding, the folder problems, the counts, and what in
                                 the class folders training does not read
    DIR/fixed/<split>/<class>/   RGB JPEG copies of the fixable files (".jpg" added to a name
                                 that is not a JPEG name)

Unusable files (empty, unreadable, not an image, truncated, absurd dimensions, floating-point
pixels of unknown scale) are left out. Images DALI cannot decode whatever their name (GIF, AVIF,
TIFFs of some sample layouts), other formats named .JPEG and CMYK JPEGs are converted to RGB
JPEG copies (--fixable); grayscale images, which every decoder expands to RGB, are reported and
kept (--grayscale). Files of other extensions and folders inside class folders, which training
does not read, are named in the summary.

Train on them with `data.train_files=DIR/train.txt data.val_files=DIR/val.txt`. Class indices
stay those of the class folders, so a list trains the same classes as the raw folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, TextIO

from pipelines.filecheck import FIXABLE, JPEG_SUFFIXES, KINDS, Finding, Limits, check_file, convert_to_rgb_jpeg
from pipelines.index import (
    BROKEN_CLASS_ADVICE,
    IMAGE_EXTENSIONS,
    SPLITS,
    UNFINISHED_ADVICE,
    list_header,
    name_problem,
    normalization_hint,
    printable,
    scan_class_folder,
    some_names,
    split_entries,
    unfinished_extractions,
)
from pipelines.outputs import OutputPathError, check_output_folder, output_path, write_text_atomic

Fixable = Literal["convert", "exclude", "keep"]
Action = Literal["excluded", "converted", "kept"]


@dataclass(frozen=True)
class Policy:
    """What the lists do with the files that decode after a conversion."""

    fixable: Fixable = "convert"  # formats DALI cannot decode, other formats named .JPEG, CMYK JPEGs
    grayscale: Literal["keep", "convert"] = "keep"

    def action(self, finding: Finding) -> Action:
        if finding.kind not in FIXABLE:
            return "excluded"
        if finding.kind == "grayscale":  # --grayscale alone decides; --fixable is for the rest
            return "converted" if self.grayscale == "convert" else "kept"
        return {"convert": "converted", "keep": "kept", "exclude": "excluded"}[self.fixable]


@dataclass
class SplitListing:
    """The files of one split in index order (class folders sorted, names sorted)."""

    split_dir: Path
    classes: list[str]
    files: list[str] = field(default_factory=list)  # relative to split_dir: <class>/<name>
    # What training does not read in the class folders, <class>/<name> as well: files of other
    # extensions, and folders.
    unread_files: list[str] = field(default_factory=list)
    unread_folders: list[str] = field(default_factory=list)


@dataclass
class ScanResult:
    root: Path
    problems: list[str]  # folder-level problems; training cannot start while any remains
    findings: dict[str, list[Finding]]  # split -> bad files
    lists: dict[str, list[str]]  # split -> the lines of its file list
    converted: int = 0
    checked: int = 0
    # Not checked, as training does not read them: <split>/<class>/<name> (printable).
    unread_files: list[str] = field(default_factory=list)
    unread_folders: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(f.kind for found in self.findings.values() for f in found))


def list_split(split_dir: Path, problems: list[str]) -> SplitListing | None:
    """The split's files, recording (not raising) what is wrong with the folder."""
    if not split_dir.is_dir():
        problems.append(f"{split_dir} is missing (expected {split_dir}/<class>/<image>)")
        return None
    classes, broken = split_entries(split_dir)
    problems.extend(f"{entry}; {BROKEN_CLASS_ADVICE}" for entry in broken)
    if not classes:
        problems.append(f"{split_dir} has no class folders (expected {split_dir}/<class>/<image>)")
        return None
    for name in [c for c in classes if name_problem(c)]:
        problems.append(f"class folder {printable(str(split_dir / name))}: {name_problem(name)}")
        classes.remove(name)
    listing = SplitListing(split_dir, classes)
    counts: dict[str, int] = {}
    for name in classes:
        try:
            entries = scan_class_folder(split_dir / name)
        except OSError as exc:  # no permission to list it: the other folders are still scanned
            problems.append(f"class folder {printable(str(split_dir / name))} cannot be read: {exc.strerror}")
            continue
        counts[name] = len(entries.images)
        if not entries.images:
            problems.append(f"class folder {split_dir / name} holds no images")
        listing.files.extend(f"{name}/{n}" for n in entries.images)
        listing.unread_files.extend(f"{name}/{n}" for n in entries.others)
        listing.unread_folders.extend(f"{name}/{n}" for n in entries.folders)
    problems.extend(f"{sentence}: {UNFINISHED_ADVICE}" for sentence in unfinished_extractions(split_dir, counts))
    return listing


def compare_classes(train: SplitListing, val: SplitListing, problems: list[str]) -> None:
    missing = sorted(set(train.classes) - set(val.classes))
    extra = sorted(set(val.classes) - set(train.classes))
    if missing:
        problems.append(
            f"{len(missing)} class(es) of {train.split_dir} have no folder in {val.split_dir}: {some_names(missing)}"
            + normalization_hint(missing, val.classes)
        )
    if extra:
        problems.append(
            f"{val.split_dir} has class folder(s) absent from {train.split_dir}: {some_names(extra)}"
            + normalization_hint(extra, train.classes)
        )


def _check(args: tuple[str, Limits]) -> Finding | None:
    return check_file(*args)


def check_files(paths: list[str], limits: Limits, workers: int, progress: bool, label: str) -> list[Finding | None]:
    """check_file over `paths` in `workers` processes, in order, with a progress bar."""
    from tqdm import tqdm

    jobs = [(p, limits) for p in paths]
    bar = tqdm(total=len(paths), desc=f"scan {label}", unit="file", disable=not progress, dynamic_ncols=True)
    results: list[Finding | None] = []
    if workers <= 1:
        for job in jobs:
            results.append(_check(job))
            bar.update()
    else:
        chunk = max(1, min(256, len(jobs) // (workers * 8) or 1))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(_check, jobs, chunksize=chunk):
                results.append(result)
                bar.update()
    bar.close()
    return results


def scan(
    root: Path,
    out: Path,
    workers: int = 0,
    policy: Policy = Policy(),
    limits: Limits | None = None,
    progress: bool = False,
) -> ScanResult:
    """Check DATA_ROOT's splits and write the lists and the report into `out`. Folder problems
    (a missing split, an empty class folder, unmatched classes) are listed in `problems`."""
    limits = limits or Limits()
    root = root.expanduser().resolve()
    workers = workers or os.cpu_count() or 1
    problems: list[str] = []
    if not root.is_dir():
        return ScanResult(root, [f"data folder {root} does not exist"], {}, {})
    listings = {split: list_split(root / split, problems) for split in SPLITS}
    if listings["train"] and listings["val"]:
        compare_classes(listings["train"], listings["val"], problems)
    result = ScanResult(root, problems, {}, {})
    for split, listing in listings.items():
        if listing is None:
            continue
        paths = [str(listing.split_dir / rel) for rel in listing.files]
        found = check_files(paths, limits, workers, progress, split)
        result.checked += len(paths)
        result.findings[split] = [f for f in found if f is not None]
        result.lists[split] = _list_lines(listing, found, out / "fixed" / split, policy, result)
        result.unread_files.extend(printable(f"{split}/{rel}") for rel in listing.unread_files)
        result.unread_folders.extend(printable(f"{split}/{rel}") for rel in listing.unread_folders)
    for split, lines in result.lists.items():
        listing = listings[split]
        assert listing is not None
        # Classes whose images were all left out; a folder without images is a problem already.
        emptied = sorted({Path(rel).parent.name for rel in listing.files} - {Path(line).parent.name for line in lines})
        if emptied:
            problems.append(f"class(es) with no usable image left in {listing.split_dir}: {some_names(emptied)}")
    write_outputs(result, out, policy)
    return result


def _list_lines(
    listing: SplitListing, found: list[Finding | None], fixed_dir: Path, policy: Policy, result: ScanResult
) -> list[str]:
    lines = []
    taken: set[str] = set()  # the copies' names so far
    for rel, finding in zip(listing.files, found):
        action = "kept" if finding is None else policy.action(finding)
        if action == "kept":
            lines.append(list_line(rel))
        elif action == "converted":
            target = fixed_dir / converted_name(rel, taken)
            convert_to_rgb_jpeg(listing.split_dir / rel, target)
            result.converted += 1
            lines.append(str(target.resolve()))
    return lines


def converted_name(rel: str, taken: set[str]) -> str:
    """Where the RGB JPEG copy of `rel` goes: its own name where that is a JPEG name, else with
    ".jpg" added (gif.png -> gif.png.jpg), so that no tool trusting the extension takes the
    copy for another format; added, not replaced, so that x.png and x.tif keep two copies. A name
    an earlier copy took (x.png's copy is x.png.jpg, the name of a CMYK x.png.jpg's) gets a
    number before its ".jpg" (x.png.2.jpg): one copy overwrote the other, which the list then
    named twice. `taken` (compared case-folded, for case-insensitive file systems) gets the name."""
    name = rel if rel.lower().endswith(JPEG_SUFFIXES) else f"{rel}.jpg"
    stem, suffix = os.path.splitext(name)
    number = 1
    while name.casefold() in taken:
        number += 1
        name = f"{stem}.{number}{suffix}"
    taken.add(name.casefold())
    return name


def list_line(rel: str) -> str:
    """`rel` as a line load_file_list reads back: a class folder named "#..." or " ..." would
    start a comment or lose its blank to the line's strip; "./" keeps it (Path drops the ".")."""
    return f"./{rel}" if rel[:1] == "#" or rel[:1].isspace() else rel


def write_outputs(result: ScanResult, out: Path, policy: Policy) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, lines in result.lists.items():
        header = [
            list_header(split, result.root / split),
            f"# {len(lines)} files; {len(result.findings.get(split, []))} reported (see report.json)",
            "# relative paths are relative to the split folder; a file's class is its parent folder",
        ]
        write_text_atomic(out / f"{split}.txt", "\n".join(header + lines) + "\n")  # UTF-8, what load_file_list reads
    report = {
        "data_root": str(result.root),
        "checked": result.checked,
        "problems": result.problems,
        "counts": result.counts,
        "converted": result.converted,
        "unread_files": result.unread_files,
        "unread_folders": result.unread_folders,
        "policy": asdict(policy),
        "files": [
            {**asdict(f), "split": split, "action": policy.action(f)}
            for split, found in result.findings.items()
            for f in found
        ],
    }
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")


def print_report(result: ScanResult, out: Path, policy: Policy, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout  # looked up now, not at import: pytest's capsys replaces it
    for found in result.findings.values():
        for f in found:
            print(f"{policy.action(f):9s}  {f.kind:12s}  {f.path}: {f.detail}", file=stream)
    counts = result.counts
    summary = ", ".join(f"{n} {KINDS[k][0 if n == 1 else 1]}" for k, n in sorted(counts.items())) or "no bad files"
    if result.problems:  # "no bad files" alone would read as "ready to train"
        summary += f"; {len(result.problems)} folder problem(s), training cannot start while any remains"
    print(f"checked {result.checked} files under {result.root}: {summary}", file=stream)
    for line in unread_lines(result):
        print(line, file=stream)
    for problem in result.problems:
        print(f"problem: {problem}", file=stream)
    if result.lists:
        then = "fix the folder problems above, then train" if result.problems else "train"
        print(
            f"file lists in {out}: {then} with data.train_files={out / 'train.txt'} data.val_files={out / 'val.txt'}",
            file=stream,
        )


def unread_lines(result: ScanResult) -> list[str]:
    """What the scan did not check because training does not read it: "checked N files" alone
    would read as every file in the class folders."""
    lines = []
    # An entry of an image's name among them is no regular file (a FIFO, a socket, a device): the
    # folder's index skips those too, and "whose extension training does not read (.jpg; it
    # reads .jpg ...)" contradicted itself.
    special = [f for f in result.unread_files if f.lower().endswith(IMAGE_EXTENSIONS)]
    other = [f for f in result.unread_files if f not in special]
    if other:
        extensions = sorted({Path(f).suffix.lower() or "(none)" for f in other})
        lines.append(
            f"not checked: {len(other)} file(s) in class folders whose extension training does not "
            f"read ({', '.join(extensions)}; it reads {' '.join(IMAGE_EXTENSIONS)}): {some_names(other)}"
        )
    if special:
        lines.append(
            f"not checked: {len(special)} entr{'y' if len(special) == 1 else 'ies'} in class folders with an image's "
            f"name that {'is' if len(special) == 1 else 'are'} no regular file (a FIFO, socket or device), which "
            f"training skips: {some_names(special)}"
        )
    if result.unread_folders:
        lines.append(
            f"not checked: {len(result.unread_folders)} folder(s) inside class folders, none of whose files training "
            "reads (only the images directly in a class folder are; ImageFolder would read these too): "
            + some_names(result.unread_folders)
        )
    return lines


def check_out_beside_data(out: Path, root: Path) -> None:
    """The lists' folder must not be one training reads, and its path must fit in a list. Under
    ROOT/train or ROOT/val it became a class folder (holding the lists and the converted copies),
    and the next scan or run stopped on it; a line break in its path split the converted copies'
    lines of the lists, and a name that is not UTF-8 failed when the lists were written."""
    where = out.expanduser().resolve()  # resolved as the scan resolves the root: through links and ..
    for split in SPLITS:
        data = (root.expanduser().resolve() / split).resolve()
        if where == data or data in where.parents:
            raise OutputPathError(
                f"--out {printable(str(out))} is {'' if where == data else 'inside '}{printable(str(data))}, where it "
                "would be read as a class folder: put the lists beside the data folder, not in it"
            )
    problem = name_problem(str(where))
    if problem:
        raise OutputPathError(f"--out {printable(str(out))}: {problem.replace('the name', 'the path')}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch/scan.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("root", type=Path, help="data folder holding train/<class>/* and val/<class>/*")
    p.add_argument(
        "--out", type=output_path, default=None, help="where the lists and report go (default runs/scan-<name>)"
    )
    p.add_argument("--workers", type=whole_number(0), default=0, help="processes (default 0: all CPUs)")
    p.add_argument(
        "--fixable",
        choices=("convert", "exclude", "keep"),
        default="convert",
        help="images DALI cannot decode (GIF, AVIF, some TIFFs), other formats named .JPEG and CMYK JPEGs: convert "
        "to RGB JPEG copies (default), exclude, or keep",
    )
    p.add_argument(
        "--grayscale", choices=("keep", "convert"), default="keep", help="grayscale images: keep (default) or convert"
    )
    p.add_argument(
        "--min-side", type=whole_number(1), default=Limits.min_side,
        help=f"pixels: a shorter side is reported as absurd dimensions (default {Limits.min_side})",
    )  # fmt: skip
    p.add_argument(
        "--max-side", type=whole_number(1), default=Limits.max_side, help=f"pixels (default {Limits.max_side})"
    )
    p.add_argument(
        "--max-aspect", type=aspect_ratio, default=Limits.max_aspect,
        help=f"long side / short side (default {Limits.max_aspect:g})",
    )  # fmt: skip
    p.add_argument(
        "--max-pixels", type=whole_number(1), default=Limits.max_pixels,
        help=f"width x height: the decoder allocates them all before the resize (default {Limits.max_pixels:,})",
    )  # fmt: skip
    p.add_argument("--progress", choices=("auto", "bar", "off"), default="auto")
    return p.parse_args(argv)


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= `minimum` (`--max-pixels 0` excluded every image, and the
    report blamed the data)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def aspect_ratio(text: str) -> float:
    """An argparse type: a finite ratio >= 1 (`nan` turned the check off without a word)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}") from None
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 1 (long side / short side), got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out or Path("runs") / f"scan-{args.root.expanduser().resolve().name}"
    limits = Limits(args.min_side, args.max_side, args.max_aspect, args.max_pixels)
    progress = args.progress == "bar" or (args.progress == "auto" and sys.stderr.isatty())
    policy = Policy(args.fixable, args.grayscale)
    try:
        check_output_folder(out, f"--out {out}")  # before the scan, which a bad path would lose
        check_out_beside_data(out, args.root)
    except OutputPathError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = scan(args.root, out, args.workers, policy, limits, progress)
    print_report(result, out, policy)
    return 1 if result.problems else 0
