"""A new run's starting weights (`model.weights`): torchvision's AlexNet file, an export's
`.torchvision.pth`, another run's checkpoint, or any state dict of the chosen variant.

Only a run's first session reads them: later sessions continue the run's own checkpoint. Every
tensor must fit the model by name and shape, except the last layer's (fc8), which keeps its fresh
initialisation where it cannot stand for this data's classes: another number of outputs, or a
checkpoint trained on other class folders. That is how fine-tuning starts.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alexnet.checkpoint import FORMAT_VERSION, CheckpointError, load_torch_file, state_mismatches
from alexnet.config import ConfigError
from alexnet.model import head_pieces

log = logging.getLogger("alexnet")

# Where other tools keep a state dict inside their checkpoints: torchvision's reference training
# scripts ("model") and PyTorch Lightning ("state_dict").
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


def apply_start_weights(model: nn.Module, path: Path, classes: list[str] | None) -> StartWeights:
    """Load `path`'s weights into the single-device `model` (built and initialised). `classes`:
    the training data's class folders (None for synthetic data), held against a checkpoint's."""
    state, file_classes = read_state_dict(path)
    own = model.state_dict()
    head = frozenset(f"{piece}.{kind}" for piece in head_pieces(model)["fc8"] for kind in ("weight", "bias"))
    fresh_head = _fresh_head_reason(state, own, head, file_classes, classes)
    taken = {k: v for k, v in state.items() if not (fresh_head and k in head)}
    problems = state_mismatches(own, taken, may_lack=head if fresh_head else frozenset())
    if problems:
        raise ConfigError(
            f"config key 'model.weights': {path} does not fit this model ({problems}); model.variant, "
            "model.fc_width and, for the paper variant, data.crop shape it"
        )
    model.load_state_dict(taken, strict=False)  # what it lacks is the fresh head alone (checked above)
    return StartWeights(path, len(taken), fresh_head, weights_digest(taken))


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """The state dict in `path` and, for this trainer's checkpoints, the class folders it was
    trained on. Loaded with weights_only=True: no code runs from the file."""
    try:
        content = load_torch_file(path, noun="weights file", kind="PyTorch weights file")
    except CheckpointError as exc:
        raise ConfigError(f"config key 'model.weights': {exc}") from exc
    classes = None
    if isinstance(content, dict) and content.get("format") == FORMAT_VERSION:  # this trainer's checkpoint
        saved = content.get("classes")
        classes = saved if isinstance(saved, list) else None
        content = content.get("model")
    elif isinstance(content, dict) and not _is_state_dict(content):
        content = next((content[k] for k in _NESTED_KEYS if _is_state_dict(content.get(k))), content)
    if not _is_state_dict(content):
        raise ConfigError(
            f"config key 'model.weights': {path} holds no state dict (parameter names mapped to tensors); "
            "give torchvision's AlexNet file, an export's .torchvision.pth or a checkpoint of this trainer"
        )
    return _unwrapped(content), classes


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of the names, shapes, types and bytes of `state`'s tensors."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
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
    if not head <= set(state):
        return "the file holds no fc8"
    if any(state[k].shape != own[k].shape for k in head):
        outputs = sum(state[k].shape[0] for k in head if k.endswith(".bias"))
        mine = sum(own[k].shape[0] for k in head if k.endswith(".bias"))
        return f"the file's fc8 has {outputs} outputs, this model's {mine}"
    if file_classes is not None and classes is not None and file_classes != classes:
        return "the checkpoint was trained on other class folders"
    return ""


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names as the bare model has them: a model saved inside DDP or torch.compile prefixes each."""
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state
