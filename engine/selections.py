"""The rows a filter selects, kept for the filters an engine sees again.

A filter's mask over a 1M-row table takes ~0.5 ms to evaluate and its row positions another ~0.5 ms to list: a
tenth of a 10 % subset query (~10 ms).  A service sees the same few filters over and over, and an engine's columns
never change once it is open, so :class:`Selections` keeps the most recent ones (by bytes and by count) and hands
back the same read-only arrays: the answers are the same, computed once.

A filter used again (a *hot* one) also gets its rows' screen copy gathered into one block
(:meth:`Selections.gathered`, :class:`~facesearch.indexer.search.GallerySubset`), within ``max_gathered_bytes`` (the
engine: a quarter of its screen copy): a 10 % subset of 1M rows is then read as one 100 MB stream, not as 100,000
random 1 KB rows (4.6 against 9 ms a query on a 2-core Xeon).  The answers are the same either way.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from facesearch.engine.filters import Filter
from facesearch.indexer.search import GallerySubset, ResidentGallery


@dataclass
class Selection:
    """A filter's (or a given mask's) rows: ``mask`` (n,) bool, ``passing`` its count, :attr:`rows` the positions
    (listed on first use).  The arrays are read-only: they may be shared between queries."""

    mask: np.ndarray
    passing: int
    _rows: np.ndarray | None = field(default=None, repr=False)
    uses: int = 0  # times handed out by Selections.get
    subset: GallerySubset | None = field(default=None, repr=False)  # its rows gathered (a hot filter)

    @classmethod
    def of(cls, mask: np.ndarray) -> Selection:
        return cls(mask, int(np.count_nonzero(mask)))

    @property
    def rows(self) -> np.ndarray:
        if self._rows is None:
            rows = np.flatnonzero(self.mask)
            rows.flags.writeable = False
            self._rows = rows
        return self._rows

    @property
    def nbytes(self) -> int:
        return self.mask.nbytes + 8 * self.passing  # the rows, once listed


class Selections:
    """The selections of the most recent filters over fixed ``columns``: up to ``max_entries`` and ``max_bytes``
    (masks plus row positions), least recently used first out.  Safe to share between threads."""

    def __init__(
        self, columns: Mapping[str, np.ndarray], max_bytes: int = 64 << 20, max_entries: int = 32,
        max_gathered_bytes: int = 0,
    ) -> None:  # fmt: skip
        self.columns, self.max_bytes, self.max_entries = columns, max_bytes, max_entries
        self.max_gathered_bytes = max_gathered_bytes
        self._kept: OrderedDict[Filter, Selection] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, flt: Filter) -> Selection:
        """``flt``'s selection: kept, or evaluated now (and kept when it fits)."""
        with self._lock:
            got = self._kept.get(flt)
            if got is not None:
                self._kept.move_to_end(flt)
                got.uses += 1
                return got
        mask = flt.mask(self.columns)
        mask.flags.writeable = False
        got = Selection.of(mask)
        got.uses = 1
        with self._lock:
            self._kept[flt] = got
            self._kept.move_to_end(flt)
            while self._kept and (len(self._kept) > self.max_entries or self.nbytes > self.max_bytes):
                self._kept.popitem(last=False)
        return got

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._kept.values())

    @property
    def gathered_bytes(self) -> int:
        return sum(s.subset.nbytes for s in self._kept.values() if s.subset is not None)

    def gathered(self, sel: Selection, gallery: ResidentGallery) -> GallerySubset | None:
        """``sel``'s rows gathered from ``gallery`` when it is kept, used at least twice, and its block fits
        ``max_gathered_bytes`` (less recently used filters' blocks are dropped to make room); else None."""
        if sel.subset is not None:
            return sel.subset
        if sel.uses < 2 or gallery.xbs is None:
            return None
        need = sel.passing * (8 + gallery.xbs.nbytes // max(len(gallery.xbs), 1))  # positions and screen rows
        with self._lock:
            if need > self.max_gathered_bytes or not any(s is sel for s in self._kept.values()):
                return None
            used = self.gathered_bytes
            for other in self._kept.values():  # least recent first
                if used + need <= self.max_gathered_bytes:
                    break
                if other is not sel and other.subset is not None:
                    used -= other.subset.nbytes
                    other.subset = None
        built = gallery.gather(sel.rows)  # ~25 ms for 100,000 rows: outside the lock
        with self._lock:
            if sel.subset is None and self.gathered_bytes + built.nbytes <= self.max_gathered_bytes:
                sel.subset = built
        return built

    def __len__(self) -> int:
        return len(self._kept)


__all__ = ["Selection", "Selections"]
