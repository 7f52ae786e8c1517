"""A new run's starting weights (`model.weights`): torchvision's AlexNet file, an export's
`.torchvision.pth`, another run's checkpoint, or any state dict of the chosen variant.

Only a run's first session reads them: later sessions continue the run's own checkpoint. Every
tensor must fit the model by name and shape, except the last layer's (fc8), which keeps its fresh
initialisation where it cannot stand for this data's classes: another number of outputs, or a
checkpoint trained on other class folders. That is how fine-tuning starts.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alexnet.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    is_state_dict,
    load_torch_file,
    same_file,
    state_mismatches,
)
from alexnet.config import ConfigError
from alexnet.model import head_pieces

log = logging.getLogger("alexnet")

# Where other tools keep a state dict inside their checkpoints: torchvision's reference training
# scripts ("model") and PyTorch Lightning ("state_dict", its names after the attribute that holds
# the network: _without_holder_prefix).
_NESTED_KEYS = ("model", "state_dict")
# Name prefixes of a model saved while wrapped: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class StartWeights:
    """What a run took from its `model.weights` file."""

    path: Path
    loaded: int  # tensors taken from the file
    fresh_head: str  # why fc8 kept its initialisation; "" when it came from the file too
    digest: str  # of the tensors taken: the same wherever the same weights are read
    # A checkpoint's data.mean and data.std where this run normalises its images otherwise: the
    # weights expect other inputs ("" when they are the same, or unknown: a file without a config).
    other_inputs: str = ""


@dataclass(frozen=True)
class WeightsFile:
    """What a weights file holds for a new run."""

    state: dict[str, torch.Tensor]
    classes: list[str] | None  # the class folders a checkpoint of this trainer was trained on
    normalisation: tuple[list[float], list[float]] | None  # its data.mean and data.std


def apply_start_weights(
    model: nn.Module, path: str | Path, classes: list[str] | None, normalisation: tuple[list[float], list[float]]
) -> StartWeights:
    """Load `path`'s weights into the single-device `model` (built and initialised). `classes`:
    the training data's class folders (None for synthetic data), held against a checkpoint's;
    `normalisation`: this run's data.mean and data.std, likewise."""
    found = read_state_dict(Path(path))
    own = model.state_dict()
    state = _without_holder_prefix(found.state, own)
    head = frozenset(f"{piece}.{kind}" for piece in head_pieces(model)["fc8"] for kind in ("weight", "bias"))
    fresh_head = _fresh_head_reason(state, own, head, found.classes, classes)
    taken = {k: v for k, v in state.items() if not (fresh_head and k in head)}
    problems = state_mismatches(own, taken, may_lack=head if fresh_head else frozenset())
    if problems:
        raise ConfigError(
            f"config key 'model.weights': {path} does not fit this model ({problems}); model.variant, "
            "model.fc_width and, for the paper variant, data.crop shape it"
        )
    _check_values(taken, path)
    model.load_state_dict(taken, strict=False)  # what it lacks is the fresh head alone (checked above)
    return StartWeights(path, len(taken), fresh_head, weights_digest(taken), _other_inputs(found, normalisation))


def read_state_dict(path: Path) -> WeightsFile:
    """The state dict in `path` and, for this trainer's checkpoints, the class folders and the
    normalisation it was trained with. Loaded with weights_only=True: no code runs from the file
    (torchvision's reference scripts store their arguments as an argparse.Namespace, allowed: it
    holds values). Raises ConfigError where `path` names no file, CheckpointError where the file
    cannot be read or holds no state dict (launch/train.py: exit 2 and 1)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            content = load_torch_file(path, noun="weights file", kind="PyTorch weights file")
    except CheckpointError as exc:
        # No file at that path (or a folder) is the command's to change (exit 2); a file that is
        # there but damaged, or of another kind (an export, a text file), is the file's problem
        # (exit 1), as the same file given to checkpoint.resume= is.
        # A link to nothing is missing too, as for checkpoint.resume.
        kind = ConfigError if not path.is_file() else type(exc)
        raise kind(f"config key 'model.weights': {exc}") from exc
    classes, normalisation = None, None
    if isinstance(content, dict) and content.get("format") == FORMAT_VERSION:  # this trainer's checkpoint
        saved = content.get("classes")
        classes = saved if isinstance(saved, list) else None
        normalisation = _saved_normalisation(content.get("config"))
        content = content.get("model")
    elif isinstance(content, dict) and not is_state_dict(content):
        content = next((content[k] for k in _NESTED_KEYS if is_state_dict(content.get(k))), content)
    if not is_state_dict(content):  # a file of another kind: what it holds is the problem
        raise CheckpointError(
            f"config key 'model.weights': {path} holds no state dict (parameter names mapped to tensors"
            f"{_not_tensors(content)}); give torchvision's AlexNet file, an export's .torchvision.pth or "
            "a checkpoint of this trainer"
        )
    return WeightsFile(_unwrapped(content), classes, normalisation)


def check_resumed_weights(saved_config: Any, weights: str, run_dir: Path) -> None:
    """A resume continues the run's own weights and never reads model.weights. Left out, or
    naming the file the run started from, it is fine; another file (added, or changed, on a
    command that resumes) would be recorded as the run's start while the run never read it, and
    is refused, naming both."""
    saved = recorded_weights(saved_config)
    if not weights or (saved and same_file(saved, weights)):
        return
    started = f"from the weights in {saved}" if saved else "without model.weights"
    raise ConfigError(
        f"config key 'model.weights': run folder {run_dir} holds a run started {started}, which this session "
        f"would continue (a run reads model.weights at its start only); to start from {weights}, give the run "
        "a folder of its own with run.name=<new name>, or leave model.weights out to continue (nothing was written)"
    )


def recorded_weights(saved_config: Any) -> str:
    """The model.weights a checkpoint's config records: the file its run started from, or ""."""
    model = saved_config.get("model") if isinstance(saved_config, dict) else None
    saved = model.get("weights", "") if isinstance(model, dict) else ""
    return saved if isinstance(saved, str) else ""


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of the names, shapes, types and bytes of `state`'s tensors."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # its buffer, not a copy
    return digest.hexdigest()


def describe_start(start: StartWeights) -> str:
    """One log line: where the weights came from and what of them the run took."""
    head = f"fc8 initialised afresh ({start.fresh_head})" if start.fresh_head else "fc8 included"
    return f"started from the weights in {start.path}: {start.loaded} tensors, {head}"


def _fresh_head_reason(
    state: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    head: frozenset[str],
    file_classes: list[str] | None,
    classes: list[str] | None,
) -> str:
    """Why fc8 keeps its initialisation; "" when the file's fc8 is taken, or when it is malformed
    (part of it missing, rows that are not its outputs' or inputs of another width): then it is
    named with the tensors that do not fit."""
    present = head & set(state)
    if not present:
        return "the file holds no fc8"
    if present != head:
        return ""
    if all(state[k].shape == own[k].shape for k in head):
        if file_classes is not None and classes is not None and file_classes != classes:
            return "the checkpoint was trained on other class folders"
        return ""
    weights = sorted(k for k in head if k.endswith(".weight"))
    for name in weights:
        bias = state[name.removesuffix(".weight") + ".bias"]
        if state[name].ndim != 2 or state[name].shape[1] != own[name].shape[1] or bias.shape != state[name].shape[:1]:
            return ""
    outputs = sum(state[k].shape[0] for k in weights)
    return f"the file's fc8 has {outputs} outputs, this model's {sum(own[k].shape[0] for k in weights)}"


def _saved_normalisation(config: Any) -> tuple[list[float], list[float]] | None:
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("mean"), list) or not isinstance(data.get("std"), list):
        return None
    return _as_floats((data["mean"], data["std"]))


def _as_floats(normalisation: tuple[list[float], list[float]]) -> tuple[list[float], list[float]]:
    mean, std = normalisation
    return [float(v) for v in mean], [float(v) for v in std]


def _other_inputs(found: WeightsFile, normalisation: tuple[list[float], list[float]]) -> str:
    if found.normalisation is None:
        return ""
    mine = _as_floats(normalisation)
    if found.normalisation == mine:
        return ""
    (mean, std), (my_mean, my_std) = (map(_shown, pair) for pair in (found.normalisation, mine))
    return f"data.mean {mean} and data.std {std}, where this run uses {my_mean} and {my_std}"


def _shown(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"  # 57.12, not 57.120000000000005


def _check_values(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Tensors without data (saved from a model on the meta device) or with NaN or infinite
    values would fail at the first step with a message about gradients. They fit the model: what
    the file holds is bad, not the command (a CheckpointError, exit 1)."""
    for name, tensor in state.items():
        if tensor.is_meta:
            raise CheckpointError(f"config key 'model.weights': {path}: {name} holds no values (a meta tensor)")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"config key 'model.weights': {path}: {name} holds NaN or infinite values")


def _not_tensors(content: Any) -> str:
    """ "; its entries epoch, args are not tensors" for a mapping that is almost a state dict."""
    if not isinstance(content, dict) or not content:
        return ""
    others = [str(k) for k, v in content.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if len(others) == len(content):
        return ""
    return f"; not tensors: {', '.join(others[:4])}"


def _unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names as the bare model has them: a model saved inside DDP or torch.compile, in either
    order, prefixes each with the wrappers'."""
    while prefix := next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _without_holder_prefix(state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A network saved as an attribute of another module (a LightningModule's `self.model`,
    `self.net`) has that attribute's name before each of its names: read without it when none of
    the names is the model's and all share that first part."""
    if set(state) & set(own):
        return state
    first = {k.split(".", 1)[0] for k in state}
    if len(first) != 1 or not all("." in k for k in state):
        return state
    stripped = {k.split(".", 1)[1]: v for k, v in state.items()}
    return stripped if set(stripped) & set(own) else state
