"""LFW verification (unrestricted, labeled outside data; MEGAFACE_PROTOCOL.md §7) for any ``pairs.txt`` of that form.

``pairs.txt``: a header ``<folds> <n>``, then per fold ``n`` matched lines ``name n1 n2`` followed by ``n`` mismatched
lines ``name1 n1 name2 n2``; images are ``<root>/<name>/<name>_<n:04d>.jpg``.  A pair's score is the cosine similarity
of the two images' features; for fold i the accept threshold (``score > t``) is chosen on the other folds only, from
the exact training scores; the result is the mean fold accuracy ± its standard error (std, ddof=1, / √folds).

Image keys are ``<name>/<name>_<n:04d>`` (folder + file stem), so features from an ``.npz`` or from the indexer's
shards can be matched whatever root or extension their paths carry.  Pairs sets are built from ORL or any
identity-labelled images by :mod:`facesearch.benchmarks.lfw_pairs` (re-exported here).
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from facesearch.benchmarks.lfw_pairs import lfw_name, pair_image_path, write_lfw_pairs, write_orl_pairs
from facesearch.model.faces.detect import KEEP_FACE, FaceDetector
from facesearch.model.faces.prepare import FaceFailure, prepare_image
from facesearch.model.faces.samples import IMAGE_SUFFIXES
from facesearch.model.tables import render_table

log = logging.getLogger(__name__)

#: Faces :func:`embed_lfw_images` can keep (one per image; ``all`` is not a choice).  ``center`` is the default: LFW's
#: 250x250 images are centred on the named person, while another face in the frame may be larger or better scored.
LFW_KEEP_FACE: tuple[str, ...] = tuple(k for k in KEEP_FACE if k != "all")
SE_NOTE = "± is the standard error of the mean over folds: std(fold accuracies, ddof=1) / sqrt(folds)"


class Pair(NamedTuple):
    """One line of ``pairs.txt``: image ``n1`` of ``name1`` against image ``n2`` of ``name2``; ``same`` identity."""

    name1: str
    n1: int
    name2: str
    n2: int
    same: bool


@dataclass(frozen=True)
class Pairs:
    """A parsed pairs file: ``folds[i]`` is fold i's pairs, its matched pairs first."""

    folds: tuple[tuple[Pair, ...], ...]
    path: str = ""

    def flat(self) -> list[Pair]:
        """Every pair, fold by fold."""
        return [p for fold in self.folds for p in fold]

    def labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(same (n,) bool, fold (n,) int64) in :meth:`flat` order."""
        flat = self.flat()
        fold = np.repeat(np.arange(len(self.folds), dtype=np.int64), [len(f) for f in self.folds])
        return np.array([p.same for p in flat], dtype=bool), fold


def _parse_pair(cells: list[str], same: bool, where: str) -> Pair:
    width, form = (3, "matched pair `name n1 n2`") if same else (4, "mismatched pair `name1 n1 name2 n2`")
    numbers = [cells[1], cells[-1]] if len(cells) == width else []
    if not numbers or not all(c.isdigit() and int(c) > 0 for c in numbers):
        raise ValueError(f"{where}: expected a {form} (image numbers >= 1), got {' '.join(cells)!r}")
    return Pair(cells[0], int(cells[1]), cells[0] if same else cells[2], int(cells[-1]), same)


def read_pairs(path: str | os.PathLike[str]) -> Pairs:
    """Parse an LFW-format ``pairs.txt`` (cells separated by any whitespace; blank lines ignored).

    Raises ``ValueError`` naming the file, the line number and the expected form for a bad header, a malformed pair
    line, a missing line or a line beyond the declared ``folds * 2n``."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        lines = [(i, line.split()) for i, line in enumerate(f.read().splitlines(), start=1) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty file; expected a header `<folds> <n>` then the pair lines")
    head_no, head = lines[0]
    if len(head) != 2 or not all(c.isdigit() and int(c) > 0 for c in head):
        raise ValueError(f"{path}:{head_no}: expected the header `<folds> <n>` (two positive integers), got {head}")
    n_folds, n = int(head[0]), int(head[1])
    body = lines[1:]
    if len(body) != n_folds * 2 * n:
        at = body[n_folds * 2 * n][0] if len(body) > n_folds * 2 * n else head_no if not body else body[-1][0]
        raise ValueError(f"{path}:{at}: the header declares {n_folds} folds x {2 * n} pair lines = "
                         f"{n_folds * 2 * n} lines, the file has {len(body)}")  # fmt: skip
    folds = []
    for k in range(n_folds):
        chunk = body[k * 2 * n : (k + 1) * 2 * n]
        folds.append(tuple(_parse_pair(cells, j < n, f"{path}:{no}") for j, (no, cells) in enumerate(chunk)))
    return Pairs(tuple(folds), str(path))


def pair_key(name: str, n: int) -> str:
    """The image key of image ``n`` of ``name``: ``name/name_{n:04d}``."""
    return f"{name}/{name}_{n:04d}"


def image_key(path: str | os.PathLike[str]) -> str:
    """The image key of a path or key: folder name / file name without an image extension (``.../A/A_0001.jpg`` ->
    ``A/A_0001``)."""
    p = Path(str(path).replace("\\", "/"))
    stem = p.stem if p.suffix.lower() in IMAGE_SUFFIXES else p.name
    return f"{p.parent.name}/{stem}" if p.parent.name else stem


def _pair_images(pairs: Pairs) -> dict[str, tuple[str, int]]:
    """The distinct images of ``pairs`` in first-use order: {image key: (name, n)}."""
    images = ((name, n) for p in pairs.flat() for name, n in ((p.name1, p.n1), (p.name2, p.n2)))
    return {pair_key(name, n): (name, n) for name, n in images}


@dataclass
class LfwResult:
    """Ten-fold verification: mean accuracy ± standard error, per-fold accuracies and the thresholds chosen on the
    other folds.  ``no_face``: images embedded from a centre crop because YuNet found no face; ``meta``: provenance."""

    mean_accuracy: float
    standard_error: float
    fold_accuracies: list[float]
    thresholds: list[float]
    fold_sizes: list[int]
    note: str = SE_NOTE
    no_face: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (a ``-inf`` threshold, "accept every pair", becomes the string ``"-inf"``)."""
        out = asdict(self)
        out["thresholds"] = [t if math.isfinite(t) else str(t) for t in self.thresholds]
        return out


def _best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The candidate threshold (−inf or a score) with the highest accuracy of ``score > t``; ties -> the smallest."""
    cand = np.concatenate([[-np.inf], np.unique(scores)])
    tp = same.sum() - np.searchsorted(np.sort(scores[same]), cand, side="right")  # same pairs with score > t
    tn = np.searchsorted(np.sort(scores[~same]), cand, side="right")  # different pairs with score <= t
    return float(cand[int(np.argmax(tp + tn))])  # argmax takes the first maximum: candidates ascend


def ten_fold_accuracy(scores: np.ndarray, same: np.ndarray, fold: np.ndarray) -> LfwResult:
    """k-fold verification accuracy (k = number of distinct ``fold`` values, 10 for LFW).

    ``scores`` (n,) float, higher = more alike; ``same`` (n,) bool; ``fold`` (n,) int fold of each pair.  For fold i
    the threshold t maximises the accuracy of ``score > t`` on the other folds, over the exact candidates −inf and
    every distinct training score; among equally accurate candidates the smallest wins (a candidate t stands for
    the interval [t, next training score), which classifies the training folds alike; t is its left edge).
    Accuracy on fold i = (TP + TN) / n_i.  ``standard_error`` = std(accuracies, ddof=1) / sqrt(k)."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    fold = np.asarray(fold)
    if scores.ndim != 1 or same.shape != scores.shape or fold.shape != scores.shape:
        raise ValueError(f"scores, same and fold must be equal-length 1-d arrays, got {scores.shape}, "
                         f"{same.shape}, {fold.shape}")  # fmt: skip
    if not np.isfinite(scores).all():
        raise ValueError(f"scores must be finite; {int((~np.isfinite(scores)).sum())} are NaN or infinite")
    ids = np.unique(fold)
    if len(ids) < 2:
        raise ValueError(f"need at least 2 folds to choose thresholds on held-out folds, got {len(ids)}")
    accs, thresholds, sizes = [], [], []
    for i in ids:
        test = fold == i
        t = _best_threshold(scores[~test], same[~test])
        accs.append(float(((scores[test] > t) == same[test]).mean()))
        thresholds.append(t)
        sizes.append(int(test.sum()))
    se = float(np.std(accs, ddof=1) / math.sqrt(len(accs)))
    return LfwResult(float(np.mean(accs)), se, accs, thresholds, sizes)


def score_pairs(features: Mapping[str, np.ndarray], pairs: Pairs) -> np.ndarray:
    """Cosine similarity of each pair's features -> (n,) float64 in :meth:`Pairs.flat` order.

    ``features``: {image key: (d,) vector}; vectors are L2-normalised here, a zero vector scores 0 (never NaN).
    Raises ``ValueError`` listing how many images are missing (and the first few) or which vectors are not finite."""
    keys = list(_pair_images(pairs))
    missing = [k for k in keys if k not in features]
    if missing:
        raise ValueError(f"{len(missing)} of the {len(keys)} pair images have no features, e.g. {missing[:5]}")
    x = np.stack([np.asarray(features[k], dtype=np.float64).ravel() for k in keys])
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} feature vectors are not finite, e.g. {[keys[i] for i in np.flatnonzero(bad)[:5]]}"
        )
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    row = {k: i for i, k in enumerate(keys)}
    flat = pairs.flat()
    a = x[[row[pair_key(p.name1, p.n1)] for p in flat]]
    b = x[[row[pair_key(p.name2, p.n2)] for p in flat]]
    return np.einsum("ij,ij->i", a, b)


def evaluate_lfw(pairs: Pairs, features: Mapping[str, np.ndarray], no_face: int = 0, **meta: Any) -> LfwResult:
    """Score ``pairs`` with ``features`` and run :func:`ten_fold_accuracy`; ``meta`` is recorded in the result."""
    same, fold = pairs.labels()
    result = ten_fold_accuracy(score_pairs(features, pairs), same, fold)
    result.no_face, result.meta = no_face, {"pairs": pairs.path, "n_pairs": len(same), **meta}
    return result


def _keyed(keys: Sequence[str], x: np.ndarray, source: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, row in zip(keys, x, strict=True):
        key = image_key(k)
        if key in out:
            raise ValueError(f"{source}: two entries share the image key {key!r} (folder/stem), e.g. {k!r}")
        out[key] = row
    return out


def features_from_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """An ``.npz`` with ``keys`` (n,) str (image keys or paths) and ``features`` (n, d) float -> {image key: (d,)}."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file of plain arrays ({e})") from e
    if "keys" not in arrays or "features" not in arrays:
        raise ValueError(f"{path}: expected arrays 'keys' (n,) str and 'features' (n, d), got {sorted(arrays)}")
    keys, x = arrays["keys"], arrays["features"]
    if keys.dtype.kind != "U" or keys.ndim != 1 or x.ndim != 2 or len(x) != len(keys) or x.dtype.kind != "f":
        raise ValueError(f"{path}: expected 'keys' (n,) str and 'features' (n, d) float, got {keys.dtype} "
                         f"{keys.shape} and {x.dtype} {x.shape}")  # fmt: skip
    return _keyed([str(k) for k in keys], x.astype(np.float32), str(path))


def features_from_shards(directory: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The ok rows of a complete shard directory written by ``facesearch embed``: {image key of ``path``: (d,)}."""
    from facesearch.indexer.shards import read_all  # only this entry point needs pyarrow

    block = read_all(Path(directory), columns=["path"])
    return _keyed(block.meta.column("path").to_pylist(), block.xb, str(directory))


def load_features(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A features ``.npz`` file or an indexer shard directory -> {image key: (d,) float32}."""
    path = Path(path)
    if path.is_dir():
        return features_from_shards(path)
    if path.suffix != ".npz" or not path.is_file():
        raise ValueError(f"{path}: expected a features .npz file (keys, features) or a shard directory")
    return features_from_npz(path)


def centre_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The largest centred region of ``image`` with the aspect of ``size`` = (h, w), resized to it (INTER_AREA)."""
    h, w = image.shape[:2]
    ch, cw = min(h, round(w * size[0] / size[1])), min(w, round(h * size[1] / size[0]))
    y, x = (h - ch) // 2, (w - cw) // 2
    return cv2.resize(image[y : y + ch, x : x + cw], (size[1], size[0]), interpolation=cv2.INTER_AREA)


@dataclass
class LfwFeatures:
    """Embedded pair images: ``features`` {image key: (d,) float32}, keys of the ``no_face`` images (centre-cropped)
    and the model ``fingerprint``."""

    features: dict[str, np.ndarray]
    no_face: list[str]
    fingerprint: str


def embed_lfw_images(
    root: str | os.PathLike[str],
    pairs: Pairs,
    checkpoint: str | os.PathLike[str],
    device: str = "auto",
    batch_size: int = 64,
    detector: FaceDetector | None = None,
    ext: str = ".jpg",
    progress: Callable[[int, int], None] | None = None,
    keep_face: str = "center",
) -> LfwFeatures:
    """Embed every distinct image of ``pairs`` once: YuNet detection + 5-point alignment to the model input, or, when
    no face is found, a centre crop (counted in ``no_face``).  ``progress(done, total)`` is called per batch.
    Without ``detector``, YuNet keeps the face ``keep_face`` picks (one of :data:`LFW_KEEP_FACE`; default ``center``,
    the named person of an LFW image).  Raises ``ValueError`` for a bad ``keep_face``, listing missing images (before
    any work) or naming an unreadable one."""
    from facesearch.model.inference import Embedder, iter_embeddings  # torch is imported only when embedding

    if keep_face not in LFW_KEEP_FACE:
        raise ValueError(f"keep_face must be one of {list(LFW_KEEP_FACE)}, got {keep_face!r}")

    paths = {k: pair_image_path(root, name, n, ext) for k, (name, n) in _pair_images(pairs).items()}
    keys = list(paths)
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ValueError(f"{len(missing)} of the {len(keys)} pair images are missing, e.g. {missing[:3]}")
    embedder = Embedder(checkpoint, device=device, batch_size=batch_size)
    detector = detector if detector is not None else FaceDetector(keep=keep_face)
    size = embedder.input_size
    no_face: list[str] = []

    def crop(key: str) -> np.ndarray:
        prepared = prepare_image(paths[key], detector=detector, size=size, max_faces=1, keep_image=True)
        face = prepared.faces[0]
        if not isinstance(face, FaceFailure):
            return face.crop
        if face.reason not in ("no_face", "bad_landmarks") or prepared.image is None:
            raise face.error
        no_face.append(key)
        return centre_crop(prepared.image, size)

    features: dict[str, np.ndarray] = {}
    batches = [keys[lo : lo + batch_size] for lo in range(0, len(keys), batch_size)]
    for out in iter_embeddings(embedder, batches, crop=crop):
        features.update(zip(out.items, out.embeddings, strict=True))
        if progress is not None:
            progress(len(features), len(keys))
    if no_face:
        log.info("%d of %d images had no detected face and were centre-cropped", len(no_face), len(keys))
    return LfwFeatures(features, no_face, embedder.fingerprint)


def format_lfw(result: LfwResult) -> str:
    """A short Markdown summary: mean ± standard error, then per-fold accuracies and thresholds."""
    folds = range(1, len(result.fold_accuracies) + 1)
    summary = [
        ["accuracy", f"{100 * result.mean_accuracy:.2f} % ± {100 * result.standard_error:.2f} (s.e.)"],
        ["pairs", f"{sum(result.fold_sizes)} in {len(result.fold_sizes)} folds"],
    ]
    if result.no_face:
        summary.append(["no face found (centre crop)", f"{result.no_face} images"])
    per_fold = [
        ["accuracy %", *(f"{100 * a:.1f}" for a in result.fold_accuracies)],
        ["threshold", *(f"{t:.3f}" for t in result.thresholds)],
    ]
    tables = (render_table(["LFW verification", "value"], summary, left=2), render_table(["fold", *folds], per_fold))
    return "\n\n".join([*tables, result.note])


__all__ = ["LFW_KEEP_FACE", "LfwFeatures", "LfwResult", "Pair", "Pairs", "embed_lfw_images", "evaluate_lfw",
           "features_from_npz", "features_from_shards", "format_lfw", "image_key", "lfw_name", "load_features",
           "pair_image_path", "pair_key", "read_pairs", "score_pairs", "ten_fold_accuracy", "write_lfw_pairs",
           "write_orl_pairs"]  # fmt: skip
