"""Output files: their folders checked before the work that fills them, and written whole or
not at all.

A command that measures, scans or evaluates for minutes checks first that it can write where it
was told to (`check_output_folder`, `check_output_file`), so that no result is lost to an output
path that is a file, a folder or read-only. A reader (a monitoring script, the next session, a
training run that reads a file list) sees the old file or the new one, never a half-written one:
the new bytes go to a temporary file beside the target, are synced, and are renamed over it. A
rename that reached the disk before the data (a crash or power loss just after it) would leave
an empty file; a failed write (a full disk) leaves the old file and no temporary one. An
existing file is replaced only where it is an earlier output of the same command
(`check_replaceable`): a mistyped output path (a checkpoint, metrics.jsonl) is not lost.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any


class OutputPathError(Exception):
    """An output path that cannot be written; the message names it and the option that gave it."""


def output_text(text: str) -> str:
    """An argparse type for output options: an empty value (`--out "$OUT"` with OUT unset) was
    the current folder, where a command then wrote its files without a word."""
    if not text:
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?): name a path, or leave the option out")
    return text


def output_path(text: str) -> Path:
    """`output_text` as a Path."""
    return Path(output_text(text))


def _can_create_in(folder: Path) -> bool:
    """A probe file created and removed at once: permission bits alone pass for root where no
    file can be written (a read-only mount)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_output_folder(folder: Path, what: str) -> None:
    """Files can be created in `folder`, existing or to be created (nothing is created yet).
    `what` names it in the error, e.g. "--out runs/x"."""
    try:
        if folder.exists() and not folder.is_dir():
            raise OutputPathError(f"{what}: {folder} is a file, not a folder")
        existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
        if not existing.is_dir() or not _can_create_in(existing):
            raise OutputPathError(f"{what}: {existing} is not a writable folder")
    except OSError as exc:  # a name too long, a parent folder this user may not read
        raise OutputPathError(f"{what}: {exc.strerror or exc}") from exc


def check_output_file(path: Path, what: str) -> None:
    """`path` can be written (replaced if it exists); nothing is created yet."""
    try:
        if path.is_dir():
            raise OutputPathError(f"{what}: {path} is a folder, not a file")
        check_output_folder(path.parent, what)
        if path.exists() and not os.access(path, os.W_OK):
            raise OutputPathError(f"{what}: {path} is not writable")
    except OSError as exc:
        raise OutputPathError(f"{what}: {exc.strerror or exc}") from exc


# json.dumps with indent=2 puts the top-level keys, and only those, two spaces in: what a file
# too large to parse whole shows of them in its first bytes.
_TOP_LEVEL_KEY = re.compile(r'^  "(\w+)": ', re.MULTILINE)
_PREFIX_BYTES = 1 << 16


def has_top_level_keys(path: Path, keys: frozenset[str]) -> bool:
    """Whether `path` is a JSON object with all of `keys` at its top level, from at most 64 KiB of it
    (the path may name a checkpoint of hundreds of MB). A larger file counts by the keys in that
    prefix, as json.dumps(indent=2) writes them; the caller puts any long value after them."""
    with open(path, "rb") as f:
        head = f.read(_PREFIX_BYTES + 1)
    if len(head) <= _PREFIX_BYTES:  # all of it: parsed
        try:
            doc = json.loads(head.decode("utf-8"))
        except ValueError:  # also UnicodeDecodeError
            return False
        return isinstance(doc, dict) and keys <= doc.keys()
    text = head[:_PREFIX_BYTES].decode("utf-8", errors="replace")
    return text.startswith("{") and keys <= set(_TOP_LEVEL_KEY.findall(text))


def check_replaceable(path: Path, keys: frozenset[str], command: str, what: str, hint: str = "name a new file") -> None:
    """An existing `path` is an earlier output of `command` (a JSON object with all of `keys`, which
    its outputs always have), so that replacing it loses nothing else. `what` names the option in
    the error, e.g. "--out x.json"; `hint` says what to give instead."""
    if not path.exists():
        return
    try:
        if not path.is_file() or not has_top_level_keys(path, keys):  # not opened unless a file: a FIFO would block
            raise OutputPathError(
                f"{what}: the file exists and is not an earlier result of {command}; {hint} (nothing was overwritten)"
            )
    except OSError as exc:  # a file this user may not read
        raise OutputPathError(f"{what}: {exc.strerror or exc}") from exc


_STAGED = re.compile(r"^\.(.+)\.tmp(\d+)$")


def staged_path(path: Path, pid: int | None = None) -> Path:
    """Where `_replace_with` writes the new bytes of `path` (in process `pid`, this one by default)
    before renaming them over it: hidden, beside it, named after it and the process."""
    return path.with_name(f".{path.name}.tmp{os.getpid() if pid is None else pid}")


def staged_of(name: str) -> tuple[str, int] | None:
    """(the final name, the writer's pid) of a file name `staged_path` gives; None for any other."""
    match = _STAGED.match(name)
    return (match.group(1), int(match.group(2))) if match else None


def process_runs(pid: int) -> bool:
    """Whether a process of this pid runs on this machine (another user's too): the staged file of
    one that does not is abandoned."""
    try:
        os.kill(pid, 0)  # no signal: only whether the process exists
    except (ProcessLookupError, OverflowError):  # OverflowError: no process id is that large
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _replace_with(path: Path, write) -> None:
    tmp = staged_path(path)
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """`text` as `path`, UTF-8 whatever the locale."""
    _replace_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    _replace_with(path, lambda tmp: tmp.write_bytes(data))


def copy_file_atomic(src: Path, dst: Path) -> None:
    """A copy of `src` (contents and times, as shutil.copy2) as `dst`."""
    _replace_with(dst, lambda tmp: shutil.copy2(src, tmp))


def without_non_finite(value: Any) -> Any:
    """`value` with every NaN or infinite float inside it replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: without_non_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_non_finite(v) for v in value]
    return value


def strict_json(value: Any, indent: int | None = None) -> str:
    """JSON that strict readers accept: a diverged loss is written as null, not as Python's bare
    NaN/Infinity tokens, which JavaScript, Go and jq refuse or misread."""
    return json.dumps(without_non_finite(value), indent=indent, allow_nan=False)
