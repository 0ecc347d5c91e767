"""``facesearch serve``: the search engine over HTTP (FastAPI; served by uvicorn, bound to 127.0.0.1 by default).

- ``GET /health``: liveness plus what is loaded (index kind, size, dimension, model fingerprint), whether image
  queries work, the search queue, and every limit.
- ``POST /search/embedding``: JSON ``{"embedding": [...] | [[...], ...], "k": 10, "filter": "Male > 0.5",
  "group_by": "identity", "agg": "max", "threshold": 0.4}`` -> ``{"results": [...]}`` (one per query row).  An
  attribute match (:mod:`facesearch.engine.attribute_match`) adds ``"match": {"attributes": ["Male", ...] | "all",
  "max_mate_loss": 0.01}`` (or ``"margins": 0.2 | [...]``) and the probes' attribute probabilities,
  ``"probe_attributes": {"Male": 0.93, ...}`` (or a list of such, one per embedding row); each result then carries
  its ``margins``.  A bad match (an unknown attribute, margins and max_mate_loss both or neither, no validation
  statistics to choose margins from, a probe without a matched attribute) is a 400 saying so.
- ``POST /search/image``: a multipart upload ``image`` (+ the same options as form fields; ``match`` as its JSON) ->
  detection, alignment and embedding with the index's model, then the search.  With a match the probe's attribute
  probabilities come from the image, from the source of the gallery's columns (the index's attribute predictor, else
  the model's head), as ``facesearch search --probes`` takes them.
- ``GET /openapi.json`` / ``/docs`` / ``/redoc``: the OpenAPI description (behind the token, when there is one,
  unless ``public_docs``).

Embeddings are L2-normalised as the gallery's are (:func:`facesearch.indexer.search.normalize_queries`) before they are
searched, so scores and ``threshold`` are cosines whatever the scale of the posted vector.

Requests are checked in order of cost.  On the headers, before any of the body is read
(:class:`facesearch.engine.http_guard.RequestGuard`): the bearer token (401; every route but ``/health`` needs it when
there is a token), the body size (413, also counted as a chunked body streams in) and room in the queue (503 +
``Retry-After``).  Then the limits of :class:`facesearch.engine.service_limits.ServiceLimits`: k, rows, k x rows, filter
characters and terms (422), an image's pixels read from its header before it is decoded
(:mod:`facesearch.model.faces.image_guard`; 413), and the search's estimated time against the time budget (503).  Bad
input (an undecodable image, no face, a bad filter, a wrong dimension, an embedding row with NaN or infinite values or
all zeros: 422 naming the row) is a 4xx with a one-line message, never a 500.

Searches run on one thread, batched (:class:`facesearch.engine.batcher.SearchBatcher`); a request that waits longer
than the time budget for its turn is answered 504.  The model (image decoding, detection, embedding) runs one image at a
time, with at most ``queue_size`` requests waiting for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import cv2
import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError

from facesearch.engine.attribute_match import AttributeMatch, ResolvedMatch, probe_codes, probe_rows, resolve_match
from facesearch.engine.batcher import Busy, QueueTimeout, SearchBatcher, _Pending  # noqa: F401  (_Pending: for tests)
from facesearch.engine.filters import Filter
from facesearch.engine.http_guard import Refusal, RequestGuard
from facesearch.engine.search import QueryResult, SearchEngine
from facesearch.engine.service_limits import CostModel, LimitError, ServiceLimits, calibrate, check_filter, check_query
from facesearch.indexer.search import normalize_queries
from facesearch.model.faces.align import FaceDetector
from facesearch.model.faces.image_guard import ImageTooLarge, check_image
from facesearch.model.faces.images import ImageError, decode_image
from facesearch.model.provenance import our_version

log = logging.getLogger(__name__)

MAX_BYTES = ServiceLimits.max_bytes
DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")


class MatchQuery(BaseModel):
    """Keep only the items whose predicted ``attributes`` (names, or "all") are not confidently opposed to the
    probe's own; exactly one of ``margins`` (one for all, or one per attribute, in [0, 0.5]) and ``max_mate_loss``
    (margins chosen from the index's validation statistics)."""

    attributes: list[str] | Literal["all"]
    margins: float | list[float] | None = None
    max_mate_loss: float | None = None


class EmbeddingQuery(BaseModel):
    """A search by embedding(s): one vector or a list of them, of any scale (each is L2-normalised).  ``match``
    needs ``probe_attributes``: each probe's attribute probabilities by name (one mapping, or one per row)."""

    embedding: list[float] | list[list[float]]
    k: int = Field(10, ge=1)
    filter: str | None = None
    group_by: str | None = Field(None, pattern="^identity$")
    agg: str = Field("max", pattern="^(max|mean)$")
    threshold: float | None = None
    match: MatchQuery | None = None
    probe_attributes: dict[str, float | None] | list[dict[str, float | None]] | None = None


@dataclass(frozen=True)
class _Matched:
    """The filter option of a matched search in the batcher: the literal filter and the attribute match.  Its query
    rows carry the probe's attribute probabilities after their d embedding values, so that requests merged into one
    batch keep theirs row by row."""

    filter: Filter | None
    match: AttributeMatch


class _Searches:
    """The engine as the search thread calls it: a :class:`_Matched` option splits each row into its embedding and
    its probe's attribute probabilities; any other search goes through unchanged."""

    def __init__(self, engine: SearchEngine) -> None:
        self.engine = engine

    def search(self, xq: np.ndarray, **options: Any) -> list[QueryResult]:
        matched = options.get("filter")
        if not isinstance(matched, _Matched):
            return self.engine.search(xq, **options)
        d = self.engine.d
        options |= {"filter": matched.filter, "match": matched.match, "probe_attributes": xq[:, d:]}
        return self.engine.search(np.ascontiguousarray(xq[:, :d]), **options)


def _busy(e: Busy) -> HTTPException:
    return HTTPException(503, str(e), headers={"Retry-After": str(math.ceil(e.retry_after))})


class _ModelGate:
    """One image at a time through the model; at most ``queue_size`` requests wait, each at most ``timeout``."""

    def __init__(self, queue_size: int, timeout: float) -> None:
        self.queue_size, self.timeout = queue_size, timeout
        self.waiting = 0
        self._lock, self._count = threading.Lock(), threading.Lock()

    def saturated(self) -> Busy | None:
        if self.waiting >= self.queue_size:
            return Busy(f"{self.waiting} image queries are waiting for the model; retry later", self.timeout)
        return None

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._count:
            busy = self.saturated()
            if busy is not None:
                raise busy
            self.waiting += 1
        try:
            acquired = self._lock.acquire(timeout=self.timeout)
        finally:
            with self._count:
                self.waiting -= 1
        if not acquired:
            raise Busy(f"the model stayed busy for the time budget of {self.timeout:g} s; retry later", self.timeout)
        try:
            yield
        finally:
            self._lock.release()


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None  # JSON has no NaN: a missing attribute is null


def _render(results: list[QueryResult]) -> Response:
    out = []
    for r in results:
        d = r.to_dict()
        d["hits"] = [{**h, "score": _finite(h["score"]), "rank_score": _finite(h["rank_score"]),
                      "attributes": {a: _finite(v) for a, v in h["attributes"].items()}}
                     for h in d["hits"]]  # fmt: skip
        out.append(d)
    return Response(json.dumps({"results": out}, allow_nan=False), media_type="application/json")


async def _wait(future: Future[list[QueryResult]], timeout: float) -> list[QueryResult]:
    """The answer; a request still queued after ``timeout`` seconds is withdrawn (:class:`QueueTimeout`)."""
    wrapped = asyncio.wrap_future(future)
    try:
        done, _ = await asyncio.wait({wrapped}, timeout=timeout)
    except asyncio.CancelledError:
        future.cancel()
        raise
    if not done and future.cancel():
        raise QueueTimeout(f"the search waited {timeout:g} s for its turn (the time budget) and was withdrawn")
    return await wrapped


class _Service:
    """What the routes share: the engine, its limits and cost model, the search thread and the model."""

    def __init__(self, engine: SearchEngine, limits: ServiceLimits, cost: CostModel, detector_pad: int) -> None:
        self.engine, self.limits, self.cost = engine, limits, cost
        searches = cast(SearchEngine, _Searches(engine))  # the batcher only calls its search()
        self.batcher = SearchBatcher(searches, limits.max_rows, limits.queue_size, limits.time_budget)
        self.gate = _ModelGate(limits.queue_size, limits.time_budget)
        self.detector: FaceDetector | None = None
        self.images_problem: str | None = None
        if engine.embedder is not None:
            try:
                self.detector = FaceDetector(pad=detector_pad)
            except (OSError, cv2.error) as e:
                self.images_problem = f"image queries are unavailable: the face detector cannot be loaded: {e}"
                log.warning(self.images_problem)

    def busy(self, path: str) -> Refusal | None:
        """The 503 a new search would get now (the guard asks before reading its body)."""
        e = self.batcher.saturated() or (self.gate.saturated() if path == "/search/image" else None)
        return None if e is None else Refusal(503, str(e), (("Retry-After", str(math.ceil(e.retry_after))),))

    def plan(self, rows: int, k: int, text: str | None, group_by: str | None,
             image: bool = False, groups: int = 1) -> tuple[Filter | None, float]:  # fmt: skip
        """The parsed filter and the estimated seconds of a search, or the 4xx / 503 that refuses it; ``image``:
        first, whether image queries work here; ``groups``: the searches an attribute match splits it into."""
        if image and self.engine.embedder is None:
            raise HTTPException(400, "this service was started without --checkpoint: image queries are disabled")
        if image and self.images_problem is not None:
            raise HTTPException(503, self.images_problem)
        try:
            check_query(self.limits, rows, k, text)
            flt = None if text is None else self.engine.parse(text)
            terms = None if flt is None else check_filter(self.limits, flt)
        except LimitError as e:
            raise HTTPException(422, str(e)) from None
        except ValueError as e:  # a bad filter
            raise HTTPException(400, str(e)) from None
        seconds = self.cost.estimate(rows, k, terms, grouped=group_by is not None) + (groups - 1) * self.cost.call_s
        if seconds > self.limits.time_budget:
            raise HTTPException(503, f"this search is estimated at {seconds:.1f} s, over the time budget of "
                                f"{self.limits.time_budget:g} s per request (--time-budget): ask for fewer rows, "
                                "a smaller k or a simpler filter")  # fmt: skip
        return flt, seconds

    def attribute_match(self, body: MatchQuery) -> tuple[AttributeMatch, ResolvedMatch]:
        """A request's attribute match and its decided margins, or the 400 naming what is wrong."""
        names = self.engine.attribute_names
        try:
            margins = None if body.margins is None else tuple(np.atleast_1d(body.margins).tolist())
            match = AttributeMatch(names if body.attributes == "all" else tuple(body.attributes), margins,
                                   body.max_mate_loss)  # fmt: skip
            return match, resolve_match(match, names, self.engine.loaded.info.attribute_provenance)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None

    def matching(self, body: MatchQuery | None, probes: dict[str, float | None] | list[dict[str, float | None]] | None,
                 rows: int) -> tuple[AttributeMatch | None, np.ndarray | None, int]:  # fmt: skip
        """A request's attribute match, its probes' attribute probabilities (rows, attributes) and the number of
        searches it splits into (distinct probe codes), or the 400 naming what is wrong."""
        if body is None:
            if probes is not None:
                raise HTTPException(400, "probe_attributes is only used with match (the attributes to match on)")
            return None, None, 1
        match, resolved = self.attribute_match(body)
        names = self.engine.attribute_names
        try:
            if probes is None:
                raise ValueError("match needs probe_attributes, each probe's attribute probabilities by name (one "
                                 "mapping, or one per embedding row): an embedding carries none")  # fmt: skip
            given = [probes] if isinstance(probes, dict) else probes
            if len(given) != rows:
                raise ValueError(f"probe_attributes has {len(given)} rows for {rows} embedding rows")
            probe = probe_rows(given, names, match.attributes)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return match, probe, len(np.unique(probe_codes(resolved, names, probe)))

    def image_match(self, text: str | None) -> AttributeMatch | None:
        """An image query's attribute match (``text``: its ``match`` form field, the JSON of a :class:`MatchQuery`),
        checked before the image is read: a 400 for JSON that is not a match, for a bad match (as
        :meth:`attribute_match`) and when the probe's source of attribute probabilities lacks a matched one."""
        if text is None:
            return None
        try:
            body = MatchQuery.model_validate_json(text)
        except ValidationError as e:
            error = e.errors()[0]
            where = "".join(f".{part}" for part in error["loc"][:1])  # the field; deeper parts name union members
            raise HTTPException(400, f"match{where}: {error['msg']} (the match form field is JSON: "
                                '{"attributes": [...] | "all", "margins": m | [...]} or "max_mate_loss": r '
                                "instead of margins)") from None  # fmt: skip
        match, _ = self.attribute_match(body)
        predictor, embedder = self.engine.predictor, self.engine.embedder
        source = predictor or embedder
        assert source is not None, "plan(image=True) checked that there is a model"
        lacking = [a for a in match.attributes if a not in source.attributes]
        if lacking:
            what = "the index's attribute predictor" if predictor is not None else "the model's attribute head"
            has = ", ".join(source.attributes) or "nothing"
            raise HTTPException(400, f"match on an image needs the probe's probabilities of {lacking}, which {what} "
                                f"does not predict (it predicts: {has})")  # fmt: skip
        return match

    async def search(self, xq: np.ndarray, k: int, text: str | None, group_by: str | None, agg: str,
                     thr: float | None, match: AttributeMatch | None = None, probe: np.ndarray | None = None,
                     groups: int = 1) -> Response:  # fmt: skip
        flt, seconds = self.plan(len(xq), k, text, group_by, groups=groups)
        if xq.shape[1] != self.engine.d:  # checked before batching: a wrong dimension cannot join a batch
            raise HTTPException(400, f"queries have d={xq.shape[1]} but the index holds d={self.engine.d}")
        try:  # so are rows that cannot be normalised (NaN, infinity, zeros): the message names the request's row
            xq = normalize_queries(xq)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        option: Filter | _Matched | None = flt
        if match is not None:  # the probes' attribute probabilities travel after their rows' d values
            assert probe is not None, "a match comes with its probes' attributes (matching())"
            option, xq = _Matched(flt, match), np.hstack([xq, probe])
        try:
            future = self.batcher.submit(xq, k, option, group_by, agg, thr, cost=seconds)
            results = await _wait(future, self.limits.time_budget)
        except Busy as e:
            raise _busy(e) from None
        except QueueTimeout as e:
            raise HTTPException(504, str(e)) from None
        except (ValueError, KeyError) as e:
            raise HTTPException(400, str(e).strip("'\"")) from None
        except MemoryError:
            raise HTTPException(503, "the server ran out of memory for this search; retry later") from None
        return await run_in_threadpool(_render, results)

    def check_image(self, data: bytes, name: str) -> bytes:
        """``data`` if its header is readable and within ``max_pixels`` (413 / 400 otherwise): nothing is decoded."""
        try:
            check_image(data, self.limits.max_pixels, name)
        except ImageTooLarge as e:
            raise HTTPException(413, f"{e} (--max-pixels)") from None
        except ImageError as e:
            raise HTTPException(400, str(e)) from None
        return data

    def embed(self, data: bytes, name: str, attributes: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Decode, detect, align and embed one uploaded image (in a worker thread): (1, d), and with ``attributes``
        its attribute probabilities (1, attributes) in the gallery's order (else None)."""
        assert self.detector is not None, "checked by the route"
        try:
            with self.gate.hold():
                image = decode_image(data, name, max_pixels=self.limits.max_pixels)
                if attributes:
                    return self.engine.embed_array(image, self.detector, what=name, attributes=True)
                return self.engine.embed_array(image, self.detector, what=name), None
        except Busy as e:
            raise _busy(e) from None
        except ImageError as e:
            raise HTTPException(400, str(e)) from None
        except ValueError as e:  # no face, or no usable landmarks
            raise HTTPException(422, str(e)) from None
        except cv2.error as e:
            raise HTTPException(400, f"{name}: the image could not be processed ({e.msg.strip()})") from None
        except MemoryError:
            raise HTTPException(503, f"{name}: the server ran out of memory decoding it; retry later") from None

    def health(self, public_docs: bool, token: bool) -> dict[str, Any]:
        info = self.engine.loaded.info
        return {"status": "ok", "version": our_version(), "index": {"kind": info.kind, "nb": info.nb, "d": info.d,
                "fingerprint": info.fingerprint}, "images": self.detector is not None,
                "images_problem": self.images_problem,
                "searches": {"requests": self.batcher.requests, "batches": self.batcher.batches,
                             "waiting": self.batcher.waiting, "backlog_s": round(self.batcher.backlog, 3)},
                "limits": {**self.limits.to_dict(), "token": token, "public_docs": public_docs},
                "cost_model": self.cost.to_dict()}  # fmt: skip


def create_app(
    engine: SearchEngine,
    token: str | None = None,
    max_bytes: int | None = None,
    max_k: int | None = None,
    detector_pad: int = 0,
    *,
    limits: ServiceLimits | None = None,
    public_docs: bool = False,
    cost: CostModel | None = None,
) -> FastAPI:
    """The HTTP application around one loaded engine.  ``limits`` (default :class:`ServiceLimits`; ``max_bytes`` /
    ``max_k`` override its fields); ``token``: the bearer token (None: no authentication), needed also for the
    docs unless ``public_docs``; ``cost``: the search cost model (default: :func:`calibrate` on ``engine``)."""
    limits = limits or ServiceLimits()
    override = {"max_bytes": max_bytes, "max_k": max_k}
    limits = ServiceLimits(**{**limits.to_dict(), **{k: v for k, v in override.items() if v is not None}})
    svc = _Service(engine, limits, cost or calibrate(engine), detector_pad)
    app = FastAPI(title="facesearch", version=our_version(),
                  description="Rank-k face identification with attribute filters.")  # fmt: skip
    app.state.batcher, app.state.service = svc.batcher, svc
    open_paths = ("/health", *(DOC_PATHS if public_docs else ()))
    app.add_middleware(RequestGuard, max_bytes=limits.max_bytes, token=token, open_paths=open_paths, busy=svc.busy)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return svc.health(public_docs, token is not None)

    @app.post("/search/embedding")
    async def search_embedding(q: EmbeddingQuery) -> Response:
        try:  # float64: values beyond the float32 range are scaled by normalize_queries before rounding
            xq = np.atleast_2d(np.asarray(q.embedding, dtype=np.float64))
        except ValueError:
            xq = np.zeros((0, 0, 0), np.float64)  # ragged rows
        if xq.ndim != 2:
            raise HTTPException(422, "embedding must be a vector or a list of equal-length vectors")
        match, probe, groups = svc.matching(q.match, q.probe_attributes, len(xq))
        return await svc.search(xq, q.k, q.filter, q.group_by, q.agg, q.threshold, match, probe, groups)

    @app.post("/search/image")
    async def search_image(
        image: UploadFile = File(...),
        k: int = Form(10, ge=1),
        filter: str | None = Form(None),
        group_by: str | None = Form(None, pattern="^identity$"),
        agg: str = Form("max", pattern="^(max|mean)$"),
        threshold: float | None = Form(None),
        match: str | None = Form(None),
    ) -> Response:
        svc.plan(1, k, filter, group_by, image=True)  # a bad or costly search is refused before the image is read
        attribute_match = svc.image_match(match)  # so is a bad match
        name = image.filename or "upload"
        data = svc.check_image(await image.read(limits.max_bytes + 1), name)
        xq, probe = await run_in_threadpool(svc.embed, data, name, attribute_match is not None)
        return await svc.search(xq, k, filter, group_by, agg, threshold, attribute_match, probe)

    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: any free port) and listening: connections queue from now on.
    An unknown host, a port in use or out of range, or no permission is an ``OSError`` naming the address."""
    where = f"{host}:{port}"
    try:
        if not 0 <= port <= 65535:
            raise OSError(f"port {port} is out of range 0..65535")
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(f"cannot listen on {where}: {e.strerror or e}") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {where}: {e.strerror or e}") from e
    return sock


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve ``app`` with uvicorn on a socket from :func:`listening_socket` until interrupted."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


__all__ = ["DOC_PATHS", "MAX_BYTES", "EmbeddingQuery", "SearchBatcher", "create_app", "listening_socket", "serve"]
