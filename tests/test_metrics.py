import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import TINY_TRAIN

from alexnet.config import ConfigError, load_config
from alexnet.metrics import MetricsWriter, Tally, read_metrics, strict_json, topk_correct
from alexnet.reporting import Reporter
from alexnet.run import run_training
from pipelines.base import PAD_LABEL
from pipelines.outputs import write_text_atomic


def tensorboard_scalars(folder: Path, wall_time: bool = False) -> dict[str, list[tuple]]:
    """Every scalar tag in a TensorBoard folder: (step, value), and the wall time with
    `wall_time`, as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(e.step, e.value, e.wall_time) if wall_time else (e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def test_topk_counts_skip_padding_rows():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1 hit
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: 5th best -> top-5 hit only
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: worst -> miss
            [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # padding row: never counted
        ]
    )
    labels = torch.tensor([0, 1, 5, PAD_LABEL])
    assert topk_correct(logits, labels).tolist() == [1, 2]


def test_tally_gives_exact_ratios_not_mean_of_means():
    tally = Tally(torch.device("cpu"))
    tally.add(torch.tensor(3.0), torch.tensor([3, 3]), 3)  # a full "rank": 3/3 right
    tally.add(torch.tensor(1.0), torch.tensor([0, 1]), 1)  # a short one: 0/1 right
    stats = tally.reduce()
    assert stats["count"] == 4 and stats["top1"] == 75.0 and stats["top5"] == 100.0  # not (100 + 0) / 2
    assert stats["loss"] == 1.0


def test_metrics_writer_appends_json_lines(tmp_path):
    """Every record in metrics.jsonl; its metrics in TensorBoard, not its bookkeeping (steps, count)."""
    records = [
        {"split": "train", "epoch": 1, "step": 10, "loss": 2.0, "top1": 5.0, "steps": 10, "count": 320},
        {"split": "val", "epoch": 1, "step": 10, "loss": 1.5, "top1": 9.0},
    ]
    writer = MetricsWriter(tmp_path, tensorboard=True)
    before = time.time()
    for record in records:
        writer.write(record)
    writer.close()
    written = read_metrics(tmp_path / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k != "time"} for r in written] == records
    # when each was written (rounded to the millisecond, so up to half of one past the clock)
    assert before - 0.01 <= written[0]["time"] <= written[1]["time"] <= time.time() + 0.001
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == {"train/loss": [(10, 2.0)], "train/top1": [(10, 5.0)], "val/loss": [(10, 1.5)],
                       "val/top1": [(10, 9.0)]}  # fmt: skip


def test_a_resumed_run_continues_the_record_from_its_checkpoint(tmp_path):
    """Steps 1-5 written, the checkpoint at step 3, a crash: the resumed session's writer drops
    steps 4-5 from metrics.jsonl and TensorBoard, so each step is recorded once, with its new values."""
    first = MetricsWriter(tmp_path, tensorboard=True)
    for step in range(1, 6):
        first.write({"split": "train", "epoch": 0, "step": step, "loss": float(step)})
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"split": "train", "epoch": 0, "st')  # a write cut short by the crash
    second = MetricsWriter(tmp_path, tensorboard=True, start_step=3)
    for step in (4, 5):
        second.write({"split": "train", "epoch": 0, "step": step, "loss": 10.0 * step})
    second.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert tensorboard_scalars(tmp_path / "tensorboard")["train/loss"] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
    ]


def test_tensorboard_shows_every_record_after_a_session_without_it(tmp_path):
    """Steps 1-2 with TensorBoard, 3-4 without, then a crash after step 6 written with it and a
    resume from step 5: TensorBoard lost steps 3-4 (purged from the resumed step on, replayed from
    there) and would have kept a crashed session's event below its purge step; it shows exactly
    the records, as metrics.jsonl holds them."""

    def session(tensorboard, start, steps, scale=1.0):
        writer = MetricsWriter(tmp_path, tensorboard=tensorboard, start_step=start)
        for step in steps:
            writer.write({"split": "train", "epoch": 0, "step": step, "loss": scale * step})
        writer.close()

    session(True, 0, (1, 2))
    session(False, 2, (3, 4))
    session(True, 4, (5, 6))  # crashes after step 6: the resume below is from step 5's checkpoint
    session(True, 5, (6, 7), scale=10.0)
    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0), (7, 70.0)]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == expected
    # written again by each session, each event keeps the time its record was first written
    shown = tensorboard_scalars(tmp_path / "tensorboard", wall_time=True)["train/loss"]
    assert shown == [(r["step"], r["loss"], pytest.approx(r["time"], abs=1e-3)) for r in records]


def test_a_torn_line_is_skipped_not_fatal(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"split": "train", "step": 1}\n{"split": "tr\n[1, 2]\n{"split": "val", "step": 2}\n')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert "line 2 is not a metrics record" in caplog.text and "line 3 is not a metrics record" in caplog.text


def test_bytes_that_are_not_utf8_fail_their_line_only(tmp_path, caplog):
    """A damaged line used to make the whole file unreadable (UnicodeDecodeError), and with it
    the resume that trims the file."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"split": "train", "step": 1}\n\xff\xfe{"split": "train"}\n{"split": "val", "step": 2}\n')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert "line 2 is not a metrics record" in caplog.text


def test_a_validation_written_after_the_resumed_checkpoint_at_its_step_is_dropped(tmp_path):
    """Epoch 1 ends at step 15: the periodic checkpoint (step 15, 0 epochs completed), then the
    validation record, then a crash before the epoch's own checkpoint. The run resumes from the
    periodic one and validates epoch 1 again: its earlier validation record goes, step 15's
    training record stays, in the file and in TensorBoard."""
    first = MetricsWriter(tmp_path, tensorboard=True)
    first.write({"split": "train", "epoch": 1, "step": 15, "loss": 1.5})
    first.write({"split": "val", "epoch": 1, "step": 15, "loss": 9.0})
    first.close()
    second = MetricsWriter(tmp_path, tensorboard=True, start_step=15, start_epoch=0)
    second.write({"split": "val", "epoch": 1, "step": 15, "loss": 7.0})
    second.close()
    assert [(r["split"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [("train", 1.5), ("val", 7.0)]
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert (scalars["val/loss"], scalars["train/loss"]) == ([(15, 7.0)], [(15, 1.5)])
    # resumed from the epoch's own checkpoint (1 epoch completed), the validation is behind it
    MetricsWriter(tmp_path, tensorboard=False, start_step=15, start_epoch=1).close()
    assert [r["split"] for r in read_metrics(tmp_path / "metrics.jsonl")] == ["train", "val"]


def test_a_diverged_loss_is_written_as_null_for_strict_json_readers(tmp_path):
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write({"split": "train", "epoch": 0, "step": 1, "loss": float("nan"), "extra": [float("inf"), 1.5]})
    writer.write({"split": "train", "epoch": 0, "step": 2, "loss": 2.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]  # as JavaScript or Go read it
    assert records[0]["loss"] is None and records[0]["extra"] == [None, 1.5] and records[1]["loss"] == 2.5
    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "epoch": 0, "step": 1, "loss": NaN}\n')  # older runs
    MetricsWriter(tmp_path, tensorboard=False, start_step=1)  # a resume rewrites what it keeps
    assert json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)["loss"] is None
    assert strict_json({"best": float("-inf")}, indent=2) == '{\n  "best": null\n}'


@pytest.mark.dali
def test_tensorboard_requested_but_missing_stops_the_run_before_it_starts(tiny_data, tmp_path, monkeypatch):
    """A ConfigError naming the key on every rank, before the run folder is made (it was a
    ModuleNotFoundError traceback on rank 0 in the middle of the setup, config.yaml already
    written, and a broken collective on the other ranks)."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = load_config(None, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=tb",
                             "run.tensorboard=true"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"config key 'run.tensorboard'.*pip install tensorboard"):
        run_training(cfg, None)
    assert not (tmp_path / "tb").exists()


@pytest.mark.dali
def test_a_checkpoint_write_is_left_out_of_the_training_throughput(tiny_data, tmp_path, monkeypatch):
    """Checkpoints every 2 steps, each taking 1000 s on the clock: the records' images/s and
    data-wait shares are the training's (a window holding a write read about 0.016 images/s)."""
    import alexnet.trainer as trainer_module

    clock = {"offset": 0.0}
    real_clock, real_save = time.perf_counter, trainer_module.atomic_save

    def slow_save(*args, **kwargs):
        clock["offset"] += 1000.0
        return real_save(*args, **kwargs)

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + clock["offset"])
    monkeypatch.setattr(trainer_module, "atomic_save", slow_save)
    cfg = load_config(None, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=ckpt",
                             "train.max_steps=6", "checkpoint.every_steps=2", "train.log_every=2"])  # fmt: skip
    run_training(cfg, None)
    train = [r for r in read_metrics(tmp_path / "ckpt" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6] and clock["offset"] >= 3000.0
    assert all(r["images_per_sec"] > 1.0 and r["data_wait_share"] <= 1.0 for r in train), train


@pytest.mark.dali
def test_every_step_is_in_one_training_record_also_at_an_epoch_end_and_a_stop(tiny_data, tmp_path):
    """120 images at batch 8 on one process: 15 steps per epoch. Logged every 4 steps, epoch 1
    ends 3 steps after the record at step 12 and the run stops (max_steps) 1 step after the one
    at 16: both tails get a record, so the records cover the run's 17 steps and 136 images."""
    cfg = load_config(None, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=tails",
                             "train.epochs=2", "train.max_steps=17", "train.log_every=4"])  # fmt: skip
    summary = run_training(cfg, None)
    train = [r for r in read_metrics(tmp_path / "tails" / "metrics.jsonl") if r["split"] == "train"]
    assert [(r["epoch"], r["step"], r["steps"]) for r in train] == [
        (1, 4, 4), (1, 8, 4), (1, 12, 4), (1, 15, 3), (2, 16, 1), (2, 17, 1)
    ]  # fmt: skip
    assert [r["count"] for r in train] == [8 * r["steps"] for r in train]
    assert sum(r["count"] for r in train) == summary["train_images"] == 136 and summary["steps"] == 17
    assert (summary["batch_size"], summary["global_batch"]) == (8, 8)


def test_an_atomic_write_is_synced_before_its_rename_and_a_failed_one_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text("old\n")
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n" and events == ["fsync", "replace"]

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, "newer\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_run_started_from_another_run_s_checkpoint_keeps_none_of_this_folder_s_records(tmp_path, caplog):
    """A fresh attempt crashed at step 3 (lr 62.5, a loss of 7e14); the folder then started from
    another run's checkpoint at step 24: its steps 1-3 stayed in front of steps 25-32, in the file,
    the PNG and TensorBoard."""
    crashed = MetricsWriter(tmp_path, tensorboard=True)
    for step, loss in ((1, 4.0), (2, 7e14), (3, float("nan"))):
        crashed.write({"split": "train", "epoch": 1, "step": step, "loss": loss})
    crashed.close()
    with caplog.at_level(logging.INFO, logger="alexnet"):
        started = MetricsWriter(tmp_path, tensorboard=True, start_step=24, start_epoch=3, history_here=False)
    started.write({"split": "train", "epoch": 4, "step": 25, "loss": 1.0})
    started.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [25]
    assert "dropped its 3 record(s): none led to the checkpoint of another run" in caplog.text
    assert tensorboard_scalars(tmp_path / "tensorboard")["train/loss"] == [(25, 1.0)]


def test_tensorboard_turned_on_at_a_resume_starts_with_the_kept_records(tmp_path, caplog):
    """Off for steps 1-4, on from the resume at step 4: its curves held steps 4 on only."""
    first = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):
        first.write({"split": "train", "epoch": 0, "step": step, "loss": float(step)})
    with caplog.at_level(logging.INFO, logger="alexnet"):
        second = MetricsWriter(tmp_path, tensorboard=True, start_step=4)
    assert "dropped 1 record(s) written after the checkpoint this run resumes from (step 4)" in caplog.text
    second.write({"split": "train", "epoch": 0, "step": 5, "loss": 50.0})
    second.close()
    assert tensorboard_scalars(tmp_path / "tensorboard")["train/loss"] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 50.0),
    ]


def test_a_rerun_that_starts_over_says_it_replaces_the_earlier_attempt_s_records(tmp_path, caplog):
    first = MetricsWriter(tmp_path, tensorboard=False)
    first.write({"split": "train", "epoch": 0, "step": 1, "loss": 1.0})
    with caplog.at_level(logging.INFO, logger="alexnet"):
        MetricsWriter(tmp_path, tensorboard=False)
    assert read_metrics(tmp_path / "metrics.jsonl") == []
    assert "dropped 1 record(s) of an earlier attempt that left no checkpoint: this run starts over" in caplog.text


# TensorBoard's writer thread dies of the OSError (and prints it); the writer's next call raises it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_tensorboard_that_cannot_write_stops_alone_and_the_record_is_written_once(tmp_path, caplog, monkeypatch):
    """TensorBoard's events on a full disk of their own: the failure was taken for metrics.jsonl's,
    so the record, already in the file, was also kept for the resumed session, which wrote it
    again (steps 12, 13, 13, 14), and the run stopped naming metrics.jsonl."""
    from tensorboard.summary.writer import record_writer

    reporter = Reporter(tmp_path, is_main=True, tensorboard=True, progress="log", epochs=1)
    reporter.open()
    reporter.train(train_record(1), batches=None)

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", full_disk)
    with caplog.at_level(logging.WARNING, logger="alexnet"):
        for step in (2, 3):
            reporter.train(train_record(step), batches=None)
        reporter.close()
    assert reporter.failure is None and reporter.unwritten == []  # the run goes on, nothing to write again
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert caplog.text.count("cannot write TensorBoard's events in") == 1
    assert "TensorBoard stops for this session; metrics.jsonl goes on" in caplog.text


def test_records_a_failed_start_wrote_before_its_error_are_not_written_again(tmp_path, caplog):
    """A resumed session writes the records an earlier one could not; when the disk failed again
    after the first of them, that one was in the file (behind the checkpoint) and in the
    checkpoint's list, and the next resume wrote it a second time."""
    MetricsWriter(tmp_path, tensorboard=False).write(train_record(1))
    carried = [train_record(2), train_record(3)]
    MetricsWriter(tmp_path, tensorboard=False, start_step=3).write(carried[0])  # then the disk failed
    reporter = Reporter(tmp_path, is_main=True, tensorboard=False, progress="log", epochs=1, start=(3, 0),
                        unwritten=[dict(r) for r in carried])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="alexnet"):
        reporter.open()
    reporter.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert "wrote the 1 metrics record(s) an earlier session could not write" in caplog.text


def train_record(step: int) -> dict:
    return {"split": "train", "epoch": 0, "step": step, "steps": 1, "count": 8, "loss": 1.0, "top1": 10.0,
            "lr": 0.01, "images_per_sec": 100.0, "data_wait_share": 0.0}  # fmt: skip


def test_tensorboard_shows_the_same_points_live_and_after_a_resume(tmp_path):
    """A NaN loss was a point live but null in metrics.jsonl, so a resume's rewrite took it away;
    a validation's ten_crop flag was drawn as a 0/1 curve."""
    first = MetricsWriter(tmp_path, tensorboard=True)
    first.write({"split": "train", "epoch": 0, "step": 1, "loss": 2.0})
    first.write({"split": "train", "epoch": 0, "step": 2, "loss": float("nan")})
    first.write({"split": "val", "epoch": 1, "step": 2, "loss": 1.5, "ten_crop": False})
    first.close()
    live = tensorboard_scalars(tmp_path / "tensorboard")
    MetricsWriter(tmp_path, tensorboard=True, start_step=2, start_epoch=1).close()
    assert tensorboard_scalars(tmp_path / "tensorboard") == live
    assert live == {"train/loss": [(1, 2.0)], "val/loss": [(2, 1.5)]}
