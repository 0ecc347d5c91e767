"""Query latency and throughput of the search engine per index kind and filter selectivity, and over HTTP.

    python -m facesearch.benchmarks.speed.search_latency --shards runs/mf1m/distractors_1000000_1024 \
        --probes runs/mf1m/probes_3530_1024 --kinds flat,ivf-flat,hnsw --work runs/lat1m [--http]

    # a synthetic gallery under --work, its own vectors as queries
    python -m facesearch.benchmarks.speed.search_latency --rows 100000
    facesearch bench speed latency ...   (the same options)

The gallery is a shard directory (``facesearch synth features`` writes one); the filters pass 1 %, 10 % and 50 % of
it by thresholds on an attribute probability (scattered over the gallery, like real filters), and ``Male``.  Queries
are probe features (``--probes``; other identities than the gallery's, as in MegaFace), else gallery vectors.  Per
index kind (built under ``--work`` once, reused after) and filter:

- one query at a time, ``--single`` queries: p50 / p99 latency;
- one batched call of ``--batch`` queries: queries per second;

on the flat index also each strategy forced at 10 % and 50 % (gather vs. mask), the FAISS flat search itself, the
float32 product without a screen and the bf16 screen, for reference (the engine screens with what ``auto`` picks
here: int8 on a CPU with VNNI, bf16 elsewhere).  ``--http`` starts ``facesearch serve`` on the flat index and
loads it with ``wrk`` (a load tool: ``apt install wrk``) at several concurrency levels: requests per second and
latency percentiles, with the server's count of merged batches.

The hardware reference: a single flat query reads the whole gallery once (its screen copy: nb x d bytes in int8,
x 2 in bf16), so its floor is that over the memory bandwidth (measured here with a large copy); a batch is bounded
by the screen's product rate (measured: 2 nq nb d / FLOP/s, int8 or bf16, or float32 where the screen is skipped).
``<work>/latency.json`` holds every row, the machine and the provenance
record; ``<work>/latency.md`` the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facesearch.engine.search import SearchEngine
from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, build_index, is_index_directory
from facesearch.indexer.search import ResidentGallery
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features
from facesearch.model.measure import copy_bandwidth, gemm_flops, peak_rss_bytes
from facesearch.model.provenance import provenance
from facesearch.model.tables import render_table


@dataclass(frozen=True)
class SearchLatencyConfig:
    """The options of the run (one field per command-line option)."""

    shards: Path | None = None
    probes: Path | None = None
    rows: int = 100_000
    dim: int = 1024
    kinds: str = "flat,ivf-flat"
    single: int = 100
    batch: int = 256
    k: int = 10
    http: bool = False
    concurrency: tuple[int, ...] = (1, 4, 16)
    http_seconds: int = 20
    work: Path = Path("runs/search_latency")


GEMM_N = 4096  # side of the square product whose rate is the batch's bound
COPY_BYTES = 1 << 30  # buffer of the bandwidth measurement: far beyond the last-level cache

_KIND_CONFIG = {
    "flat": {},
    "ivf-flat": {"nlist": 1024, "nprobe": 32},
    "ivf-pq": {"nlist": 1024, "nprobe": 32, "m": 64},
    "hnsw": {"hnsw_m": 32, "ef_construction": 80, "ef_search": 128},
}


def _selective(eng: SearchEngine, fraction: float, column: str = "High_Cheekbones") -> str:
    """A filter passing ~``fraction`` of the gallery, scattered over it: a threshold on an attribute probability
    (correlated with identity, as real filters are; an id range would pass whole tiles and flatter the engine)."""
    t = float(np.quantile(eng.columns[column], 1 - fraction))
    return f"{column} > {t!r}"


def _filters(eng: SearchEngine) -> list[tuple[str, str | None]]:
    return [("none", None), *((f"{p:.0%}", _selective(eng, p)) for p in (0.01, 0.1, 0.5)), ("Male", "Male")]


def _time_single(eng: SearchEngine, xq: np.ndarray, k: int, expr: str | None, strategy: str = "auto") -> dict:
    eng.search(xq[:1], k=k, filter=expr, strategy=strategy)  # warm-up
    times = []
    for q in range(len(xq)):
        t0 = time.perf_counter()
        res = eng.search(xq[q : q + 1], k=k, filter=expr, strategy=strategy)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"strategy": res[0].strategy, "passing": res[0].passing, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}  # fmt: skip


def _time_batch(eng: SearchEngine, xq: np.ndarray, k: int, expr: str | None, strategy: str = "auto") -> dict:
    t0 = time.perf_counter()
    eng.search(xq, k=k, filter=expr, strategy=strategy)
    dt = time.perf_counter() - t0
    return {"batch_qps": len(xq) / dt, "batch_s": dt}


def _ensure_index(shards_dir: Path, work: Path, kind: str) -> Path:
    index_dir = work / kind
    if not is_index_directory(index_dir):
        if index_dir.exists():
            shutil.rmtree(index_dir)
        t0 = time.perf_counter()
        build_index(shards_dir, index_dir, IndexConfig(kind=kind, recall_sample=200, **_KIND_CONFIG[kind]))
        print(json.dumps({"built": kind, "seconds": time.perf_counter() - t0}), flush=True)
    return index_dir


def _queries(probes: Path | None, eng: SearchEngine | None, n: int, d: int = 0) -> np.ndarray:
    """n probe features from ``probes``, else n gallery vectors (``eng``), else n random unit vectors of ``d``."""
    rng = np.random.default_rng(0)
    if probes is not None:
        xq = shards.read_all(probes).xb
        return np.ascontiguousarray(xq[rng.choice(len(xq), min(n, len(xq)), replace=False)], dtype=np.float32)
    if eng is not None:
        return eng.vectors(rng.choice(eng.columns["id"], n, replace=False).tolist())
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _bench_kind(args: SearchLatencyConfig, kind: str, index_dir: Path) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    eng = SearchEngine.open(index_dir)
    open_s = time.perf_counter() - t0
    nb = len(eng.columns["id"])
    if eng.gallery is not None:
        g = eng.gallery
        read = g.nbytes if g.xbs is not None else g.xb32.numel() * 4
        print(json.dumps({"screen": g.screen, "one_query_bytes": read}), flush=True)
    xq = _queries(args.probes, eng, max(args.single, args.batch))
    rows: list[dict[str, Any]] = []
    info = eng.loaded.info
    params = {"ivf-flat": ("nlist", "nprobe"), "ivf-pq": ("nlist", "nprobe", "m"), "hnsw": ("hnsw_m", "ef_search")}
    extra = {k: info.config.get(k) for k in params.get(kind, ())}
    cases = [(label, expr, "auto") for label, expr in _filters(eng)]
    if eng.gallery is not None:
        f10, f50, f90 = _selective(eng, 0.1), _selective(eng, 0.5), _selective(eng, 0.9)
        cases += [("10%", f10, "masked"), ("50%", f50, "masked"), ("10%", f10, "selector"), ("90%", f90, "auto"),
                  ("90%", f90, "postfilter")]  # fmt: skip
    for label, expr, strategy in cases:
        single = _time_single(eng, xq[: args.single], args.k, expr, strategy)
        batch = _time_batch(eng, xq[: args.batch], args.k, expr, strategy)
        row = {"kind": kind, "filter": label, "expr": expr, **single, **batch, "open_s": open_s, **extra,
               "screen": None if eng.gallery is None else eng.gallery.screen}  # fmt: skip
        if eng.gallery is not None and expr is None:
            row["one_query_bytes"] = read
        rows.append(row)
        print(json.dumps(row), flush=True)
    if eng.flat_vectors is not None:  # references: FAISS's own flat search, the float32 product, the bf16 screen
        fp32 = ResidentGallery(eng.columns["id"], eng.flat_vectors, screen="none")  # same vectors in place, no screen
        bf16 = ResidentGallery(eng.columns["id"], eng.flat_vectors, screen="bf16")
        for label, fn in (("faiss flat", lambda x: eng.loaded.search(x, args.k)),
                          ("torch fp32", lambda x: fp32.search(x, args.k)),
                          ("torch bf16 screen", lambda x: bf16.search(x, args.k))):  # fmt: skip
            s = []
            for q in range(min(args.single, 30)):
                t = time.perf_counter()
                fn(xq[q : q + 1])
                s.append(time.perf_counter() - t)
            t = time.perf_counter()
            fn(xq[: args.batch])
            bt = time.perf_counter() - t
            row = {"kind": kind, "filter": "none", "strategy": label, "passing": nb,
                   "p50_ms": float(np.median(s) * 1e3), "p99_ms": float(np.percentile(s, 99) * 1e3),
                   "batch_qps": args.batch / bt, "batch_s": bt}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        del bf16
    return rows


_WRK_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{body}]]
"""


def _wrk(url: str, body: str, concurrency: int, seconds: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_LUA.replace("{body}", body))
    out = subprocess.run(["wrk", "-t", str(min(2, concurrency)), "-c", str(concurrency), "-d", f"{seconds}s",
                          "--timeout", "30s", "--latency", "-s", f.name, url],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    os.unlink(f.name)

    def ms(text: str) -> float:
        value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    pct = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total, secs, unit = re.search(r"(\d+) requests in ([\d.]+)(s|m)", out).group(1, 2, 3)  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    wall = float(secs) * (60 if unit == "m" else 1)
    # Refused requests (503 + Retry-After when the queue is full) come back at once and count in wrk's rate and
    # percentiles; served_rps counts only the answered ones.
    return {"concurrency": concurrency, "rps": rps, "served_rps": (int(total) - errors) / wall,
            "p50_ms": ms(pct["50"]), "p90_ms": ms(pct["90"]), "p99_ms": ms(pct["99"]), "errors": errors}  # fmt: skip


def _drained(base: str, patience: float = 60.0) -> None:
    """Wait until the service has finished the requests a load run left queued (its request count stops moving)."""
    last, t0 = -1, time.perf_counter()
    while time.perf_counter() - t0 < patience:
        now = json.load(urllib.request.urlopen(base + "/health"))["searches"]["requests"]
        if now == last:
            return
        last = now
        time.sleep(1.0)


def _bench_http(args: SearchLatencyConfig, index_dir: Path) -> list[dict[str, Any]]:
    if shutil.which("wrk") is None:
        print("wrk not found (apt install wrk): HTTP load test skipped", file=sys.stderr)
        return []
    port = 8765
    exe = shutil.which("facesearch") or str(Path(sys.executable).with_name("facesearch"))
    server = subprocess.Popen([exe, "serve", "--index", str(index_dir), "--port", str(port)],
                              env={**os.environ, "FACESEARCH_TOKEN": ""})  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        eng_d = json.load(urllib.request.urlopen(base + "/health"))["index"]["d"]
        xq = _queries(args.probes, None, 1, eng_d)
        for expr in (None, "Male"):
            body = json.dumps({"embedding": [round(float(v), 6) for v in xq[0]], "k": args.k, "filter": expr})
            for c in args.concurrency:
                before = json.load(urllib.request.urlopen(base + "/health"))["searches"]
                row = {"filter": expr or "none", **_wrk(base + "/search/embedding", body, c, args.http_seconds)}
                after = json.load(urllib.request.urlopen(base + "/health"))["searches"]
                n_req, n_batch = after["requests"] - before["requests"], after["batches"] - before["batches"]
                row["requests_per_batch"] = n_req / max(n_batch, 1)
                rows.append(row)
                _drained(base)
                print(json.dumps({"http": row}), flush=True)
    finally:
        server.terminate()
        server.wait(30)
    return rows


_REFERENCES = ("faiss flat", "torch fp32", "torch bf16 screen")


def markdown(result: dict[str, Any]) -> str:
    """The tables of a ``latency.json``: per kind and filter, then HTTP."""
    m = result["machine"]
    head = (f"{m['cores']} cores, torch {m['torch']}; copy bandwidth {m['bandwidth_gbs']:.1f} GB/s, GEMM fp32 "
            f"{m['gemm_fp32_tflops']:.2f} / bf16 {m['gemm_bf16_tflops']:.2f} TFLOP/s"
            + (f" / int8 {m['gemm_int8_tops']:.2f} TOP/s." if "gemm_int8_tops" in m else "."))  # fmt: skip
    for r in result["rows"]:
        if r.get("one_query_bytes") and r["filter"] == "none" and r["strategy"] not in _REFERENCES:
            floor = r["one_query_bytes"] / (m["bandwidth_gbs"] * 1e9) * 1e3
            head += (f" One unfiltered {r['kind']} query reads its {r['screen']} screen copy, {r['one_query_bytes']:,}"
                     f" bytes: floor {floor:.1f} ms at the copy bandwidth; p50 {r['p50_ms']:.1f} ms ="
                     f" {r['p50_ms'] / floor:.2f}x.")  # fmt: skip
    rows = [[r["kind"], r["filter"], f"{r['passing']:,}", r["strategy"], f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
             f"{r['batch_qps']:.0f}"] for r in result["rows"]]  # fmt: skip
    headers = ["index", "filter", "passing", "strategy", "one query p50 ms", "p99 ms", "batch queries/s"]
    lines = [head, "", render_table(headers, rows, left=2)]
    if result.get("http"):
        http = [[h["filter"], h["concurrency"], f"{h.get('served_rps', h['rps']):.1f}", f"{h['rps']:.1f}",
                 *(f"{h[c]:.0f}" for c in ("p50_ms", "p90_ms", "p99_ms")), f"{h['requests_per_batch']:.1f}",
                 h["errors"]] for h in result["http"]]  # fmt: skip
        headers = [
            "HTTP filter",
            "clients",
            "answered/s",
            "responses/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "requests per batch",
            "refused (non-2xx)",
        ]
        lines += ["", render_table(headers, http)]
    return "\n".join(lines) + "\n"


def run(args: SearchLatencyConfig) -> dict[str, Any]:
    """Measure the machine, then every index kind (built under ``args.work`` once) and, with ``args.http``, the
    server; writes ``latency.json`` and ``latency.md`` under ``args.work`` and returns the result."""
    args.work.mkdir(parents=True, exist_ok=True)
    shards_dir = args.shards
    if shards_dir is None:
        shards_dir = args.work / f"shards_{args.rows}_{args.dim}"
        if not shards.is_shard_directory(shards_dir):
            write_synth_features(SynthFeaturesConfig(out=shards_dir, rows=args.rows, dim=args.dim,
                                                     identities=max(10, args.rows // 100), seed=5))  # fmt: skip
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "bandwidth_gbs": copy_bandwidth(COPY_BYTES) / 1e9, "gemm_fp32_tflops": gemm_flops(GEMM_N) / 1e12,
               "gemm_bf16_tflops": gemm_flops(GEMM_N, dtype="bf16") / 1e12,
               "gemm_int8_tops": gemm_flops(GEMM_N, dtype="int8") / 1e12}  # fmt: skip
    print(json.dumps({"machine": machine}), flush=True)
    rows = []
    for kind in [k for k in args.kinds.split(",") if k]:
        rows += _bench_kind(args, kind, _ensure_index(shards_dir, args.work, kind))
        gc.collect()  # the engine of this kind is gone before the next one loads
    http = _bench_http(args, _ensure_index(shards_dir, args.work, "flat")) if args.http else []
    config = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(args).items()}
    result = {"machine": machine, "rows": rows, "http": http, "peak_rss_gib": peak_rss_bytes() / 2**30,
              "provenance": provenance(config=config)}  # fmt: skip
    (args.work / "latency.json").write_text(json.dumps(result, indent=1))
    (args.work / "latency.md").write_text(markdown(result))
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, help="gallery shard directory; default: a synthetic one under --work")
    ap.add_argument("--probes", type=Path, help="probe shard directory (queries); default: gallery vectors")
    ap.add_argument("--rows", type=int, default=100_000, help="synthetic gallery size (without --shards)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--kinds", default="flat,ivf-flat")
    ap.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    ap.add_argument("--batch", type=int, default=256, help="queries in the batched call")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--http", action="store_true", help="load `facesearch serve` on the flat index with wrk")
    ap.add_argument("--concurrency", type=lambda s: tuple(int(c) for c in s.split(",")), default=(1, 4, 16))
    ap.add_argument("--http-seconds", type=int, default=20)
    ap.add_argument("--work", type=Path, default=Path("runs/search_latency"))
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = SearchLatencyConfig(**vars(build_parser().parse_args(argv)))
    result = run(args)
    print(markdown(result))
    print(f"wrote {args.work / 'latency.json'} and latency.md")
    return result


if __name__ == "__main__":
    main()
