"""The HTTP service through FastAPI's test client: results equal the library's, 4xx for every bad input, bearer
token, size limits, concurrent requests, an image query through the index's model (with an attribute match: the probe's
attributes from the image, from the model's head or the index's predictor), the OpenAPI description."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from facesearch.engine.attribute_match import AttributeMatch
from facesearch.engine.search import SearchEngine
from facesearch.engine.service import SearchBatcher, _Pending, create_app
from facesearch.indexer.embed import EmbedConfig
from facesearch.indexer.index import IndexConfig, build_index
from facesearch.indexer.pipeline import run_embed
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> SearchEngine:
    root = tmp_path_factory.mktemp("svc")
    write_synth_features(SynthFeaturesConfig(out=root / "s", rows=500, dim=16, identities=50, dtype="float32"))
    build_index(root / "s", root / "i", IndexConfig(kind="flat", recall_sample=0))
    return SearchEngine.open(root / "i")


def _png(path: Path) -> bytes:
    ok, png = cv2.imencode(".png", cv2.imread(str(path)))
    assert ok
    return png.tobytes()


def test_embedding_search_equals_the_library(engine):
    client = TestClient(create_app(engine))
    assert client.get("/health").json()["index"]["nb"] == 500
    xq = engine.vectors([3, 4])
    res = client.post("/search/embedding", json={"embedding": xq.tolist(), "k": 5, "filter": "Male"})
    assert res.status_code == 200, res.text
    want = engine.search(xq, k=5, filter="Male")
    got = res.json()["results"]
    assert [[h["id"] for h in r["hits"]] for r in got] == [[h.id for h in r.hits] for r in want]
    one = client.post("/search/embedding", json={"embedding": xq[0].tolist(), "group_by": "identity", "k": 3})
    assert one.status_code == 200 and len(one.json()["results"][0]["hits"]) == 3
    assert "/search/image" in client.get("/openapi.json").json()["paths"]


def test_bad_requests_are_4xx_with_a_message(engine):
    client = TestClient(create_app(engine, max_bytes=4096, max_k=50))
    v = engine.vectors([1])[0].tolist()
    cases = [
        ({"embedding": v, "filter": "Beard > 1"}, 400, "Beard"),
        ({"embedding": v[:5]}, 400, "d=5"),
        ({"embedding": v, "k": 51}, 422, "limit"),
        ({"embedding": v, "k": 0}, 422, ""),
        ({"embedding": "x"}, 422, ""),
        ({"embedding": [v, v[:3]]}, 422, ""),
    ]
    for body, status, text in cases:
        res = client.post("/search/embedding", json=body)
        assert res.status_code == status and text in res.text, (body, res.status_code, res.text)
    big = client.post("/search/embedding", json={"embedding": [0.0] * 2000})
    assert big.status_code == 413
    img = client.post("/search/image", files={"image": ("x.jpg", b"not an image", "image/jpeg")})
    assert img.status_code == 400 and "without --checkpoint" in img.text


def test_bearer_token(engine):
    client = TestClient(create_app(engine, token="s3cret"))
    body = {"embedding": engine.vectors([1])[0].tolist()}
    assert client.get("/health").status_code == 200
    assert client.post("/search/embedding", json=body).status_code == 401
    assert client.post("/search/embedding", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.post("/search/embedding", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_concurrent_requests_give_the_same_answers(engine):
    client = TestClient(create_app(engine))
    xq = engine.vectors(list(range(16)))

    def ask(i: int) -> list[int]:
        res = client.post("/search/embedding", json={"embedding": xq[i].tolist(), "k": 4, "filter": "id >= 100"})
        assert res.status_code == 200
        return [h["id"] for h in res.json()["results"][0]["hits"]]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(16)))
    assert got == [[h.id for h in r.hits] for r in engine.search(xq, k=4, filter="id >= 100")]


def test_batcher_merges_waiting_requests_with_equal_options(engine, monkeypatch):
    """While one search runs, requests queue up; the next engine call answers all of those with the same options
    at once (each gets its own rows back), the others run in their own batch; one bad request in a merged batch
    fails alone."""
    gate, entered, calls = threading.Event(), threading.Event(), []
    real = engine.search

    def slow_search(xq, **kw):
        calls.append((len(xq), kw["filter"]))
        if len(calls) == 1:
            entered.set()
            gate.wait(10)
        return real(xq, **kw)

    monkeypatch.setattr(engine, "search", slow_search)
    batcher = SearchBatcher(engine)
    queued, real_submit = threading.Semaphore(0), batcher.submit

    def submit(*args, **kwargs):
        future = real_submit(*args, **kwargs)  # returns once the request is in the queue
        queued.release()
        return future

    monkeypatch.setattr(batcher, "submit", submit)
    xq = engine.vectors(list(range(12)))
    with ThreadPoolExecutor(12) as pool:
        first = pool.submit(batcher.search, xq[:1], 3)
        assert entered.wait(10)
        same = [pool.submit(batcher.search, xq[i], 3) for i in range(1, 9)]
        other = [pool.submit(batcher.search, xq[i], 3, "Male") for i in range(9, 11)]
        bad = pool.submit(batcher.search, xq[11], 3, "Nosuch > 1")
        for n in range(1, 13):  # every request queued (the first is already running)
            assert queued.acquire(timeout=10), f"only {n - 1} of 12 requests reached the queue in 10 s"
        gate.set()
        answers = [first.result(), *(f.result() for f in same), *(f.result() for f in other)]
        with pytest.raises(ValueError, match="Nosuch"):
            bad.result()
    assert calls[0] == (1, None) and calls[1] == (8, None) and calls[2] == (2, "Male")  # merged
    assert calls[3:] == [(1, "Nosuch > 1")]
    for i, got in enumerate(answers):
        flt = "Male" if i in (9, 10) else None
        assert [h.id for h in got[0].hits] == [h.id for h in real(xq[i], k=3, filter=flt)[0].hits]
    assert batcher.requests == 12 and batcher.batches == 4
    good, wrong = (
        _Pending(xq[:2], (3, None, None, "max", None)),
        _Pending(np.zeros((1, 5), np.float32), (3, None, None, "max", None)),
    )
    batcher._run([good, wrong])  # a merged batch that cannot even be stacked
    assert [h.id for h in good.future.result()[1].hits] == [h.id for h in real(xq[1], k=3)[0].hits]
    with pytest.raises(ValueError, match="d=5"):
        wrong.future.result()


def test_image_query_through_the_index_model(faces, orl_dir):
    client = TestClient(create_app(faces, detector_pad=20))
    png = _png(orl_dir / "s1" / "3.pgm")
    res = client.post("/search/image", files={"image": ("3.png", png, "image/png")}, data={"k": "3"})
    assert res.status_code == 200, res.text
    top = res.json()["results"][0]["hits"][0]
    assert top["path"].endswith("3.pgm") and top["score"] > 0.999
    bad = client.post("/search/image", files={"image": ("t.jpg", b"hello, not a jpeg", "image/jpeg")})
    assert bad.status_code == 400 and "t.jpg" in bad.text
    blank = np.zeros((112, 92, 3), np.uint8)
    _, png = cv2.imencode(".png", blank)
    noface = client.post("/search/image", files={"image": ("blank.png", png.tobytes(), "image/png")})
    assert noface.status_code == 422 and "no face" in noface.text.lower()


def _matched_image_queries(engine: SearchEngine, png: Path) -> None:
    """/search/image with a ``match`` form field answers as the library's search on the probe's embedding and
    attribute probabilities from ``SearchEngine.embed_images`` (the ``facesearch search --probes`` path)."""
    client = TestClient(create_app(engine, detector_pad=20))
    xq, probe, _ = engine.embed_images([png], pad=20)
    names = engine.attribute_names
    assert names[1] == "Big_Nose"  # the tiny model's probabilities all lie near 0.5; at margin 0.5 Big_Nose splits s1
    cases = [({"attributes": "all", "margins": 0.5}, AttributeMatch(names, margins=(0.5,)), None),
             ({"attributes": ["Big_Nose", "Male"], "margins": [0.5, 0.1]},
              AttributeMatch(("Big_Nose", "Male"), margins=(0.5, 0.1)), "id >= 1")]  # fmt: skip
    for body, match, flt in cases:
        form = {"k": "4", "match": json.dumps(body), **({} if flt is None else {"filter": flt})}
        res = client.post("/search/image", files={"image": ("3.png", png.read_bytes(), "image/png")}, data=form)
        assert res.status_code == 200, res.text
        (got,) = res.json()["results"]
        (want,) = engine.search(xq, k=4, filter=flt, match=match, probe_attributes=probe)
        assert [h["id"] for h in got["hits"]] == [h.id for h in want.hits]
        assert got["passing"] == want.passing and got["margins"] == want.margins
        assert want.passing < engine.loaded.info.nb - (flt is not None)  # the match did exclude items


def test_image_query_with_an_attribute_match(faces, orl_dir, ckpt, tmp_path, monkeypatch):
    """The probe's attribute probabilities come from the image, from the source of the gallery's columns: the
    model's head, or (an index embedded with --attributes-from, here the checkpoint read as an identity-crop
    predictor) the index's predictor, run once per image query."""
    png = tmp_path / "3.png"
    png.write_bytes(_png(orl_dir / "s1" / "3.pgm"))
    _matched_image_queries(faces, png)
    cfg = EmbedConfig(input=orl_dir / "s1", checkpoint=ckpt, out=tmp_path / "s", detector_pad=20, workers=1,
                      attributes_from=ckpt)  # fmt: skip
    run_embed(cfg)
    build_index(tmp_path / "s", tmp_path / "i", IndexConfig(kind="flat", recall_sample=0))
    predicted = SearchEngine.open(tmp_path / "i", checkpoint=ckpt, device="cpu")
    assert predicted.predictor is not None
    calls, real = [], predicted.predictor.predict_crops
    monkeypatch.setattr(predicted.predictor, "predict_crops", lambda crops: calls.append(len(crops)) or real(crops))
    _matched_image_queries(predicted, png)
    assert calls == [1] * 3  # embed_images once, then each of the two image queries


def test_bad_image_matches_are_400_before_the_image_is_read(faces, engine, monkeypatch):
    """A match that is not JSON, not a match, or a bad one (as on /search/embedding) is a 400 naming the problem,
    answered before the upload is decoded (the upload here is not an image); so is a match with no model, or whose
    attributes the model's head does not predict."""
    client = TestClient(create_app(faces, detector_pad=20))
    names = list(faces.attribute_names)
    cases = [
        ("{attributes: all}", "match: Invalid JSON"),
        ('["Male"]', "match: Input should be an object"),
        ('{"margins": 0.2}', "match.attributes: Field required"),
        ('{"attributes": 3, "margins": 0.2}', "match.attributes: Input should be"),
        ('{"attributes": ["Male"]}', "exactly one of margins"),
        ('{"attributes": ["Male"], "margins": 0.7}', "[0, 0.5]"),
        ('{"attributes": ["Beard"], "margins": 0.2}', "no attribute column ['Beard']"),
        ('{"attributes": "all", "max_mate_loss": 0.01}', "no validation statistics"),
    ]
    for text, message in cases:
        res = client.post("/search/image", files={"image": ("x.png", b"not an image", "image/png")},
                          data={"match": text})  # fmt: skip
        assert res.status_code == 400 and message in res.json()["detail"], (text, res.status_code, res.text)
    ok = json.dumps({"attributes": names[:2], "margins": 0.2})
    no_model = TestClient(create_app(engine)).post("/search/image", files={"image": ("x.png", b"x", "image/png")},
                                                   data={"match": ok})  # fmt: skip
    assert no_model.status_code == 400 and "without --checkpoint" in no_model.text
    assert faces.embedder is not None
    monkeypatch.setattr(type(faces.embedder), "attributes", property(lambda self: tuple(names[1:])))
    res = client.post("/search/image", files={"image": ("x.png", b"x", "image/png")}, data={"match": ok})
    assert res.status_code == 400, res.text
    assert f"probabilities of {names[:1]}, which the model's attribute head does not predict" in res.json()["detail"]


def test_embeddings_are_normalised_and_bad_rows_named(engine):
    """A posted embedding of any scale (3x, 1e-30, 1e39: beyond float32, still a direction) gets the unit query's
    hits and cosine scores, so a threshold means the same; NaN, infinity (JSON allows both as extensions) and all
    zeros are a 422 naming the request's row, before the request can join a batch."""
    client = TestClient(create_app(engine))
    xq = engine.vectors([3, 4])
    want = engine.search(xq, k=5, threshold=0.2)
    for scale in (3.0, 1e-30, 1e39):
        body = {"embedding": (xq.astype(np.float64) * scale).tolist(), "k": 5, "threshold": 0.2}
        res = client.post("/search/embedding", json=body)
        assert res.status_code == 200, res.text
        got = res.json()["results"]
        assert [[h["id"] for h in r["hits"]] for r in got] == [[h.id for h in r.hits] for r in want]
        for r, w in zip(got, want, strict=True):
            assert r["accepted"] is True
            # float32 rounding of the scaled input before its normalisation: a few ulps of 1
            np.testing.assert_allclose([h["score"] for h in r["hits"]], [h.score for h in w.hits], atol=1e-6)
    batches = client.get("/health").json()["searches"]["batches"]
    for value, text in ((float("nan"), "query row 1 holds NaN"), (float("inf"), "query row 1 holds NaN"),
                        (0.0, "query row 1 is all zeros")):  # fmt: skip
        rows = xq.tolist()
        rows[1] = [value] * len(rows[1]) if value == 0.0 else [*rows[1][:-1], value]
        raw = json.dumps({"embedding": rows, "k": 3})  # NaN / Infinity tokens: httpx's json= refuses them
        res = client.post("/search/embedding", content=raw, headers={"Content-Type": "application/json"})
        assert res.status_code == 422 and text in res.text, res.text
    one = client.post("/search/embedding", json={"embedding": [0.0] * engine.d})
    assert one.status_code == 422 and "query row 0 is all zeros" in one.text
    assert client.get("/health").json()["searches"]["batches"] == batches  # refused before the search thread
