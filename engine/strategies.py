"""How the search engine retrieves the top-k of the items a filter passes, one strategy per method of
:class:`FilterStrategies` (the strategies and when each runs: :mod:`facesearch.engine.search`): ``subset`` and
``masked`` on the resident flat gallery, ``selector`` and ``postfilter`` through FAISS on any index."""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids), as STYLE.md asks
from __future__ import annotations

import math
from typing import Any

import numpy as np

from facesearch.engine.selections import Selection, Selections
from facesearch.indexer.faiss_import import faiss
from facesearch.indexer.index import LoadedIndex
from facesearch.indexer.search import ResidentGallery

# flat: gather up to SUBSET_MAX (at 1M x 1024, 50 % passing: 139 ms against 154 for one query, 93 against 64
# queries/s batched; benchmarks/RESULTS.md); FAISS kinds: selector up to SELECTOR_MAX
SUBSET_MAX, SELECTOR_MAX = 0.5, 0.5
STRATEGIES = ("auto", "subset", "masked", "selector", "postfilter")
_BITMAP_MAX_IDS = 1 << 30  # ids below this: FAISS selectors are bitmaps (<= 128 MiB) instead of hash sets


class FilterStrategies:
    """The retrieval strategies of :class:`~facesearch.engine.search.SearchEngine`; its constructor sets these."""

    loaded: LoadedIndex
    gallery: ResidentGallery | None
    selections: Selections
    columns: dict[str, np.ndarray]
    index_kind: str
    _id_span: tuple[int, int]

    def _search_all(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.gallery is not None:
            return self.gallery.search(xq, k)
        return self.loaded.search(xq, min(k, self.loaded.index.ntotal))

    def _subset(self, xq: np.ndarray, k: int, sel: Selection) -> tuple[np.ndarray, np.ndarray]:
        if self.gallery is None:
            raise ValueError(f"the subset strategy needs a flat index; this one is {self.index_kind}")
        subset = self.selections.gathered(sel, self.gallery)  # a hot filter's rows, gathered once
        return self.gallery.search(xq, k, rows=sel.rows if subset is None else subset)

    def _masked(self, xq: np.ndarray, k: int, sel: Selection) -> tuple[np.ndarray, np.ndarray]:
        if self.gallery is None:
            raise ValueError(f"the masked strategy needs a flat index; this one is {self.index_kind}")
        return self.gallery.search(xq, k, keep=sel.mask)

    def _selector(self, xq: np.ndarray, k: int, sel: Selection) -> tuple[np.ndarray, np.ndarray]:
        ids = self.columns["id"][sel.rows]
        if not len(ids):
            return np.full((len(xq), k), -np.inf, np.float32), np.full((len(xq), k), -1, np.int64)
        sel, _bits = self._id_selector(ids)  # kept alive here: params.sel owns neither the selector nor its bits
        params = self._params()
        params.sel = sel
        D, I = self.loaded.index.search(np.ascontiguousarray(xq, np.float32), min(k, len(ids)), params=params)
        return D, I.astype(np.int64)

    def _id_selector(self, ids: np.ndarray) -> tuple[Any, np.ndarray | None]:
        """A FAISS selector of ``ids``: a bitmap indexed by id when the ids are small enough (bit tests; building a
        hash set of 500k ids took ~100 ms per query), else ``IDSelectorBatch``; with the array the selector reads."""
        low, top = self._id_span
        if low >= 0 and top <= _BITMAP_MAX_IDS:
            bits = np.zeros(top, bool)
            bits[ids] = True
            packed = np.packbits(bits, bitorder="little")  # FAISS: bit (i & 7) of byte i >> 3
            return faiss.IDSelectorBitmap(top, faiss.swig_ptr(packed)), packed
        return faiss.IDSelectorBatch(ids), None

    def _params(self) -> Any:
        """Search parameters of the index's type, carrying its configured nprobe / efSearch."""
        index = self.loaded.index
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            params = faiss.SearchParametersIVF()
            params.nprobe = ivf.nprobe
            return params
        # the wrapped index comes back from FAISS as a plain ``Index``: downcast it to see the HNSW
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
        if isinstance(inner, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from the stubs
            params.efSearch = inner.hnsw.efSearch
            return params
        return faiss.SearchParameters()

    def _passes(self, I: np.ndarray, passing_ids: np.ndarray) -> np.ndarray:
        """Which returned ids (-1 = none) are among ``passing_ids`` (sorted)."""
        pos = np.searchsorted(passing_ids, I).clip(0, max(len(passing_ids) - 1, 0))
        return (I >= 0) & (passing_ids[pos] == I) if len(passing_ids) else np.zeros(I.shape, bool)

    def _postfilter(self, xq: np.ndarray, k: int, sel: Selection) -> tuple[np.ndarray, np.ndarray]:
        """Over-fetch from the FAISS index and keep the passing hits; only the queries still short of k are fetched
        again, each time twice as deep."""
        nb, p = len(sel.mask), max(sel.passing / max(len(sel.mask), 1), 1e-9)
        passing_ids = np.sort(self.columns["id"][sel.rows])
        want = min(k, len(passing_ids))
        out_D = np.full((len(xq), k), -np.inf, np.float32)
        out_I = np.full((len(xq), k), -1, np.int64)
        todo = np.arange(len(xq))
        depth = min(nb, math.ceil(1.5 * k / p) + 16)
        while len(todo):
            D, I = self.loaded.search(xq[todo], depth)
            ok = self._passes(I, passing_ids)
            done = (ok.sum(axis=1) >= want) | (depth >= nb)
            for j in np.flatnonzero(done):
                keep = np.flatnonzero(ok[j])[:want]
                out_D[todo[j], : len(keep)], out_I[todo[j], : len(keep)] = D[j, keep], I[j, keep]
            todo, depth = todo[~done], min(nb, depth * 2)
        return out_D, out_I


__all__ = ["SELECTOR_MAX", "STRATEGIES", "SUBSET_MAX", "FilterStrategies"]
