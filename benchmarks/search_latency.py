"""Query latency of the search engine on a flat index, per filter selectivity and strategy, and over HTTP.

    python -m benchmarks.search_latency [--rows 100000] [--dim 1024] [--queries 100] [--work runs/search_latency]

Gallery: identity-clustered synthetic features (``facesearch synth features``), a flat (exact) index built once
under ``--work``.  Filters ``id < n`` give exact selectivities 0.1 % … 90 % (plus the attribute filter ``Male``);
each is timed for one query at a time and for a batch of ``--queries``.  The HTTP row is one ``POST
/search/embedding`` through FastAPI's in-process test client (no network).  The reference is the unfiltered flat
search itself: reading every stored vector once (nb x d x 4 bytes) per query batch.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine.search import SearchEngine
from indexer.index import IndexConfig, build_index
from indexer.synth_features import SynthFeaturesConfig, write_synth_features


def _best(fn: Callable[..., object], *args: object, repeats: int = 3, **kwargs: object) -> float:
    """Best wall time of ``fn(*args, **kwargs)`` over ``repeats`` calls."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--work", type=Path, default=Path("runs/search_latency"))
    args = ap.parse_args()
    shards_dir, index_dir = args.work / f"shards_{args.rows}_{args.dim}", args.work / f"flat_{args.rows}_{args.dim}"
    if not (shards_dir / "manifest.json").is_file():
        write_synth_features(SynthFeaturesConfig(out=shards_dir, rows=args.rows, dim=args.dim,
                                                 identities=max(10, args.rows // 100), seed=5))  # fmt: skip
    if not (index_dir / "index_info.json").is_file():
        build_index(shards_dir, index_dir, IndexConfig(kind="flat", recall_sample=0))
    eng = SearchEngine.open(index_dir)
    rng = np.random.default_rng(0)
    xq = eng.vectors(rng.choice(args.rows, args.queries, replace=False).tolist())
    filters = [None, *(f"id < {max(1, int(args.rows * p))}" for p in (0.001, 0.01, 0.1, 0.5, 0.9)), "Male"]
    rows = []
    for expr in filters:
        res = eng.search(xq[:1], k=args.k, filter=expr)[0]
        one = _best(eng.search, xq[:1], k=args.k, filter=expr)
        batch = _best(eng.search, xq, k=args.k, filter=expr)
        rows.append({"filter": expr or "(none)", "passing": res.passing, "strategy": res.strategy,
                     "one_query_ms": one * 1e3, "batch_ms_per_query": batch / len(xq) * 1e3})  # fmt: skip
        print(json.dumps(rows[-1]))
    from fastapi.testclient import TestClient

    from engine.service import create_app

    client = TestClient(create_app(eng))
    body = {"embedding": xq[0].tolist(), "k": args.k, "filter": "Male"}
    http = _best(client.post, "/search/embedding", json=body, repeats=5)
    print(json.dumps({"http_one_query_ms": http * 1e3, "filter": "Male"}))
    (args.work / f"latency_{args.rows}_{args.dim}.json").write_text(json.dumps({"rows": rows, "http_ms": http * 1e3}))


if __name__ == "__main__":
    main()
