"""What an MTL-CNN learned (``facesearch attributes inspect W``): the routing weights per task and the correlation
matrix beside the log-odds ratios of its training labels.

- :func:`routing_rows`: per task, its softmax share of each channel group of the shared feature (rows sum to 1).
- :func:`sign_agreement`: over the unit pairs where the correlation layer could learn (non-masked) and the training
  labels show a clear dependence (``|log-odds ratio| >= min_log_odds``), the fraction whose symmetrised learned
  entry ``(C[u, v] + C[v, u]) / 2`` has the labels' sign; and each such pair's values.
- :func:`correlation_figure`: the two matrices as heat maps side by side (PNG).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from facesearch.model.fileio import atomic_write_with
from facesearch.model.predictors.mtl_cnn import MtlCnnPredictor


def routing_rows(predictor: MtlCnnPredictor) -> list[list[Any]]:
    """``[task, share of group 0, ..., share of group K-1, largest group]`` per task."""
    weights = predictor.routing_weights()
    return [[t.name, *(f"{w:.3f}" for w in row), int(row.argmax())]
            for t, row in zip(predictor.tasks, weights, strict=True)]  # fmt: skip


def log_odds(predictor: MtlCnnPredictor) -> np.ndarray:
    """(U, U) log-odds ratios of the training labels recorded with the predictor (NaN where unknown)."""
    raw = predictor.meta.get("label_log_odds")
    u = len(predictor.attributes)
    if raw is None:
        return np.full((u, u), np.nan)
    return np.array([[np.nan if v is None else float(v) for v in row] for row in raw], np.float64)


def sign_agreement(predictor: MtlCnnPredictor, min_log_odds: float = 0.3) -> dict[str, Any]:
    """Pairs (u < v) with a learnable entry and a clear label dependence: their learned and label values, and the
    fraction whose signs agree (None when there is no such pair)."""
    c = predictor.correlation()
    mask = predictor.network.get_buffer("correlation_mask").numpy() > 0
    lor = log_odds(predictor)
    names = predictor.attributes
    pairs: list[dict[str, Any]] = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if mask[i, j] and np.isfinite(lor[i, j]) and abs(lor[i, j]) >= min_log_odds:
                learned = float(c[i, j] + c[j, i]) / 2
                same = bool(np.sign(learned) == np.sign(lor[i, j]))
                pairs.append({"pair": f"{names[i]} ~ {names[j]}", "log_odds": round(float(lor[i, j]), 3),
                              "learned": round(learned, 3), "agree": same})  # fmt: skip
    agree = [bool(p["agree"]) for p in pairs]
    share = sum(agree) / len(agree) if agree else None
    return {"pairs": pairs, "agreement": share, "min_log_odds": min_log_odds}


def correlation_figure(predictor: MtlCnnPredictor, out: str | Path) -> Path:
    """Write the learned correlation matrix (masked entries blank) beside the training labels' log-odds ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(predictor.attributes)
    mask = predictor.network.get_buffer("correlation_mask").numpy() > 0
    learned = np.where(mask, predictor.correlation(), np.nan)
    lor = log_odds(predictor)
    size = 2.2 + 0.42 * len(names)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size))
    for ax, m, title in ((axes[0], learned, "learned correlation C[row, column]"),
                         (axes[1], lor, "training labels: log-odds ratio")):  # fmt: skip
        lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{predictor.key} {predictor.fingerprint[:12]} (blank: never labelled together / unknown)", fontsize=9)
    fig.tight_layout()
    path = Path(out)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


__all__ = ["correlation_figure", "log_odds", "routing_rows", "sign_agreement"]
