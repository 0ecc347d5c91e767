"""Exact top-k search of nq queries against nb database rows, per back-end, against the device's GEMM floor.

    python -m facesearch.benchmarks.speed.search_speed [--rows 1000000] [--queries 3530] [--dim 1024] [--device
    cpu|cuda]
                                      [--backends faiss:none,torch:none,torch:bf16] [--tile-rows 65536]

Data: identity-clustered unit vectors stored as float16 (as in our shards), streamed to ``search_exact`` in blocks
of ``--block-rows``; queries are new rows of the same identities.  The floor is ``2 nq nb d / FLOP/s`` of a
(nq, d) @ (d, tile) product measured on the same device right before each search (TF32 off on CUDA: the search is
float32 exact).  Every back-end's ids are compared with the first one's (exact-score ties may order differently).
"""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids)
from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import numpy as np
import torch

from facesearch.indexer.search import search_exact


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


def gemm_flops(device: str, dtype: torch.dtype, m: int, k: int, n: int) -> float:
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(8):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def main(argv: list[str] | None = None) -> None:
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
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    xb, xq = make_data(args.rows, args.queries, args.dim, args.identities)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.queries} queries x {args.rows} rows x d={args.dim}, k={args.k}, on {name}")
    print("| back-end | device | screen | seconds | GEMM floor s (FLOP/s) | x floor | ids equal to first |")
    print("|---|---|---|---|---|---|---|")
    first: np.ndarray | None = None
    for spec in args.backends.split(","):
        backend, screen = spec.split(":")
        device = "cpu" if backend == "faiss" else args.device
        flops = gemm_flops(device, torch.bfloat16 if screen == "bf16" else torch.float32, args.queries, args.dim,
                           args.tile_rows)  # fmt: skip
        floor = 2 * args.queries * args.rows * args.dim / flops
        t0 = time.perf_counter()
        _, I = search_exact(xq, blocks(xb, args.block_rows), args.k, backend, device, args.tile_rows, screen)
        sec = time.perf_counter() - t0
        first = I if first is None else first
        same = float((I == first).mean())
        print(f"| {backend} | {device} | {screen} | {sec:.2f} | {floor:.2f} ({flops / 1e12:.2f} T) "
              f"| {sec / floor:.2f} | {same:.5f} |")  # fmt: skip


if __name__ == "__main__":
    main()
