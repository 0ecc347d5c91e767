"""What one request to ``facesearch serve`` may cost, so that no request can stall the others.

The search thread runs one search at a time and a running search cannot be interrupted, so every request's cost is
bounded before it is queued:

- :class:`ServiceLimits` holds the hard limits (body bytes, k, rows, hits = k x rows, filter characters and terms,
  image pixels, queue length, the per-request time budget); :func:`check_query` applies the ones known before
  parsing, :func:`filter_terms` counts a parsed filter's terms.
- :class:`CostModel` estimates a search's seconds from its rows, k, grouping and filter terms, with per-unit times
  measured on the loaded engine at start (:func:`calibrate`).  A request whose estimate exceeds the time budget is
  refused before it is queued.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from facesearch.engine.filters import Filter
from facesearch.engine.search import SearchEngine
from facesearch.model.faces.images import DEFAULT_MAX_PIXELS


class LimitError(ValueError):
    """A request over one of the :class:`ServiceLimits` (the message names the limit and its ``serve`` option)."""


@dataclass(frozen=True)
class ServiceLimits:
    """The hard limits of one request (each has a ``serve`` option of the same name, ``_`` read as ``-``)."""

    max_bytes: int = 10 << 20  # request body
    max_k: int = 1000
    max_rows: int = 256  # query rows per request (and per merged batch)
    max_hits: int = 10_000  # k x rows: bounds the work of building and sending the answer
    max_filter_chars: int = 10_000
    max_filter_terms: int = 1_000  # names, values and operators; every item of an `in (...)` list counts
    max_pixels: int = DEFAULT_MAX_PIXELS  # of a query image, read from its header before it is decoded
    queue_size: int = 32  # requests waiting for the search thread (or the model) before 503 + Retry-After
    time_budget: float = 10.0  # seconds: a search estimated above it, or waiting longer for its turn, is refused

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ValueError(f"{f.name} must be a positive number, got {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_query(limits: ServiceLimits, rows: int, k: int, filter_text: str | None) -> None:
    """The limits a query meets before anything is parsed: k, rows, k x rows, filter characters (``LimitError``)."""
    if k > limits.max_k:
        raise LimitError(f"k={k} exceeds the limit of {limits.max_k} (--max-k)")
    if rows > limits.max_rows:
        raise LimitError(f"{rows} query rows exceed the limit of {limits.max_rows} per request (--max-rows)")
    if k * rows > limits.max_hits:
        raise LimitError(f"k x rows = {k} x {rows} = {k * rows:,} hits exceed the limit of {limits.max_hits:,} "
                         "per request (--max-hits): ask for fewer rows or a smaller k")  # fmt: skip
    if filter_text is not None and len(filter_text) > limits.max_filter_chars:
        raise LimitError(f"the filter is {len(filter_text):,} characters; the limit is {limits.max_filter_chars:,} "
                         "(--max-filter-chars)")  # fmt: skip


@dataclass(frozen=True)
class FilterTerms:
    """The size of a parsed filter: ``terms`` = every node (names, values, operators; each ``in`` item counts),
    ``strings`` = the string values among them (compared over object columns, the slow kind)."""

    terms: int
    strings: int


def filter_terms(flt: Filter) -> FilterTerms:
    """Count the nodes of ``flt``'s syntax tree (walked iteratively: a deep tree cannot exhaust the stack)."""
    stack: list[Any] = [flt._ast]  # the parsed tree; its node classes are private to facesearch.engine.filters
    terms = strings = 0
    while stack:
        node = stack.pop()
        if isinstance(node, tuple):
            stack.extend(node)
            continue
        if not dataclasses.is_dataclass(node):
            continue
        terms += 1
        strings += isinstance(getattr(node, "value", None), str)
        stack.extend(getattr(node, f.name) for f in dataclasses.fields(node))
    return FilterTerms(terms, strings)


def check_filter(limits: ServiceLimits, flt: Filter) -> FilterTerms:
    """``flt``'s :class:`FilterTerms`, or ``LimitError`` when there are more than ``max_filter_terms``."""
    size = filter_terms(flt)
    if size.terms > limits.max_filter_terms:
        raise LimitError(f"the filter has {size.terms:,} terms (names, values and operators; every item of an "
                         f"'in (...)' list counts); the limit is {limits.max_filter_terms:,} "
                         "(--max-filter-terms)")  # fmt: skip
    return size


@dataclass(frozen=True)
class CostModel:
    """Estimated seconds of a search on one engine: ``call_s`` per engine call (for a flat index, mostly the pass
    over the gallery, shared by every row of a batch), ``row_s`` per query row more (k = 1), ``hit_s`` per hit
    retrieved, built and serialised, ``term_s`` per filter term evaluated over the gallery and ``string_s`` per string
    value compared over it.  ``nb`` items of ``identities`` identities (grouped searches may retrieve every item)."""

    call_s: float
    row_s: float
    hit_s: float
    term_s: float
    string_s: float
    nb: int
    identities: int

    def hits_per_row(self, k: int, grouped: bool) -> int:
        """Items retrieved per query row: k, or for a grouped search its 10 k candidates, deepened up to the whole
        gallery when the gallery holds fewer than k identities."""
        if not grouped:
            return min(k, self.nb)
        return self.nb if k > self.identities else min(self.nb, 10 * k)

    def estimate(self, rows: int, k: int, terms: FilterTerms | None = None, grouped: bool = False) -> float:
        """Seconds a search of ``rows`` query rows for ``k`` hits each is expected to take."""
        seconds = self.call_s + rows * (self.row_s + self.hits_per_row(k, grouped) * self.hit_s)
        if terms is not None:
            seconds += terms.terms * self.term_s + terms.strings * self.string_s
        return seconds

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _slowest(fn: Any, repeats: int) -> float:
    fn()  # warm-up: first-call allocations, lazy initialisation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return max(times)  # estimates must not be optimistic on a busy machine


def calibrate(engine: SearchEngine, rows: int = 32, repeats: int = 2) -> CostModel:
    """Measure a :class:`CostModel` on ``engine`` (the slowest of ``repeats`` timings, after a warm-up): searches
    of 1 and of ``rows`` seeded random queries with k = 1 (their difference is the rows' share, the rest the call's)
    and of ``rows`` queries with k = 64, serialised (the hits' share), and filters of 8 numeric / 8 string values."""
    nb = len(engine.columns["id"])
    identities = len({(i if v is None else v) for i, v in enumerate(engine.columns["identity"].tolist())})
    if nb == 0:
        return CostModel(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)
    xq = np.random.default_rng(0).standard_normal((rows, engine.d)).astype(np.float32)
    k = min(nb, 64)
    t_one = _slowest(lambda: engine.search(xq[:1], k=1), repeats)
    t_rows = _slowest(lambda: engine.search(xq, k=1), repeats)
    t_hits = _slowest(lambda: json.dumps([r.to_dict() for r in engine.search(xq, k=k)]), repeats)
    numeric = engine.parse("id in (" + ", ".join(str(-i) for i in range(1, 9)) + ")")
    strings = engine.parse("identity in (" + ", ".join(f'"<none {i}>"' for i in range(8)) + ")")
    t_num = _slowest(lambda: numeric.mask(engine.columns), repeats)
    t_str = _slowest(lambda: strings.mask(engine.columns), repeats)
    floor = 1e-9  # a measurement below the clock's resolution still costs something
    row_s = max((t_rows - t_one) / (rows - 1), t_rows / rows / 4, floor)  # noise must not make rows free
    return CostModel(
        call_s=max(t_one - row_s, floor),
        row_s=row_s,
        hit_s=max((t_hits - t_rows) / (rows * max(k - 1, 1)), floor),
        term_s=max(t_num / filter_terms(numeric).terms, floor),
        string_s=max(t_str / 8, floor),
        nb=nb,
        identities=identities,
    )


__all__ = ["CostModel", "FilterTerms", "LimitError", "ServiceLimits", "calibrate", "check_filter", "check_query",
           "filter_terms"]  # fmt: skip
