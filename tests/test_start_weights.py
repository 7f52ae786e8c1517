"""model.weights: a new run starts from a file's weights (torchvision's AlexNet, an export's
.torchvision.pth, another run's checkpoint), fc8 afresh where it cannot stand for this data's
classes; a resume continues its own checkpoint; every rank must read the same weights."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
import torchvision
from _helpers import (
    SYNTHETIC_TRAIN,
    TINY_FC_WIDTH,
    TINY_TRAIN,
    TRAIN,
    check,
    launch,
    launcher,
    rank_1_differs,
    train_tiny,
)

from alexnet.checkpoint import FORMAT_VERSION, CheckpointError
from alexnet.config import IMAGENET_MEAN, IMAGENET_STD, ConfigError, load_config
from alexnet.model import build_model
from alexnet.run import run_training
from alexnet.weights import apply_start_weights, check_resumed_weights, read_state_dict, recorded_weights

CLASSES = [f"c{i}" for i in range(10)]
NORM = (list(IMAGENET_MEAN), list(IMAGENET_STD))  # this run's data.mean and data.std


def torchvision_file(tmp_path, num_classes=1000, seed=1):
    torch.manual_seed(seed)
    state = torchvision.models.alexnet(num_classes=num_classes).state_dict()
    path = tmp_path / f"tv{num_classes}.pth"
    torch.save(state, path)
    return path, state


def paper_state(num_classes=10, seed=2, width=TINY_FC_WIDTH, crop=67):
    torch.manual_seed(seed)
    return build_model("paper", num_classes, input_size=crop, init="kaiming", fc_width=width).state_dict()


def fresh(variant, num_classes=10, width=4096, seed=0):
    torch.manual_seed(seed)
    return build_model(variant, num_classes, input_size=67, init="kaiming", fc_width=width)


def assert_same(a, b, names):
    for name in names:
        assert torch.equal(a[name], b[name]), name


def test_torchvision_weights_start_the_torchvision_variant_with_fc8_afresh_for_other_classes(tmp_path):
    path, file_state = torchvision_file(tmp_path)
    model, untouched = fresh("torchvision"), fresh("torchvision").state_dict()
    start = apply_start_weights(model, path, CLASSES, NORM)
    state = model.state_dict()
    body = [k for k in state if not k.startswith("classifier.6.")]
    assert_same(state, file_state, body)  # features, fc6, fc7 from the file
    assert_same(state, untouched, ["classifier.6.weight", "classifier.6.bias"])  # as initialised
    assert start.loaded == 14 and start.fresh_head == "the file's fc8 has 1000 outputs, this model's 10"


def test_a_file_with_this_many_classes_gives_fc8_too(tmp_path):
    path, file_state = torchvision_file(tmp_path, num_classes=10)
    model = fresh("torchvision")
    start = apply_start_weights(model, path, CLASSES, NORM)
    assert_same(model.state_dict(), file_state, list(file_state))
    assert start.loaded == 16 and start.fresh_head == ""


@pytest.mark.parametrize(
    ("classes", "head_from_file"),
    [(CLASSES, True), ([f"d{i}" for i in range(10)], False)],
)
def test_a_checkpoint_gives_fc8_only_for_the_class_folders_it_was_trained_on(tmp_path, classes, head_from_file):
    saved = paper_state()
    path = tmp_path / "last.pt"
    torch.save({"format": FORMAT_VERSION, "model": saved, "classes": CLASSES, "progress": {"step": 9}}, path)
    model, untouched = fresh("paper", width=TINY_FC_WIDTH), fresh("paper", width=TINY_FC_WIDTH).state_dict()
    start = apply_start_weights(model, path, classes, NORM)
    state = model.state_dict()
    assert_same(state, saved, [k for k in state if not k.startswith("fc8.")])
    assert_same(state, saved if head_from_file else untouched, ["fc8.0.weight", "fc8.1.bias"])
    assert start.fresh_head == ("" if head_from_file else "the checkpoint was trained on other class folders")


@pytest.mark.parametrize("std", [list(IMAGENET_STD), [1.0, 1.0, 1.0]])
def test_a_checkpoint_trained_on_otherwise_normalised_images_is_named(tmp_path, std):
    """imagenet.yaml divides by 1 (the paper's), the default by ImageNet's std: a run started from
    such a checkpoint feeds its weights inputs of another scale, which nothing said."""
    path = tmp_path / "last.pt"
    config = {"data": {"mean": list(IMAGENET_MEAN), "std": std}}
    torch.save({"format": FORMAT_VERSION, "model": paper_state(), "classes": CLASSES, "config": config}, path)
    start = apply_start_weights(fresh("paper", width=TINY_FC_WIDTH), path, CLASSES, NORM)
    if std == NORM[1]:
        assert start.other_inputs == ""
    else:
        mean = "[123.675, 116.28, 103.53]"
        assert start.other_inputs == (
            f"data.mean {mean} and data.std [1, 1, 1], where this run uses {mean} and [58.395, 57.12, 57.375]"
        )


@pytest.mark.parametrize("wrap", ["ddp", "compiled_ddp", "reference_script", "lightning"])
def test_state_dicts_saved_by_other_tools_are_read(tmp_path, wrap):
    _, state = torchvision_file(tmp_path, num_classes=10)
    content = {
        "ddp": {f"module.{k}": v for k, v in state.items()},  # saved from the DDP wrapper
        "compiled_ddp": {f"_orig_mod.module.{k}": v for k, v in state.items()},  # torch.compile(DDP(model))
        # torchvision's references/classification/train.py: its arguments are an argparse.Namespace
        "reference_script": {"model": state, "epoch": 89, "args": argparse.Namespace(lr=0.01, model="alexnet")},
        # a LightningModule holding the network as self.net
        "lightning": {"state_dict": {f"net.{k}": v for k, v in state.items()}, "global_step": 5},
    }[wrap]
    torch.save(content, tmp_path / "w.pth")
    model = fresh("torchvision")
    start = apply_start_weights(model, tmp_path / "w.pth", CLASSES, NORM)
    assert start.loaded == 16 and start.fresh_head == ""
    assert_same(model.state_dict(), state, list(state))


def test_weights_of_another_variant_or_width_are_refused_naming_the_key_and_the_file(tmp_path):
    path, _ = torchvision_file(tmp_path)
    with pytest.raises(ConfigError) as err:
        apply_start_weights(fresh("paper", width=TINY_FC_WIDTH), path, CLASSES, NORM)
    said = str(err.value)
    assert said.startswith(f"config key 'model.weights': {path} does not fit this model (missing conv1.0.bias")
    assert "unexpected classifier.1.bias" in said and "model.variant, model.fc_width" in said
    torch.save(paper_state(width=256), tmp_path / "narrow.pt")
    with pytest.raises(ConfigError, match=r"shape mismatch fc6\.0\.bias \(128,\) vs \(256,\)"):
        apply_start_weights(fresh("paper", width=TINY_FC_WIDTH), tmp_path / "narrow.pt", CLASSES, NORM)


@pytest.mark.parametrize(
    ("change", "error", "said"),
    [
        ("nan", CheckpointError, "classifier.4.bias holds NaN or infinite values"),
        ("inf", CheckpointError, "features.0.weight holds NaN or infinite values"),
        ("meta", CheckpointError, "features.0.weight holds no values (a meta tensor)"),
        ("fc8_rows", ConfigError, "shape mismatch classifier.6.weight (12, 4096) vs (10, 4096)"),
        ("fc8_inputs", ConfigError, "shape mismatch classifier.6.weight (10, 100) vs (10, 4096)"),
        ("fc8_no_bias", ConfigError, "missing classifier.6.bias"),
        ("not_a_tensor", CheckpointError, "no state dict (parameter names mapped to tensors; not tensors: epoch)"),
    ],
)
def test_weights_that_would_fail_later_are_refused_naming_the_tensor(tmp_path, change, error, said):
    """NaN weights trained into an error about gradients; a meta tensor into a traceback; a
    malformed fc8 was dropped as 'another number of outputs' (12 weight rows, 10 biases: "10
    outputs, this model's 10"). Values a file should not hold are the file's problem
    (CheckpointError: exit 1); tensors that do not fit this model, the command's (ConfigError: 2)."""
    _, state = torchvision_file(tmp_path, num_classes=10)
    if change == "nan":
        state["classifier.4.bias"][3] = float("nan")
    elif change == "inf":
        state["features.0.weight"][0, 0, 0, 0] = float("inf")
    elif change == "meta":
        state["features.0.weight"] = torch.empty(64, 3, 11, 11, device="meta")
    elif change == "fc8_rows":
        state["classifier.6.weight"] = torch.zeros(12, 4096)
    elif change == "fc8_inputs":
        state["classifier.6.weight"] = torch.zeros(10, 100)
    elif change == "fc8_no_bias":
        del state["classifier.6.bias"]
    else:
        state["epoch"] = 5
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(error) as err:
        apply_start_weights(fresh("torchvision"), tmp_path / "w.pth", CLASSES, NORM)
    assert str(err.value).startswith(f"config key 'model.weights': {tmp_path / 'w.pth'}") and said in str(err.value)


def test_a_resume_keeps_the_weights_its_run_started_from_and_refuses_another_file(tmp_path):
    saved = {"model": {"weights": str(tmp_path / "start.pt")}}
    assert recorded_weights(saved) == str(tmp_path / "start.pt") and recorded_weights({"model": {}}) == ""
    check_resumed_weights(saved, "", tmp_path / "run")  # left out: the run's own
    check_resumed_weights(saved, str(tmp_path / "." / "start.pt"), tmp_path / "run")  # spelled another way
    check_resumed_weights({"model": {}}, "", tmp_path / "run")  # a run started without them
    with pytest.raises(ConfigError) as err:
        check_resumed_weights({"model": {}}, "/w/tv.pth", tmp_path / "run")
    assert str(err.value) == (
        f"config key 'model.weights': run folder {tmp_path / 'run'} holds a run started without model.weights, "
        "which this session would continue (a run reads model.weights at its start only); to start from "
        "/w/tv.pth, give the run a folder of its own with run.name=<new name>, or leave model.weights out to "
        "continue (nothing was written)"
    )
    with pytest.raises(ConfigError, match=f"holds a run started from the weights in {tmp_path / 'start.pt'}, "):
        check_resumed_weights(saved, "/w/other.pth", tmp_path / "run")


def test_files_that_hold_no_weights_are_named(tmp_path):
    model = fresh("torchvision")
    torch.save([1, 2], tmp_path / "list.pt")
    (tmp_path / "notes.txt").write_text("not weights\n")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "net.torchscript.pt")
    expected = {
        "list.pt": (CheckpointError, "holds no state dict (parameter names mapped to tensors); give torchvision's"),
        "notes.txt": (CheckpointError, "is not a PyTorch weights file (not a PyTorch file)"),
        "net.torchscript.pt": (CheckpointError, "is not a PyTorch weights file (a TorchScript archive"),
        "missing.pth": (ConfigError, "weights file"),
    }
    for name, (error, said) in expected.items():
        with pytest.raises(error) as err:
            apply_start_weights(model, tmp_path / name, CLASSES, NORM)
        assert str(err.value).startswith("config key 'model.weights': ") and said in str(err.value), err.value
    assert "does not exist" in str(pytest.raises(ConfigError, read_state_dict, tmp_path / "missing.pth").value)


def test_a_damaged_or_exported_weights_file_is_the_file_s_problem_a_missing_one_the_command_s(tmp_path):
    """A truncated model.weights (or an ONNX export given as one) was a ConfigError, exit 2 as
    for a bad key, where checkpoint.resume= the same file exits 1: what the file holds is bad."""
    import onnx

    path, _ = torchvision_file(tmp_path, num_classes=10)
    whole = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])  # a copy that stopped halfway
    graph = onnx.helper.make_graph([], "g", [], [])
    onnx.save(onnx.helper.make_model(graph, producer_name="pytorch"), tmp_path / "m.onnx")
    (tmp_path / "folder").mkdir()
    (tmp_path / "dangling.pth").symlink_to(tmp_path / "unmounted" / "w.pth")
    expected = {
        "cut.pth": (CheckpointError, f"weights file {tmp_path / 'cut.pth'} cannot be loaded ("),
        "m.onnx": (CheckpointError, f"{tmp_path / 'm.onnx'} is not a PyTorch weights file (an ONNX model"),
        "missing.pth": (ConfigError, f"weights file {tmp_path / 'missing.pth'} does not exist"),
        "folder": (ConfigError, f"weights file {tmp_path / 'folder'} is a folder"),
        "dangling.pth": (ConfigError, f"weights file {tmp_path / 'dangling.pth'} is a link to "),  # exit 1 before
    }
    for name, (error, said) in expected.items():
        with pytest.raises((CheckpointError, ConfigError)) as err:
            read_state_dict(tmp_path / name)
        assert type(err.value) is error and str(err.value).startswith(f"config key 'model.weights': {said}"), name


def test_train_py_exits_1_for_a_damaged_weights_file_and_2_for_a_missing_or_unfitting_one(tmp_path, capsys):
    """launch/train.py in this process (synthetic data: the weights are read before any step)."""
    command = train_command()
    torch.save(build_model("paper", 10, input_size=67, init="kaiming", fc_width=16).state_dict(), tmp_path / "w.pt")
    whole = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    torch.save(paper_state(width=32), tmp_path / "wide.pt")  # fc6 32 wide, the run's 16
    for name, status, said in (
        ("cut.pt", 1, "cannot be loaded ("),
        ("missing.pt", 2, "does not exist"),
        ("wide.pt", 2, "does not fit this model (shape mismatch fc6.0.bias (16,) vs (8,)"),  # per tower
    ):
        weights = tmp_path / name
        overrides = [*SYNTHETIC_TRAIN, f"run.root={tmp_path / 'runs'}", f"run.name={name}", f"model.weights={weights}"]
        assert command.main(overrides) == status, name
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith("error: config key 'model.weights': "), errors
        assert said in errors[0] and str(weights) in errors[0], errors[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing written


def test_weights_and_a_checkpoint_to_resume_from_are_one_too_many():
    with pytest.raises(ConfigError, match="config keys 'model.weights' and 'checkpoint.resume' both name a file"):
        load_config(None, ["model.weights=/w.pth", "checkpoint.resume=/runs/a/checkpoints/last.pt"])
    assert load_config(None, ["model.weights=/w.pth", "checkpoint.resume=none"]).model.weights == "/w.pth"


def train_command():
    """launch/train.py, loaded into this process, with run_training as train.py runs it but
    putting back the signal handlers it installs (this process goes on)."""
    command = launcher("train")
    command.run_training = lambda cfg, config_path, **_: run_training(cfg, config_path)
    return command


@pytest.mark.dali
def test_a_run_starts_from_the_weights_and_its_resume_does_not_read_them_again(tiny_data, tmp_path, capsys):
    """The start and the resume are launches of their own; the other run continuing the first's
    checkpoint, and the refused command, are train.py in this process (a launch imports torch and
    DALI anew: seconds each)."""
    saved = paper_state(seed=5)
    weights = tmp_path / "start.pt"
    torch.save(saved, weights)
    # lr 1e-9: one step leaves the weights within 1e-6 of where they started, which a fresh
    # initialisation (kaiming, about 0.05 apart) is not.
    proc = check(train_tiny(tiny_data, tmp_path, "ft", f"model.weights={weights}", "optim.lr=1e-9",
                            "train.max_steps=1", nproc=1))  # fmt: skip
    assert f"started from the weights in {weights}: 32 tensors, fc8 included" in proc.stderr
    trained = torch.load(tmp_path / "ft" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name in ("conv1.0.weight", "fc7.1.weight", "fc8.0.weight"):
        assert torch.allclose(trained[name], saved[name], atol=1e-6), name
    assert (trained["conv1.0.weight"] - paper_state(seed=0)["conv1.0.weight"]).abs().max() > 0.01
    # Another run continuing this one's checkpoint records no model.weights of its own: with both
    # keys its config.yaml and checkpoints would not load again (evaluate.py, --config).
    other_run = tmp_path / "ft" / "checkpoints" / "last.pt"
    command = train_command()
    tiny = [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}"]
    assert command.main([*tiny, "run.name=next", f"checkpoint.resume={other_run}", "optim.lr=1e-9",
                         "train.max_steps=2"]) == 0, capsys.readouterr().err[-3000:]  # fmt: skip
    assert load_config(tmp_path / "next" / "config.yaml").model.weights == ""
    weights.unlink()  # a resume continues the run's own checkpoint: the file is not read again
    proc = check(train_tiny(tiny_data, tmp_path, "ft", "optim.lr=1e-9", "train.max_steps=2", nproc=1))
    assert "started from the weights" not in proc.stderr and "resumed from" in proc.stderr
    config = (tmp_path / "ft" / "config.yaml").read_text()
    assert load_config(tmp_path / "ft" / "config.yaml").model.weights == str(weights)  # still the run's start
    assert json.loads((tmp_path / "ft" / "summary.json").read_text())["steps"] == 2
    capsys.readouterr()
    status = command.main([*tiny, "run.name=ft", f"model.weights={tmp_path / 'b.pt'}", "train.max_steps=3"])
    assert status == 2 and f"holds a run started from the weights in {weights}, " in capsys.readouterr().err
    assert (tmp_path / "ft" / "config.yaml").read_text() == config


@pytest.mark.dali
def test_each_node_reads_its_own_copy_and_ranks_that_read_different_weights_stop(tiny_data, tmp_path):
    """Rank 1 reads model.weights from a path of its own: other weights stop every rank before
    the run folder (exit status 2); a copy of the same weights starts the run, and the same
    command restarted (a requeue) resumes it (rank 1's path was held against rank 0's recorded
    one, and refused)."""
    torch.save(paper_state(seed=5), tmp_path / "a.pt")
    torch.save(paper_state(seed=6), tmp_path / "b.pt")  # the same model, other values
    shutil.copy(tmp_path / "a.pt", tmp_path / "a_copy.pt")
    common = [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=r",
              f"model.weights={tmp_path / 'a.pt'}", "parallel.timeout_s=30"]  # fmt: skip
    proc = launch([rank_1_differs(tmp_path, TRAIN, (f"model.weights={tmp_path / 'b.pt'}",)), *common])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(lines) == 2 and lines[0] == lines[1], proc.stderr[-4000:]
    assert lines[0].startswith(f"error: the ranks read different model.weights (rank 0: {tmp_path / 'a.pt'} (weights ")
    assert lines[0].endswith("); every node needs the same file"), lines[0]
    assert not (tmp_path / "r" / "config.yaml").exists()
    # Exit status 2, a launch error (the worker that stops first: torchrun may end the other first).
    assert 2 in proc.statuses and 1 not in proc.statuses, (proc.statuses, proc.stderr[-3000:])
    own_copy = rank_1_differs(tmp_path, TRAIN, (f"model.weights={tmp_path / 'a_copy.pt'}",))
    check(launch([own_copy, *common, "train.max_steps=1"]))
    again = check(launch([own_copy, *common, "train.max_steps=2"]))
    assert "resumed from" in again.stderr
    assert load_config(tmp_path / "r" / "config.yaml").model.weights == str(tmp_path / "a.pt")
