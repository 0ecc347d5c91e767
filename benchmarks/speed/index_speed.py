"""Index build and exact search at scale on synthetic features: time, peak memory, recall, and the GEMM floor.

    python -m facesearch.benchmarks.speed.index_speed --work /tmp/idxbench --rows 1000000 --queries 3530 --kinds flat
    facesearch bench speed index ...   (the same options)

Stages (each in its own spawned process, so each peak RSS is its own; ``--in-process``: all in this process, for
quick checks): synthetic gallery + probe shards (``synth_features``), ``build_index`` per kind (build seconds, peak
RSS, recall@1/@10 against exact search), then exact top-k search of the probes over the gallery shards with the FAISS
back-end and the torch back-end (float32, and bf16-screened with exact re-scoring), compared with the floor
``2 nq nb d / measured matmul FLOP/s`` (the search's own (nq, d) @ (d, tile) product, measured right before it).
Prints a markdown table.
"""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids)
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facesearch.indexer.recall import tie_tolerance
from facesearch.indexer.shards import is_shard_directory
from facesearch.model.measure import gemm_flops, peak_rss_bytes
from facesearch.model.provenance import provenance
from facesearch.model.tables import render_table


@dataclass(frozen=True)
class IndexSpeedConfig:
    """The options of the run (one field per command-line option)."""

    work: Path = Path("/tmp/facesearch-index-bench")
    rows: int = 1_000_000
    dim: int = 1024
    identities: int = 10_000
    queries: int = 3530
    k: int = 10
    kinds: str = "flat"
    tile_rows: int = 16384
    block_rows: int = 65536
    backends: str = "faiss:none,torch:none,torch:bf16"
    keep: bool = False
    in_process: bool = False


def top_k_agreement(I: np.ndarray, D: np.ndarray, I_ref: np.ndarray, D_ref: np.ndarray, tol: float) -> float:
    """Fraction of the (nq, k) results ``I`` (scores ``D``) that are in the reference's top-k or tie with its k-th
    score within ``tol`` (float32 rounding): a tie broken the other way, or a one-ulp reordering between back-ends,
    is no disagreement."""
    in_ref = (I[:, :, None] == I_ref[:, None, :]).any(axis=2)
    tied = D.astype(np.float64) >= D_ref[:, -1:].astype(np.float64) - tol
    return float((in_ref | tied).mean())


def _synth(out: str, rows: int, dim: int, identities: int, probes: int) -> dict[str, Any]:
    from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features

    t0 = time.perf_counter()
    g = write_synth_features(SynthFeaturesConfig(Path(out) / "gallery", rows, dim, identities))
    p = write_synth_features(SynthFeaturesConfig(Path(out) / "probes", rows, dim, identities, probes_per_identity=1,
                                                 probe_identities=probes))  # fmt: skip
    return {"gallery_s": g.seconds, "probes_s": p.seconds, "seconds": time.perf_counter() - t0,
            "peak": peak_rss_bytes()}  # fmt: skip


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
    # measured now (other jobs' load varies): the search's own product, (nq, d) @ (d, tile)
    kind = screen if screen in ("bf16", "int8") else "fp32"
    flops = gemm_flops(len(xq), xq.shape[1], min(tile_rows, _rows(out)), kind)
    t0 = time.perf_counter()
    D, I = search_exact(xq, blocks, k, backend=backend, screen=screen, tile_rows=tile_rows)
    seconds = time.perf_counter() - t0
    np.save(Path(out) / f"I-{backend}-{screen}.npy", I)
    np.save(Path(out) / f"D-{backend}-{screen}.npy", D)
    return {"seconds": seconds, "peak": peak_rss_bytes(), "nq": len(xq), "flops": flops, "load": os.getloadavg()[0]}


def _in_child(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def _rows(out: str) -> int:
    from facesearch.indexer.shards import read_manifest

    return max(1, read_manifest(Path(out) / "gallery").totals["rows"])


def run(cfg: IndexSpeedConfig) -> dict[str, Any]:
    """Every stage, each in a spawned process unless ``cfg.in_process``: (stage, seconds, peak RSS GiB, notes) rows,
    the machine, the GEMM rates at the search's shape and the provenance.  The scratch ``cfg.work`` is removed after
    unless ``cfg.keep``."""
    a = cfg
    a.work.mkdir(parents=True, exist_ok=True)
    out = str(a.work)
    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load": os.getloadavg()}
    shape = (a.queries, a.dim, min(a.tile_rows, a.rows))
    gemm = {"shape": shape, "fp32": gemm_flops(*shape, "fp32"), "bf16": gemm_flops(*shape, "bf16")}
    call = (lambda fn, *args: fn(*args)) if a.in_process else _in_child
    rows: list[tuple[str, str, str, str]] = []
    if not is_shard_directory(a.work / "gallery"):
        s = call(_synth, out, a.rows, a.dim, a.identities, a.queries)
        rows.append((f"synth features {a.rows} x {a.dim} fp16", f"{s['gallery_s']:.1f}", _gib(s["peak"]), ""))
    for kind in [k for k in a.kinds.split(",") if k]:
        r = call(_build, out, kind, a.block_rows)
        rec = r["recall"]
        r1, r10 = rec.get("recall@1", float("nan")), rec.get("recall@10", float("nan"))
        note = f"recall@1 {r1:.4f}, recall@10 {r10:.4f} ({rec.get('queries', 0)} queries)"
        rows.append((f"index build {kind}", f"{r['seconds']:.1f}", _gib(r["peak"]), note))
    floor = 2 * a.queries * a.rows * a.dim
    ref: tuple[np.ndarray, np.ndarray] | None = None
    tol = float(tie_tolerance(a.dim, np.ones(1), 1.0)[0])  # unit-norm embeddings (float16 storage: 1 +- 1e-3)
    for spec in a.backends.split(","):
        backend, screen = spec.split(":")
        r = call(_search, out, backend, screen, a.k, a.tile_rows, a.block_rows)
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
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    return {"machine": machine, "gemm": gemm, "rows": rows, "load_after": os.getloadavg(),
            "provenance": provenance(config=config)}  # fmt: skip


def format_report(result: dict[str, Any]) -> str:
    """The machine and GEMM lines, then the markdown table of the stages."""
    m, g = result["machine"], result["gemm"]
    nq, d, n = g["shape"]
    return "\n".join([
        f"machine: {result['provenance']['machine']['cpu']}, {m['cpus']} CPUs, torch threads {m['torch_threads']}, "
        f"load average {tuple(m['load'])}",
        f"matmul {nq}x{d} @ {d}x{n}: fp32 {g['fp32'] / 1e9:.0f} GFLOP/s, bf16 {g['bf16'] / 1e9:.0f} GFLOP/s",
        "",
        render_table(["stage", "seconds", "peak RSS GiB", "notes"], result["rows"]),
        "",
        f"load average after: {tuple(result['load_after'])}",
    ])  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--in-process", action="store_true",
                    help="run every stage in this process (quick checks; peak RSS is then cumulative)")  # fmt: skip
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result = run(IndexSpeedConfig(**vars(build_parser().parse_args(argv))))
    print(format_report(result))
    return result


if __name__ == "__main__":
    main()
