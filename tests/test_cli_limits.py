"""Values a configuration or a launcher's flag refuses before any work, each with one line naming
the key or flag: past these ends DALI aborted without a message, a run wrote into the working
directory or outside its output folder, or a traceback came out of numpy or the YAML parser."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from _helpers import REPO

from alexnet.bench.pipeline_bench import PipelineSettings
from alexnet.bench.timing import Schedule
from alexnet.config import MAX_BATCH, MAX_THREADS, ConfigError, load_config


def launcher(name: str):
    """launch/<name>.py as a module (the launchers are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_limits", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("run.root=", "config key 'run.root' is empty: give a folder (. for the working directory)"),
        ("run.name=a\nb", "config key 'run.name' must be a folder name inside run.root, without path separators or"),
        (f"data.batch_size={MAX_BATCH + 1}", f"config key 'data.batch_size' must be in [1, {MAX_BATCH}]; got"),
    ],
)
def test_the_config_refuses_values_that_failed_later(override, said):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(said), str(info.value)
    assert load_config(None, [f"data.batch_size={MAX_BATCH}", "run.root=.", "run.name=café 2"]).run.root == "."


def test_a_yaml_file_nested_thousands_deep_is_a_config_error(tmp_path):
    """The parser's RecursionError came out as about 3,000 lines of traceback."""
    path = tmp_path / "deep.yaml"
    path.write_text("train: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=f"config file {path} is nested too deeply to be a recipe"):
        load_config(path)


def test_a_key_given_twice_on_the_command_line_takes_its_last_value():
    assert load_config(None, ["train.epochs=3", "train.epochs=4"]).train.epochs == 4


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["x", "--num-threads", str(MAX_THREADS + 1)], f"must be in [0, {MAX_THREADS}] (0: the run's own)"),
        (["x", "--batch-size", str(MAX_BATCH + 1)], f"must be in [0, {MAX_BATCH}] (0: the run's own)"),
        (["x", "--batch-size", "-1"], f"must be in [0, {MAX_BATCH}]"),
    ],
)
def test_evaluate_refuses_counts_past_the_trainer_s_ends(capsys, argv, said):
    """--num-threads 100000 aborted (exit 134, no message); --batch-size 10**8 was reported as a
    bad file."""
    evaluate = launcher("evaluate")
    with pytest.raises(SystemExit) as info:
        evaluate.parse_args(argv)
    assert info.value.code == 2 and said in capsys.readouterr().err
    assert evaluate.parse_args(["x", "--num-threads", str(MAX_THREADS), "--batch-size", "0"]).num_threads == MAX_THREADS


@pytest.mark.parametrize("name", ["../evil", "a/b", ".", ".."])
def test_export_writes_only_into_its_out_folder(capsys, name):
    """--name ../evil wrote exports/../evil.torchscript.pt, outside --out."""
    export = launcher("export")
    with pytest.raises(SystemExit) as info:
        export.parse_args(["ckpt.pt", "--name", name])
    assert info.value.code == 2 and f"--name {name!r}: expected a plain file name stem" in capsys.readouterr().err
    args = export.parse_args(["ckpt.pt", "--name", "alexnet-v2", "--format", "onnx", "torchscript", "onnx"])
    assert (args.name, args.format) == ("alexnet-v2", ["onnx", "torchscript"])  # each format once


def test_lighting_stats_refuses_a_seed_numpy_refuses(capsys):
    lighting = launcher("lighting_stats")
    with pytest.raises(SystemExit) as info:
        lighting.parse_args(["--seed", "-1"])
    assert info.value.code == 2 and "argument --seed: must be in [0, 2**32 - 1], got -1" in capsys.readouterr().err
    assert lighting.parse_args(["--seed", str(2**32 - 1)]).seed == 2**32 - 1


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"threads": MAX_THREADS + 1}, f"--threads must be at least 1 and at most {MAX_THREADS}, got"),
        ({"batch_size": MAX_BATCH + 1}, f"--batch-size must be at least 1 and at most {MAX_BATCH}, got"),
        ({"min_window_s": float("nan")}, "--min-window must be a finite number of seconds >= 0, got nan"),
        ({"min_window_s": -1.0}, "--min-window must be a finite number of seconds >= 0, got -1.0"),
    ],
)
def test_the_pipeline_benchmark_refuses_what_dali_aborted_on(changes, said):
    """--threads 100000 aborted (exit 134) with no message; --min-window -1 or nan was accepted."""
    settings = {"data": Path("."), "batch_size": 32, "threads": 2, "prefetch": 2, "resize": 256, "crop": 227,
                "batches": 8, "min_window_s": 0.5, "schedule": Schedule(1, 5)}  # fmt: skip
    PipelineSettings(**settings)  # the unchanged settings pass
    with pytest.raises(ValueError, match="^" + re.escape(said)):
        PipelineSettings(**{**settings, **changes})


def test_a_yaml_section_whose_keys_are_all_commented_out_sets_nothing(tmp_path):
    """`train:` with every key below commented out is a YAML null: it was refused as "a section set
    as a value"; a value given to a section still is."""
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  epochs: 7\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ntrain:\n  # epochs: 3\n")
    assert load_config(child).train.epochs == 7
    child.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="config key 'train' is a section"):
        load_config(child)


@pytest.mark.parametrize("value", ["AUTO", "None", "Auto"])
def test_a_resume_choice_in_capitals_is_named_not_taken_for_a_file(value):
    """checkpoint.resume=AUTO failed later with "checkpoint AUTO does not exist"."""
    with pytest.raises(ConfigError, match=f"config key 'checkpoint.resume' is '{value}': the choices are written"):
        load_config(None, [f"checkpoint.resume={value}"])
