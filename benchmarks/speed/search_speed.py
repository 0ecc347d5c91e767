"""Exact top-k search of nq queries against nb database rows, per back-end, against the device's GEMM floor.

    python -m facesearch.benchmarks.speed.search_speed [--rows 1000000] [--queries 3530] [--dim 1024] [--device
    cpu|cuda]
                                      [--backends faiss:none,torch:none,torch:bf16] [--tile-rows 65536]
    facesearch bench speed search ...   (the same options)

Data: identity-clustered unit vectors stored as float16 (as in our shards), streamed to ``search_exact`` in blocks
of ``--block-rows``; queries are new rows of the same identities.  The floor is ``2 nq nb d / FLOP/s`` of a
(nq, d) @ (d, tile) product measured on the same device right before each search (TF32 off on CUDA: the search is
float32 exact).  Every back-end's ids are compared with the first one's (exact-score ties may order differently).
"""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids)
from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from facesearch.indexer.search import search_exact
from facesearch.model.measure import gemm_flops
from facesearch.model.provenance import provenance
from facesearch.model.tables import render_table


@dataclass(frozen=True)
class SearchSpeedConfig:
    """The options of the run (one field per command-line option)."""

    rows: int = 1_000_000
    queries: int = 3530
    dim: int = 1024
    identities: int = 10_000
    k: int = 10
    device: str = "cpu"
    backends: str = "faiss:none,torch:none,torch:bf16"
    tile_rows: int = 65536
    block_rows: int = 262144


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_data(rows: int, queries: int, d: int, identities: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """xb (rows, d) float16 and xq (queries, d) float32: rows and queries of the same identity centres."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((identities, d)).astype(np.float32))
    xb = np.empty((rows, d), dtype=np.float16)
    for lo in range(0, rows, 100_000):
        hi = min(rows, lo + 100_000)
        noise = rng.standard_normal((hi - lo, d)).astype(np.float32) / np.sqrt(d)
        xb[lo:hi] = _unit(centres[np.arange(lo, hi) % identities] + 0.8 * noise)
    qn = rng.standard_normal((queries, d)).astype(np.float32) / np.sqrt(d)
    return xb, _unit(centres[np.arange(queries) % identities] + 0.8 * qn)


def blocks(xb: np.ndarray, block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for lo in range(0, len(xb), block_rows):
        hi = min(len(xb), lo + block_rows)
        yield np.arange(lo, hi, dtype=np.int64), xb[lo:hi]


def run(cfg: SearchSpeedConfig) -> dict[str, Any]:
    """Search the synthetic data with every back-end: per back-end seconds, the GEMM floor and its rate, and the
    fraction of ids equal to the first back-end's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    xb, xq = make_data(cfg.rows, cfg.queries, cfg.dim, cfg.identities)
    cuda = cfg.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    rows = []
    first: np.ndarray | None = None
    for spec in cfg.backends.split(","):
        backend, screen = spec.split(":")
        device = "cpu" if backend == "faiss" else cfg.device
        kind = screen if screen in ("bf16", "int8") else "fp32"
        flops = gemm_flops(cfg.queries, cfg.dim, cfg.tile_rows, kind, device)
        floor = 2 * cfg.queries * cfg.rows * cfg.dim / flops
        t0 = time.perf_counter()
        _, I = search_exact(xq, blocks(xb, cfg.block_rows), cfg.k, backend, device, cfg.tile_rows, screen)
        sec = time.perf_counter() - t0
        first = I if first is None else first
        rows.append({"backend": backend, "device": device, "screen": screen, "seconds": sec, "floor_s": floor,
                     "gemm_flops": flops, "ids_equal_to_first": float((I == first).mean())})  # fmt: skip
    return {"on": name, "rows": rows, "provenance": provenance(config=dataclasses.asdict(cfg)),
            **{k: getattr(cfg, k) for k in ("queries", "dim", "k")}, "nb": cfg.rows}  # fmt: skip


def format_report(result: dict[str, Any]) -> str:
    """The shape line and the markdown table of a :func:`run` result."""
    r = result
    cells = [[x["backend"], x["device"], x["screen"], f"{x['seconds']:.2f}",
              f"{x['floor_s']:.2f} ({x['gemm_flops'] / 1e12:.2f} T)", f"{x['seconds'] / x['floor_s']:.2f}",
              f"{x['ids_equal_to_first']:.5f}"] for x in r["rows"]]  # fmt: skip
    headers = ["back-end", "device", "screen", "seconds", "GEMM floor s (FLOP/s)", "x floor", "ids equal to first"]
    head = f"{r['queries']} queries x {r['nb']} rows x d={r['dim']}, k={r['k']}, on {r['on']}"
    return head + "\n" + render_table(headers, cells, left=3)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=3530)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--identities", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", default="faiss:none,torch:none,torch:bf16")
    ap.add_argument("--tile-rows", type=int, default=65536)
    ap.add_argument("--block-rows", type=int, default=262144)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result = run(SearchSpeedConfig(**vars(build_parser().parse_args(argv))))
    print(format_report(result))
    return result


if __name__ == "__main__":
    main()
