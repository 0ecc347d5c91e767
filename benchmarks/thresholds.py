"""Operating points from benchmark results: the score threshold a ``facesearch bench megaface`` run measured at a
given false accept rate, for open-set search (``facesearch search --threshold-from``).

The engine takes a plain float threshold; reading the benchmark's result format belongs here, with the benchmarks.
Light on purpose (no plotting, no torch): the search command imports it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

#: The ``kind`` of a ``facesearch bench megaface`` result file (see :mod:`facesearch.benchmarks.megaface_run`).
RESULT_KIND = "facesearch.megaface_result"


def threshold_from_result(path: str | os.PathLike[str], far: float) -> float:
    """The exact score threshold at ``far`` from a ``facesearch bench megaface`` result file (its ROC).  A file
    that cannot be read, is not JSON, is another kind of file or has no threshold at ``far`` is a ``ValueError``
    naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a bench megaface result file: {e}") from e
    if not isinstance(data, dict) or data.get("kind") != RESULT_KIND:
        kind = data.get("kind") if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise ValueError(f"{path} is not a facesearch bench megaface result file (kind {kind!r})")
    roc = data.get("roc")
    fars, thresholds = (roc.get("far"), roc.get("threshold")) if isinstance(roc, dict) else (None, None)
    if not isinstance(fars, list) or not isinstance(thresholds, list) or len(fars) != len(thresholds):
        raise ValueError(f"{path}: its 'roc' has no far / threshold lists of one length (a damaged result file?)")
    pairs = [(f, t) for f, t in zip(fars, thresholds, strict=True) if _is_number(f) and _is_number(t)]
    for f, t in pairs:
        if f == far:
            return float(t)
    raise ValueError(f"{path} has no threshold at FAR {far}; it has {[f for f, _ in pairs]}")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


__all__ = ["RESULT_KIND", "threshold_from_result"]
