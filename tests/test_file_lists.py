"""File lists from launch/scan.py: a list of the wrong split is refused before any work, a listed
file that is gone is named as gone (not as a bad file to exclude), and a name a list of one name
a line cannot hold is reported and left out instead of breaking the list."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
import torch
from _helpers import dali_missing

from alexnet.config import DataConfig
from alexnet.data import build_splits
from pipelines.base import ImageSpec, ShardSpec
from pipelines.filecheck import check_file
from pipelines.index import DataError, FileIndex, build_file_index, load_file_list
from pipelines.scan import Policy, print_report, scan
from pipelines.torchvision_loader import TorchvisionLoader

if not dali_missing():  # for the tests marked dali (skipped where DALI is not installed)
    from pipelines.dali import DaliLoader

IMAGE = ImageSpec(67, 76, "paper", (124.0, 116.0, 104.0), (58.0, 57.0, 57.0))


@pytest.fixture(scope="module")
def lists(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lists")
    scan(tiny_data, out, workers=1)
    return out


def loader(kind: str, files: list[str]):
    index = FileIndex(files, [0] * len(files), ["a"])
    shard = ShardSpec(0, 1, len(files), 0)
    if kind == "dali":
        return DaliLoader(index, "val", IMAGE, shard, torch.device("cpu"), 1, 1, "cpu")
    return TorchvisionLoader(index, "val", IMAGE, shard, torch.device("cpu"), 0, 1)


@pytest.mark.parametrize(("given", "split"), [("val", "train"), ("train", "val")])
def test_a_list_of_another_split_is_refused_naming_the_list_and_both_splits(lists, tiny_data, given, split):
    """val.txt's entries resolved under train/ are train files that happen to share their names:
    training would run on them and fail at validation with wrong advice."""
    expected = (
        rf"file list {re.escape(str(lists / given))}\.txt line 1: it lists the {given} files of "
        rf"{re.escape(str(tiny_data / given))}, but it is given for the {split} split "
        rf"\({re.escape(str(tiny_data / split))}\); pass the {split} list .*{re.escape(str(lists / split))}\.txt\)$"
    )
    with pytest.raises(DataError, match=expected) as info:
        load_file_list(lists / f"{given}.txt", tiny_data / split)
    assert "\n" not in str(info.value)


def test_training_with_swapped_lists_stops_before_any_work(lists, tiny_data):
    cfg = DataConfig(root=str(tiny_data), train_files=str(lists / "val.txt"), val_files=str(lists / "train.txt"))
    with pytest.raises(DataError, match=r"val\.txt line 1: it lists the val files .* given for the train split"):
        build_splits(cfg, 0)
    right = DataConfig(root=str(tiny_data), train_files=str(lists / "train.txt"), val_files=str(lists / "val.txt"))
    splits = build_splits(right, 0)
    assert (len(splits.train), len(splits.val)) == (120, 50)


def test_a_list_without_scan_s_header_is_read_for_any_split(tmp_path, tiny_data):
    listing = tmp_path / "hand.txt"
    listing.write_text("# my own list\ncircle/circle_0000.jpg\n")
    for split in ("train", "val"):
        index = load_file_list(listing, tiny_data / split, every_class=False)  # one class's file
        assert index.files == [str(tiny_data / split / "circle/circle_0000.jpg")]


def test_a_list_that_leaves_a_class_folder_without_files_is_refused_for_training(lists, tiny_data, tmp_path):
    """The scan left out every file of class `ring` (all bad): training on its lists kept an output
    for `ring` that was never a target, while ring's validation images still counted."""
    kept = [line for line in (lists / "train.txt").read_text().splitlines() if not line.startswith("ring/")]
    (tmp_path / "train.txt").write_text("\n".join(kept) + "\n")
    cfg = DataConfig(root=str(tiny_data), train_files=str(tmp_path / "train.txt"), val_files=str(lists / "val.txt"))
    with pytest.raises(DataError) as info:
        build_splits(cfg, 0)
    message = str(info.value)
    assert (
        f"file list {tmp_path / 'train.txt'} names no file of class folder(s) 'ring' of {tiny_data / 'train'}"
        in message
    )
    assert "launch/scan.py" in message and "\n" not in message
    assert len(load_file_list(tmp_path / "train.txt", tiny_data / "train", every_class=False)) == 108


def test_a_validation_list_may_cover_some_classes(lists, tiny_data, tmp_path):
    """A validation on a few classes' images trains, and is not held against the paper."""
    kept = [line for line in (lists / "val.txt").read_text().splitlines() if line.startswith(("#", "ring/"))]
    (tmp_path / "val.txt").write_text("\n".join(kept) + "\n")
    cfg = DataConfig(root=str(tiny_data), train_files=str(lists / "train.txt"), val_files=str(tmp_path / "val.txt"))
    splits = build_splits(cfg, 0)
    assert len(splits.val) == 5 and splits.validated_classes == ["ring"] and len(splits.classes) == 10


@pytest.mark.parametrize("kind", [pytest.param("dali", marks=pytest.mark.dali), "torchvision"])
def test_a_listed_file_that_does_not_exist_is_named_as_gone_with_the_scan_that_rewrites_the_list(
    tmp_path, tiny_data, kind
):
    """Listed files are not stat'ed up front (1.28 M of them on a network file system would
    delay every start); the decoder's failure says the file is gone and how to rewrite the list."""
    listing = tmp_path / "val.txt"
    listing.write_text("checkerboard/checkerboard_0000.jpg\ncircle/circle_0000.jpg\ncircle/gone.jpg\n")
    index = load_file_list(listing, tiny_data / "val", every_class=False)
    gone = str(tiny_data / "val" / "circle" / "gone.jpg")
    assert index.files[-1] == gone
    with pytest.raises(DataError) as info:
        list(loader(kind, index.files))
    message = str(info.value)
    assert gone in message and "The file does not exist" in message and "\n" not in message, message
    assert f"rewrite the lists with `python launch/scan.py {tiny_data} --out SCAN_DIR`" in message, message
    assert "To exclude bad files" not in message, message


def add(root: Path, rel: str, source: Path) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, root / rel)


def test_names_with_a_line_break_are_reported_and_left_out(tmp_path, tiny_data):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    good = tiny_data / "train" / "circle" / "circle_0000.jpg"
    breaks = ["train/circle/a\nb.jpg", "train/circle/c\rd.jpg", "train/dots/e\u2028f.jpg", "val/ring/g\x85h.jpg"]
    for rel in breaks:
        add(root, rel, good)
    for split in ("train", "val"):
        add(root, f"{split}/x\ny/0.jpg", good)  # a class folder as well

    result = scan(root, tmp_path / "out", workers=1)
    found = [f for split in ("train", "val") for f in result.findings[split]]
    assert [f.kind for f in found] == ["bad_name"] * 4 and all("line break" in f.detail for f in found)
    assert found[0].path == str(root / "train/circle/a\\nb.jpg")  # escaped: the report stays one line a file
    assert sum("x\\ny" in p and "line break" in p for p in result.problems) == 2
    with pytest.raises(DataError, match=r"names no file of class folder\(s\) 'x\\ny' of "):
        load_file_list(tmp_path / "out" / "train.txt", root / "train")  # the scan's folder problem, for training
    train = load_file_list(tmp_path / "out" / "train.txt", root / "train", every_class=False)
    val = load_file_list(tmp_path / "out" / "val.txt", root / "val", classes=train.classes, every_class=False)
    clean = build_file_index(tiny_data / "train").files
    assert train.files == [str(root / Path(f).relative_to(tiny_data)) for f in clean]
    assert len(val) == 50
    out = io.StringIO()
    print_report(result, tmp_path / "out", Policy(), stream=out)
    lines = out.getvalue().splitlines()
    assert sum(line.startswith("excluded   bad_name") for line in lines) == 4
    assert lines[4].startswith("checked 174 files"), lines  # no name split the report; x\\ny's file is not checked


def test_a_class_folder_starting_with_a_hash_is_not_read_back_as_a_comment(tmp_path, tiny_data):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    for split in ("train", "val"):
        add(root, f"{split}/#hash/0.jpg", tiny_data / "val" / "circle" / "circle_0000.jpg")
    scan(root, tmp_path / "out", workers=1)
    train = load_file_list(tmp_path / "out" / "train.txt", root / "train")
    assert str(root / "train" / "#hash" / "0.jpg") in train.files
    assert train.labels[train.files.index(str(root / "train" / "#hash" / "0.jpg"))] == train.classes.index("#hash")
    assert len(train) == len(build_file_index(root / "train"))


@pytest.mark.dali
def test_training_from_the_folder_reads_a_name_with_a_line_break(tmp_path, tiny_data):
    """DALI's reader takes the names as a list, not as lines: the folder index keeps the file."""
    odd = tmp_path / "circle" / "a\nb.jpg"
    add(tmp_path, "circle/a\nb.jpg", tiny_data / "train" / "circle" / "circle_0000.jpg")
    assert check_file(odd).kind == "bad_name"  # for the lists only
    assert str(odd) in build_file_index(tmp_path).files
    images, _ = next(iter(loader("dali", [str(odd)])))
    assert images.shape == (1, 3, 67, 67)


@pytest.mark.parametrize("spelling", ["same", "dot"])
def test_a_file_listed_twice_is_refused_naming_both_lines(lists, tiny_data, tmp_path, spelling):
    """A repeated line was read twice an epoch and, in a validation list, counted twice (102 images
    scored for 101 files)."""
    lines = (lists / "val.txt").read_text().splitlines()
    entries = [i for i, line in enumerate(lines, start=1) if line.strip() and not line.startswith("#")]
    first = lines[entries[0] - 1]
    again = first if spelling == "same" else first.replace("/", "/./", 1)
    doubled = tmp_path / "val.txt"
    doubled.write_text("\n".join([*lines, again]) + "\n")
    expected = f"file list {doubled} line {len(lines) + 1}: {again} is line {entries[0]}'s file again"
    with pytest.raises(DataError) as info:
        load_file_list(doubled, tiny_data / "val")
    assert str(info.value) == f"{expected}; list each file once"
