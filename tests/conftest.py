"""Shared fixtures: a tiny real-JPEG dataset in ImageFolder layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _helpers import dali_missing

from pipelines.demo import DemoSpec, write_demo_dataset

try:  # the README's test command runs pytest-xdist; a plain `pytest` run may be without it
    # A hook: registered by being a name of this conftest, it gives `--dist loadfile` a scheduling
    # that recovers a crashed worker instead of hanging the run (see the module).
    from _xdist_scheduling import pytest_xdist_make_scheduler  # noqa: F401
except ImportError:
    pass

# The processes the tests start (torchrun workers, launch/*.py, Slurm jobs) import this checkout,
# not whichever `alexnet` the interpreter has installed: a script's sys.path[0] is its own folder,
# so without this a second checkout's editable install would be the code under test.
_REPO = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(_REPO), os.environ.get("PYTHONPATH"))))

# The README's test command runs two pytest-xdist workers, one per core of a 2-core CI machine.
# Each worker's in-process training and the processes it starts then get one intra-op thread: with
# torch's default of one per core, four OpenMP threads spun on two cores, and an in-process test
# took eight times as long as alone.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY = DemoSpec(train_per_class=12, val_per_class=5, min_side=72, max_side=100, seed=7)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """10 classes x (12 train + 5 val) JPEGs of 72-100 pixels."""
    root = tmp_path_factory.mktemp("tiny_data")
    write_demo_dataset(root, TINY)
    return root


@pytest.fixture(scope="session")
def _retired_gloo_groups() -> list:
    """Every group `gloo_world_of_one` made, kept until the session's end (then destroyed here,
    on the main thread, long after their last callback)."""
    groups: list = []
    yield groups
    groups.clear()


@pytest.fixture
def gloo_world_of_one(_retired_gloo_groups) -> None:
    """A gloo process group of this process alone (DDP's buckets, no_sync and comm hooks are the
    same for any number of ranks), destroyed at the test's end.

    The group's object is kept for the session: a comm hook's Python callbacks (PowerSGD's
    closures hold the group) are released by gloo's own worker thread once it gets the GIL, and
    when that was the group's last reference, the group's destructor ran on that thread and
    joined it: "Resource deadlock avoided", SIGABRT, the pytest worker gone (about 1 run in 80 of
    the PowerSGD test here; none in 1500 with the group kept). An in-memory store: a file store's
    file would go with a passed test's tmp_path before the group's end."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    _retired_gloo_groups.append(dist.group.WORLD)
    try:
        yield
    finally:
        dist.destroy_process_group()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "dali: needs NVIDIA DALI, which `pip install -e .` installs on x86-64 Linux only (else skipped)"
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked `dali` are skipped, with the reason, where this Python cannot import DALI (an
    ARM Mac, aarch64 Linux): the README's test command runs the rest there. DALI is imported to
    tell (0.2-1 s, once per process) only where a collected test is marked, and most such modules
    have imported it already."""
    marked = [item for item in items if item.get_closest_marker("dali")]
    reason = dali_missing() if marked else None
    if reason:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))
