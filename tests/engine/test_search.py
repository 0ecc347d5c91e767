"""The search engine against brute force on a real flat index: exact filtered top-k at every selectivity, each
strategy, identity grouping, thresholds, queries by id, and the model-fingerprint check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from facesearch.benchmarks.thresholds import threshold_from_result
from facesearch.cli import main
from facesearch.engine.search import SearchEngine, format_results
from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, LoadedIndex, build_index, load_index, remove_ids
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gal")
    write_synth_features(SynthFeaturesConfig(out=root / "s", rows=3000, dim=32, identities=150, dtype="float32"))
    build_index(root / "s", root / "i", IndexConfig(kind="flat", recall_sample=0))
    return root / "s", root / "i"


def _brute(gallery: tuple[Path, Path], xq: np.ndarray, k: int, keep: np.ndarray | None = None):
    b = shards.read_all(gallery[0])
    xb, ids = b.xb, b.ids
    if keep is not None:
        xb, ids = xb[keep], ids[keep]
    S = xq @ xb.T
    out = []
    for q in range(len(xq)):
        order = np.lexsort((ids, -S[q]))[:k]
        out.append((S[q][order], ids[order]))
    return out


def _check(results, ref, k):
    for res, (s, i) in zip(results, ref, strict=True):
        got = np.array([h.score for h in res.hits])
        assert len(res.hits) == min(k, len(i))
        np.testing.assert_allclose(got, s[: len(got)], atol=1e-5)
        assert [h.id for h in res.hits] == i[: len(got)].tolist()


@pytest.mark.parametrize(
    "expr, strategy",
    [("id < 3", "subset"), ("id < 30", "subset"), ("id >= 2700", "subset"), ("Male", "subset"),
     ("id < 1500 or Big_Nose", "masked"), ("id != 7", "masked"), ("id < 0", "subset")],
)  # fmt: skip
def test_filtered_top_k_is_exact_at_every_selectivity(gallery, expr, strategy):
    """0 %, 0.1 %, 1 %, 10 %, ~45 %, ~70 % and 99.97 % passing: the automatic strategy and every forced one (the FAISS
    selector and post-filter run on the flat index too) give exactly the brute-force top-k of the passing items."""
    eng = SearchEngine.open(gallery[1])
    rng = np.random.default_rng(0)
    xq = eng.vectors(rng.choice(3000, 5, replace=False)) + 0.05 * rng.normal(size=(5, 32)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)  # unit queries: the engine normalises, the reference does not
    mask = eng.parse(expr).mask(eng.columns)
    ref = _brute(gallery, xq, 10, mask)
    res = eng.search(xq, k=10, filter=expr)
    assert {r.strategy for r in res} == {strategy} and res[0].passing == int(mask.sum()) and res[0].exact
    _check(res, ref, 10)
    for forced in ("subset", "masked", "selector", "postfilter"):
        res = eng.search(xq, k=10, filter=expr, strategy=forced)
        assert {r.strategy for r in res} == {forced}
        _check(res, ref, 10)


def test_screens_agree_and_postfilter_refetches_only_short_queries(gallery, monkeypatch):
    """int8-, bf16-, fp16-screened and plain float32 resident searches return the same answer, one query or a batch;
    a post-filter batch fetches again only the queries whose over-fetch held too few passing hits."""
    engines = [SearchEngine.open(gallery[1], screen=s) for s in ("none", "int8", "bf16", "fp16")]
    xq = engines[0].vectors(list(range(0, 3000, 150)))
    for batch in (xq, xq[:1]):
        answers = [[[h.id for h in r.hits] for r in e.search(batch, k=10, filter="Big_Nose")] for e in engines]
        assert answers[0] == answers[1] == answers[2] == answers[3]
    eng = engines[0]
    calls = []
    real = eng.loaded.search
    monkeypatch.setattr(eng.loaded, "search", lambda x, k: calls.append((len(x), k)) or real(x, k))
    # ~43 % pass: most queries find 10 passing hits among the first ~50, a few must be fetched again (alone)
    flt = "Male"
    res = eng.search(xq, k=10, filter=flt, strategy="postfilter")
    _check(res, _brute(gallery, xq, 10, eng.parse(flt).mask(eng.columns)), 10)
    assert calls[0][0] == 20 and len(calls) > 1 and all(n < 20 for n, _ in calls[1:])


def test_flat_storage_used_in_place_in_table_order(gallery, tmp_path):
    """The resident path views the FAISS storage without copying; when the attribute table's rows are not in
    storage order (or rows were removed) answers and stored vectors still belong to the right ids."""
    eng = SearchEngine.open(gallery[1])
    assert eng.flat_vectors is not None and not eng.flat_vectors.flags["OWNDATA"]  # a view, not a copy
    xq = eng.vectors([5, 77, 2999])
    base = load_index(gallery[1])
    perm = np.random.default_rng(3).permutation(base.attributes.num_rows)
    shuffled = SearchEngine(LoadedIndex(base.index, base.ids[perm], base.info, base.attributes.take(perm)))
    np.testing.assert_array_equal(shuffled.vectors([5, 77, 2999]), xq)
    for flt in (None, "id < 30", "Male"):
        a, b = eng.search(xq, k=8, filter=flt), shuffled.search(xq, k=8, filter=flt)
        assert [[(h.id, h.path) for h in r.hits] for r in a] == [[(h.id, h.path) for h in r.hits] for r in b]
    shutil.copytree(gallery[1], tmp_path / "i")
    remove_ids(tmp_path / "i", np.arange(0, 3000, 7))
    smaller = SearchEngine.open(tmp_path / "i")
    keep = np.arange(3000) % 7 != 0
    _check(smaller.search(xq, k=10), _brute(gallery, xq, 10, keep), 10)


def test_selector_without_a_bitmap(gallery, monkeypatch):
    """Galleries whose ids are too large for a bitmap selector use FAISS's hash-set selector: same answers."""
    import facesearch.engine.strategies as strategies_module

    eng = SearchEngine.open(gallery[1])
    xq = eng.vectors([3, 1000, 2500])
    ref = _brute(gallery, xq, 10, eng.parse("Male").mask(eng.columns))
    _check(eng.search(xq, k=10, filter="Male", strategy="selector"), ref, 10)
    monkeypatch.setattr(strategies_module, "_BITMAP_MAX_IDS", 0)
    assert eng._id_selector(np.array([1, 2]))[1] is None
    _check(eng.search(xq, k=10, filter="Male", strategy="selector"), ref, 10)


def test_unfiltered_and_by_id(gallery):
    eng = SearchEngine.open(gallery[1])
    xq = eng.vectors([5, 77, 2999])
    res = eng.search(xq, k=7)
    _check(res, _brute(gallery, xq, 7), 7)
    assert [r.hits[0].id for r in res] == [5, 77, 2999] and res[0].strategy == "none"
    with pytest.raises(KeyError, match="123456"):
        eng.rows([123456])


def test_group_by_identity_equals_brute_force(gallery):
    eng = SearchEngine.open(gallery[1])
    b = shards.read_all(gallery[0], columns=["identity"])
    ident = np.asarray(b.meta.column("identity").to_pylist())
    xq = eng.vectors([10, 1000])
    res = eng.search(xq, k=5, group_by="identity")
    for q, r in enumerate(res):
        s = b.xb @ xq[q]
        best = {}
        for i in np.argsort(-s):
            best.setdefault(ident[i], s[i])
        top = sorted(best.items(), key=lambda t: -t[1])[:5]
        assert [h.identity for h in r.hits] == [t[0] for t in top]
        np.testing.assert_allclose([h.score for h in r.hits], [t[1] for t in top], atol=1e-5)
    mean = eng.search(xq, k=5, group_by="identity", agg="mean")
    assert all(h.count >= 1 for h in mean[0].hits)


def test_threshold_and_open_set(gallery, tmp_path):
    eng = SearchEngine.open(gallery[1])
    xq = eng.vectors([3])
    (res,) = eng.search(xq, k=10, threshold=0.999)
    assert res.accepted and all(h.score >= 0.999 for h in res.hits)
    (res,) = eng.search(-xq, k=10, threshold=0.99)
    assert res.accepted is False and res.hits == ()
    result = {"kind": "facesearch.megaface_result", "roc": {"far": [1e-6, 1e-3], "threshold": [0.61, 0.42]}}
    (tmp_path / "r.json").write_text(json.dumps(result))
    assert threshold_from_result(tmp_path / "r.json", 1e-3) == 0.42
    with pytest.raises(ValueError, match=r"no threshold at FAR 0\.01"):
        threshold_from_result(tmp_path / "r.json", 1e-2)


def test_bad_input_is_named(gallery, make_checkpoint, tmp_path):
    eng = SearchEngine.open(gallery[1])
    with pytest.raises(ValueError, match="d=8 but the index holds d=32"):
        eng.search(np.ones((1, 8), np.float32))
    with pytest.raises(ValueError, match="Beard"):
        eng.search(eng.vectors([1]), filter="Beard > 0.5")
    with pytest.raises(ValueError, match="not comparable"):
        SearchEngine.open(gallery[1], checkpoint=make_checkpoint(tmp_path / "w.safetensors"), device="cpu")


def test_search_cli(gallery, tmp_path):
    runner = CliRunner()
    base = ["search", "--index", str(gallery[1])]
    res = runner.invoke(main, [*base, "--ids", "5,77", "-k", "3", "--filter", "Male"])
    assert res.exit_code == 0, res.output
    assert "query id 5: subset search" in res.output and "rank" in res.output
    eng = SearchEngine.open(gallery[1])
    np.save(tmp_path / "q.npy", eng.vectors([9, 10]))
    out = tmp_path / "hits.parquet"
    res = runner.invoke(main, [*base, "--embeddings", str(tmp_path / "q.npy"), "--group-by", "identity", "--json",
                               "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    docs = json.loads(res.output[: res.output.rindex("]") + 1])
    assert len(docs) == 2 and docs[0]["hits"][0]["id"] == 9 and pq.read_table(out).num_rows == 20
    res = runner.invoke(main, [*base, "--ids", "5", "--filter", "Male >"])
    assert res.exit_code != 0 and "expected a value" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, [*base, "--ids", "5", "--embeddings", str(tmp_path / "q.npy")])
    assert res.exit_code != 0 and "exactly one of" in res.output


def test_soft_mode_reranks_by_attribute_agreement(gallery):
    eng = SearchEngine.open(gallery[1])
    xq = eng.vectors([42])
    names = eng.attribute_names
    probe = np.stack([eng.columns[a][eng.rows([42])] for a in names], axis=1)
    plain = eng.search(xq, k=10)[0]
    (soft,) = eng.search(xq, k=10, soft_weight=0.5, probe_attributes=probe)
    # the reference: the top 100 by score, re-ranked by the combined score
    cand = eng.search(xq, k=100)[0].hits
    combined = []
    for h in cand:
        agree = np.mean([np.cos(np.pi / 2 * (h.attributes[a] - probe[0, j])) for j, a in enumerate(names)])
        combined.append((-(0.5 * h.score + 0.5 * agree), h.id))
    assert [h.id for h in soft.hits] == [i for _, i in sorted(combined)[:10]]
    assert all(h.rank_score is not None for h in soft.hits) and soft.hits[0].id == 42
    assert [h.id for h in plain.hits] != [h.id for h in soft.hits]
    with pytest.raises(ValueError, match="attribute probabilities"):
        eng.search(xq, k=3, soft_weight=0.5)
    # grouped: identities ranked by their best combined score among the same candidates (top 10 k = 50 items)
    for agg, pick in (("max", max), ("mean", np.mean)):
        (grouped,) = eng.search(xq, k=5, soft_weight=0.5, probe_attributes=probe, group_by="identity", agg=agg)
        cand = eng.search(xq, k=50)[0].hits
        by_ident: dict[str, list] = {}
        for h in cand:
            agree = np.mean([np.cos(np.pi / 2 * (h.attributes[a] - probe[0, j])) for j, a in enumerate(names)])
            by_ident.setdefault(h.identity, []).append((0.5 * h.score + 0.5 * agree, h.score, h.id))
        ref = []
        for members in by_ident.values():
            members.sort(key=lambda t: (-t[0], t[2]))
            ref.append((-pick([m[0] for m in members]), members[0][2], pick([m[1] for m in members])))
        ref.sort()
        assert [h.id for h in grouped.hits] == [i for _, i, _ in ref[:5]]
        np.testing.assert_allclose([h.rank_score for h in grouped.hits], [-r for r, _, _ in ref[:5]], rtol=1e-6)
        np.testing.assert_allclose([h.score for h in grouped.hits], [s for _, _, s in ref[:5]], rtol=1e-6)
        assert len({h.identity for h in grouped.hits}) == 5
    res = CliRunner().invoke(main, ["search", "--index", str(gallery[1]), "--ids", "42", "--soft-weight", "0.5"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("kind", ["ivf-flat", "hnsw"])
def test_approximate_index_says_so_and_respects_the_filter(gallery, tmp_path, kind):
    cfg = IndexConfig(kind=kind, nlist=16, nprobe=4, hnsw_m=8, ef_construction=40, ef_search=32, recall_sample=0)
    build_index(gallery[0], tmp_path / kind, cfg)
    eng = SearchEngine.open(tmp_path / kind)
    xq = eng.vectors([11, 12])
    for expr in ("id < 30", "Male", "id != 7"):
        mask = eng.parse(expr).mask(eng.columns)
        passing = set(eng.columns["id"][mask].tolist())
        for res in eng.search(xq, k=5, filter=expr):
            assert not res.exact and res.hits and all(h.id in passing for h in res.hits)


def test_filtered_results_say_the_expected_recall_loss(gallery):
    """The synthetic gallery's columns carry their law's validation statistics: a literal filter's result says how
    many items passed and which share of a matching person's images the filter is expected to drop."""
    from facesearch.engine.filter_cost import literal_recall_loss, statistics_from_source

    eng = SearchEngine.open(gallery[1])
    xq = eng.vectors([5])
    stats = statistics_from_source(eng.loaded.info.attribute_provenance, ["Male", "Chubby"])
    res = eng.search(xq, k=3, filter="Male > 0.9 and not Chubby")[0]
    want = literal_recall_loss(stats, [("Male", ">", 0.9), ("Chubby", "<=", 0.5)])[0]
    # a truly male person's p = sigmoid(2.5 + z) <= 0.9 when z < logit(0.9) - 2.5 = -0.30: about 38 % of images
    assert res.passing and res.expected_recall_loss == pytest.approx(want) and 0.35 < want < 0.42
    assert res.to_dict()["expected_recall_loss"] == res.expected_recall_loss
    assert "expected to drop" in format_results(["q"], [res])
    assert eng.search(xq, k=3, filter="Male or Chubby")[0].expected_recall_loss is None  # not a conjunction
    assert eng.search(xq, k=3)[0].expected_recall_loss is None


@pytest.mark.parametrize("screen", ["int8", "bf16"])
def test_a_hot_filter_is_gathered_once_and_answers_the_same(gallery, screen):
    """A filter's second use gathers its rows' screen copy into one block (within a quarter of the screen copy);
    every answer equals the first (gathered per query) and brute force; without room nothing is gathered."""
    eng = SearchEngine.open(gallery[1], screen=screen)
    assert eng.gallery is not None and eng.gallery.xbs is not None
    assert eng.selections.max_gathered_bytes == eng.gallery.xbs.nbytes // 4
    xq = eng.vectors(list(range(0, 3000, 300)))
    flt = "id < 600"  # 20 %: the subset strategy
    first = eng.search(xq, k=10, filter=flt)
    assert eng.selections.get(eng.parse(flt)).subset is None  # used once: its rows are gathered per query
    again = eng.search(xq, k=10, filter=flt)
    sel = eng.selections.get(eng.parse(flt))
    assert sel.subset is not None  # used again: gathered once, kept
    assert [[h.id for h in r.hits] for r in again] == [[h.id for h in r.hits] for r in first]
    _check(again, _brute(gallery, xq, 10, eng.parse(flt).mask(eng.columns)), 10)
    assert eng.selections.gathered_bytes == sel.subset.nbytes
    eng.selections.max_gathered_bytes = sel.subset.nbytes  # room for one block: a second hot filter takes its place
    other = "id >= 2400"
    for _ in range(3):
        eng.search(xq[:1], k=10, filter=other)
    assert sel.subset is None and eng.selections.get(eng.parse(other)).subset is not None
    eng.selections.max_gathered_bytes = 0  # no room: searched from the rows, the same answer
    third = "id >= 1000 and id < 1600"
    res = [eng.search(xq, k=10, filter=third) for _ in range(3)]
    assert eng.selections.get(eng.parse(third)).subset is None
    _check(res[-1], _brute(gallery, xq, 10, eng.parse(third).mask(eng.columns)), 10)
