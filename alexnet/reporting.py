"""What a run tells people and machines: log lines or a progress bar, metrics records, the summary."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from alexnet.config import ConfigError
from alexnet.metrics import MetricsWriter, record_key
from alexnet.report import RunSummary, write_run_report
from pipelines.outputs import strict_json, write_text_atomic

log = logging.getLogger("alexnet")
MB = 1e6


def comm_per_step(totals: dict[str, int], steps: int) -> dict[str, float]:
    """Megabytes per step, by kind."""
    return {kind: value / MB / max(steps, 1) for kind, value in sorted(totals.items())}


def stop_state(summary: dict[str, Any]) -> str:
    """How the run ended, and what continues it."""
    reason = summary["stop_reason"]
    if summary["completed"]:
        return "finished"
    if reason == "max_steps":
        # The same command would stop again at once: the limit is part of the config.
        return "stopped (max_steps; raise train.max_steps, or set it to 0, to continue)"
    return f"stopped ({reason}; the same command resumes)"


def check_tensorboard_installed(enabled: bool) -> None:
    """Before a run starts, on every rank: run.tensorboard=true needs the tensorboard package.
    Found missing by rank 0 alone, in the middle of the setup, it was a traceback there and a
    broken collective on every other rank."""
    if not enabled:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"config key 'run.tensorboard' is true but TensorBoard cannot be imported ({exc}); "
            "pip install tensorboard, or set run.tensorboard=false (metrics.jsonl and training_curves.png "
            "are written either way)"
        ) from exc


def final_accuracy(top1: float | None) -> str:
    return "no validation yet" if top1 is None else f"final val top-1 {top1:.2f}%"


class MetricsWriteError(Exception):
    """The run's records could not be written: the run stops, with a checkpoint, on every rank."""


class Reporter:
    """Rank 0 writes; the other ranks stay quiet.

    A metrics record that cannot be written (a full disk, a file made unwritable) does not end
    rank 0 alone, which would leave the other ranks in a broken collective and lose the steps
    since the last checkpoint: `failure` says why, that record and the later ones go to `unwritten`
    (the run's Progress, so the checkpoint holds them and the resumed session writes them first),
    and the trainer stops every rank after the next step with a checkpoint, then raises it
    (MetricsWriteError)."""

    def __init__(
        self,
        run_dir: Path,
        is_main: bool,
        tensorboard: bool,
        progress: str,
        epochs: int,
        start: tuple[int, int] = (0, 0),  # the resumed checkpoint's (step, completed epochs)
        unwritten: list[dict[str, Any]] | None = None,  # records an earlier session could not write
        history_here: bool = True,  # False: the resumed checkpoint is another run's (see MetricsWriter)
        plot: bool = True,  # draw training_curves.png at the end (run.plot)
    ) -> None:
        self.run_dir = run_dir
        self.is_main = is_main
        self.epochs = epochs
        self._tensorboard, self._start, self._history_here = tensorboard, start, history_here
        self._plot = plot
        self.writer: MetricsWriter | None = None
        self.failure: str | None = None  # why a record could not be written (rank 0)
        self.unwritten: list[dict[str, Any]] = [] if unwritten is None else unwritten
        self.bar = is_main and (progress == "bar" or (progress == "auto" and sys.stderr.isatty()))

    def open(self) -> None:
        """Rank 0: open metrics.jsonl (trimmed to the resumed step) and TensorBoard's writer. The
        trainer runs it so that every rank learns of an OSError here."""
        if not self.is_main:
            return
        self.writer = MetricsWriter(self.run_dir, self._tensorboard, *self._start, history_here=self._history_here)
        if self.unwritten:  # they belong before this session's: the checkpoint's steps
            # Those a session that failed here before wrote are in the file already.
            missing = [r for r in self.unwritten if record_key(r) not in self.writer.kept_keys]
            for record in missing:
                self.writer.write(record)
            log.info("wrote the %d metrics record(s) an earlier session could not write", len(missing))
            self.unwritten.clear()
        if self.bar:  # here, not at the first step: there the other ranks would be in its collectives
            try:
                import tqdm  # noqa: F401
            except ImportError as exc:
                log.warning("no progress bar: tqdm cannot be imported (%s); log lines instead", exc)
                self.bar = False

    def _record(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        if self.failure is not None:
            self.unwritten.append(record)
            return
        try:
            self.writer.write(record)
        except OSError as exc:
            self.unwritten.append(record)
            self.failure = (
                f"cannot write metrics file {self.writer.path} ({exc.strerror or exc}; the record of step "
                f"{record['step']} and later ones are kept in the checkpoint, for the resumed run to write)"
            )
            log.error("%s: training stops with a checkpoint", self.failure)

    def wrap_epoch(self, loader, epoch: int, done: int = 0):
        """The loader itself, or a tqdm bar around it on rank 0 when it writes to a terminal;
        `done`: the epoch's steps taken before (a resume mid-epoch, whose loader yields the rest:
        counted from 0, the bar ended a resumed epoch at "10/20 50%")."""
        if not self.bar:
            return loader
        from tqdm import tqdm

        desc = f"epoch {epoch + 1}/{self.epochs}"
        return tqdm(loader, total=len(loader), initial=done, desc=desc, leave=False, dynamic_ncols=True)

    def train(self, record: dict[str, Any], batches) -> None:
        self._record(record)
        skipped = record.get("skipped_steps", 0)
        if hasattr(batches, "set_postfix"):
            shown = {"loss": f"{record['loss']:.3f}", "top1": f"{record['top1']:.1f}",
                     "img_s": f"{record['images_per_sec']:.0f}"}  # fmt: skip
            batches.set_postfix(shown | ({"skipped": f"{skipped}/{record['steps']}"} if skipped else {}))
            return
        comm = sum(record.get("comm_sent_mb", {}).values())
        log.info(
            "epoch %d  step %d  loss %.4f  top-1 %.2f%%  lr %.4g  %.0f img/s  data wait %.0f%%%s%s",
            record["epoch"],
            record["step"],
            record["loss"],
            record["top1"],
            record["lr"],
            record["images_per_sec"],
            100 * record["data_wait_share"],
            f"  sent {comm:.1f} MB/step" if comm else "",
            f"  {skipped} of {record['steps']} skipped" if skipped else "",
        )

    def validation(self, record: dict[str, Any]) -> None:
        self._record(record)
        log.info(
            "epoch %d/%d  val loss %.4f  top-1 %.2f%%  top-5 %.2f%%  (%d images)",
            record["epoch"],
            self.epochs,
            record["loss"],
            record["top1"],
            record["top5"],
            record["count"],
        )

    def summary(self, summary: dict[str, Any], final: RunSummary) -> None:
        """summary.json, the closing log lines, and training_curves.png unless run.plot=false (rank 0)."""
        if not self.is_main:
            return
        self.write_summary(summary)
        epochs, steps = summary["epochs"], summary["steps"]
        log.info("%s after %d epoch%s / %d step%s (%s); run folder %s", stop_state(summary), epochs,
                 "" if epochs == 1 else "s", steps, "" if steps == 1 else "s", final_accuracy(summary["final_top1"]),
                 summary["run_dir"])  # fmt: skip
        if summary.get("comm_sent_mb_per_step"):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in summary["comm_sent_mb_per_step"].items())
            log.info("sent per rank per step (MB): %s", parts)
        write_run_report(self.run_dir, final, self._plot)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_text_atomic(self.run_dir / "summary.json", strict_json(summary, indent=2) + "\n")

    def close(self) -> None:
        """Idempotent: a run closes it at its end, and again (as a failed run) on the way out."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()
