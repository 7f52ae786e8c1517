"""The benchmark's own logic: interleaving, medians, the report schema, efficiency arithmetic,
the step split, FLOP counting, the ImageNet-like generator, and each command end to end at tiny
sizes (CPU). No wall-clock thresholds: only structure and arithmetic are asserted."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from _helpers import REPO, check, launch, loader_failing_on_rank_1, rank_1_differs, rank_1_sees, without_dali
from PIL import Image
from torch import nn

from alexnet.bench import output, sweep, timing
from alexnet.bench.envinfo import usable_cores
from alexnet.bench.flops import count_train_flops, mfu, peak_flops
from alexnet.bench.timing import Schedule, Window
from alexnet.bench.training import comm_bytes, step_split

sys.path.insert(0, str(REPO / "launch"))
import benchmark  # noqa: E402

BENCH = REPO / "launch" / "benchmark.py"


class FakeContender:
    def __init__(self, name: str, log: list[str], rate: float) -> None:
        self.name, self.log, self.rate = name, log, rate
        self.turns = 0

    def run_window(self) -> Window:
        self.turns += 1
        self.log.append(self.name)
        return Window(images=int(self.rate * self.turns), seconds=1.0)


# ---- timing -------------------------------------------------------------------------------
def test_turns_interleave_and_warmup_is_dropped():
    log: list[str] = []
    a, b = FakeContender("A", log, 10), FakeContender("B", log, 20)
    settled: list[int] = []
    timed = timing.run_interleaved([a, b], Schedule(warmup=2, windows=3), between=lambda: settled.append(1))
    assert log == ["A", "B"] * 5
    assert len(settled) == 10  # the machine settles before every turn
    # the warm-up rounds (turns 1, 2) are dropped; the rest keep their round order
    assert [w.images for w in timed["A"]] == [30, 40, 50]
    assert [w.images for w in timed["B"]] == [60, 80, 100]
    assert timing.interleaved_order(["A", "B"], Schedule(1, 1)) == [(0, "A"), (0, "B"), (1, "A"), (1, "B")]


def test_median_min_max_and_paired_ratio():
    stats = timing.summarize([5.0, 1.0, 3.0, 100.0])
    assert (stats.median, stats.min, stats.max, stats.n) == (4.0, 1.0, 100.0, 4)
    a = [Window(200, 1.0), Window(100, 1.0), Window(300, 1.0)]
    b = [Window(100, 1.0), Window(50, 1.0), Window(100, 1.0)]  # the machine slowed in round 2
    ratio = timing.paired_ratio(a, b)
    assert (ratio.median, ratio.min, ratio.max) == (2.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="same rounds"):
        timing.paired_ratio(a, b[:2])


def test_schedule_and_names_are_checked():
    with pytest.raises(ValueError, match="--windows"):
        Schedule(1, 0)
    with pytest.raises(ValueError, match="unique"):
        timing.run_interleaved([FakeContender("A", [], 1), FakeContender("A", [], 1)], Schedule(0, 1))


def test_cpu_seconds_of_the_process_tree_grow():
    before = timing.tree_cpu_seconds()
    sum(i * i for i in range(2_000_000))
    assert timing.tree_cpu_seconds() > before


class FakeClock:
    """A clock that moves only when slept on, and a process tree that uses `busy` cores meanwhile."""

    def __init__(self, busy: list[float]) -> None:
        self.now, self.cpu, self.busy = 0.0, 0.0, busy

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.cpu += seconds * (self.busy.pop(0) if len(self.busy) > 1 else self.busy[0])
        self.now += seconds


@pytest.mark.parametrize(
    "busy, waited",
    [([1.0], 0.5), ([0.0], 0.125), ([0.19], 0.125), ([0.21], 0.5), ([1.0, 1.0, 0.1], 0.375)],
)
def test_wait_until_idle_waits_out_a_busy_process_and_not_an_idle_one(monkeypatch, busy, waited):
    """Busy (more than 20% of a core per interval) until the timeout, or idle after some intervals:
    the seconds waited, on a fake clock (no wall-clock threshold)."""
    clock = FakeClock(busy)
    monkeypatch.setattr(timing, "time", clock)
    monkeypatch.setattr(timing, "tree_cpu_seconds", lambda: clock.cpu)
    assert timing.wait_until_idle(interval_s=0.125, timeout_s=0.5) == waited  # binary fractions: exact


# ---- the step split and bytes -------------------------------------------------------------
def test_step_split_adds_up_to_the_step():
    extra = {"full_s": 1.0, "data_wait_s": 0.1, "nosync_s": 0.7, "nosync_data_wait_s": 0.1, "exchange_s": 0.2,
             "grad_blocking_s": 0.05, "breakdown": 1.0, "ddp": 1.0, "steps": 3.0,
             "payload.grad_allreduce": 4e6, "sent.grad_allreduce": 2e6}  # fmt: skip
    split = step_split([Window(10, 3.0, extra)])
    assert split["grad_comm_s"] == pytest.approx(0.9 - 0.6 + 0.05)
    assert split["compute_s"] == pytest.approx(0.6 - 0.2 - 0.05)
    parts = split["data_wait_s"] + split["compute_s"] + split["grad_comm_s"] + split["exchange_s"]
    assert parts == pytest.approx(split["step_s"])
    no_ddp = step_split([Window(10, 3.0, {**extra, "ddp": 0.0})])  # towers of one replica: no all-reduce
    assert no_ddp["grad_comm_s"] == pytest.approx(0.05) and no_ddp["exchange_s"] == pytest.approx(0.2)
    single = step_split([Window(10, 3.0, {"full_s": 1.0, "data_wait_s": 0.25, "breakdown": 0.0})])
    assert single["compute_s"] == 0.75 and single["grad_comm_s"] == 0.0
    unmeasured = step_split([Window(10, 3.0, {"full_s": 1.0, "data_wait_s": 0.25, "breakdown": 0.0})], world_size=2)
    assert unmeasured["data_wait_s"] == 0.25 and unmeasured["compute_s"] is None  # --no-breakdown on 2 ranks
    assert unmeasured["grad_comm_s"] is None and unmeasured["exchange_s"] is None
    bytes_ = comm_bytes([Window(10, 3.0, extra)])
    assert bytes_["payload"] == {"grad_allreduce": 4e6} and bytes_["sent_total"] == 2e6


# ---- efficiency ---------------------------------------------------------------------------
def test_scaling_efficiency_arithmetic():
    results = [
        {"nproc": 1, "name": "dp/paper", "mode": "dp", "variant": "paper", "images_per_sec": 100.0},
        {"nproc": 2, "name": "dp/paper", "mode": "dp", "variant": "paper", "images_per_sec": 180.0},
        {"nproc": 4, "name": "dp/paper", "mode": "dp", "variant": "paper", "images_per_sec": 300.0},
        {"nproc": 2, "name": "towers/paper", "mode": "towers", "variant": "paper", "images_per_sec": 150.0},
        {"nproc": 2, "name": "dp/torchvision", "mode": "dp", "variant": "torchvision", "images_per_sec": 50.0},
    ]
    sweep.add_efficiency(results)
    eff = {(r["nproc"], r["name"]): r["scaling_efficiency"] for r in results}
    assert eff[(1, "dp/paper")] == pytest.approx(1.0)
    assert eff[(2, "dp/paper")] == pytest.approx(0.9)
    assert eff[(4, "dp/paper")] == pytest.approx(0.75)
    assert eff[(2, "towers/paper")] == pytest.approx(0.75)  # against one process of dp/paper
    assert results[3]["baseline"] == "dp/paper"
    assert eff[(2, "dp/torchvision")] is None  # no one-process run of that variant


def test_sweep_settings_and_commands_are_argument_lists(tmp_path):
    s = sweep.SweepSettings((1, 2), "step", ("--modes", "dp"), BENCH, tmp_path)
    cmd = sweep.point_command(s, 2, tmp_path / "p2")
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[-2:] == ["--modes", "dp"]
    env_without = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with mock.patch.dict(os.environ, env_without, clear=True):
        assert sweep.point_env(2, cuda=False)["OMP_NUM_THREADS"] == str(max(1, usable_cores() // 2))
        assert "OMP_NUM_THREADS" not in sweep.point_env(2, cuda=True)  # GPU ranks keep torch's default
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "7"}):
        assert sweep.point_env(2, cuda=False)["OMP_NUM_THREADS"] == "7"  # the user's setting wins
    with pytest.raises(ValueError, match="--nproc"):
        sweep.SweepSettings((0,), "step", (), BENCH, tmp_path)
    for given in (("--out", "x"), ("--out=x",), ("--ou", "x"), ("--o=x",)):  # argparse's abbreviations too
        with pytest.raises(sweep.BenchSettingsError, match="--out is set by the sweep"):
            sweep.SweepSettings((1,), "step", given, BENCH, tmp_path)
    sweep.SweepSettings((1,), "step", ("--", "--modes", "dp"), BENCH, tmp_path)  # "--" itself is no --out
    args = benchmark.parse_args(["sweep", "--nproc", "1,2,4", "--", "--modes", "dp", "data.batch_size=8"])
    assert args.nproc == [1, 2, 4] and args.args[-3:] == ["--modes", "dp", "data.batch_size=8"]


# torchrun's report of a failed worker: 2,000+ characters, and a line `error_file:` that is no error
CHILD_FAILED = (
    "Traceback (most recent call last):\n"
    + '  File "run.py", line 1142\n' * 80
    + "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n  error_file: <N/A>\n"
)


def test_a_failed_point_reports_its_own_error_lines_not_torchrun_s_traceback():
    """argparse's `benchmark.py step: error: ...` was lost: only the traceback's tail was kept."""
    usage = "usage: benchmark.py [-h] {pipeline,step,e2e,sweep,merge} ...\n"
    argparse_form = usage + "benchmark.py: error: unrecognized arguments: --bogus\n" + CHILD_FAILED
    assert sweep.failure_text(argparse_form) == "benchmark.py: error: unrecognized arguments: --bogus"
    subcommand = "benchmark.py step: error: argument --steps: invalid int value: 'x'\n" + CHILD_FAILED
    assert sweep.failure_text(subcommand) == "benchmark.py step: error: argument --steps: invalid int value: 'x'"
    two_ranks = "error: --modes: unknown layout\n" * 2 + CHILD_FAILED  # print_error's form, once per rank
    assert sweep.failure_text(two_ranks) == "error: --modes: unknown layout"
    assert sweep.failure_text(CHILD_FAILED, tail=40) == CHILD_FAILED.strip()[-40:]  # nothing better: the tail


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_sweep_timeout_must_be_a_positive_number_of_seconds(value, capsys):
    """--timeout 0 ended every point at once with "no result within --timeout 0 s"."""
    with pytest.raises(SystemExit) as exc:
        benchmark.parse_args(["sweep", "--timeout", value])
    assert exc.value.code == 2
    assert f"argument --timeout: must be a positive number of seconds, got {value}\n" in capsys.readouterr().err
    assert benchmark.parse_args(["sweep", "--timeout", "30"]).timeout == 30.0


@pytest.mark.parametrize("command", ["step", "e2e"])
def test_step_and_e2e_take_overrides_on_both_sides_of_their_options(command):
    """`step a=1 --windows 1 b=2` stopped at "unrecognized arguments: b=2"; launch/train.py takes both."""
    args = benchmark.parse_args([command, "a.x=1", "--windows", "1", "b.y=2", "--steps", "2", "a.x=3"])
    assert args.overrides == ["a.x=1", "b.y=2", "a.x=3"]  # in order: the last one wins, as in train.py
    assert (args.windows, args.steps) == (1, 2)
    assert benchmark.parse_args([command, "--windows", "1", "a.x=1"]).overrides == ["a.x=1"]


@pytest.mark.parametrize(
    "argv, named",
    [
        (["step", "a.x=1", "--windows", "1", "junk"], "junk"),  # not key=value
        (["step", "a.x=1", "--bogus"], "--bogus"),
        (["pipeline", "a.x=1"], "a.x=1"),  # pipeline takes no overrides
    ],
)
def test_words_that_are_no_override_are_still_refused(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.parse_args(argv)
    assert exc.value.code == 2
    assert f"error: unrecognized arguments: {named}\n" in capsys.readouterr().err


# ---- the report: JSON schema, CSV, table, PNG ---------------------------------------------
def _report(command="pipeline") -> output.Report:
    results = [
        {"name": "a", "images_per_sec": 10.0, "images_per_sec_min": 9.0, "images_per_sec_max": 12.0,
         "split_share": {"compute": 0.9}, "window_images_per_sec": [9.0, 10.0, 12.0]},
        {"name": "b", "images_per_sec": 5.0, "nested": {"x": {"y": 1}}},
    ]  # fmt: skip
    env = {k: None for k in output.REQUIRED_ENVIRONMENT}
    return output.Report(command, results, env, {"batch": 4}, {"a/b": {"median": 2.0, "min": 1.5, "max": 2.5}})


def test_json_schema_csv_png_written(tmp_path):
    written = output.write_outputs(_report(), tmp_path, plot=True)
    assert sorted(p.name for p in written) == ["pipeline.csv", "pipeline.json", "pipeline.png"]
    data = output.load_report(tmp_path / "pipeline.json")
    assert data["schema"] == output.SCHEMA and [r["name"] for r in data["results"]] == ["a", "b"]
    with open(tmp_path / "pipeline.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["split_share.compute"] == "0.9" and rows[1]["nested.x.y"] == "1"
    assert json.loads(rows[0]["window_images_per_sec"]) == [9.0, 10.0, 12.0]
    assert (tmp_path / "pipeline.png").read_bytes()[:4] == b"\x89PNG"
    table = output.format_table(data["results"], [output.Column("name", "name"), output.Column("x", "x")])
    assert table.splitlines()[2].split() == ["a", "-"]
    assert "a/b = 2.000" in output.format_ratios(data["summary"])


def test_schema_violations_name_the_key(tmp_path):
    data = _report().to_dict()
    del data["results"][1]["images_per_sec"]
    with pytest.raises(output.ReportError, match=r"results\[1\] has no 'images_per_sec'"):
        output.validate_report(data)
    data = _report().to_dict()
    del data["environment"]["nccl"]
    with pytest.raises(output.ReportError, match="'nccl'"):
        output.validate_report(data)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(output.ReportError, match="bad.json"):
        output.load_report(tmp_path / "bad.json")


def test_scaling_plot_and_merge(tmp_path):
    results = [{"nproc": p, "name": "dp/paper", "images_per_sec": 90.0 * p, "baseline_per_proc": 100.0} for p in (1, 2)]
    png = output.plot_scaling(results, tmp_path / "s.png", "scaling")
    assert png.read_bytes()[:4] == b"\x89PNG"
    for folder, autotuned in (("e2e_bf16", False), ("e2e_fp16", True)):
        report = _report("e2e")
        report.environment["cudnn_benchmark"] = autotuned
        output.write_json(report, tmp_path / folder / "e2e.json")
    merged = output.merge_reports([tmp_path / "e2e_bf16" / "e2e.json", tmp_path / "e2e_fp16" / "e2e.json"],
                                  {"gpu_tests": "ok"})  # fmt: skip
    assert {r["source"] for r in merged.results} == {"e2e_bf16/e2e", "e2e_fp16/e2e"}
    assert merged.environment["cudnn_benchmark"] is False  # the first report's
    assert merged.environment["differs_by_source"] == {"e2e_fp16/e2e": {"cudnn_benchmark": True}}
    assert merged.summary["checks"] == {"gpu_tests": "ok"}
    output.validate_report(merged.to_dict())


def test_merge_refuses_to_overwrite_an_input_or_write_outside_out(tmp_path, capsys, monkeypatch):
    """--name pipeline --out <its folder> replaced the report being merged; --name ../x left --out."""
    written = output.write_outputs(_report(), tmp_path / "bench")
    before = {p: p.read_bytes() for p in written}
    monkeypatch.chdir(tmp_path)
    for out in (tmp_path / "bench", Path("bench"), Path("bench/../bench")):  # the same file, however named
        assert benchmark.main(["merge", str(written[0]), "--name", "pipeline", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pipeline.json is one of the reports to merge" in err
    for name in ("../../escaped", "../escaped", "sub/x", "", "..", "."):
        assert benchmark.main(["merge", str(written[0]), "--name", name, "--out", str(tmp_path / "bm")]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --name {name!r}: expected a plain file name (no path separator, not '..' or empty)\n"
    assert {p: p.read_bytes() for p in written} == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bench", "pipeline.csv", "pipeline.json"]  # nothing new
    assert benchmark.main(["merge", str(written[0]), "--name", "pipeline", "--out", str(tmp_path / "bm")]) == 0
    assert output.load_report(tmp_path / "bm" / "pipeline.json")["command"] == "merge"
    # An earlier report is replaced (above, again here); another file is not: `--name summary --out
    # runs/demo` replaced the run's summary.json.
    assert benchmark.main(["merge", str(written[0]), "--name", "pipeline", "--out", str(tmp_path / "bm")]) == 0
    (tmp_path / "bm" / "summary.json").write_text('{"best_top1": 50.0}\n')
    assert benchmark.main(["merge", str(written[0]), "--name", "summary", "--out", str(tmp_path / "bm")]) == 2
    assert "error: --name summary: the file exists and is not an earlier result" in capsys.readouterr().err
    assert (tmp_path / "bm" / "summary.json").read_text() == '{"best_top1": 50.0}\n'


def test_an_out_folder_that_cannot_be_written_and_a_torchrun_of_a_one_process_command_are_refused_at_once(
    tmp_path, capsys, monkeypatch
):
    """A read-only --out that exists was found only when the report was written, after the whole
    measurement (and named the hidden staging file); under torchrun each worker ran its own
    pipeline benchmark, competing for the cores and writing one report."""
    import pipelines.outputs

    monkeypatch.setattr(pipelines.outputs, "_can_create_in", lambda folder: False)  # a read-only mount (root)
    (tmp_path / "ro").mkdir()
    assert benchmark.main(["pipeline", "--out", str(tmp_path / "ro")]) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'ro'}: {tmp_path / 'ro'} is not a writable folder\n"
    monkeypatch.undo()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in ("pipeline", "sweep"):
        assert benchmark.main([command, "--out", str(tmp_path / "x")]) == 2
        assert capsys.readouterr().err == (
            f"error: benchmark {command} runs in one process: python launch/benchmark.py {command} ...\n"
        )
    assert not (tmp_path / "x").exists()


# ---- FLOPs and MFU ------------------------------------------------------------------------
def test_grouped_convolutions_are_counted_once():
    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3, groups=2)

        def forward(self, x):
            return self.conv(x)

    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 8, 3), nn.Conv2d(4, 8, 3)

        def forward(self, x):
            return torch.cat([self.a(x[:, :4]), self.b(x[:, 4:])], 1)

    grouped = count_train_flops(Grouped(), 2, 10, channels=8)
    assert grouped == count_train_flops(Split(), 2, 10, channels=8)
    # forward: 2 * N * Cout * H'W' * (Cin / groups) * k * k; the weight gradient as much again; the
    # input needs no gradient
    assert grouped == 2 * (2 * 2 * 16 * 8 * 8 * 4 * 9)


def test_peak_table_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert peak_flops("NVIDIA H200", "fp16") == pytest.approx(989.4e12)
    assert peak_flops("AMD EPYC", "fp32") is None
    # The key as a word of the name: "L4" in "NVIDIA L40", "B200" in "NVIDIA GB200" took those cards'.
    assert peak_flops("NVIDIA L40", "bf16") == pytest.approx(181e12)
    assert peak_flops("NVIDIA L4", "bf16") == pytest.approx(121e12)
    assert peak_flops("NVIDIA GB200", "bf16") == pytest.approx(2500e12)
    assert peak_flops("NVIDIA H200 NVL", "bf16") == pytest.approx(835e12)
    assert peak_flops("NVIDIA A10G", "fp32") == pytest.approx(31.2e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312e12)
    assert mfu(1e12, 0.5, 2, 1e12) == pytest.approx(1.0)
    assert mfu(1e12, 0.5, 2, None) is None


# ---- the ImageNet-like generator ----------------------------------------------------------
def test_imagenet_like_files_layout_determinism_and_size(tmp_path):
    from pipelines.imagenet_like import ImageNetLikeSpec, ensure_imagenet_like, measure_mean_kb

    spec = ImageNetLikeSpec(classes=2, train_per_class=3, val_per_class=1)
    root = ensure_imagenet_like(tmp_path / "a", spec, workers=1)
    files = sorted((root / "train").glob("*/*.JPEG"))
    assert len(files) == 6 and len(list((root / "val").glob("*/*.JPEG"))) == 2
    assert sorted(p.name for p in (root / "train").iterdir()) == ["n00000000", "n00000001"]
    for f in files:
        with Image.open(f) as img:
            w, h = img.size
            assert img.format == "JPEG" and max(w, h) == 500 and 335 <= min(w, h) <= 415
    other = ensure_imagenet_like(tmp_path / "b", spec, workers=2)  # parallel: the same bytes
    assert [f.read_bytes() for f in files] == [other.joinpath(f.relative_to(root)).read_bytes() for f in files]
    # calibrated to ILSVRC-2012 train's mean file size, about 110 KB
    assert 80 < measure_mean_kb(ImageNetLikeSpec(), samples=6) < 145


# ---- the commands end to end, tiny --------------------------------------------------------
@pytest.mark.dali
def test_a_report_that_cannot_be_written_is_one_line_after_the_table(tiny_data, tmp_path, capsys):
    """Written after the measurement: the figures stay on screen and the last report stays whole."""
    (tmp_path / "pipeline.json").mkdir()
    argv = ["pipeline", "--data", str(tiny_data), "--pipelines", "dali-cpu", "--no-ceiling", "--batch-size", "4",
            "--threads", "1", "--prefetch", "1", "--resize", "40", "--crop", "32", "--batches", "1",
            "--min-window", "0", "--windows", "1", "--warmup", "0", "--cpu", "--out", str(tmp_path)]  # fmt: skip
    assert benchmark.main(argv) == 1
    out, err = capsys.readouterr()
    assert "dali-cpu" in out and "images/s" in out
    assert f"error: cannot write {tmp_path / 'pipeline.json'}: Is a directory (the table above holds" in err
    assert not list(tmp_path.glob(".pipeline.json.tmp*"))


@pytest.mark.dali
def test_pipeline_command_writes_all_outputs(tiny_data, tmp_path, capsys):
    argv = ["pipeline", "--data", str(tiny_data), "--batch-size", "4", "--threads", "1", "--prefetch", "1",
            "--resize", "40", "--crop", "32", "--batches", "2", "--min-window", "0", "--windows", "2",
            "--warmup", "1", "--cpu", "--stages", "--out", str(tmp_path), "--plot"]  # fmt: skip
    assert benchmark.main(argv) == 0
    data = output.load_report(tmp_path / "pipeline.json")
    names = [r["name"] for r in data["results"]]
    stages = ["stage/dali-cpu/window-decode", "stage/dali-cpu/window-decode+resize",
              "stage/dali-cpu/window-decode+resize+mirror", "stage/dali-cpu/window-decode+resize+fp16",
              "stage/dali-cpu/window-decode+torch-resize"]  # fmt: skip
    assert names == ["dali-cpu", "torchvision", *stages, "decode-only/dali-cpu", "decode-only/pil"]
    by_name = {r["name"]: r for r in data["results"]}
    assert all(r["windows"] == 2 and r["images_per_sec"] > 0 for r in data["results"])
    for name in ("dali-cpu", *stages):  # each held against DALI's own decode-only ceiling
        assert by_name[name]["ceiling"] == "decode-only/dali-cpu" and by_name[name]["fraction_of_ceiling"] > 0
    assert set(data["summary"]) == {"dali-cpu/torchvision", "dali-cpu/decode-only/dali-cpu",
                                    "torchvision/decode-only/pil",
                                    *(f"{n}/decode-only/dali-cpu" for n in stages)}  # fmt: skip
    assert data["settings"]["files"]["files"] == 120 and data["environment"]["world_size"] == 1
    assert (tmp_path / "pipeline.csv").exists() and (tmp_path / "pipeline.png").exists()
    assert "dali-cpu" in capsys.readouterr().out


@pytest.mark.dali
def test_torch_resize_stage_scales_each_window_as_pil_does():
    from nvidia.dali.tensors import TensorListCPU

    from alexnet.bench.pipeline_bench import resize_windows_with_torch

    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((61, 61), (48, 70), (33, 40))]
    out = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)  # a batch one larger: its last row stays untouched
    resize_windows_with_torch(TensorListCPU(windows, "HWC"), out)
    for i, window in enumerate(windows):  # each window lands in its own row, RGB planes, as PIL scales it
        pil = np.asarray(Image.fromarray(window).resize((32, 32), Image.BILINEAR)).transpose(2, 0, 1)
        assert np.abs(out[i].numpy().astype(int) - pil).max() <= 1
    assert not out[3].any()


@pytest.mark.dali
@pytest.mark.parametrize("layout", ["HWC", "CHW"])
def test_output_stages_mirror_and_normalise_as_the_loader_does(layout):
    """The uint8 stage is each patch or its mirror image, unchanged; the float16 stage is the
    loader's float32 normalization of the patch or its mirror, to float16's precision."""
    from nvidia.dali import fn, pipeline_def

    from alexnet.bench.pipeline_bench import output_stage
    from alexnet.config import IMAGENET_MEAN, IMAGENET_STD
    from pipelines.base import ImageSpec
    from pipelines.dali import mirror_normalize

    image = ImageSpec(8, 9, "paper", tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
    rng = np.random.default_rng(0)
    patches = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(16)]

    @pipeline_def(batch_size=16, num_threads=1, device_id=None, seed=3)
    def graph():
        resized = fn.external_source(source=lambda: patches, layout="HWC", batch=True)
        return (
            output_stage(resized, "window-decode+resize+mirror", image, layout),
            output_stage(resized, "window-decode+resize+fp16", image, layout),
            mirror_normalize(resized, image, layout),
            output_stage(resized, "window-decode+resize", image, layout),
        )

    pipe = graph()
    pipe.build()
    mirrored, half, full, resized = (out.as_array() for out in pipe.run())
    assert mirrored.dtype == np.uint8 and half.dtype == np.float16 and full.dtype == np.float32
    assert np.array_equal(resized, np.stack(patches))  # the resize cut leaves the patch as it is
    mean, std = np.asarray(image.mean, np.float32), np.asarray(image.std, np.float32)

    def as_laid(hwc):
        return hwc if layout == "HWC" else hwc.transpose(2, 0, 1)

    flips = {"mirror": [], "half": []}
    for i, patch in enumerate(patches):
        plain, flipped = as_laid(patch), as_laid(patch[:, ::-1])
        assert np.array_equal(mirrored[i], plain) or np.array_equal(mirrored[i], flipped)
        flips["mirror"].append(np.array_equal(mirrored[i], flipped))
        want = [as_laid((p.astype(np.float32) - mean) / std) for p in (patch, patch[:, ::-1])]
        close = [np.allclose(half[i].astype(np.float32), w, atol=2e-3, rtol=1e-3) for w in want]
        assert any(close)
        flips["half"].append(close[1] and not close[0])
        assert any(np.allclose(full[i], w, atol=1e-5) for w in want)
    assert 0 < sum(flips["mirror"]) < 16 and 0 < sum(flips["half"]) < 16  # the mirror is random, per sample


def test_torch_threads_are_set_for_the_block_and_restored():
    from alexnet.bench.pipeline_bench import torch_threads

    before = torch.get_num_threads()
    with pytest.raises(KeyError), torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
        raise KeyError("a failure inside the block")
    assert torch.get_num_threads() == before


def test_pipelines_named_keep_their_ceilings_and_the_diagnostics_asked_for():
    """`--pipelines dali-cpu --stages --graph-only` timed dali-cpu alone: no ceiling ("of ceiling"
    empty) and none of the rows the flags ask for, without a word."""
    from alexnet.bench.pipeline_bench import STAGES_OF, chosen_pipelines

    stages = STAGES_OF["dali-cpu"]
    named = chosen_pipelines(("dali-cpu",), False, ceilings=True, graph_only=True, stages=True)
    assert named == ("dali-cpu", "graph-only/dali-cpu", *stages, "decode-only/dali-cpu")
    assert chosen_pipelines(("dali-cpu",), False, ceilings=False) == ("dali-cpu",)
    assert chosen_pipelines(("torchvision", "dali-cpu"), False, ceilings=True) == (
        "torchvision", "dali-cpu", "decode-only/pil", "decode-only/dali-cpu"
    )  # fmt: skip
    rows = ("graph-only/dali-cpu", stages[1], "decode-only/dali-cpu")  # rows by name: as named, once each
    assert chosen_pipelines(rows, False, ceilings=True, graph_only=True, stages=True) == rows
    assert chosen_pipelines((), False, ceilings=True) == ("dali-cpu", "torchvision", "decode-only/dali-cpu",
                                                          "decode-only/pil")  # fmt: skip
    assert chosen_pipelines((), True, ceilings=False)[0] == "dali-mixed"


def test_pipeline_command_names_a_bad_flag(tiny_data, tmp_path, capsys):
    assert benchmark.main(["pipeline", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err
    assert benchmark.main(["pipeline", "--pipelines", "dali-mixed", "--cpu", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    data = ["--data", str(tiny_data), "--pipelines", "dali-cpu", "--cpu", "--out", str(tmp_path)]
    assert benchmark.main(["pipeline", *data, "--resize", "40", "--crop", "41"]) == 2
    assert "--crop must be between 1 and --resize (40), got 41" in capsys.readouterr().err
    assert benchmark.main(["pipeline", *data, "--batch-size", "1000"]) == 2
    err = capsys.readouterr().err  # too little data is not a bad file
    assert "--batch-size 1000" in err and "holds 120 images" in err and "bad ones" not in err


@pytest.fixture
def folder_with_a_cut_file(tiny_data, tmp_path):
    """Eight good JPEGs of tiny_data and one cut in half, in two classes."""
    root = tmp_path / "data"
    for cls in ("circle", "square"):
        (root / "train" / cls).mkdir(parents=True)
        for f in sorted((tiny_data / "train" / cls).iterdir())[:4]:
            (root / "train" / cls / f.name).write_bytes(f.read_bytes())
    data = next((tiny_data / "train" / "circle").iterdir()).read_bytes()
    bad = root / "train" / "circle" / "zz_cut.jpg"
    bad.write_bytes(data[: len(data) // 2])
    return root, bad


def test_pipeline_command_names_a_bad_file_instead_of_a_traceback(folder_with_a_cut_file, tmp_path, capsys):
    root, bad = folder_with_a_cut_file
    bad.write_bytes(bad.read_bytes()[:300])  # cut inside the header: the header sample finds it first
    argv = ["pipeline", "--data", str(root), "--batch-size", "2", "--threads", "1", "--windows", "1",
            "--warmup", "0", "--cpu", "--out", str(tmp_path / "out")]  # fmt: skip
    assert benchmark.main(argv) == 1  # what a file holds: 1, as for train.py (it was 2, a usage error's)
    err = capsys.readouterr().err
    assert f"cannot read the image header of {bad} (" in err and "launch/scan.py" in err
    assert "reads every file under --data" in err and "Traceback" not in err


_CEILING_ON_A_BAD_FILE = """
import sys, torch
from pathlib import Path
from alexnet.bench.pipeline_bench import PipelineSettings, _batches_of
from pipelines.index import DataError, build_file_index
root = Path(sys.argv[1])
index = build_file_index(root / "train")
s = PipelineSettings(data=root, batch_size=64, threads=2, prefetch=1, resize=40, crop=32)
for round in range(8):
    batches, _ = _batches_of("decode-only/dali-cpu", index, s, torch.device("cpu"))
    try:
        for _ in range(4):
            next(batches)
    except DataError as exc:
        print("named" if sys.argv[2] in str(exc) else str(exc))
"""


@pytest.mark.dali
def test_the_decode_only_ceiling_names_a_file_that_is_no_image_instead_of_crashing(tiny_data, tmp_path):
    """The ceiling decoded without the header check of the loaders' graphs: a file of random bytes
    among 64 made DALI 2.4 die of SIGSEGV, printing nothing, in about half the tries (the loader's
    own ceiling runs by default)."""
    root = tmp_path / "data"
    (root / "train" / "circle").mkdir(parents=True)
    good = sorted((tiny_data / "train" / "circle").iterdir())
    for i in range(63):
        (root / "train" / "circle" / f"{i:02d}.jpg").write_bytes(good[i % len(good)].read_bytes())
    bad = root / "train" / "circle" / "00_bad.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    proc = subprocess.run([sys.executable, "-c", _CEILING_ON_A_BAD_FILE, str(root), str(bad)], capture_output=True,
                          text=True, cwd=REPO, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "named\n" * 8, (proc.returncode, proc.stdout, proc.stderr[-3000:])


@pytest.mark.dali
def test_every_decoding_contender_names_a_file_it_cannot_decode(folder_with_a_cut_file):
    """The ceilings and stages run their own DALI graphs and PIL workers: a bad file met there is
    named as the loaders name it, in one line."""
    from alexnet.bench.pipeline_bench import PipelineSettings, _batches_of
    from pipelines.index import DataError, build_file_index

    root, bad = folder_with_a_cut_file
    index = build_file_index(root / "train")
    s = PipelineSettings(data=root, batch_size=3, threads=1, prefetch=1, resize=40, crop=32)
    # PIL last: its workers are forked while the failed DALI pipelines wait for collection
    # (pipelines/workers.py)
    for name in ("decode-only/dali-cpu", "stage/dali-cpu/window-decode+torch-resize", "decode-only/pil"):
        batches, _ = _batches_of(name, index, s, torch.device("cpu"))
        with pytest.raises(DataError) as info:
            for _ in range(2 * len(index)):  # well past one epoch
                next(batches)
        message = str(info.value)
        assert str(bad) in message and "launch/scan.py" in message and "\n" not in message, (name, message)


@pytest.mark.dali
def test_e2e_command_names_a_bad_file_and_says_the_benchmark_stopped(
    folder_with_a_cut_file, tiny_data, tmp_path, capsys
):
    root, bad = folder_with_a_cut_file
    for cls in ("circle", "square"):  # training's splits need a val folder; the benchmark reads train
        shutil.copytree(tiny_data / "val" / cls, root / "val" / cls)
    argv = ["e2e", "--data", str(root), "--pipelines", "dali", "--no-synthetic", "--windows", "1", "--warmup", "0",
            "--steps", "4", "--out", str(tmp_path / "out"), "data.batch_size=3", "data.num_threads=1",
            "data.prefetch=1", "data.crop=67", "data.resize=76", "run.progress=log"]  # fmt: skip
    assert benchmark.main(argv) == 1
    err = capsys.readouterr().err
    assert f"cannot decode {bad}" in err and "The e2e benchmark stopped." in err
    assert "checkpoint" not in err  # training's wording does not apply to a benchmark
    assert not (tmp_path / "out" / "e2e.json").exists()


def test_e2e_refuses_a_data_root_override_that_contradicts_data(tiny_data, tmp_path, capsys):
    """`e2e --data A data.root=B` measured B without a word."""
    other = tmp_path / "other"
    argv = ["e2e", "--data", str(tiny_data), "--out", str(tmp_path / "out"), f"data.root={other}"]
    assert benchmark.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: --data {tiny_data} and data.root={other} name different data: give one of them\n"
    )
    benchmark.check_root_override("--data x", tiny_data, [f"data.root={tiny_data}/", "data.batch_size=4"])  # same


def test_the_help_of_data_says_what_each_command_accepts(capsys):
    """e2e's help offered a split folder, which only the pipeline benchmark reads."""
    helps = {}
    for command in ("e2e", "pipeline"):
        with pytest.raises(SystemExit):
            benchmark.parse_args([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    assert "not a split folder" in helps["e2e"] and "or a split folder of class folders" in helps["pipeline"]


@pytest.mark.dali
def test_a_data_folder_one_rank_lacks_stops_every_rank_of_the_e2e_benchmark(tiny_data, tmp_path):
    """Node-local data missing on rank 1's node: both ranks stop with rank 1's error, naming it."""
    missing = tmp_path / "not_on_this_node"
    wrapper = rank_1_sees(tmp_path, BENCH, "--data", missing)
    proc = launch([wrapper, "e2e", "--data", tiny_data, "--no-synthetic", "--windows", "1", "--warmup", "0",
                   "--steps", "1", "--out", tmp_path / "out", "data.batch_size=2", "model.fc_width=512",
                   "parallel.timeout_s=30"])  # fmt: skip
    assert proc.returncode != 0
    missing_line = f"error: rank 1 (of 2): data folder {missing} (config key 'data.root') does not exist"
    assert proc.stderr.count(missing_line) == 2, proc.stderr[-4000:]
    assert "[rank0]: Traceback" not in proc.stderr


@pytest.mark.dali
def test_a_bad_file_in_one_rank_s_shard_stops_every_rank_of_the_e2e_benchmark(folder_with_a_cut_file, tiny_data,
                                                                                tmp_path):  # fmt: skip
    """The rank whose shard held it stopped with its name; the other died in the step's all-reduce
    with a gloo traceback. The ranks now agree on each batch, and both stop with the file's name."""
    root, bad = folder_with_a_cut_file
    for cls in ("circle", "square"):
        shutil.copytree(tiny_data / "val" / cls, root / "val" / cls)
    proc = launch([BENCH, "e2e", "--data", root, "--pipelines", "dali", "--no-synthetic", "--windows", "1",
                   "--warmup", "0", "--steps", "4", "--out", tmp_path / "out", "data.batch_size=2",
                   "data.num_threads=1", "data.prefetch=1", "data.crop=67", "data.resize=76", "model.fc_width=512",
                   "parallel.timeout_s=30"])  # fmt: skip
    assert proc.returncode != 0
    named = [line for line in proc.stderr.splitlines() if f"cannot decode {bad}" in line]
    assert len(named) == 2 and all("The e2e benchmark stopped." in line for line in named), proc.stderr[-4000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "e2e.json").exists()


def test_ranks_of_the_step_benchmark_started_differently_stop_naming_it(tmp_path):
    """Other options on one agent had the ranks time different steps until a collective failed."""
    wrapper = rank_1_differs(tmp_path, BENCH, ("--steps", "3", "data.batch_size=4"))
    proc = launch([wrapper, "step", "--modes", "dp", "--windows", "1", "--warmup", "0", "--steps", "2",
                   "--out", tmp_path / "out", "data.batch_size=2", "parallel.timeout_s=30"])  # fmt: skip
    assert proc.returncode != 0
    named = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(named) == 2 and named[0] == named[1], proc.stderr[-4000:]
    assert named[0].startswith(
        "error: the ranks were started with different settings: --steps 2 on rank 0, 3 on rank 1; "
        "data.batch_size 2 on rank 0, 4 on rank 1; start every rank with the same command"
    ), named[0]
    assert not (tmp_path / "out" / "step.json").exists()


@pytest.mark.dali
def test_a_loader_failing_unforeseen_on_one_rank_stops_every_rank_of_the_e2e_benchmark(tiny_data, tmp_path):
    """A DALI internal error on rank 1 alone: rank 0 died in the step's all-reduce with a gloo
    traceback. Both now stop with one line naming rank 1 and its error."""
    wrapper = loader_failing_on_rank_1(tmp_path, BENCH, "train")
    proc = launch([wrapper, "e2e", "--data", tiny_data, "--pipelines", "dali", "--no-synthetic", "--windows", "1",
                   "--warmup", "0", "--steps", "4", "--out", tmp_path / "out", "data.batch_size=2",
                   "data.num_threads=1", "data.prefetch=1", "data.crop=67", "data.resize=76", "model.fc_width=512",
                   "parallel.timeout_s=30"])  # fmt: skip
    assert proc.returncode == 1
    said = "error: rank 1 (of 2) could not load its batch: RuntimeError: Critical error in pipeline: injected (rank 1 "
    said += "logged its traceback). The e2e benchmark stopped."
    assert proc.stderr.count(said) == 2, proc.stderr[-4000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "e2e.json").exists()


def test_an_out_path_that_cannot_hold_the_report_fails_before_measuring(tmp_path, capsys, monkeypatch):
    measured: list[str] = []
    monkeypatch.setattr(benchmark, "cmd_step", lambda args: measured.append("step"))
    taken = tmp_path / "taken"
    taken.write_text("the user's file\n")
    assert benchmark.main(["step", "--out", str(taken)]) == 2
    assert f"--out {taken}: is a file" in capsys.readouterr().err
    assert benchmark.main(["step", "--out", str(taken / "sub")]) == 2
    assert f"--out {taken / 'sub'}: cannot create the report folder" in capsys.readouterr().err
    assert measured == [] and taken.read_text() == "the user's file\n"  # nothing run, nothing lost
    assert benchmark.main(["step", "--out", str(tmp_path / "new" / "dir")]) == 0  # created up front
    assert measured == ["step"] and (tmp_path / "new" / "dir").is_dir()


@pytest.mark.dali
def test_e2e_command_one_process(tiny_data, tmp_path):
    argv = ["e2e", "--data", str(tiny_data), "--pipelines", "dali,torchvision", "--windows", "1", "--warmup", "0",
            "--steps", "1", "--out", str(tmp_path), "data.batch_size=4", "data.num_threads=1", "data.prefetch=1",
            "data.crop=67", "data.resize=76", "run.progress=log"]  # fmt: skip
    assert benchmark.main(argv) == 0
    data = output.load_report(tmp_path / "e2e.json")
    assert [r["name"] for r in data["results"]] == ["e2e/dali", "e2e/torchvision", "synthetic"]
    for r in data["results"]:
        assert r["images_per_sec_per_gpu"] == r["images_per_sec"] and r["flops_per_step"] > 0
        if not torch.cuda.is_available():
            assert r["mfu"] is None  # no peak for a CPU
        assert sum(r["split_share"].values()) == pytest.approx(1.0)
        assert sum(r["split_ms"].values()) == pytest.approx(r["mean_step_ms"])
    assert set(data["summary"]) == {"e2e/dali / synthetic", "e2e/torchvision / synthetic"}


def test_step_command_with_nothing_to_measure_says_why(tmp_path, capsys):
    assert benchmark.main(["step", "--modes", "towers", "--out", str(tmp_path)]) == 2
    assert "nothing to measure on 1 process(es): towers/paper skipped: it needs at least 2" in capsys.readouterr().err


def test_more_processes_than_gpus_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    from alexnet.parallel.env import LaunchError, init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(LaunchError, match="LOCAL_RANK=1 but only 1 CUDA devices"):
        init_distributed(60.0)
    assert benchmark.main(["step", "--out", str(tmp_path)]) == 2
    assert "LOCAL_RANK=1 but only 1 CUDA devices" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "one")
    with pytest.raises(LaunchError, match="LOCAL_RANK='one' is not an integer"):
        init_distributed(60.0)


def test_flops_and_mfu_count_every_replica_and_divide_by_every_device():
    from alexnet.bench.step_bench import ContenderInfo, train_result
    from alexnet.config import Config
    from alexnet.parallel.env import DistEnv

    env = DistEnv(0, 0, 4, 4, torch.device("cpu"), "gloo")
    cfg = Config()  # batch 128 per replica

    def windows(replicas):  # 4 steps in 2 s: 0.5 s per step
        return [Window(4 * 128 * replicas, 2.0, {"steps": 4.0, "full_s": 0.5, "data_wait_s": 0.0, "breakdown": 1.0})]

    dp = train_result(ContenderInfo("dp/paper", "dp", "paper", 4, 10**12), windows(4), cfg, env, "off")
    towers = train_result(ContenderInfo("towers/paper", "towers", "paper", 2, 10**12), windows(2), cfg, env, "off")
    assert dp["flops_per_step"] == 4 * 10**12 and towers["flops_per_step"] == 2 * 10**12
    assert dp["step_ms"] == pytest.approx(500.0) and towers["step_ms"] == pytest.approx(500.0)
    assert dp["achieved_tflops_per_device"] == pytest.approx(4 / 0.5 / 4)  # TFLOP per step / s / devices
    assert towers["achieved_tflops_per_device"] == pytest.approx(2 / 0.5 / 4)
    assert dp["global_batch"] == 4 * cfg.data.batch_size and dp["images_per_sec_per_gpu"] == pytest.approx(256.0)
    assert mfu(4e12, 0.5, 4, 4e12) == pytest.approx(0.5) and mfu(4e12, 0.5, 4, None) is None


def test_step_time_and_mfu_agree_with_images_per_sec_for_an_even_number_of_windows():
    from alexnet.bench.step_bench import ContenderInfo, train_result
    from alexnet.config import Config
    from alexnet.parallel.env import DistEnv

    env = DistEnv(0, 0, 1, 1, torch.device("cpu"), "gloo")
    cfg = Config()
    seconds = [0.10, 0.11, 0.19, 0.20]  # one step of 128 images per window
    windows = [Window(128, t, {"steps": 1.0, "full_s": t, "data_wait_s": 0.0}) for t in seconds]
    result = train_result(ContenderInfo("dp/paper", "dp", "paper", 1, 10**12), windows, cfg, env, "off")
    rates = sorted(128 / t for t in seconds)
    assert result["images_per_sec"] == pytest.approx((rates[1] + rates[2]) / 2)
    assert result["step_ms"] == pytest.approx(1000 * 128 / result["images_per_sec"])  # not the median time, 150 ms
    assert result["achieved_tflops_per_device"] == pytest.approx(1.0 / (result["step_ms"] / 1000))


def test_step_profile_ranks_each_contenders_operations(tmp_path):
    """--profile: after the timed windows, each contender's top operations by own time, per step."""
    from alexnet.bench.step_bench import StepSettings

    argv = ["step", "--compare-torchvision", "--variants", "paper", "--windows", "1", "--warmup", "0",
            "--steps", "1", "--profile", "2", "--out", str(tmp_path),
            "data.batch_size=2", "data.crop=67", "model.num_classes=10"]  # fmt: skip
    assert benchmark.main(argv) == 0
    data = output.load_report(tmp_path / "step.json")
    assert data["settings"]["profile_steps"] == 2
    for result in data["results"]:
        ops = result["profile"]
        assert 3 <= len(ops) <= 8
        times = [op["self_ms_per_step"] for op in ops]
        assert times == sorted(times, reverse=True) and times[-1] > 0
        assert 0 < sum(op["share"] for op in ops) <= 1.0 + 1e-9
        assert all(op["calls_per_step"] > 0 for op in ops)
        assert result["windows"] == 1  # the profiled steps are not timed
    # a training step's own time is led by the convolutions and matrix products
    paper_ops = {op["op"] for op in data["results"][0]["profile"]}
    assert any("conv" in name or "mm" in name for name in paper_ops)
    with pytest.raises(ValueError, match="--profile"):
        StepSettings(profile=-1)


def test_step_contenders_at_another_fc_width_say_what_they_compare():
    """model.fc_width reaches the project's variants, not torchvision's own AlexNet (a note says
    so); an odd width, which a torchvision config allows, skips the paper model with a note
    instead of failing in its constructor."""
    from alexnet.bench.step_bench import REFERENCE, StepSettings, _plan_contenders
    from alexnet.config import load_config

    narrow = load_config(None, ["model.variant=torchvision", "model.fc_width=511"])
    pairs, notes = _plan_contenders(StepSettings(modes=("dp",), compare_torchvision=True), narrow, 1)
    assert pairs == [("dp", "torchvision"), ("dp", REFERENCE)]
    assert notes == ["dp/paper skipped: model.fc_width=511 is odd, and its towers hold half each",
                     f"model.fc_width=511: fc6 and fc7 of {REFERENCE} stay 4096 wide"]  # fmt: skip
    pairs, notes = _plan_contenders(StepSettings(modes=("dp",), compare_torchvision=True), load_config(None), 1)
    assert pairs == [("dp", "paper"), ("dp", "torchvision"), ("dp", REFERENCE)] and notes == []


@pytest.mark.slow
def test_step_command_two_ranks_every_layout(tmp_path):
    proc = launch([BENCH, "step", "--compare-torchvision", "--variants", "paper", "--windows", "1", "--warmup",
                   "0", "--steps", "1", "--out", tmp_path, "data.batch_size=2", "data.crop=67",
                   "model.num_classes=10"], nproc=2)  # fmt: skip
    check(proc)
    data = output.load_report(tmp_path / "step.json")
    by_name = {r["name"]: r for r in data["results"]}
    assert list(by_name) == ["dp/paper", "towers/paper", "hybrid/paper", "dp/torchvision.models.alexnet"]
    assert data["environment"]["world_size"] == 2
    # the trainer's process settings (cuDNN's autotuner on unless train.deterministic)
    assert data["environment"]["cudnn_benchmark"] is True and data["environment"]["deterministic"] is False
    assert by_name["dp/paper"]["global_batch"] == 4 and by_name["towers/paper"]["global_batch"] == 2
    assert by_name["dp/paper"]["comm_mb_per_step"]["payload"]["grad_allreduce"] > 0
    assert by_name["towers/paper"]["comm_mb_per_step"]["payload"]["activation_exchange"] > 0
    assert "grad_allreduce" not in by_name["towers/paper"]["comm_mb_per_step"]["payload"]  # one replica
    for r in data["results"]:
        assert r["images_per_sec_per_gpu"] == pytest.approx(r["images_per_sec"] / 2)
        assert sum(r["split_share"].values()) == pytest.approx(1.0)
    assert "towers/paper / dp/paper" in data["summary"]
    assert "dp/paper / dp/torchvision.models.alexnet" in data["summary"]


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_a_point_past_its_timeout_is_stopped_with_all_its_processes(tmp_path):
    """A launcher and a worker that ignores SIGTERM: both are killed when run_process_group returns,
    the worker by the SIGKILL after the grace period."""
    pids = tmp_path / "pids"
    worker = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    launcher = (
        "import subprocess, sys, time, os; "
        f"w = subprocess.Popen([sys.executable, '-c', {worker!r}]); "
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{w.pid}}'); "
        "sys.stderr.write('started'); sys.stderr.flush(); time.sleep(60)"
    )
    # 8 s for two interpreters to start and write the pids: 3 s could run out on a loaded 2-core machine
    code, stderr = sweep.run_process_group([sys.executable, "-c", launcher], dict(os.environ), 8.0, grace_s=1.0)
    assert code is None and stderr == "started"
    launcher_pid, worker_pid = map(int, pids.read_text().split())
    # SIGKILL cannot be ignored, but on a loaded machine the kernel takes a moment to finish it.
    deadline = time.monotonic() + 10
    while not (_gone(launcher_pid) and _gone(worker_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(launcher_pid) and _gone(worker_pid)
    code, stderr = sweep.run_process_group([sys.executable, "-c", "import sys; sys.exit('no')"], dict(os.environ), 30)
    assert code == 1 and stderr.strip() == "no"


@pytest.mark.slow
def test_sweep_collects_points_and_reports_failures(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the sweep divides the cores itself
    fake = REPO / "tests" / "dist" / "fake_bench.py"
    s = sweep.SweepSettings((1, 2, 3), "step", ("--fail-at", "3"), fake, tmp_path / "points", timeout_s=120)
    report = sweep.run_sweep(s)
    eff = {(r["nproc"], r["name"]): r["scaling_efficiency"] for r in report.results}
    assert eff == {(1, "dp/paper"): pytest.approx(1.0), (2, "dp/paper"): pytest.approx(0.9),
                   (2, "towers/paper"): pytest.approx(0.8)}  # fmt: skip
    assert len(report.summary["failed"]) == 1 and "3 processes: exit" in report.summary["failed"][0]
    assert "error: fake failure at 3 processes" in report.summary["failed"][0]  # the worker's own words
    threads = {(r["nproc"], r["name"]): r["torch_threads"] for r in report.results}
    cores = usable_cores()
    per_point = {1: cores, 2: max(1, cores // 2)}  # cores / P intra-op threads per process
    assert threads == {(1, "dp/paper"): per_point[1], (2, "dp/paper"): per_point[2], (2, "towers/paper"): per_point[2]}
    assert report.environment["torch_threads"] == sorted(set(per_point.values()))
    assert report.environment["world_size"] == [1, 2, 3]
    written = output.write_outputs(report, tmp_path, plot=True)
    assert [p.name for p in written] == ["sweep.json", "sweep.csv", "sweep.png"]
    again = sweep.run_sweep(dataclasses.replace(s, args=("--no-report-at", "2")))  # same points folder
    assert [r["nproc"] for r in again.results] == [1, 3]  # not the first sweep's report of 2 processes
    assert "2 processes: cannot read benchmark report" in again.summary["failed"][0]


def test_the_benchmark_steps_clip_as_the_trainer_does(monkeypatch):
    """train.grad_clip reaches the timed step (its norm and all-reduce are part of the trainer's step)."""
    from alexnet.bench import training
    from alexnet.bench.step_bench import build_train_parts
    from alexnet.config import load_config
    from alexnet.model import build_model
    from alexnet.parallel.env import DistEnv
    from alexnet.parallel.mesh import build_mesh
    from alexnet.plan import build_plan

    env = DistEnv(0, 0, 1, 1, torch.device("cpu"), "gloo")
    cfg = load_config(None, ["train.grad_clip=2.5", "data.batch_size=2", "data.crop=67", "data.resize=76"])
    mesh = build_mesh(env, "dp")
    plan = build_plan(cfg, env, mesh, None)
    parts = build_train_parts(build_model("paper", 10, 0.5, 67, "kaiming"), cfg, env, mesh, plan)
    clips = []
    monkeypatch.setattr(training, "train_step", lambda *args: clips.append(args[6]))
    batches = iter([(torch.zeros(2, 3, 67, 67), torch.zeros(2, dtype=torch.long))] * 2)
    training.TrainContender("dp/paper", parts, batches, 2, 2, env.device, False).run_steps(2)
    assert clips == [2.5, 2.5]


def test_e2e_of_the_torchvision_loader_runs_without_dali(tiny_data, tmp_path):
    """Where DALI is not installed (`pip install -e .` installs it on x86-64 only), measuring the
    torchvision loader still works: only the pipelines asked for need their library."""
    out = tmp_path / "out"
    argv = ["e2e", "--data", str(tiny_data), "--pipelines", "torchvision", "--no-synthetic", "--windows", "1",
            "--warmup", "0", "--steps", "1", "--out", str(out), "data.batch_size=4", "data.num_threads=1",
            "data.crop=67", "data.resize=76"]  # fmt: skip
    env = without_dali(tmp_path)
    proc = subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["name"] for r in output.load_report(out / "e2e.json")["results"]] == ["e2e/torchvision"]


def test_the_pipeline_and_e2e_benchmarks_without_dali_leave_dali_out_or_refuse_in_one_line(tiny_data, tmp_path):
    """Without DALI the README's `pipeline` (no arguments) and `e2e` (the demo recipe reads with
    DALI) commands died in an import traceback, after --dataset imagenet-like had generated its
    images. Now the default pipeline run times what the machine has and says what it left out;
    a DALI row or loader asked for is refused with one line, exit 2, before any data is made."""
    env = without_dali(tmp_path)
    out = tmp_path / "out"
    common = ["--windows", "1", "--warmup", "0", "--batch-size", "4", "--threads", "1", "--batches", "1",
              "--resize", "76", "--crop", "67"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(BENCH), "pipeline", "--data", str(tiny_data), *common, "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = output.load_report(out / "pipeline.json")
    assert [r["name"] for r in report["results"]] == ["torchvision", "decode-only/pil"]
    assert any(note.startswith("DALI's pipelines left out: NVIDIA DALI is not installed") for note in report["notes"])
    like = tmp_path / "cache"  # where --dataset imagenet-like would generate its images
    env["XDG_CACHE_HOME"] = str(like)
    refused = {
        "pipeline": ["pipeline", "--pipelines", "dali-cpu", "--dataset", "imagenet-like"],
        "stages": ["pipeline", "--stages", "--data", str(tiny_data)],
        "e2e": ["e2e", "--dataset", "imagenet-like"],
    }
    for name, argv in refused.items():
        proc = subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (name, proc.stderr[-3000:])
        assert "NVIDIA DALI is not installed" in proc.stderr, (name, proc.stderr)
        assert not like.exists(), name
    assert "use --pipelines torchvision" in proc.stderr


def test_a_dali_that_does_not_import_is_named_before_the_run(tmp_path):
    """find_spec alone passed a DALI whose library fails to load: training then died at its first
    batch in an import traceback."""
    broken = tmp_path / "site" / "nvidia" / "dali"
    broken.mkdir(parents=True)
    (broken.parent / "__init__.py").write_text("")  # ahead of the installed `nvidia` package
    (broken / "__init__.py").write_text("raise ImportError('libdali.so: cannot open shared object file')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), f"run.root={tmp_path}", "run.name=x"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith(
        "error: config key 'data.pipeline' is 'dali' but NVIDIA DALI is installed but does not import "
        "(ImportError: libdali.so: cannot open shared object file;"
    ), proc.stderr
    assert not (tmp_path / "x").exists()
