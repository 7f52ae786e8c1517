"""Shared fixtures: a tiny real-JPEG dataset in ImageFolder layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _helpers import dali_missing

from pipelines.demo import DemoSpec, write_demo_dataset

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
