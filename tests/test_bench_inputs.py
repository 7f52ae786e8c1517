"""What the benchmark reads and is told: reports given to merge (labels, malformed or repeated
files, NaN), a sweep's options (checked before any point starts) and its baseline, and the
flags and overrides that were silently ignored. Each was a defect a user met: a merge that kept
one of two summaries, a traceback, a sweep of empty points, figures recorded under a config
they were not measured with."""

from __future__ import annotations

import csv
import json
import math
import sys

import pytest
from _helpers import REPO

from alexnet.bench import output, sweep

sys.path.insert(0, str(REPO / "launch"))
import benchmark  # noqa: E402


def report(command: str = "step", ratio: float = 2.0) -> output.Report:
    results = [{"name": "dp/paper", "images_per_sec": 10.0}, {"name": "towers/paper", "images_per_sec": 5.0}]
    environment = {k: None for k in output.REQUIRED_ENVIRONMENT}
    summary = {"towers/paper / dp/paper": {"median": ratio, "min": ratio, "max": ratio}}
    return output.Report(command, results, environment, {"batch": 4}, summary)


def test_merge_tells_apart_reports_of_the_same_folder_and_file_name(tmp_path):
    """runs/A/bench/step.json and runs/B/bench/step.json were both labelled bench/step: the merged
    summary and settings kept only the second report's."""
    first, second = tmp_path / "A" / "bench" / "step.json", tmp_path / "B" / "bench" / "step.json"
    output.write_json(report(ratio=0.5), first)
    output.write_json(report(ratio=0.7), second)
    merged = output.merge_reports([first, second])
    assert [r["source"] for r in merged.results] == ["A/bench/step"] * 2 + ["B/bench/step"] * 2
    assert merged.summary["A/bench/step"]["towers/paper / dp/paper"]["median"] == 0.5
    assert merged.summary["B/bench/step"]["towers/paper / dp/paper"]["median"] == 0.7
    assert set(merged.settings) == {"A/bench/step", "B/bench/step"}
    output.write_json(report(), tmp_path / "C" / "e2e.json")  # a name no other report has keeps its short label
    labels = {r["source"] for r in output.merge_reports([first, tmp_path / "C" / "e2e.json", second]).results}
    assert labels == {"A/bench/step", "e2e", "B/bench/step"}


def test_merge_refuses_a_report_given_twice(tmp_path):
    """`merge P.json P.json` gave every row twice under one label."""
    path = tmp_path / "p.json"
    output.write_json(report(), path)
    (tmp_path / "link.json").symlink_to(path)
    (tmp_path / "sub").mkdir()
    output.write_json(report(), tmp_path / "other.json")
    for again in (path, tmp_path / "link.json", tmp_path / "sub" / ".." / "p.json"):
        with pytest.raises(output.ReportError, match="a report is given twice: ") as info:
            output.merge_reports([tmp_path / "other.json", path, again])
        assert str(again) in str(info.value) and "other.json" not in str(info.value)  # only the repeated ones


def test_merge_labels_are_the_paths_given(tmp_path):
    """Labels came from the resolved path: a link's target's folder, and `step.json` with a
    `step.old` beside it read as the same report given twice."""
    output.write_json(report(), tmp_path / "runs" / "y" / "r.json")
    (tmp_path / "latest").symlink_to(tmp_path / "runs" / "y")
    output.write_json(report(), tmp_path / "x" / "r.json")
    labels = output._sources([tmp_path / "latest" / "r.json", tmp_path / "x" / "r.json"])
    assert labels == ["latest/r", "x/r"]
    output.write_json(report(), tmp_path / "step.json")
    (tmp_path / "step.old").write_bytes((tmp_path / "step.json").read_bytes())
    assert output._sources([tmp_path / "step.json", tmp_path / "step.old"]) == ["step", "step.old"]


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda d: d.update(results=[1]), "results[0] must be an object, got int"),
        (lambda d: d["results"][0].update(images_per_sec="fast"), "results[0]['images_per_sec'] must be a number"),
        (lambda d: d["results"][1].update(name=7), "results[1]['name'] must be text, got 7"),
        (lambda d: d.update(summary=[]), "'summary' must be an object, got list"),
        (lambda d: d["summary"]["towers/paper / dp/paper"].update(median="x"), "['median'] must be a number"),
        (lambda d: d["results"][0].update(images_per_sec=math.nan), "NaN is not a JSON number"),
        (lambda d: d["results"][0].update(images_per_sec=1e400), "Infinity is not a JSON number"),
    ],
)
def test_merge_names_the_file_and_the_key_of_a_malformed_report(tmp_path, capsys, change, said):
    """A TypeError traceback, or "Unknown format code 'f' for object of type 'str'" after the
    table was printed, named neither; NaN was copied into the merged file, which is not JSON."""
    data = report().to_dict()
    change(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))  # json.dumps writes NaN as Python's extension does
    with pytest.raises(output.ReportError) as info:
        output.load_report(bad)
    assert str(bad) in str(info.value) and said in str(info.value), str(info.value)
    out = tmp_path / "merged"
    assert benchmark.main(["merge", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr()
    assert err.err.count("\n") == 1 and said in err.err and not out.exists() and err.out == ""


def test_reports_are_written_as_strict_json(tmp_path):
    """A value that is not a finite number is null: Python's NaN/Infinity are refused by other readers."""
    written = report()
    written.results[1]["images_per_sec_max"] = math.inf
    written.settings["ratio"] = [1.0, math.nan]
    path = output.write_json(written, tmp_path / "r.json")
    data = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the report"))
    assert data["results"][1]["images_per_sec_max"] is None and data["settings"]["ratio"] == [1.0, None]


def test_merge_name_may_end_in_json(tmp_path):
    """--name x.json wrote x.json.json."""
    output.write_json(report(), tmp_path / "in" / "step.json")
    assert (
        benchmark.main(["merge", str(tmp_path / "in" / "step.json"), "--name", "all.json", "--out", str(tmp_path)]) == 0
    )
    assert (tmp_path / "all.json").is_file() and not (tmp_path / "all.json.json").exists()


def test_a_csv_without_results_has_its_header(tmp_path):
    """A sweep whose points all failed wrote a CSV of one empty line."""
    with open(output.write_csv([], tmp_path / "s.csv"), newline="") as f:
        assert next(csv.reader(f)) == ["name", "images_per_sec"]


def test_a_sweep_refuses_a_process_count_given_twice(tmp_path):
    """--nproc 2,2 ran the point twice; the second replaced the first's report and was held against it."""
    with pytest.raises(ValueError, match=r"--nproc: 2 given twice in \[1, 2, 2\]"):
        sweep.SweepSettings((1, 2, 2), "step", (), REPO / "launch" / "benchmark.py", tmp_path)


def test_without_the_smallest_count_s_result_nothing_has_an_efficiency():
    """The one-process point failed: the two-process results were held against themselves, 100%."""
    results = [{"nproc": 2, "name": "towers/paper", "mode": "towers", "variant": "paper", "images_per_sec": 50.0}]
    sweep.add_efficiency(results, p0=1)
    assert results[0]["scaling_efficiency"] is None and results[0]["baseline"] is None
    sweep.add_efficiency(results, p0=2)  # a sweep that starts at 2 processes
    assert results[0]["scaling_efficiency"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--windows", "0"], "error: --windows must be at least 1, got 0"),
        (["--", "--steps", "0"], "error: --steps must be at least 1, got 0"),
        (["--", "--bogus"], "error: unrecognized arguments: --bogus"),
        (["--", "train.epochs=0"], "error: config key 'train.epochs' must be > 0"),
        (["--nproc", "1,1"], "error: --nproc: 1 given twice"),
    ],
)
def test_a_sweep_checks_its_points_options_before_starting_any(tmp_path, capsys, monkeypatch, options, said):
    """Each point was started through torchrun and failed alike; the sweep then wrote an empty report."""
    monkeypatch.setattr(sweep, "run_point", lambda *a: pytest.fail("a point was started"))
    nproc = [] if "--nproc" in options else ["--nproc", "1,2"]
    out = tmp_path / "out"
    assert benchmark.main(["sweep", *nproc, "--out", str(out), *options]) == 2
    assert said in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    ("override", "said"),
    [
        (
            "data.pipeline=dali",
            "the step benchmark times synthetic on-device data; e2e times a pipeline on real files",
        ),
        ("parallel.mode=hybrid", "the step benchmark times each layout of --modes; give --modes"),
    ],
)
def test_the_step_benchmark_refuses_overrides_it_cannot_honour(tmp_path, capsys, override, said):
    """They were taken into the report's config while synthetic data and --modes' layouts were timed."""
    assert benchmark.main(["step", "--out", str(tmp_path / "out"), override]) == 2
    assert capsys.readouterr().err == f"error: {override}: {said}\n"
    cfg, _ = benchmark._step_parts(benchmark.parse_args(["step", "data.pipeline=synthetic"]))  # what it times
    assert cfg.data.pipeline == "synthetic"


def test_an_option_this_machine_cannot_run_is_a_usage_error_and_a_bug_is_not(tmp_path, capsys, monkeypatch):
    """fp16 on a CPU was a ValueError traceback once the benchmark stopped reading every ValueError
    as the command's fault, which had turned programming errors into "error: <message>", exit 2."""
    out = tmp_path / "out"
    argv = ["step", "--out", str(out), "--windows", "1", "--warmup", "0", "--steps", "1", "--modes", "dp"]
    assert benchmark.main([*argv, "train.amp=fp16"]) == 2
    assert capsys.readouterr().err.endswith("config key 'train.amp' is 'fp16', which needs a CUDA device; use bf16 "
                                            "or off on the CPU\n")  # fmt: skip

    def broken(args):
        raise ValueError("too many values to unpack (expected 2)")

    monkeypatch.setitem(benchmark.cmd_step.__globals__, "cmd_step", broken)
    with pytest.raises(ValueError, match="too many values"):
        benchmark.main(argv)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--modes", "dp,dp"], "error: --modes: dp given twice\n"),  # a ValueError traceback after building both
        (["--variants", "paper,paper"], "error: --variants: paper given twice\n"),
        (
            ["--variants", "paper", "model.variant=torchvision", "data.crop=63", "data.resize=63"],
            "error: nothing to measure on 1 process(es): dp/paper skipped: data.crop=63 is below the smallest input "
            "its pooling allows (67)\n",
        ),  # a ValueError traceback from the model  # fmt: skip
    ],
)
def test_step_contenders_that_cannot_be_timed_are_refused_in_one_line(tmp_path, capsys, options, said):
    argv = ["step", "--out", str(tmp_path / "out"), "--windows", "1", "--warmup", "0", "--steps", "1", *options]
    assert benchmark.main(argv) == 2
    assert capsys.readouterr().err == said


def test_a_sweep_takes_the_options_its_points_take(tmp_path, capsys):
    """The check before the points refuses only what a point would: layouts, variants, overrides
    pass; each command's own flags and overrides are refused to the other, as its points would
    refuse them (a check that refused nothing passed the accepting half alone)."""
    benchmark._check_point_options("step", ["--modes", "towers,hybrid", "--variants", "paper", "data.batch_size=8"])
    benchmark._check_point_options("e2e", ["--pipelines", "torchvision", "--steps", "2", "model.fc_width=64"])
    benchmark._check_point_options("e2e", ["data.pipeline=dali"])  # e2e times a pipeline: it takes one
    for mode, flag in (("step", "--pipelines"), ("e2e", "--modes")):  # e2e's flag to step, step's to e2e
        with pytest.raises(ValueError, match=rf"^sweep: the options for {mode} are refused \(the line above\)$"):
            benchmark._check_point_options(mode, [flag, "towers"])
        assert f"error: unrecognized arguments: {flag}" in capsys.readouterr().err  # argparse's line above
    said = "the step benchmark times synthetic on-device data; e2e times a pipeline on real files"
    with pytest.raises(ValueError, match=rf"^data\.pipeline=dali: {said}$"):  # step's own check, past argparse
        benchmark._check_point_options("step", ["data.pipeline=dali"])


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["pipeline", "--dataset", "imagenet-like", "--like-images", "5"], "must be a multiple of 10"),
        (["pipeline", "--dataset", "imagenet-like", "--like-images", "15"], "must be a multiple of 10"),
        (["pipeline", "--dataset", "imagenet-like", "--like-images", "x"], "expected a whole number of images"),
        (["pipeline", "--like-images", "50"], "--like-images sizes --dataset imagenet-like, which is not given"),
        (["e2e", "--like-images", "50"], "--like-images sizes --dataset imagenet-like, which is not given"),
        (["pipeline", "--data", "x", "--dataset", "demo"], "argument --dataset: not allowed with argument --data"),
    ],
)
def test_data_flags_that_were_ignored_are_refused(tmp_path, capsys, argv, said):
    """--like-images 0 made 10 images (and 15 made 10), --like-images without --dataset imagenet-like did nothing,
    and --data won over --dataset without a word."""
    try:
        code = benchmark.main([*argv, "--out", str(tmp_path / "out")])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2 and said in capsys.readouterr().err and not (tmp_path / "out").exists()
