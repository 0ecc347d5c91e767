"""The training log, ``metrics.jsonl`` (one JSON object per detection pass, log window and validation): the window
of step statistics between two records, and the truncation that makes a resumed run's log read as one run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch import Tensor

from facesearch.model.fileio import atomic_write_text


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after ``step`` by an interrupted run, so the log reads as one uninterrupted run."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the interruption
            continue
        if record.get("step", 0) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


class LogWindow:
    """Accumulates step statistics (``loss*``, ``correct``, ``known``: 0-d tensors) between two ``train`` records;
    :meth:`record` gives the window's mean losses, accuracy, images/s and skipped steps."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.images = 0
        self.skipped_steps = 0
        self.t0 = time.perf_counter()

    def add(self, stats: dict[str, Tensor], images: int) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.images += images

    def record(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        vals = {k: float(v) for k, v in self.sums.items()}
        rec = {k: vals[k] / self.counts[k] for k in vals if k.startswith("loss")}
        if "correct" in vals:
            rec["acc"] = vals["correct"] / max(vals["known"], 1.0)
        rec["images_per_s"] = self.images / elapsed
        rec["skipped_steps"] = self.skipped_steps
        return rec


__all__ = ["LogWindow", "truncate_metrics"]
