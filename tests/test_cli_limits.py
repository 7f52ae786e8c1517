"""Values a configuration or a launcher's flag refuses before any work, each with one line naming
the key or flag: past these ends DALI aborted without a message, a run wrote into the working
directory or outside its output folder, or a traceback came out of numpy or the YAML parser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _helpers import launcher

from alexnet import model as model_module
from alexnet.bench.pipeline_bench import PipelineSettings
from alexnet.bench.timing import Schedule
from alexnet.checkpoint import CheckpointError
from alexnet.config import MAX_BATCH, MAX_THREADS, ConfigError, config_from_dict, config_to_dict, load_config
from alexnet.data import build_lighting, build_splits
from alexnet.model import ModelSizeError, build_model
from alexnet.resume import load_resume_checkpoint
from pipelines.index import DataError


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


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("evaluate", ["ckpt.pt", "--out", ""]),
        ("export", ["ckpt.pt", "--out", ""]),
        ("lighting_stats", ["--out", ""]),
        ("benchmark", ["pipeline", "--out", ""]),
        ("benchmark", ["merge", "--out", "", "a.json"]),
        ("prepare_imagenet", ["--val", "v", "--ground-truth", "g.csv", "--out", ""]),
    ],
)
def test_an_empty_out_is_refused_not_taken_for_the_working_directory(capsys, command, argv):
    """`--out "$OUT"` with OUT unset: the files went into the working directory without a word
    (evaluate's JSON into the checkout it was run from)."""
    with pytest.raises(SystemExit) as info:
        launcher(command).parse_args(argv)
    assert info.value.code == 2 and "argument --out: is empty (an unset shell variable?)" in capsys.readouterr().err


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


def test_a_range_error_names_where_the_value_was_set(tmp_path):
    """Type errors named the file or the command line; range errors named only the key, so in a
    chain of recipes (the 8-GPU ones extend imagenet.yaml) the user had to search for it."""
    base = tmp_path / "base.yaml"
    base.write_text("optim:\n  momentum: 1.5\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ndata:\n  crop: 224\n")
    with pytest.raises(ConfigError) as info:
        load_config(child)
    assert str(info.value).endswith(f"must be in [0, 1); got 1.5 (set in {base})"), str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(child, ["optim.momentum=2"])  # the command line's value is the one refused
    assert str(info.value).endswith("got 2.0 (set on the command line)"), str(info.value)
    # Two keys in conflict, set in two places: each one's; a default's is not made up.
    with pytest.raises(ConfigError) as info:
        load_config(child, ["optim.momentum=0.9", "data.resize=200"])
    assert str(info.value).endswith(f"(data.crop set in {child}; data.resize set on the command line)")
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.resize=200"])
    assert str(info.value).endswith("(data.resize set on the command line)"), str(info.value)


@pytest.mark.parametrize("text", ["1_", "1__0", "0x_1", "2_e1"])
def test_underscores_count_only_between_digits(text):
    """YAML 1.1 drops underscores anywhere in a number: `train.epochs=1_` trained 1 epoch."""
    with pytest.raises(ConfigError, match=re.escape(f"got {text!r}")):
        load_config(None, [f"train.epochs={text}"])


def test_underscores_between_digits_are_digit_separators():
    with pytest.raises(ConfigError, match=re.escape("got '1_.5'")):
        load_config(None, ["optim.lr=1_.5"])
    with pytest.raises(ConfigError, match=re.escape("got '1.0_e-3'")):  # an exponent is not a digit
        load_config(None, ["optim.lr=1.0_e-3"])
    cfg = load_config(None, ["train.epochs=1_000", "optim.lr=0.000_5", "train.max_steps=0xF_F"])
    assert (cfg.train.epochs, cfg.optim.lr, cfg.train.max_steps) == (1000, 0.0005, 255)


@pytest.mark.parametrize("line", ["extends:", 'extends: ""', "extends: '  '"])
def test_an_empty_extends_is_named(tmp_path, line):
    """Blank, it was read as the recipe's own folder: "cannot read config file .: Is a directory"."""
    path = tmp_path / "child.yaml"
    path.write_text(f"{line}\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"config key 'extends' in {path} is empty: name the recipe")):
        load_config(path)


@pytest.mark.parametrize(
    ("key", "noun"),
    [
        ("data.train_files", "file list"),
        ("data.val_files", "file list"),
        ("data.lighting_stats", "lighting statistics"),
        ("checkpoint.resume", "checkpoint"),
    ],
)
def test_a_file_a_key_names_that_cannot_be_read_names_the_key(tiny_data, tmp_path, key, noun):
    """They said only "cannot read file list /x" or "checkpoint /x does not exist": with several
    files in a recipe, which setting to fix was left to guess (data.root and model.weights named it)."""
    missing = tmp_path / "missing.file"
    cfg = load_config(None, [f"data.root={tiny_data}", "data.lighting_std=0.1", f"{key}={missing}"])

    def read_the_file() -> None:
        if key == "checkpoint.resume":
            load_resume_checkpoint(cfg.checkpoint, tmp_path, build_model("paper", 10, fc_width=8))
        elif key == "data.lighting_stats":
            build_lighting(cfg.data)
        else:
            build_splits(cfg.data, 0)

    with pytest.raises(ConfigError) as info:  # a wrong value: exit 2, as a bad key and model.weights
        read_the_file()
    assert str(info.value) == f"config key {key!r}: {noun} {missing} does not exist", str(info.value)
    # What the file holds is the data's or the checkpoint's problem (exit 1), the key named too.
    missing.write_text("not what the key names\n")
    with pytest.raises((DataError, CheckpointError)) as info:
        read_the_file()
    assert str(info.value).startswith(f"config key {key!r}: "), str(info.value)
    # Found by default (beside the data, or the last checkpoint of the run folder): no key to name.
    (tiny_data / "pca_lighting.json").write_text("{}")
    try:
        with pytest.raises(DataError) as info:
            build_lighting(load_config(None, [f"data.root={tiny_data}", "data.lighting_std=0.1"]).data)
    finally:
        (tiny_data / "pca_lighting.json").unlink()
    assert not str(info.value).startswith("config key"), str(info.value)


@pytest.mark.parametrize(
    ("override", "high"),
    [
        (f"model.num_classes={10**14}", 2**20),
        (f"data.synthetic_steps={10**23}", 10**9),
        ("model.fc_width=65538", 65536),
    ],
)
def test_sizes_past_what_a_run_can_hold_are_refused(override, high):
    """model.num_classes=10**14 filled the memory until the kernel killed the run (the synthetic
    pipeline's class names); data.synthetic_steps=10**23 overflowed len() at the first epoch."""
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError, match=re.escape(f"config key {key!r} must be in [")):
        load_config(None, [f"{key}={value}"])
    load_config(None, [f"{key}={high}"])
    # A checkpoint's stored config is not held to them: a run trained at a size allowed then loads.
    stored = config_to_dict(load_config(None, []))
    section, _, name = key.partition(".")
    stored[section][name] = int(value)
    assert getattr(getattr(config_from_dict(stored, "a checkpoint"), section), name) == int(value)


def test_a_model_the_machine_cannot_allocate_names_its_sizes(monkeypatch):
    """Within the bounds a model can still exceed the memory: torch's allocator traceback became one line."""

    def refuse(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 34359738368 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(model_module, "PaperAlexNet", refuse)
    with pytest.raises(ModelSizeError, match=re.escape("model.fc_width=16384 and 1048576 classes cannot be allocated")):
        build_model("paper", 2**20, fc_width=16384)
    with pytest.raises(ModelSizeError, match=re.escape("needs 34.4 GB")):
        build_model("paper", 2**20, fc_width=16384)

    def fail_otherwise(*args, **kwargs):
        raise RuntimeError("other")

    monkeypatch.setattr(model_module, "PaperAlexNet", fail_otherwise)
    with pytest.raises(RuntimeError, match="^other$"):  # any other failure is left as it was
        build_model("paper", 10)


def test_a_refused_benchmark_command_leaves_no_report_folder(tmp_path, capsys):
    """--out is made before measuring (a path that cannot hold the report fails at once); a command
    then refused left the empty folders behind, as if a benchmark had run there."""
    benchmark = launcher("benchmark")
    out = tmp_path / "new" / "out"
    assert benchmark.main(["pipeline", "--out", str(out), "--threads", "100000"]) == 2
    assert benchmark.main(["step", "--out", str(out), "train.epochs=0"]) == 2
    assert not (tmp_path / "new").exists()
    assert "--threads must be at least 1" in capsys.readouterr().err
    kept = tmp_path / "kept"
    (kept / "sweep-points").mkdir(parents=True)  # a folder the user had, and one with content
    assert benchmark.main(["pipeline", "--out", str(kept), "--data", str(tmp_path / "none")]) == 2
    assert (
        benchmark.main(["pipeline", "--out", str(kept / "sweep-points" / "x"), "--data", str(tmp_path / "none")]) == 2
    )
    assert sorted(p.name for p in kept.rglob("*")) == ["sweep-points"]


def test_config_given_twice_is_refused(capsys):
    """`--config a.yaml --config b.yaml` trained b.yaml's recipe and dropped a.yaml silently."""
    train, benchmark = launcher("train"), launcher("benchmark")
    for parse in (train.parse_args, lambda argv: benchmark.parse_args(["step", *argv])):
        with pytest.raises(SystemExit) as exit_info:
            parse(["--config", "a.yaml", "train.epochs=1", "--config", "b.yaml"])
        assert exit_info.value.code == 2
        assert "error: --config is given twice (a.yaml and b.yaml); give it once" in capsys.readouterr().err
    assert train.parse_args(["train.epochs=1", "--config", "a.yaml"]).config == "a.yaml"
    assert train.parse_args([]).config.endswith("demo.yaml")


def test_a_bucket_too_large_for_ddp_s_byte_count_is_refused_before_any_work():
    """parallel.bucket_cap_mb=1e13: its bytes overflow the int64 of DDP's Reducer, a TypeError
    after the run folder was written (8e12 still went through)."""
    with pytest.raises(ConfigError) as info:
        load_config(None, ["parallel.bucket_cap_mb=1e13"])
    assert str(info.value) == (
        "config key 'parallel.bucket_cap_mb' must be at most 1000000 (MB); got 10000000000000 (set on the command line)"
    )
    assert load_config(None, ["parallel.bucket_cap_mb=1e6"]).parallel.bucket_cap_mb == 1e6
