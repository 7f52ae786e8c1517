"""pipelines/outputs.py: output paths checked before the work, files written whole or not at all."""

import json
import os
import re

import pytest

from pipelines.outputs import (
    OutputPathError,
    check_output_file,
    check_output_folder,
    check_replaceable,
    copy_file_atomic,
)


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


KEYS = frozenset({"format", "eigval"})
REFUSED = "the file exists and is not an earlier result of launch/x.py; name a new file (nothing was overwritten)"


def test_an_existing_file_is_replaceable_only_as_an_earlier_output_of_the_command(tmp_path):
    """A mistyped --out (a checkpoint, metrics.jsonl) was replaced by the command's JSON."""
    check_replaceable(tmp_path / "new.json", KEYS, "launch/x.py", "--out n")  # not there: fine
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"format": 1, "eigval": [1], "extra": 2}))  # any layout, read whole
    check_replaceable(earlier, KEYS, "launch/x.py", "--out e")
    big = tmp_path / "big.json"  # over the 64 KiB read: its top-level keys, as json.dumps(indent=2) writes them
    big.write_text(json.dumps({"format": 1, "eigval": [1], "rows": ["x" * 100] * 1000}, indent=2))
    assert big.stat().st_size > 1 << 16
    check_replaceable(big, KEYS, "launch/x.py", "--out b")
    others = {"metrics.jsonl": '{"format": 1}\n', "nested.json": json.dumps({"a": {"format": 1, "eigval": 2}}),
              "empty.json": "", "binary.pt": b"PK\x03\x04\xff\xfe" + bytes(1 << 17)}  # fmt: skip
    for name, content in others.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(OutputPathError, match=rf"^--out {name}: {re.escape(REFUSED)}$"):
            check_replaceable(path, KEYS, "launch/x.py", f"--out {name}")
    with pytest.raises(OutputPathError, match=r"^--out d: .*; name a JSON file \(nothing was overwritten\)$"):
        check_replaceable(tmp_path, KEYS, "launch/x.py", "--out d", "name a JSON file")  # not a file: not opened
