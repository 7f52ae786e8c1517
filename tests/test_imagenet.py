"""ImageNet class names and the ILSVRC-2012 validation layout, on a generated miniature of the
official files (flat val folder and archive, devkit meta.mat + ground truth, Kaggle's CSV)."""

import errno
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from _helpers import launcher
from PIL import Image
from torchvision.models._meta import _IMAGENET_CATEGORIES

from alexnet.imagenet import (
    ImageNetLayoutError,
    class_names,
    convert_val_folder,
    extract_val_archive,
    load_imagenet_classes,
    read_ground_truth,
)
from pipelines.index import build_file_index
from pipelines.outputs import staged_path

# ILSVRC2012_IDs are not in wnid order in the real devkit either (ID 1 is n02119789, kit fox);
# ID 4 is an inner synset (num_children > 0) that must not be taken for a class.
SYNSETS = [(1, "n01484850", 0), (2, "n01440764", 0), (3, "n01443537", 0), (4, "n01473806", 2)]
GROUND_TRUTH = [2, 1, 3, 2, 2, 1, 3]  # file i+1 has this ILSVRC2012_ID
EXPECTED = {1: "n01440764", 2: "n01484850", 3: "n01443537", 4: "n01440764", 5: "n01440764", 6: "n01484850"}
EXPECTED[7] = "n01443537"


def test_class_names_follow_sorted_wnids_with_torchvision_names():
    classes = load_imagenet_classes()
    wnids = [c.wnid for c in classes]
    assert len(classes) == 1000 and wnids == sorted(set(wnids))
    assert [c.name for c in classes] == list(_IMAGENET_CATEGORIES)  # index k is ImageFolder's class k
    assert (classes[0].wnid, classes[0].name, classes[0].lemmas) == ("n01440764", "tench", "tench, Tinca tinca")
    assert (classes[999].wnid, classes[999].name) == ("n15075141", "toilet tissue")
    names = {c.wnid: c.name for c in classes}
    assert (names["n02012849"], names["n03126707"]) == ("crane bird", "crane")  # the two cranes apart
    assert class_names(["n01440764", "n01443537", "circle", "n99999999"]) == [
        "tench",
        "goldfish",
        "circle",
        "n99999999",
    ]


def write_meta_mat(path, synsets):
    """The devkit's synsets table: (ILSVRC2012_ID, WNID, num_children) rows as scipy reads them."""
    table = np.empty((len(synsets), 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for row, (number, wnid, children) in enumerate(synsets):
        table[row, 0] = (np.array([[number]], np.uint16), np.array([wnid]), np.array([[children]], np.uint16))
    scipy.io.savemat(path, {"synsets": table})


@pytest.fixture
def ilsvrc(tmp_path):
    """A miniature of the official layout: 7 flat JPEGs, the val tar, the devkit (folder and
    .tar.gz) and LOC_val_solution.csv."""
    flat = tmp_path / "ILSVRC2012_img_val"
    flat.mkdir()
    for i in range(1, len(GROUND_TRUTH) + 1):
        Image.new("RGB", (8, 6), (30 * i, 0, 0)).save(flat / f"ILSVRC2012_val_{i:08d}.JPEG")
    with tarfile.open(tmp_path / "ILSVRC2012_img_val.tar", "w") as tar:
        for path in sorted(flat.iterdir()):
            tar.add(path, arcname=path.name)
    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    (devkit / "data").mkdir(parents=True)
    write_meta_mat(devkit / "data" / "meta.mat", SYNSETS)
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, GROUND_TRUTH)) + "\n")
    with tarfile.open(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        tar.add(devkit, arcname=devkit.name)
    rows = ["ImageId,PredictionString"] + [
        f"ILSVRC2012_val_{i:08d},{EXPECTED[i]} 1 2 5 4 {EXPECTED[i]} 0 0 3 3" for i in range(7, 0, -1)
    ]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def expected_pairs(out):
    return sorted((str(out / wnid / f"ILSVRC2012_val_{i:08d}.JPEG"), wnid) for i, wnid in EXPECTED.items())


def indexed_pairs(out):
    index = build_file_index(out)
    return sorted((f, index.classes[y]) for f, y in zip(index.files, index.labels))


@pytest.mark.parametrize("source", ["ILSVRC2012_devkit_t12", "ILSVRC2012_devkit_t12.tar.gz", "LOC_val_solution.csv"])
def test_ground_truth_formats_agree(ilsvrc, source):
    truth = read_ground_truth(ilsvrc / source)
    assert truth == {f"ILSVRC2012_val_{i:08d}": wnid for i, wnid in EXPECTED.items()}


def test_flat_folder_becomes_class_folders_of_symlinks(ilsvrc):
    truth = read_ground_truth(ilsvrc / "ILSVRC2012_devkit_t12.tar.gz")
    out = ilsvrc / "imagenet" / "val"
    done = convert_val_folder(ilsvrc / "ILSVRC2012_img_val", truth, out)
    assert (done.images, done.classes) == (7, 3)
    assert indexed_pairs(out) == expected_pairs(out)
    link = out / "n01440764" / "ILSVRC2012_val_00000001.JPEG"
    assert link.is_symlink() and link.resolve() == (ilsvrc / "ILSVRC2012_img_val" / link.name).resolve()
    assert convert_val_folder(ilsvrc / "ILSVRC2012_img_val", truth, out).images == 7  # rerun: harmless


def test_copy_mode_and_the_archive_give_the_same_layout(ilsvrc):
    truth = read_ground_truth(ilsvrc / "LOC_val_solution.csv")
    copied = ilsvrc / "copied"
    convert_val_folder(ilsvrc / "ILSVRC2012_img_val", truth, copied, mode="copy")
    extracted = ilsvrc / "extracted"
    extract_val_archive(ilsvrc / "ILSVRC2012_img_val.tar", truth, extracted)
    for out in (copied, extracted):
        assert indexed_pairs(out) == expected_pairs(out)
        assert not any(p.is_symlink() for p in out.rglob("*.JPEG"))
    one = "n01484850/ILSVRC2012_val_00000002.JPEG"
    assert (copied / one).read_bytes() == (extracted / one).read_bytes()


def test_incomplete_inputs_are_named(ilsvrc):
    truth = read_ground_truth(ilsvrc / "ILSVRC2012_devkit_t12")
    (ilsvrc / "ILSVRC2012_img_val" / "ILSVRC2012_val_00000003.JPEG").unlink()
    with pytest.raises(ImageNetLayoutError, match="1 validation files of the ground truth are missing.*00000003"):
        convert_val_folder(ilsvrc / "ILSVRC2012_img_val", truth, ilsvrc / "out")
    del truth["ILSVRC2012_val_00000003"], truth["ILSVRC2012_val_00000005"]
    with pytest.raises(ImageNetLayoutError, match="1 files have no ground truth.*00000005"):
        convert_val_folder(ilsvrc / "ILSVRC2012_img_val", truth, ilsvrc / "out")
    (ilsvrc / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n9\n")
    with pytest.raises(ImageNetLayoutError, match=r"line 2 of ILSVRC2012_validation_ground_truth\.txt is '9'"):
        read_ground_truth(ilsvrc / "ILSVRC2012_devkit_t12")


def test_a_folder_whose_images_are_one_folder_down_names_that_folder(ilsvrc):
    """A tar unpacked into a folder of its own (nest/ILSVRC2012_img_val/*.JPEG): the tar of that
    layout is read, the folder said only that it held no images."""
    truth = read_ground_truth(ilsvrc / "ILSVRC2012_devkit_t12")
    (ilsvrc / "nest").mkdir()
    shutil.move(ilsvrc / "ILSVRC2012_img_val", ilsvrc / "nest" / "ILSVRC2012_img_val")
    hint = f"; its subfolder {ilsvrc / 'nest' / 'ILSVRC2012_img_val'} does: pass that as --val"
    said = re.escape(f"{ilsvrc / 'nest'} holds no ILSVRC2012_val_*.JPEG files{hint}")
    with pytest.raises(ImageNetLayoutError, match=said):
        convert_val_folder(ilsvrc / "nest", truth, ilsvrc / "out")
    (ilsvrc / "empty").mkdir()
    with pytest.raises(ImageNetLayoutError, match=r"empty holds no ILSVRC2012_val_\*\.JPEG files$"):
        convert_val_folder(ilsvrc / "empty", truth, ilsvrc / "out")


@pytest.fixture
def command():
    """launch/prepare_imagenet.py as a module: its main(argv) returns the exit code."""
    return launcher("prepare_imagenet")


def test_prepare_command(ilsvrc, capsys, command):
    out = ilsvrc / "imagenet" / "val"
    argv = ["--val", str(ilsvrc / "ILSVRC2012_img_val"), "--ground-truth", str(ilsvrc / "ILSVRC2012_devkit_t12.tar.gz")]
    assert command.main([*argv, "--out", str(out)]) == 0
    assert "7 validation images in 3 class folders" in capsys.readouterr().out
    assert indexed_pairs(out) == expected_pairs(out)
    assert command.main([*argv, "--out", str(out)]) == 0
    assert "7 validation images in 3 class folders" in (printed := capsys.readouterr().out)
    assert "(7 already in place)" in printed
    csv = str(ilsvrc / "LOC_val_solution.csv")
    assert command.main(["--val", str(ilsvrc / "nope"), "--ground-truth", csv, "--out", str(out)]) == 1
    assert "nope is neither a folder nor an archive" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["no synsets", "empty", "cut header"])
def test_meta_mat_without_synsets_is_named(tmp_path, damage):
    (tmp_path / "data").mkdir()
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"other": np.zeros(2)})
    raw = {"no synsets": buffer.getvalue(), "empty": b"", "cut header": buffer.getvalue()[:32]}[damage]
    (tmp_path / "data" / "meta.mat").write_bytes(raw)
    (tmp_path / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n")
    with pytest.raises(ImageNetLayoutError, match="meta.mat has no usable 'synsets' table"):
        read_ground_truth(tmp_path)


@pytest.mark.parametrize("source", ["ILSVRC2012_img_val", "ILSVRC2012_img_val.tar"])
def test_an_output_that_cannot_be_written_is_named_as_the_output(ilsvrc, source):
    truth = read_ground_truth(ilsvrc / "LOC_val_solution.csv")
    (ilsvrc / "a_file").write_text("not a folder")
    convert = convert_val_folder if source == "ILSVRC2012_img_val" else extract_val_archive
    with pytest.raises(ImageNetLayoutError, match=r"cannot write .*a_file/val/n01440764.*: Not a directory"):
        convert(ilsvrc / source, truth, ilsvrc / "a_file" / "val")


def test_the_archive_replaces_earlier_symlinks_without_writing_through_them(ilsvrc):
    truth = read_ground_truth(ilsvrc / "LOC_val_solution.csv")
    out = ilsvrc / "imagenet" / "val"
    convert_val_folder(ilsvrc / "ILSVRC2012_img_val", truth, out)  # symlinks to the flat files
    original = ilsvrc / "ILSVRC2012_img_val" / "ILSVRC2012_val_00000001.JPEG"
    original.write_bytes(b"the user's own version")  # e.g. a face-blurred copy
    extract_val_archive(ilsvrc / "ILSVRC2012_img_val.tar", truth, out)
    placed = out / "n01440764" / original.name
    assert not placed.is_symlink() and placed.read_bytes()[:3] == b"\xff\xd8\xff"
    assert original.read_bytes() == b"the user's own version"
    assert not list(out.rglob(".*.tmp"))


def test_a_devkit_with_a_wnid_that_is_no_folder_name_is_refused(ilsvrc):
    # the wnids become folders under --out: "../../escaped" would be written outside it
    devkit = ilsvrc / "ILSVRC2012_devkit_t12"
    write_meta_mat(devkit / "data" / "meta.mat", [(1, "../../escaped", 0), *SYNSETS[1:]])
    with pytest.raises(ImageNetLayoutError, match=r"ILSVRC2012_devkit_t12: data/meta.mat .* WNID '\.\./\.\./escaped'"):
        read_ground_truth(devkit)


# ---- re-runs, interruptions, and flat folders of symlinks ---------------------------------------
def layout(out):
    """Each placed image: its path under `out`, whether it is a symlink, and its bytes."""
    return sorted((str(p.relative_to(out)), p.is_symlink(), p.read_bytes()) for p in out.rglob("*.JPEG"))


def flat_images(folder):
    return sorted(p.name for p in folder.glob("*.JPEG"))


@pytest.mark.parametrize("mode", ["symlink", "copy", "move"])
def test_a_flat_folder_of_symlinks_into_a_store_keeps_the_image_names(ilsvrc, mode):
    # a git-annex / datalad checkout: each entry a relative symlink to a file named by its hash
    # (annex's SHA256E backend keeps the extension, so such names pass as images)
    flat, store = ilsvrc / "ILSVRC2012_img_val", ilsvrc / "annex" / "objects"
    store.mkdir(parents=True)
    originals = {p.name: p.read_bytes() for p in flat.iterdir()}
    for image in sorted(flat.iterdir()):
        data = image.read_bytes()
        key = f"SHA256E-s{len(data)}--{hashlib.sha256(data).hexdigest()[:16]}.JPEG"
        image.rename(store / key)
        image.symlink_to(Path("..") / "annex" / "objects" / key)
    stored = {p.name: p.read_bytes() for p in store.iterdir()}
    truth = read_ground_truth(ilsvrc / "LOC_val_solution.csv")
    out = ilsvrc / "imagenet" / "val"
    for image in flat.iterdir():  # what an earlier version's run in this mode left: names of the targets
        old = out / truth[image.name.split(".")[0]] / image.resolve().name
        old.parent.mkdir(parents=True, exist_ok=True)
        if mode == "copy":
            shutil.copyfile(image, old)
        else:
            old.symlink_to(image.resolve())  # a link (its move took the store's file: not redone here)
    done = convert_val_folder(flat, truth, out, mode=mode)
    assert (done.images, done.already_placed) == (7, 0)
    assert indexed_pairs(out) == expected_pairs(out)
    assert {p.name: p.read_bytes() for p in out.rglob("*.JPEG")} == originals
    assert sorted(p.name for p in out.rglob("*") if p.is_symlink() or p.is_file()) == sorted(originals)  # no old links
    for placed in out.rglob("*.JPEG"):  # a link (symlink, move) leads to the store's file itself
        assert placed.is_symlink() == (mode != "copy")
        assert not placed.is_symlink() or placed.resolve().parent == store.resolve()
    assert {p.name: p.read_bytes() for p in store.iterdir()} == stored  # the store's own files stay
    assert flat_images(flat) == ([] if mode == "move" else sorted(f"ILSVRC2012_val_{i:08d}.JPEG" for i in EXPECTED))


def test_an_interrupted_copy_leaves_no_torn_image_and_a_rerun_completes(ilsvrc, monkeypatch):
    truth = read_ground_truth(ilsvrc / "LOC_val_solution.csv")
    flat, out = ilsvrc / "ILSVRC2012_img_val", ilsvrc / "copied"
    copyfile, calls = shutil.copyfile, []

    def disk_full_at_the_fourth(src, dst, **kwargs):  # the 4th copy stops halfway: a full disk
        copyfile(src, dst, **kwargs)
        calls.append(dst)
        if len(calls) == 4:
            Path(dst).write_bytes(Path(src).read_bytes()[:100])
            raise OSError(errno.ENOSPC, "No space left on device")
        return dst

    monkeypatch.setattr(shutil, "copyfile", disk_full_at_the_fourth)
    with pytest.raises(ImageNetLayoutError, match="cannot write .*ILSVRC2012_val_00000004.JPEG: No space left"):
        convert_val_folder(flat, truth, out, mode="copy")
    placed = sorted(out.rglob("*.JPEG"))
    assert len(placed) == 3 and all(p.read_bytes() == (flat / p.name).read_bytes() for p in placed)
    assert not [p for p in out.rglob("*") if p.is_file() and p.suffix != ".JPEG"]  # no temporary file left
    monkeypatch.undo()
    done = convert_val_folder(flat, truth, out, mode="copy")
    assert (done.images, done.already_placed) == (7, 3)
    assert indexed_pairs(out) == expected_pairs(out)
    assert all(p.read_bytes() == (flat / p.name).read_bytes() for p in out.rglob("*.JPEG"))


@pytest.mark.parametrize("mode,where", [("copy", "out"), ("move", "out"), ("move", "in place")])
def test_rerunning_a_completed_copy_or_move_gives_the_same_layout(ilsvrc, mode, where):
    truth = read_ground_truth(ilsvrc / "LOC_val_solution.csv")
    flat = ilsvrc / "ILSVRC2012_img_val"
    out = flat if where == "in place" else ilsvrc / "imagenet" / "val"
    assert convert_val_folder(flat, truth, out, mode=mode).already_placed == 0
    first = layout(out)
    done = convert_val_folder(flat, truth, out, mode=mode)
    assert (done.images, done.classes, done.already_placed) == (7, 3, 7)
    assert layout(out) == first and indexed_pairs(out) == expected_pairs(out)
    assert len(flat_images(flat)) == (0 if mode == "move" else 7)


def test_an_interrupted_move_resumes(ilsvrc):
    truth = read_ground_truth(ilsvrc / "LOC_val_solution.csv")
    flat, out = ilsvrc / "ILSVRC2012_img_val", ilsvrc / "imagenet" / "val"
    originals = {p.name: p.read_bytes() for p in flat.iterdir()}
    for i in (1, 2, 3):  # moved before the interruption
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        (out / EXPECTED[i]).mkdir(parents=True, exist_ok=True)
        (flat / name).rename(out / EXPECTED[i] / name)
    name = "ILSVRC2012_val_00000004.JPEG"  # across file systems: copied into place, not yet removed
    shutil.copy2(flat / name, out / EXPECTED[4] / name)
    done = convert_val_folder(flat, truth, out, mode="move")
    assert (done.images, done.already_placed) == (7, 4)
    assert flat_images(flat) == [] and indexed_pairs(out) == expected_pairs(out)
    assert {p.name: p.read_bytes() for p in out.rglob("*.JPEG")} == originals
    assert sorted(p.name for p in out.rglob("*") if p.is_symlink() or p.is_file()) == sorted(originals)  # no old links


def test_a_move_across_file_systems_places_whole_files(ilsvrc, monkeypatch):
    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "rename", cross_device)
    truth = read_ground_truth(ilsvrc / "LOC_val_solution.csv")
    flat, out = ilsvrc / "ILSVRC2012_img_val", ilsvrc / "imagenet" / "val"
    originals = {p.name: p.read_bytes() for p in flat.iterdir()}
    convert_val_folder(flat, truth, out, mode="move")
    assert flat_images(flat) == [] and {p.name: p.read_bytes() for p in out.rglob("*.JPEG")} == originals


@pytest.mark.parametrize("mode", ["symlink", "copy", "move"])
def test_a_destination_that_is_something_else_is_named(ilsvrc, mode):
    truth = read_ground_truth(ilsvrc / "LOC_val_solution.csv")
    flat, out = ilsvrc / "ILSVRC2012_img_val", ilsvrc / "imagenet" / "val"
    other = out / "n01440764" / "ILSVRC2012_val_00000001.JPEG"
    other.parent.mkdir(parents=True)
    # copy takes a regular file of the source's size for its own work, symlink and move compare more
    size = (flat / other.name).stat().st_size
    other.write_bytes(b"a torn copy" if mode == "copy" else b"x" * size)
    with pytest.raises(ImageNetLayoutError, match=f"{other} already exists"):
        convert_val_folder(flat, truth, out, mode=mode)
    assert (flat / other.name).exists()


# ---- damaged archives and files given in the wrong place ----------------------------------------
def run_command(command, capsys, val, ground_truth, *more):
    """The command's exit code and what it printed to stderr, which must be one line."""
    code = command.main(["--val", str(val), "--ground-truth", str(ground_truth), *more])
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return code, err


def test_a_truncated_devkit_archive_is_named_and_nothing_is_written(ilsvrc, capsys, command):
    cut = ilsvrc / "cut.tar.gz"  # a gzip stream that stops short: the decompressor raises EOFError
    cut.write_bytes((ilsvrc / "ILSVRC2012_devkit_t12.tar.gz").read_bytes()[:300])
    out = ilsvrc / "out"
    code, err = run_command(command, capsys, ilsvrc / "ILSVRC2012_img_val", cut, "--out", str(out))
    assert code == 1 and f"{cut} is damaged or truncated" in err
    assert not out.exists()


@pytest.mark.parametrize("error", [EOFError("cut"), zlib.error("bad"), lzma.LZMAError("bad"), gzip.BadGzipFile("crc")])
def test_what_a_damaged_compressed_archive_raises_is_named(ilsvrc, monkeypatch, error):
    # raised by the decompressor below tarfile while a member is read; which damage raises which
    # depends on where it is, so each is raised directly
    def damaged(self, member):
        raise error

    monkeypatch.setattr(tarfile.TarFile, "extractfile", damaged)
    truth = read_ground_truth(ilsvrc / "LOC_val_solution.csv")
    for read in (
        lambda: read_ground_truth(ilsvrc / "ILSVRC2012_devkit_t12.tar.gz"),
        lambda: extract_val_archive(ilsvrc / "ILSVRC2012_img_val.tar", truth, ilsvrc / "out"),
    ):
        with pytest.raises(ImageNetLayoutError, match=r"\.tar(\.gz)? is damaged or truncated"):
            read()


@pytest.mark.parametrize("where", ["in a header", "in an image"])
def test_a_truncated_val_archive_is_named_as_such_not_as_missing_files(ilsvrc, where):
    archive = ilsvrc / "ILSVRC2012_img_val.tar"
    with tarfile.open(archive) as tar:
        fourth = tar.getmembers()[3]
    # cut in a header, tarfile ends the member list there without a word
    end = fourth.offset + 100 if where == "in a header" else fourth.offset_data + 100
    cut = ilsvrc / "cut.tar"
    cut.write_bytes(archive.read_bytes()[:end])
    truth = read_ground_truth(ilsvrc / "LOC_val_solution.csv")
    with pytest.raises(ImageNetLayoutError, match=r"cut\.tar is damaged or truncated"):
        extract_val_archive(cut, truth, ilsvrc / "out")


def test_a_devkit_archive_cut_between_members_is_named(ilsvrc):
    devkit = ilsvrc / "devkit.tar"  # uncompressed: nothing but the missing end marker tells
    with tarfile.open(devkit, "w") as tar:
        tar.add(ilsvrc / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    with tarfile.open(devkit) as tar:
        last = tar.getmembers()[-1]
    devkit.write_bytes(devkit.read_bytes()[: last.offset])
    with pytest.raises(ImageNetLayoutError, match=r"devkit\.tar is damaged or truncated \(it stops after "):
        read_ground_truth(devkit)


@pytest.mark.parametrize(
    "option,given,expected",
    [
        ("--val", "LOC_val_solution.csv", "is not a tar archive or a folder: it takes ILSVRC2012_img_val.tar"),
        ("--val", "ground_truth.txt", "is not a tar archive or a folder: it takes ILSVRC2012_img_val.tar"),
        ("--val", "ILSVRC2012_devkit_t12.tar.gz", "holds no ILSVRC2012_val_*.JPEG files"),
        ("--ground-truth", "ground_truth.txt", "is not a tar archive, a folder or a .csv: it takes ILSVRC2012_devkit"),
        ("--ground-truth", "random.bin", "is not a tar archive, a folder or a .csv: it takes ILSVRC2012_devkit"),
        ("--ground-truth", "random.csv", "is not a CSV text file"),
    ],
)
def test_a_file_given_to_the_wrong_option_is_named_with_what_the_option_takes(
    ilsvrc, capsys, command, option, given, expected
):
    devkit_data = ilsvrc / "ILSVRC2012_devkit_t12" / "data"
    shutil.copy(devkit_data / "ILSVRC2012_validation_ground_truth.txt", ilsvrc / "ground_truth.txt")
    noise = np.random.default_rng(0).bytes(2000)
    noise = b"\x89" + noise[1:]  # not UTF-8 from its first byte on, and no archive's magic
    (ilsvrc / "random.bin").write_bytes(noise)
    (ilsvrc / "random.csv").write_bytes(noise)
    val, ground_truth = ilsvrc / "ILSVRC2012_img_val.tar", ilsvrc / "LOC_val_solution.csv"
    if option == "--val":
        val = ilsvrc / given
    else:
        ground_truth = ilsvrc / given
    code, err = run_command(command, capsys, val, ground_truth, "--out", str(ilsvrc / "out"))
    assert code == 1 and f"{ilsvrc / given}" in err and expected in err
    assert not (ilsvrc / "out").exists()


@pytest.mark.parametrize("second", ["n01443537", "n01440764"])
def test_an_image_listed_twice_under_two_classes_is_refused(ilsvrc, second):
    csv = ilsvrc / "LOC_val_solution.csv"
    with csv.open("a") as f:  # image 1 is n01440764, on line 8 (the rows run from image 7 down)
        f.write(f"ILSVRC2012_val_00000001,{second} 1 2 3 4\n")
    if second == EXPECTED[1]:  # the same label twice: nothing to choose between
        assert read_ground_truth(csv)["ILSVRC2012_val_00000001"] == EXPECTED[1]
        return
    given = "line 9 gives ILSVRC2012_val_00000001 the class n01443537, line 8 gave it n01440764"
    with pytest.raises(ImageNetLayoutError, match=rf"LOC_val_solution\.csv: {given}"):
        read_ground_truth(csv)


def test_a_mode_given_with_the_archive_is_refused(ilsvrc, capsys, command):
    out = ilsvrc / "out"
    archive = ilsvrc / "ILSVRC2012_img_val.tar"
    code, err = run_command(
        command, capsys, archive, ilsvrc / "LOC_val_solution.csv", "--out", str(out), "--mode", "move"
    )
    assert code == 1 and f"--mode applies to a folder of images; --val {archive} is a file" in err
    assert not out.exists()
    flat = ilsvrc / "ILSVRC2012_img_val"  # without --mode, a folder is still symlinked
    assert (
        command.main(["--val", str(flat), "--ground-truth", str(ilsvrc / "LOC_val_solution.csv"), "--out", str(out)])
        == 0
    )
    assert all(p.is_symlink() for p in out.rglob("*.JPEG")) and indexed_pairs(out) == expected_pairs(out)


# ---- earlier runs with other labels, folders in the wrong place, unusual names ------------------
def relabelled_csv(ilsvrc, image, wnid):
    """LOC_val_solution.csv with `image` (1-7) given the class `wnid` instead."""
    right = f"ILSVRC2012_val_{image:08d},{EXPECTED[image]}"
    path = ilsvrc / "relabelled.csv"
    path.write_text((ilsvrc / "LOC_val_solution.csv").read_text().replace(right, f"ILSVRC2012_val_{image:08d},{wnid}"))
    return path


@pytest.mark.parametrize(
    "source,mode",
    [
        ("ILSVRC2012_img_val", "symlink"),
        ("ILSVRC2012_img_val", "copy"),
        ("ILSVRC2012_img_val", "move"),
        ("ILSVRC2012_img_val.tar", None),
    ],
)
def test_an_image_left_in_another_class_by_an_earlier_run_is_refused(ilsvrc, capsys, command, source, mode):
    flat, out = ilsvrc / "ILSVRC2012_img_val", ilsvrc / "out"
    more = ["--out", str(out), *(["--mode", mode] if mode else [])]
    assert (
        command.main(
            ["--val", str(ilsvrc / source), "--ground-truth", str(relabelled_csv(ilsvrc, 1, "n01443537")), *more]
        )
        == 0
    )
    capsys.readouterr()
    before, flat_before = layout(out), flat_images(flat)
    code, err = run_command(command, capsys, ilsvrc / source, ilsvrc / "LOC_val_solution.csv", *more)
    wrong = out / "n01443537" / "ILSVRC2012_val_00000001.JPEG"
    assert code == 1
    assert f"1 validation images under {out} are not in their ground-truth class folder, e.g. {wrong} " in err
    assert "(ground truth: n01440764), probably from an earlier run with other labels: remove them" in err
    assert layout(out) == before and flat_images(flat) == flat_before  # nothing written, nothing moved
    if mode == "move":
        wrong.rename(flat / wrong.name)  # what the message says to do
    else:
        wrong.unlink()
    assert (
        command.main(["--val", str(ilsvrc / source), "--ground-truth", str(ilsvrc / "LOC_val_solution.csv"), *more])
        == 0
    )
    assert indexed_pairs(out) == expected_pairs(out)


def test_a_compressed_archive_is_read_in_its_own_order(ilsvrc, monkeypatch):
    # a gzip stream reads forward only: each member read out of archive order decompresses it again
    archive, flat = ilsvrc / "reversed.tar.gz", ilsvrc / "ILSVRC2012_img_val"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(flat.iterdir(), reverse=True):
            tar.add(path, arcname=path.name)
    read, extractfile = [], tarfile.TarFile.extractfile

    def recording(self, member):
        read.append(member.name)
        return extractfile(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", recording)
    out = ilsvrc / "out"
    extract_val_archive(archive, read_ground_truth(ilsvrc / "LOC_val_solution.csv"), out)
    assert read == sorted(p.name for p in flat.iterdir())[::-1]
    assert indexed_pairs(out) == expected_pairs(out)


@pytest.mark.parametrize("how", ["moved into it", "a link in it", "given as a link into it"])
def test_a_flat_folder_inside_the_output_folder_is_refused(ilsvrc, capsys, command, how):
    # an ImageFolder over --out would take the flat folder for one more class holding every image
    flat, out = ilsvrc / "ILSVRC2012_img_val", ilsvrc / "val"
    out.mkdir()
    inside = out / "flat"
    if how == "moved into it":
        flat.rename(inside)
    else:
        inside.symlink_to(flat)
    val = inside if how != "given as a link into it" else ilsvrc / "link"
    if how == "given as a link into it":
        val.symlink_to(inside)
    code, err = run_command(command, capsys, val, ilsvrc / "LOC_val_solution.csv", "--out", str(out), "--mode", "copy")
    assert code == 1 and f"{val} is inside the output folder {out}" in err
    assert [p.name for p in out.iterdir()] == ["flat"] and len(flat_images(inside)) == 7


@pytest.mark.parametrize("header", ["\ufeffImageId,PredictionString", "ImageId, PredictionString"])
def test_a_csv_saved_by_a_spreadsheet_is_read(ilsvrc, header):
    # Excel's "CSV UTF-8" starts with a byte-order mark; a space after the comma is common too
    csv = ilsvrc / "LOC_val_solution.csv"
    rows = csv.read_text().splitlines()[1:]
    csv.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    assert read_ground_truth(csv) == {f"ILSVRC2012_val_{i:08d}": wnid for i, wnid in EXPECTED.items()}


@pytest.mark.parametrize("source", ["folder", "archive"])
def test_two_files_of_one_image_are_refused_naming_both(ilsvrc, source):
    flat, out = ilsvrc / "ILSVRC2012_img_val", ilsvrc / "out"
    truth = read_ground_truth(ilsvrc / "LOC_val_solution.csv")
    if source == "folder":
        shutil.copy(flat / "ILSVRC2012_val_00000001.JPEG", flat / "ILSVRC2012_val_00000001.jpeg")
        both = "both ILSVRC2012_val_00000001.JPEG and ILSVRC2012_val_00000001.jpeg"
        with pytest.raises(ImageNetLayoutError, match=f"{flat} holds {both}, two files of ILSVRC2012_val_00000001"):
            convert_val_folder(flat, truth, out)
    else:
        archive = ilsvrc / "twice.tar"
        with tarfile.open(archive, "w") as tar:
            for path in sorted(flat.iterdir()):
                tar.add(path, arcname=f"a/{path.name}")
            tar.add(flat / "ILSVRC2012_val_00000001.JPEG", arcname="b/ILSVRC2012_val_00000001.JPEG")
        both = "both a/ILSVRC2012_val_00000001.JPEG and b/ILSVRC2012_val_00000001.JPEG"
        with pytest.raises(ImageNetLayoutError, match=f"twice.tar holds {both}, two files of ILSVRC2012_val_00000001"):
            extract_val_archive(archive, truth, out)
    assert not out.exists()


@pytest.mark.parametrize("source", ["folder", "archive"])
def test_lower_case_file_names_find_their_ground_truth_and_keep_their_names(ilsvrc, source):
    flat, out = ilsvrc / "ILSVRC2012_img_val", ilsvrc / "out"
    for path in flat.iterdir():
        path.rename(flat / path.name.lower())
    truth = read_ground_truth(ilsvrc / "ILSVRC2012_devkit_t12.tar.gz")
    if source == "folder":
        convert_val_folder(flat, truth, out, mode="copy")
    else:
        with tarfile.open(ilsvrc / "lower.tar", "w") as tar:
            for path in sorted(flat.iterdir()):
                tar.add(path, arcname=path.name)
        extract_val_archive(ilsvrc / "lower.tar", truth, out)
    lower = [(str(out / wnid / f"ilsvrc2012_val_{i:08d}.jpeg"), wnid) for i, wnid in EXPECTED.items()]
    assert indexed_pairs(out) == sorted(lower)


@pytest.mark.parametrize("mode", ["copy", "symlink", "tar"])
def test_a_re_run_from_names_in_other_letters_finds_the_images_in_place(ilsvrc, mode):
    """The names matched whatever their case, but the output took the source's spelling: a copy
    run, then a run from a flat folder renamed to lower case, left ILSVRC2012_val_00000001.JPEG
    and ilsvrc2012_val_00000001.jpeg side by side (every image twice), saying nothing."""
    truth = read_ground_truth(ilsvrc / "LOC_val_solution.csv")
    flat, out = ilsvrc / "ILSVRC2012_img_val", ilsvrc / "out"
    if mode == "tar":
        extract_val_archive(ilsvrc / "ILSVRC2012_img_val.tar", truth, out)
    else:
        convert_val_folder(flat, truth, out, mode=mode)
    for path in flat.iterdir():
        path.rename(flat / path.name.lower())
    done = convert_val_folder(flat, truth, out, mode="copy" if mode == "tar" else mode)
    # in place: the same bytes, or for links (now dangling: their targets were renamed) linked anew
    assert (done.images, done.already_placed) == (7, 0 if mode == "symlink" else 7)
    assert indexed_pairs(out) == expected_pairs(out)  # the first run's names, each image once
    (out / EXPECTED[1] / "ilsvrc2012_val_00000001.jpeg").write_bytes(b"")  # a second entry of one image
    with pytest.raises(ImageNetLayoutError, match=r"holds both ILSVRC2012_val_00000001.JPEG and ilsvrc2012_val_0000"):
        convert_val_folder(flat, truth, out, mode="copy")


def test_links_of_an_earlier_run_into_a_flat_folder_since_moved_are_replaced(ilsvrc):
    truth = read_ground_truth(ilsvrc / "LOC_val_solution.csv")
    flat, out = ilsvrc / "ILSVRC2012_img_val", ilsvrc / "out"
    convert_val_folder(flat, truth, out)
    moved = flat.rename(ilsvrc / "moved")  # the links made above now point nowhere
    done = convert_val_folder(moved, truth, out)
    assert (done.images, done.already_placed) == (7, 0)
    assert indexed_pairs(out) == expected_pairs(out)
    assert all(p.resolve() == (moved / p.name).resolve() for p in out.rglob("*.JPEG"))


@pytest.mark.parametrize("source", ["ILSVRC2012_img_val", "ILSVRC2012_img_val.tar"])
def test_files_staged_by_a_killed_run_are_removed_but_not_a_running_ones(ilsvrc, source):
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs, as a killed run's
    running = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)  # another run, still going
    out = ilsvrc / "out"
    (out / "n01440764").mkdir(parents=True)
    killed = staged_path(out / "n01440764" / "ILSVRC2012_val_00000001.JPEG", gone.pid)
    busy = staged_path(out / "n01440764" / "ILSVRC2012_val_00000004.JPEG", running.pid)
    killed.write_bytes(b"half an image")
    busy.write_bytes(b"half an image")
    try:
        truth = read_ground_truth(ilsvrc / "LOC_val_solution.csv")
        convert = convert_val_folder if source == "ILSVRC2012_img_val" else extract_val_archive
        convert(ilsvrc / source, truth, out)
        assert not killed.exists() and busy.exists()
        assert indexed_pairs(out) == expected_pairs(out)
    finally:
        running.stdin.close()
        running.wait()
