"""What a query may be: any scale (normalised like the gallery, so scores are cosines and thresholds mean the same
thing), never NaN, infinite or all zeros (refused, naming the row), and by id with its own item left out -- through
the library, the CLI and its ``--out`` summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from facesearch.cli import main
from facesearch.engine.search import SearchEngine
from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, build_index
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("queries")
    write_synth_features(SynthFeaturesConfig(out=root / "s", rows=1000, dim=32, identities=50, dtype="float32"))
    build_index(root / "s", root / "flat", IndexConfig(kind="flat", recall_sample=0))
    build_index(root / "s", root / "ivf", IndexConfig(kind="ivf-flat", nlist=4, nprobe=4, recall_sample=0))
    return {"shards": root / "s", "flat": root / "flat", "ivf": root / "ivf"}


def _brute(shards_dir: Path, xq: np.ndarray, k: int, drop: list[int] | None = None) -> list[tuple[list, np.ndarray]]:
    """(ids, scores) of the top-k by cosine, float64, ties by the smaller id; ``drop[q]`` left out of query q."""
    b = shards.read_all(shards_dir)
    x = xq.astype(np.float64)
    S = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ b.xb.astype(np.float64).T
    out = []
    for q in range(len(xq)):
        order = [j for j in np.lexsort((b.ids, -S[q])) if drop is None or b.ids[j] != drop[q]][:k]
        out.append((b.ids[order].tolist(), S[q, order]))
    return out


def _ids(results) -> list[list[int]]:
    return [[h.id for h in r.hits] for r in results]


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_scaled_query_scores_as_the_unit_query(gallery, kind):
    """Scales 3, 1e-3, 1e-30 and 1e30 (float32: its squares overflow) and 1e300 (float64, beyond float32) give the
    unit query's hits and cosine scores, filtered and grouped too; a threshold of 0.999 accepts the query's own
    item whatever the scale, and no score exceeds 1."""
    eng = SearchEngine.open(gallery[kind])
    xq = eng.vectors([3, 400, 999])
    unit = eng.search(xq, k=8)
    assert _ids(unit) == [i for i, _ in _brute(gallery["shards"], xq, 8)]
    for scale in (np.float32(3), np.float32(1e-3), np.float32(1e-30), np.float32(1e30), 1e300):
        x = xq.astype(np.float64) * scale if isinstance(scale, float) else xq * scale
        res = eng.search(x, k=8)
        assert _ids(res) == _ids(unit), scale
        for a, b in zip(res, unit, strict=True):
            # tolerance: 1e-30 * x rounds each entry to float32 before the normalisation (a few ulps of 1)
            np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits], atol=1e-6)
        assert max(h.score for r in res for h in r.hits) <= 1 + 1e-6
        (top,) = eng.search(x[:1], k=3, threshold=0.999)
        assert top.accepted and [h.id for h in top.hits] == [3]
        grouped = eng.search(x, k=3, filter="Male > 0.5", group_by="identity")
        assert _ids(grouped) == _ids(eng.search(xq, k=3, filter="Male > 0.5", group_by="identity"))
    (far,) = eng.search(-3 * xq[:1], k=1, threshold=0.5)
    assert far.accepted is False and far.hits == ()


def test_the_callers_queries_are_not_modified(gallery):
    eng = SearchEngine.open(gallery["flat"])
    x = 3 * eng.vectors([5, 6])
    keep = x.copy()
    assert _ids(eng.search(x, k=1)) == [[5], [6]]
    np.testing.assert_array_equal(x, keep)  # normalised in a copy, not in place


@pytest.mark.parametrize(
    "value, what",
    [
        (np.nan, "holds NaN or infinite"),
        (np.inf, "holds NaN or infinite"),
        (-np.inf, "holds NaN or infinite"),
        (0.0, "is all zeros"),
    ],
)
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_nan_inf_and_zero_queries_are_refused_naming_the_row(gallery, kind, value, what):
    eng = SearchEngine.open(gallery[kind])
    xq = eng.vectors([1, 2, 3])
    if value == 0.0:
        xq[2] = 0.0
    else:
        xq[2, 5] = value
    for kw in ({}, {"filter": "Male"}, {"group_by": "identity"}, {"threshold": 0.5}):
        with pytest.raises(ValueError, match=f"query row 2 {what}"):
            eng.search(xq, k=4, **kw)
    xq[0] = np.nan
    with pytest.raises(ValueError, match=r"query row 0 \(also row 2\) holds" if value != 0.0 else "query row 0 holds"):
        eng.search(xq, k=4)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_exclude_self_drops_only_the_query_item_and_still_returns_k(gallery, kind):
    eng = SearchEngine.open(gallery[kind])
    ids = [5, 77, 999]
    xq = eng.vectors(ids)
    res = eng.search(xq, k=6, exclude_ids=ids)
    ref = _brute(gallery["shards"], xq, 6, drop=ids)
    assert _ids(res) == [i for i, _ in ref] and all(len(r.hits) == 6 for r in res)
    for r, (_, s) in zip(res, ref, strict=True):
        np.testing.assert_allclose([h.score for h in r.hits], s, atol=1e-5)  # float32 products vs float64
    # an excluded id that is not among the hits (or -1) changes nothing; filters and strategies keep k hits
    assert _ids(eng.search(xq, k=6, exclude_ids=[-1, 0, 3])) == _ids(eng.search(xq, k=6))
    strategies = ("subset", "masked", "selector", "postfilter") if kind == "flat" else ("selector", "postfilter")
    for strategy in strategies:
        got = eng.search(xq, k=4, filter="id < 100 or Male", exclude_ids=ids, strategy=strategy)
        want = _ids(eng.search(xq, k=5, filter="id < 100 or Male", strategy=strategy))
        assert _ids(got) == [[i for i in w if i not in ids][:4] for w in want]
    # grouped: the item goes, its identity stays (ranked by its other items); soft mode leaves it out too
    alone = eng.search(xq, k=3, group_by="identity")
    grouped = eng.search(xq, k=3, group_by="identity", exclude_ids=ids)
    for a, g, i in zip(alone, grouped, ids, strict=True):
        assert a.hits[0].id == i and g.hits[0].identity == a.hits[0].identity and g.hits[0].id != i
    probe = np.stack([eng.columns[a][eng.rows(ids)] for a in eng.attribute_names], axis=1)
    soft = eng.search(xq, k=5, soft_weight=0.5, probe_attributes=probe, exclude_ids=ids)
    assert all(len(r.hits) == 5 and i not in [h.id for h in r.hits] for r, i in zip(soft, ids, strict=True))
    with pytest.raises(ValueError, match="one id per query"):
        eng.search(xq, k=3, exclude_ids=[5])


def test_cli_refuses_bad_query_rows_in_one_line(gallery, tmp_path):
    eng = SearchEngine.open(gallery["flat"])
    base = ["search", "--index", str(gallery["flat"])]
    runner = CliRunner()
    for value, what in ((np.nan, "holds NaN or infinite"), (np.inf, "holds NaN or infinite"), (0.0, "is all zeros")):
        xq = eng.vectors([1, 2, 3])
        xq[1] = value
        np.save(tmp_path / "q.npy", xq)
        res = runner.invoke(main, [*base, "--embeddings", str(tmp_path / "q.npy")])
        assert res.exit_code != 0 and f"query row 1 {what}" in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
    table = pa.table({"embedding": [eng.vectors([1])[0].tolist(), None], "path": ["a", "b"]})
    pq.write_table(table, tmp_path / "q.parquet")
    res = runner.invoke(main, [*base, "--embeddings", str(tmp_path / "q.parquet")])
    assert res.exit_code != 0 and "query row 1 holds NaN" in res.output
    # a float64 .npy beyond the float32 range and a scaled one search like the unit query
    np.save(tmp_path / "big.npy", eng.vectors([7]).astype(np.float64) * 1e300)
    np.save(tmp_path / "x3.npy", 3 * eng.vectors([7]))
    for name in ("big.npy", "x3.npy"):
        res = runner.invoke(main, [*base, "--embeddings", str(tmp_path / name), "-k", "2", "--json",
                                   "--threshold", "0.999"])  # fmt: skip
        assert res.exit_code == 0, res.output
        (doc,) = json.loads(res.output)
        assert doc["accepted"] and [h["id"] for h in doc["hits"]] == [7] and doc["hits"][0]["score"] <= 1 + 1e-6


def test_cli_exclude_self(gallery, tmp_path):
    base = ["search", "--index", str(gallery["flat"])]
    runner = CliRunner()
    res = runner.invoke(main, [*base, "--ids", "5,77", "-k", "4", "--json", "--exclude-self"])
    assert res.exit_code == 0, res.output
    docs = json.loads(res.output)
    eng = SearchEngine.open(gallery["flat"])
    want = _ids(eng.search(eng.vectors([5, 77]), k=4, exclude_ids=[5, 77]))
    assert [[h["id"] for h in d["hits"]] for d in docs] == want and all(len(w) == 4 and 5 not in w for w in want)
    res = runner.invoke(main, [*base, "--ids", "5", "--group-by", "identity", "--exclude-self", "--json"])
    assert res.exit_code == 0 and 5 not in [h["id"] for h in json.loads(res.output)[0]["hits"]]
    np.save(tmp_path / "q.npy", eng.vectors([5]))
    res = runner.invoke(main, [*base, "--embeddings", str(tmp_path / "q.npy"), "--exclude-self"])
    assert res.exit_code != 0 and "--exclude-self needs --ids" in res.output


def test_cli_out_prints_a_summary_not_the_hits(gallery, tmp_path):
    """--out: every hit goes to the file, the screen gets one summary line (queries, hits, the file)."""
    base = ["search", "--index", str(gallery["flat"])]
    runner = CliRunner()
    for out in (tmp_path / "hits.parquet", tmp_path / "hits.json"):
        res = runner.invoke(main, [*base, "--ids", "5,77,9", "-k", "7", "--threshold", "0.3", "--out", str(out)])
        assert res.exit_code == 0, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and "3 queries" in lines[0] and str(out) in lines[0] and "rank" not in res.output
        rows = (
            pq.read_table(out).num_rows
            if out.suffix == ".parquet"
            else sum(len(d["hits"]) for d in json.loads(out.read_text()))
        )
        assert f"{rows} hits" in lines[0] and rows > 3
