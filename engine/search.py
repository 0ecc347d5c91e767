"""The search engine: rank-k identification against a built index, optionally restricted by an attribute filter,
optionally aggregated per identity, with open-set thresholds.

``SearchEngine.open(index_dir)`` loads an index directory (``facesearch index build``); ``search(xq, k, ...)``
answers a batch of queries (L2-normalised embeddings) at once.  With a filter the strategy follows its selectivity p
(the fraction of the gallery that passes):

- ``subset`` (p <= 2 %): gather the passing vectors and search them exactly (tiled product + top-k);
- ``selector`` (2 % < p <= 50 %): FAISS searches with an ``IDSelectorBatch`` of the passing ids (pre-filtering);
- ``postfilter`` (p > 50 %): over-fetch ~k/p hits, keep those that pass, and re-fetch with a doubled depth until k
  pass or the whole gallery was seen.

On an exact (``flat``) index every strategy returns exactly the top-k of the passing items (ties by smaller id in
``subset``; FAISS order otherwise); on IVF / PQ / HNSW indexes the results are approximate and say so.  Each result
reports its strategy and its time.
"""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids), as STYLE.md asks
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from engine.filters import Filter, parse_filter
from indexer.index import LoadedIndex, load_index
from indexer.search import search_exact
from model.align import FaceDetector, prepare_face
from model.images import ImageError
from model.inference import Embedder

SUBSET_MAX, SELECTOR_MAX = 0.02, 0.5
AGGREGATES = ("max", "mean")


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

    def to_dict(self) -> dict[str, Any]:
        return {"hits": [h.__dict__ for h in self.hits], "strategy": self.strategy, "seconds": self.seconds,
                "exact": self.exact, "passing": self.passing, "accepted": self.accepted}  # fmt: skip


def threshold_from_result(path: Path, far: float) -> float:
    """The exact score threshold at ``far`` from a ``facesearch bench megaface`` result file (its ROC)."""
    data = json.loads(Path(path).read_text())
    if data.get("kind") != "facesearch.megaface_result":
        raise ValueError(f"{path} is not a facesearch bench megaface result file")
    roc = data["roc"]
    for f, t in zip(roc["far"], roc["threshold"], strict=True):
        if f == far and t is not None:
            return float(t)
    have = [f for f, t in zip(roc["far"], roc["threshold"], strict=True) if t is not None]
    raise ValueError(f"{path} has no threshold at FAR {far}; it has {have}")


class SearchEngine:
    """A loaded index plus its metadata columns (for filters and hits)."""

    def __init__(self, loaded: LoadedIndex, embedder: Embedder | None = None) -> None:
        self.loaded, self.embedder = loaded, embedder
        self.index_kind = loaded.info.kind
        self.exact = self.index_kind == "flat"
        attrs = loaded.attributes
        self.attribute_names = tuple(c for c in attrs.column_names if c not in ("id", "path", "identity"))
        self.columns: dict[str, np.ndarray] = {
            "id": loaded.ids,
            "path": np.asarray(attrs.column("path").to_pylist(), dtype=object),
            "identity": np.asarray(attrs.column("identity").to_pylist(), dtype=object),
            **{a: attrs.column(a).to_numpy(zero_copy_only=False).astype(np.float32) for a in self.attribute_names},
        }
        self._row_of = {int(i): r for r, i in enumerate(loaded.ids.tolist())}

    @classmethod
    def open(cls, index_dir: Path, checkpoint: Path | None = None, device: str = "auto") -> SearchEngine:
        """Load ``index_dir``; with ``checkpoint`` (needed for image queries) its model must be the one that built
        the index: another fingerprint is refused, since its embeddings would not be comparable."""
        loaded = load_index(Path(index_dir))
        embedder = None
        if checkpoint is not None:
            embedder = Embedder(Path(checkpoint), device=device)
            if embedder.fingerprint != loaded.info.fingerprint:
                raise ValueError(f"checkpoint {checkpoint} is model {embedder.fingerprint[:16]}… but the index "
                                 f"{index_dir} was built with model {loaded.info.fingerprint[:16]}…: their embeddings "
                                 "are not comparable; use the checkpoint that embedded the gallery")  # fmt: skip
        return cls(loaded, embedder)

    def embed_images(
        self, paths: Sequence[Path], detector: FaceDetector | None = None, pad: int = 0
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Detect (YuNet, on the image padded by ``pad`` black pixels: tightly cropped faces need it), align and
        embed probe images in one batch: (embeddings, attribute probabilities in the gallery's order, paths).  A
        file that cannot be read or holds no face is a ``ValueError`` naming it and the reason."""
        if self.embedder is None:
            raise ValueError("image queries need the model: open the engine with checkpoint=...")
        detector = detector or FaceDetector(pad=pad)
        crops, names = [], []
        for path in paths:
            crops.append(self._crop(Path(path), detector, f"probe {path}"))
            names.append(str(path))
        if not crops:
            return np.zeros((0, self.d), np.float32), np.zeros((0, len(self.attribute_names)), np.float32), names
        emb, probs = self.embedder.embed_crops(np.stack(crops))
        order = [list(self.embedder.attributes).index(a) for a in self.attribute_names]
        return emb, probs[:, order], names

    @property
    def fingerprint(self) -> str:
        return self.loaded.info.fingerprint

    @property
    def d(self) -> int:
        return int(self.loaded.index.d)

    def parse(self, text: str) -> Filter:
        """Parse a filter expression against this gallery's columns."""
        return parse_filter(text, self.columns, numeric=("id", *self.attribute_names))

    def rows(self, ids: Sequence[int]) -> np.ndarray:
        """Row positions of gallery ids (a missing id is a ``KeyError`` naming it)."""
        try:
            return np.array([self._row_of[int(i)] for i in ids], np.int64)
        except KeyError as e:
            raise KeyError(f"id {e.args[0]} is not in the index") from None

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors of gallery ids (queries "by id")."""
        index = self.loaded.index
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and ivf.direct_map.type == 0:  # DirectMap::NoMap
            ivf.make_direct_map()  # IVF lists need an id -> slot map to return stored vectors (nb x 8 bytes)
        try:
            return np.stack([index.reconstruct(int(i)) for i in ids]).astype(np.float32)
        except RuntimeError as e:
            raise ValueError(f"this {self.index_kind} index cannot return stored vectors: {e}") from e

    def _crop(self, source: Path | np.ndarray, detector: FaceDetector, what: str) -> np.ndarray:
        assert self.embedder is not None
        try:
            return prepare_face(source, detector=detector, size=self.embedder.input_size).crop
        except ImageError as e:
            raise ValueError(f"{what}: {e}") from None

    def embed_array(self, image: np.ndarray, detector: FaceDetector, what: str = "image") -> np.ndarray:
        """Detect, align and embed one decoded (H, W, 3) RGB image: (1, d)."""
        if self.embedder is None:
            raise ValueError("image queries need the model: open the engine with checkpoint=...")
        emb, _ = self.embedder.embed_crops(self._crop(image, detector, what)[None])
        return emb

    def _hit(self, row: int, score: float, count: int = 1) -> Hit:
        c = self.columns
        attrs = {a: float(c[a][row]) for a in self.attribute_names}
        return Hit(int(c["id"][row]), str(c["path"][row]), c["identity"][row], float(score), attrs, count)

    # -- retrieval ----------------------------------------------------------------------------------------------------
    def _search_all(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.loaded.search(xq, min(k, self.loaded.index.ntotal))

    def _subset(self, xq: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.flatnonzero(mask)
        if not len(pos):
            return np.full((len(xq), 0), -np.inf, np.float32), np.full((len(xq), 0), -1, np.int64)
        flat = self.loaded.index.index if isinstance(self.loaded.index, faiss.IndexIDMap2) else None
        if flat is None or not isinstance(flat, faiss.IndexFlat):
            return self._selector(xq, k, mask)
        xb = flat.reconstruct_batch(pos)
        return search_exact(xq, [(self.columns["id"][pos], xb)], min(k, len(pos)), backend="torch")

    def _selector(self, xq: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = self.columns["id"][mask]
        sel = faiss.IDSelectorBatch(ids)  # kept alive here: params.sel does not own it
        params = self._params()
        params.sel = sel
        D, I = self.loaded.index.search(np.ascontiguousarray(xq, np.float32), min(k, len(ids)), params=params)
        return D, I.astype(np.int64)

    def _params(self) -> Any:
        """Search parameters of the index's type, carrying its configured nprobe / efSearch."""
        index = self.loaded.index
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            params = faiss.SearchParametersIVF()
            params.nprobe = ivf.nprobe
            return params
        inner = index.index if isinstance(index, faiss.IndexIDMap2) else index
        if isinstance(inner, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from the stubs
            params.efSearch = inner.hnsw.efSearch
            return params
        return faiss.SearchParameters()

    def _postfilter(self, xq: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nb, p = len(mask), max(mask.mean(), 1e-9)
        passing_ids = self.columns["id"][mask]
        depth = min(nb, math.ceil(1.5 * k / p) + 16)
        want = min(k, int(mask.sum()))
        while True:
            D, I = self._search_all(xq, depth)
            ok = np.isin(I, passing_ids)
            if depth >= nb or (ok.sum(axis=1) >= want).all():
                break
            depth = min(nb, depth * 2)
        out_D = np.full((len(xq), want), -np.inf, np.float32)
        out_I = np.full((len(xq), want), -1, np.int64)
        for q in range(len(xq)):
            keep = np.flatnonzero(ok[q])[:want]
            out_D[q, : len(keep)], out_I[q, : len(keep)] = D[q, keep], I[q, keep]
        return out_D, out_I

    def retrieve(self, xq: np.ndarray, k: int, flt: Filter | None = None) -> tuple[np.ndarray, np.ndarray, str, int]:
        """(D, I, strategy, passing) of the top-k (passing) items for every query."""
        if flt is None:
            D, I = self._search_all(xq, k)
            return D, I, "none", len(self.columns["id"])
        mask = flt.mask(self.columns)
        p = float(mask.mean()) if len(mask) else 0.0
        if p <= SUBSET_MAX:
            D, I = self._subset(xq, k, mask)
            strategy = "subset"
        elif p <= SELECTOR_MAX:
            D, I = self._selector(xq, k, mask)
            strategy = "selector"
        else:
            D, I = self._postfilter(xq, k, mask)
            strategy = "postfilter"
        return D, I, strategy, int(mask.sum())

    # -- the public query ---------------------------------------------------------------------------------------------
    def search(
        self,
        xq: np.ndarray,
        k: int = 10,
        filter: str | Filter | None = None,
        group_by: str | None = None,
        agg: str = "max",
        threshold: float | None = None,
        soft_weight: float = 0.0,
        probe_attributes: np.ndarray | None = None,
    ) -> list[QueryResult]:
        """Rank-k answers for every row of ``xq`` (nq, d): items, or identities with ``group_by="identity"`` (``agg``
        max: the identity's best item; mean: the mean score of its items among the retrieved hits).  ``threshold``
        drops hits below it and sets ``accepted`` (the open-set decision).

        Soft mode (``soft_weight`` w > 0, with ``probe_attributes`` (nq, attributes) in the gallery's attribute
        order): instead of a hard filter, the top 10 k candidates are re-ranked by (1 - w) * score + w * agreement,
        agreement = 1 - mean |probe probability - gallery probability| over the attributes both have; ``Hit.score``
        stays the identity score and ``Hit.rank_score`` is the combined one."""
        if not 0.0 <= soft_weight <= 1.0:
            raise ValueError(f"soft_weight must be in [0, 1], got {soft_weight}")
        if soft_weight > 0 and group_by is not None:
            raise ValueError("soft re-ranking ranks gallery items; it cannot be combined with group_by yet")
        if soft_weight > 0 and (
            probe_attributes is None or np.shape(probe_attributes)[-1] != len(self.attribute_names)
        ):
            raise ValueError(f"soft re-ranking needs the probes' attribute probabilities ({len(self.attribute_names)} "
                             f"per probe: {', '.join(self.attribute_names)}); use image or id queries")  # fmt: skip
        xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
        if xq.shape[1] != self.d:
            raise ValueError(f"queries have d={xq.shape[1]} but the index holds d={self.d}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if group_by not in (None, "identity"):
            raise ValueError(f"group_by must be 'identity' or None, got {group_by!r}")
        if agg not in AGGREGATES:
            raise ValueError(f"agg must be one of {list(AGGREGATES)}, got {agg!r}")
        flt = self.parse(filter) if isinstance(filter, str) else filter
        t0 = time.perf_counter()
        depth = k if group_by is None and soft_weight == 0 else min(len(self.columns["id"]), 10 * k)
        while True:
            D, I, strategy, passing = self.retrieve(xq, depth, flt)
            if group_by is None or depth >= min(passing, len(self.columns["id"])):
                break
            if all(self._identities(row) >= k for row in I):
                break
            depth = min(len(self.columns["id"]), depth * 4)
        seconds = (time.perf_counter() - t0) / len(xq)
        results = []
        for q in range(len(xq)):
            pairs = [(float(s), self._row_of[int(i)]) for s, i in zip(D[q], I[q], strict=True) if i >= 0]
            rank: dict[int, float] = {}
            if soft_weight > 0:
                assert probe_attributes is not None
                rank = self._soft(pairs, np.atleast_2d(probe_attributes)[q], soft_weight)
                pairs.sort(key=lambda t: (-rank[t[1]], int(self.columns["id"][t[1]])))
            hits = self._group(pairs, k, agg) if group_by else [self._hit(r, s) for s, r in pairs[:k]]
            if rank:
                hits = [dataclasses.replace(h, rank_score=rank[self._row_of[h.id]]) for h in hits]
            accepted = None
            if threshold is not None:
                accepted = bool(hits) and hits[0].score >= threshold
                hits = [h for h in hits if h.score >= threshold]
            results.append(QueryResult(tuple(hits), strategy, seconds, self.exact, passing, accepted))
        return results

    def _soft(self, pairs: list[tuple[float, int]], probe: np.ndarray, w: float) -> dict[int, float]:
        """Combined score per gallery row: (1 - w) * identity score + w * attribute agreement."""
        if not pairs:
            return {}
        rows = np.array([r for _, r in pairs], np.int64)
        gallery = np.stack([self.columns[a][rows] for a in self.attribute_names], axis=1)
        out = {}
        for j, (s, r) in enumerate(pairs):
            diff = np.abs(gallery[j] - probe)
            agree = 1.0 - float(np.nanmean(diff)) if np.isfinite(diff).any() else 0.5
            out[r] = (1 - w) * s + w * agree
        return out

    def _identities(self, ids: np.ndarray) -> int:
        return len({self.columns["identity"][self._row_of[int(i)]] for i in ids if i >= 0})

    def _group(self, pairs: list[tuple[float, int]], k: int, agg: str) -> list[Hit]:
        groups: dict[Any, list[tuple[float, int]]] = {}
        for s, r in pairs:  # pairs are ranked: the first of each identity is its best item
            groups.setdefault(self.columns["identity"][r], []).append((s, r))
        hits = []
        for members in groups.values():
            best_s, best_r = members[0]
            score = best_s if agg == "max" else float(np.mean([s for s, _ in members]))
            hits.append(self._hit(best_r, score, len(members)))
        hits.sort(key=lambda h: (-h.score, h.id))
        return hits[:k]


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


__all__ = ["AGGREGATES", "Hit", "QueryResult", "SearchEngine", "format_results", "threshold_from_result"]
