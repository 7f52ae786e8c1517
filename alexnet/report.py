"""The end of a run, for people: a PNG of the training curves and the final summary's figures.

The plot is for users without TensorBoard: it reads metrics.jsonl (what the trainer writes anyway)
and draws, against the optimizer step, the loss and the top-1/top-5 accuracy of training and
validation, the learning rate, and the throughput with the share of time spent waiting for data.

The summary compares with the paper only where that means something: Krizhevsky et al. 2012,
Table 2, report 40.7% top-1 and 18.2% top-5 error for one CNN on the ILSVRC-2012 validation set,
with the softmax averaged over ten crops (section 4.1). A run on other data, another number of
classes or synthetic data gets no comparison, and says so.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from alexnet.imagenet import is_ilsvrc_2012
from alexnet.metrics import is_scalar, read_metrics
from pipelines.outputs import write_bytes_atomic

log = logging.getLogger("alexnet")
PLOT_FILE = "training_curves.png"
PAPER_TOP1_ERROR = 40.7  # Table 2, "1 CNN", ILSVRC-2012 validation
PAPER_TOP5_ERROR = 18.2
PAPER_NUM_CLASSES = 1000


# A run stopped before its first validation: nothing measured, nothing to hold against the paper.
NO_VALIDATION: dict[str, Any] = {"comparable": False, "note": "no validation ran, so no comparison with the paper"}
# data.pipeline=synthetic: random images and labels, which measure speed and nothing else.
SYNTHETIC: dict[str, Any] = {"comparable": False, "note": "synthetic data (random labels): not compared with the paper"}


def error_pct(accuracy: float) -> float:
    """100 - accuracy (%), rounded to 1e-6 points: the JSON says 0.4, not 0.4000000000000057."""
    return round(100.0 - accuracy, 6)


def paper_comparison(top1: float, top5: float, classes: Sequence[str], ten_crop: bool = False) -> dict[str, Any]:
    """Our error minus the paper's, in percentage points (positive: worse than the paper).
    `classes`: the class folders the evaluated images cover, which must be the paper's 1000
    ILSVRC-2012 classes (a 1000-way model validated on a few classes' images, or any other
    1000-class data, is not comparable); `ten_crop`: whether those figures average ten crops, as
    the paper's do."""
    top1_error, top5_error = error_pct(top1), error_pct(top5)
    result: dict[str, Any] = {
        "paper_top1_error": PAPER_TOP1_ERROR,
        "paper_top5_error": PAPER_TOP5_ERROR,
        "top1_error": top1_error,
        "top5_error": top5_error,
        "comparable": is_ilsvrc_2012(classes),
        "top1_error_gap": None,
        "top5_error_gap": None,
    }
    if not result["comparable"]:
        result["note"] = (
            f"no comparison with the paper's {PAPER_TOP1_ERROR}% / {PAPER_TOP5_ERROR}% top-1/top-5 error: those are "
            f"for the {PAPER_NUM_CLASSES} ILSVRC-2012 classes and "
            + (
                f"this data has {len(classes)}"
                if len(classes) != PAPER_NUM_CLASSES
                else "this data's 1000 class folders are not theirs (named by their WordNet ids, n01440764 ...)"
            )
        )
        return result
    result["top1_error_gap"] = round(top1_error - PAPER_TOP1_ERROR, 6)
    result["top5_error_gap"] = round(top5_error - PAPER_TOP5_ERROR, 6)
    result["note"] = (
        f"top-1 error {top1_error:.2f}% vs the paper's {PAPER_TOP1_ERROR}% ({result['top1_error_gap']:+.2f} points), "
        f"top-5 error {top5_error:.2f}% vs {PAPER_TOP5_ERROR}% ({result['top5_error_gap']:+.2f}); "
        + (
            "ten crops averaged, as the paper's figures (section 4.1)"
            if ten_crop
            else "the paper's figures average ten crops (section 4.1): compare with launch/evaluate.py --ten-crop"
        )
    )
    return result


@dataclass(frozen=True)
class RunSummary:
    best_top1: float | None  # None: no validation ran
    best_top5: float | None
    wall_seconds: float
    wall_hours: float
    train_images: int
    images_per_sec: float
    world_size: int
    device: str
    gpu_hours: float  # each session's world size x its wall hours on CUDA, 0 on the CPU
    paper: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_run(
    best_top1: float | None,
    best_top5: float | None,
    wall_seconds: float,
    train_images: int,
    world_size: int,
    device_type: str,
    validated_classes: Sequence[str],  # the class folders the validation images cover
    gpu_seconds: float | None = None,  # the run's sessions summed (None: this session's world for all of it)
    synthetic: bool = False,
    ten_crop: bool = False,  # the validations averaged ten crops (data.val_ten_crop)
) -> RunSummary:
    hours = wall_seconds / 3600.0
    if gpu_seconds is None:
        gpu_seconds = session_gpu_seconds(world_size, device_type, wall_seconds)
    return RunSummary(
        best_top1=best_top1,
        best_top5=best_top5,
        wall_seconds=wall_seconds,
        wall_hours=hours,
        train_images=train_images,
        images_per_sec=train_images / wall_seconds if wall_seconds > 0 else 0.0,
        world_size=world_size,
        device=device_type,
        gpu_hours=gpu_seconds / 3600.0,
        paper=_paper(best_top1, best_top5, validated_classes, synthetic, ten_crop),
    )


def _paper(
    best_top1: float | None, best_top5: float | None, classes: Sequence[str], synthetic: bool, ten_crop: bool
) -> dict[str, Any]:
    if synthetic:
        return dict(SYNTHETIC)
    if best_top1 is None or best_top5 is None:
        return dict(NO_VALIDATION)
    return paper_comparison(best_top1, best_top5, classes, ten_crop)


def session_gpu_seconds(world_size: int, device_type: str, seconds: float) -> float:
    """GPU-seconds of `seconds` of one session: one GPU per process on CUDA, none on the CPU."""
    return world_size * seconds if device_type == "cuda" else 0.0


def format_summary(s: RunSummary) -> str:
    gpu = f"{s.gpu_hours:.2f} GPU-hours" if s.device == "cuda" or s.gpu_hours else "CPU only (0 GPU-hours)"
    accuracy = "no validation yet"
    if s.best_top1 is not None:
        accuracy = f"best val top-1 {s.best_top1:.2f}%, top-5 {s.best_top5:.2f}%"
    return (
        f"{accuracy}; {s.wall_seconds:.0f} s "
        f"({s.wall_hours:.2f} h) on {s.world_size} process(es), {_rate(s.images_per_sec)} images/s, {gpu}\n"
        f"{s.paper['note']}"
    )


def _rate(images_per_sec: float) -> str:
    """Whole images/s, but two significant digits below 10: a slow run is not "0 images/s"."""
    return f"{images_per_sec:.0f}" if images_per_sec >= 10 else f"{images_per_sec:.2g}"


# ---- the plot ----------------------------------------------------------------------------------
def _read_records(metrics_path: Path) -> list[dict[str, Any]]:
    try:
        return read_metrics(metrics_path)
    except OSError as exc:
        raise FileNotFoundError(f"cannot read metrics file {metrics_path}: {exc.strerror}") from exc


def _series(records: list[dict[str, Any]], split: str, key: str) -> tuple[list[float], list[float]]:
    # A record whose step is no number (a file edited by hand) has no place on the axis.
    rows = [r for r in records if r.get("split") == split and is_scalar(r.get(key)) and is_scalar(r.get("step"))]
    rows.sort(key=lambda r: r["step"])
    return [r["step"] for r in rows], [r[key] for r in rows]


def _finish_loss_axis(ax, records: list[dict[str, Any]]) -> None:
    """A diverging run's panel: its non-finite losses (null in metrics.jsonl) cannot be drawn,
    which the panel says, and losses over more than three decades get a log axis (on a linear
    one a single huge loss flattens every other)."""
    logged = [r for r in records if r.get("split") in ("train", "val") and "loss" in r]
    missing = sum(1 for r in logged if not is_scalar(r["loss"]))
    if missing:
        ax.text(0.02, 0.02, f"{missing} of {len(logged)} records have no finite loss (not drawn)",
                transform=ax.transAxes, color="tab:red", fontsize=9)  # fmt: skip
    losses = [r["loss"] for r in logged if is_scalar(r["loss"])]
    if losses and min(losses) > 0 and max(losses) > 1000 * min(losses):
        ax.set_yscale("log")


def _plot(ax, steps: list[float], values: list[float], **style: Any) -> None:
    """A curve; one point alone (a run stopped after its first log window) as a dot, which a
    line of one point does not show."""
    if len(steps) == 1:
        style.setdefault("marker", "o")
    ax.plot(steps, values, **style)


def build_training_figure(records: list[dict[str, Any]], title: str):
    """A 2x2 matplotlib figure: loss; top-1/top-5 accuracy; learning rate; images/s with the
    data-wait share. Train and val are drawn against the optimizer step."""
    # A Figure of its own, not pyplot's: no backend switched and no figure kept in the calling
    # process (matplotlib.use("Agg") turned a notebook's inline plots off).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 2, sharex=True)
    (ax_loss, ax_acc), (ax_lr, ax_speed) = axes
    styles = {"train": {"color": "tab:blue", "lw": 1.2}, "val": {"color": "tab:orange", "lw": 1.8, "marker": "o"}}
    for split, style in styles.items():
        steps, loss = _series(records, split, "loss")
        if steps:
            _plot(ax_loss, steps, loss, label=f"{split} loss", **style)
        for key, dash in (("top1", "-"), ("top5", "--")):
            steps, acc = _series(records, split, key)
            if steps:
                _plot(ax_acc, steps, acc, linestyle=dash, label=f"{split} {key.replace('top', 'top-')}", **style)
    _finish_loss_axis(ax_loss, records)
    steps, lr = _series(records, "train", "lr")
    if steps:
        # A train record's lr is the rate of the last step of the window that ends at its step:
        # drawn over that window (steps-pre), a change shows where it happened, not a window late.
        _plot(ax_lr, steps, lr, color="tab:green", drawstyle="steps-pre", label="learning rate")
        if min(lr) > 0:
            ax_lr.set_yscale("log")
    steps, speed = _series(records, "train", "images_per_sec")
    if steps:
        _plot(ax_speed, steps, speed, color="tab:purple", label="train images/s")
    steps, wait = _series(records, "train", "data_wait_share")
    if steps:
        ax_wait = ax_speed.twinx()
        _plot(ax_wait, steps, [100 * w for w in wait], color="tab:gray", linestyle=":", label="data wait %")
        ax_wait.set_ylabel("data wait (% of step time)")
        ax_wait.set_ylim(0, 100)
        ax_wait.legend(loc="upper right")  # and images/s upper left: "best" put the two on each other
    names = (
        ("loss", "cross-entropy"),
        ("accuracy", "accuracy (%)"),
        ("learning rate", "lr"),
        ("throughput", "images/s"),
    )
    for ax, (name, ylabel) in zip(axes.flat, names):
        ax.set_title(name)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left" if ax is ax_speed else "best")
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    if not records:
        fig.text(0.5, 0.5, "no metrics records yet", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_training_curves(metrics_path: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Read metrics.jsonl and write the training curves as a PNG (1200 x 800 pixels)."""
    metrics_path, out_png = Path(metrics_path), Path(out_png)
    fig = build_training_figure(_read_records(metrics_path), title or metrics_path.parent.name)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # Renamed into place: a plot drawn while another is written (launch/plot_run.py beside a
    # session's end) or a write cut short never leaves a torn PNG.
    write_bytes_atomic(out_png, png.getvalue())
    return out_png


def write_run_report(run_dir: Path, final: RunSummary, plot: bool = True) -> Path | None:
    """For the main rank at the end of a run: log the summary and draw its curves (unless `plot`
    is false, run.plot=false)."""
    log.info("%s", format_summary(final))
    return draw_run_curves(run_dir) if plot else None


def draw_run_curves(run_dir: Path) -> Path | None:
    """<run_dir>/training_curves.png from metrics.jsonl, at the end of every session (one that
    ended in an error too: a diverging run's is the plot that marks its non-finite losses). A plot
    that cannot be drawn is a warning, never an error: the run and its checkpoints are safe by
    then."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        log.warning("no %s yet: no %s drawn", metrics, PLOT_FILE)
        return None
    try:
        return plot_training_curves(metrics, run_dir / PLOT_FILE)
    except ImportError as exc:  # matplotlib missing or broken: the run itself has ended well
        log.warning("could not draw %s: matplotlib cannot be imported (%s; pip install matplotlib)",
                    run_dir / PLOT_FILE, exc)  # fmt: skip
        return None
    except Exception as exc:  # anything: it runs on the way out of a failed session too
        log.warning("could not draw %s: %s", run_dir / PLOT_FILE, exc)
        return None
