"""Index build and exact search at scale on synthetic features: time, peak memory, recall, and the GEMM floor.

    python -m facesearch.benchmarks.speed.index_speed --work /tmp/idxbench --rows 1000000 --queries 3530 --kinds flat

Stages (each in its own spawned process, so each peak RSS is its own): synthetic gallery + probe shards
(``synth_features``), ``build_index`` per kind (build seconds, peak RSS, recall@1/@10 against exact search), then
exact top-k search of the probes over the gallery shards with the FAISS back-end and the torch back-end (float32,
and bf16-screened with exact re-scoring), compared with the floor ``2 nq nb d / measured matmul FLOP/s``.
Prints a markdown table.
"""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids)
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facesearch.indexer.recall import tie_tolerance
from facesearch.indexer.shards import is_shard_directory


def matmul_flops(dtype: torch.dtype, m: int = 3530, k: int = 1024, n: int = 16384, reps: int = 3) -> float:
    """Best-of-``reps`` FLOP/s of an (m, k) @ (k, n) product in ``dtype`` on the CPU (the search's shape)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def top_k_agreement(I: np.ndarray, D: np.ndarray, I_ref: np.ndarray, D_ref: np.ndarray, tol: float) -> float:
    """Fraction of the (nq, k) results ``I`` (scores ``D``) that are in the reference's top-k or tie with its k-th
    score within ``tol`` (float32 rounding): a tie broken the other way, or a one-ulp reordering between back-ends,
    is no disagreement."""
    in_ref = (I[:, :, None] == I_ref[:, None, :]).any(axis=2)
    tied = D.astype(np.float64) >= D_ref[:, -1:].astype(np.float64) - tol
    return float((in_ref | tied).mean())


def _peak() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _synth(out: str, rows: int, dim: int, identities: int, probes: int) -> dict[str, Any]:
    from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features

    t0 = time.perf_counter()
    g = write_synth_features(SynthFeaturesConfig(Path(out) / "gallery", rows, dim, identities))
    p = write_synth_features(SynthFeaturesConfig(Path(out) / "probes", rows, dim, identities, probes_per_identity=1,
                                                 probe_identities=probes))  # fmt: skip
    return {"gallery_s": g.seconds, "probes_s": p.seconds, "seconds": time.perf_counter() - t0, "peak": _peak()}


def _build(out: str, kind: str, block_rows: int) -> dict[str, Any]:
    from facesearch.indexer.index import IndexConfig, build_index

    idx = Path(out) / f"index-{kind}"
    shutil.rmtree(idx, ignore_errors=True)
    info = build_index(Path(out) / "gallery", idx, IndexConfig(kind=kind, block_rows=block_rows, recall_sample=500))
    return {"seconds": info.build_seconds, "peak": info.peak_rss_bytes, "recall": info.recall}


def _search(out: str, backend: str, screen: str, k: int, tile_rows: int, block_rows: int) -> dict[str, Any]:
    from facesearch.indexer.search import search_exact
    from facesearch.indexer.shards import iter_shards, read_all

    xq = read_all(Path(out) / "probes", columns=[]).xb.astype(np.float32)
    blocks = ((b.ids, b.xb) for b in iter_shards(Path(out) / "gallery", block_rows=block_rows, columns=[]))
    flops = matmul_flops(torch.bfloat16 if screen == "bf16" else torch.float32)  # now: other jobs' load varies
    t0 = time.perf_counter()
    D, I = search_exact(xq, blocks, k, backend=backend, screen=screen, tile_rows=tile_rows)
    seconds = time.perf_counter() - t0
    np.save(Path(out) / f"I-{backend}-{screen}.npy", I)
    np.save(Path(out) / f"D-{backend}-{screen}.npy", D)
    return {"seconds": seconds, "peak": _peak(), "nq": len(xq), "flops": flops, "load": os.getloadavg()[0]}


def _in_child(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/facesearch-index-bench"), help="scratch directory")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--identities", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=3530, help="probes (one per identity; <= identities)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", default="flat", help="comma-separated index kinds to build")
    ap.add_argument("--tile-rows", type=int, default=16384)
    ap.add_argument("--block-rows", type=int, default=65536)
    ap.add_argument("--backends", default="faiss:none,torch:none,torch:bf16")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    out = str(a.work)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()}")  # fmt: skip
    f32, bf16 = matmul_flops(torch.float32), matmul_flops(torch.bfloat16)
    print(f"matmul 3530x1024 @ 1024x16384: fp32 {f32 / 1e9:.0f} GFLOP/s, bf16 {bf16 / 1e9:.0f} GFLOP/s")
    rows: list[tuple[str, str, str, str]] = []
    if not is_shard_directory(a.work / "gallery"):
        s = _in_child(_synth, out, a.rows, a.dim, a.identities, a.queries)
        rows.append((f"synth features {a.rows} x {a.dim} fp16", f"{s['gallery_s']:.1f}", _gib(s["peak"]), ""))
    for kind in [k for k in a.kinds.split(",") if k]:
        r = _in_child(_build, out, kind, a.block_rows)
        rec = r["recall"]
        r1, r10 = rec.get("recall@1", float("nan")), rec.get("recall@10", float("nan"))
        note = f"recall@1 {r1:.4f}, recall@10 {r10:.4f} ({rec.get('queries', 0)} queries)"
        rows.append((f"index build {kind}", f"{r['seconds']:.1f}", _gib(r["peak"]), note))
    floor = 2 * a.queries * a.rows * a.dim
    ref: tuple[np.ndarray, np.ndarray] | None = None
    tol = float(tie_tolerance(a.dim, np.ones(1), 1.0)[0])  # unit-norm embeddings (float16 storage: 1 +- 1e-3)
    for spec in a.backends.split(","):
        backend, screen = spec.split(":")
        r = _in_child(_search, out, backend, screen, a.k, a.tile_rows, a.block_rows)
        I, D = np.load(a.work / f"I-{backend}-{screen}.npy"), np.load(a.work / f"D-{backend}-{screen}.npy")
        ref = (I, D) if ref is None else ref
        same = top_k_agreement(I, D, *ref, tol)
        flops = r["flops"]
        note = (
            f"GEMM floor {floor / flops:.1f} s at {flops / 1e9:.0f} GFLOP/s measured before it (load "
            f"{r['load']:.1f}): {r['seconds'] / (floor / flops):.2f}x; top-k equal to the first back-end's up to ties "
            f"{same:.5f}"
        )
        name = f"exact search {a.queries} x {a.rows} k={a.k}: {backend} {screen}"
        rows.append((name, f"{r['seconds']:.1f}", _gib(r["peak"]), note))
    print("\n| stage | seconds | peak RSS GiB | notes |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nload average after: {os.getloadavg()}")
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
