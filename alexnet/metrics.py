"""Top-k counts, exact distributed totals, throughput, and the metrics writers.

Accuracy across ranks is (sum of correct) / (sum of counted), never an average of per-rank
percentages; rows labelled PAD_LABEL (shard padding) are not counted.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipelines.base import PAD_LABEL
from pipelines.outputs import strict_json, write_text_atomic

log = logging.getLogger("alexnet")


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of rows whose label is among the top-k logits, for each k (padding rows excluded)."""
    valid = labels != PAD_LABEL
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = (top == labels[:, None]) & valid[:, None]
    return torch.stack([hits[:, : min(k, k_max)].any(dim=1).sum() for k in ks])


@dataclass
class Tally:
    """Running sums kept on the device (no host sync per step): loss sum, top-1, top-5, count."""

    device: torch.device
    sums: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def add(self, loss_sum: Tensor, correct: Tensor, count: Tensor | int) -> None:
        self.sums += torch.stack(
            [
                loss_sum.detach().double(),
                correct[0].double(),
                correct[1].double(),
                torch.as_tensor(count, device=self.device).double(),
            ]
        )

    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Sum over `group` (all ranks when distributed) and return loss, top1, top5, count."""
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, group=group)
        loss, c1, c5, n = sums.tolist()
        n_safe = max(n, 1.0)
        return {"loss": loss / n_safe, "top1": 100.0 * c1 / n_safe, "top5": 100.0 * c5 / n_safe, "count": int(n)}

    def reset(self) -> None:
        self.sums.zero_()


class Throughput:
    """Images per second over a window, and how much of the window was spent waiting for data."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.images = 0
        self.data_wait = 0.0

    def add(self, images: int, data_wait: float) -> None:
        self.images += images
        self.data_wait += data_wait

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of the window out (a checkpoint written in it): the figures are the
        training's, not the disk's."""
        self.start += seconds

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"images_per_sec": self.images / elapsed, "data_wait_share": self.data_wait / elapsed}


# Record keys that place a record (split, epoch, step) or say what a training record covers (the
# steps and images of its window, fewer at an epoch's end): bookkeeping, not curves to plot.
NOT_PLOTTED = frozenset({"split", "epoch", "step", "steps", "count", "time"})


def is_scalar(value: Any) -> bool:
    """A record's value TensorBoard draws: a finite number. A non-finite one is null in
    metrics.jsonl (strict JSON), so a later session's rewrite from the file has no point there:
    drawn live, it was a point that a resume took away. A flag (a validation's ten_crop) is no
    curve."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class MetricsWriter:
    """metrics.jsonl (one JSON object per line) and, optionally, TensorBoard scalars.

    A run that resumes from a checkpoint (its step and completed epochs: `start_step`,
    `start_epoch`) continues the record from there: what a crashed session wrote after that
    checkpoint is dropped, so the record holds each step once, as an uninterrupted run's does.
    A checkpoint of another run (`history_here` False: a run started from
    checkpoint.resume=<its file>) has none of this folder's records behind it: they were
    written by an attempt that did not lead to it, and all go. TensorBoard is made to show the
    kept records at every start: its earlier events are purged and the kept records written
    again (a session with TensorBoard off left steps out of it, which a purge from the
    checkpoint's step on did not bring back; one turned on at a resume starts where the run does)."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool,
        start_step: int = 0,
        start_epoch: int = 0,
        history_here: bool = True,
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        kept = _continue_records(self.path, start_step, start_epoch, history_here)
        self.kept_keys = {record_key(r) for r in kept}
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Purged whole and written again from the kept records: events of earlier sessions
            # may be missing (a session with TensorBoard off) or extra (a crashed session's
            # after its checkpoint), and only the records say which steps the run holds.
            existed = (run_dir / "tensorboard").exists()
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=0 if existed else None)
            for record in kept:
                self._add_scalars(record)

    def write(self, record: dict[str, Any]) -> None:
        """Append `record`, stamped with the time it is written ("time", Unix seconds: what
        TensorBoard's wall-clock axes show for it, also when a later session writes it again)."""
        record = {**record, "time": round(time.time(), 3)}
        with self.path.open("a") as f:
            f.write(strict_json(record) + "\n")
        self._add_scalars(record)

    def _add_scalars(self, record: dict[str, Any]) -> None:
        if self._tb is None:
            return
        step = int(record["step"])
        when = record.get("time")  # None (now) for a record written before records had it
        try:
            for key, value in record.items():
                if key not in NOT_PLOTTED and is_scalar(value):
                    self._tb.add_scalar(f"{record['split']}/{key}", value, step, walltime=when)
            self._tb.flush()
        except OSError as exc:
            self._stop_tensorboard(exc)

    def _stop_tensorboard(self, exc: OSError) -> None:
        """TensorBoard shows metrics.jsonl's records, and every session writes it again from them:
        a failed event write (its own full disk or quota) costs this session's view only. It was
        taken for metrics.jsonl's failure, so the record, already in the file, was also kept for
        the resumed session to write, which wrote it twice."""
        tb, self._tb = self._tb, None
        log.warning("cannot write TensorBoard's events in %s (%s): TensorBoard stops for this session; "
                    "metrics.jsonl goes on, and a resumed session writes TensorBoard again from it",
                    tb.log_dir, exc.strerror or exc)  # fmt: skip
        try:
            tb.close()
        except OSError:
            pass  # the writer's thread already failed, and its events are lost either way

    def close(self) -> None:
        if self._tb is not None:
            try:
                self._tb.close()
            except OSError as exc:
                self._stop_tensorboard(exc)


def record_key(record: dict[str, Any]) -> tuple[Any, Any, Any]:
    """What places a record in a run: one per split, epoch and step."""
    return record.get("split"), record.get("epoch"), record.get("step")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A line that is not a JSON object (a write cut short by a
    crash) is skipped with a warning: one torn line does not cost the rest of the record."""
    path = Path(path)
    records = []
    # The trainer writes ASCII JSON; bytes that are not UTF-8 (a damaged file) fail their line only.
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            log.warning("%s: line %d is not a metrics record; skipped", path, number)
    return records


def _continue_records(path: Path, step: int, epoch: int, history_here: bool) -> list[dict[str, Any]]:
    """The records behind the resumed checkpoint, the file rewritten to hold only them; the
    others are counted in the log (a rerun that starts over replaces an earlier attempt's)."""
    if not path.exists():
        return []
    records = read_metrics(path)
    kept = [r for r in records if history_here and _behind(r, step, epoch)]
    write_text_atomic(path, "".join(strict_json(r) + "\n" for r in kept))  # also strict JSON for older files
    dropped = len(records) - len(kept)
    if dropped and not history_here:
        log.warning("%s: dropped its %d record(s): none led to the checkpoint of another run that this run "
                    "starts from", path, dropped)  # fmt: skip
    elif dropped and step == 0:
        log.warning("%s: dropped %d record(s) of an earlier attempt that left no checkpoint: this run starts over",
                    path, dropped)  # fmt: skip
    elif dropped:
        log.info("%s: dropped %d record(s) written after the checkpoint this run resumes from (step %d)",
                 path, dropped, step)  # fmt: skip
    return kept


def _behind(record: dict[str, Any], step: int, epoch: int) -> bool:
    """Whether a run resumed at (`step`, `epoch` completed epochs) has `record` behind it: those
    of earlier steps, and of `step` itself all but a validation of a later epoch (one written
    after a periodic checkpoint at an epoch's last step and before the epoch's own: the resumed
    run validates that epoch again)."""
    at = record.get("step")
    if not isinstance(at, int) or at > step:
        return False
    return at < step or record.get("split") != "val" or int(record.get("epoch", 0)) <= epoch
