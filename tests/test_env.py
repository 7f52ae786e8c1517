"""alexnet/parallel/env.py: a hand-made launch's variables, checked before any process group; the
launchers' own reading of them and of the legacy launcher's --local-rank flag."""

import logging
import os
import subprocess
import sys

import pytest
from _helpers import launcher

from alexnet.parallel.env import SHARED_STORE_NOTE, LaunchError, _restart_safe_store, init_distributed


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"RANK": "1"}, r"RANK=1 is not a rank of WORLD_SIZE=1 \(0 to 0\); start the processes with torchrun"),
        ({"WORLD_SIZE": "2", "RANK": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, r"RANK=3 is not a rank"),
        ({"WORLD_SIZE": "0"}, r"WORLD_SIZE=0 must be at least 1"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, r"WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT are not set"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, r"but MASTER_PORT is not set"),
    ],
)
def test_a_launch_torchrun_would_not_make_is_one_line(monkeypatch, env, said):
    """RANK=1 alone failed in DALI's sharding ("num_shards_ > shard_id_"), RANK=3 of 2 waited
    the whole parallel.timeout_s, and WORLD_SIZE=2 alone gave torch's traceback."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LaunchError, match=said):
        init_distributed(5.0, force_cpu=True)


def test_one_process_needs_none_of_them(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    env = init_distributed(5.0, force_cpu=True)
    assert (env.rank, env.world_size, env.backend, env.distributed) == (0, 1, "gloo", False)
    assert env.launcher_pid is None  # no torchrun: a parent's end (nohup) is no stop request
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert init_distributed(5.0, force_cpu=True).launcher_pid == os.getppid()  # torchrun's agent
    assert init_distributed(5.0, force_cpu=True, started_under=os.getppid()).launcher_pid == os.getppid()


def test_a_worker_whose_torchrun_ended_during_its_imports_ends(monkeypatch):
    """Its parent read after torch's imports was already the reaper: the orphan waited for the
    store for twice the timeout, or (a fixed --master_port) joined the next torchrun's store and
    trained the run without one."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # the agent it started under, ended (its pid is no parent of this process)
    with pytest.raises(LaunchError, match=rf"^torchrun \(pid {gone.pid}\), which started this worker, has ended"):
        init_distributed(5.0, force_cpu=True, started_under=gone.pid)


@pytest.mark.parametrize(
    ("rank", "code", "said"),
    [
        ("", 1, "error: checkpoint "),  # as if unset: the run goes on to the checkpoint, which is missing
        ("abc", 2, "error: environment variable RANK='abc' is not an integer\n"),
    ],
)
def test_evaluate_takes_an_empty_or_malformed_rank_without_a_traceback(tmp_path, monkeypatch, capsys, rank, code, said):
    """`export RANK=$SLURM_PROCID` outside Slurm leaves RANK empty: evaluate.py's int(RANK) raised
    ValueError before init_distributed could name the variable."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", rank)
    evaluate = launcher("evaluate")
    assert evaluate.main([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out.json")]) == code
    err = capsys.readouterr().err
    assert err.startswith(said) and err.count("\n") == 1


def test_benchmark_takes_a_malformed_rank_without_a_traceback(tmp_path, monkeypatch, capsys):
    """Its logging set-up read int(RANK) before any command ran."""
    monkeypatch.setenv("RANK", "abc")
    benchmark = launcher("benchmark")
    assert benchmark.main(["merge", str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.json" in err and err.count("\n") == 1


def without_local_rank(args):
    return {key: value for key, value in vars(args).items() if key != "local_rank"}


@pytest.mark.parametrize("flag", [["--local-rank=0"], ["--local_rank", "1"]])
def test_the_legacy_launchers_local_rank_flag_is_accepted_and_ignored(flag, capsys):
    """`python -m torch.distributed.launch` (without --use-env) puts --local-rank=N before the
    script's arguments: "error: unrecognized arguments: --local-rank=0". LOCAL_RANK, which it sets
    too, is what init_distributed reads."""
    train = launcher("train")
    words = ["train.epochs=3", "--config", "f.yaml", "run.name=x"]
    assert without_local_rank(train.parse_args([*flag, *words])) == vars(train.parse_args(words))
    assert train.parse_args([*flag, *words]).overrides == ["train.epochs=3", "run.name=x"]
    evaluate = launcher("evaluate")
    words = ["ckpt.pt", "--ten-crop", "--batch-size", "4"]
    assert without_local_rank(evaluate.parse_args([*flag, *words])) == vars(evaluate.parse_args(words))
    benchmark = launcher("benchmark")
    for words in (["step", "a.b=1", "--steps", "2", "c.d=2"], ["e2e", "a.b=1", "--windows", "2", "c.d=2"]):
        expected = vars(benchmark.parse_args(words))
        assert expected["overrides"] == ["a.b=1", "c.d=2"]
        assert without_local_rank(benchmark.parse_args([*flag, *words])) == expected  # where the launcher puts it
        assert without_local_rank(benchmark.parse_args([words[0], *flag, *words[1:]])) == expected  # after the command
    for module, words in ((train, []), (evaluate, []), (benchmark, []), (benchmark, ["step"])):
        with pytest.raises(SystemExit):
            module.parse_args([*words, "--help"])
        assert "local" not in capsys.readouterr().out  # hidden: torchrun, which passes none, is the launcher to use


@pytest.mark.parametrize(("rank", "restarts", "said"), [(0, "1", True), (1, "1", False), (0, "0", False)])
def test_restarts_over_several_nodes_with_the_shared_store_are_named(monkeypatch, caplog, rank, restarts, said):
    """torchrun's agents count restarts per node, so a prefix per restart count split a restarted
    group across nodes (tests/test_recovery.py restarts two nodes with torch's own fix); over
    several nodes the store is left unprefixed and rank 0 names the fix where restarts are on."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", restarts)
    with caplog.at_level(logging.WARNING, logger="alexnet"):
        assert _restart_safe_store(rank, 2, 5.0) == {}
    assert (SHARED_STORE_NOTE in caplog.text) == said
