"""Typed run configuration: dataclass defaults < YAML file < `key=value` overrides.

Unknown keys and wrong types fail with a message that names the key (and the closest valid key);
nothing mutates a Config after `load_config` returns. Numbers derived from it (global batch,
scaled learning rate, run folder) live in `alexnet.plan.RunPlan`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from alexnet.hostmem import HostMemory
from alexnet.model import fc_width_fits, min_input_size
from pipelines.outputs import write_text_atomic

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key. `keys`: the dotted keys a
    check of values refused (two where they conflict), so that load_config can add the file or
    command line that set each."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keys = keys


# The source of a `key=value` override, in messages ("config key 'x' ... (set on the command line)").
COMMAND_LINE = "the command line"


@dataclass
class ModelConfig:
    variant: Literal["paper", "torchvision"] = "paper"
    num_classes: int = 0  # 0: the number of class folders in the training data
    dropout: float = 0.5
    # auto: the variant's own (paper: section 5's; torchvision: torchvision's); paper: N(0, 0.01),
    # biases 0/1 (section 5); kaiming: He et al. 2015. paper and kaiming apply to either variant.
    init: Literal["auto", "paper", "kaiming"] = "auto"
    # Neurons of fc6 and fc7 (section 3.5: 4096; the paper variant holds half in each tower, so
    # even). Fewer for small datasets: most of the model's parameters are in these layers.
    fc_width: int = 4096
    # A new run's starting weights (fine-tuning): torchvision's AlexNet file, an export's
    # .torchvision.pth or a checkpoint; "" = initialised by model.init. Read at a run's start
    # only: a resume keeps the file the run started from (alexnet/weights.py).
    weights: str = ""


@dataclass
class DataConfig:
    root: str = ""  # folder with train/ and val/ class folders; "" = the built-in demo dataset
    pipeline: Literal["dali", "torchvision", "synthetic"] = "dali"
    batch_size: int = 128  # per data-parallel replica
    resize: int = 256  # shorter side before cropping (section 2 of the paper)
    crop: int = 227  # network input size
    train_crop: Literal["paper", "random_resized"] = "paper"
    decoder: Literal["auto", "mixed", "cpu"] = "auto"  # auto: mixed (GPU) when CUDA is in use
    num_threads: int = 4  # DALI CPU threads, or DataLoader workers, per rank
    prefetch: int = 2  # batches decoded ahead
    hw_decoder_load: float = 0.65  # share of JPEGs sent to the hardware decoder (A100/H100)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    synthetic_steps: int = 100  # steps per epoch of the synthetic pipeline
    seed: int = 0  # data order and augmentation; the model's seed is train.seed
    lighting_std: float = 0.0  # std of the PCA lighting coefficients (section 4.1: 0.1); 0 = off
    lighting_stats: str = ""  # eigen statistics JSON; "" = <root>/pca_lighting.json, else ImageNet's
    val_ten_crop: bool = False  # validate on 10 crops, softmax averaged (section 4.1); DALI only
    train_files: str = ""  # file list from launch/scan.py to train on instead of <root>/train's files
    val_files: str = ""  # the same for <root>/val


@dataclass
class OptimConfig:
    lr: float = 0.01  # for a global batch of lr_reference_batch; scaled linearly with it
    lr_reference_batch: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on weights, not biases (cuda-convnet's layer definitions)


@dataclass
class ScheduleConfig:
    name: Literal["plateau", "step", "cosine", "constant"] = "plateau"
    warmup_epochs: float = 0.0  # linear ramp from warmup_start_factor * lr
    warmup_start_factor: float = 0.1
    factor: float = 0.1  # multiplier at each decay (step and plateau)
    step_epochs: int = 30  # step: decay every step_epochs epochs
    patience: int = 1  # plateau: validations (every train.eval_every epochs) without improvement before decaying
    min_delta: float = 0.0  # plateau: an improvement smaller than this (in top-1 %) does not count
    max_reductions: int = 3  # plateau: the paper divided the rate by 10 three times
    min_lr_factor: float = 0.0  # cosine: final lr as a fraction of the peak


@dataclass
class TrainConfig:
    epochs: int = 90
    max_steps: int = 0  # stop (with a checkpoint) after this many optimizer steps; 0 = no limit
    # Batches whose gradients an optimizer step sums (gradient accumulation): the step of a batch
    # accum_steps x data.batch_size per replica, with one batch's activations in memory.
    accum_steps: int = 1
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 where supported on GPU
    channels_last: bool = True  # NHWC activations: faster for cuDNN and oneDNN (CPU) convolutions alike
    host_memory: HostMemory = "retain"  # retain: freed CPU tensors stay in the heap (hostmem.py)
    seed: int = 0
    log_every: int = 50  # steps between progress lines and train metrics
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    max_nonfinite: int = 5  # skipped non-finite steps in a row before the run aborts (not fp16's overflows)
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    deterministic: bool = False  # deterministic kernels (slower); CPU runs are deterministic anyway


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # also written at every epoch end; 0 = only at epoch ends
    resume: str = "auto"  # auto: continue the run folder's last checkpoint; none; or a path


@dataclass
class ParallelConfig:
    mode: Literal["dp", "towers", "hybrid"] = "dp"
    timeout_s: float = 600.0  # collective timeout: a dead rank stops the others after this
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = True
    static_graph: bool = False
    comm_hook: Literal["none", "bf16", "fp16", "powersgd"] = "none"
    powersgd_rank: int = 4
    fc_group: int = 0  # hybrid: ranks sharing the FC layers; 0 = the ranks of one node


@dataclass
class RunConfig:
    root: str = "runs"
    name: str = ""  # "" = the config file's name (plus the job id under Slurm)
    tensorboard: bool = False
    # training_curves.png at every session's end: 1-2 s of a CPU on rank 0 while the other ranks
    # wait, which a sweep of many short runs may skip (launch/plot_run.py draws it at any time).
    plot: bool = True
    progress: Literal["auto", "bar", "log"] = "auto"  # auto: a bar only on a terminal


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides, then validation."""
    if isinstance(overrides, str):  # iterated, "optim.lr=0.5" was the override 'o'
        raise ConfigError(f"overrides must be a list of key=value strings; got the string {overrides!r}")
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_recipe(Path(path))
    for item in overrides:  # a key given twice takes its last value: a script appends to a common list
        key, value = _parse_override(item)
        values[key] = value
    cfg = _build(Config, values)
    try:
        validate_config(cfg)
        _check_new_run_sizes(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{_where_set(exc.keys, values)}", exc.keys) from None
    return cfg


def check_config(cfg: Config) -> Config:
    """A Config built or changed in Python (its dataclasses are mutable), checked as load_config
    checks a file's: types, choices, ranges and a new run's sizes. A run trained from an unchecked
    one (optim.momentum=1.5) wrote a config.yaml that neither its resume nor evaluate.py loaded."""
    if not isinstance(cfg, Config):  # a dict failed inside dataclasses.asdict, naming neither
        raise TypeError(f"expected a Config (alexnet.config.load_config builds one), got {type(cfg).__name__}")
    checked = config_from_dict(config_to_dict(cfg), "the Config given")
    _check_new_run_sizes(checked)
    return checked


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def write_config(cfg: Config, path: Path) -> None:
    """Atomically: a write cut short (a full disk) keeps the earlier file, a run's only record of
    its earlier session's settings."""
    write_text_atomic(path, config_yaml(cfg))


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(valid_keys(hint, f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def _read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, _Sourced]:
    """A YAML recipe as flat keys, each with the file that sets it (an error in imagenet.yaml names
    imagenet.yaml, not the 8-GPU recipe that extends it). `extends: other.yaml` (relative to the
    file, the one a symbolic link leads to; `~` for the home folder as in run.root) starts from
    another recipe and overrides it key
    by key, so the 8-GPU recipes restate only what differs from imagenet.yaml."""
    real = path.resolve()
    if real in seen:
        raise ConfigError(f"config file {real} extends itself through {' -> '.join(map(str, seen))}")
    tree = _read_yaml(path)
    if "extends" not in tree:
        return _flatten(tree, source=str(path))
    base = tree.pop("extends")
    own = _flatten(tree, source=str(path))
    if (isinstance(base, _Number) and base.value is None) or (isinstance(base, str) and not base.strip()):
        # blank, it read as the recipe's own folder ("cannot read config file .: Is a directory")
        raise ConfigError(f"config key 'extends' in {path} is empty: name the recipe it extends, or remove the line")
    if not isinstance(base, str):
        raise ConfigError(f"config key 'extends' in {path} must be a file name; got {_plain(base)!r}")
    # relative to the recipe itself: through a symbolic link, to the folder of the file it leads to
    parent = real.parent / Path(base).expanduser()
    if not (parent.exists() or parent.is_symlink()):
        raise ConfigError(f"config key 'extends' in {path} names {base}, and {parent} does not exist")
    return {**_read_recipe(parent, (*seen, real)), **own}


@dataclass(frozen=True)
class _Number:
    """A YAML scalar that YAML reads as something other than text (a number, a boolean, a date,
    null), with the text it was written as: a str-typed key takes the text (`run.name: 1.10`
    stays "1.10", `data.root: 0755` stays "0755", `run.name: 2024-06-01` stays a name), as
    `key=value` on the command line does."""

    value: Any
    text: str


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (no tags that build objects), with typed scalars kept as _Number
    and a key written twice in one mapping refused (YAML would keep the last one silently: a
    section written twice loses its first block)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, yaml.Mark] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    lines = f"lines {seen[key_node.value].line + 1} and {key_node.start_mark.line + 1}"
                    raise yaml.YAMLError(f"key {key_node.value!r} appears twice, on {lines} (YAML keeps only the last)")
                seen[key_node.value] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _scalar_with_text(base: Any) -> Any:
    def construct(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _Number | str:
        try:
            return _Number(base(loader, node), node.value)
        # A date YAML cannot read (2024-13-45), or an explicit tag on text it does not fit (`!!float`
        # with no value, `!!bool x`: PyYAML's constructors fail with these): it is text.
        except (ValueError, IndexError, KeyError, AttributeError):
            return node.value

    return construct


for _tag, _base in (
    ("int", yaml.SafeLoader.construct_yaml_int),
    ("float", yaml.SafeLoader.construct_yaml_float),
    ("bool", yaml.SafeLoader.construct_yaml_bool),
    ("null", yaml.SafeLoader.construct_yaml_null),
    ("timestamp", yaml.SafeLoader.construct_yaml_timestamp),
):
    _RecipeLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _scalar_with_text(_base))


def _plain(value: Any) -> Any:
    """`value` with every _Number inside it back to its number."""
    if isinstance(value, _Number):
        return value.value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _setting(value: Any) -> Any:
    """A setting's value as read: plain, except the numbers of a list, which keep their text (each
    item is checked as written: `data.mean: [0123, 1, 1]` is refused, not read as 83)."""
    if isinstance(value, list):
        return [v if isinstance(v, _Number) else _plain(v) for v in value]
    return _plain(value)


def _keep_leaf_text(tree: dict[Any, Any]) -> dict[Any, Any]:
    """The recipe's mappings with plain keys and plain values, except a number that is a setting
    itself (a leaf under a mapping): it keeps its text for _sourced."""
    return {
        _plain(k): v if isinstance(v, _Number) else _keep_leaf_text(v) if isinstance(v, dict) else _setting(v)
        for k, v in tree.items()
    }


def _sourced(value: Any, source: str) -> _Sourced:
    if isinstance(value, _Number) and value.value is None:
        # A YAML null in a file (`data.root:` left blank, null, ~) keeps YAML's meaning: the
        # setting's empty value ("" for a text key: the demo data, the default name), as hand-written
        # recipes use it; no text is kept, so a text key does not take the word "null".
        return _Sourced(None, source)
    if isinstance(value, _Number):
        return _Sourced(value.value, source, raw=value.text)
    return _Sourced(value, source)


def _read_yaml(path: Path) -> dict[str, Any]:
    text = _read_text(path)
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.reader.ReaderError as exc:  # a NUL or other control character: binary, not YAML
        raise ConfigError(_not_text(path)) from exc
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_yaml_problem(path, exc)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    except RecursionError as exc:  # thousands of nested brackets: the parser's recursion, not a recipe
        raise ConfigError(f"config file {path} is nested too deeply to be a recipe") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(_plain(data)).__name__}")
    try:
        return _keep_leaf_text(data)
    except RecursionError as exc:  # an anchor used inside itself (`&a [*a]`): a structure without end
        raise ConfigError(
            f"config file {path} holds a value that contains itself (a YAML alias inside its anchor)"
        ) from exc


def _read_text(path: Path) -> str:
    """The file's text; UTF-8 whatever the locale (YAML's own encoding, and write_config's)."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(_not_text(path)) from exc


def _not_text(path: Path) -> str:
    return (
        f"config file {path} is not text (UTF-8 YAML); a checkpoint? --config takes a YAML recipe "
        "or a run's config.yaml"
    )


def _yaml_problem(path: Path, exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's message in one line with the file's line and column (its own spans several lines,
    names "<unicode string>" and quotes the line)."""
    mark = exc.problem_mark or exc.context_mark
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = ", ".join(part.strip() for part in (exc.context, exc.problem) if part)
    return f"config file {path}{where}: {problem}"


def _flatten(tree: dict[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(key, str) and "." in key:
            raise ConfigError(_dotted_key_problem(dotted, source))
        if isinstance(value, dict):
            flat.update(_flatten(value, source, dotted + "."))
        else:
            flat[dotted] = _sourced(value, source)
    return flat


def _dotted_key_problem(dotted: str, source: str) -> str:
    """Files take the section form only: a dotted key beside its section (`train: {epochs: 3}` and
    `train.epochs: 5`) would get past the check for a key written twice, and `extends` would
    merge the two forms as different keys (a base's dotted key beating the child's section)."""
    *sections, leaf = dotted.split(".")
    nested = leaf + ": ..."
    for section in reversed(sections):
        nested = f"{section}: {{{nested}}}"
    return f"config key {dotted!r} in {source} is dotted; a file takes sections: write {nested}"


@dataclass(frozen=True)
class _Sourced:
    """A value and where it came from, for error messages."""

    value: Any
    source: str
    raw: str | None = None  # the text as written (an override, a YAML number), kept for str-typed keys


def _parse_override(item: str) -> tuple[str, _Sourced]:
    """`key=value`, the value read as YAML but its text kept whole: a text key takes the text as
    typed (`run.name=null` is "null", `run.root=~` the home folder, `run.name=#1` "#1"; only an
    empty value is ""), and a number's text is checked as written."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (for example train.epochs=10)")
    try:
        value = _setting(yaml.load(text, Loader=_RecipeLoader)) if text else ""  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, RecursionError):  # RecursionError: an alias inside its anchor (`&a [*a]`)
        value = text
    return key.strip(), _Sourced(value, COMMAND_LINE, raw=text)


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    settings = {f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])}
    for key in [k for k in values if k.startswith(prefix)]:
        head, nested, _ = key[len(prefix) :].partition(".")
        if head not in names:
            _unknown_key(key, values[key])
        if nested and head in settings:  # `train.epochs.max_steps`, or YAML indented one level too deep
            raise ConfigError(
                f"unknown config key {key!r} from {values[key].source}: {prefix + head!r} is a setting, not a section"
            )
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        dotted = prefix + f.name
        if dataclasses.is_dataclass(hint):
            # A YAML null (`train:` with every key below it commented out) is a section that sets nothing.
            if dotted in values and values[dotted].value is not None:
                raise ConfigError(
                    f"config key {dotted!r} is a section (set as a value in {values[dotted].source}); "
                    f"set its keys, e.g. {dotted}.<key>=..."
                )
            kwargs[f.name] = _build(hint, values, dotted + ".")
        elif dotted in values:
            kwargs[f.name] = _coerce(dotted, hint, values[dotted])
    return cls(**kwargs)


def _unknown_key(key: str, sourced: _Sourced) -> None:
    close = _closest_keys(key)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    raise ConfigError(f"unknown config key {key!r} from {sourced.source}{hint}")


def _closest_keys(key: str) -> list[str]:
    """The keys `key` was likely meant as: the same but for case (TRAIN.EPOCHS), a setting without
    its section (lr: optim.lr; seed: data.seed or train.seed), else the closest spelling. Only
    suggested: keys are exact, as choices are."""
    keys = valid_keys()
    bare = [k for k in keys if k.rpartition(".")[2] == key.lower()] if "." not in key else []
    return bare or _closest(key, keys, cutoff=0.5)


def _closest_choice(shown: Any, choices: tuple[Any, ...]) -> str:
    """The did-you-mean of a choice: 'bf16' for BF16, 'paper' for Paper (a wrong case, refused as a
    wrong key's case is), else a close spelling."""
    if not isinstance(shown, str):
        return ""
    close = _closest(shown.strip(), [str(c) for c in choices], cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _closest(word: str, candidates: list[str], cutoff: float) -> list[str]:
    """The candidates equal to `word` but for case, else the closest spelling (case ignored)."""
    folded = word.lower()
    same = [c for c in candidates if c.lower() == folded]
    if same:
        return same
    by_folded = {c.lower(): c for c in candidates}
    return [by_folded[c] for c in difflib.get_close_matches(folded, list(by_folded), n=1, cutoff=cutoff)]


def _coerce(key: str, hint: Any, sourced: _Sourced) -> Any:
    value = sourced.value
    origin = typing.get_origin(hint)
    where = f"config key {key!r}"
    at = f" (set {_place(sourced.source)})"  # at the message's end, as the value checks say it
    if hint is str:
        if sourced.raw is not None:  # as typed on the command line, or a YAML number's text
            return sourced.raw
        if value is None:  # `data.root:` left blank, or null, in a file: the setting's empty value
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            _check_written(where, "decimal whole number", sourced, at)
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_written(where, "decimal number", sourced, at)
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            # YAML 1.1 reads 1e-3 and 5e-4 (no dot in the mantissa) as strings; they are floats.
            return float(value)
    elif origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool):
            # YAML 1.1 reads off/on/yes/no as booleans: `train.amp=off` means the word.
            spelled = [w for w in (("on", "true", "yes") if value else ("off", "false", "no")) if w in choices]
            if sourced.raw is not None and sourced.raw in choices:
                return sourced.raw
            if spelled:
                return spelled[0]
        if value in choices:
            return value
        shown = sourced.raw if sourced.raw is not None else value  # `yes`, not the True YAML makes of it
        raise ConfigError(
            f"{where} must be one of {', '.join(map(str, choices))}; got {shown!r}{_closest_choice(shown, choices)}{at}"
        )
    elif origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", item_type, _sourced(v, sourced.source)) for i, v in enumerate(value)]
    elif origin in (typing.Union, types.UnionType):
        raise TypeError(f"union types are not supported in Config ({key})")
    value = _plain(value)  # a list's numbers shown as numbers
    raise ConfigError(f"{where} expects {_type_name(hint)}; got {value!r} ({type(value).__name__}){at}")


def _check_written(where: str, kind: str, sourced: _Sourced, at: str) -> None:
    """Refuses a number written in YAML 1.1's octal (010 = 8) or base-60 (1:30 = 90) form, which
    reads as another number than it looks like; a float key given a whole number follows the
    whole-number rule (0600 is 384), a fraction only the base-60 one (YAML reads 0600.5 as 600.5).
    Checked where the text as written is known: the command line, and a file's numbers."""
    if sourced.raw is None:
        return
    text = sourced.raw.strip()
    as_it_looks = _WHOLE_NUMBER_TEXT.fullmatch(text) if isinstance(sourced.value, int) else ":" not in text
    hexadecimal = text.lstrip("+-").lower().startswith("0x")
    if not as_it_looks or (_STRAY_HEX_UNDERSCORE if hexadecimal else _STRAY_UNDERSCORE).search(text):
        raise ConfigError(f"{where} expects a {kind}; got {sourced.raw!r} (YAML reads it as {sourced.value}){at}")


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# Whole numbers as written: decimal, or hexadecimal with its 0x. Not YAML 1.1's octal (010 = 8)
# and base-60 (1:30 = 90) forms, which read as other numbers than they look like.
_WHOLE_NUMBER_TEXT = re.compile(r"[-+]?(0|[1-9][0-9_]*|0x[0-9a-fA-F_]+)")
# YAML 1.1 skips underscores anywhere in a number (`1_` is 1, `1__0` is 10, `1_.5` is 1.5,
# `1.0_e-3` is 0.001): one is taken as a digit separator only between two digits, as Python's
# own literals allow (1_000; 0xFF_FF between hexadecimal digits).
_STRAY_UNDERSCORE = re.compile(r"(?<![0-9])_|_(?![0-9])")
_STRAY_HEX_UNDERSCORE = re.compile(r"(?<![0-9a-fA-F])_|_(?![0-9a-fA-F])")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {typing.get_args(hint)[0].__name__}"
    return getattr(hint, "__name__", str(hint))


def _where_set(keys: tuple[str, ...], values: dict[str, _Sourced]) -> str:
    """Where the refused values were set, as the type checks name it: " (set in FILE)" (of a
    recipe's chain, the file that sets it) or " (set on the command line)"; for keys in conflict
    set in different places each one's, " (data.crop set in c.yaml; data.resize set on the command
    line)". A default has no place: nothing is said of it."""
    places = {key: _place(values[key].source) for key in keys if key in values}
    if len(places) == len(keys) and len(set(places.values())) == 1:  # one key, or all set in one place
        return f" (set {places[keys[0]]})"
    return f" ({'; '.join(f'{key} set {where}' for key, where in places.items())})" if places else ""


def _place(source: str) -> str:
    return "on the command line" if source == COMMAND_LINE else f"in {source}"


def _refuse(key: str, problem: str) -> ConfigError:
    """The error of a value outside what `key` allows: "config key '<key>' <problem>"."""
    return ConfigError(f"config key {key!r} {problem}", (key,))


def _conflict(keys: tuple[str, ...], problem: str) -> ConfigError:
    """The error of values that do not go together, named by the first key; load_config says
    where each of them was set (one may be a recipe's, the other the command line's)."""
    return ConfigError(f"config key {keys[0]!r} {problem}", keys)


def validate_config(cfg: Config) -> None:
    """Checks that a key's type cannot express; each message names the key."""
    _check_ranges(cfg)
    _check_upper_bounds(cfg)
    _check_model_input(cfg)
    _check_combinations(cfg)


def _check_ranges(cfg: Config) -> None:
    """Each number within the range where it means something."""
    positive = {
        "model.fc_width": cfg.model.fc_width,
        "data.batch_size": cfg.data.batch_size,
        "data.crop": cfg.data.crop,
        "data.resize": cfg.data.resize,
        "data.synthetic_steps": cfg.data.synthetic_steps,
        "optim.lr": cfg.optim.lr,
        "optim.lr_reference_batch": cfg.optim.lr_reference_batch,
        "schedule.step_epochs": cfg.schedule.step_epochs,
        "schedule.patience": cfg.schedule.patience,
        "train.epochs": cfg.train.epochs,
        "train.log_every": cfg.train.log_every,
        "train.eval_every": cfg.train.eval_every,
        "train.max_nonfinite": cfg.train.max_nonfinite,
        "parallel.bucket_cap_mb": cfg.parallel.bucket_cap_mb,
        "parallel.powersgd_rank": cfg.parallel.powersgd_rank,  # 0 would send no gradient at all
    }
    for key, value in positive.items():
        if value <= 0:
            raise _refuse(key, f"must be > 0; got {value}")
    non_negative = {
        "model.num_classes": cfg.model.num_classes,
        "train.max_steps": cfg.train.max_steps,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "schedule.warmup_epochs": cfg.schedule.warmup_epochs,
        "train.grad_clip": cfg.train.grad_clip,
        "parallel.fc_group": cfg.parallel.fc_group,
        "data.lighting_std": cfg.data.lighting_std,
        "optim.momentum": cfg.optim.momentum,
        "optim.weight_decay": cfg.optim.weight_decay,
        "schedule.warmup_start_factor": cfg.schedule.warmup_start_factor,
        "schedule.min_lr_factor": cfg.schedule.min_lr_factor,
        "schedule.max_reductions": cfg.schedule.max_reductions,
        "schedule.min_delta": cfg.schedule.min_delta,  # below 0 a fall in top-1 would count as improvement
    }
    for key, value in non_negative.items():
        if value < 0:
            raise _refuse(key, f"must be >= 0; got {value}")
    for key, value in _float_values(cfg):
        if not math.isfinite(value):
            raise _refuse(key, f"must be a finite number; got {value}")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise _refuse("model.dropout", f"must be in [0, 1); got {cfg.model.dropout}")
    if not 0.0 <= cfg.data.hw_decoder_load <= 1.0:
        raise _refuse("data.hw_decoder_load", f"must be in [0, 1]; got {cfg.data.hw_decoder_load}")
    fractions = {
        "optim.momentum": (cfg.optim.momentum, "[0, 1)"),  # 1 or more: the velocity never decays
        "schedule.warmup_start_factor": (cfg.schedule.warmup_start_factor, "[0, 1]"),
        "schedule.min_lr_factor": (cfg.schedule.min_lr_factor, "[0, 1]"),
    }
    for key, (value, bounds) in fractions.items():
        if value > 1.0 or (bounds.endswith(")") and value == 1.0):
            raise _refuse(key, f"must be in {bounds}; got {value}")
    if not 0.0 < cfg.schedule.factor <= 1.0:
        raise _refuse("schedule.factor", f"must be in (0, 1]; got {cfg.schedule.factor}")


# torch's CPU generator (mt19937) and the dropout hash take 32 bits of a seed: 2**32 + 1 draws as 1.
_MAX_SEED = 2**32 - 1


# The most images per replica and batch (data.batch_size, evaluate.py's and the benchmark's).
# parallel.timeout_s's, and evaluate.py's --timeout (see _check_upper_bounds for why).
TIMEOUT_RANGE_S = (10, 10**7)
MAX_BATCH = 65536
# The most DALI threads or DataLoader workers per rank (data.num_threads, the launchers' flags).
MAX_THREADS = 1024
# The most batches decoded ahead (data.prefetch, the pipeline benchmark's --prefetch).
MAX_PREFETCH = 1024


def _check_upper_bounds(cfg: Config) -> None:
    """Numbers with an upper end too: past it a value wraps around, overflows an integer deep in a
    library at the first batch, or can never be met. After _check_ranges (finite numbers)."""
    bounded = {
        "train.seed": (cfg.train.seed, 0, _MAX_SEED),  # torch refuses past 64 bits at the model's init
        "data.seed": (cfg.data.seed, 0, _MAX_SEED),  # the order's torch.Generator, DALI's seed
        # DALI threads or DataLoader worker processes per rank: more than any node's cores only
        # contend; DALI's int32 arguments overflow (a TypeError at the first batch) past 2**31.
        "data.num_threads": (cfg.data.num_threads, 1, MAX_THREADS),
        # Batches decoded ahead, each held in memory (DALI allocates them up front; DataLoader
        # holds workers x prefetch): the default 2 hides decoding, 1024 already costs gigabytes.
        "data.prefetch": (cfg.data.prefetch, 1, MAX_PREFETCH),
        # Every rank waits this long for the slowest: below a second the rendezvous itself timed
        # out ("timed out after 0ms" for 1e-9), and at 1 s the other ranks timed out while rank 0
        # wrote summary.json and the plot at a run's end (3 s sufficed on a quiet machine).
        # 10**7 s (about 115 days) is far inside datetime.timedelta's range.
        "parallel.timeout_s": (cfg.parallel.timeout_s, *TIMEOUT_RANGE_S),
        # A step's batches are held together, with the next step's decoded ahead (about 3 x A
        # batches of input in memory): at 1024 that is gigabytes at any batch size worth accumulating.
        "train.accum_steps": (cfg.train.accum_steps, 1, 1024),
        # Images per replica and batch: 10**8 ran out of memory inside DALI, reported as a bad file,
        # and DALI's int32 arguments overflow past 2**31; 65536 of 227-pixel images are 40 GB.
        "data.batch_size": (cfg.data.batch_size, 1, MAX_BATCH),
    }
    for key, (value, low, high) in bounded.items():
        if not low <= value <= high:
            raise _refuse(key, f"must be in [{low}, {high}]; got {value}")
    # DDP's bucket bytes (MB x 2**20) are an int64 in its Reducer: 1e13 failed there with a
    # TypeError after the run folder was written. 10**6 MB holds any model's gradients in one bucket.
    if cfg.parallel.bucket_cap_mb > 10**6:
        raise _refuse("parallel.bucket_cap_mb", f"must be at most 1000000 (MB); got {cfg.parallel.bucket_cap_mb:.15g}")
    if cfg.schedule.min_delta >= 100:  # top-1 is a percentage: no validation could ever improve
        raise _refuse("schedule.min_delta", f"must be below 100 (top-1 points); got {cfg.schedule.min_delta}")


def _check_new_run_sizes(cfg: Config) -> None:
    """Sizes past what any run can hold, refused for the configs a user writes (load_config) but
    not for a checkpoint's stored config: a run trained at a size allowed then stays loadable."""
    bounded = {
        # 10**14 classes: the synthetic pipeline's list of class names filled the memory until the
        # kernel killed the run. ImageNet-21k has 21,841 classes; 2**20 at fc_width 4096 is a
        # 17 GB fc8 already.
        "model.num_classes": (cfg.model.num_classes, 0, 2**20),
        # 16x the paper's 4096: fc7 (fc_width squared) is then 17 GB of float32 weights; a size
        # the machine cannot allocate is named at the model's build (ModelSizeError).
        "model.fc_width": (cfg.model.fc_width, 1, 65536),
        # Steps per synthetic epoch: 10**23 overflowed len() (a traceback at the first epoch).
        "data.synthetic_steps": (cfg.data.synthetic_steps, 1, 10**9),
    }
    for key, (value, low, high) in bounded.items():
        if not low <= value <= high:
            raise _refuse(key, f"must be in [{low}, {high}]; got {value}")


def _check_model_input(cfg: Config) -> None:
    """The model and the images it is given fit each other."""
    if cfg.model.num_classes == 1:
        raise _refuse("model.num_classes", "must be 0 (from the data) or >= 2; got 1")
    if not fc_width_fits(cfg.model.variant, cfg.model.fc_width):
        raise _conflict(
            ("model.fc_width", "model.variant"),
            f"must be even for the paper variant (half in each tower); got {cfg.model.fc_width}",
        )
    if cfg.data.crop > cfg.data.resize:
        raise _conflict(
            ("data.crop", "data.resize"), f"({cfg.data.crop}) must not exceed 'data.resize' ({cfg.data.resize})"
        )
    smallest = min_input_size(cfg.model.variant)
    if cfg.data.crop < smallest:
        raise _conflict(
            ("data.crop", "model.variant"),
            f"is {cfg.data.crop}, below the smallest input the "
            f"{cfg.model.variant} variant's pooling allows ({smallest})",
        )
    for key in ("data.mean", "data.std"):
        vals = getattr(cfg.data, key.split(".")[1])
        if len(vals) != 3:
            raise _refuse(key, f"needs 3 values (R, G, B); got {len(vals)}")
    if any(s <= 0 for s in cfg.data.std):
        raise _refuse("data.std", f"must be > 0 per channel; got {cfg.data.std}")


def _check_combinations(cfg: Config) -> None:
    """Settings that only work together, and names the run folder and the resume need."""
    if cfg.parallel.mode == "towers" and cfg.model.variant != "paper":
        raise _conflict(
            ("parallel.mode", "model.variant"),
            f"is 'towers', which splits the paper variant's two towers; model.variant is {cfg.model.variant!r}",
        )
    name = cfg.run.name
    if name and not is_folder_name(name):
        raise _refuse(
            "run.name",
            f"must be a folder name inside run.root, without path separators or line "
            f"breaks, at most {NAME_MAX} bytes; got {name!r} "
            "(set run.root for another place)",
        )
    resume = cfg.checkpoint.resume
    if not resume.strip():
        raise _refuse("checkpoint.resume", "is empty: use auto, none, or a checkpoint file")
    if resume.lower() in ("auto", "none") and resume not in ("auto", "none") and not Path(resume).exists():
        raise _refuse(
            "checkpoint.resume",
            f"is {resume!r}: the choices are written lower case ({resume.lower()}); "
            "any other value is a checkpoint file",
        )
    if not cfg.run.root.strip():  # it put the run folder into the working directory, a checkout say
        raise _refuse("run.root", "is empty: give a folder (. for the working directory)")
    if cfg.model.weights and cfg.checkpoint.resume not in ("auto", "none") and not _resumes_own_checkpoint(cfg):
        raise ConfigError(
            f"config keys 'model.weights' and 'checkpoint.resume' both name a file; checkpoint.resume="
            f"{cfg.checkpoint.resume} continues that run (its optimizer, schedule and data position), "
            "model.weights starts a new run from a file's weights: give one of them",
            ("model.weights", "checkpoint.resume"),
        )
    if cfg.data.val_ten_crop and cfg.data.pipeline != "dali":
        raise _conflict(("data.val_ten_crop", "data.pipeline"), f"needs data.pipeline=dali; got {cfg.data.pipeline!r}")


@contextmanager
def naming_key(key: str, *errors: type[Exception]) -> Iterator[None]:
    """Errors of `errors` raised while reading the file `key` names start with the key, and keep
    their type: "config key 'data.train_files': file list x.txt line 3: ..." (a data error stays
    one, exit 1; only the file's absence is the config's, existing_file)."""
    try:
        yield
    except errors as exc:
        raise type(exc)(f"config key {key!r}: {exc}") from exc


def existing_file(key: str, value: str, noun: str, folder_hint: str = "") -> Path:
    """The file `key` names (`~` expanded), or a ConfigError naming the key: a file that is not
    there is a wrong value (exit 2), as a bad key is; what the file holds is its reader's to
    check (a data or checkpoint error, exit 1). `folder_hint`: what to say when it is a folder."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigError(f"config key {key!r}: {noun} {path} is a folder{folder_hint or ', not a file'}", (key,))
    if not path.exists():
        raise ConfigError(f"config key {key!r}: {noun} {path} does not exist", (key,))
    return path


def _resumes_own_checkpoint(cfg: Config) -> bool:
    """checkpoint.resume names a file of the run's own checkpoints folder: a run started from
    model.weights and sent back to its previous.pt, whose config.yaml and checkpoints go on naming
    the weights it began from (a config.yaml that did not load back)."""
    if not cfg.run.name:
        return False
    own = Path(cfg.run.root).expanduser() / cfg.run.name / "checkpoints"
    try:
        return Path(cfg.checkpoint.resume).expanduser().parent.resolve() == own.resolve()
    except (OSError, RuntimeError):  # a path that cannot be resolved (a link loop) is not the run's
        return False


def is_folder_name(name: str) -> bool:
    """A run name that stays a folder inside run.root: no path separators, not . or .. (with them
    the checkpoints would land in run.root itself or outside it), and one printable line (a line
    break made a folder that no log line or shell command shows whole)."""
    return (
        bool(name)
        and "/" not in name
        and "\\" not in name
        and name not in (".", "..")
        and name.isprintable()
        and len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX
    )


# The longest file name (in bytes) of Linux's file systems: a longer run.name failed only after
# the data setup, blamed on run.root ("File name too long").
NAME_MAX = 255


def _float_values(cfg: Config) -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every float setting, lists included."""
    for section in fields(cfg):
        part = getattr(cfg, section.name)
        for f in fields(part):
            values = getattr(part, f.name)
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, float):
                    yield f"{section.name}.{f.name}", value


def config_from_dict(tree: dict[str, Any], source: str) -> Config:
    """A Config from a nested dict such as a checkpoint's payload["config"]; errors name `source`."""
    if not isinstance(tree, dict):
        raise ConfigError(f"the config stored in {source} is not a mapping of sections")
    cfg = _build(Config, _flatten(tree, source=source))
    validate_config(cfg)  # the sizes of a new run are not: a checkpoint's were allowed when it was written
    return cfg
