"""The file rank 0 makes to learn whether every rank sees run.root (alexnet.parallel.shared_root);
the collective itself is tested end to end in test_train_failures (run.root on node-local disks)."""

import os
from pathlib import Path

import pytest

from alexnet.parallel.shared_root import (
    PROBE_PREFIX,
    Probe,
    make_probe,
    probe_folder,
    remove_probe,
    unseen_message,
    why_unseen,
)


def test_the_probe_goes_into_the_deepest_folder_of_the_run_folders_path_that_exists(tmp_path):
    """A new run's folder, and run.root, are not made for it: a run that cannot start leaves none."""
    run_dir = tmp_path / "root" / "deeper" / "run"
    new = make_probe(run_dir)
    assert new.up == 3 and Path(new.path).parent == tmp_path and probe_folder(run_dir, new.up) == tmp_path
    assert new.name.startswith(PROBE_PREFIX) and Path(new.path).name == new.name and Path(new.path).is_file()
    assert why_unseen(new, run_dir) is None
    run_dir.parent.mkdir(parents=True)
    in_root = make_probe(run_dir)
    assert in_root.up == 1 and Path(in_root.path).parent == run_dir.parent
    run_dir.mkdir()
    resumed = make_probe(run_dir)
    assert resumed.up == 0 and Path(resumed.path).parent == run_dir
    assert len({new.name, in_root.name, resumed.name}) == 3  # names no rank has looked up before
    for probe in (new, in_root, resumed, resumed):  # the second time: gone already, nothing to do
        remove_probe(probe)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["root", "root/deeper", "root/deeper/run"]


def test_a_relative_run_folder_is_found_from_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    probe = make_probe(Path("runs") / "x")  # neither exists: the working folder
    assert probe.up == 2 and Path(probe.path).parent == tmp_path and why_unseen(probe, Path("runs/x")) is None
    remove_probe(probe)


def test_why_a_rank_does_not_see_the_probe_never_raises(tmp_path, monkeypatch):
    """Whatever looking for it raises is the reason (a rank that raised would leave the others in
    the collective that follows)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    probe = Probe(".shared-check-x", 0, str(run_dir / ".shared-check-x"), "n0")
    assert why_unseen(probe, run_dir) == "no such file"
    assert why_unseen(probe, tmp_path / "missing") == f"{tmp_path / 'missing'}: No such file or directory"
    far = Probe(".shared-check-x", 99, "/x/.shared-check-x", "n0")
    assert why_unseen(far, run_dir) == f"its run folder {run_dir} has fewer than 99 folders above it"

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "exists", denied)
    assert why_unseen(probe, run_dir) == f"{run_dir / '.shared-check-x'}: Permission denied"


def test_a_probe_folder_rank_0_cannot_write_is_named_not_the_probe(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(kwargs["dir"], ".shared-check-random"))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(PermissionError) as err:
        make_probe(tmp_path / "runs" / "x")
    assert err.value.filename == str(tmp_path) and err.value.strerror == "Permission denied"


def test_the_ranks_that_do_not_see_it_are_named_once_with_their_hosts():
    probe = Probe(".shared-check-x", 1, "/scratch/runs/.shared-check-x", "n0")
    # 64 ranks on 8 nodes of 8, run.root on each node's own disk: only node 0's ranks see it.
    gathered = [(None if r < 8 else "no such file", f"n{r // 8}") for r in range(64)]
    assert unseen_message(probe, gathered) == (
        "config key 'run.root': ranks 8, 9, 10, 11, 12, 13, 14, 15 ... (of 64; hosts n1, n2, n3, n4 ...) cannot "
        "see the file /scratch/runs/.shared-check-x that rank 0 (host n0) made (rank 8: no such file); run.root "
        "must be a folder every rank sees (a shared file system): rank 0 alone writes the checkpoints, and a "
        "resume on other nodes would not find them (nothing was trained)"
    )
    one = unseen_message(probe, [(None, "n0"), (None, "n0"), ("/x: Permission denied", "n1")])
    assert one is not None
    assert one.startswith("config key 'run.root': rank 2 (of 3; host n1) cannot see the file ")
    assert "made (rank 2: /x: Permission denied); run.root must" in one
    assert unseen_message(probe, [(None, "n0"), (None, "n1")]) is None
