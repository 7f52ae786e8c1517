"""A trained model back from a checkpoint, for evaluation and export.

The checkpoint's own config (payload["config"]) says which variant, input size and class count
the weights belong to, so a checkpoint needs no command-line flags to be rebuilt. The weights
load strictly (every parameter, every shape), and the model comes back in eval mode: dropout off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alexnet.checkpoint import LAST, CheckpointError, load_checkpoint, load_model_state
from alexnet.config import Config, ConfigError, config_from_dict
from alexnet.model import build_model
from alexnet.powersgd_checkpoint import FOLDER

# The bias of the last layer: its length is the number of classes (the paper's fc8 is split
# over the two towers).
_OUTPUT_BIASES = {"paper": ("fc8.0.bias", "fc8.1.bias"), "torchvision": ("classifier.6.bias",)}


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    config: Config
    num_classes: int
    path: Path
    progress: dict[str, Any]
    classes: list[str] | None = None  # the training class folders in output order (older checkpoints: None)


def num_classes_in_state(variant: str, state: dict[str, torch.Tensor], path: Path) -> int:
    keys = _OUTPUT_BIASES.get(variant, ())
    if not keys or any(k not in state for k in keys):
        raise CheckpointError(f"checkpoint {path} has no output layer {', '.join(keys)} for variant {variant!r}")
    return sum(int(state[k].numel()) for k in keys)


def load_config_of_checkpoint(payload: dict[str, Any], path: Path) -> Config:
    if "config" not in payload and _is_powersgd_state(payload):
        # Of the same format as a checkpoint (alexnet.powersgd_checkpoint), so it loads as one;
        # "holds no config" sent users looking for a config that such a file never has.
        raise CheckpointError(
            f"{path} is PowerSGD state of a run (one rank's error feedback, kept beside its checkpoint), not a "
            f"checkpoint: name the run's checkpoints/{LAST} instead{_run_checkpoint_hint(path)}"
        )
    if "config" not in payload:
        raise CheckpointError(f"checkpoint {path} holds no config (key 'config')")
    try:
        return config_from_dict(payload["config"], source=f"checkpoint {path}")
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: its stored config does not load: {exc}") from exc


def _is_powersgd_state(payload: dict[str, Any]) -> bool:
    """What `alexnet.powersgd_checkpoint.save_powersgd_state` writes: step, setup and state, no model."""
    return {"step", "setup", "state"} <= payload.keys() and "model" not in payload


def _run_checkpoint_hint(path: Path) -> str:
    """The run's checkpoint in brackets (runs/a/checkpoints/last.pt for
    runs/a/checkpoints/powersgd/rank0/last.pt), or "" for a file kept elsewhere."""
    rank_folder = path.parent
    if rank_folder.parent.name != FOLDER or not rank_folder.name.startswith("rank"):
        return ""
    return f" ({rank_folder.parent.parent / LAST})"


def build_model_from_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    path = Path(path)
    payload = load_checkpoint(path)
    cfg = load_config_of_checkpoint(payload, path)
    if "model" not in payload:
        raise CheckpointError(f"checkpoint {path} holds no model weights (key 'model')")
    state = payload["model"]
    num_classes = num_classes_in_state(cfg.model.variant, state, path)
    if cfg.model.num_classes and cfg.model.num_classes != num_classes:
        raise CheckpointError(
            f"checkpoint {path}: config says model.num_classes={cfg.model.num_classes}, the weights have {num_classes}"
        )
    m = cfg.model
    model = build_model(m.variant, num_classes, m.dropout, cfg.data.crop, m.init, m.fc_width)
    load_model_state(model, state, path)
    model.eval().to(device)
    classes = payload.get("classes")
    if classes is not None and (
        not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or len(classes) > num_classes
    ):
        raise CheckpointError(f"checkpoint {path}: 'classes' is not a list of at most {num_classes} folder names")
    return LoadedModel(model, cfg, num_classes, path, dict(payload.get("progress", {})), classes)
