"""A benchmark's report: a table for people, JSON and CSV for machines, a PNG on request.

The JSON holds `schema`, `command`, `created`, `environment` (versions, devices, world size,
layout, commit), `settings` (what was asked), `results` (one entry per measured thing, each with
at least `name` and `images_per_sec`), `summary` (ratios and fractions between results) and
`notes`. The CSV holds the results, nested values flattened to dotted columns.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.outputs import OutputPathError, check_output_folder, without_non_finite, write_text_atomic

SCHEMA = "alexnet-bench/1"
REQUIRED_TOP = ("schema", "command", "created", "environment", "settings", "results", "summary")
REQUIRED_RESULT = ("name", "images_per_sec")
REQUIRED_ENVIRONMENT = (
    "torch",
    "torchvision",
    "dali",
    "cuda",
    "cudnn",
    "nccl",
    "devices",
    "world_size",
    "layout",
    "commit",
)


class ReportError(ValueError):
    """A report misses what its schema promises; the message names the key and the file."""


@dataclass
class Report:
    command: str
    results: list[dict[str, Any]]
    environment: dict[str, Any]
    settings: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    created: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "command": self.command,
            "created": self.created,
            "environment": self.environment,
            "settings": self.settings,
            "results": self.results,
            "summary": self.summary,
            "notes": self.notes,
        }


def validate_report(data: Any, where: str = "report") -> None:
    """What merge and the sweep read from a report, each with its type: a report edited by hand or
    written by another tool failed deep inside the merge with a traceback naming neither."""
    if not isinstance(data, dict):
        raise ReportError(f"{where}: a report is a JSON object, got {type(data).__name__}")
    for key in REQUIRED_TOP:
        if key not in data:
            raise ReportError(f"{where}: missing top-level key {key!r}")
    if data["schema"] != SCHEMA:
        raise ReportError(f"{where}: schema {data['schema']!r}, expected {SCHEMA!r}")
    for key in ("environment", "settings", "summary"):
        if not isinstance(data[key], dict):
            raise ReportError(f"{where}: {key!r} must be an object, got {type(data[key]).__name__}")
    if not isinstance(data["results"], list):
        raise ReportError(f"{where}: 'results' must be a list")
    for i, entry in enumerate(data["results"]):
        if not isinstance(entry, dict):
            raise ReportError(f"{where}: results[{i}] must be an object, got {type(entry).__name__}")
        for key in REQUIRED_RESULT:
            if key not in entry:
                raise ReportError(f"{where}: results[{i}] has no {key!r}")
        if not isinstance(entry["name"], str):
            raise ReportError(f"{where}: results[{i}]['name'] must be text, got {entry['name']!r}")
        if not _is_number(entry["images_per_sec"]):
            raise ReportError(
                f"{where}: results[{i}]['images_per_sec'] must be a number, got {entry['images_per_sec']!r}"
            )
    _check_ratios(data["summary"], f"{where}: summary")
    for key in REQUIRED_ENVIRONMENT:
        if key not in data["environment"]:
            raise ReportError(f"{where}: environment has no {key!r}")


def _is_number(value: Any) -> bool:
    """A finite number: NaN and infinities (1e400 reads as one) have no images/s or ratio to show."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_ratios(tree: dict[str, Any], where: str) -> None:
    """Every paired ratio ({median, min, max}) holds numbers: format_ratios prints them."""
    for key, value in tree.items():
        if isinstance(value, dict) and "median" in value:
            for part in ("median", "min", "max"):
                if not _is_number(value.get(part)):
                    raise ReportError(f"{where}[{key!r}][{part!r}] must be a number, got {value.get(part)!r}")
        elif isinstance(value, dict):
            _check_ratios(value, f"{where}[{key!r}]")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def load_report(path: Path) -> dict[str, Any]:
    try:
        # NaN and Infinity are Python's extension of JSON: a merge would copy them into its own
        # file, which other JSON readers (jq, JavaScript) then refuse.
        data = json.loads(Path(path).read_text(), parse_constant=_refuse_constant)
    except (OSError, ValueError) as exc:  # ValueError: json.JSONDecodeError, NaN, bytes that are not UTF-8
        raise ReportError(f"cannot read benchmark report {path}: {exc}") from exc
    validate_report(data, str(path))
    return data


def flatten(entry: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys; lists become JSON text (one CSV cell)."""
    flat: dict[str, Any] = {}
    for key, value in entry.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        elif isinstance(value, (list, tuple)):
            flat[dotted] = json.dumps(value)
        else:
            flat[dotted] = value
    return flat


def prepare_out_dir(out_dir: Path) -> Path | None:
    """Create the report folder before anything is measured: a path that cannot hold the report
    fails at once, naming the flag, instead of after minutes of benchmarking with the figures lost.
    Returns the outermost folder it created (None when --out existed), for remove_unused_out_dir."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"--out {out_dir}: is a file, not a folder for the report")
    outermost = next((p for p in reversed([out_dir, *out_dir.parents]) if not p.exists()), None)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, no permission, read-only filesystem
        raise ReportError(f"--out {out_dir}: cannot create the report folder ({exc.strerror or exc})") from exc
    try:  # an existing folder this user cannot write in (a read-only mount) failed after the measuring
        check_output_folder(out_dir, f"--out {out_dir}")
    except OutputPathError as exc:
        remove_unused_out_dir(out_dir, outermost)
        raise ReportError(str(exc)) from exc
    return outermost


@contextmanager
def report_folder(out_dir: Path) -> Iterator[None]:
    """prepare_out_dir around a command: the folders it made are removed again (while empty) when
    the command fails before writing anything (a refused setting, `sweep -- --help`)."""
    outermost = prepare_out_dir(out_dir)
    try:
        yield
    except BaseException:
        remove_unused_out_dir(out_dir, outermost)
        raise


def remove_unused_out_dir(out_dir: Path, outermost: Path | None) -> None:
    """Undo prepare_out_dir for a command that failed before writing anything (a refused setting):
    the folders it created, while they are empty. Every rank may try; the first one removes them."""
    if outermost is None:
        return
    for folder in [Path(out_dir), *Path(out_dir).parents]:
        try:
            folder.rmdir()  # only an empty folder: a sweep's finished points stay
        except OSError:
            return
        if folder == outermost:
            return


def write_json(report: Report, path: Path) -> Path:
    data = report.to_dict()
    validate_report(data, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    # strict: a non-finite number is null (Python's NaN/Infinity tokens are not JSON; jq refuses them)
    write_text_atomic(path, json.dumps(without_non_finite(data), indent=2, default=str, allow_nan=False) + "\n")
    return path


def write_csv(results: Sequence[dict[str, Any]], path: Path) -> Path:
    rows = [flatten(r) for r in results]
    columns: list[str] = [] if rows else list(REQUIRED_RESULT)  # a header even without results (all points failed)
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text.getvalue())
    return path


@dataclass(frozen=True)
class Column:
    key: str  # dotted key into a result
    header: str
    fmt: str = "{}"


def _lookup(entry: dict[str, Any], dotted: str) -> Any:
    value: Any = entry
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    cells = [[c.header for c in columns]]
    for row in rows:
        line = []
        for c in columns:
            value = _lookup(row, c.key)
            line.append("-" if value is None else c.fmt.format(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _figure(width: float, height: float):
    """A Figure of its own, not pyplot's: no backend switched and no figure kept in the calling
    process (a notebook's inline plots stay on)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_throughput(results: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Bars of median images/s per result, with the min-max range of the windows."""
    names = [r["name"] for r in results]
    medians = [r["images_per_sec"] for r in results]
    lows = [r["images_per_sec"] - r.get("images_per_sec_min", r["images_per_sec"]) for r in results]
    highs = [r.get("images_per_sec_max", r["images_per_sec"]) - r["images_per_sec"] for r in results]
    fig = _figure(max(6.0, 1.1 * len(names) + 2), 4.0)
    ax = fig.subplots()
    ax.bar(range(len(names)), medians, yerr=[lows, highs], capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("images/s (median of windows)")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_scaling(results: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Images/s against processes for each name, with the ideal line from its baseline."""
    fig = _figure(6.5, 4.0)
    ax = fig.subplots()
    for name in dict.fromkeys(r["name"] for r in results):
        points = sorted(
            (r["nproc"], r["images_per_sec"], r.get("baseline_per_proc")) for r in results if r["name"] == name
        )
        xs = [p[0] for p in points]
        ax.plot(xs, [p[1] for p in points], marker="o", label=name)
        base = next((p[2] for p in points if p[2]), None)
        if base:
            ax.plot(xs, [base * x for x in xs], linestyle=":", color="grey")
    ax.set_xticks(sorted({r["nproc"] for r in results}))
    ax.set_xlabel("processes")
    ax.set_ylabel("images/s (all processes)")
    ax.set_title(title + " (dotted: linear scaling)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_outputs(report: Report, out_dir: Path, plot: bool = False) -> list[Path]:
    """<out>/<command>.json and .csv, and .png with `plot`."""
    out_dir = Path(out_dir)
    written = [
        write_json(report, out_dir / f"{report.command}.json"),
        write_csv(report.results, out_dir / f"{report.command}.csv"),
    ]
    if plot:
        png = out_dir / f"{report.command}.png"
        if report.command == "sweep":
            written.append(plot_scaling(report.results, png, f"scaling: {report.settings.get('mode', '')}"))
        else:
            written.append(plot_throughput(report.results, png, f"{report.command} throughput"))
    return written


MERGE_TABLE = [
    Column("source", "from"),
    Column("name", "name"),
    Column("images_per_sec", "images/s", "{:.1f}"),
    Column("fraction_of_ceiling", "of ceiling", "{:.0%}"),
    Column("mfu", "MFU", "{:.1%}"),
]


def _sources(paths: Sequence[Path]) -> list[str]:
    """A short label per report: its file name without .json, with as many of its folders in front
    as it takes to tell the reports apart (runs/A/benchmark/step.json and runs/B/benchmark/step.json
    are A/benchmark/step and B/benchmark/step: one label for both kept only one's summary)."""
    real = [Path(p).resolve() for p in paths]  # the same file however it is spelled or linked
    twice = sorted({str(p) for p, r in zip(paths, real) if real.count(r) > 1})
    if twice:
        raise ReportError(f"merge: a report is given twice: {', '.join(twice)}")
    # Labelled as given (a link's own name, not its target's), without the file system's root.
    parts = [Path(os.path.abspath(p)).parts[1:] for p in paths]
    parts = [(*q[:-1], q[-1].removesuffix(".json")) for q in parts]
    return ["/".join(_shortest_unique_suffix(i, parts)) for i in range(len(parts))]


def _shortest_unique_suffix(i: int, parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The last path components of parts[i] that no other path ends with."""
    for depth in range(1, len(parts[i]) + 1):
        suffix = parts[i][-depth:]
        if all(other[-depth:] != suffix for j, other in enumerate(parts) if j != i):
            return suffix
    return parts[i]


def merge_reports(paths: Sequence[Path], checks: dict[str, str] | None = None) -> Report:
    """One report from several: every result tagged with the report it came from (`source`),
    summaries and settings kept per source, the first report's environment with what differs in
    the others under `differs_by_source` (e.g. cuDNN's autotuner: on in training benchmarks, off
    in the pipeline benchmark); `checks` (name -> status, e.g. of the GPU check's steps) go into
    the summary."""
    loaded = [load_report(Path(p)) for p in paths]
    results: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"checks": dict(checks or {})}
    settings: dict[str, Any] = {}
    notes: list[str] = []
    environment = dict(loaded[0]["environment"])
    differs: dict[str, dict[str, Any]] = {}
    for source, data in zip(_sources(paths), loaded):
        results.extend({"source": source, **r} for r in data["results"])
        summary[source] = data["summary"]
        settings[source] = data["settings"]
        notes.extend(f"{source}: {n}" for n in data.get("notes", []))
        diff = {key: value for key, value in data["environment"].items() if environment.get(key) != value}
        if diff:
            differs[source] = diff
    environment["differs_by_source"] = differs
    return Report("merge", results, environment, settings, summary, notes)


def format_ratios(summary: dict[str, Any]) -> str:
    """Lines 'source: a / b = median (min-max)' for every paired ratio in a (merged) summary."""
    lines = []

    def walk(tree: dict[str, Any], prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict) and "median" in value:
                lines.append(f"{prefix}{key} = {value['median']:.3f} (min {value['min']:.3f}, max {value['max']:.3f})")
            elif isinstance(value, dict):
                walk(value, f"{prefix}{key}: ")

    walk(summary, "")
    return "\n".join(lines)
