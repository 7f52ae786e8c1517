"""Shared fixtures: a tiny real-JPEG dataset in ImageFolder layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.demo import DemoSpec, write_demo_dataset

TINY = DemoSpec(train_per_class=12, val_per_class=5, min_side=72, max_side=100, seed=7)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """10 classes x (12 train + 5 val) JPEGs of 72-100 pixels."""
    root = tmp_path_factory.mktemp("tiny_data")
    write_demo_dataset(root, TINY)
    return root
