"""Ranks started differently: nothing checked that every rank had the same settings or planned
the same layout. Different overrides on two agents hung at an epoch's end, aborted in gloo, or
trained replicas that drifted apart (exit 0); nodes with different process counts left some
ranks waiting 30 minutes in new_group, which also ignored parallel.timeout_s. And hand-made
launches that torch reports with a traceback: a malformed RANK or MASTER_PORT, a missing peer."""

from __future__ import annotations

import json
import socket

import pytest
from _helpers import DEMO_CONFIG, REPO, TINY_TRAIN, TRAIN, one_process, rank_1_differs, tiny_run_config, torchrun

from alexnet.parallel.env import LaunchError, init_distributed
from alexnet.run import run_training

GROUP_TIMEOUT = REPO / "tests" / "dist" / "group_timeout.py"


def the_error_of_every_rank(proc) -> str:
    """The one error line both ranks printed (the same), the launch having failed."""
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2 and lines[0] == lines[1], proc.stderr[-4000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    return lines[0]


def test_ranks_started_with_different_settings_stop_at_once_naming_them(tiny_data, tmp_path):
    wrapper = rank_1_differs(tmp_path, TRAIN, ("train.epochs=2", "optim.lr=0.5", f"run.root={tmp_path / 'other'}",
                                               "data.num_threads=2"))  # fmt: skip
    proc = torchrun([wrapper, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=r",
                     "train.epochs=1", "parallel.timeout_s=30"])  # fmt: skip
    line = the_error_of_every_rank(proc)
    assert line.startswith(
        "error: the ranks were started with different settings: optim.lr 0.01 on rank 0, 0.5 on rank 1; "
        "train.epochs 1 on rank 0, 2 on rank 1; start every rank with the same command "
        "(only paths and a node's own tuning may differ: "
    ), line
    assert "run.root" in line and "run.root '" not in line  # a path: named as allowed, not as a difference
    assert "data.num_threads" in line and "data.num_threads 1" not in line  # a node's own tuning, the same
    assert not (tmp_path / "r").exists()  # stopped before the run folder


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        # Rank 1's node cannot keep a pair: it stopped alone, its peer left waiting in new_group.
        ("towers", "error: rank 1 (of 2): parallel.mode=towers keeps both towers of a replica on one node"),
        # fc_group 2 and 1 from the nodes' process counts: the cause is said, also where one rank's
        # arithmetic fails (nodes of 1 and 2 processes: "fc_group=2 ... the world has 3 ranks").
        ("hybrid", "error: parallel.mode=hybrid shares the FC layers among the processes of a node "
                   "(parallel.fc_group=0), but the nodes run different numbers of processes (1 per node for rank 1; "
                   "2 per node for rank 0); run the same --nproc_per_node on every node, or set parallel.fc_group"),
    ],
)  # fmt: skip
def test_a_node_that_runs_another_number_of_processes_stops_every_rank(tiny_data, tmp_path, mode, said):
    wrapper = rank_1_differs(tmp_path, TRAIN, env={"LOCAL_WORLD_SIZE": "1"})  # rank 1 alone on its node
    proc = torchrun([wrapper, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=t",
                     f"parallel.mode={mode}", "parallel.timeout_s=30"])  # fmt: skip
    assert the_error_of_every_rank(proc).startswith(said)


@pytest.mark.dali
def test_a_node_that_cannot_run_its_own_decoder_stops_every_rank_naming_it(tiny_data, tmp_path):
    """data.decoder may differ by node; rank 1's mixed decoder on a node without CUDA stopped it
    alone, and rank 0 went on into the run's setup, to wait for it in the next collective."""
    wrapper = rank_1_differs(tmp_path, TRAIN, ("data.decoder=mixed",))
    proc = torchrun([wrapper, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=d",
                     "parallel.timeout_s=30"])  # fmt: skip
    assert the_error_of_every_rank(proc) == (
        "error: rank 1 (of 2): config key 'data.decoder' is 'mixed' (GPU decoding) but no CUDA device is in use; "
        "use cpu or auto"
    )
    assert not (tmp_path / "d").exists()  # stopped before the run folder


def test_a_pair_s_process_group_keeps_the_collective_timeout(tmp_path):
    """Rank 1 sleeps 5 s; rank 0's all-reduce over the pair ends by the 1 s timeout ("Timed out
    waiting 1000ms"), not when rank 1 exits ("Connection closed by peer": the group had torch's
    30-minute default)."""
    proc = torchrun([GROUP_TIMEOUT, tmp_path, "1", "5"])  # 4 s after the timeout: ample, even on a loaded CI
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert "Timed out waiting 1000ms" in result["error"], (result, proc.stderr[-3000:])


@pytest.mark.dali
def test_a_checkpoint_reached_through_another_spelling_of_run_root_is_the_same_one(tiny_data, tmp_path):
    """Rank 1's node reaches the run folder through a symbolic link: the resume was refused with
    "the ranks found different checkpoints" (the same file, the same step) and a hint at shared
    storage that was already shared."""
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    common = [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path / 'runs'}", "run.name=l"]
    # The checkpoint: any session's will do, so this test's own process trains it (a launch less:
    # its interpreter has torch, DALI and the model imported already).
    first = run_training(tiny_run_config(tiny_data, tmp_path / "runs", "l", "train.max_steps=2"), str(DEMO_CONFIG))
    assert first["steps"] == 2
    wrapper = rank_1_differs(tmp_path, TRAIN, (f"run.root={tmp_path / 'link'}",))
    again = torchrun([wrapper, *common, "train.max_steps=3", "parallel.timeout_s=30"])
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resumed from {tmp_path / 'runs' / 'l' / 'checkpoints' / 'last.pt'} after step 2" in again.stderr


def test_a_malformed_rank_is_named_by_train_py_without_a_traceback(tiny_data, tmp_path):
    """Its logging set-up read int(RANK) first: `RANK=abc` raised ValueError's traceback."""
    proc = one_process([TRAIN, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}"], env={"RANK": "abc"})
    assert proc.returncode == 2 and proc.stderr == "error: environment variable RANK='abc' is not an integer\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hand_launch(monkeypatch):
    """Rank 0 of 2 started by hand, its peer never started."""
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_a_peer_that_never_comes_is_one_line_after_the_timeout(hand_launch):
    """torch's DistStoreError traceback ("1/2 clients joined") after parallel.timeout_s."""
    port = free_port()
    hand_launch.setenv("MASTER_PORT", str(port))
    with pytest.raises(LaunchError) as info:
        init_distributed(2.0, force_cpu=True)
    message = str(info.value)
    assert message.startswith(f"rank 0 of WORLD_SIZE=2 could not meet the other ranks at 127.0.0.1:{port} within "
                              "parallel.timeout_s=2 s (")  # fmt: skip
    assert message.endswith("start every rank (torchrun starts them all), with the same MASTER_ADDR and MASTER_PORT")


@pytest.mark.parametrize(
    ("port", "said"), [("abc", "MASTER_PORT='abc' is not an integer"), ("0", "MASTER_PORT=0 is not a port")]
)
def test_a_master_port_that_is_no_port_is_named(hand_launch, port, said):
    hand_launch.setenv("MASTER_PORT", port)
    with pytest.raises(LaunchError, match=said):
        init_distributed(2.0, force_cpu=True)


TRAIN_TWICE = """
import sys
from alexnet.config import load_config
from alexnet.run import run_training
root = sys.argv[1]
for name in ("first", "second"):
    cfg = load_config(None, ["data.pipeline=synthetic", "data.synthetic_steps=2", "data.batch_size=2",
                             "data.resize=67", "data.crop=67", "model.fc_width=16", "model.num_classes=10",
                             "train.epochs=1", "checkpoint.every_steps=0", "parallel.timeout_s=20",
                             f"run.root={root}", f"run.name={name}"])
    steps = run_training(cfg, None)["steps"]
    sys.stdout.write(f"{name} {steps}\\n")  # one write: both ranks share torchrun's stdout, unbuffered in CI
"""


def test_a_worker_that_trains_twice_meets_its_peers_again(tmp_path):
    """A script (or notebook) under torchrun that calls run_training twice: the second process
    group read the first one's keys in torchrun's store, hung for parallel.timeout_s, then failed
    in gloo ("Connection reset by peer")."""
    script = tmp_path / "train_twice.py"
    script.write_text(TRAIN_TWICE)
    proc = torchrun([script, tmp_path])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("first 2\n") == 2 and proc.stdout.count("second 2\n") == 2, proc.stdout
