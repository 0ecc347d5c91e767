"""The side-by-side attribute table (ATTRIBUTE_MODELS.md §0): several predictors, one identity-disjoint test split,
the same faces, the same metric.

:func:`read_split` takes the test people of a CelebA-format root (``list_eval_partition.txt``) or of a list CSV with
attribute columns (empty = unknown; people are split by a hash of their identity, so a list of only test people is
read with ``split="all"``).  :func:`compare_predictors` runs every predictor on the faces of that split (each on its
own crop of the same landmarks) and keeps the faces every predictor could read; per attribute it reports n+ / n−,
balanced accuracy and accuracy at 0.5 of the calibrated probabilities, the expected calibration error, and per
predictor the unweighted mean balanced accuracy with an identity-bootstrap 95 % interval (people resampled with
replacement; every predictor sees the same resamples, so the paired difference to the first predictor gets an
interval too), parameters, MACs per image and training seconds.  :func:`render_comparison` writes the Markdown,
:func:`plot_comparison` the bar chart.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.model.faces.celeba import read_celeba
from facesearch.model.faces.datasets import FaceDataset
from facesearch.model.faces.detect import FaceDetector
from facesearch.model.faces.samples import Sample, read_list
from facesearch.model.predictors import AttributePredictor
from facesearch.model.predictors.base import predict_dataset
from facesearch.model.predictors.calibration import expected_calibration_error
from facesearch.model.tables import render_table

#: ``--format`` choices.
DATA_FORMATS: tuple[str, ...] = ("celeba", "list")
#: ``--split`` -> CelebA partition / list hash bucket (None = everything).
SPLITS: dict[str, int | None] = {"train": 0, "val": 1, "test": 2, "all": None}


def identity_bucket(identity: str) -> int:
    """0 train / 1 val / 2 test for a list CSV's person: 80 / 10 / 10 by a stable hash of the identity."""
    h = int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "little") % 10
    return 0 if h < 8 else 1 if h == 8 else 2


def read_split(data: Path, data_format: str = "celeba", split: str = "test") -> list[Sample]:
    """The labelled samples of one identity-disjoint split (see the module docstring).  Raises ``ValueError``
    when the split holds no labelled image or a list has no identity column to split by."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"format must be one of {list(DATA_FORMATS)}, got {data_format!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    data = Path(data)
    if data_format == "celeba":
        if not (data / "list_attr_celeba.txt").is_file():
            raise FileNotFoundError(f"{data}: not a CelebA-format root (no list_attr_celeba.txt)")
        samples = read_celeba(data, SPLITS[split])
    else:
        if not data.is_file():
            raise FileNotFoundError(f"list CSV {data} does not exist")
        samples = read_list(data)
        if SPLITS[split] is not None:
            if any(s.identity is None for s in samples):
                raise ValueError(f"{data}: splitting by person needs an identity column (or use --split all)")
            samples = [s for s in samples if identity_bucket(str(s.identity)) == SPLITS[split]]
    samples = [s for s in samples if s.attributes]
    if not samples:
        raise ValueError(f"{data}: no labelled image in the {split!r} split")
    return samples


@dataclass
class PredictorScores:
    """One predictor's row group of the table."""

    name: str
    key: str
    fingerprint: str
    parameters: int
    macs: int
    train_seconds: float | None
    per_attribute: dict[str, dict[str, Any]]
    mean_balanced_accuracy: float
    ci95: tuple[float, float]
    difference: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Comparison:
    attributes: list[str]
    images: int
    identities: int
    skipped: dict[str, int]
    predictors: list[PredictorScores]
    bootstrap: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list | tuple):
                return [clean(v) for v in x]
            return x

        return clean({
            "attributes": self.attributes, "images": self.images, "identities": self.identities,
            "skipped": self.skipped, "bootstrap": self.bootstrap, **self.meta,
            "predictors": [p.__dict__ for p in self.predictors],
        })  # fmt: skip


def _balanced_columns(prob: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Balanced accuracy per column of (n, m) probabilities vs 0/1/NaN labels, optionally with per-row weights
    (bootstrap multiplicities); NaN where a class is absent."""
    w = np.ones(len(y)) if weights is None else weights
    known = np.isfinite(y)
    pos, neg = known & (y > 0.5), known & (y <= 0.5)
    hit = prob > 0.5
    wp, wn = (pos * w[:, None]).sum(0), (neg * w[:, None]).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = ((pos & hit) * w[:, None]).sum(0) / wp
        tnr = ((neg & ~hit) * w[:, None]).sum(0) / wn
    predicted = np.isfinite(prob).any(0)  # a column the predictor does not have is NaN, not "always negative"
    return np.where((wp > 0) & (wn > 0) & predicted, (tpr + tnr) / 2, np.nan)


@dataclass(frozen=True)
class ScoredFaces:
    """Every predictor's calibrated probabilities on the faces all of them could read: ``attributes`` (the labelled
    ones, first predictor's order first), ``labels`` (n, m) 0/1/NaN, ``people`` (n,) person index per face,
    ``probabilities`` name -> (n, m) (NaN where a predictor lacks the attribute), ``skipped`` name -> count."""

    attributes: list[str]
    labels: np.ndarray
    people: np.ndarray
    probabilities: dict[str, np.ndarray]
    skipped: dict[str, int]

    @property
    def n_people(self) -> int:
        return int(self.people.max()) + 1 if len(self.people) else 0

    def draws(self, bootstrap: int, seed: int = 0) -> list[np.ndarray]:
        """``bootstrap`` identity resamples as per-face multiplicities (people drawn with replacement)."""
        rng, n = np.random.default_rng(seed), self.n_people
        return [np.bincount(rng.integers(0, n, n), minlength=n)[self.people] for _ in range(bootstrap)]


def score_faces(
    predictors: Mapping[str, AttributePredictor], samples: Sequence[Sample], batch_size: int = 128, num_workers: int = 0
) -> ScoredFaces:
    """Run every predictor on ``samples`` (each on its own crop of the same landmarks); see :class:`ScoredFaces`."""
    if not predictors:
        raise ValueError("no predictor to compare")
    labelled = sorted({a for s in samples for a in (s.attributes or {})})
    names = [a for a in next(iter(predictors.values())).attributes if a in labelled]
    for p in predictors.values():
        names += [a for a in p.attributes if a in labelled and a not in names]
    if not names:
        raise ValueError(f"none of the predictors' attributes is labelled in the data (labels: {labelled[:10]})")
    detector = FaceDetector if any(s.landmarks is None for s in samples) else None
    probs: dict[str, np.ndarray] = {}
    skipped: dict[str, int] = {}
    for name, p in predictors.items():
        ds = FaceDataset(samples, size=p.input_spec.size, margin=p.input_spec.margin, detector_factory=detector)
        out, skips = predict_dataset(p, ds, batch_size, num_workers)
        probs[name], skipped[name] = out, len(skips)
    ok = np.all([np.isfinite(v).all(axis=1) for v in probs.values()], axis=0)
    kept = [s for s, good in zip(samples, ok, strict=True) if good]
    y = np.array([[(s.attributes or {}).get(a, np.nan) for a in names] for s in kept], np.float64)
    people = np.unique(np.array([str(s.identity) for s in kept], dtype=object).astype(str), return_inverse=True)[1]
    columns = {}
    for name, p in predictors.items():
        cols = [p.attributes.index(a) if a in p.attributes else -1 for a in names]
        columns[name] = np.stack([probs[name][ok][:, c] if c >= 0 else np.full(len(kept), np.nan) for c in cols], 1)
    return ScoredFaces(names, y.reshape(len(kept), len(names)), people, columns, skipped)


def mean_balanced(prob: np.ndarray, y: np.ndarray, draws: Sequence[np.ndarray]) -> np.ndarray:
    """The mean over attributes of the balanced accuracy under each bootstrap draw (attributes without both classes
    in a draw are left out of that draw's mean)."""
    with warnings.catch_warnings():  # a resample may lack a class of an attribute: NaN, dropped by nanmean
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.array([np.nanmean(_balanced_columns(prob, y, w)) for w in draws])


def compare_predictors(
    predictors: Mapping[str, AttributePredictor],
    samples: Sequence[Sample],
    batch_size: int = 128,
    num_workers: int = 0,
    bootstrap: int = 1000,
    seed: int = 0,
) -> Comparison:
    """Every predictor on ``samples`` (see the module docstring)."""
    scored = score_faces(predictors, samples, batch_size, num_workers)
    names, y = scored.attributes, scored.labels
    draws = scored.draws(bootstrap, seed)
    rows: list[PredictorScores] = []
    reference: np.ndarray | None = None
    for name, p in predictors.items():
        prob = scored.probabilities[name]
        bal = _balanced_columns(prob, y)
        known = np.isfinite(y) & np.isfinite(prob)
        acc = np.where(known.any(0), ((prob > 0.5) == (y > 0.5)).sum(0, where=known) / np.maximum(1, known.sum(0)),
                       np.nan)  # fmt: skip
        ece = expected_calibration_error(np.nan_to_num(prob, nan=0.5), np.where(np.isfinite(prob), y, np.nan))
        boot = mean_balanced(prob, y, draws)
        mean = float(np.nanmean(bal))
        ci = (float(np.nanpercentile(boot, 2.5)), float(np.nanpercentile(boot, 97.5))) if len(boot) else (mean, mean)
        diff = None
        if reference is None:
            reference = boot
        elif len(boot):
            ref_mean = rows[0].mean_balanced_accuracy
            d = boot - reference
            diff = {"versus": rows[0].name, "mean": mean - ref_mean,
                    "ci95": [float(np.nanpercentile(d, 2.5)), float(np.nanpercentile(d, 97.5))]}  # fmt: skip
        per = {a: {"n_pos": int((known[:, j] & (y[:, j] > 0.5)).sum()), "n_neg": int((known[:, j] & (y[:, j] <= 0.5))
                   .sum()), "balanced_accuracy": float(bal[j]), "accuracy": float(acc[j]), "ece": float(ece[j])}
               for j, a in enumerate(names)}  # fmt: skip
        seconds = (p.meta.get("train_seconds") or {}).get("total")
        rows.append(PredictorScores(name, p.key, p.fingerprint, p.parameters, p.macs, seconds, per, mean, ci, diff,
                                    {"path": None if p.path is None else str(p.path), "input": p.input_spec.to_dict(),
                                     "calibration": p.calibration.method}))  # fmt: skip
    return Comparison(names, len(y), scored.n_people, scored.skipped, rows, bootstrap)


def _pct(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"


def render_comparison(c: Comparison) -> str:
    """Markdown: per attribute n+/n− and each predictor's balanced accuracy (accuracy); then per predictor the mean
    with its interval, the paired difference, ECE, parameters, MACs and training time."""
    first = c.predictors[0].per_attribute
    head = ["attribute", "n+", "n−"] + [f"{p.name} bal. acc % (acc %)" for p in c.predictors]
    rows = [[a, first[a]["n_pos"], first[a]["n_neg"]]
            + [f"{_pct(p.per_attribute[a]['balanced_accuracy'])} ({_pct(p.per_attribute[a]['accuracy'])})"
               for p in c.predictors] for a in c.attributes]  # fmt: skip
    table = render_table(head, rows)
    summary_rows = []
    for p in c.predictors:
        d = p.difference
        diff = "—" if d is None else f"{100 * d['mean']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"
        ece = np.nanmean([v["ece"] for v in p.per_attribute.values()])
        secs = "—" if p.train_seconds is None else f"{p.train_seconds:.0f}"
        mean = f"{_pct(p.mean_balanced_accuracy)} [{_pct(p.ci95[0])}, {_pct(p.ci95[1])}]"
        summary_rows.append([p.name, p.key, mean, diff, f"{ece:.3f}", f"{p.parameters / 1e6:.2f} M",
                             f"{p.macs / 1e6:.0f} M", secs])  # fmt: skip
    summary = render_table(["predictor", "key", "mean bal. acc % [95 % CI]", f"vs {c.predictors[0].name} [95 % CI]",
                            "mean ECE", "parameters", "MACs / image", "train s"], summary_rows)  # fmt: skip
    note = (f"{c.images} test images of {c.identities} people (the faces every predictor could read); intervals: "
            f"{c.bootstrap} identity-bootstrap resamples, shared by all predictors (paired).")  # fmt: skip
    return f"{table}\n\n{summary}\n\n{note}\n"


def plot_comparison(c: Comparison, path: Path) -> Path:
    """Grouped bars: balanced accuracy per attribute and predictor, and the means with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [*c.attributes, "mean"]
    k = len(c.predictors)
    x = np.arange(len(labels))
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels)), 3.6))
    for i, p in enumerate(c.predictors):
        vals = [p.per_attribute[a]["balanced_accuracy"] for a in c.attributes] + [p.mean_balanced_accuracy]
        err = np.zeros((2, len(labels)))
        err[:, -1] = [p.mean_balanced_accuracy - p.ci95[0], p.ci95[1] - p.mean_balanced_accuracy]
        ax.bar(x + (i - (k - 1) / 2) * width, vals, width, yerr=err, capsize=2, label=p.name)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.axhline(0.8, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("balanced accuracy")
    ax.legend(fontsize=8, ncols=min(k, 4))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["DATA_FORMATS", "SPLITS", "Comparison", "PredictorScores", "ScoredFaces", "compare_predictors",
           "identity_bucket", "mean_balanced", "plot_comparison", "read_split", "render_comparison",
           "score_faces"]  # fmt: skip
