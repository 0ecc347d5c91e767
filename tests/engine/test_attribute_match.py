"""Probe-relative attribute matching against brute force on real flat indexes: per query, the exact top-k of the items
not confidently opposed to the probe (plain, grouped, with a literal filter, re-ranked, excluded ids, thresholds), one
retrieval per distinct probe code, margins chosen from the synthetic features' validation statistics, NaN attributes
kept, every mistake a clear error, and the same through ``facesearch search`` and the HTTP service."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from facesearch.cli import main
from facesearch.engine.attribute_match import AttributeMatch, match_summary, resolve_match
from facesearch.engine.filter_cost import choose_margins, predicted_cost, statistics_from_source
from facesearch.engine.search import SearchEngine
from facesearch.engine.service import create_app
from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, build_index
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features

D = 16
PAIR = ("Male", "Big_Nose")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic features (1500 rows, 100 identities): their attribute columns carry the law's validation
    statistics."""
    root = tmp_path_factory.mktemp("match")
    write_synth_features(SynthFeaturesConfig(out=root / "s", rows=1500, dim=D, identities=100, dtype="float32"))
    build_index(root / "s", root / "i", IndexConfig(kind="flat", recall_sample=0))
    return root / "i"


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gallery whose attribute columns record no validation statistics (the model's own head), with NaN in some
    rows' Male: 400 random unit rows, 40 identities."""
    root = tmp_path_factory.mktemp("bare")
    rng = np.random.default_rng(5)
    n = 400
    xb = rng.standard_normal((n, D)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    male, nose = rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)
    male[::7] = np.nan
    ids = np.arange(n, dtype=np.int64)
    table = shards.table_from_arrays(ids, [f"{i}.jpg" for i in ids], [f"p{i % 40}" for i in ids], xb,
                                     {"Male": male, "Big_Nose": nose}, None, None, ["ok"] * n, [None] * n,
                                     dtype="float32")  # fmt: skip
    entry = shards.write_shard(root / "s" / shards.shard_name(0), table)
    shards.write_manifest(root / "s", shards.Manifest("fp-bare", D, "float32", PAIR, shards=(entry,),
                                                      planned_shards=1, complete=True))  # fmt: skip
    build_index(root / "s", root / "i", IndexConfig(kind="flat", recall_sample=0))
    return root / "i"


def _queries(eng: SearchEngine, ids: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit queries near the given items, with those items' attribute probabilities as the probes' own (the first
    probe is made undecided on every attribute: it opposes nothing)."""
    rng = np.random.default_rng(seed)
    xq = eng.vectors(ids) + 0.05 * rng.standard_normal((len(ids), eng.d)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    probe = np.stack([eng.columns[a][eng.rows(ids)] for a in eng.attribute_names], axis=1)
    probe[0] = 0.5
    return xq, probe


def _keep(eng: SearchEngine, probe: np.ndarray, margins: dict[str, float]) -> np.ndarray:
    """(nq, nb) the items not confidently opposed to each probe, written out from the definition."""
    keep = np.ones((len(probe), len(eng.columns["id"])), bool)
    for a, m in margins.items():
        p = probe[:, eng.attribute_names.index(a)].astype(np.float64)[:, None]
        g = eng.columns[a].astype(np.float64)[None, :]
        keep &= ~(((p > 1 - m) & (g < m)) | ((p < m) & (g > 1 - m)))  # NaN compares False: never confident
    return keep


def _brute(eng: SearchEngine, xq: np.ndarray, keep: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, the exact top-k of its passing items, ties by the smaller id."""
    xb, ids = eng.flat_vectors, eng.columns["id"]
    assert xb is not None
    out = []
    for q in range(len(xq)):
        s, i = xb[keep[q]] @ xq[q], ids[keep[q]]
        order = np.lexsort((i, -s))[:k]
        out.append((s[order], i[order]))
    return out


def _check(results, ref, k: int) -> None:
    for res, (s, i) in zip(results, ref, strict=True):
        assert [h.id for h in res.hits] == i[:k].tolist()
        np.testing.assert_allclose([h.score for h in res.hits], s[:k], atol=1e-5)  # torch vs numpy float32 products


def _counting(eng: SearchEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of every retrieval the engine runs."""
    calls: list[int] = []
    real = eng.retrieve

    def retrieve(xq, k, *args, **kwargs):
        calls.append(len(xq))
        return real(xq, k, *args, **kwargs)

    monkeypatch.setattr(eng, "retrieve", retrieve)
    return calls


IDS = [3, 40, 41, 400, 777, 1001, 1200, 1499]


@pytest.mark.parametrize("margins", [(0.3,), (0.45, 0.1), (0.5,), (0.0,)])
def test_matched_top_k_equals_brute_force(gallery, margins, monkeypatch):
    eng = SearchEngine.open(gallery)
    xq, probe = _queries(eng, IDS)
    match = AttributeMatch(PAIR, margins=margins)
    resolved = dict(zip(PAIR, match.margins or (), strict=True))
    keep = _keep(eng, probe, resolved)
    calls = _counting(eng, monkeypatch)
    res = eng.search(xq, k=10, match=match, probe_attributes=probe)
    _check(res, _brute(eng, xq, keep, 10), 10)
    assert [r.passing for r in res] == keep.sum(axis=1).tolist()
    assert all(r.margins == resolved and r.exact for r in res)
    assert res[0].strategy == "none" and res[0].passing == 1500  # the undecided probe: nothing to exclude
    # one retrieval per distinct probe code (confidently positive / negative per attribute), not per query
    cols = [eng.attribute_names.index(a) for a in PAIR]
    codes = {tuple((p > 1 - m, p < m) for p, m in zip(probe[q, cols].astype(float), resolved.values(), strict=True))
             for q in range(len(IDS))}  # fmt: skip
    assert len(calls) == len(codes) < len(IDS) and sum(calls) == len(IDS)


def test_combined_with_a_literal_filter_and_every_strategy(gallery):
    eng = SearchEngine.open(gallery)
    xq, probe = _queries(eng, IDS, seed=1)
    match = AttributeMatch(PAIR, margins=(0.3,))
    expr = "Chubby < 0.5 and not Double_Chin"
    keep = _keep(eng, probe, dict.fromkeys(PAIR, 0.3)) & eng.parse(expr).mask(eng.columns)[None, :]
    ref = _brute(eng, xq, keep, 7)
    res = eng.search(xq, k=7, filter=expr, match=match, probe_attributes=probe)
    _check(res, ref, 7)
    assert [r.passing for r in res] == keep.sum(axis=1).tolist()
    for forced in ("subset", "masked", "selector", "postfilter"):
        _check(eng.search(xq, k=7, filter=expr, match=match, probe_attributes=probe, strategy=forced), ref, 7)
    # the match's predicted mates lost and the literal filter's recall loss combine as independent
    stats = statistics_from_source(eng.loaded.info.attribute_provenance, PAIR)
    a = eng.expected_recall_loss(eng.parse(expr))
    b = predicted_cost(stats, "confident", dict.fromkeys(PAIR, 0.3)).mates_lost
    assert a is not None and 0 < b < 0.2
    assert all(r.expected_recall_loss == pytest.approx(1 - (1 - a) * (1 - b)) for r in res)
    assert eng.search(xq, k=7, match=match, probe_attributes=probe)[1].expected_recall_loss == pytest.approx(b)


def test_grouped_excluded_and_thresholded(gallery):
    """Grouped by identity, with each query's own id left out and a threshold: brute force over the passing items."""
    eng = SearchEngine.open(gallery)
    xq, probe = _queries(eng, IDS, seed=2)
    match = AttributeMatch(PAIR, margins=(0.35, 0.25))
    keep = _keep(eng, probe, dict(zip(PAIR, (0.35, 0.25), strict=True)))
    keep[np.arange(len(IDS)), eng.rows(IDS)] = False  # exclude_ids
    ident = eng.columns["identity"]
    assert eng.flat_vectors is not None
    res = eng.search(xq, k=4, group_by="identity", match=match, probe_attributes=probe, exclude_ids=IDS,
                     threshold=0.3)  # fmt: skip
    for q, r in enumerate(res):
        s = eng.flat_vectors @ xq[q]
        best: dict[str, float] = {}
        for row in np.argsort(-s, kind="stable"):
            if keep[q, row]:
                best.setdefault(ident[row], float(s[row]))
        top = sorted(best.items(), key=lambda t: -t[1])[:4]
        want = [(i, v) for i, v in top if v >= 0.3]
        assert [h.identity for h in r.hits] == [i for i, _ in want]
        np.testing.assert_allclose([h.score for h in r.hits], [v for _, v in want], atol=1e-5)
        assert r.accepted == (top[0][1] >= 0.3) and IDS[q] not in [h.id for h in r.hits]


def test_soft_reranking_equals_the_same_mask_as_a_literal_filter(gallery):
    """For one probe a match is a literal filter ("not confidently opposed" written out): re-ranked, grouped or not,
    the matched search answers what the filtered search (tested against brute force elsewhere) answers."""
    eng = SearchEngine.open(gallery)
    xq, probe = _queries(eng, [500, 900], seed=3)
    match = AttributeMatch(PAIR, margins=(0.3,))
    for q in range(2):
        conds = []
        for a in PAIR:
            p = float(probe[q, eng.attribute_names.index(a)])
            if p > 0.7:
                conds.append(f"not ({a} < 0.3)")
            elif p < 0.3:
                conds.append(f"not ({a} > 0.7)")
        expr = " and ".join(conds) or None
        for group_by in (None, "identity"):
            opts = {"k": 5, "soft_weight": 0.4, "probe_attributes": probe[q : q + 1], "group_by": group_by}
            (got,) = eng.search(xq[q : q + 1], match=match, **opts)
            (want,) = eng.search(xq[q : q + 1], filter=expr, **opts)
            assert [(h.id, h.rank_score) for h in got.hits] == [(h.id, h.rank_score) for h in want.hits]
            assert got.passing == want.passing


def test_margins_chosen_for_a_mate_loss_budget(gallery):
    """``max_mate_loss``: the margins are choose_margins' on the columns' validation statistics, the result says
    their predicted mates lost (within the budget), and the search equals the one with those margins fixed."""
    eng = SearchEngine.open(gallery)
    xq, probe = _queries(eng, IDS, seed=4)
    stats = statistics_from_source(eng.loaded.info.attribute_provenance, PAIR)
    for budget in (0.005, 0.05):
        chosen = choose_margins(stats, budget)
        res = eng.search(xq, k=5, match=AttributeMatch(PAIR, max_mate_loss=budget), probe_attributes=probe)
        lost = predicted_cost(stats, "confident", chosen).mates_lost
        assert res[0].margins == {a: pytest.approx(chosen[a]) for a in PAIR} and lost <= budget + 1e-9
        assert all(r.expected_recall_loss == pytest.approx(lost) for r in res)
        fixed = AttributeMatch(PAIR, margins=tuple(chosen[a] for a in PAIR))
        same = eng.search(xq, k=5, match=fixed, probe_attributes=probe)
        assert [[h.id for h in r.hits] for r in res] == [[h.id for h in r.hits] for r in same]
        _check(res, _brute(eng, xq, _keep(eng, probe, chosen), 5), 5)
    resolved = resolve_match(AttributeMatch(PAIR, max_mate_loss=0.01), eng.attribute_names,
                             eng.loaded.info.attribute_provenance)  # fmt: skip
    line = match_summary(resolved, [750, 1500], 1500)
    assert "Male 0." in line and "% of true mates" in line and "75.0 % of the gallery kept" in line


def test_nan_attributes_are_never_confident(bare):
    """Gallery items with NaN in a matched attribute are kept whatever the probe; a probe's NaN opposes nothing.
    Fixed margins work without validation statistics (no predicted loss); a budget needs them."""
    eng = SearchEngine.open(bare)
    xq, probe = _queries(eng, [1, 7, 50, 90, 200])
    probe[2, eng.attribute_names.index("Male")] = np.nan
    match = AttributeMatch(("Male",), margins=(0.4,))
    keep = _keep(eng, probe, {"Male": 0.4})
    nan = np.isnan(eng.columns["Male"])
    assert keep[:, nan].all() and keep[2].all() and not keep.all()
    res = eng.search(xq, k=400, match=match, probe_attributes=probe)
    _check(res, _brute(eng, xq, keep, 400), 400)
    assert all(r.expected_recall_loss is None for r in res)
    with pytest.raises(ValueError, match=r"no validation statistics for \['Male'\].*own attribute head"):
        eng.search(xq, k=3, match=AttributeMatch(("Male",), max_mate_loss=0.01), probe_attributes=probe)


def test_bad_matches_are_named(gallery):
    eng = SearchEngine.open(gallery)
    xq, probe = _queries(eng, [1, 2])
    ok = AttributeMatch(PAIR, margins=(0.2,))
    with pytest.raises(ValueError, match=r"attribute probabilities, 2 x 7.*got none; use image or id queries"):
        eng.search(xq, k=3, match=ok)
    with pytest.raises(ValueError, match=r"got shape \(1, 7\)"):
        eng.search(xq, k=3, match=ok, probe_attributes=probe[:1])
    with pytest.raises(ValueError, match=r"no attribute column \['Beard'\].*Male"):
        eng.search(xq, k=3, match=AttributeMatch(("Beard",), margins=(0.2,)), probe_attributes=probe)
    bad = [
        ({"attributes": PAIR, "margins": (0.6,)}, r"one in \[0, 0.5\] per attribute"),
        ({"attributes": PAIR, "margins": (0.1, 0.2, 0.3)}, "per attribute"),
        ({"attributes": PAIR, "margins": (float("nan"),)}, "per attribute"),
        ({"attributes": PAIR}, "exactly one of margins"),
        ({"attributes": PAIR, "margins": (0.1,), "max_mate_loss": 0.01}, "exactly one of margins"),
        ({"attributes": PAIR, "max_mate_loss": 1.0}, r"max_mate_loss must be in \[0, 1\)"),
        ({"attributes": (), "margins": (0.1,)}, "1 to 31 attributes"),
        ({"attributes": tuple(f"a{i}" for i in range(32)), "margins": (0.1,)}, "1 to 31 attributes"),
        ({"attributes": ("Male", "Male"), "margins": (0.1,)}, "distinct"),
        ({"attributes": "Male", "margins": (0.1,)}, "sequence of attribute names"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            AttributeMatch(**kwargs)  # type: ignore[arg-type]
    assert AttributeMatch(["Male", "Chubby"], margins=[0.25]).margins == (0.25, 0.25)  # type: ignore[arg-type]


def test_search_cli(gallery, bare, tmp_path):
    runner = CliRunner()
    base = ["search", "--index", str(gallery), "--ids", "5,77", "-k", "3"]
    res = runner.invoke(main, [*base, "--match", "Male,Big_Nose", "--max-mate-loss", "0.02"])
    assert res.exit_code == 0, res.output
    first = res.output.splitlines()[0]
    assert first.startswith("attribute match: not confidently opposed (margins Male 0.") and "Big_Nose 0." in first
    assert "% of true mates" in first and "% of the gallery kept per query" in first and "query id 5" in res.output
    res = runner.invoke(main, [*base, "--match", "all", "--match-margin", "0.2", "--json", "--group-by", "identity"])
    assert res.exit_code == 0, res.output
    docs = json.loads(res.output)
    eng = SearchEngine.open(gallery)
    assert docs[0]["margins"] == dict.fromkeys(eng.attribute_names, 0.2) and docs[0]["hits"][0]["id"] == 5
    xq = eng.vectors([5, 77])
    probe = np.stack([eng.columns[a][eng.rows([5, 77])] for a in eng.attribute_names], axis=1)
    want = eng.search(xq, k=3, group_by="identity", probe_attributes=probe,
                      match=AttributeMatch(eng.attribute_names, margins=(0.2,)))  # fmt: skip
    assert [[h["id"] for h in d["hits"]] for d in docs] == [[h.id for h in r.hits] for r in want]
    np.save(tmp_path / "q.npy", xq)
    usage = [
        (["--max-mate-loss", "0.01"], "go with --match"),
        (["--match-margin", "0.1"], "go with --match"),
        (["--match", "Male"], "exactly one of --max-mate-loss"),
        (["--match", "Male", "--max-mate-loss", "0.01", "--match-margin", "0.1"], "exactly one of --max-mate-loss"),
        (["--match", "Male,,Chubby", "--match-margin", "0.1"], "comma-separated attribute names"),
        (["--match", "Male", "--match-margin", "0.7"], "--match-margin"),
        (["--match", "Male", "--max-mate-loss", "1"], "--max-mate-loss"),
    ]
    for extra, message in usage:
        res = runner.invoke(main, [*base, *extra])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, (extra, res.output)
    res = runner.invoke(main, ["search", "--index", str(gallery), "--embeddings", str(tmp_path / "q.npy"),
                               "--match", "Male", "--match-margin", "0.1"])  # fmt: skip
    assert res.exit_code == 2 and "use --probes or --ids" in res.output
    res = runner.invoke(main, [*base, "--match", "Beard", "--match-margin", "0.1"])
    assert res.exit_code == 1 and "Error: attribute match: no attribute column ['Beard']" in res.output
    res = runner.invoke(main, ["search", "--index", str(bare), "--ids", "1", "--match", "Male",
                               "--max-mate-loss", "0.01"])  # fmt: skip
    assert res.exit_code == 1 and "no validation statistics for ['Male']" in res.output, res.output
    assert "Traceback" not in res.output


def test_service(gallery, bare):
    eng = SearchEngine.open(gallery)
    client = TestClient(create_app(eng))
    xq, probe = _queries(eng, IDS, seed=5)
    rows = [{a: float(p) for a, p in zip(eng.attribute_names, row, strict=True)} for row in probe]
    body = {"embedding": xq.tolist(), "k": 5, "filter": "id >= 10", "probe_attributes": rows,
            "match": {"attributes": list(PAIR), "max_mate_loss": 0.02}}  # fmt: skip
    res = client.post("/search/embedding", json=body)
    assert res.status_code == 200, res.text
    got = res.json()["results"]
    want = eng.search(xq, k=5, filter="id >= 10", match=AttributeMatch(PAIR, max_mate_loss=0.02),
                      probe_attributes=probe)  # fmt: skip
    assert [[h["id"] for h in r["hits"]] for r in got] == [[h.id for h in r.hits] for r in want]
    assert [r["passing"] for r in got] == [r.passing for r in want] and got[0]["margins"] == want[0].margins
    assert got[1]["expected_recall_loss"] == pytest.approx(want[1].expected_recall_loss)
    # one probe, its matched attributes only (the others are not needed), fixed margins
    one = {"embedding": xq[3].tolist(), "k": 5, "probe_attributes": {a: rows[3][a] for a in PAIR},
           "match": {"attributes": list(PAIR), "margins": 0.3}}  # fmt: skip
    res = client.post("/search/embedding", json=one)
    (want1,) = eng.search(xq[3], k=5, match=AttributeMatch(PAIR, margins=(0.3,)), probe_attributes=probe[3:4])
    assert res.status_code == 200 and [h["id"] for h in res.json()["results"][0]["hits"]] == [h.id for h in want1.hits]

    # concurrent matched requests (merged into batches by the search thread) answer as sequential ones do
    def ask(q: int) -> list[int]:
        r = client.post("/search/embedding", json={**body, "embedding": xq[q].tolist(), "probe_attributes": rows[q]})
        assert r.status_code == 200, r.text
        return [h["id"] for h in r.json()["results"][0]["hits"]]

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, range(len(IDS)))) == [[h.id for h in r.hits] for r in want]
    v = xq[0].tolist()
    match = {"attributes": list(PAIR), "margins": 0.2}
    bad = [
        ({"embedding": v, "match": match}, "match needs probe_attributes"),
        ({"embedding": v, "probe_attributes": rows[0]}, "only used with match"),
        ({"embedding": v, "match": {**match, "max_mate_loss": 0.01}, "probe_attributes": rows[0]}, "exactly one of"),
        ({"embedding": v, "match": {"attributes": list(PAIR)}, "probe_attributes": rows[0]}, "exactly one of"),
        ({"embedding": v, "match": {**match, "margins": 0.7}, "probe_attributes": rows[0]}, "[0, 0.5]"),
        ({"embedding": v, "match": {**match, "attributes": ["Beard"]}, "probe_attributes": rows[0]}, "Beard"),
        ({"embedding": v, "match": match, "probe_attributes": {"Male": 0.9}}, "no value for matched attribute"),
        ({"embedding": v, "match": match, "probe_attributes": {**rows[0], "Beard": 0.1}}, "unknown attribute"),
        ({"embedding": v, "match": match, "probe_attributes": {**rows[0], "Male": 1.5}}, "probability in [0, 1]"),
        ({"embedding": v, "match": match, "probe_attributes": [rows[0], rows[1]]}, "2 rows for 1 embedding rows"),
    ]
    for req, message in bad:
        r = client.post("/search/embedding", json=req)
        assert r.status_code == 400 and message in r.json()["detail"], (req, r.status_code, r.text)
    no_stats = TestClient(create_app(SearchEngine.open(bare)))
    req = {"embedding": [1.0] * D, "match": {"attributes": ["Male"], "max_mate_loss": 0.01},
           "probe_attributes": {"Male": 0.9}}  # fmt: skip
    r = no_stats.post("/search/embedding", json=req)
    assert r.status_code == 400 and "no validation statistics for ['Male']" in r.json()["detail"]
