"""The training-curves PNG and the final summary's figures."""

import json
import logging
import os
import re
import sys

import pytest
import torch
from _helpers import REPO, TINY_TRAIN
from PIL import Image

from alexnet.config import load_config
from alexnet.data import DataSplits
from alexnet.imagenet import load_imagenet_classes
from alexnet.report import (
    PLOT_FILE,
    build_training_figure,
    draw_run_curves,
    format_summary,
    paper_comparison,
    plot_training_curves,
    session_gpu_seconds,
    summarize_run,
    write_run_report,
)
from alexnet.reporting import Reporter
from alexnet.run import run_training
from pipelines.index import FileIndex

ILSVRC = [c.wnid for c in load_imagenet_classes()]  # the class folders of ILSVRC-2012
TEN = [f"class_{i}" for i in range(10)]


def write_metrics(path):
    records = write_metrics_records()
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def write_metrics_records():
    records = []
    for step in range(10, 101, 10):
        records.append(
            {
                "split": "train",
                "epoch": 1 + step // 50,
                "step": step,
                "loss": 6.9 - step / 50,
                "top1": step / 4,
                "top5": step / 2,
                "images_per_sec": 900.0 + step,
                "data_wait_share": 0.25,
                "lr": 0.01 if step <= 50 else 0.001,
            }
        )
        if step % 50 == 0:
            records.append(
                {"split": "val", "epoch": step // 50, "step": step, "loss": 5.0, "top1": step / 5, "top5": step / 3}
            )
    return records


def lines_by_label(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_plot_file_is_written(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    out = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "training_curves.png")
    assert out == tmp_path / "training_curves.png"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1200, 800)
        assert len(img.getcolors(maxcolors=1_000_000)) > 50  # drawn on, not a blank canvas


def test_figure_holds_the_records_curves(tmp_path):
    records = write_metrics(tmp_path / "metrics.jsonl")
    fig = build_training_figure(records, "run")
    loss, acc, lr, speed = fig.axes[:4]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert lines_by_label(loss)["train loss"] == ([r["step"] for r in train], [r["loss"] for r in train])
    assert lines_by_label(loss)["val loss"] == ([50, 100], [5.0, 5.0])
    assert set(lines_by_label(acc)) == {"train top-1", "train top-5", "val top-1", "val top-5"}
    assert lines_by_label(acc)["val top-5"][1] == [r["top5"] for r in val]
    assert lines_by_label(lr)["learning rate"][1] == [0.01] * 5 + [0.001] * 5 and lr.get_yscale() == "log"
    assert lines_by_label(speed)["train images/s"][1][0] == 910.0
    assert lines_by_label(fig.axes[4])["data wait %"][1] == [25.0] * 10  # the throughput panel's twin
    assert [ax.get_title() for ax in fig.axes[:4]] == ["loss", "accuracy", "learning rate", "throughput"]
    fig.clf()


def test_a_run_with_one_training_record_shows_its_points():
    """A run stopped after its first log window: lines of one point draw nothing, and the four
    panels looked empty."""
    fig = build_training_figure(write_metrics_records()[:1], "run")
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 6 and all(line.get_marker() == "o" for line in lines)  # loss, top-1/5, lr, images/s, wait
    fig.clf()
    fig = build_training_figure(write_metrics_records(), "run")
    assert {line.get_marker() for line in fig.axes[0].get_lines()} == {"None", "o"}  # train lines, val dots
    fig.clf()


def test_empty_and_missing_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    png = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "empty.png")
    with Image.open(png) as image:  # a real, readable figure (its empty axes), not just some bytes
        assert image.format == "PNG" and min(image.size) >= 100
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl"):
        plot_training_curves(tmp_path / "nowhere.jsonl", tmp_path / "x.png")


def test_summary_on_imagenet_compares_with_the_paper():
    s = summarize_run(
        best_top1=57.0,
        best_top5=80.0,
        wall_seconds=36_000.0,
        train_images=115_315_380,
        world_size=8,
        device_type="cuda",
        validated_classes=ILSVRC,
    )
    assert s.wall_hours == 10.0 and s.gpu_hours == 80.0
    assert s.images_per_sec == pytest.approx(3203.205, abs=1e-3)
    assert s.paper["comparable"] is True
    assert s.paper["top1_error"] == pytest.approx(43.0) and s.paper["top1_error_gap"] == pytest.approx(2.3)
    assert s.paper["top5_error"] == pytest.approx(20.0) and s.paper["top5_error_gap"] == pytest.approx(1.8)
    assert "+2.30 points" in s.paper["note"] and "ten crops" in s.paper["note"]
    assert json.loads(json.dumps(s.as_dict()))["gpu_hours"] == 80.0


def test_the_errors_are_written_without_float_noise():
    """100 - 99.6 is 0.4000000000000057 in floating point, which summary.json showed."""
    paper = paper_comparison(99.6, 81.8, ILSVRC)
    assert (paper["top1_error"], paper["top5_error"]) == (0.4, 18.2) and paper["top5_error_gap"] == 0.0
    assert json.dumps(paper["top1_error_gap"]) == "-40.3"


def test_summary_elsewhere_says_there_is_no_comparison():
    s = summarize_run(98.8, 100.0, 120.6, 23_880, 2, "cpu", TEN)
    assert s.gpu_hours == 0.0 and s.images_per_sec == pytest.approx(198.01, abs=0.01)
    assert s.paper["comparable"] is False and s.paper["top1_error_gap"] is None
    assert "this data has 10" in s.paper["note"]
    assert paper_comparison(59.3, 81.8, ILSVRC)["top1_error_gap"] == pytest.approx(0.0)


def test_a_synthetic_data_run_is_not_compared_with_the_paper():
    """Random labels at 1000 classes: "top-1 error 99.90% vs the paper's 40.7% (+59.20 points)"
    before, with a gap in summary.json."""
    s = summarize_run(0.1, 0.5, 60.0, 1280, 1, "cpu", ILSVRC, synthetic=True)
    assert s.paper == {"comparable": False, "note": "synthetic data (random labels): not compared with the paper"}
    assert summarize_run(0.1, 0.5, 60.0, 1280, 1, "cpu", ILSVRC).paper["top1_error_gap"] == pytest.approx(59.2)


def test_run_report_logs_the_summary_and_draws_into_the_run_folder(tmp_path, caplog):
    final = summarize_run(50.0, 75.0, 7200.0, 1_000_000, 4, "cuda", ILSVRC)
    with caplog.at_level(logging.INFO, logger="alexnet"):
        assert write_run_report(tmp_path, final) is None  # no metrics yet: a warning, not an error
        write_metrics(tmp_path / "metrics.jsonl")
        assert write_run_report(tmp_path, final) == tmp_path / PLOT_FILE
    assert (tmp_path / PLOT_FILE).stat().st_size > 10_000
    assert "8.00 GPU-hours" in caplog.text and "139 images/s" in caplog.text
    assert "top-1 error 50.00% vs the paper's 40.7% (+9.30 points)" in caplog.text


def test_a_run_without_validation_reports_none_and_max_steps_says_how_to_continue():
    """Stopped before its first validation (max_steps, a preemption in epoch 1): no accuracy and
    no comparison with the paper, even at 1000 classes (it used to report 0% and a +59 point gap)."""
    from alexnet.report import format_summary
    from alexnet.reporting import final_accuracy, stop_state
    from alexnet.resume import Progress

    p = Progress()
    s = summarize_run(p.best_top1, p.best_top5, 60.0, 1280, 8, "cuda", ILSVRC)
    assert s.best_top1 is None and s.paper == {
        "comparable": False,
        "note": "no validation ran, so no comparison with the paper",
    }
    assert format_summary(s).startswith("no validation yet; 60 s")
    assert final_accuracy(p.last_top1) == "no validation yet" and final_accuracy(57.25) == "final val top-1 57.25%"
    stopped = {"completed": False, "stop_reason": "max_steps"}
    assert stop_state(stopped) == "stopped (max_steps; raise train.max_steps, or set it to 0, to continue)"
    assert stop_state({**stopped, "stop_reason": "preempted"}) == "stopped (preempted; the same command resumes)"
    assert stop_state({"completed": True, "stop_reason": "completed"}) == "finished"


def test_a_missing_matplotlib_is_a_warning_not_an_error(tmp_path, caplog, monkeypatch):
    """The run has ended and its checkpoints are safe: no plotting library must not fail it
    (a failure here skipped the .completed marker and made torchrun restart a finished run)."""
    write_metrics(tmp_path / "metrics.jsonl")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    final = summarize_run(50.0, 75.0, 60.0, 1000, 1, "cpu", TEN)
    with caplog.at_level(logging.INFO, logger="alexnet"):
        assert write_run_report(tmp_path, final) is None
    assert "matplotlib cannot be imported" in caplog.text and "best val top-1 50.00%" in caplog.text
    assert not (tmp_path / PLOT_FILE).exists()


def test_gpu_hours_count_each_session_with_its_own_world_size():
    """8 GPUs for 10 h, then resumed on 16 GPUs for 1 h: 96 GPU-hours, not 16 x 11 = 176."""
    gpu_seconds = session_gpu_seconds(8, "cuda", 36_000.0) + session_gpu_seconds(16, "cuda", 3_600.0)
    s = summarize_run(57.0, 80.0, 39_600.0, 1_000_000, 16, "cuda", ILSVRC, gpu_seconds)
    assert s.gpu_hours == pytest.approx(96.0)
    # a CPU session after CUDA ones keeps their GPU-hours, adds none
    cpu_too = gpu_seconds + session_gpu_seconds(2, "cpu", 400.0)
    assert summarize_run(57.0, 80.0, 40_000.0, 1_000_000, 2, "cpu", ILSVRC, cpu_too).gpu_hours == pytest.approx(96.0)
    assert summarize_run(57.0, 80.0, 3_600.0, 1, 8, "cuda", ILSVRC).gpu_hours == 8.0  # one session: as before


@pytest.mark.dali
def test_the_trainer_adds_each_sessions_gpu_seconds(tiny_data, tmp_path, monkeypatch):
    """A session's own GPU-seconds (counted as on 8 GPUs here) are added to the checkpoint's: a
    resume after an earlier session's GPU-hour reports that hour plus its own."""
    import alexnet.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "session_gpu_seconds", lambda world, device, seconds: 8.0 * seconds)
    common = [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=g"]
    run_training(load_config(None, [*common, "train.max_steps=2"]), None)
    ckpt = tmp_path / "g" / "checkpoints" / "last.pt"
    payload = torch.load(ckpt, weights_only=True)
    assert payload["progress"]["gpu_seconds"] == pytest.approx(8.0 * payload["progress"]["train_seconds"])
    payload["progress"]["gpu_seconds"] += 3600.0  # an earlier session on more GPUs: one GPU-hour more
    torch.save(payload, ckpt)
    summary = run_training(load_config(None, [*common, "train.max_steps=4"]), None)
    assert summary["gpu_hours"] == pytest.approx(1.0 + 8.0 * summary["wall_seconds"] / 3600.0)


def test_a_synthetic_data_run_says_it_decodes_nothing_and_is_not_compared(tmp_path, capsys):
    """Its data line said "(cpu decoding)" for random tensors made on the device."""
    cfg = load_config(None, [*TINY_TRAIN, "data.pipeline=synthetic", "data.synthetic_steps=2", "model.num_classes=10",
                             "train.epochs=1", f"run.root={tmp_path}", "run.name=s"])  # fmt: skip
    summary = run_training(cfg, None)  # its logging goes to stderr (init_logging replaces the handlers)
    logged = capsys.readouterr().err
    assert "data: synthetic pipeline (no decoding), " in logged and "cpu decoding" not in logged
    assert summary["completed"] and summary["paper"]["comparable"] is False


def test_skipped_steps_are_said_in_the_log_line_and_on_the_progress_bar(tmp_path, caplog):
    """A window's steps that were not applied (fp16 overflows, non-finite steps) were counted as
    trained without a word; under a progress bar the log line is not printed, so the bar says it."""

    class Bar:
        def set_postfix(self, shown):
            self.shown = shown

    reporter = Reporter(tmp_path, is_main=True, tensorboard=False, progress="log", epochs=1)
    reporter.open()
    record = {"split": "train", "epoch": 1, "step": 10, "steps": 5, "count": 40, "loss": 2.0, "top1": 10.0,
              "top5": 50.0, "images_per_sec": 100.0, "data_wait_share": 0.0, "lr": 0.01,
              "skipped_steps": 2}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="alexnet"):
        reporter.train(record, [])
    assert re.search(r"epoch 1  step 10  .*  2 of 5 skipped$", caplog.text.splitlines()[-1])
    bar = Bar()
    reporter.train({**record, "step": 15}, bar)
    assert bar.shown["skipped"] == "2/5"
    reporter.train({**record, "step": 20, "skipped_steps": 0}, bar)
    assert "skipped" not in bar.shown
    reporter.close()


def test_a_progress_bar_without_tqdm_falls_back_to_log_lines(tmp_path, monkeypatch, caplog):
    """tqdm was imported at the first step, by rank 0 alone: a broken install failed it there,
    with the other ranks in the step's collectives."""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    reporter = Reporter(tmp_path, is_main=True, tensorboard=False, progress="bar", epochs=1)
    reporter.open()
    assert not reporter.bar and "no progress bar: tqdm cannot be imported" in caplog.text
    batches = [1, 2]
    assert reporter.wrap_epoch(batches, 0) is batches


def test_the_best_validation_is_the_highest_top1_and_a_tie_goes_to_the_higher_top5():
    """A tie of top-1 kept the first validation's top-5: 46% / 82% reported where a later
    validation had 46% / 94%."""
    from alexnet.resume import Progress

    p = Progress()
    for epoch, (top1, top5) in enumerate(((40.0, 90.0), (46.0, 82.0), (46.0, 94.0), (44.0, 99.0), (46.0, 90.0)), 1):
        p.record_validation(top1, top5, loss=2.0, ten_crop=False, epoch=epoch)
    assert (p.best_top1, p.best_top5, p.best_epoch) == (46.0, 94.0, 3)
    assert (p.last_top1, p.last_top5) == (46.0, 90.0)
    p.record_validation(50.0, 95.0, loss=float("nan"), ten_crop=False, epoch=6)  # a diverged model's: NaN logits' class
    assert (p.best_top1, p.best_top5, p.best_epoch, p.last_top1) == (46.0, 94.0, 3, 50.0)


def test_the_best_validation_keeps_whether_it_averaged_ten_crops():
    """A run validated on the centre crop and resumed with data.val_ten_crop=true labelled its best
    figure, a centre crop's, as ten crops averaged (the session's setting)."""
    from alexnet.resume import Progress

    p = Progress()
    assert p.best_ten_crop is None
    p.record_validation(10.0, 60.0, loss=2.0, ten_crop=False, epoch=1)
    p.record_validation(0.0, 10.0, loss=2.0, ten_crop=True, epoch=2)
    assert (p.best_top1, p.best_ten_crop) == (10.0, False)
    p.record_validation(12.0, 50.0, loss=2.0, ten_crop=True, epoch=3)
    assert (p.best_top1, p.best_ten_crop) == (12.0, True)


def test_the_comparison_says_whether_ten_crops_were_averaged_and_needs_the_1000_classes_validated():
    """A run validated with ten crops was told to compare with evaluate.py --ten-crop; a 1000-way
    model validated on 20 classes' images was compared by the trainer (its 1000 class folders) and
    not by evaluate.py (the 20 classes with images)."""
    centre = summarize_run(57.0, 80.0, 60.0, 1280, 1, "cpu", ILSVRC).paper["note"]
    ten = summarize_run(57.0, 80.0, 60.0, 1280, 1, "cpu", ILSVRC, ten_crop=True).paper["note"]
    assert centre.endswith("compare with launch/evaluate.py --ten-crop") and "ten crops averaged" not in centre
    assert ten.endswith("ten crops averaged, as the paper's figures (section 4.1)") and "evaluate.py" not in ten
    classes = [f"n{i:08d}" for i in range(1000)]
    val = FileIndex([f"{c}/a.jpg" for c in classes[:20]], list(range(20)), classes)
    splits = DataSplits(FileIndex([], [], classes), val, classes)
    assert len(splits.validated_classes) == 20
    assert paper_comparison(57.0, 80.0, splits.validated_classes)["comparable"] is False
    everything = FileIndex([f"{c}/a.jpg" for c in classes] * 2, list(range(1000)) * 2, classes)
    assert DataSplits(None, everything, classes).validated_classes == classes
    # 1000 classes, all validated, but not ILSVRC-2012's: "top-1 error 99.90% vs the paper's 40.7%" before
    other = paper_comparison(0.1, 0.5, classes)
    assert other["comparable"] is False and other["top1_error_gap"] is None
    assert other["note"].endswith(
        "this data's 1000 class folders are not theirs (named by their WordNet ids, n01440764 ...)"
    )
    assert paper_comparison(0.1, 0.5, list(reversed(ILSVRC)))["comparable"] is True  # a set: order is not asked


def test_the_learning_rate_is_drawn_over_the_window_that_used_it(tmp_path):
    """A train record's lr is the rate of its window's last step: the drop logged at step 60
    (steps 51-60) is drawn from step 50 on, not from 60 (a window late)."""
    fig = build_training_figure(write_metrics(tmp_path / "metrics.jsonl"), "run")
    xs, ys = fig.axes[2].get_lines()[0].get_path().vertices.T
    assert [y for x, y in zip(xs, ys) if 50 < x < 60] == [] and ys[list(xs).index(50) + 1] == pytest.approx(0.001)
    assert all(y == pytest.approx(0.01) for x, y in zip(xs, ys) if x < 50)
    fig.clf()


def test_a_diverging_run_s_losses_say_what_is_not_drawn_and_a_huge_one_gets_a_log_axis():
    records = [{"split": "train", "step": s, "loss": v, "lr": 0.1} for s, v in ((1, 6.9), (2, 7e14), (3, None))]
    records.append({"split": "val", "step": 3, "loss": float("nan"), "top1": 10.0, "top5": 50.0})
    fig = build_training_figure(records, "run")
    loss = fig.axes[0]
    assert [t.get_text() for t in loss.texts] == ["2 of 4 records have no finite loss (not drawn)"]
    assert loss.get_yscale() == "log" and lines_by_label(loss)["train loss"] == ([1, 2], [6.9, 7e14])
    fig.clf()
    calm = build_training_figure(write_metrics_records(), "run")
    assert calm.axes[0].get_yscale() == "linear" and not calm.axes[0].texts
    calm.clf()


def test_a_slow_run_s_images_per_second_is_not_rounded_to_0(caplog):
    with caplog.at_level(logging.INFO, logger="alexnet"):
        assert "0.22 images/s" in format_summary(summarize_run(None, None, 72.0, 16, 1, "cpu", TEN))
        assert "139 images/s" in format_summary(summarize_run(None, None, 7200.0, 1_000_000, 1, "cpu", TEN))


def test_plot_run_draws_a_run_s_curves_and_replaces_only_a_png(tmp_path, capsys):
    """launch/plot_run.py: the curves of a run still training or killed before its session's end
    (no other way to draw them than Python)."""
    sys.path.insert(0, str(REPO / "launch"))
    from plot_run import main

    run = tmp_path / "run"
    run.mkdir()
    write_metrics(run / "metrics.jsonl")
    assert main([str(run)]) == 0 and f"written to {run / PLOT_FILE}" in capsys.readouterr().out
    with Image.open(run / PLOT_FILE) as img:
        assert img.size == (1200, 800) and len(img.getcolors(maxcolors=1_000_000)) > 50
    assert main([str(run)]) == 0  # an earlier plot is replaced
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no staged file left

    metrics = (run / "metrics.jsonl").read_bytes()
    assert main([str(run), "--out", str(run / "metrics.jsonl")]) == 2
    assert "the plot is a PNG image; name a .png file or a folder" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == metrics
    (run / "notes.png").write_text("not an image")
    assert main([str(run), "--out", str(run / "notes.png")]) == 2
    assert "exists and is no PNG image" in capsys.readouterr().err
    assert (run / "notes.png").read_text() == "not an image"
    assert main([str(tmp_path)]) == 1
    assert f"{tmp_path / 'metrics.jsonl'}: no such file" in capsys.readouterr().err
    assert main([str(run / "metrics.jsonl")]) == 2  # the file, not its folder
    assert "metrics.jsonl is a file: name the run folder" in capsys.readouterr().err
    (run / "cut.png").write_bytes(b"\x89PNG")  # an interrupted write of an earlier plot is replaced
    assert main([str(run), "--out", str(run / "cut.png")]) == 0
    # A folder, as evaluate.py's and export.py's --out take one: a new one ending in / was a PNG file
    # named after it, an existing one refused; another name than .png held PNG data all the same.
    capsys.readouterr()
    assert main([str(run), "--out", f"{tmp_path / 'plots'}/"]) == 0
    assert f"written to {tmp_path / 'plots' / PLOT_FILE}" in capsys.readouterr().out
    assert main([str(run), "--out", str(tmp_path / "plots")]) == 0  # existing now
    assert (tmp_path / "plots" / PLOT_FILE).read_bytes().startswith(b"\x89PNG")
    assert main([str(run), "--out", str(tmp_path / "curves.jpg")]) == 2
    assert "--out " + str(tmp_path / "curves.jpg") + ": the plot is a PNG image; name a .png file or a folder" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "curves.jpg").exists()
    if os.path.isdir("/proc") and os.access("/proc", os.W_OK):  # root: the bits allow it; no file can be made
        assert main(["/proc/run"]) == 2  # a run folder on a read-only mount: its default place is named as such
        said = capsys.readouterr().err
        assert said.startswith("error: the default output /proc/run/training_curves.png (--out for another): "), said


def test_a_record_whose_step_is_no_number_is_not_drawn_and_a_plot_never_raises(tmp_path, caplog, monkeypatch):
    """On the way out of a failed session the plot's own error (a TypeError from sorting a step
    written as text) replaced the session's."""
    records = write_metrics_records()
    records[3]["step"] = "40"
    fig = build_training_figure(records, "run")
    assert lines_by_label(fig.axes[0])["train loss"][0] == [10, 20, 30, 50, 60, 70, 80, 90, 100]
    fig.clf()
    write_metrics(tmp_path / "metrics.jsonl")

    def broken(*_):
        raise TypeError("'<' not supported between instances of 'str' and 'int'")

    monkeypatch.setattr("alexnet.report.build_training_figure", broken)
    with caplog.at_level(logging.WARNING, logger="alexnet"):
        assert draw_run_curves(tmp_path) is None
    assert f"could not draw {tmp_path / PLOT_FILE}: '<' not supported" in caplog.text


@pytest.mark.dali
@pytest.mark.slow
def test_the_progress_bar_of_a_resumed_epoch_counts_its_steps_taken_before(tiny_data, tmp_path):
    """Resumed at step 3 of an epoch, the bar counted from 0 against the whole epoch's steps, and
    the epoch ended at "N-3/N"."""
    from _helpers import check, train_tiny

    check(train_tiny(tiny_data, tmp_path, "bar", "train.max_steps=3", "train.epochs=1", nproc=1))
    proc = check(train_tiny(tiny_data, tmp_path, "bar", "train.epochs=1", "run.progress=bar", nproc=1))
    counts = [(int(n), int(total)) for n, total in re.findall(r"epoch 1/1:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", proc.stderr)]
    assert counts and counts[0] == (3, 15), proc.stderr[-2000:]  # 0/15 before
    # tqdm redraws at most every 0.1 s and clears the bar at the epoch's end, so the last count
    # drawn depends on the machine's load (11/15 once in CI): only its order and total are fixed.
    assert [n for n, _ in counts] == sorted(n for n, _ in counts) and {t for _, t in counts} == {15}


def test_drawing_the_curves_leaves_the_caller_s_matplotlib_as_it_was(tmp_path):
    """matplotlib.use("Agg") switched a notebook's backend (its inline plots stopped showing), and
    pyplot kept each figure until closed: the figures are now matplotlib.figure.Figure objects of
    their own."""
    import matplotlib

    kept = matplotlib.get_backend()
    matplotlib.use("svg")  # stands in for a notebook's inline backend
    try:
        write_metrics(tmp_path / "metrics.jsonl")
        png = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
        assert png.read_bytes().startswith(b"\x89PNG") and matplotlib.get_backend() == "svg"
        if "matplotlib.pyplot" in sys.modules:
            assert sys.modules["matplotlib.pyplot"].get_fignums() == []
    finally:
        matplotlib.use(kept)
