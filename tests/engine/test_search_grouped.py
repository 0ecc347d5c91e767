"""Identity grouping when the filter passes fewer items than the grouped search's depth: the deep re-fetch must not
break on answers narrower than it asked for (a FAISS selector returns at most the passing items), on every index
kind and every strategy, and must equal a brute-force grouping where the index is exact."""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids)
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facesearch.engine.search import SearchEngine
from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, build_index
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features

# 2000 rows of 10 identities, 200 consecutive ids each: "id < 250" passes 250 items of only 2 identities, so a
# grouped search for 3 identities stays short however deep it goes and re-fetches up to every passing item
# (k = 3: depth 30, then 120, then all 250 -- the step that used to ask for 480 and get 250 columns back)
FILTERS = ("id < 250", "id < 250 or id >= 1990", "id >= 1500 and Male > 0.5", "id < 0")
CONFIGS = {
    "flat": IndexConfig(kind="flat", recall_sample=0),
    # every list probed: the IVF answer is exact, so it is compared with brute force too
    "ivf-flat": IndexConfig(kind="ivf-flat", nlist=8, nprobe=8, recall_sample=0),
    "hnsw": IndexConfig(kind="hnsw", hnsw_m=8, ef_construction=40, ef_search=64, recall_sample=0),
    "ivf-pq": IndexConfig(kind="ivf-pq", nlist=4, nprobe=4, m=8, nbits=4, recall_sample=0),  # approximate scores
}
EXACT = ("flat", "ivf-flat")
STRATEGIES = {"flat": ("auto", "subset", "masked", "selector", "postfilter")}


@pytest.fixture(scope="module")
def galleries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grouped")
    write_synth_features(SynthFeaturesConfig(out=root / "s", rows=2000, dim=32, identities=10, dtype="float32"))
    out = {"shards": root / "s"}
    for kind, cfg in CONFIGS.items():
        build_index(root / "s", root / kind, cfg)
        out[kind] = root / kind
    return out


def _brute_groups(shards_dir: Path, xq: np.ndarray, keep: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """Top-k identities by their best passing item, every score materialised (float64)."""
    b = shards.read_all(shards_dir, columns=["identity"])
    ident = np.asarray(b.meta.column("identity").to_pylist())[keep]
    S = xq.astype(np.float64) @ b.xb[keep].astype(np.float64).T
    out = []
    for q in range(len(xq)):
        best: dict[str, float] = {}
        for j in np.argsort(-S[q], kind="stable"):
            best.setdefault(str(ident[j]), float(S[q, j]))
        out.append(sorted(best.items(), key=lambda t: -t[1])[:k])
    return out


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("expr", FILTERS)
def test_grouped_search_when_the_filter_passes_fewer_items_than_the_depth(galleries, kind, expr):
    eng = SearchEngine.open(galleries[kind])
    xq = eng.vectors([10, 1100, 1995])  # one query of a passing identity, one of none, one of the last
    mask = eng.parse(expr).mask(eng.columns)
    passing = set(eng.columns["id"][mask].tolist())
    ref = _brute_groups(galleries["shards"], xq, mask, 5)
    for strategy in STRATEGIES.get(kind, ("auto", "selector", "postfilter")):
        for k in (1, 3, 5):
            res = eng.search(xq, k=k, filter=expr, group_by="identity", strategy=strategy)
            assert len(res) == 3
            for q, r in enumerate(res):
                idents = [h.identity for h in r.hits]
                assert r.passing == len(passing) and len(idents) == len(set(idents)) <= k
                assert all(h.id in passing for h in r.hits), (kind, strategy, expr)
                scores = [h.score for h in r.hits]
                assert scores == sorted(scores, reverse=True)
                if kind in EXACT:
                    assert idents == [i for i, _ in ref[q][:k]], (kind, strategy, expr, k, q)
                    np.testing.assert_allclose(scores, [s for _, s in ref[q][:k]], atol=1e-5)  # float32 products
                elif passing and kind != "hnsw":  # HNSW's filtered beam may not reach another identity's cluster
                    assert r.hits, (kind, strategy, expr, k, q)
            if not passing:
                assert all(r.hits == () for r in res)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_grouped_mean_soft_and_excluded_ids_with_a_narrow_filter(galleries, kind):
    """The other deep-retrieval users (mean aggregation, soft re-ranking, an excluded item) on the same narrow
    filter, and an ungrouped search deeper than the gallery: answers of the width asked for, never a crash."""
    eng = SearchEngine.open(galleries[kind])
    ids = [10, 1100]
    xq = eng.vectors(ids)
    probe = np.stack([eng.columns[a][eng.rows(ids)] for a in eng.attribute_names], axis=1)
    for expr in ("id < 250", "id < 0"):
        n_pass = int(eng.parse(expr).mask(eng.columns).sum())
        mean = eng.search(xq, k=4, filter=expr, group_by="identity", agg="mean", strategy="selector")
        soft = eng.search(xq, k=4, filter=expr, group_by="identity", soft_weight=0.3, probe_attributes=probe)
        gone = eng.search(xq, k=4, filter=expr, group_by="identity", exclude_ids=ids)
        for res in (mean, soft, gone):
            assert all(len(r.hits) <= min(2, n_pass) and all(h.id < 250 for h in r.hits) for r in res)
        assert all(h.id not in ids for r in gone for h in r.hits)
        if kind in EXACT and n_pass:
            assert [h.count for h in mean[0].hits] == [200, 50]  # every passing item retrieved, counted per identity
    D, I, _, _ = eng.retrieve(xq, 2500, eng.parse("id < 250"), "selector")
    assert D.shape == I.shape == (2, 2500) and (I[:, 250:] == -1).all() and np.isneginf(D[:, 250:]).all()
    res = eng.search(xq, k=2500)
    assert all(len(r.hits) <= 2000 for r in res)
