"""pipelines/outputs.py: output paths checked before the work, files written whole or not at all."""

import os

import pytest

from pipelines.outputs import OutputPathError, check_output_file, check_output_folder, copy_file_atomic


def test_a_path_the_system_refuses_is_an_output_error_naming_the_option(tmp_path):
    too_long = tmp_path / ("a" * 300) / "eval.json"  # was a raw OSError traceback (ENAMETOOLONG)
    with pytest.raises(OutputPathError, match=r"^--out x: File name too long$"):
        check_output_file(too_long, "--out x")
    with pytest.raises(OutputPathError, match=r"^--out y: File name too long$"):
        check_output_folder(too_long, "--out y")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OutputPathError, match=r"a_file is a file, not a folder$"):
        check_output_folder(tmp_path / "a_file", "--out z")
    check_output_folder(tmp_path / "new" / "deeper", "--out ok")  # to be created: fine, and not created yet
    assert not (tmp_path / "new").exists()


def test_a_copy_that_fails_leaves_no_file_under_either_name(tmp_path, monkeypatch):
    src, dst = tmp_path / "src.JPEG", tmp_path / "dst.JPEG"
    src.write_bytes(b"x" * 1000)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        copy_file_atomic(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.JPEG"]
