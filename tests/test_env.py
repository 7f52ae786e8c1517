"""alexnet/parallel/env.py: a hand-made launch's variables, checked before any process group."""

import pytest

from alexnet.parallel.env import LaunchError, init_distributed


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
    env = init_distributed(5.0, force_cpu=True)
    assert (env.rank, env.world_size, env.backend, env.distributed) == (0, 1, "gloo", False)
