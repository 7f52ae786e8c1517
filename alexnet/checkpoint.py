"""Checkpoints: atomic writes by one rank, layout-independent contents, `weights_only` loads.

The model and the optimizer's momentum are stored in the single-device layout, keyed by parameter
name, so a run can resume under another parallel layout or world size. A write never leaves a
half-written `last.pt`: the new file is written beside it, fsynced, and renamed over it; the
previous checkpoint survives as `previous.pt` until the next write.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alexnet.optim import IMPLEMENTATION_KEYS

log = logging.getLogger("alexnet")

# Optimizer settings this run's config sets (optim.momentum, optim.weight_decay; the other two are
# fixed by build_optimizer): the optimizer keeps them as built, so config.yaml and the checkpoints
# written from now on describe what the run does. What the config does not set (the lr the
# schedule reached) comes from the checkpoint.
CONFIG_KEYS = frozenset({"momentum", "weight_decay", "dampening", "nesterov"})
FORMAT_VERSION = 1
LAST = "last.pt"
PREVIOUS = "previous.pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the reason."""


class CheckpointUnusableHere(CheckpointError):
    """A checkpoint that need not be damaged but that this process cannot use: a read refused to
    this user, a format this version does not know (a newer one's), a link to a place not there
    (storage not mounted). A resume does not fall back past it to an older checkpoint, whose
    run's next write would replace it."""


def optimizer_hyperparams(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """Each parameter group's settings, keyed by the group's name ("weights", "biases")."""
    return {g["name"]: {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups}


def optimizer_momentum(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str]) -> dict[str, torch.Tensor]:
    """SGD's momentum buffers keyed by parameter name instead of position."""
    return {
        names[p]: s["momentum_buffer"].detach()
        for p, s in optimizer.state.items()
        if s.get("momentum_buffer") is not None
    }


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    hyperparams: dict[str, dict[str, Any]],
    momentum: dict[str, torch.Tensor],
    params: dict[str, nn.Parameter],
) -> None:
    for group in optimizer.param_groups:
        saved = hyperparams.get(group["name"], {})
        for key, value in saved.items():
            if key == "name" or key in IMPLEMENTATION_KEYS:
                continue
            if key in CONFIG_KEYS and key in group:
                if group[key] != value:
                    log.warning(
                        "optimizer group %r: %s is %s in this run's config and %s in the checkpoint; "
                        "the config's value is used", group["name"], key, group[key], value,
                    )  # fmt: skip
                continue
            group[key] = value
    for name, buffer in momentum.items():
        p = params[name]
        # In the parameter's own memory layout (a checkpoint written with another
        # train.channels_last keeps its strides): the fused SGD needs parameter, gradient and
        # buffer strided alike (CUDA refuses otherwise; the CPU kernel computes a wrong update).
        optimizer.state[p] = {"momentum_buffer": torch.empty_like(p).copy_(buffer)}


def atomic_save(payload: dict[str, Any], folder: Path, rotate: bool = True) -> Path:
    """Write `folder/last.pt` so that a crash at any moment leaves a loadable file behind. The
    last.pt it replaces becomes previous.pt, unless `rotate` is False (that last.pt did not load).
    Any failure (a full disk, a folder that cannot be made) is one CheckpointError naming the
    file, and leaves no partial file behind."""
    final = folder / LAST
    tmp = folder / f".{LAST}.tmp{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        # The last.pt being replaced is kept under a link first and becomes previous.pt only once
        # the new one is in place: renamed over previous.pt first, a write that failed or died
        # between the two renames left previous.pt a second name of last.pt, the older one lost.
        kept_last = _keep_a_link(final, folder) if rotate and final.exists() else None
        os.replace(tmp, final)
    except (OSError, RuntimeError) as exc:  # torch.save's zip writer reports a full disk as RuntimeError
        # A full disk stays full with a partial checkpoint (or previous.pt's copy) on it.
        for partial in (tmp, _rotation_link(folder)):
            with contextlib.suppress(OSError):  # e.g. no folder to hold it
                partial.unlink(missing_ok=True)
        kept = f"; {final} from before is kept" if os.path.exists(final) else ""  # never raises
        raise CheckpointError(f"cannot write checkpoint {final}: {os_reason(exc)}{kept}") from exc
    if kept_last is not None:
        _make_previous(kept_last, folder)
    try:
        _sync_folder(folder)
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {final} was written but its folder could not be synced: {os_reason(exc)}"
        ) from exc
    return final


def _rotation_link(folder: Path) -> Path:
    return folder / f".{PREVIOUS}.tmp{os.getpid()}"


def _keep_a_link(final: Path, folder: Path) -> Path:
    """A second name (a hard link, or a copy) of the last.pt about to be replaced."""
    link = _rotation_link(folder)
    if link.exists():
        link.unlink()
    _link_or_copy(final, link)
    return link


def _make_previous(link: Path, folder: Path) -> None:
    """The replaced last.pt, kept by `_keep_a_link`, becomes previous.pt. The new last.pt is in
    place by then: a failure here is a warning (previous.pt stays the one before), not a failed
    checkpoint."""
    try:
        os.replace(link, folder / PREVIOUS)
        # rename(2) does nothing when both names are links to one file (previous.pt and the old
        # last.pt, as an interrupted rotation of earlier versions left them): the link would stay.
        link.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("checkpoint %s was written, but %s was not updated (%s)", folder / LAST, folder / PREVIOUS,
                    os_reason(exc))  # fmt: skip
        with contextlib.suppress(OSError):
            link.unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def os_reason(exc: BaseException) -> str:
    """The operating system's words for a failed write ("No space left on device"), also where
    a library wrapped its OSError in another exception; else the exception's own message."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return str(exc)


# What link(2) returns on file systems without hard links (vfat, some FUSE and object-store mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` as a hard link to `source`, or where the file system has none, a synced copy
    (slower, and twice the space for a moment, but last.pt still exists at every instant)."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        shutil.copyfile(source, target)
        with open(target, "rb+") as f:
            os.fsync(f.fileno())


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files of writes that a crash interrupted. Each holds a whole
    checkpoint (about 250 MB for ImageNet AlexNet) and restarted writers have other PIDs, so
    without this every crash during a write would leave one behind. One process writes a run's
    checkpoints, so no other write can be in flight."""
    for pattern in (f".{LAST}.tmp*", f".{PREVIOUS}.tmp*"):
        for stale in folder.glob(pattern):
            stale.unlink(missing_ok=True)


def same_file(a: str | Path | None, b: str | Path | None) -> bool:
    """Whether two spellings of a path (relative, with ~, through a symbolic link) lead to the
    same place; a path spelled the same is the same file even where it no longer resolves alike."""
    if a is None or b is None:
        return False
    return str(a) == str(b) or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with weights_only=True (no code runs from the file); errors name the file, in one line.
    A file that is no checkpoint at all (an export, a text file) says what it is instead."""
    payload = load_torch_file(path)
    if is_state_dict(payload):  # an export's .torchvision.pth, torchvision's own file: weights alone
        raise CheckpointError(
            f"{path} is not a checkpoint of this trainer but a weights file (a state dict: no optimizer, "
            f"schedule, data position or config); model.weights={path} starts a training run from it"
        )
    if isinstance(payload, dict) and isinstance(payload.get("format"), int) and payload["format"] > FORMAT_VERSION:
        raise CheckpointUnusableHere(
            f"checkpoint {path} is of format {payload['format']}, written by a newer version of this trainer "
            f"(this one reads format {FORMAT_VERSION})"
        )
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a format-{FORMAT_VERSION} checkpoint of this trainer")
    return payload


def is_state_dict(value: Any) -> bool:
    """Parameter names mapped to tensors: a weights file (model.weights takes one), no checkpoint."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def checkpoint_in(folder: Path) -> Path:
    """The checkpoint a folder's name points to: a run folder's latest (the run folder was given
    for its checkpoints/ folder, and the hint named RUN/last.pt, which no run has), else its own."""
    in_run = folder / "checkpoints" / LAST
    return in_run if in_run.is_file() else folder / LAST


def load_torch_file(path: Path, noun: str = "checkpoint", kind: str = "checkpoint of this trainer") -> Any:
    """What torch.save wrote to `path`, loaded with weights_only=True. Errors are CheckpointErrors
    in one line: "<noun> <path> cannot be loaded (...)", or "<path> is not a <kind> (...)" for a
    file torch.save did not write (an export, a text file)."""
    if path.is_dir():
        raise CheckpointError(f"{noun} {path} is a folder; name a checkpoint file in it (e.g. {checkpoint_in(path)})")
    if path.is_symlink() and not path.exists():
        raise CheckpointUnusableHere(f"{noun} {path} is a link to {os.readlink(path)}, which is not there")
    if not path.is_file():
        raise CheckpointError(f"{noun} {path} does not exist")
    head = _read_head(path, noun)
    # Told apart before torch.load, which would hand a TorchScript archive to torch.jit.load, warning first.
    foreign, damaged = _read_zip(path, noun) if head.startswith(ZIP_MAGIC) else (None, None)
    if foreign is not None:
        raise CheckpointError(f"{path} is not a {kind} ({foreign})")
    if damaged is not None:
        raise CheckpointError(
            f"{noun} {path} cannot be loaded (its member {damaged} does not match the CRC-32 stored with it: "
            "the file changed on disk or in a copy after it was written)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:  # a whole file this machine cannot hold: not damage to fall back past
        raise
    except Exception as exc:  # truncated, unsafe pickle, or no PyTorch file at all
        if isinstance(exc, OSError) and exc.errno in _NOT_DAMAGE:
            # Storage lost while the file is read (ESTALE, ENOTCONN), or refused to this user: not
            # damage. (A cut file's seek gives EINVAL: damage, below.)
            raise CheckpointUnusableHere(f"{noun} {path} cannot be read: {os_reason(exc)}") from exc
        if not _pytorch_like(head):
            raise CheckpointError(f"{path} is not a {kind} ({_foreign_kind(head)})") from exc
        raise CheckpointError(f"{noun} {path} cannot be loaded ({_load_failure(exc, head)})") from exc


# How the files that torch.save writes begin: a zip archive (PyTorch >= 1.6), a pickle (the older
# format, protocol 2 and up), a tar archive (before 0.4; its "ustar" at byte 257).
ZIP_MAGIC = b"PK\x03\x04"
_HEAD_BYTES = 512
# An ONNX file is a protobuf ModelProto: ir_version (field 1, a varint) first, then the producer
# name (2) or another of its fields (3-8, as torch.onnx writes them).
_ONNX_SECOND_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42})
_EXPORTED = "launch/export.py writes those from a checkpoint; name the checkpoint itself"


_NOT_DAMAGE = {errno.EACCES, errno.EPERM, errno.ESTALE, errno.ENOTCONN}


def _read_head(path: Path, noun: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(_HEAD_BYTES)
    except OSError as exc:
        raise _read_failure(exc, path, noun) from exc


def _read_failure(exc: OSError, path: Path, noun: str) -> CheckpointError:
    """Refused to this user, or on storage gone (a lost NFS handle or FUSE mount): the file may
    be whole. A read error of the disk (EIO) is damage, as a cut file is."""
    kind = CheckpointUnusableHere if exc.errno in _NOT_DAMAGE else CheckpointError
    return kind(f"{noun} {path} cannot be read: {os_reason(exc)}")


def _read_zip(path: Path, noun: str) -> tuple[str | None, str | None]:
    """(What a complete zip archive holds if it is not torch.save's, the first member whose bytes
    do not match their CRC-32); (None, None) for a sound torch.save archive, and for one whose
    directory (at its end) does not read: a torn write, for torch.load to name. torch.load does
    not check the checksums: a flipped bit (a disk, a copy between clusters) loaded as a changed
    weight without a word, where a resume can fall back to previous.pt."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        return None, None
    with archive:
        names = [name.split("/", 1)[-1] for name in archive.namelist()]  # below the archive's own folder
        if "constants.pkl" in names:  # what torch.jit.save adds and torch.save does not write
            return f"a TorchScript archive: {_EXPORTED}", None
        if "data.pkl" not in names:
            return "a zip archive that torch.save did not write", None
        try:
            return None, archive.testzip()
        except (zipfile.BadZipFile, ValueError, EOFError, zlib.error):
            return None, None
        except OSError as exc:
            raise _read_failure(exc, path, noun) from exc


def _pytorch_like(head: bytes) -> bool:
    """Begins as a file torch.save writes, or as one it was writing when it was cut off: those are
    damaged checkpoints (the resume falls back from them), not other kinds of file."""
    return (
        head.startswith(ZIP_MAGIC)
        or ZIP_MAGIC.startswith(head)  # also an empty file
        or head[:1] == b"\x80"
        or head[257:262] == b"ustar"
        or head.count(0) == len(head)  # zeros: a write whose data never reached the disk
    )


def _foreign_kind(head: bytes) -> str:
    if head[:1] == b"\x08" and len(head) > 2 and head[1] < 0x80 and head[2] in _ONNX_SECOND_TAGS:
        return f"an ONNX model: {_EXPORTED}"
    return "not a PyTorch file"


def _load_failure(exc: Exception, head: bytes) -> str:
    """torch.load's reason in one line, without its advice to load with weights_only=False (which
    runs whatever code the file holds)."""
    if not head:
        return "the file is empty"
    if ZIP_MAGIC.startswith(head):
        return f"it ends after {len(head)} bytes: a write that was cut off"
    if head.count(0) == len(head):
        return "it begins with zero bytes only: a write whose data did not reach the disk"
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # an object that needs code to be rebuilt
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
        return f"it holds what weights_only=True does not load: {_first_sentence(text)}"
    if "weights_only" in text:
        return f"{type(exc).__name__}: {_first_sentence(text)}"
    return f"{type(exc).__name__}: {' '.join(text.split())}"


def _first_sentence(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.split(". ", 1)[0].rstrip(".")


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Strict load with a message that says which parameters do not fit."""
    problems = state_mismatches(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {problems}")
    model.load_state_dict(state, strict=True)


def state_mismatches(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], may_lack: frozenset[str] = frozenset()
) -> str:
    """What keeps `state` from loading into a model whose state dict is `own` ("" if nothing): the
    first few names missing (but those in `may_lack`), unexpected, or of another shape."""
    missing = sorted(set(own) - set(state) - may_lack)
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:4])}")
    if unexpected:
        parts.append(f"unexpected {', '.join(unexpected[:4])}")
    if wrong:
        parts.append(
            "shape mismatch " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:4])
        )
    return "; ".join(parts)
