"""Shared fixtures: a tiny real-JPEG dataset in ImageFolder layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.demo import DemoSpec, write_demo_dataset

# The processes the tests start (torchrun workers, launch/*.py, Slurm jobs) import this checkout,
# not whichever `alexnet` the interpreter has installed: a script's sys.path[0] is its own folder,
# so without this a second checkout's editable install would be the code under test.
_REPO = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(_REPO), os.environ.get("PYTHONPATH"))))

TINY = DemoSpec(train_per_class=12, val_per_class=5, min_side=72, max_side=100, seed=7)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """10 classes x (12 train + 5 val) JPEGs of 72-100 pixels."""
    root = tmp_path_factory.mktemp("tiny_data")
    write_demo_dataset(root, TINY)
    return root
