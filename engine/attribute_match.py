"""Probe-relative attribute matching: keep, for each query, the gallery items whose predicted attributes are not
confidently opposed to the probe's own predicted attributes.

This is the ``confident`` mode of :mod:`facesearch.engine.filter_cost` applied at search time.  With a margin ``m``
in [0, 0.5] per attribute, a face is confidently positive when its calibrated probability ``p > 1 - m`` and
confidently negative when ``p < m``; a gallery item is dropped for a probe only when, for some matched attribute, one
of the two is confidently positive and the other confidently negative.  A NaN probability (an attribute the predictor
could not read, on either side) is never confident, so it excludes nothing; ``m = 0`` excludes nothing either.

Unlike a literal filter (``Male > 0.5``: one mask for every query) the mask depends on the probe, but only through
its code, the two bit sets (confidently positive, confidently negative) over the matched attributes: queries with
equal codes share one mask.  :func:`match_groups` groups a batch by code (at most 3^k groups, one per query at
worst, usually few) and :meth:`facesearch.engine.search.SearchEngine.search` runs its ordinary exact retrieval once
per group with that group's mask.

The margins are given (:attr:`AttributeMatch.margins`) or chosen (:attr:`AttributeMatch.max_mate_loss`) from the
validation statistics the index's attribute columns carry, so that the predicted fraction of true mates lost is at
most the budget (:func:`facesearch.engine.filter_cost.choose_margins`); :func:`resolve_match` decides them and, when
statistics exist, predicts the cost (:class:`facesearch.engine.filter_cost.FilterCost`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from facesearch.engine.filter_cost import FilterCost, choose_margins, predicted_cost, statistics_from_source

MAX_ATTRIBUTES = 31  # each side's bits fit in one half of an int64 code
_LOW = (1 << 32) - 1


@dataclass(frozen=True)
class AttributeMatch:
    """Keep the gallery items whose ``attributes`` are not confidently opposed to the probe's (1 to 31 names of the
    index's attribute columns).  Exactly one of ``margins`` (one in [0, 0.5] per attribute, or one for all) and
    ``max_mate_loss`` (in [0, 1): the margins are chosen from the columns' validation statistics so that the
    predicted share of true mates lost is at most this)."""

    attributes: tuple[str, ...]
    margins: tuple[float, ...] | None = None
    max_mate_loss: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.attributes, str):
            raise ValueError(f"match attributes must be a sequence of attribute names, got the string "
                             f"{self.attributes!r}")  # fmt: skip
        attrs = tuple(self.attributes)
        object.__setattr__(self, "attributes", attrs)
        if not 1 <= len(attrs) <= MAX_ATTRIBUTES:
            raise ValueError(f"an attribute match needs 1 to {MAX_ATTRIBUTES} attributes, got {len(attrs)}")
        if len(set(attrs)) != len(attrs):
            raise ValueError(f"match attributes must be distinct, got {list(attrs)}")
        if (self.margins is None) == (self.max_mate_loss is None):
            raise ValueError("an attribute match needs exactly one of margins (fixed) and max_mate_loss (margins "
                             f"chosen from the validation statistics), got margins={self.margins} and "
                             f"max_mate_loss={self.max_mate_loss}")  # fmt: skip
        if self.margins is not None:
            margins = tuple(float(m) for m in self.margins)
            if len(margins) == 1:
                margins *= len(attrs)
            if len(margins) != len(attrs) or not all(0 <= m <= 0.5 for m in margins):
                raise ValueError(f"match margins: one in [0, 0.5] per attribute (or one for all), got "
                                 f"{list(self.margins)} for {list(attrs)}")  # fmt: skip
            object.__setattr__(self, "margins", margins)
        if self.max_mate_loss is not None and not 0 <= self.max_mate_loss < 1:
            raise ValueError(f"max_mate_loss must be in [0, 1), got {self.max_mate_loss}")


@dataclass(frozen=True)
class ResolvedMatch:
    """An :class:`AttributeMatch` with its margins decided; ``cost``: their predicted cost (mates lost, distractors
    removed) from the columns' validation statistics, None when the columns carry none."""

    match: AttributeMatch
    margins: dict[str, float]
    cost: FilterCost | None

    @property
    def mates_lost(self) -> float | None:
        return None if self.cost is None else self.cost.mates_lost

    def describe(self) -> str:
        """One phrase: the attributes and their margins, and the predicted cost when known."""
        margins = ", ".join(f"{a} {m:.2f}" for a, m in self.margins.items())
        text = f"not confidently opposed (margins {margins})"
        if self.cost is None:
            return text + "; no validation statistics to predict the mates lost"
        return (f"{text}; predicted to lose {100 * self.cost.mates_lost:.2f} % of true mates and remove "
                f"{100 * self.cost.distractors_removed:.1f} % of distractors")  # fmt: skip


def resolve_match(match: AttributeMatch, attribute_names: Sequence[str], source: Mapping[str, Any]) -> ResolvedMatch:
    """``match`` with its margins decided for a gallery with ``attribute_names`` whose columns came from ``source``
    (the index's ``attribute_provenance``).  An attribute the gallery lacks is a ``ValueError`` listing the valid
    ones; a ``max_mate_loss`` without validation statistics is the ``ValueError`` of
    :func:`facesearch.engine.filter_cost.statistics_from_source` (what is missing and why)."""
    unknown = [a for a in match.attributes if a not in attribute_names]
    if unknown:
        raise ValueError(f"attribute match: no attribute column {unknown} in this index (its attributes: "
                         f"{', '.join(attribute_names) or 'none'})")  # fmt: skip
    if match.margins is None:
        stats = statistics_from_source(source, match.attributes)
        chosen = choose_margins(stats, float(match.max_mate_loss or 0.0))
        margins = {a: float(chosen[a]) for a in match.attributes}
    else:
        margins = dict(zip(match.attributes, match.margins, strict=True))
        try:
            stats = statistics_from_source(source, match.attributes)
        except ValueError:  # fixed margins work without statistics; only their cost is unknown
            return ResolvedMatch(match, margins, None)
    return ResolvedMatch(match, margins, predicted_cost(stats, "confident", margins))


def side_codes(probs: np.ndarray, margins: Sequence[float]) -> np.ndarray:
    """Per row of ``probs`` (n, a) probabilities, one int64 code: bit ``i`` = attribute ``i`` confidently positive
    (p > 1 - m_i), bit ``32 + i`` = confidently negative (p < m_i); compared in float64, NaN sets neither."""
    probs = np.asarray(probs)
    return _codes([probs[:, i] for i in range(probs.shape[1])], margins)


def _codes(columns: Sequence[np.ndarray], margins: Sequence[float]) -> np.ndarray:
    """:func:`side_codes` of one (n,) array per attribute, column by column: a large gallery's columns are read in
    place, never stacked into an (n, a) copy."""
    codes = np.zeros(len(columns[0]), np.int64)
    for i, (column, m) in enumerate(zip(columns, margins, strict=True)):
        p = column.astype(np.float64)
        codes |= (p > 1.0 - m).astype(np.int64) << i
        codes |= (p < m).astype(np.int64) << (32 + i)
    return codes


def _opposite(code: int) -> int:
    """The code with its two sides swapped: what an item must not share with the probe."""
    return (code >> 32) | ((code & _LOW) << 32)


def probe_codes(resolved: ResolvedMatch, attribute_names: Sequence[str], probe_attributes: np.ndarray) -> np.ndarray:
    """The probes' codes (:func:`side_codes`) over the matched attributes; probe_attributes (nq, len(attribute_names))
    in the gallery's attribute order."""
    order = [list(attribute_names).index(a) for a in resolved.margins]
    return side_codes(np.asarray(probe_attributes)[:, order], list(resolved.margins.values()))


def probe_rows(
    rows: Sequence[Mapping[str, float | None]], attribute_names: Sequence[str], required: Sequence[str]
) -> np.ndarray:
    """Probes' attribute probabilities given by name, one mapping per query (as the HTTP service receives them) ->
    (nq, len(attribute_names)) float32 in the gallery's attribute order, NaN where a value is not given (or null).
    A name the gallery lacks, a ``required`` attribute not given, or a value outside [0, 1] is a ``ValueError``
    naming the row."""
    out = np.full((len(rows), len(attribute_names)), np.nan, np.float32)
    column = {a: j for j, a in enumerate(attribute_names)}
    for i, row in enumerate(rows):
        unknown, missing = sorted(set(row) - set(column)), [a for a in required if a not in row]
        if unknown or missing:
            what = f"unknown attribute(s) {unknown}" if unknown else f"no value for matched attribute(s) {missing}"
            raise ValueError(f"probe_attributes row {i}: {what} (the index's attributes: "
                             f"{', '.join(attribute_names)})")  # fmt: skip
        for a, p in row.items():
            if p is not None and not 0 <= p <= 1:
                raise ValueError(f"probe_attributes row {i}: {a} must be a probability in [0, 1] or null, got {p}")
            out[i, column[a]] = np.nan if p is None else p
    return out


def match_groups(
    resolved: ResolvedMatch,
    columns: Mapping[str, np.ndarray],
    attribute_names: Sequence[str],
    probe_attributes: np.ndarray | None,
    nq: int,
    base: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The queries grouped by their probe's code: ``(rows, keep)`` per group, ``rows`` the query rows (int64, in
    order), ``keep`` (nb,) bool the gallery rows not confidently opposed to those probes (and passing ``base``, a
    literal filter's mask), or None when every item passes (an undecided probe, no ``base``).

    probe_attributes: (nq, len(attribute_names)) probabilities in the gallery's attribute order; missing or of
    another shape is a ``ValueError`` saying what is needed."""
    want = (nq, len(attribute_names))
    if probe_attributes is None or np.shape(probe_attributes) != want:
        got = "none" if probe_attributes is None else f"shape {np.shape(probe_attributes)}"
        raise ValueError(f"attribute matching needs the probes' attribute probabilities, {want[0]} x {want[1]} (one "
                         f"row per query: {', '.join(attribute_names)}), got {got}; use image or id "
                         "queries")  # fmt: skip
    margins = list(resolved.margins.values())
    keys, inverse = np.unique(probe_codes(resolved, attribute_names, probe_attributes), return_inverse=True)
    gallery = None
    groups: list[tuple[np.ndarray, np.ndarray | None]] = []
    for j, key in enumerate(keys.tolist()):
        rows = np.flatnonzero(inverse.reshape(-1) == j)
        if key == 0:  # the probe is confident about nothing: it opposes no item
            groups.append((rows, base))
            continue
        if gallery is None:
            gallery = _codes([columns[a] for a in resolved.margins], margins)
        keep = (gallery & _opposite(key)) == 0
        groups.append((rows, keep if base is None else keep & base))
    return groups


def combined_loss(*losses: float | None) -> float | None:
    """The expected recall loss of independent filters: 1 - Π(1 - loss) over the known ones (None if none is)."""
    known = [x for x in losses if x is not None]
    return None if not known else 1.0 - math.prod(1.0 - x for x in known)


def match_summary(resolved: ResolvedMatch, passing: Sequence[int], nb: int) -> str:
    """One line for the command line: the margins, the predicted mates lost and the share of the gallery the queries
    kept (``passing``: items kept per query, of ``nb``)."""
    line = f"attribute match: {resolved.describe()}"
    if len(passing) and nb:
        share = np.asarray(passing, np.float64) / nb
        line += f"; {100 * share.mean():.1f} % of the gallery kept per query"
        if share.min() != share.max():
            line += f" ({100 * share.min():.1f}-{100 * share.max():.1f} %)"
    return line


__all__ = ["MAX_ATTRIBUTES", "AttributeMatch", "ResolvedMatch", "combined_loss", "match_groups", "match_summary",
           "probe_codes", "probe_rows", "resolve_match", "side_codes"]  # fmt: skip
