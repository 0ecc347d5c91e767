"""``facesearch serve``: the search engine over HTTP (FastAPI; served by uvicorn, bound to 127.0.0.1 by default).

- ``GET /health``: liveness plus what is loaded (index kind, size, dimension, model fingerprint).
- ``POST /search/embedding``: JSON ``{"embedding": [...] | [[...], ...], "k": 10, "filter": "Male > 0.5",
  "group_by": "identity", "agg": "max", "threshold": 0.4}`` -> ``{"results": [...]}`` (one per query row).
- ``POST /search/image``: a multipart upload ``image`` (+ the same options as form fields) -> detection, alignment
  and embedding with the index's model, then the search.
- ``GET /openapi.json`` / ``/docs``: the OpenAPI description.

Embeddings are L2-normalised as the gallery's are (:func:`indexer.search.normalize_queries`) before they are
searched, so scores and ``threshold`` are cosines whatever the scale of the posted vector.

Every request is limited to ``max_bytes`` (413 beyond), ``k`` to ``max_k``; with a ``token`` every route but
``/health`` needs ``Authorization: Bearer <token>`` (401).  Bad input — an undecodable image, no face, a bad filter,
a wrong dimension, an embedding row with NaN or infinite values or all zeros (422, naming the row) — is a 4xx with a
one-line message, never a 500.

Concurrent requests are batched: one worker thread runs every search (so the engine is never entered twice at
once), and when it picks up a request it also takes every request already waiting with the same options (k, filter,
grouping, threshold) and answers them with one batched search.  Under load a flat index's product then serves many
probes for the price of one pass over the gallery (no waiting is added: a lone request runs at once).  The model,
for image queries, is serialised by a lock.
"""

from __future__ import annotations

import queue
import secrets
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from pydantic import BaseModel, Field

from engine.search import QueryResult, SearchEngine
from indexer.search import normalize_queries
from model.align import FaceDetector
from model.checkpoint import package_version
from model.images import ImageError, decode_image

MAX_BYTES = 10 << 20


class EmbeddingQuery(BaseModel):
    """A search by embedding(s): one vector or a list of them, of any scale (each is L2-normalised)."""

    embedding: list[float] | list[list[float]]
    k: int = Field(10, ge=1)
    filter: str | None = None
    group_by: str | None = Field(None, pattern="^identity$")
    agg: str = Field("max", pattern="^(max|mean)$")
    threshold: float | None = None


@dataclass
class _Pending:
    xq: np.ndarray
    options: tuple[Any, ...]  # (k, filter, group_by, agg, threshold): requests batch together only when equal
    future: Future[list[QueryResult]] = field(default_factory=Future)


class SearchBatcher:
    """Runs every search on one worker thread, merging the requests waiting with the same options into one batch.

    ``search(xq, k, filter, group_by, agg, threshold)`` blocks until its answer is ready and returns it (or raises
    what the engine raised).  ``max_rows`` caps a merged batch.  ``batches`` counts engine calls (for tests and the
    ``/health`` report)."""

    def __init__(self, engine: SearchEngine, max_rows: int = 256) -> None:
        self.engine, self.max_rows = engine, max_rows
        self.batches = self.requests = 0
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="facesearch-search", daemon=True)
        self._worker.start()

    def search(self, xq: np.ndarray, k: int, filter: str | None = None, group_by: str | None = None,
               agg: str = "max", threshold: float | None = None) -> list[QueryResult]:  # fmt: skip
        rows = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
        item = _Pending(rows, (k, filter, group_by, agg, threshold))
        self._queue.put(item)
        return item.future.result()

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
            self._run(batch)

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


def create_app(
    engine: SearchEngine, token: str | None = None, max_bytes: int = MAX_BYTES, max_k: int = 1000, detector_pad: int = 0
) -> FastAPI:
    """The HTTP application around one loaded engine."""
    app = FastAPI(title="facesearch", version=package_version(),
                  description="Rank-k face identification with attribute filters.")  # fmt: skip
    lock = threading.Lock()  # the model (image queries)
    batcher = SearchBatcher(engine)
    app.state.batcher = batcher
    detector: list[FaceDetector] = []

    def limits(request: Request) -> None:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_bytes:
            raise HTTPException(413, f"request body of {int(size):,} bytes exceeds the limit of {max_bytes:,}")

    def auth(authorization: str | None = Header(None)) -> None:
        if token is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not given or not secrets.compare_digest(given, token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def run(xq: np.ndarray, k: int, flt: str | None, group_by: str | None, agg: str, thr: float | None) -> Any:
        if k > max_k:
            raise HTTPException(422, f"k={k} exceeds the limit of {max_k}")
        if xq.shape[1] != engine.d:  # checked before batching: a wrong dimension cannot join a batch
            raise HTTPException(400, f"queries have d={xq.shape[1]} but the index holds d={engine.d}")
        try:  # so are rows that cannot be normalised (NaN, infinity, zeros): the message names the request's row
            xq = normalize_queries(xq)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        try:
            results = batcher.search(xq, k, flt, group_by, agg, thr)
        except (ValueError, KeyError) as e:
            raise HTTPException(400, str(e).strip("'\"")) from None
        return {"results": [r.to_dict() for r in results]}

    @app.get("/health")
    def health() -> dict[str, Any]:
        info = engine.loaded.info
        return {"status": "ok", "version": package_version(), "index": {"kind": info.kind, "nb": info.nb,
                "d": info.d, "fingerprint": info.fingerprint}, "images": engine.embedder is not None,
                "searches": {"requests": batcher.requests, "batches": batcher.batches}}  # fmt: skip

    @app.post("/search/embedding", dependencies=[Depends(limits), Depends(auth)])
    def search_embedding(q: EmbeddingQuery) -> Any:
        try:  # float64: values beyond the float32 range are scaled by normalize_queries before rounding
            xq = np.atleast_2d(np.asarray(q.embedding, dtype=np.float64))
        except ValueError:
            xq = np.zeros((0, 0, 0), np.float64)  # ragged rows
        if xq.ndim != 2:
            raise HTTPException(422, "embedding must be a vector or a list of equal-length vectors")
        return run(xq, q.k, q.filter, q.group_by, q.agg, q.threshold)

    @app.post("/search/image", dependencies=[Depends(limits), Depends(auth)])
    def search_image(
        image: UploadFile = File(...),
        k: int = Form(10, ge=1),
        filter: str | None = Form(None),
        group_by: str | None = Form(None, pattern="^identity$"),
        agg: str = Form("max", pattern="^(max|mean)$"),
        threshold: float | None = Form(None),
    ) -> Any:
        if engine.embedder is None:
            raise HTTPException(400, "this service was started without --checkpoint: image queries are disabled")
        data = image.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"image exceeds the limit of {max_bytes:,} bytes")
        name = image.filename or "upload"
        try:
            rgb = decode_image(data, name)
            with lock:
                if not detector:
                    detector.append(FaceDetector(pad=detector_pad))
                xq = engine.embed_array(rgb, detector[0], what=name)
        except ImageError as e:
            raise HTTPException(400, str(e)) from None
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return run(xq, k, filter, group_by, agg, threshold)

    return app


__all__ = ["MAX_BYTES", "EmbeddingQuery", "SearchBatcher", "create_app"]
