"""What an attribute filter costs, predicted from the validation statistics that travel with the attribute columns.

An attribute filter compares a probe and a gallery item by their *predicted* attributes, so it loses a true mate
whenever the two predictions of one person disagree.  Each attribute's side of a face is decided from its calibrated
probability ``p``:

- ``hard`` (threshold ``t``): positive when ``p > t``, negative otherwise; an item is excluded when the probe's side
  differs (today's filter);
- ``confident`` (margin ``m`` in [0, 0.5]): positive when ``p > 1 - m``, negative when ``p < m``, undecided in between;
  an item is excluded only when one side is confidently positive and the other confidently negative.  ``m = 0``
  excludes nothing; ``m`` near 0.5 approaches ``hard`` at 0.5.

With the class-conditional distributions of ``p`` on the predictor's validation people (histograms of positives and
negatives, :func:`facesearch.model.predictors.calibration.score_histogram`) and the assumption that two images'
predictions are independent given the person's true attribute, per attribute:

- mates lost ``= Σ_c π_c (P(pos | c) P(neg | c) + P(neg | c) P(pos | c))`` (the two images of one person, true class
  ``c`` with prior ``π_c``, land on opposite confident sides);
- distractors removed ``= P(pos) P(neg) + P(neg) P(pos)`` with ``P(side) = Σ_c π_c P(side | c)`` (two unrelated
  people, drawn from the validation prior).

Several attributes combine as independent: kept ``= Π (1 - lost_a)``.  The independence of a person's two images is
optimistic (the same face fools a predictor twice more often than two faces do), which is why the harness reports
the measured fractions beside the predicted ones.  :func:`choose_margins` picks, for a target overall mate-loss
rate, the widest margin of each attribute (most distractors removed) whose predicted loss fits an equal share of
the budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from facesearch.indexer.manifest import describe_attribute_source

#: Filter modes: decided at a threshold, or excluded only when both sides are confident and disagree.
MODES: tuple[str, ...] = ("hard", "confident")


@dataclass(frozen=True)
class AttributeStats:
    """One attribute's validation statistics: counts of calibrated probabilities of known ``positive`` and
    ``negative`` faces in equal bins of [0, 1], and the balanced accuracy at 0.5 when recorded."""

    name: str
    positive: np.ndarray
    negative: np.ndarray
    balanced_accuracy: float | None = None

    def __post_init__(self) -> None:
        if self.positive.shape != self.negative.shape or self.positive.ndim != 1 or len(self.positive) < 2:
            raise ValueError(f"{self.name}: positive and negative histograms must be 1-d of one length >= 2")
        if self.positive.sum() <= 0 or self.negative.sum() <= 0:
            raise ValueError(f"{self.name}: the validation statistics need both positives and negatives")

    @property
    def bins(self) -> int:
        return len(self.positive)

    @property
    def prior(self) -> float:
        """The validation share of positives."""
        return float(self.positive.sum() / (self.positive.sum() + self.negative.sum()))

    def sides(self, mode: str, value: float) -> tuple[np.ndarray, np.ndarray]:
        """(P(pos | c), P(neg | c)) for c = (positive, negative), each (2,), under ``mode`` at ``value`` (the
        threshold of ``hard``, the margin of ``confident``), read from the histograms on their bin edges (a
        ``value`` between edges is taken at the nearest edge)."""
        k = self.bins
        pos_h, neg_h = self.positive / self.positive.sum(), self.negative / self.negative.sum()
        if mode == "hard":
            cut = round(value * k)
            lo, hi = cut, cut  # negative: bins below the threshold, positive: bins above it
        elif mode == "confident":
            m = round(value * k)
            lo, hi = m, k - m
        else:
            raise ValueError(f"filter mode must be one of {list(MODES)}, got {mode!r}")
        p_pos = np.array([pos_h[hi:].sum(), neg_h[hi:].sum()])
        p_neg = np.array([pos_h[:lo].sum(), neg_h[:lo].sum()])
        return p_pos, p_neg

    def cost(self, mode: str, value: float) -> tuple[float, float]:
        """(mates lost, distractors removed) of this attribute alone (see the module docstring)."""
        p_pos, p_neg = self.sides(mode, value)
        prior = np.array([self.prior, 1 - self.prior])
        lost = float((prior * 2 * p_pos * p_neg).sum())
        marg_pos, marg_neg = float((prior * p_pos).sum()), float((prior * p_neg).sum())
        return lost, 2 * marg_pos * marg_neg


@dataclass(frozen=True)
class FilterCost:
    """Predicted fractions of true mates lost and of distractors removed, overall and per attribute."""

    mates_lost: float
    distractors_removed: float
    per_attribute: dict[str, tuple[float, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"mates_lost": self.mates_lost, "distractors_removed": self.distractors_removed,
                "per_attribute": {a: {"mates_lost": lo, "distractors_removed": rm}
                                  for a, (lo, rm) in self.per_attribute.items()}}  # fmt: skip


def statistics_from_source(source: Mapping[str, Any], names: list[str] | tuple[str, ...]) -> dict[str, AttributeStats]:
    """The :class:`AttributeStats` of ``names`` from an attribute provenance record (a shard manifest's or an
    index's ``attribute_source``, with the predictor's ``validation`` statistics).  ``ValueError`` saying what is
    missing when the columns carry none (e.g. filled by an identity network's own head)."""
    attrs = ((source.get("validation") or {}).get("attributes")) or {}
    missing = [n for n in names if "histogram" not in (attrs.get(n) or {})]
    if missing:
        what = describe_attribute_source(source)
        raise ValueError(f"no validation statistics for {missing}: the attribute columns come from {what}, which "
                         "recorded none (embed with --attributes-from a predictor trained by `facesearch attributes "
                         "train`, or give the confident filter an explicit margin)")  # fmt: skip
    out = {}
    for n in names:
        h = attrs[n]["histogram"]
        out[n] = AttributeStats(n, np.asarray(h["positive"], np.float64), np.asarray(h["negative"], np.float64),
                                attrs[n].get("balanced_accuracy"))  # fmt: skip
    return out


def predicted_cost(stats: Mapping[str, AttributeStats], mode: str, values: Mapping[str, float]) -> FilterCost:
    """The cost of filtering on every attribute of ``stats`` under ``mode`` with per-attribute ``values``
    (thresholds or margins); attributes combine as independent."""
    per = {a: s.cost(mode, values[a]) for a, s in stats.items()}
    kept_mates = float(np.prod([1 - lo for lo, _ in per.values()]))
    kept_distractors = float(np.prod([1 - rm for _, rm in per.values()]))
    return FilterCost(1 - kept_mates, 1 - kept_distractors, per)


def literal_recall_loss(
    stats: Mapping[str, AttributeStats], conditions: list[tuple[str, str, float]]
) -> tuple[float, dict[str, float]]:
    """The expected fraction of a person's gallery images that a literal filter (a conjunction of ``(attribute, op,
    threshold)`` conditions, :meth:`facesearch.engine.filters.Filter.thresholds`) drops *when the person truly has
    what it asks for* (``>`` / ``>=``: the attribute, ``<`` / ``<=``: its absence): per condition the share of the
    validation images of that class on the failing side, combined as independent.  Returns (loss, per condition)."""
    per: dict[str, float] = {}
    kept = 1.0
    for name, op, t in conditions:
        p_pos, p_neg = stats[name].sides("hard", t)  # per true class (positive, negative): read above / at or below t
        fail = float(p_neg[0]) if op in (">", ">=") else float(p_pos[1])
        per[f"{name} {op} {t:g}"] = fail
        kept *= 1 - fail
    return 1 - kept, per


def choose_margins(stats: Mapping[str, AttributeStats], max_mate_loss: float) -> dict[str, float]:
    """Per attribute, the widest ``confident`` margin on its histogram grid whose predicted mate loss is at most an
    equal share ``1 - (1 - max_mate_loss)^(1/k)`` of the budget (0 = the attribute excludes nothing)."""
    if not 0 <= max_mate_loss < 1:
        raise ValueError(f"max_mate_loss must be in [0, 1), got {max_mate_loss}")
    share = 1 - (1 - max_mate_loss) ** (1 / max(len(stats), 1))
    out = {}
    for a, s in stats.items():
        best = 0.0
        for m in range(s.bins // 2, 0, -1):  # widest first; the loss only grows with the margin
            value = m / s.bins
            if s.cost("confident", value)[0] <= share + 1e-12:
                best = value
                break
        out[a] = best
    return out


__all__ = ["MODES", "AttributeStats", "FilterCost", "choose_margins", "literal_recall_loss", "predicted_cost",
           "statistics_from_source"]  # fmt: skip
