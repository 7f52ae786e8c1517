"""The file rank 0 makes to learn whether every rank sees run.root (alexnet.parallel.shared_root);
the collective itself is tested end to end in test_train_failures (run.root on node-local disks)."""

from pathlib import Path

from alexnet.parallel.shared_root import PROBE_PREFIX, Probe, make_probe, remove_probe, unseen_message


def test_a_new_runs_probe_is_made_in_run_root_and_an_existing_runs_in_its_folder(tmp_path):
    run_dir = tmp_path / "root" / "deeper" / "run"
    new = make_probe(run_dir)  # run.root made, as the run would make it; the run folder not
    assert not new.in_run_dir and Path(new.path).parent == run_dir.parent and not run_dir.exists()
    assert new.name.startswith(PROBE_PREFIX) and Path(new.path).name == new.name and Path(new.path).is_file()
    run_dir.mkdir()
    resumed = make_probe(run_dir)
    assert resumed.in_run_dir and Path(resumed.path).parent == run_dir
    assert resumed.name != new.name  # a name no rank has looked up before
    remove_probe(new)
    remove_probe(resumed)
    remove_probe(resumed)  # gone already: nothing to do
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deeper", "root", "run"]


def test_the_ranks_that_do_not_see_it_are_named_once_with_their_hosts():
    probe = Probe(".shared-check-x", False, "/scratch/runs/.shared-check-x", "n0")
    # 64 ranks on 8 nodes of 8, run.root on each node's own disk: only node 0's ranks see it.
    gathered = [(r < 8, f"n{r // 8}") for r in range(64)]
    assert unseen_message(probe, gathered) == (
        "config key 'run.root': ranks 8, 9, 10, 11, 12, 13, 14, 15 ... (of 64; hosts n1, n2, n3, n4 ...) cannot "
        "see the file /scratch/runs/.shared-check-x that rank 0 (host n0) made; run.root must be a folder every "
        "rank sees (a shared file system): rank 0 alone writes the checkpoints, and a resume on other nodes would "
        "not find them (nothing was trained)"
    )
    one = unseen_message(probe, [(True, "n0"), (True, "n0"), (False, "n1")])
    assert one is not None and one.startswith("config key 'run.root': rank 2 (of 3; host n1) cannot see the file ")
    assert unseen_message(probe, [(True, "n0"), (True, "n1")]) is None
