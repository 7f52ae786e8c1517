"""Export a trained model: TorchScript, ONNX, and a plain torchvision state dict.

Both variants export to TorchScript and ONNX from the eval-mode model (dropout is the identity, so
CounterDropout's training-only code never runs). TorchScript uses tracing: the forward pass of
either variant has no data-dependent control flow, and the paper model's tower loop and exchange
callable, which `torch.jit.script` cannot compile, are unrolled by the trace. ONNX uses
`torch.onnx.export(dynamo=True)` (the TorchScript-based exporter cannot export the torchvision
variant's adaptive pooling at small inputs). The batch dimension stays dynamic in both; every
export is run on a batch of another size and compared with PyTorch's output before it is kept:
each file is written under a temporary name of its own (per process) beside its final one and
renamed into place only once its check passes, so a failed export leaves nothing behind and never
replaces an earlier good one, and exports into one folder at once each keep a complete file.

The torchvision variant's parameter names are those of `torchvision.models.alexnet`, so its
checkpoint's state dict loads there strictly, with nothing renamed.

Every export carries `ExportMetadata` (the class names in output order, validation's preprocessing,
the source checkpoint): in the ONNX model's metadata_props, in the TorchScript archive's extra file
`alexnet.json`, and for the `.torchvision.pth`, which stays a bare state dict, in
`<name>.torchvision.json` beside it, written with it (one sidecar for all formats described the
latest export of that name, not the other formats' files of earlier exports left beside it).
`read_export_metadata` reads it back from any of them.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import socket
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

from alexnet.config import ModelConfig
from alexnet.inference import LoadedModel, build_model_from_checkpoint
from alexnet.model import FC_WIDTH
from pipelines.outputs import OutputPathError, process_runs, write_text_atomic

log = logging.getLogger("alexnet")
FORMATS = ("torchscript", "onnx", "torchvision")
SUFFIXES = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "torchvision": ".torchvision.pth"}
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")  # the [export] extra: exporter, its dynamo backend, the check
METADATA_FILE = "alexnet.json"  # the TorchScript archive's extra file
SIDECAR = "sidecar"  # the kind of `<name>.torchvision.json` for check_replaceable_export
SIDECAR_SUFFIX = ".torchvision.json"
METADATA_VERSION = 1
# Validation's centre-crop preprocessing (pipelines/torchvision_loader.py: ResizeShorter,
# CenterCropHalfUp, Normalize; DALI's resize_shorter and crop round alike), said in the metadata
# itself, so that a file passed on without the README still says how to feed it.
PREPROCESS = (
    "RGB; shorter side resized to resize (bilinear; the longer side to int(longer * resize / shorter + 0.5)); "
    "the centre input_size x input_size square, at offset (length - input_size + 1) // 2 along each axis; "
    "pixel values on the 0-255 scale minus mean, divided by std, per channel; NCHW float32. Outputs: logits, "
    "in the order of classes"
)


class ExportSetupError(RuntimeError):
    """A requested format whose packages are not installed; raised before anything is exported."""


class ExportFormatError(ValueError):
    """A requested format that cannot hold the checkpoint's model (torchvision's AlexNet for the
    paper variant, or another fc_width): the command must change; raised before anything is exported."""


class ExportCheckError(RuntimeError):
    """An exported model's output differs from PyTorch's beyond the tolerance."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class ExportCheck:
    path: Path
    max_abs_diff: float
    max_abs_output: float
    batch: int


@dataclass(frozen=True)
class ExportMetadata:
    """What an export's user needs beside the graph, the same in every export of one checkpoint:
    which output is which class, and how validation turned an image into the input. As JSON: an
    object of these fields (in ONNX, one metadata_props entry per field, its value JSON text)."""

    variant: str  # model.variant
    num_classes: int
    # The class folder names in output order, one per output: None for an output no folder
    # trained (model.num_classes above the folders' count); None for all: a checkpoint from
    # before they were kept.
    classes: list[str | None] | None
    input_size: int  # data.crop: the input is [N, 3, input_size, input_size]
    resize: int  # data.resize: validation resized the shorter side to it before the centre crop
    mean: list[float]  # data.mean, subtracted from pixel values on the 0-255 scale
    std: list[float]  # data.std, on the same scale
    checkpoint: str  # the source checkpoint, as an absolute path
    step: int | None  # its optimizer steps taken (None where its progress does not say)
    epoch: int | None  # its epochs completed
    channels: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"
    pixel_range: tuple[int, int] = (0, 255)  # the scale of the pixel values mean and std apply to
    preprocess: str = PREPROCESS
    alexnet_export: int = METADATA_VERSION  # this layout's version; marks a sidecar

    def as_json(self) -> dict[str, Any]:
        """The fields as JSON holds them (the tuple as a list): what each export's copy reads back as."""
        return json.loads(json.dumps(asdict(self)))


def export_metadata(loaded: LoadedModel) -> ExportMetadata:
    cfg, progress = loaded.config, loaded.progress
    step, epoch = progress.get("step"), progress.get("epoch")
    return ExportMetadata(
        variant=cfg.model.variant,
        num_classes=loaded.num_classes,
        classes=output_classes(loaded),
        input_size=cfg.data.crop,
        resize=cfg.data.resize,
        mean=[float(v) for v in cfg.data.mean],
        std=[float(v) for v in cfg.data.std],
        checkpoint=os.path.abspath(loaded.path),  # absolute: the export is read from elsewhere
        step=step if isinstance(step, int) else None,
        epoch=epoch if isinstance(epoch, int) else None,
    )


def output_classes(loaded: LoadedModel) -> list[str | None] | None:
    """The class of each output column: the checkpoint's folder names, then None for the outputs
    no folder trained, so that `classes[argmax]` never falls off the list (it named 10 classes
    for a model of 20 outputs)."""
    if loaded.classes is None:
        return None
    return [*loaded.classes, *[None] * (loaded.num_classes - len(loaded.classes))]


def metadata_props(metadata: ExportMetadata) -> dict[str, str]:
    """The ONNX model's metadata_props: string keys, JSON text values."""
    return {key: json.dumps(value) for key, value in metadata.as_json().items()}


_METADATA_KEYS = frozenset(f.name for f in fields(ExportMetadata))


class ExportMetadataError(RuntimeError):
    """An export without its metadata: one written before exports carried it, or another file."""


def read_export_metadata(path: Path) -> dict[str, Any]:
    """The metadata an export carries (ExportMetadata's fields as JSON), from an ONNX model, a
    TorchScript archive, or for a `.torchvision.pth` its sidecar (or the sidecar itself). An
    export without it raises ExportMetadataError."""
    path = Path(path)
    if path.name.endswith(SUFFIXES["onnx"]):
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        found = {p.key: json.loads(p.value) for p in model.metadata_props if p.key in _METADATA_KEYS}
    elif path.name.endswith(SUFFIXES["torchscript"]):
        found = torchscript_metadata(path) or {}
    else:
        if path.name.endswith(SUFFIXES["torchvision"]):
            path = sidecar_path(path.parent, path.name.removesuffix(SUFFIXES["torchvision"]))
        found = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if not isinstance(found, dict) or "alexnet_export" not in found:
        raise ExportMetadataError(
            f"{path} carries no export metadata (exported before exports carried it, or not an export): "
            "export its checkpoint again"
        )
    return found


def sidecar_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}{SIDECAR_SUFFIX}"


def _check_metadata(path: Path, found: Any, metadata: ExportMetadata) -> None:
    """The metadata read back from a staged export is the metadata written into it."""
    if found != metadata.as_json():
        raise ExportCheckError(path, f"its metadata reads back as {str(found)[:200]}, not as written")


def example_input(input_size: int, batch: int = 2, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, input_size, input_size, generator=g)


def compare_outputs(expected: Tensor, got: Tensor | np.ndarray, path: Path, rtol: float, atol: float) -> ExportCheck:
    got_t = torch.as_tensor(np.asarray(got)) if not isinstance(got, Tensor) else got
    if tuple(got_t.shape) != tuple(expected.shape):
        raise ExportCheckError(path, f"output shape {tuple(got_t.shape)}, PyTorch gives {tuple(expected.shape)}")
    diff = float((got_t.float() - expected.float()).abs().max())
    scale = float(expected.abs().max())
    if not diff <= atol + rtol * scale:
        raise ExportCheckError(
            path,
            f"outputs differ from PyTorch by up to {diff:.3g} (outputs up to {scale:.3g}; "
            f"allowed {atol:g} + {rtol:g} x {scale:.3g})",
        )
    return ExportCheck(path, diff, scale, int(expected.shape[0]))


@torch.no_grad()
def export_torchscript(model: nn.Module, example: Tensor, path: Path, metadata: ExportMetadata | None = None) -> Path:
    model.eval()
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but TorchScript is still what C++
        # (libtorch) deployments load; the warning would only repeat that.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        # LRN's `if input.numel() == 0` becomes a constant in the trace: right for any real batch.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {METADATA_FILE: json.dumps(metadata.as_json(), indent=2)} if metadata is not None else {}
        torch.jit.save(traced, str(path), _extra_files=extra)
    return path


def load_torchscript(path: Path, extra_files: dict[str, Any] | None = None) -> torch.jit.ScriptModule:
    """The archive at `path`; `extra_files`' names are filled in with the archive's files of those
    names (as torch.jit.load does: "" where the archive has none)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        return torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)


def torchscript_metadata(path: Path) -> dict[str, Any] | None:
    """The metadata in a TorchScript archive's extra file, read from the zip (the archive is not
    loaded: hundreds of MB, and torch.jit.load warns of its deprecation); None where it has none."""
    with zipfile.ZipFile(path) as archive:
        for entry in archive.namelist():
            if entry.split("/", 1)[-1] == f"extra/{METADATA_FILE}":
                return json.loads(archive.read(entry))
    return None


def load_torchscript_with_metadata(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any] | None]:
    """The archive and the metadata in its extra file (None where it has none: an older export)."""
    files = {METADATA_FILE: ""}
    module = load_torchscript(path, files)
    return module, json.loads(files[METADATA_FILE]) if files[METADATA_FILE] else None


@torch.no_grad()
def check_torchscript(
    path: Path,
    model: nn.Module,
    check: Tensor,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    metadata: ExportMetadata | None = None,
) -> ExportCheck:
    loaded, found = load_torchscript_with_metadata(path)
    if metadata is not None:
        _check_metadata(path, found, metadata)
    return compare_outputs(model.eval()(check), loaded(check), path, rtol, atol)


@torch.no_grad()  # inference graph only: no autograd.Function (the paper model's LRN) to record
def export_onnx(model: nn.Module, example: Tensor, path: Path, metadata: ExportMetadata | None = None) -> Path:
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The program first, saved once its metadata is added: saved at once, the file would be
    # loaded and written a second time for the metadata (244 MB each way at ImageNet's shapes).
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    assert program is not None  # the dynamo exporter returns its program
    if metadata is not None:  # added to what the exporter keeps there, if anything
        program.model.metadata_props.update(metadata_props(metadata))
    program.save(str(path), external_data=False)  # one self-contained file (AlexNet's 244 MB is under protobuf's 2 GB)
    return path


@torch.no_grad()
def check_onnx(
    path: Path,
    model: nn.Module,
    check: Tensor,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    metadata: ExportMetadata | None = None,
) -> ExportCheck:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if metadata is not None:  # onnxruntime reads metadata_props as the model's custom metadata
        props = session.get_modelmeta().custom_metadata_map
        _check_metadata(path, {k: json.loads(v) for k, v in props.items() if k in _METADATA_KEYS}, metadata)
    (got,) = session.run(None, {session.get_inputs()[0].name: check.numpy()})
    return compare_outputs(model.eval()(check), got, path, rtol, atol)


def default_formats(model_cfg: ModelConfig) -> list[str]:
    """Every format that can hold the model: torchvision's AlexNet only the torchvision variant
    at torchvision's width."""
    fits_torchvision = model_cfg.variant == "torchvision" and model_cfg.fc_width == FC_WIDTH
    return [f for f in FORMATS if f != "torchvision" or fits_torchvision]


def to_torchvision_alexnet(state: dict[str, Tensor], num_classes: int) -> torchvision.models.AlexNet:
    """`torchvision.models.alexnet(num_classes=...)` holding a torchvision-variant checkpoint's
    weights, loaded strictly (a missing or extra parameter is an error)."""
    model = torchvision.models.alexnet(weights=None, num_classes=num_classes)
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_torchvision_state(model: nn.Module, path: Path) -> Path:
    """The weights alone, loadable with torchvision.models.alexnet().load_state_dict(torch.load(path))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path


@torch.no_grad()
def export_torchvision(model: nn.Module, num_classes: int, path: Path, check: Tensor) -> ExportCheck:
    """Save the weights for torchvision, load them back into torchvision's own AlexNet and compare."""
    save_torchvision_state(to_torchvision_alexnet(model.state_dict(), num_classes), path)
    reloaded = to_torchvision_alexnet(torch.load(path, map_location="cpu", weights_only=True), num_classes)
    return compare_outputs(model.eval()(check), reloaded(check), path, rtol=1e-6, atol=1e-6)


def staged_name(final: Path) -> Path:
    """The temporary path beside `final` of this process and thread. A name shared by every
    export raced: two exports into one folder overwrote, renamed and deleted each other's
    half-written file (a traceback, or no file at all). With a name each, every export checks
    its own file and the last rename wins, a complete file either way."""
    return final.with_name(f".{final.name}.tmp{os.getpid()}-{threading.get_ident()}@{_host()}.partial")


def _host() -> str:
    """This machine's name as a file name can hold it: the staged files of several machines may
    share an exports folder (a network file system), and process ids are only this machine's."""
    return socket.gethostname().replace("/", "_") or "localhost"


def remove_abandoned_stages(final: Path) -> None:
    """The staged files of exports on this machine that were killed (SIGKILL, the out-of-memory
    killer) and so never removed their own: hidden, each as large as the export, left for good.
    Those of a process still running here, and every other machine's, are kept."""
    prefix, suffix = f".{final.name}.tmp", f"@{_host()}.partial"
    for stage in final.parent.glob(glob.escape(prefix) + "*" + glob.escape(suffix)):
        pid = stage.name.removeprefix(prefix).removesuffix(suffix).partition("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_runs(int(pid)):
            stage.unlink(missing_ok=True)


@contextmanager
def staged_file(final: Path) -> Iterator[Path]:
    """A temporary path beside `final` that becomes `final` only if the block succeeds; it is
    removed whatever happens (an error, an interrupt)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_stages(final)
    staged = staged_name(final)
    try:
        yield staged
        os.replace(staged, final)
    finally:
        staged.unlink(missing_ok=True)


def check_replaceable_export(final: Path, fmt: str) -> None:
    """An existing file at `final` is replaced only where it is what an earlier export of `fmt`
    writes: a --name that matched another file (a checkpoint copied there as NAME.torchscript.pt,
    notes in NAME.onnx) replaced it without a word. Raised before anything is exported."""
    if final.is_symlink():  # the rename would replace the link, not what it points to
        raise OutputPathError(
            f"{final} is a symbolic link; exports are written as files: remove it, or name another --name or --out"
        )
    if not final.exists():
        return
    if final.is_file() and _looks_exported(final, fmt):
        return
    earlier = f"an earlier {fmt} export" if fmt in FORMATS else "an earlier export"
    raise OutputPathError(
        f"{final} exists and is not what {earlier} writes ({_EXPORT_KINDS[fmt]}): name another "
        "--name or --out (nothing was overwritten)"
    )


_EXPORT_KINDS = {
    "torchscript": "a TorchScript archive",
    "onnx": "an ONNX model of PyTorch's exporter",
    "torchvision": "a state dict of torchvision's AlexNet",
    SIDECAR: "the JSON of a .torchvision.pth export's classes and preprocessing",
}
# A sidecar is a few KB (60 KB with ImageNet's 1000 class names); a larger file of its name is
# something else, and is not read whole to find that out.
_SIDECAR_MAX_BYTES = 64 << 20


def _looks_exported(path: Path, fmt: str) -> bool:
    """Whether `path` is of `_EXPORT_KINDS[fmt]`, from its first bytes or its index: an export is
    hundreds of MB, and none is read whole or run."""
    try:
        if fmt == "torchscript":  # a TorchScript archive holds its code; torch.save's archives do not
            with zipfile.ZipFile(path) as archive:  # reads the zip's directory only
                return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())
        if fmt == "onnx":
            return _onnx_from_pytorch(path)
        if fmt == SIDECAR:
            if path.stat().st_size > _SIDECAR_MAX_BYTES:
                return False
            content = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(content, dict) and "alexnet_export" in content
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mapped, not read
        with torch.device("meta"):  # the names only: no weights allocated, none initialised
            expected = torchvision.models.alexnet().state_dict().keys()
        return isinstance(state, dict) and state.keys() == expected
    except Exception:  # noqa: BLE001 - whatever fails to read as that kind is not of it
        return False


def _onnx_from_pytorch(path: Path) -> bool:
    """An ONNX ModelProto as torch.onnx.export writes it: field 1 (ir_version, a varint), then
    field 2 (producer_name) "pytorch"; read from its first bytes."""
    with path.open("rb") as f:
        head = f.read(64)
    if not head.startswith(b"\x08"):
        return False
    end = 1
    while end < len(head) and head[end] & 0x80:  # the varint's continuation bytes
        end += 1
    producer = b"\x12\x07pytorch"
    return head[end + 1 : end + 1 + len(producer)] == producer


def write_sidecar(final: Path, metadata: ExportMetadata) -> Path:
    """`metadata` as `final`, written whole or not at all (a reader finds the earlier file or the new one)."""
    write_text_atomic(final, json.dumps(metadata.as_json(), indent=2) + "\n")
    return final


def export_checked(final: Path, export_and_check: Callable[[Path], ExportCheck]) -> ExportCheck:
    """Run `export_and_check` on a staged path; the file is kept as `final` only if it passes."""
    with staged_file(final) as staged:
        try:
            result = export_and_check(staged)
        except ExportCheckError as exc:
            raise ExportCheckError(final, exc.reason) from None  # named as the user asked for it
    return replace(result, path=final)


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, name: str, formats: list[str] | tuple[str, ...] | None = None
) -> list[ExportCheck]:
    """Every requested format (default: `default_formats`), each checked on a batch of 3 after
    tracing with a batch of 2 (so a batch size baked into the graph fails); the `.torchvision.pth`
    with its sidecar, written once it is kept (a failed export leaves nothing)."""
    if isinstance(formats, str):  # iterated, "torchscript" was the unknown format 't'
        formats = [formats]
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    loaded = build_model_from_checkpoint(checkpoint)
    variant = loaded.config.model.variant
    asked = bool(formats)
    formats = list(formats) if formats else default_formats(loaded.config.model)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportFormatError(f"unknown export format {unknown[0]!r} (choose from {', '.join(FORMATS)})")
    # A format the checkpoint cannot hold is the command's to change (exit 2), said before the
    # packages a format needs.
    if "torchvision" in formats and variant != "torchvision":
        raise ExportFormatError(
            f"--format torchvision: checkpoint {checkpoint} is the {variant!r} variant; only 'torchvision' checkpoints "
            "load into torchvision.models.alexnet (the paper's two towers and LRN have no counterpart there)"
        )
    if "torchvision" in formats and loaded.config.model.fc_width != FC_WIDTH:
        raise ExportFormatError(
            f"--format torchvision: checkpoint {checkpoint} has fc6 and fc7 {loaded.config.model.fc_width} wide "
            f"(model.fc_width); torchvision.models.alexnet's are {FC_WIDTH}"
        )
    missing = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None] if "onnx" in formats else []
    if missing:  # checked first: an ONNX export that fails on an import would come after the others
        hint = f'ONNX export needs {", ".join(missing)}: pip install -e ".[export]"'
        if asked:
            raise ExportSetupError(f"{hint} (or leave onnx out of --format)")
        log.warning("%s; exporting the other formats", hint)
        formats.remove("onnx")
    model, size, metadata = loaded.model, loaded.config.data.crop, export_metadata(loaded)
    example, check = example_input(size, batch=2, seed=0), example_input(size, batch=3, seed=1)
    finals = {fmt: out_dir / f"{name}{SUFFIXES[fmt]}" for fmt in formats}
    sidecar = sidecar_path(out_dir, name)
    for fmt, final in [*finals.items(), *([(SIDECAR, sidecar)] if "torchvision" in formats else [])]:
        check_replaceable_export(final, fmt)
    steps: dict[str, Callable[[Path], ExportCheck]] = {
        "torchscript": lambda path: check_torchscript(
            export_torchscript(model, example, path, metadata), model, check, metadata=metadata
        ),
        "onnx": lambda path: check_onnx(export_onnx(model, example, path, metadata), model, check, metadata=metadata),
        "torchvision": lambda path: export_torchvision(model, loaded.num_classes, path, check),
    }
    results = []
    for fmt in formats:
        results.append(export_checked(finals[fmt], steps[fmt]))
        if fmt == "torchvision":  # its only copy of the metadata, at once: the file beside it is this export's
            write_sidecar(sidecar, metadata)
    warn_of_other_sources(out_dir, name, formats, metadata)
    return results


def warn_of_other_sources(out_dir: Path, name: str, written: list[str], metadata: ExportMetadata) -> None:
    """A warning for each earlier export of `name` in a format not written now whose source is
    another checkpoint (or another step of it), or cannot be told: `--format onnx` of a newer
    checkpoint left the .torchscript.pt of an older one under the same name without a word. Left
    as they are (an export deletes nothing it did not write)."""
    this = _source_text(metadata.checkpoint, metadata.step)
    for fmt in FORMATS:
        path = out_dir / f"{name}{SUFFIXES[fmt]}"
        if fmt in written or not path.is_file() or not _looks_exported(path, fmt):
            continue
        said = other_source(path, metadata)
        if said is not None:
            log.warning("%s, beside this export of %s, is %s; it was left as it was: export --format %s again, or "
                        "remove it", path, this, said, fmt)  # fmt: skip


def other_source(path: Path, metadata: ExportMetadata) -> str | None:
    """None where the export at `path` is of the checkpoint and step `metadata` names (the same
    file, however reached); else what it is, in a few words. Never raises: a warning must not
    cost an export already written (a damaged file beside it, ONNX without its package)."""
    try:
        found = read_export_metadata(path)
    except ExportMetadataError:
        return "an export that does not say of which checkpoint"
    except Exception as exc:  # noqa: BLE001 - whatever it is, the file's source cannot be read here
        return f"an export whose source cannot be read here ({type(exc).__name__}: {exc})"
    checkpoint, step = found.get("checkpoint"), found.get("step")
    if not isinstance(checkpoint, str):
        return "an export that does not say of which checkpoint"
    if os.path.realpath(checkpoint) == os.path.realpath(metadata.checkpoint) and step == metadata.step:
        return None
    return f"an export of {_source_text(checkpoint, step if isinstance(step, int) else None)}"


def _source_text(checkpoint: str, step: int | None) -> str:
    return f"{checkpoint}" + (f" (step {step})" if step is not None else "")
