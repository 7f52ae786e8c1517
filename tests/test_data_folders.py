"""Data folders as users' copies and mounts leave them: symbolic links that loop or lead nowhere,
converted copies whose names meet, lists saved by other tools or pointing into the other split,
class names that differ only in Unicode normalisation, files of extensions training skips. Each
is named by the index (training, evaluation, lighting statistics) and by the scan, which carry on
where they can."""

from __future__ import annotations

import io
import logging
import os
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from _helpers import launcher
from PIL import Image

from alexnet.config import DataConfig
from alexnet.data import build_splits
from pipelines.index import DataError, build_file_index, find_classes, load_file_list
from pipelines.scan import scan


def lighting_main(argv: list[str]) -> int:
    """launch/lighting_stats.py's main (the launchers are scripts, not a package)."""
    return launcher("lighting_stats").main(argv)


def jpeg(seed: int = 0, mode: str = "RGB") -> bytes:
    """A smooth image (so that a JPEG copy stays close to it) that differs with `seed`; GIF for
    mode P."""
    y, x = np.mgrid[0:40, 0:48]
    pixels = np.stack([x * 5 + seed * 20, y * 6, (x + y + seed * 30) * 2], axis=-1) % 256
    buf = io.BytesIO()
    Image.fromarray(pixels.astype("uint8")).convert(mode).save(buf, "GIF" if mode == "P" else "JPEG")
    return buf.getvalue()


def two_classes(root: Path, train: tuple[str, ...] = ("a", "b"), val: tuple[str, ...] = ("a", "b")) -> Path:
    for split, classes in (("train", train), ("val", val)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                (root / split / cls / f"{i}.JPEG").write_bytes(jpeg(i))
    return root


def test_a_symlink_loop_among_the_images_is_reported_not_a_traceback(tmp_path, caplog):
    """os.DirEntry.is_dir() raises ELOOP: scan.py and lighting_stats.py died with a traceback from
    the index, and training printed the bare errno line."""
    root = two_classes(tmp_path / "data")
    loop = root / "train" / "a" / "loop.JPEG"
    loop.symlink_to(loop)
    assert str(loop) in build_file_index(root / "train").files  # listed, for the decoders to name
    result = scan(root, tmp_path / "out", workers=1)
    (finding,) = result.findings["train"]
    assert (finding.path, finding.kind) == (str(loop), "unreadable")
    assert "Too many levels of symbolic links" in finding.detail
    assert result.lists["train"] == ["a/0.JPEG", "a/1.JPEG", "b/0.JPEG", "b/1.JPEG"] and not result.problems
    with caplog.at_level(logging.WARNING, logger="alexnet"):  # its sample skips unreadable files, naming them
        code = lighting_main(["--data", str(root), "--out", str(tmp_path / "stats.json"), "--workers", "1"])
    assert code == 0 and f"lighting statistics: skipping {loop}" in caplog.text, caplog.text


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_class_folder_link_that_leads_nowhere_stops_training_and_the_scan_names_it(tmp_path, kind):
    """A class folder that is a link to an unmounted file system was dropped without a word:
    training ran with a class fewer and the scan said "no bad files"; a link loop raised."""
    root = two_classes(tmp_path / "data", train=("a", "b", "c"), val=("a", "b", "c"))
    link = root / "train" / "zz"
    link.symlink_to("/nonexistent/mount/zz" if kind == "dangling" else link)
    why = "which does not exist" if kind == "dangling" else "Too many levels of symbolic links"
    (root / "train" / ".#notes.txt").symlink_to("user@host.1234:1700000000")  # an editor's lock: not a class
    with pytest.raises(DataError, match=f"{link} .*{why}.*remove the link"):
        find_classes(root / "train")
    with pytest.raises(DataError, match=str(link)):
        build_splits(DataConfig(root=str(root)), 0)
    result = scan(root, tmp_path / "out", workers=1)
    assert any(str(link) in p and why in p for p in result.problems), result.problems


def test_converted_copies_whose_names_meet_keep_both(tmp_path):
    """GIF data named x.png is copied to x.png.jpg, the name of the CMYK JPEG x.png.jpg's own
    copy: one overwrote the other, the list named that path twice, and training refused the
    scan's own list."""
    root = two_classes(tmp_path / "data")
    (root / "train" / "a" / "x.png").write_bytes(jpeg(5, mode="P"))
    (root / "train" / "a" / "x.png.jpg").write_bytes(jpeg(6, mode="CMYK"))
    (root / "train" / "a" / "X.PNG.jpg").write_bytes(jpeg(7, mode="CMYK"))  # one on a case-blind file system
    result = scan(root, tmp_path / "out", workers=1)
    assert result.converted == 3
    train = load_file_list(tmp_path / "out" / "train.txt", root / "train")  # no line names another's file
    copies = sorted(f for f in train.files if "fixed" in f)
    assert len(train) == 4 + 3 and len(copies) == 3
    assert {Path(f).name.casefold() for f in copies} == {"x.png.jpg", "x.png.2.jpg", "x.png.3.jpg"}
    sources = [Path(f.path) for f in result.findings["train"]]
    nearest = {copy: min(sources, key=lambda source: difference(copy, source)) for copy in copies}
    assert sorted(nearest.values()) == sorted(sources)  # each copy is its own source's image


def difference(copy: str, source: Path) -> float:
    a = np.asarray(Image.open(copy).convert("RGB"), dtype=float)
    return float(np.abs(a - np.asarray(Image.open(source).convert("RGB"), dtype=float)).mean())


def test_a_list_saved_with_a_byte_order_mark_or_named_with_a_tilde_is_read(tmp_path, monkeypatch):
    """Notepad and PowerShell start a UTF-8 file with a byte-order mark, which made line 1 a path
    in a class folder named '\\ufeff# train files of ...'; '~' in data.train_files was taken
    literally, where data.root, run.root and the other paths expand it."""
    root = two_classes(tmp_path / "data")
    scan(root, tmp_path / "out", workers=1)
    listed = (tmp_path / "out" / "train.txt").read_bytes()
    home = tmp_path / "home"
    home.mkdir()
    (home / "train.txt").write_bytes(b"\xef\xbb\xbf" + listed.replace(b"\n", b"\r\n"))
    monkeypatch.setenv("HOME", str(home))
    splits = build_splits(DataConfig(root=str(root), train_files="~/train.txt"), 0)
    assert len(splits.train) == 4 and splits.train.files == build_file_index(root / "train").files


def test_a_validation_list_of_training_files_is_refused_and_a_hold_out_is_not(tmp_path):
    """A list without scan's header, of absolute paths into train/, was accepted as the validation
    list: the run "validated" on the images it trained on. Images of train/ that the training
    list leaves out are a hold-out, and validate."""
    root = two_classes(tmp_path / "data")
    for cls in ("a", "b"):
        (root / "train" / cls / "2.JPEG").write_bytes(jpeg(2))
    files = build_file_index(root / "train").files
    listing = tmp_path / "val.txt"
    listing.write_text("".join(f"{p}\n" for p in files))
    cfg = DataConfig(root=str(root), val_files=str(listing))
    with pytest.raises(DataError) as info:
        build_splits(cfg, 0)
    said = f"6 file(s) are both training data ({root / 'train'}) and validation data (file list {listing}), e.g. "
    assert str(info.value).startswith(said + str(root / "train" / "a" / "0.JPEG")), str(info.value)
    held_out = [p for p in files if p.endswith("2.JPEG")]
    (tmp_path / "train.txt").write_text("".join(f"{p}\n" for p in files if p not in held_out))
    listing.write_text("".join(f"{p}\n" for p in held_out))
    hold_out = DataConfig(root=str(root), train_files=str(tmp_path / "train.txt"), val_files=str(listing))
    splits = build_splits(hold_out, 0)
    assert (len(splits.train), splits.val.files) == (4, held_out)


def test_class_names_that_differ_in_unicode_normalisation_are_told_apart(tmp_path):
    """macOS writes 'café' decomposed (NFD), most tools composed (NFC): the two print alike, so
    "have no folder in val: café" while val/ shows café was unreadable."""
    nfd, nfc = unicodedata.normalize("NFD", "café"), unicodedata.normalize("NFC", "café")
    root = two_classes(tmp_path / "data", train=("a", nfd), val=("a", nfc))
    with pytest.raises(DataError) as info:
        build_splits(DataConfig(root=str(root)), 0)
    assert "only in Unicode normalisation" in str(info.value) and ascii(nfd) in str(info.value), str(info.value)
    result = scan(root, tmp_path / "out", workers=1)
    assert sum("only in Unicode normalisation" in p for p in result.problems) == 2, result.problems
    shutil.rmtree(root / "val" / nfc)
    two_classes(root / "other", val=("a", "b"))  # a plain mismatch gets no such hint
    with pytest.raises(DataError) as info:
        build_splits(DataConfig(root=str(root)), 0)
    assert "normalisation" not in str(info.value)


def test_files_of_other_extensions_are_named_when_training_skips_them(tmp_path, caplog):
    """Training skipped .gif and .jfif files without a word (as ImageFolder does): a class of half
    GIFs trained on half its images. It still skips them, and says so."""
    root = two_classes(tmp_path / "data")
    (root / "train" / "a" / "anim.gif").write_bytes(jpeg(3, mode="P"))
    (root / "train" / "b" / "photo.jfif").write_bytes(jpeg(4))
    (root / "train" / ".DS_Store").write_bytes(b"\0")
    (root / "train" / "a" / ".hidden.txt").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="alexnet"):
        splits = build_splits(DataConfig(root=str(root)), 0)
    assert len(splits.train) == 4
    (warning,) = [r.getMessage() for r in caplog.records if "are not read" in r.getMessage()]
    assert warning.startswith(f"{root / 'train'}: 2 file(s) in class folders are not read") and warning.endswith(
        "a/anim.gif, b/photo.jfif"
    ), warning
    assert os.path.isfile(root / "train" / "a" / "anim.gif")
    caplog.clear()  # the other ranks index the same folders and stay quiet: 8 ranks printed it 8 times
    with caplog.at_level(logging.WARNING, logger="alexnet"):
        assert len(build_splits(DataConfig(root=str(root)), 0, warn_unread=False).train) == 4
    assert not [r for r in caplog.records if "are not read" in r.getMessage()]


def test_a_class_folder_the_scan_cannot_list_is_a_problem_and_the_rest_is_scanned(tmp_path, monkeypatch):
    """A folder without read permission (root, who runs these tests, reads any) raised out of the scan."""
    root = two_classes(tmp_path / "data")
    real = os.scandir

    def scandir(path):
        if Path(path) == root / "train" / "b":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = scan(root, tmp_path / "out", workers=1)
    assert result.problems == [f"class folder {root / 'train' / 'b'} cannot be read: Permission denied"]
    assert result.lists["train"] == ["a/0.JPEG", "a/1.JPEG"]
