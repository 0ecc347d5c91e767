"""The ``soft`` attribute mode of the MegaFace harness, scored exactly: attribute-augmented features.

Soft mode excludes nothing; it scores every (probe, face) pair by ``(1 - w) cos + w * agreement`` with agreement the
mean over the ``M`` filter attributes of ``cos(pi (p - q) / 2)`` (p, q: the two calibrated probabilities; 1 when
equal, 0 for opposite certainties).  That score is an inner product of unit vectors::

    z = [ sqrt(1 - w) * x / |x| ,  sqrt(w / M) * (cos(pi p_a / 2), sin(pi p_a / 2)) for each attribute a ]

(``|z| = 1`` for every face, and ``cos(a) cos(b) + sin(a) sin(b) = cos(a - b)``), so the harness's exact evaluation
(:mod:`facesearch.benchmarks.megaface`: screened GEMM, canonical re-scoring, exact ties) runs unchanged on ``z`` in
place of ``x``: CMC, ROC and ties are those of the soft score, over every distractor, not a re-ranked shortlist.
``z`` is built in float64 and stored in float32 — what the evaluation then treats as the stored features.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from facesearch.benchmarks.megaface_data import DistractorSource
from facesearch.benchmarks.megaface_exact import canonical_normalize


def soft_features(x: np.ndarray, probs: Mapping[str, np.ndarray], attributes: Sequence[str], weight: float,
                  what: str) -> np.ndarray:  # fmt: skip
    """``z`` (n, d + 2M) float32 of the module docstring for raw features ``x`` (n, d) and their attribute
    probabilities ``probs[a]`` (n,) in [0, 1]; ``what`` names the rows in errors (a missing attribute or value)."""
    if not 0 < weight <= 1:
        raise ValueError(f"soft weight must be in (0, 1], got {weight}")
    missing = [a for a in attributes if a not in probs]
    if missing:
        raise ValueError(f"{what}: no predicted attribute(s) {missing} (have {sorted(probs)})")
    p = np.stack([np.asarray(probs[a], np.float64) for a in attributes], axis=1)
    if len(p) != len(x):
        raise ValueError(f"{what}: {len(x)} feature rows but {len(p)} attribute rows")
    bad = ~np.isfinite(p).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: attribute probabilities are missing for {int(bad.sum())} row(s)")
    p = np.clip(p, 0.0, 1.0)
    scale = np.sqrt(weight / len(attributes))
    angle = np.pi / 2 * p
    attr = np.empty((len(p), 2 * len(attributes)))
    attr[:, 0::2], attr[:, 1::2] = scale * np.cos(angle), scale * np.sin(angle)
    face = np.sqrt(1.0 - weight) * canonical_normalize(np.asarray(x))
    return np.concatenate([face, attr], axis=1).astype(np.float32)


class SoftDistractors(DistractorSource):
    """``source``'s rows as attribute-augmented features (:func:`soft_features`); ``take`` augments the re-read rows
    with the attribute values kept from the stream (8 bytes per row and attribute)."""

    def __init__(self, source: DistractorSource, attributes: Sequence[str], weight: float) -> None:
        self.source, self.names, self.weight = source, tuple(attributes), float(weight)
        self.n, self.attributes, self.provenance = source.n, source.attributes, source.provenance
        self.probs = np.full((source.n, len(self.names)), np.nan)
        self.seen = 0

    def blocks(self) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        self.seen = 0
        for xb, attrs in self.source.blocks():
            z = soft_features(xb, attrs, self.names, self.weight, f"distractors {self.seen}..{self.seen + len(xb) - 1}")
            self.probs[self.seen : self.seen + len(xb)] = np.stack([attrs[a] for a in self.names], axis=1)
            self.seen += len(xb)
            yield z, attrs

    def take(self, idx: np.ndarray) -> np.ndarray:
        probs = {a: self.probs[idx, i] for i, a in enumerate(self.names)}
        return soft_features(self.source.take(idx), probs, self.names, self.weight, "re-read distractors")


__all__ = ["SoftDistractors", "soft_features"]
