"""What the search engine answers: :class:`Hit` s in a :class:`QueryResult` per query, the readable table of them
(:func:`format_results`, what ``facesearch search`` prints), and the helpers that keep answers one width."""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids), as STYLE.md asks
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Hit:
    """One gallery item (or, grouped, one identity with its best item) and its score."""

    id: int
    path: str
    identity: str | None
    score: float
    attributes: dict[str, float] = field(default_factory=dict)
    count: int = 1  # gallery items of this identity among the retrieved hits (grouped results)
    rank_score: float | None = None  # soft mode: the combined score the hits are ranked by


@dataclass(frozen=True)
class QueryResult:
    """The answer to one query: ranked hits, how they were found, and the open-set decision."""

    hits: tuple[Hit, ...]
    strategy: str
    seconds: float
    exact: bool
    passing: int | None = None  # gallery items that pass the filter
    accepted: bool | None = None  # best score >= threshold (None without a threshold)
    expected_recall_loss: float | None = None  # share of a matching person's images the filter drops (validation)
    margins: dict[str, float] | None = None  # attribute match: the confident margin of each matched attribute

    def to_dict(self) -> dict[str, Any]:
        return {"hits": [h.__dict__ for h in self.hits], "strategy": self.strategy, "seconds": self.seconds,
                "exact": self.exact, "passing": self.passing, "accepted": self.accepted,
                "expected_recall_loss": self.expected_recall_loss, "margins": self.margins}  # fmt: skip


def pad_columns(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """D, I widened to k columns with -inf / -1: a FAISS search returns fewer columns when asked for more items
    than it holds or than pass its selector, and callers stack answers of one width."""
    if D.shape[1] >= k:
        return D, I
    width = ((0, 0), (0, k - D.shape[1]))
    return np.pad(D, width, constant_values=-np.inf), np.pad(I, width, constant_values=-1)


def drop_ids(D: np.ndarray, I: np.ndarray, exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Each row of D, I (nq, c) without the id ``exclude[q]``: later hits move up, the row ends in -inf / -1."""
    if exclude is None:
        return D, I
    gone = (I == exclude[:, None]) & (I >= 0)
    if not gone.any():
        return D, I
    order = np.argsort(gone, axis=1, kind="stable")  # kept hits first, in their order
    D = np.take_along_axis(np.where(gone, -np.inf, D), order, 1).astype(np.float32)
    return D, np.take_along_axis(np.where(gone, -1, I), order, 1)


def format_results(
    names: Sequence[str], results: Sequence[QueryResult], attrs: Sequence[str] = (), first: Iterable[str] = ()
) -> str:
    """The readable table of ranked hits per query (what `facesearch search` prints): three attribute
    probabilities per hit, those named in ``first`` (e.g. the filter's) before the others."""
    wanted = set(first)
    shown = ([a for a in attrs if a in wanted] + [a for a in attrs if a not in wanted])[:3]
    lines = []
    for name, res in zip(names, results, strict=True):
        head = f"query {name}: {res.strategy} search, {res.seconds * 1e3:.1f} ms"
        head += f", {res.passing:,} pass the filter" if res.strategy not in ("none",) else ""
        if res.expected_recall_loss is not None:
            head += f" (expected to drop {100 * res.expected_recall_loss:.1f} % of a matching person's images)"
        head += "" if res.exact else " (approximate index)"
        if res.accepted is not None:
            head += ", ACCEPTED" if res.accepted else ", no match above the threshold"
        lines += [head, f"  {'rank':>4}  {'score':>7}  {'id':>13}  {'identity':<20}  {'attributes':<46}  path"]
        for r, h in enumerate(res.hits, 1):
            top = ", ".join(f"{a}={h.attributes[a]:.2f}" for a in shown)
            ident = "-" if h.identity is None else str(h.identity)[:20]
            lines.append(f"  {r:>4}  {h.score:7.4f}  {h.id:>13}  {ident:<20}  {top:<46}  {h.path}")
        lines.append("")
    return "\n".join(lines)


__all__ = ["Hit", "QueryResult", "drop_ids", "format_results", "pad_columns"]
