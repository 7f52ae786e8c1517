"""A resume on a machine where train.amp=auto resolves to another precision is said, as a changed
key is (that PowerSGD's loss-scaled residual is then not carried over: tests/test_powersgd.py)."""

from __future__ import annotations

from _helpers import SYNTHETIC_TRAIN

import alexnet.trainer
from alexnet.config import load_config
from alexnet.engine import build_amp
from alexnet.run import run_training


def test_a_resume_under_another_resolved_precision_says_so(tmp_path, monkeypatch, capfd):
    """train.amp=auto trained in bf16 (a GPU that runs it) and resumed where auto means off (a
    CPU, a V100's fp16): the key did not change, so nothing was said."""
    overrides = [*SYNTHETIC_TRAIN, f"run.root={tmp_path}", "run.name=auto", "train.amp=auto"]
    with monkeypatch.context() as m:  # the first machine: auto resolves to bf16 (the CPU runs bf16 autocast)
        m.setattr(alexnet.trainer, "build_amp", lambda mode, device: build_amp("bf16" if mode == "auto" else mode,
                                                                              device))  # fmt: skip
        run_training(load_config(None, [*overrides, "train.epochs=1"]), None)
    capfd.readouterr()
    summary = run_training(load_config(None, [*overrides, "train.epochs=2"]), None)
    err = capfd.readouterr().err
    assert "the run trained in precision bf16, this session in off (train.amp=auto resolves to what this machine " \
           "runs best)" in err  # fmt: skip
    assert summary["amp"] == "off" and summary["steps"] == 4
    capfd.readouterr()
    run_training(load_config(None, [*overrides, "train.epochs=3"]), None)  # off, as the last session trained
    assert "the run trained in precision" not in capfd.readouterr().err
