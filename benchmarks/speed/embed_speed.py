"""Images/s of ``facesearch embed`` (the Dask pipeline: read, decode, align, infer, write) against the model alone
(``Embedder.embed_crops`` on pre-aligned crops), on the same machine and the same images.  The reference is the
faster of the model with all threads in one process and the model in N single-thread processes running at once, N
the worker count (the workers' own layout, measured: what N single-thread workers could do without the pipeline,
sharing caches, memory bandwidth and clock as they do; on a shared machine one multi-threaded process loses much more
to thread barriers).  The single-thread rate times N is reported beside it: an upper bound no concurrent run reaches.

    python -m facesearch.benchmarks.speed.embed_speed [--identities 40] [--images-per-identity 10] [--width 0.25]
        [--input-size 112x96] [--detect] [--workers N] [--decode-processes N] [--device cpu|cuda]
        [--precision auto|fp32|bf16] [--json out.json]
    facesearch bench speed embed ...   (the same options)

Images are synthetic faces (``facesearch.model.faces.synth``) with landmarks from their list (``--detect``: YuNet
instead).  The model is a randomly initialised Fast network (speed does not depend on the weights).  Pipeline overhead
is
``model-alone images/s / pipeline images/s - 1``, measured over the whole run (cluster start and worker model builds
included) and in steady state (from the first finished shard to the last).  The model alone is the best of
``--repeats`` runs, the pipeline the best of ``--repeats`` fresh runs: the machine is shared.  Per-stage seconds are
summed over tasks (they overlap: decoding runs beside inference).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facesearch.indexer.embed import EmbedConfig, InputItem, plan_inputs
from facesearch.indexer.pipeline import run_embed
from facesearch.indexer.prepare_pool import auto_processes
from facesearch.model.checkpoint import save_checkpoint
from facesearch.model.config import preset
from facesearch.model.device import resolve_device
from facesearch.model.faces.align import FaceDetector, prepare_face
from facesearch.model.faces.synth import SynthConfig, generate_faces
from facesearch.model.inference import Embedder
from facesearch.model.network import FaceNet
from facesearch.model.provenance import provenance
from facesearch.model.tables import render_table


@dataclass(frozen=True)
class EmbedSpeedConfig:
    """The options of the run (one field per command-line option)."""

    identities: int = 40
    images_per_identity: int = 10
    width: float = 0.25
    input_size: str = "112x96"
    batch_size: int = 64
    shard_rows: int = 100
    workers: int | None = None
    threads_per_worker: int = 1
    decode_processes: int | None = None
    device: str = "cpu"
    precision: str = "auto"
    repeats: int = 2
    detect: bool = False
    json: Path | None = None


def _data(root: Path, identities: int, per_identity: int) -> Path:
    generate_faces(SynthConfig(out=root, seed=3, identities=identities, images_per_identity=per_identity,
                               layouts=("casia",), size=128, workers=os.cpu_count() or 1))  # fmt: skip
    return root / "casia"


#: The model alone runs on the crops of at most this many images (repeated to the run's image count).
ALONE_CROPS = 1024


def _device_name(device: str) -> str:
    dev = torch.device(resolve_device(device))
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()


def _alone_crops(items: list[InputItem], cfg: EmbedConfig, detector: FaceDetector | None) -> np.ndarray:
    """As many pre-aligned crops as ``items``: those of the first :data:`ALONE_CROPS` repeated (the speed does not
    depend on the pixels)."""
    size = Embedder(cfg.checkpoint, "cpu").input_size
    crops = []
    for it in items[:ALONE_CROPS]:
        try:
            crops.append(prepare_face(it.path, it.landmarks, detector, size).crop)
        except ValueError:
            continue
    x = np.stack(crops)
    return np.concatenate([x] * -(-len(items) // len(x)))[: len(items)]


def _model_alone(ckpt: Path, x: np.ndarray, cfg: EmbedConfig, repeats: int) -> dict[int | str, dict[str, Any]]:
    """Best-of-``repeats`` embed_crops throughput on the pre-aligned crops ``x`` (:func:`_alone_crops`), with all
    threads and with one thread (on a GPU: once)."""
    embedder = Embedder(ckpt, cfg.device, cfg.precision, cfg.batch_size)
    out: dict[int | str, dict[str, Any]] = {}
    gpu = embedder.device.type == "cuda"
    runs: list[tuple[int | str, Embedder, int]] = [(t, embedder, t) for t in (torch.get_num_threads(), 1)]
    if gpu:  # the reference is the default (CUDA graphs); without them, for comparison
        eager = Embedder(ckpt, cfg.device, cfg.precision, cfg.batch_size, cuda_graphs=False)
        runs = [(torch.get_num_threads(), embedder, torch.get_num_threads()), ("eager", eager, torch.get_num_threads())]
    for key, emb, threads in runs:
        torch.set_num_threads(threads)
        emb.embed_crops(x)  # warm-up: every batch shape once
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            emb.embed_crops(x)
            best = min(best, time.perf_counter() - t0)
        out[key] = {"images": len(x), "seconds": best, "images_per_s": len(x) / best, "threads": threads}
    return out


def _alone_in_process(ckpt: str, crops: str, device: str, precision: str, batch: int, repeats: int,
                      barrier: Any, results: Any) -> None:  # fmt: skip
    """One of :func:`_concurrent_alone`'s processes: the model on one thread, ``repeats`` passes over the crops,
    started together with its siblings."""
    torch.set_num_threads(1)
    x = np.load(crops)
    emb = Embedder(Path(ckpt), device, precision, batch)
    emb.embed_crops(x[: 2 * batch])  # warm-up
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(repeats):
        emb.embed_crops(x)
    results.put(len(x) * repeats / (time.perf_counter() - t0))


def _concurrent_alone(ckpt: Path, x: np.ndarray, cfg: EmbedConfig, processes: int, repeats: int,
                      work: Path) -> dict[str, Any]:  # fmt: skip
    """The model alone laid out as the pipeline's workers: ``processes`` single-thread processes at once, each
    embedding the crops; their summed images/s (what the workers' inference could do without the pipeline, with
    the caches, memory bandwidth and clock the cores share when all are busy)."""
    import multiprocessing

    path = work / "alone_crops.npy"
    np.save(path, x)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_alone_in_process, args=(str(ckpt), str(path), cfg.device, cfg.precision,
                                                         cfg.batch_size, repeats, barrier, results))
             for _ in range(processes)]  # fmt: skip
    for p in procs:
        p.start()
    rates = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return {"images": len(x) * repeats, "processes": processes, "images_per_s": sum(rates),
            "per_process": rates}  # fmt: skip


def _pipeline(cfg: EmbedConfig) -> dict[str, Any]:
    shards: list[tuple[float, int]] = []

    def progress(record: Any) -> None:
        if record["event"] == "shard":
            shards.append((time.perf_counter(), record["rows"]))

    t0 = time.perf_counter()
    result = run_embed(cfg, progress)
    wall = time.perf_counter() - t0
    n = result.computed_images
    steady_s = shards[-1][0] - shards[0][0]
    steady_n = n - shards[0][1]
    return {"images": n, "ok": result.ok_rows, "wall_s": wall, "images_per_s": n / wall, "steady_s": steady_s,
            "steady_images": steady_n, "steady_images_per_s": steady_n / steady_s if steady_s > 0 else float("nan"),
            "stage_seconds": result.stage_seconds}  # fmt: skip


def run(cfg: EmbedSpeedConfig) -> dict[str, Any]:
    """Model alone vs the Dask pipeline on the same synthetic images (in a temporary folder, removed after);
    writes ``cfg.json`` when set."""
    work = Path(tempfile.mkdtemp(prefix="embed_speed_"))
    try:
        result = _measure(cfg, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def _measure(args: EmbedSpeedConfig, work: Path) -> dict[str, Any]:
    h, w = (int(v) for v in args.input_size.split("x"))
    model_cfg = preset("fast", width=args.width, input_size=(h, w), num_identities=args.identities)
    torch.manual_seed(0)
    ckpt = work / "weights.safetensors"
    save_checkpoint(ckpt, model_cfg, FaceNet(model_cfg).state_dict())
    casia = _data(work / "synth", args.identities, args.images_per_identity)
    fmt: dict[str, Any] = {"input": casia, "format": "images"} if args.detect else {
        "input": casia / "landmarks.csv", "format": "list", "root": casia}  # fmt: skip
    cfg = EmbedConfig(**fmt, checkpoint=ckpt, out=work / "shards", shard_rows=args.shard_rows,
                      batch_size=args.batch_size, device=args.device, precision=args.precision,
                      workers=args.workers, threads_per_worker=args.threads_per_worker,
                      decode_processes=args.decode_processes)  # fmt: skip
    items = plan_inputs(cfg)
    cores = os.cpu_count() or 1
    x = _alone_crops(items, cfg, FaceDetector() if args.detect else None)
    alone_by_key = _model_alone(ckpt, x, cfg, args.repeats)
    eager = alone_by_key.pop("eager", None)
    alone_by_threads = {int(k): v for k, v in alone_by_key.items()}
    gpu = torch.device(resolve_device(args.device)).type == "cuda"
    one = alone_by_threads[min(alone_by_threads)]
    workers = args.workers or (max(1, torch.cuda.device_count()) if gpu else max(1, cores // args.threads_per_worker))
    concurrent = None
    if args.threads_per_worker == 1 and not gpu and workers > 1:
        concurrent = _concurrent_alone(ckpt, x, cfg, workers, max(1, args.repeats), work)
    ideal = concurrent["images_per_s"] if concurrent else 0.0
    alone = max(alone_by_threads.values(), key=lambda a: a["images_per_s"])
    alone = {**alone, "images_per_s": max(alone["images_per_s"], ideal), "one_thread": one, "all_threads":
             alone_by_threads[max(alone_by_threads)], "ideal_workers": workers, "eager": eager,
             "concurrent": concurrent, "one_thread_times_workers": one["images_per_s"] * workers}  # fmt: skip
    runs = [_pipeline(cfg.replace(out=work / f"shards{i}")) for i in range(args.repeats)]
    pipe = min(runs, key=lambda p: p["wall_s"])
    infer = pipe["stage_seconds"].get("infer", 0.0)
    steady_infer = infer * pipe["steady_images"] / max(pipe["images"], 1)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(args).items()}
    return {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "loadavg": os.getloadavg(), "model": f"fast w{args.width} {args.input_size}", "detect": args.detect,
            "workers": args.workers, "threads_per_worker": args.threads_per_worker, "batch_size": args.batch_size,
            "device": _device_name(args.device), "decode_processes": args.decode_processes,
            "decode_processes_used": args.decode_processes if args.decode_processes is not None else
            auto_processes("cuda" if gpu else "cpu", gpus=max(1, torch.cuda.device_count())),
            "precision": args.precision,
            "model_alone": alone, "pipeline": pipe,
            "overhead_pct": 100 * (alone["images_per_s"] / pipe["images_per_s"] - 1),
            "steady_overhead_pct": 100 * (alone["images_per_s"] / pipe["steady_images_per_s"] - 1)
            if pipe["steady_s"] > 0 else float("nan"),  # one shard: no steady state
            "infer_share_pct": 100 * infer / (workers * pipe["wall_s"]),
            "steady_infer_share_pct": 100 * steady_infer / (workers * pipe["steady_s"]) if pipe["steady_s"] > 0
            else float("nan"),
            "provenance": provenance(config=config)}  # fmt: skip


def format_report(r: dict[str, Any]) -> str:
    """The markdown report of a :func:`run` result: the paths compared, the inference share, the stage seconds."""
    a, p = r["model_alone"], r["pipeline"]
    where = r.get("device", "cpu")
    procs = r.get("decode_processes_used", r.get("decode_processes"))
    decode = f"{procs} decode processes" if procs else "decode on its threads"
    alone_rows = [
        [
            f"model alone (embed_crops, {where}, {a['all_threads']['threads']} threads)",
            a["images"],
            f"{a['all_threads']['seconds']:.2f}",
            f"{a['all_threads']['images_per_s']:.1f}",
            "—",
        ]
    ]
    if a.get("eager"):
        alone_rows.append([f"model alone, eager (no CUDA graph; {where})", a["eager"]["images"],
                           f"{a['eager']['seconds']:.2f}", f"{a['eager']['images_per_s']:.1f}", "—"])  # fmt: skip
    if a["one_thread"]["threads"] != a["all_threads"]["threads"]:
        alone_rows += [
            ["model alone (embed_crops, 1 thread)", a["images"], f"{a['one_thread']['seconds']:.2f}",
             f"{a['one_thread']['images_per_s']:.1f}", "—"],
            *([[f"model alone, {a['ideal_workers']} processes x 1 thread at once (the workers' layout)",
                a["concurrent"]["images"] * a["ideal_workers"], "", f"{a['concurrent']['images_per_s']:.1f}", "—"]]
              if a.get("concurrent") else []),
            ["reference: best of the above", "", "", f"{a['images_per_s']:.1f}", "—"],
        ]  # fmt: skip
    paths = [
        *alone_rows,
        [f"Dask pipeline, {r['workers'] or 'auto'} workers x {r['threads_per_worker']} thread, {decode}, incl. "
         "cluster start", p["images"], f"{p['wall_s']:.2f}", f"{p['images_per_s']:.1f}", f"{r['overhead_pct']:+.0f}%"],
        ["Dask pipeline, steady state (first to last finished shard)", p["steady_images"], f"{p['steady_s']:.2f}",
         f"{p['steady_images_per_s']:.1f}", f"{r['steady_overhead_pct']:+.0f}%"],
    ]  # fmt: skip
    stages = [[k, f"{v:.2f}"] for k, v in r["pipeline"]["stage_seconds"].items()]
    lines = [
        f"Embedding speed: {r['model']}, {'YuNet detection' if r['detect'] else 'landmarks from the list'}, "
        f"{where}, batch {r['batch_size']}, {r['cores']} cores, load average "
        f"{' / '.join(f'{v:.2f}' for v in r['loadavg'])} (at the end)",
        "",
        render_table(["path", "images", "seconds", "images/s", "overhead"], paths),
        "",
        f"Inference share of worker time (summed infer seconds / ({a['ideal_workers']} workers x wall)): "
        f"{r['infer_share_pct']:.0f}% over the whole run, {r['steady_infer_share_pct']:.0f}% in steady state "
        "(approximate: the first shard's inference is counted in both).",
        "",
        render_table(["stage (summed over tasks)", "seconds"], stages),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--identities", type=int, default=40)
    ap.add_argument("--images-per-identity", type=int, default=10)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--input-size", default="112x96")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-rows", type=int, default=100)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--decode-processes", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--detect", action="store_true", help="YuNet detection instead of the list's landmarks")
    ap.add_argument("--json", type=Path, default=None)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result = run(EmbedSpeedConfig(**vars(build_parser().parse_args(argv))))
    print(format_report(result))
    return result


if __name__ == "__main__":
    main()
