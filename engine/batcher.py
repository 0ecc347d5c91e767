"""The search thread of ``facesearch serve``: one worker runs every search, merging waiting requests into batches,
behind a bounded queue.

One worker thread runs every search (so the engine is never entered twice at once); when it picks up a request it
also takes every request already waiting with the same options (k, filter, grouping, threshold) and answers them
with one batched search.  Under load a flat index's product then serves many probes for the price of one pass over
the gallery (no waiting is added: a lone request runs at once).

The queue is bounded twice: by the number of requests waiting (``queue_size``) and by the estimated seconds of the
work admitted and not yet done (``budget``: each request brings its estimate, see
:mod:`facesearch.engine.service_limits`). A request over either bound is refused at once with :class:`Busy`, which says
when to retry; a request that waited longer than its caller's timeout is withdrawn from the queue
(:class:`QueueTimeout`).  A search that has started runs to its end: that is why its cost is bounded before it is
admitted.
"""

from __future__ import annotations

import math
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facesearch.engine.search import QueryResult, SearchEngine


class Busy(RuntimeError):
    """The search queue is full; ``retry_after`` is the estimated number of seconds until it has room."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueTimeout(TimeoutError):
    """A request waited longer than its timeout for the search thread and was withdrawn before it ran."""


@dataclass
class _Pending:
    xq: np.ndarray
    options: tuple[Any, ...]  # (k, filter, group_by, agg, threshold): requests batch together only when equal
    future: Future[list[QueryResult]] = field(default_factory=Future)
    cost: float = 0.0  # estimated seconds, counted in the backlog until the search is done


class SearchBatcher:
    """Runs every search on one worker thread, merging the requests waiting with the same options into one batch.

    ``search(xq, k, filter, group_by, agg, threshold)`` blocks until its answer is ready and returns it (or raises
    what the engine raised); :meth:`submit` queues a search and returns its future (cancel it to withdraw the
    request while it waits).  ``max_rows`` caps a merged
    batch; ``queue_size`` (requests waiting) and ``budget`` (estimated seconds of admitted work) bound the queue
    (:class:`Busy` beyond; None: unbounded).  ``batches`` counts engine calls and ``requests`` the requests they
    answered (for tests and the ``/health`` report)."""

    def __init__(
        self, engine: SearchEngine, max_rows: int = 256, queue_size: int | None = None, budget: float | None = None
    ) -> None:
        self.engine, self.max_rows = engine, max_rows
        self.queue_size, self.budget = queue_size, budget
        self.batches = self.requests = 0
        self.waiting = 0  # submitted, not yet started
        self.backlog = 0.0  # estimated seconds of the work admitted and not yet done
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="facesearch-search", daemon=True)
        self._worker.start()

    def saturated(self, cost: float = 0.0) -> Busy | None:
        """The :class:`Busy` a request of estimated ``cost`` seconds would get now, or None if it would be taken."""
        retry = max(1.0, math.ceil(self.backlog))
        if self.queue_size is not None and self.waiting >= self.queue_size:
            return Busy(f"the search queue is full ({self.waiting} requests waiting); retry later", retry)
        if self.budget is not None and self.backlog > 0 and self.backlog + cost > self.budget:
            return Busy(f"the search queue holds ~{self.backlog:.1f} s of work and this search needs ~{cost:.2f} s "
                        f"more, over the time budget of {self.budget:g} s; retry later", retry)  # fmt: skip
        return None

    def submit(self, xq: np.ndarray, k: int, filter: Any = None, group_by: str | None = None, agg: str = "max",
               threshold: float | None = None, cost: float = 0.0) -> Future[list[QueryResult]]:  # fmt: skip
        """Queue a search of ``xq`` (nq, d) and return its future (:class:`Busy` if the queue is full).  Cancelling
        the future before the worker starts it withdraws the request."""
        rows = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
        item = _Pending(rows, (k, filter, group_by, agg, threshold), cost=cost)
        with self._lock:
            busy = self.saturated(cost)
            if busy is not None:
                raise busy
            self.waiting += 1
            self.backlog += cost
        item.future.add_done_callback(lambda f: self._withdrawn(item) if f.cancelled() else None)
        self._queue.put(item)
        return item.future

    def search(self, xq: np.ndarray, k: int, filter: Any = None, group_by: str | None = None, agg: str = "max",
               threshold: float | None = None, cost: float = 0.0, timeout: float | None = None,
               ) -> list[QueryResult]:  # fmt: skip
        """:meth:`submit`, then wait for the answer; a request still waiting after ``timeout`` seconds is withdrawn
        (:class:`QueueTimeout`); one already running is waited for."""
        future = self.submit(xq, k, filter, group_by, agg, threshold, cost)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.cancel():
                raise QueueTimeout(f"the search waited {timeout:g} s for its turn and was withdrawn") from None
            return future.result()

    def _loop(self) -> None:
        held: list[_Pending] = []  # taken from the queue but not yet run (other options, or over max_rows)
        while True:
            first = held.pop(0) if held else self._queue.get()
            batch, rows = [first], len(first.xq)
            while True:
                try:
                    held.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            keep = []
            for item in held:
                if item.options == first.options and rows + len(item.xq) <= self.max_rows:
                    batch.append(item)
                    rows += len(item.xq)
                else:
                    keep.append(item)
            held = keep
            batch = [item for item in batch if self._start(item)]
            if batch:
                self._run(batch)

    def _start(self, item: _Pending) -> bool:
        """Mark ``item`` running; False if its caller withdrew it (cancelled its future) while it waited."""
        if not item.future.set_running_or_notify_cancel():
            return False
        with self._lock:
            self.waiting -= 1
        return True

    def _withdrawn(self, item: _Pending) -> None:
        """A waiting request's future was cancelled: it leaves the counts at once (the worker will skip it)."""
        with self._lock:
            self.waiting -= 1
            self.backlog = max(0.0, self.backlog - item.cost)

    def _run(self, batch: list[_Pending]) -> None:
        k, flt, group_by, agg, thr = batch[0].options
        try:
            xq = batch[0].xq if len(batch) == 1 else np.concatenate([b.xq for b in batch])
            results = self.engine.search(xq, k=k, filter=flt, group_by=group_by, agg=agg, threshold=thr)
        except Exception as e:
            if len(batch) > 1:  # one request's bad input must not fail the others: answer them one by one
                for item in batch:
                    self._run([item])
                return
            self._count(batch)
            batch[0].future.set_exception(e)
            return
        self._count(batch)
        start = 0
        for item in batch:
            item.future.set_result(results[start : start + len(item.xq)])
            start += len(item.xq)

    def _count(self, batch: list[_Pending]) -> None:
        """One answered engine call (a merged batch that had to be split counts as its parts)."""
        self.batches += 1
        self.requests += len(batch)
        self._release(batch)

    def _release(self, batch: list[_Pending]) -> None:
        with self._lock:
            self.backlog = max(0.0, self.backlog - sum(item.cost for item in batch))


__all__ = ["Busy", "QueueTimeout", "SearchBatcher"]
