"""launch/evaluate.py and alexnet/evaluate.py: a checkpoint rebuilt from its own config, exact
top-1/top-5 and per-class counts, the same numbers on one process and under torchrun."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import (
    REPO,
    TINY_FC_WIDTH,
    TINY_TRAIN,
    check,
    dali_missing,
    launch,
    launcher,
    loader_failing_on_rank_1,
    one_process,
    rank_1_differs,
    rank_1_sees,
    without_dali,
)
from torch.nn import functional as F

from alexnet.checkpoint import CheckpointError, atomic_save
from alexnet.config import ConfigError, config_to_dict, load_config
from alexnet.evaluate import EvalOptions, resolve_eval_index, run_evaluation
from alexnet.inference import build_model_from_checkpoint
from alexnet.metrics import read_metrics
from alexnet.model import build_model
from alexnet.parallel.env import DistEnv
from alexnet.run import run_training
from pipelines.base import ImageSpec, ShardSpec
from pipelines.index import DataError, build_file_index
from pipelines.outputs import OutputPathError
from pipelines.torchvision_loader import TorchvisionLoader

if not dali_missing():  # for the tests marked dali (skipped where DALI is not installed)
    from pipelines.dali import DaliLoader

CPU = torch.device("cpu")
ONE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=CPU, backend="gloo")
EVALUATE = REPO / "launch" / "evaluate.py"


def tiny_config(tiny_data):
    return load_config(
        None,
        [
            f"data.root={tiny_data}",
            "data.crop=67",
            "data.resize=76",
            "data.batch_size=8",
            "data.num_threads=1",
            "data.mean=[124.0, 116.0, 104.0]",
            "data.std=[58.0, 57.0, 57.0]",
            "model.init=kaiming",
            f"model.fc_width={TINY_FC_WIDTH}",
        ],
    )


def save_checkpoint(model, cfg, folder):
    payload = {"format": 1, "model": model.state_dict(), "config": config_to_dict(cfg), "progress": {"epoch": 4}}
    return atomic_save(payload, folder)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """The paper model after 4 quick epochs on the tiny data: predictions that differ by class.
    fc6 and fc7 TINY_FC_WIDTH wide: at 4096 the checkpoint is 80 MB, trained here and read by
    every evaluation, process and rank of this file."""
    cfg = tiny_config(tiny_data)
    torch.manual_seed(0)
    model = build_model("paper", 10, 0.5, 67, "kaiming", TINY_FC_WIDTH)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    image = ImageSpec(67, 76, "paper", (124.0, 116.0, 104.0), (58.0, 57.0, 57.0))
    index, shard = build_file_index(tiny_data / "train"), ShardSpec(0, 1, 20, 0)
    if dali_missing():  # the tests that read without DALI still run: read with torchvision's loader
        loader = TorchvisionLoader(index, "train", image, shard, CPU, 0, 2)
    else:
        loader = DaliLoader(index, "train", image, shard, CPU, 1, 2, "cpu")
    model.train()
    for _ in range(4):
        for images, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    return save_checkpoint(model.eval(), cfg, tmp_path_factory.mktemp("trained") / "checkpoints")


def test_model_is_rebuilt_from_the_checkpoint_config(trained):
    loaded = build_model_from_checkpoint(trained)
    assert loaded.config.data.crop == 67 and loaded.num_classes == 10 and not loaded.model.training
    state = torch.load(trained, weights_only=True)["model"]
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())


@pytest.mark.dali
def test_centre_crop_counts_equal_a_direct_computation(tiny_data, trained):
    result = run_evaluation(EvalOptions(trained, data=str(tiny_data)), ONE)
    # direct: the val loader, the model, top-k by hand
    model = build_model_from_checkpoint(trained).model
    index = build_file_index(tiny_data / "val", classes=build_file_index(tiny_data / "train").classes)
    image = ImageSpec(67, 76, "paper", (124.0, 116.0, 104.0), (58.0, 57.0, 57.0))
    hits1, hits5 = [0] * 10, [0] * 10
    with torch.no_grad():
        for images, labels in DaliLoader(index, "val", image, ShardSpec(0, 1, 8, 0), CPU, 1, 2, "cpu"):
            top = model(images).topk(5, dim=1).indices
            for row, label in enumerate(labels.tolist()):
                if label >= 0:
                    hits1[label] += int(top[row, 0] == label)
                    hits5[label] += int(label in top[row].tolist())
    assert result["images"] == 50 and result["crops"] == "centre"
    assert [c["images"] for c in result["per_class"]] == [5] * 10
    assert [c["top1"] for c in result["per_class"]] == [100.0 * h / 5 for h in hits1]
    assert [c["top5"] for c in result["per_class"]] == [100.0 * h / 5 for h in hits5]
    assert result["top1"] == 100.0 * sum(hits1) / 50 and result["top5"] == 100.0 * sum(hits5) / 50
    assert 0 < sum(hits1) < 50 and len({c["top1"] for c in result["per_class"]}) > 1  # a real spread
    assert [c["name"] for c in result["per_class"]] == index.classes  # not WordNet ids: names as they are
    assert result["paper"]["comparable"] is False and "10" in result["paper"]["note"]
    assert result["epoch"] == 4


@pytest.mark.dali
def test_a_checkpoint_of_a_stop_during_validation_reports_the_epochs_its_weights_trained(tiny_data, trained, tmp_path):
    """A stop during epoch 5's validation saves epoch 4 (validated) with epoch_trained: the
    weights have trained 5 epochs, and the report said 4."""
    payload = torch.load(trained, weights_only=True)
    payload["progress"] = {"epoch": 4, "epoch_trained": True, "step": 70}
    stopped = atomic_save(payload, tmp_path / "checkpoints")
    result = run_evaluation(EvalOptions(stopped, data=str(tiny_data)), ONE)
    assert (result["epoch"], result["step"]) == (5, 70)


def replaced_on_rank_1(trained, folder, replaced_reads):
    """A wrapper that runs evaluate.py with rank 1 finding another step of the checkpoint (the
    same weights) under the same path on its first `replaced_reads` reads, as a run still training
    that replaces its last.pt between the ranks' reads would have it."""
    payload = torch.load(trained, weights_only=True)
    payload["progress"]["step"] = payload["progress"].get("step", 0) + 1
    other = atomic_save(payload, folder / "other")
    wrapper = folder / "rank_1_replaced.py"
    wrapper.write_text(
        "import dataclasses, os, runpy, sys\n"
        "import alexnet.evaluate as ev\n"
        "real, reads = ev.build_model_from_checkpoint, []\n"
        "def build(path, device):\n"
        "    reads.append(path)\n"
        f"    if os.environ['RANK'] == '1' and len(reads) <= {replaced_reads}:\n"
        f"        return dataclasses.replace(real({str(other)!r}, device), path=real(path, device).path)\n"
        "    return real(path, device)\n"
        "ev.build_model_from_checkpoint = build\n"
        f"sys.argv[0] = {str(EVALUATE)!r}\n"
        f"runpy.run_path({str(EVALUATE)!r}, run_name='__main__')\n"
    )
    return wrapper


@pytest.fixture(scope="module")
def ten_crop_on_two_ranks(tiny_data, trained, tmp_path_factory):
    """One torchrun launch, two tests' claims: the ten-crop evaluation on 2 gloo ranks, with rank 1
    finding another step of the checkpoint on its first read (the ranks read it again, and then
    evaluate the same checkpoint). The launch's start costs more than its evaluation; it returns
    the finished process and the result file it wrote."""
    folder = tmp_path_factory.mktemp("ten_crop_two_ranks")
    out = folder / "eval.json"
    wrapper = replaced_on_rank_1(trained, folder, 1)
    proc = launch([wrapper, trained, "--data", tiny_data, "--ten-crop", "--batch-size", "8", "--out", out,
                   "--timeout", "60"], nproc=2)  # fmt: skip
    return proc, out


@pytest.mark.dali
@pytest.mark.slow
def test_ten_crop_under_torchrun_equals_one_process(tiny_data, trained, ten_crop_on_two_ranks):
    """2 gloo ranks, shards of 25 images padded to 4 batches of 8: the same counts, class by class
    (the launch test_a_checkpoint_replaced_while_the_ranks_read_it_is_read_again[1] reads too)."""
    one = run_evaluation(EvalOptions(trained, data=str(tiny_data), ten_crop=True), ONE)
    proc, out = ten_crop_on_two_ranks
    check(proc)
    two = json.loads(out.read_text())
    assert "ten-crop" in proc.stdout and two["world_size"] == 2 and two["crops"] == "ten"
    assert two["images"] == one["images"] == 50
    for key in ("top1", "top5"):
        assert two[key] == one[key]
    assert [(c["images"], c["top1"], c["top5"]) for c in two["per_class"]] == [
        (c["images"], c["top1"], c["top5"]) for c in one["per_class"]
    ]
    # the loss is summed in float32 per batch, and the batches hold other images on 2 ranks
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    centre = run_evaluation(EvalOptions(trained, data=str(tiny_data)), ONE)
    assert centre["loss"] != one["loss"]  # ten crops are not the centre crop


@pytest.mark.dali
def test_wrong_class_count_and_missing_config_are_named(tiny_data, trained, tmp_path):
    for k in range(11):  # more classes than outputs (fewer are allowed: the tests below)
        (tmp_path / "val" / f"class{k}").mkdir(parents=True)
        (tmp_path / "val" / f"class{k}" / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"val: 11 classes, but checkpoint .* predicts 10"):
        run_evaluation(EvalOptions(trained, data=str(tmp_path)), ONE)
    payload = torch.load(trained, weights_only=True)
    del payload["config"]
    torch.save(payload, tmp_path / "noconfig.pt")
    with pytest.raises(CheckpointError, match=r"noconfig\.pt holds no config"):
        build_model_from_checkpoint(tmp_path / "noconfig.pt")


@pytest.mark.dali
def test_bad_flags_and_a_missing_split_are_named(tiny_data, trained, tmp_path, capsys, monkeypatch):
    with pytest.raises(DataError, match=r"nosuch does not exist: --split names a subfolder of"):
        run_evaluation(EvalOptions(trained, data=str(tiny_data), split="nosuch"), ONE)
    flat = tmp_path / "flat"  # val/ as ILSVRC2012_img_val.tar unpacks: files, no class folders
    shutil.copytree(tiny_data / "train", flat / "train")
    (flat / "val").mkdir()
    shutil.copy(next((tiny_data / "val").rglob("*.*")), flat / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataError, match=r"flat/val holds no class folders: .*launch/prepare_imagenet\.py"):
        run_evaluation(EvalOptions(trained, data=str(flat)), ONE)
    with monkeypatch.context() as here:
        here.chdir(trained.parent)
        status, _, err = evaluate_main(capsys, ".")
    assert status == 1 and "Traceback" not in err, err[-3000:]
    assert f"checkpoint . is a folder; name a checkpoint file in it (e.g. {Path('last.pt')})" in err
    with pytest.raises(ConfigError, match=r"--decoder mixed decodes on the GPU and needs a CUDA device"):
        run_evaluation(EvalOptions(trained, data=str(tiny_data), decoder="mixed"), ONE)
    # a usage error, as train.py's data.decoder=mixed without CUDA: exit 2 (it exited 1)
    status, _, err = evaluate_main(capsys, trained, "--data", tiny_data, "--decoder", "mixed")
    assert status == 2 and err.startswith("error: --decoder mixed decodes on the GPU"), err
    status, _, err = evaluate_main(capsys, trained, "--batch-size", "-3")
    assert status == 2 and "--batch-size: must be in [0, 65536] (0: the run's own), got -3" in err


def test_evaluation_without_dali_says_so_and_reads_with_torchvision_when_asked(tiny_data, trained, tmp_path):
    env = without_dali(tmp_path)
    proc = subprocess.run([sys.executable, EVALUATE, trained, "--data", tiny_data], capture_output=True, text=True,
                          env=env)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: evaluation reads images with DALI, and NVIDIA DALI is not installed" in proc.stderr
    assert "--pipeline torchvision reads them with PIL" in proc.stderr
    # Ten crops: the hint was --pipeline torchvision, whose error then said to use --pipeline dali.
    proc = subprocess.run([sys.executable, EVALUATE, trained, "--data", tiny_data, "--ten-crop"], capture_output=True,
                          text=True, env=env)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith(
        "error: --ten-crop reads the images with DALI, and NVIDIA DALI is not installed"
    ), proc.stderr[-3000:]
    assert "without --ten-crop, --pipeline torchvision gives the centre crop's figures" in proc.stderr
    out = tmp_path / "tv.json"
    proc = subprocess.run([sys.executable, EVALUATE, trained, "--data", tiny_data, "--pipeline", "torchvision",
                           "--out", out], capture_output=True, text=True, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["pipeline"] == "torchvision" and result["images"] == 50 and "read by torchvision" in proc.stdout


@pytest.mark.dali
def test_a_run_is_evaluated_as_it_validated_also_with_torchvision_and_a_wider_head(tiny_data, tmp_path):
    """A run that read its images with torchvision and has 12 outputs for 10 class folders (a
    1000-way head on a subset): evaluating its checkpoint gives its own last validation's figures.
    DALI resizes with another filter, so --pipeline dali gives other ones."""
    cfg = load_config(None, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=tv",
                             "data.pipeline=torchvision", "model.num_classes=12",
                             "train.epochs=1"])  # fmt: skip
    run_training(cfg, None)
    val = next(r for r in read_metrics(tmp_path / "tv" / "metrics.jsonl") if r["split"] == "val")
    last = tmp_path / "tv" / "checkpoints" / "last.pt"
    own = run_evaluation(EvalOptions(last), ONE)
    assert own["pipeline"] == "torchvision" and own["images"] == val["count"] == 50
    assert (own["top1"], own["top5"]) == (val["top1"], val["top5"]) and own["loss"] == pytest.approx(val["loss"])
    assert own["num_classes"] == own["classes_evaluated"] == 10 and len(own["per_class"]) == 10
    dali = run_evaluation(EvalOptions(last, pipeline="dali"), ONE)
    assert dali["pipeline"] == "dali" and dali["loss"] != own["loss"]
    # Some of its classes (the last three, not a prefix), in a folder of class folders: labelled
    # by name as training labelled them (they were labelled 0..2 and scored against other outputs).
    subset = tmp_path / "subset"
    kept = sorted(p.name for p in (tiny_data / "val").iterdir())[-3:]
    for name in kept:
        shutil.copytree(tiny_data / "val" / name, subset / name)
    part = run_evaluation(EvalOptions(last, data=str(subset)), ONE)
    by_folder = {c["folder"]: c for c in own["per_class"]}
    assert [c for c in part["per_class"] if c["images"]] == [by_folder[name] for name in kept]
    assert (part["num_classes"], part["classes_evaluated"]) == (10, 3) and part["images"] == sum(
        by_folder[name]["images"] for name in kept
    )
    (subset / "not_a_trained_class").mkdir()
    shutil.copy(next((subset / kept[0]).iterdir()), subset / "not_a_trained_class")
    with pytest.raises(DataError, match=r"subset has class folders absent from the training data: not_a_trained"):
        run_evaluation(EvalOptions(last, data=str(subset)), ONE)
    with pytest.raises(ConfigError, match="--ten-crop reads the images with DALI"):
        run_evaluation(EvalOptions(last, pipeline="torchvision", ten_crop=True), ONE)


def checkpoint_with(trained, folder, **config_changes):
    """A copy of the trained checkpoint whose stored config has `section.key` values changed."""
    payload = torch.load(trained, weights_only=True)
    for dotted, value in config_changes.items():
        section, key = dotted.split("__")
        payload["config"][section][key] = value
    return atomic_save(payload, folder)


@pytest.mark.dali
def test_the_run_s_val_file_list_leaves_out_bad_files(tiny_data, trained, tmp_path):
    """A run trained on launch/scan.py's lists is evaluated on its val list by default; --files names
    one for any folder; without a list the bad file stops the evaluation with a hint to --files."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    good = sorted(p.relative_to(data / "val").as_posix() for p in (data / "val").rglob("*.*"))
    first = data / "val" / good[0]
    (first.parent / "broken.JPEG").write_bytes(first.read_bytes()[:300])  # a truncated JPEG
    listing = tmp_path / "val.txt"
    listing.write_text("# from launch/scan.py\n" + "\n".join(good[1:]) + "\n")  # also leaves one good file out
    ckpt = checkpoint_with(trained, tmp_path / "ck", data__root=str(data), data__val_files=str(listing))
    own = run_evaluation(EvalOptions(ckpt), ONE)
    assert own["images"] == 49 and own["files"] == str(listing)
    assert sum(c["images"] for c in own["per_class"]) == 49
    named = run_evaluation(EvalOptions(trained, data=str(data), files=str(listing)), ONE)
    assert named["images"] == 49 and named["top1"] == own["top1"] and named["files"] == str(listing)
    with pytest.raises(DataError, match=r"broken\.JPEG(.|\n)*launch/evaluate\.py: --files SCAN_DIR/val\.txt"):
        run_evaluation(EvalOptions(trained, data=str(data)), ONE)  # another dataset: the run's list does not apply
    # The run's train split with its own list: --split train read the whole folder, bad file and all.
    train_good = sorted(p.relative_to(data / "train").as_posix() for p in (data / "train").rglob("*.*"))
    (data / "train" / train_good[0]).write_bytes(b"not a JPEG")
    train_listing = tmp_path / "train.txt"
    train_listing.write_text("\n".join(train_good[1:]) + "\n")
    ckpt = checkpoint_with(trained, tmp_path / "ck2", data__root=str(data), data__train_files=str(train_listing))
    train = run_evaluation(EvalOptions(ckpt, split="train"), ONE)
    assert train["images"] == 119 and train["files"] == str(train_listing)


@pytest.mark.dali
def test_a_run_validated_with_ten_crops_is_told_its_centre_crop_figures_are_not_its_own(trained, tmp_path, caplog):
    """evaluate.py without --ten-crop gave centre-crop figures that differ from the run's logged
    validation (data.val_ten_crop) without a word."""
    ckpt = checkpoint_with(trained, tmp_path / "ck", data__val_ten_crop=True)
    with caplog.at_level("INFO", logger="alexnet"):
        result = run_evaluation(EvalOptions(ckpt), ONE)
    assert result["crops"] == "centre"
    assert "the run validated with ten crops (data.val_ten_crop): these are centre-crop figures" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="alexnet"):
        assert run_evaluation(EvalOptions(ckpt, ten_crop=True), ONE)["crops"] == "ten"
    assert "centre-crop figures" not in caplog.text


def test_ranks_started_with_different_options_stop_naming_them(trained, tmp_path):
    """--ten-crop on one node only printed a blend of centre-crop and ten-crop figures, exit 0."""
    wrapper = rank_1_differs(tmp_path, EVALUATE, ("--ten-crop", "--data", str(tmp_path)))
    proc = launch([wrapper, trained, "--out", tmp_path / "eval.json", "--timeout", "30"], nproc=2)
    assert proc.returncode != 0
    named = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(named) == 2 and named[0] == named[1], proc.stderr[-4000:]
    assert named[0].startswith(
        "error: the ranks were started with different evaluate.py options: --ten-crop False on rank 0, True on rank 1; "
    ), named[0]  # --data may differ (a node's own copy of the data)
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.dali
def test_ranks_that_load_different_checkpoints_stop_naming_them(trained, tmp_path):
    """--checkpoint may be a node's own copy, but one of another step was evaluated into a blend of
    two models' figures without a word."""
    payload = torch.load(trained, weights_only=True)
    step = payload["progress"].get("step", 0) + 1
    payload["progress"]["step"] = step
    other = atomic_save(payload, tmp_path / "other")
    wrapper = tmp_path / "rank_1_other.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        f"if os.environ['RANK'] == '1': sys.argv[1] = {str(other)!r}\n"
        f"sys.argv[0] = {str(EVALUATE)!r}\n"
        f"runpy.run_path({str(EVALUATE)!r}, run_name='__main__')\n"
    )
    proc = launch([wrapper, trained, "--out", tmp_path / "eval.json", "--timeout", "30"], nproc=2)
    assert proc.returncode != 0
    named = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(named) == 2 and named[0] == named[1], proc.stderr[-4000:]
    assert named[0] == (f"error: the ranks loaded different checkpoints (rank 0: {trained} (step {step - 1}); "
                        f"rank 1: {other} (step {step})); give every rank the same one")  # fmt: skip


@pytest.mark.dali
@pytest.mark.parametrize("replaced_reads", [1, 3])
def test_a_checkpoint_replaced_while_the_ranks_read_it_is_read_again(trained, tmp_path, replaced_reads, request):
    """A run still training replaces its last.pt: ranks that read it moments apart loaded two
    steps, and the error told the user to give every rank the same file, which they had. Rank 1
    here finds another step under the same path on its first `replaced_reads` reads: once, the
    ranks read again and evaluate (the ten-crop launch of test_ten_crop_under_torchrun_equals_one_process,
    whose figures are the checkpoint's); every time (3 reads), the error says what may have happened."""
    if replaced_reads == 1:
        proc, out = request.getfixturevalue("ten_crop_on_two_ranks")
        assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
        assert proc.stderr.count("replaced by a run still training?); reading it again") == 1
        return
    wrapper = replaced_on_rank_1(trained, tmp_path, replaced_reads)
    proc = launch([wrapper, trained, "--out", tmp_path / "eval.json", "--timeout", "60"], nproc=2)
    named = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(named) == 2 and named[0] == named[1], proc.stderr[-4000:]
    assert named[0].endswith(")); every rank read the same path: a run still training into it replaced the "
                             "file between the ranks' reads (run again, or use a copy of the file), or each node has "
                             "a copy of its own there, and they differ"), named[0]  # fmt: skip
    assert proc.stderr.count("reading it again") == 2


@pytest.mark.dali
def test_a_checkpoint_missing_on_one_rank_s_node_stops_every_rank_naming_it(trained, tmp_path):
    """Rank 1 failed to load its checkpoint and met rank 0 in the checkpoint comparison's gather:
    a ValueError traceback on rank 1, an IndexError on rank 0. Both now stop with rank 1's error."""
    missing = tmp_path / "elsewhere" / "last.pt"
    wrapper = tmp_path / "rank_1_missing.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        f"if os.environ['RANK'] == '1': sys.argv[1] = {str(missing)!r}\n"
        f"sys.argv[0] = {str(EVALUATE)!r}\n"
        f"runpy.run_path({str(EVALUATE)!r}, run_name='__main__')\n"
    )
    proc = launch([wrapper, trained, "--out", tmp_path / "eval.json", "--timeout", "30"], nproc=2)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "ValueError" not in proc.stderr and "IndexError" not in proc.stderr, proc.stderr[-4000:]
    named = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(named) == 2 and named[0] == named[1], proc.stderr[-4000:]
    assert named[0].startswith(f"error: rank 1 (of 2): checkpoint {missing}"), named[0]


@pytest.mark.dali
def test_a_bad_file_in_one_rank_s_shard_stops_every_rank_with_its_name(tiny_data, trained, tmp_path):
    """The rank that read it stopped with its name; the other died in the final all-reduce with a
    gloo traceback. The ranks now agree on each batch, and both stop with the file's name."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bad = data / "val" / "circle" / "circle_0001.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    out = tmp_path / "eval.json"
    proc = launch([EVALUATE, trained, "--data", data, "--out", out, "--timeout", "30"], nproc=2)
    assert proc.returncode != 0
    named = [line for line in proc.stderr.splitlines() if "error: " in line and str(bad) in line]
    assert len(named) == 2, proc.stderr[-4000:]  # one line from each rank, neither run into the other
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert not out.exists()


def test_a_bad_file_leaves_no_worker_folders_behind(tiny_data, trained, tmp_path):
    """The torchvision loader's workers were closed only after a whole evaluation: stopped by a
    bad file, they were left to the interpreter's exit, which kills them before they remove their
    /tmp/pymp-* folders (one per evaluation)."""
    data, private_tmp = tmp_path / "data", tmp_path / "tmp"
    shutil.copytree(tiny_data, data)
    private_tmp.mkdir()
    bad = data / "val" / "circle" / "circle_0001.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    args = [EVALUATE, trained, "--data", data, "--pipeline", "torchvision", "--num-threads", "2", "--out", tmp_path]
    proc = one_process(args, env={"TMPDIR": str(private_tmp)})  # multiprocessing's folders go there
    assert proc.returncode == 1 and str(bad) in proc.stderr, proc.stderr[-3000:]
    # The workers' folders. Under a loaded CI run an 8-character entry of unknown origin (no
    # prefix: not multiprocessing's, not the project's) was left there twice in ~10 full runs and
    # never in 10 runs of this test alone or 6 at once; it is not what this test is about.
    assert [p.name for p in private_tmp.iterdir() if p.name.startswith("pymp-")] == []


@pytest.mark.dali
def test_a_loader_failing_unforeseen_on_one_rank_stops_every_rank(tiny_data, trained, tmp_path):
    """A DALI internal error on rank 1 alone: rank 0 died in the final all-reduce with a gloo
    traceback. Both now stop with one line naming rank 1 and its error."""
    wrapper = loader_failing_on_rank_1(tmp_path, EVALUATE, "val", at_batch=2)
    out = tmp_path / "eval.json"
    proc = launch([wrapper, trained, "--data", tiny_data, "--batch-size", "4", "--out", out, "--timeout", "30"],
                  nproc=2)  # fmt: skip
    assert proc.returncode != 0
    said = "error: rank 1 (of 2) could not load its batch: RuntimeError: Critical error in pipeline: injected"
    assert proc.stderr.count(said) == 2, proc.stderr[-4000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.dali
def test_a_data_folder_one_rank_lacks_stops_every_rank_naming_that_rank(tiny_data, trained, tmp_path):
    """Node-local data missing on rank 1's node: rank 1 stopped with its error and rank 0 died in
    the first all-reduce with a gloo traceback. Both now stop with rank 1's error, naming it."""
    missing = tmp_path / "not_on_this_node"
    wrapper = rank_1_sees(tmp_path, EVALUATE, "--data", missing)
    proc = launch([wrapper, trained, "--data", tiny_data, "--out", tmp_path / "e.json", "--timeout", "30"], nproc=2)
    assert proc.returncode != 0
    assert proc.stderr.count(f"error: rank 1 (of 2): data folder {missing} does not exist") == 2, proc.stderr[-4000:]
    assert "[rank0]: Traceback" not in proc.stderr and not (tmp_path / "e.json").exists()


@pytest.mark.dali
def test_a_node_whose_copy_of_the_data_differs_stops_every_rank_naming_both(tiny_data, trained, tmp_path):
    """--data may be each node's own copy; one a file short was evaluated into figures of two
    different image sets (the ranks' shards), or its ranks took different numbers of batches."""
    short = tmp_path / "short"
    shutil.copytree(tiny_data, short)
    next((short / "val" / "circle").iterdir()).unlink()
    wrapper = rank_1_sees(tmp_path, EVALUATE, "--data", short)
    proc = launch([wrapper, trained, "--data", tiny_data, "--out", tmp_path / "e.json", "--timeout", "30"], nproc=2)
    assert proc.returncode != 0
    named = [line for line in proc.stderr.splitlines() if line.startswith("error: the ranks read different data")]
    assert len(named) == 2 and named[0] == named[1], proc.stderr[-4000:]
    assert f"(rank 0: {tiny_data / 'val'} (10 classes, 50 images, file list " in named[0]
    assert f"; rank 1: {short / 'val'} (10 classes, 49 images, file list " in named[0]
    assert "[rank0]: Traceback" not in proc.stderr and not (tmp_path / "e.json").exists()


def test_an_unusable_out_stops_every_rank_also_without_torchrun_s_agent(trained, tmp_path):
    """Ranks started by hand (or by another launcher): rank 0 checked --out alone and stopped,
    and rank 1 waited for it at the process group's start until the timeout. Rank 0 still checks
    it (another node may not see its folder), and both stop with its error."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2"}  # fmt: skip
    command = [sys.executable, str(EVALUATE), str(trained), "--out", str(blocker / "x.json"), "--timeout", "120"]
    ranks = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]  # fmt: skip
    try:
        errors = [rank.communicate(timeout=60)[1] for rank in ranks]  # well inside the ranks' 120 s
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [2, 2]
    said = f"error: rank 0 (of 2): --out {blocker / 'x.json'}: {blocker} is a file, not a folder"
    assert all(said in e for e in errors), errors


@pytest.mark.dali
def test_precision_is_the_run_s_unless_asked_and_fp16_falls_back_on_a_cpu(tiny_data, trained, tmp_path):
    fp32 = run_evaluation(EvalOptions(trained, data=str(tiny_data), amp="off"), ONE)
    fp16_run = checkpoint_with(trained, tmp_path / "fp16", train__amp="fp16")
    fallback = run_evaluation(EvalOptions(fp16_run, data=str(tiny_data)), ONE)
    assert fallback["amp"] == fp32["amp"] == "off"
    assert (fallback["loss"], fallback["per_class"]) == (fp32["loss"], fp32["per_class"])
    bf16_run = checkpoint_with(trained, tmp_path / "bf16", train__amp="bf16")
    bf16 = run_evaluation(EvalOptions(bf16_run, data=str(tiny_data)), ONE)
    assert bf16["amp"] == "bf16" and bf16["loss"] != fp32["loss"]  # bf16 autocast rounds differently
    asked = run_evaluation(EvalOptions(bf16_run, data=str(tiny_data), amp="off"), ONE)
    assert asked["amp"] == "off" and asked["loss"] == fp32["loss"]
    with pytest.raises(ConfigError, match=r"--amp fp16 needs a CUDA device"):
        run_evaluation(EvalOptions(trained, data=str(tiny_data), amp="fp16"), ONE)


def test_a_synthetic_data_run_needs_data(tiny_data, trained, tmp_path, capsys):
    """Without --data the command must change: exit 2 (it was 1, as for a failure of the data)."""
    ckpt = checkpoint_with(trained, tmp_path / "syn", data__pipeline="synthetic")
    with pytest.raises(ConfigError, match=r"trained on synthetic data .*pass --data"):
        run_evaluation(EvalOptions(ckpt), ONE)
    assert launcher("evaluate").main([str(ckpt)]) == 2
    said = capsys.readouterr().err
    assert said.startswith(f"error: checkpoint {ckpt} was trained on synthetic data") and said.count("\n") == 1
    assert run_evaluation(EvalOptions(ckpt, data=str(tiny_data)), ONE)["images"] == 50  # stores no class names


@pytest.mark.dali
def test_a_checkpoint_without_class_names_and_a_wider_head_is_labelled_by_the_roots_train_folder(tiny_data, tmp_path):
    """Checkpoints written before they stored their class names: 12 outputs for the 10 folders
    of <root>/train, which labelled its training, are evaluated as before (fewer folders than
    outputs allowed, more refused)."""
    cfg = tiny_config(tiny_data)
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model("paper", 12, 0.5, 67, "kaiming", TINY_FC_WIDTH).eval(), cfg, tmp_path / "wide")
    assert "classes" not in torch.load(ckpt, weights_only=True)
    result = run_evaluation(EvalOptions(ckpt, data=str(tiny_data)), ONE)
    assert result["images"] == 50 and result["num_classes"] == 10 and len(result["per_class"]) == 10


@pytest.mark.dali
def test_out_is_checked_before_the_evaluation_and_a_folder_takes_the_default_name(
    tiny_data, trained, tmp_path, capsys, caplog
):
    folder = tmp_path / "results"
    folder.mkdir()
    status, out, err = evaluate_main(capsys, trained, "--data", tiny_data, "--out", folder)
    assert status == 0, err
    written = json.loads((folder / f"{trained.name}.eval-centre.json").read_text())
    assert written["images"] == 50 and f"written to {folder / trained.name}.eval-centre.json" in out
    # Another split has a name of its own: --split train replaced the validation's result.
    status, out, err = evaluate_main(capsys, trained, "--data", tiny_data, "--split", "train", "--out", folder)
    assert status == 0 and f"written to {folder / trained.name}.eval-train-centre.json" in out, err
    assert json.loads((folder / f"{trained.name}.eval-train-centre.json").read_text())["images"] == 120
    assert json.loads((folder / f"{trained.name}.eval-centre.json").read_text()) == written
    # Other images under the same name: replaced, and said (it was not).
    other = tmp_path / "other"
    shutil.copytree(tiny_data / "val", other / "val")
    with caplog.at_level("WARNING", logger="alexnet"):
        status, out, err = evaluate_main(capsys, trained, "--data", other, "--out", folder)
    assert status == 0 and json.loads((folder / f"{trained.name}.eval-centre.json").read_text())["data"] == str(
        other / "val"
    )
    replaced = f"it replaces the result on {tiny_data / 'val'} that {trained.name}.eval-centre.json held"
    assert caplog.text.count(replaced) == 1
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    status, out, err = evaluate_main(capsys, trained, "--data", tiny_data, "--out", blocker / "eval.json")
    assert status == 2
    assert f"error: --out {blocker / 'eval.json'}: {blocker} is a file, not a folder" in err
    assert "Traceback" not in err and "images" not in out  # stopped before evaluating
    typo = tmp_path / "typo" / "sub" / "last.pt"
    status, _, err = evaluate_main(capsys, typo)
    assert status == 1 and "does not exist" in err
    assert not (tmp_path / "typo").exists()  # the default --out beside it was not created


def test_out_with_a_trailing_slash_is_a_folder_to_create(tmp_path):
    command = launcher("evaluate")
    ckpt = tmp_path / "run" / "last.pt"
    assert command.resolve_out(f"{tmp_path}/results/", ckpt, False) == tmp_path / "results" / "last.pt.eval-centre.json"
    assert command.resolve_out(f"{tmp_path}/results", ckpt, True) == tmp_path / "results"  # a file name
    assert command.resolve_out(None, ckpt, True) == tmp_path / "run" / "last.pt.eval-tencrop.json"
    assert command.resolve_out(None, ckpt, True, "train") == tmp_path / "run" / "last.pt.eval-train-tencrop.json"
    assert not (tmp_path / "results").exists()  # created only when the result is written
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the writability probe left nothing
    if os.path.isdir("/proc") and os.access("/proc", os.W_OK):  # root: the bits allow it; no file can be made
        with pytest.raises(OutputPathError, match="--out /proc/eval.json: /proc is not a writable folder"):
            command.resolve_out("/proc/eval.json", ckpt, False)
        # a checkpoint in a read-only place: the error named an --out never given, and not how to go on
        default = "the default output /proc/last.pt.eval-centre.json (--out for another): /proc is not a writable"
        with pytest.raises(OutputPathError, match=re.escape(default)):
            command.resolve_out(None, Path("/proc/last.pt"), False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt.eval-centre.json").write_text("notes\n")  # not a result: kept, named as the default
    with pytest.raises(OutputPathError, match=r"^the default output .*last\.pt\.eval-centre\.json \(--out for an"):
        command.resolve_out(None, ckpt, False)


def evaluate_main(capsys, *args):
    """launch/evaluate.py's main in this process: its exit status (what run_command exits with,
    or argparse's SystemExit code), stdout and stderr. A launch of its own imports torch and DALI
    anew, seconds each, for a check of what the command says and returns."""
    try:
        status = launcher("evaluate").main([str(a) for a in args])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def test_out_never_replaces_the_checkpoint_it_evaluates(tiny_data, trained, tmp_path, capsys):
    """--out naming the checkpoint printed "written to" and left 2 KB of JSON in its place."""
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(trained, ckpt)
    before = ckpt.read_bytes()
    status, out, err = evaluate_main(capsys, ckpt, "--data", tiny_data, "--out", ckpt)
    assert status == 2 and "Traceback" not in err and "images" not in out
    said = f"error: --out {ckpt}: that is the checkpoint being evaluated; name a JSON file or a folder"
    assert err == f"{said} (nothing was overwritten)\n"
    assert ckpt.read_bytes() == before
    # the same file by another name: a symbolic link, a hard link, another spelling of its path
    (tmp_path / "sym.pt").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hard.pt")
    command = launcher("evaluate")
    for other in (tmp_path / "sym.pt", tmp_path / "hard.pt", ckpt.parent / ".." / "checkpoints" / "last.pt"):
        with pytest.raises(OutputPathError, match=rf"^--out {re.escape(str(other))}: that is the checkpoint being"):
            command.resolve_out(str(other), ckpt, False)
        with pytest.raises(OutputPathError, match="that is the checkpoint being evaluated"):
            command.resolve_out(str(ckpt), other, False)  # the checkpoint named through it
    assert ckpt.read_bytes() == before


@pytest.mark.dali
def test_out_replaces_an_earlier_result_and_no_other_file(tiny_data, trained, tmp_path, capsys):
    """metrics.jsonl, a config, an export: each was replaced by the result. An earlier result still is
    (the replacing evaluation a process of its own, the other two in this one)."""
    out = tmp_path / "eval.json"
    status, _, err = evaluate_main(capsys, trained, "--data", tiny_data, "--out", out)
    assert status == 0, err[-3000:]
    earlier = json.loads(out.read_text())
    out.write_text(json.dumps({**earlier, "marker": 1}, indent=2) + "\n")
    again = subprocess.run([sys.executable, EVALUATE, trained, "--data", tiny_data, "--out", out], capture_output=True,
                           text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "marker" not in json.loads(out.read_text()) and f"written to {out}" in again.stdout
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"split": "train", "step": 1, "loss": 2.3}\n')
    status, refused_out, refused_err = evaluate_main(capsys, trained, "--data", tiny_data, "--out", metrics)
    assert status == 2 and "images" not in refused_out
    said = f"error: --out {metrics}: the file exists and is not an earlier result of launch/evaluate.py"
    assert refused_err == f"{said}; name a new file or a folder (nothing was overwritten)\n"
    assert metrics.read_text() == '{"split": "train", "step": 1, "loss": 2.3}\n'


def test_an_earlier_result_is_told_from_other_files_by_a_bounded_read(trained, tmp_path):
    command = launcher("evaluate")
    result = {"checkpoint": str(trained), "crops": "centre", "images": 50000, "top1": 57.1, "top5": 80.2,
              "per_class": [{"name": f"n{i:08d}", "folder": f"n{i:08d}", "images": 50, "top1": 50.0, "top5": 80.0}
                            for i in range(1000)]}  # fmt: skip
    big = tmp_path / "imagenet.json"  # 1000 classes: more than the prefix that is read
    big.write_text(json.dumps(result, indent=2) + "\n")
    assert big.stat().st_size > 1 << 16
    assert command.resolve_out(str(big), trained, False) == big
    small = tmp_path / "compact.json"  # any layout, read whole
    small.write_text(json.dumps({k: v for k, v in result.items() if k != "per_class"}))
    assert command.resolve_out(str(small), trained, False) == small
    nested = tmp_path / "nested.json"  # the keys, but not at the top
    nested.write_text(json.dumps({"runs": [result] * 2}, indent=2))
    yaml = tmp_path / "config.yaml"
    yaml.write_text("checkpoint:\n  resume: auto\n")
    huge = tmp_path / "huge.json"  # sparse: 64 GiB, were it read whole
    with huge.open("wb") as f:
        f.write(b"{")
        f.truncate(64 << 30)
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    devices = [Path("/dev/null")] if Path("/dev/null").exists() else []  # replaced by a file before
    for other in (nested, yaml, huge, empty, trained, *devices):
        with pytest.raises(OutputPathError, match=rf"^--out {re.escape(str(other))}: the file exists and is not an"):
            command.resolve_out(str(other), tmp_path / "another.pt", False)


def test_a_refused_out_stops_every_rank_under_torchrun(trained, tmp_path):
    """Rank 0 checks --out and shares the refusal: both ranks stop with its line, nothing written."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"split": "val", "step": 7}\n')
    proc = launch([EVALUATE, trained, "--out", metrics, "--timeout", "60"], nproc=2)
    assert proc.returncode != 0
    said = f"error: rank 0 (of 2): --out {metrics}: the file exists and is not an earlier result"
    assert proc.stderr.count(said) == 2, proc.stderr[-4000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert metrics.read_text() == '{"split": "val", "step": 7}\n'


@pytest.mark.parametrize(
    ("value", "said"),
    [(v, "must be a positive number of seconds") for v in ("0", "-5", "nan", "inf")]
    + [(v, "must be in [10, 10000000] seconds (as parallel.timeout_s)") for v in ("0.001", "9.9", "1e8")],
)
def test_timeout_is_held_to_the_range_of_parallel_timeout_s(trained, capsys, value, said):
    """--timeout 0 under torchrun ended in a 100-line DistNetworkError traceback ("timed out after
    0ms"); 0.001 in C++ stack frames and an error that named parallel.timeout_s."""
    with pytest.raises(SystemExit) as exc:
        launcher("evaluate").parse_args([str(trained), "--timeout", value])
    assert exc.value.code == 2
    assert f"argument --timeout: {said}, got {value}\n" in capsys.readouterr().err
    assert launcher("evaluate").parse_args([str(trained), "--timeout", "10"]).timeout == 10.0


def test_timeout_0_under_torchrun_is_one_line_per_rank(trained, tmp_path):
    proc = launch([EVALUATE, trained, "--timeout", "0", "--out", tmp_path / "e.json"], nproc=2)
    assert proc.returncode != 0 and "DistNetworkError" not in proc.stderr, proc.stderr[-4000:]
    # Each rank that gets to print says it in one line; torchrun may stop the second rank (SIGTERM)
    # once the first has exited, before it prints (seen once in a fresh-clone run).
    assert 1 <= proc.stderr.count("error: argument --timeout: must be a positive number of seconds, got 0") <= 2
    assert not (tmp_path / "e.json").exists()


def test_files_that_are_not_checkpoints_are_named_in_one_line(trained, tmp_path, capsys):
    """An export, or any other file, given as the checkpoint: torch's advice to load with
    weights_only=False (running the file's code), or a KeyError, in 6 lines."""
    from alexnet.export import export_checkpoint

    onnx, script = (c.path for c in export_checkpoint(trained, tmp_path, "m", ["onnx", "torchscript"]))
    text = tmp_path / "metrics.jsonl"
    text.write_text('{"split": "val", "step": 7}\n')
    exported = "launch/export.py writes those from a checkpoint; name the checkpoint itself"
    for path, what in ((onnx, f"an ONNX model: {exported}"), (script, f"a TorchScript archive: {exported}"),
                       (text, "not a PyTorch file")):  # fmt: skip
        status, _, err = evaluate_main(capsys, path)
        assert status == 1, err[-3000:]
        assert err == f"error: {path} is not a checkpoint of this trainer ({what})\n"
        assert not list(tmp_path.glob("*.eval-centre.json"))


@pytest.mark.parametrize("name", ["train", "val"])
def test_a_folder_of_classes_may_have_a_class_named_like_a_split(tiny_data, tmp_path, name):
    folder = tmp_path / "classes"
    shutil.copytree(tiny_data / "val", folder)
    (folder / "cross").rename(folder / name)  # CIFAR-100 has a class named "train"
    index, split_dir, _ = resolve_eval_index(tiny_config(tiny_data), EvalOptions(tmp_path / "x.pt", data=str(folder)))
    assert split_dir == folder and len(index) == 50 and name in index.classes and len(index.classes) == 10


@pytest.mark.dali
def test_a_run_s_data_folder_that_is_not_here_says_to_pass_data(tiny_data, trained, tmp_path, monkeypatch):
    """A relative data.root is relative to the folder the run started in: evaluate.py run from
    another folder says so, and --data evaluates the same files."""
    monkeypatch.chdir(tmp_path)
    relative = checkpoint_with(trained, tmp_path / "rel", data__root="data/imagenet")
    with pytest.raises(DataError, match=rf"data folder data/imagenet \(data.root in .*, read from this folder, "
                       rf"{re.escape(str(tmp_path))}, as it is relative\) does not exist: pass --data"):  # fmt: skip
        run_evaluation(EvalOptions(relative), ONE)
    gone = checkpoint_with(trained, tmp_path / "abs", data__root=str(tmp_path / "moved"))
    with pytest.raises(
        DataError, match=r"moved \(data.root in the config of checkpoint .*\) does not exist: pass --data"
    ):
        run_evaluation(EvalOptions(gone), ONE)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "imagenet").symlink_to(tiny_data)
    assert (
        run_evaluation(EvalOptions(relative), ONE)["images"]
        == run_evaluation(EvalOptions(gone, data=str(tiny_data)), ONE)["images"]
        == 50
    )


def test_options_that_contradict_each_other_are_a_usage_error(tmp_path, capsys):
    """--pipeline torchvision with --ten-crop or a DALI decoder exited 1 (as a bad checkpoint or
    data would) after the checkpoint was read; a usage error is argparse's exit 2, at once."""
    parse_args = launcher("evaluate").parse_args
    missing = str(tmp_path / "never_read.pt")
    for flags, said in ((["--ten-crop"], "--ten-crop reads the images with DALI"),
                        (["--decoder", "cpu"], "--decoder sets DALI's decoder")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            parse_args([missing, "--pipeline", "torchvision", *flags])
        assert exit_.value.code == 2 and said in capsys.readouterr().err
    assert parse_args([missing, "--pipeline", "dali", "--ten-crop", "--decoder", "cpu"]).ten_crop


def test_powersgd_state_given_as_the_checkpoint_names_the_run_s_checkpoint(tmp_path):
    """A rank's PowerSGD state file has the checkpoint format and no config: it was refused as a
    checkpoint that "holds no config (key 'config')"."""
    from alexnet.checkpoint import FORMAT_VERSION
    from alexnet.powersgd_checkpoint import rank_file

    ckpt_dir = tmp_path / "run" / "checkpoints"
    # As save_powersgd_state writes it: the step, the setup a resume must match, the rank's state.
    payload = {"format": FORMAT_VERSION, "step": 4, "setup": {"mode": "data"}, "state": {"fc6": torch.zeros(2)}}
    state = atomic_save(payload, rank_file(ckpt_dir, 1).parent, rotate=False)
    with pytest.raises(CheckpointError) as err:
        run_evaluation(EvalOptions(state), ONE)
    assert str(err.value) == (
        f"{state} is PowerSGD state of a run (one rank's error feedback, kept beside its checkpoint), not a "
        f"checkpoint: name the run's checkpoints/last.pt instead ({ckpt_dir / 'last.pt'})"
    )


def test_a_stdout_that_fails_keeps_the_result_file(tiny_data, trained, tmp_path):
    """With PYTHONUNBUFFERED=1 (containers, gpu_check.sh) a full log disk or a closed pipe on stdout
    failed the result's print: exit 1 naming "No space left on device", and no JSON written."""
    out = tmp_path / "eval.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, EVALUATE, trained, "--data", tiny_data, "--out", out], stdout=full,
                              stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.endswith("error: stdout failed (No space left on device); the result goes to its file only\n")
    assert json.loads(out.read_text())["images"] == 50
