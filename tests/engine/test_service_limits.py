"""One request must not stall the others: filter size and terms, rows and k x rows per request, the estimated time
of a search against the time budget, a bounded queue (503 + Retry-After), a deadline for waiting (504); every limit
shown in /health; the cost model and the batcher's bounds on their own."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from facesearch.engine.batcher import Busy, QueueTimeout, SearchBatcher
from facesearch.engine.search import SearchEngine
from facesearch.engine.service import _ModelGate, create_app
from facesearch.engine.service_limits import CostModel, FilterTerms, ServiceLimits, calibrate, filter_terms
from facesearch.indexer.index import IndexConfig, build_index
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features

CHEAP = CostModel(call_s=1e-4, row_s=1e-4, hit_s=1e-6, term_s=1e-5, string_s=1e-4, nb=500, identities=50)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> SearchEngine:
    root = tmp_path_factory.mktemp("limits")
    write_synth_features(SynthFeaturesConfig(out=root / "s", rows=500, dim=16, identities=50, dtype="float32"))
    build_index(root / "s", root / "i", IndexConfig(kind="flat", recall_sample=0))
    return SearchEngine.open(root / "i")


def _batches(client: TestClient) -> int:
    return client.get("/health").json()["searches"]["batches"]


def test_filter_characters_and_terms_are_limited(engine):
    """A long filter is refused before it is parsed, one of many terms (each `in` item counts) before it is
    evaluated over the gallery; neither reaches the search thread."""
    client = TestClient(create_app(engine))
    v = engine.vectors([1])[0].tolist()
    long = "id in (" + ", ".join(map(str, range(3000))) + ")"  # 17 k characters
    res = client.post("/search/embedding", json={"embedding": v, "filter": long})
    assert res.status_code == 422 and "--max-filter-chars" in res.text, res.text
    client = TestClient(create_app(engine, limits=ServiceLimits(max_filter_chars=100_000)))
    many = "id in (" + ", ".join(map(str, range(1500))) + ")"  # 9 k characters, 1502 terms
    res = client.post("/search/embedding", json={"embedding": v, "filter": many})
    assert res.status_code == 422 and "1,502 terms" in res.text and "--max-filter-terms" in res.text, res.text
    assert _batches(client) == 0
    ok = client.post("/search/embedding", json={"embedding": v, "k": 3, "filter": "id in (1, 2, 3, 4)"})
    assert ok.status_code == 200 and {h["id"] for h in ok.json()["results"][0]["hits"]} <= {1, 2, 3, 4}


def test_rows_and_hits_per_request_are_limited(engine):
    client = TestClient(create_app(engine))
    xq = engine.vectors(list(range(300)))
    res = client.post("/search/embedding", json={"embedding": xq.tolist(), "k": 1})
    assert res.status_code == 422 and "300 query rows" in res.text and "--max-rows" in res.text, res.text
    res = client.post("/search/embedding", json={"embedding": xq[:20].tolist(), "k": 1000})
    assert res.status_code == 422 and "20,000 hits" in res.text and "--max-hits" in res.text, res.text
    assert _batches(client) == 0
    res = client.post("/search/embedding", json={"embedding": xq[:256].tolist(), "k": 39})  # 9,984 hits
    assert res.status_code == 200 and len(res.json()["results"]) == 256


def test_a_search_over_the_time_budget_is_refused_before_it_runs(engine):
    """A search that would hold the search thread past the budget cannot be interrupted once running, so it is
    refused on its estimate (rows, k, grouping, filter terms) and never queued."""
    slow = CostModel(call_s=0.0, row_s=1.0, hit_s=0.0, term_s=0.01, string_s=0.0, nb=500, identities=50)
    client = TestClient(create_app(engine, cost=slow, limits=ServiceLimits(time_budget=5)))
    xq = engine.vectors(list(range(6)))
    res = client.post("/search/embedding", json={"embedding": xq.tolist(), "k": 2})
    assert res.status_code == 503 and "estimated at 6.0 s" in res.text and "--time-budget" in res.text, res.text
    flt = "id in (" + ", ".join(map(str, range(400))) + ")"  # 402 terms x 0.01 s, + 1 row
    res = client.post("/search/embedding", json={"embedding": xq[0].tolist(), "filter": flt})
    assert res.status_code == 503 and "estimated at 5.0 s" in res.text, res.text
    assert _batches(client) == 0
    assert client.post("/search/embedding", json={"embedding": xq[:4].tolist(), "k": 2}).status_code == 200


def _gated(engine: SearchEngine, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event, list]:
    """facesearch.engine.search blocks on the first call until ``gate`` is set; ``entered`` is set when it starts."""
    gate, entered, calls = threading.Event(), threading.Event(), []
    real = engine.search

    def slow_search(xq, **kw):
        calls.append(len(xq))
        entered.set()
        assert gate.wait(10), "the test never opened the gate"
        return real(xq, **kw)

    monkeypatch.setattr(engine, "search", slow_search)
    return gate, entered, calls


def _count_submits(batcher: SearchBatcher, monkeypatch: pytest.MonkeyPatch) -> threading.Semaphore:
    submitted, real = threading.Semaphore(0), batcher.submit

    def submit(*args, **kwargs):
        future = real(*args, **kwargs)
        submitted.release()
        return future

    monkeypatch.setattr(batcher, "submit", submit)
    return submitted


def test_a_full_queue_answers_503_with_retry_after(engine, monkeypatch):
    app = create_app(engine, cost=CHEAP, limits=ServiceLimits(queue_size=2))
    client = TestClient(app)
    submitted = _count_submits(app.state.batcher, monkeypatch)
    gate, entered, _ = _gated(engine, monkeypatch)
    body = {"embedding": engine.vectors([1])[0].tolist(), "k": 3}
    with ThreadPoolExecutor(4) as pool:
        try:
            running = pool.submit(client.post, "/search/embedding", json=body)
            assert entered.wait(10)
            waiting = [pool.submit(client.post, "/search/embedding", json=body) for _ in range(2)]
            for _ in range(3):
                assert submitted.acquire(timeout=10)  # the running request and the two waiting ones
            full = client.post("/search/embedding", json=body)
            assert full.status_code == 503 and "queue is full" in full.text, full.text
            assert int(full.headers["Retry-After"]) >= 1
            assert client.get("/health").json()["searches"]["waiting"] == 2
        finally:
            gate.set()
        assert [f.result().status_code for f in (running, *waiting)] == [200, 200, 200]
    assert client.get("/health").json()["searches"] | {"requests": 0, "batches": 0} == {
        "requests": 0, "batches": 0, "waiting": 0, "backlog_s": 0.0}  # fmt: skip


def test_a_request_waiting_past_the_budget_gets_504_and_never_runs(engine, monkeypatch):
    client = TestClient(create_app(engine, cost=CHEAP, limits=ServiceLimits(time_budget=0.5)))
    gate, entered, calls = _gated(engine, monkeypatch)
    xq = engine.vectors([1, 2])
    with ThreadPoolExecutor(2) as pool:
        try:
            running = pool.submit(client.post, "/search/embedding", json={"embedding": xq[0].tolist(), "k": 3})
            assert entered.wait(10)
            late = pool.submit(client.post, "/search/embedding", json={"embedding": xq[1].tolist(), "k": 4})
            res = late.result(timeout=10)
        finally:
            gate.set()
        assert res.status_code == 504 and "waited 0.5 s" in res.text, res.text
        assert running.result().status_code == 200
    assert client.post("/search/embedding", json={"embedding": xq[1].tolist(), "k": 4}).status_code == 200
    assert calls == [1, 1]  # the withdrawn request never reached the engine


def test_missing_attribute_values_are_null_not_a_500(engine, monkeypatch):
    name = engine.attribute_names[0]
    column = engine.columns[name].copy()
    column[5] = np.nan
    monkeypatch.setitem(engine.columns, name, column)
    client = TestClient(create_app(engine, cost=CHEAP))
    res = client.post("/search/embedding", json={"embedding": engine.vectors([5])[0].tolist(), "k": 1})
    assert res.status_code == 200, res.text
    hit = res.json()["results"][0]["hits"][0]
    assert hit["id"] == 5 and hit["attributes"][name] is None


def test_health_shows_every_limit(engine):
    limits = ServiceLimits(max_rows=7, time_budget=2.5)
    health = TestClient(create_app(engine, limits=limits, max_k=33)).get("/health").json()
    assert health["limits"] == {**limits.to_dict(), "max_k": 33, "token": False, "public_docs": False}
    assert set(health["cost_model"]) == {"call_s", "row_s", "hit_s", "term_s", "string_s", "nb", "identities"}


def test_limits_must_be_positive():
    for bad in ({"max_k": 0}, {"max_bytes": -1}, {"time_budget": math.inf}, {"max_rows": 1.5}, {"queue_size": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServiceLimits(**bad)


def test_filter_terms_and_the_cost_model(engine):
    assert filter_terms(engine.parse("Male and not Big_Nose")) == FilterTerms(4, 0)
    assert filter_terms(engine.parse("id in (1, 2, 3)")) == FilterTerms(5, 0)
    assert filter_terms(engine.parse('identity in ("a", "b") or id > 3')) == FilterTerms(8, 2)
    cost = calibrate(engine)
    assert cost.nb == 500 and cost.identities == 50
    assert min(cost.call_s, cost.row_s, cost.hit_s, cost.term_s, cost.string_s) > 0
    assert cost.estimate(2, 10) - cost.estimate(1, 10) == pytest.approx(cost.row_s + 10 * cost.hit_s)
    assert cost.estimate(1, 10, FilterTerms(10, 2)) > cost.estimate(1, 10)
    assert cost.hits_per_row(5, grouped=True) == 50 and cost.hits_per_row(51, grouped=True) == 500


def test_batcher_bounds_its_queue_and_withdraws_on_timeout(engine, monkeypatch):
    gate, entered, calls = _gated(engine, monkeypatch)
    batcher = SearchBatcher(engine, queue_size=1, budget=1.0)
    xq = engine.vectors([1, 2, 3])
    try:
        running = batcher.submit(xq[0], 3, cost=0.25)
        assert entered.wait(10)
        with pytest.raises(Busy, match=r"needs ~0\.80 s"):
            batcher.submit(xq[1], 3, cost=0.8)  # 0.25 s of work admitted + 0.8 > the budget of 1 s
        with pytest.raises(QueueTimeout):
            batcher.search(xq[1], 3, cost=0.5, timeout=0.05)
        waiting = batcher.submit(xq[2], 3, cost=0.5)
        with pytest.raises(Busy, match="queue is full") as busy:
            batcher.submit(xq[1], 3)
        assert busy.value.retry_after >= 1
    finally:
        gate.set()
    assert running.result(10)[0].hits[0].id == 1 and waiting.result(10)[0].hits[0].id == 3
    assert calls == [1, 1] and batcher.backlog == 0 and batcher.waiting == 0


def test_model_gate_lets_one_image_through_and_bounds_the_waiting():
    gate, inside, release = _ModelGate(queue_size=1, timeout=10), threading.Event(), threading.Event()
    asked, lock = threading.Semaphore(0), gate._lock

    class Signalling:  # the gate's lock, telling the test each time a request starts waiting for it
        def acquire(self, timeout: float = -1) -> bool:
            asked.release()
            return lock.acquire(timeout=timeout)

        def release(self) -> None:
            lock.release()

    gate._lock = Signalling()  # type: ignore[assignment]

    def hold() -> None:
        with gate.hold():
            inside.set()
            assert release.wait(10)

    with ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(hold)
            assert inside.wait(10)
            second = pool.submit(hold)
            assert asked.acquire(timeout=10) and asked.acquire(timeout=10)  # the second waits for the model
            with pytest.raises(Busy, match="1 image queries are waiting"), gate.hold():
                pass
        finally:
            release.set()
        first.result(10), second.result(10)
    quick = _ModelGate(queue_size=1, timeout=0.05)
    with quick.hold(), pytest.raises(Busy, match="stayed busy"), quick.hold():
        pass
