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
rate, the margins that together remove the most distractors (predicted) within it, from the attributes validated
on at least :data:`MIN_CLASS_FACES` faces of each class (a tail seen in a few of 20 validation faces of 3 people
may be several times wider on the next people); the result also carries an upper confidence bound of the loss
(Wilson bounds on each class's side probabilities and on the prior).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from facesearch.indexer.manifest import describe_attribute_source

#: Filter modes: decided at a threshold, or excluded only when both sides are confident and disagree.
MODES: tuple[str, ...] = ("hard", "confident")
#: The budget grid of :func:`choose_margins` (log-space mate-loss budget in this many steps).
BUDGET_STEPS = 4000
#: The reported upper confidence bound of the mate loss (:attr:`FilterCost.mates_lost_bound`): this many standard
#: errors (one-sided 90 %) above the validation estimate.
BOUND_Z = 1.2816
#: :func:`choose_margins` gives no margin to an attribute whose validation statistics hold fewer faces of either class
#: than this: its tails are not estimated (20 positives of 3 or 4 people are not the next people's distribution).
MIN_CLASS_FACES = 50


def wilson_upper(p: Any, n: Any, z: float = 0.0) -> Any:
    """The Wilson score upper bound of a proportion ``p`` observed in ``n`` trials, ``z`` standard errors up (``p``
    itself at ``z = 0``)."""
    p, n = np.asarray(p, np.float64), np.maximum(np.asarray(n, np.float64), 1e-12)
    z2 = z * z
    return np.minimum((p + z2 / (2 * n) + z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))) / (1 + z2 / n), 1.0)


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

    def lost_bound(self, mode: str, value: float, z: float = BOUND_Z) -> float:
        """An upper confidence bound on the mates lost of this attribute alone: each class's two side probabilities
        and the prior at their Wilson upper bounds (``z`` standard errors; the counts are the validation images).
        A tail seen in 3 of 20 validation positives is not taken as 15 %: few validation faces, wide bound."""
        p_pos, p_neg = self.sides(mode, value)
        n = np.array([self.positive.sum(), self.negative.sum()])
        per_class = np.minimum(2 * wilson_upper(p_pos, n, z) * wilson_upper(p_neg, n, z), 0.5)
        lo, hi = 1 - wilson_upper(1 - self.prior, n.sum(), z), wilson_upper(self.prior, n.sum(), z)
        return float(max(pi * per_class[0] + (1 - pi) * per_class[1] for pi in (lo, hi)))

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
    mates_lost_bound: float | None = None  # the upper confidence bound (confident mode)

    def to_dict(self) -> dict[str, Any]:
        return {"mates_lost": self.mates_lost, "distractors_removed": self.distractors_removed,
                "mates_lost_bound": self.mates_lost_bound,
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
    bound = 1 - float(np.prod([1 - s.lost_bound(mode, values[a]) for a, s in stats.items()]))
    return FilterCost(1 - kept_mates, 1 - kept_distractors, per, bound)


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


def choose_margins(
    stats: Mapping[str, AttributeStats], max_mate_loss: float, z: float = 0.0, min_class_faces: int = MIN_CLASS_FACES
) -> dict[str, float]:
    """Per attribute, the ``confident`` margin on its histogram grid such that together they remove the most
    distractors (predicted) while the predicted mate loss stays within ``max_mate_loss`` (0 = the attribute excludes
    nothing).  ``z > 0`` keeps an upper confidence bound of the loss within it instead (:meth:`AttributeStats.
    lost_bound`; very cautious with a few hundred validation faces); an attribute with fewer than
    ``min_class_faces`` validation faces of a class gets no margin.  Attributes combine as
    independent, so both totals add in log space and the choice is a
    multiple-choice knapsack: solved exactly by dynamic programming over the budget, with each attribute's cost rounded
    *up* to the budget grid (the result never exceeds the target; at worst it leaves ``1/BUDGET_STEPS`` of it unused).
    A well-predicted attribute gets a wide margin, a poor one little or none."""
    if not 0 <= max_mate_loss < 1:
        raise ValueError(f"max_mate_loss must be in [0, 1), got {max_mate_loss}")
    names = list(stats)
    budget = -math.log1p(-max_mate_loss)
    if budget == 0 or not names:
        return dict.fromkeys(names, 0.0)
    unit = budget / BUDGET_STEPS
    best = np.zeros(BUDGET_STEPS + 1)  # best[g]: most log-distractor removal with at most g budget units spent
    picks = []
    for a in names:
        s = stats[a]
        margins = np.arange(s.bins // 2 + 1) / s.bins
        if min(s.positive.sum(), s.negative.sum()) < min_class_faces:
            margins = margins[:1]
        removed = np.array([s.cost("confident", float(m))[1] for m in margins])
        lost = np.array([s.lost_bound("confident", float(m), z) for m in margins])
        # log-space cost in whole units, rounded up (a hair of slack against float error); removal as -log(kept)
        cost = np.ceil(-np.log1p(-np.minimum(lost, 1 - 1e-15)) / unit - 1e-9).clip(0)
        gain = -np.log1p(-np.minimum(removed, 1 - 1e-15))
        new = np.full(BUDGET_STEPS + 1, -np.inf)
        arg = np.zeros(BUDGET_STEPS + 1, np.int64)
        for o in range(len(margins)):  # later (wider) options win ties only when strictly better
            c = int(cost[o])
            if c > BUDGET_STEPS:
                continue
            cand = np.full(BUDGET_STEPS + 1, -np.inf)
            cand[c:] = best[: BUDGET_STEPS + 1 - c] + gain[o]
            better = cand > new + 1e-15
            new[better], arg[better] = cand[better], o
        picks.append((arg, cost.astype(np.int64), margins))
        best = new
    out: dict[str, float] = {}
    g = BUDGET_STEPS
    for a, (arg, cost, margins) in zip(reversed(names), reversed(picks), strict=True):
        o = int(arg[g])
        out[a] = float(margins[o])
        g -= int(cost[o])
    return {a: out[a] for a in names}


__all__ = ["BOUND_Z", "MIN_CLASS_FACES", "MODES", "AttributeStats", "FilterCost", "choose_margins",
           "literal_recall_loss", "predicted_cost", "statistics_from_source", "wilson_upper"]  # fmt: skip
