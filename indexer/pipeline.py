"""``facesearch embed`` on Dask: plan, then embed only the missing shards, each written atomically by its worker.

The only module of the project that imports dask / distributed.  Tasks carry (shard index, that shard's input items,
the config, the expected model fingerprint); each worker builds its Embedder and YuNet detector once (a module-level
cache in the worker process) and never receives a live model.  The driver records every finished shard in
``manifest.json`` as it arrives, so a job killed at any moment resumes where it stopped, and a shard's rows depend
only on its items (fixed per-shard batches, eval mode), never on which worker ran it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from indexer.embed import (
    EmbedConfig,
    InputItem,
    ProgressFn,
    build_detector,
    build_embedder,
    embed_partition,
    plan_inputs,
    plan_shards,
    stage,
)
from indexer.shards import (
    MANIFEST,
    Manifest,
    ShardEntry,
    file_sha256,
    read_manifest,
    schema,
    shard_name,
    verify_shard,
    write_manifest,
    write_shard,
)
from model.checkpoint import load_checkpoint
from model.device import resolve_device

log = logging.getLogger(__name__)

#: Per worker process: (what, key...) -> a built Embedder or FaceDetector.
_WORKER_CACHE: dict[tuple[Any, ...], Any] = {}


@dataclass(frozen=True)
class EmbedResult:
    """What a run did: shards computed now vs found valid, rows by status, throughput of the computed part and
    per-stage seconds summed over tasks (read, decode, align, infer, write)."""

    out: Path
    manifest: Manifest
    already_complete: bool
    computed_shards: int
    reused_shards: int
    rows: int
    ok_rows: int
    failed_by_reason: dict[str, int]
    seconds: float
    computed_images: int
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.computed_images / self.seconds if self.seconds > 0 else 0.0


def _versions() -> dict[str, str]:
    out = {}
    for name in ("facesearch", "torch", "pyarrow", "dask", "distributed", "numpy", "opencv-python-headless"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _items_sha256(items: Sequence[InputItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        lm = None if it.landmarks is None else it.landmarks.round(4).tolist()
        h.update(json.dumps([it.rel, it.identity, lm]).encode() + b"\n")
    return h.hexdigest()


def _new_manifest(cfg: EmbedConfig, items: Sequence[InputItem], n_shards: int) -> Manifest:
    ckpt = load_checkpoint(cfg.checkpoint)
    source = {"format": cfg.format, "input": str(cfg.input), "root": str(cfg.image_root),
              "landmarks": None if cfg.landmarks is None else str(cfg.landmarks), "sidecars": cfg.sidecars,
              "count": len(items), "items_sha256": _items_sha256(items)}  # fmt: skip
    return Manifest(
        fingerprint=ckpt.fingerprint,
        d=ckpt.model_config.embedding_dim,
        dtype=cfg.dtype,
        attributes=ckpt.model_config.attributes,
        model_config=ckpt.model_config.to_dict(),
        source=source,
        config=cfg.to_dict(),
        versions=_versions(),
        planned_shards=n_shards,
    )


def _check_compatible(out: Path, old: Manifest, new: Manifest, cfg: EmbedConfig) -> None:
    """Refuse to add to ``out`` shards from another model, input or content-changing config."""
    if old.fingerprint != new.fingerprint:
        raise ValueError(
            f"{out} holds embeddings of model {old.fingerprint[:16]}, but {cfg.checkpoint} is model "
            f"{new.fingerprint[:16]}; use another --out (or delete {out}) to embed with this model"
        )
    if old.source.get("items_sha256") != new.source["items_sha256"]:
        raise ValueError(
            f"{out} was embedded from another input ({old.source.get('count')} images from "
            f"{old.source.get('input')}; now {new.source['count']} from {cfg.input}); use another --out"
        )
    ignore = {"checkpoint", "out", "workers", "threads_per_worker", "scheduler"}
    keys = sorted((set(old.config) | set(new.config)) - ignore)
    old_cfg, new_cfg = old.config, new.config
    diff = [f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in keys if old_cfg.get(k) != new_cfg.get(k)]
    if diff or old.dtype != new.dtype:
        raise ValueError(f"{out} was embedded with another config ({'; '.join(diff)}); use another --out")


def _adopt(out: Path, i: int, ids: range, expected: pa.Schema) -> ShardEntry | None:
    """Entry for a shard file written before the driver recorded it (killed in between), if it is whole and right."""
    path = out / shard_name(i)
    try:
        pf = pq.ParquetFile(path)
        if pf.schema_arrow != expected or pf.metadata.num_rows != len(ids):
            return None
        table = pf.read(columns=["id", "status"])
    except (OSError, pa.ArrowException):
        return None
    if table.column("id").to_pylist() != list(ids):
        return None
    ok = int(pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0)
    return ShardEntry(path.name, len(ids), ok, file_sha256(path), ids.start, ids.stop)


def _reconcile(out: Path, manifest: Manifest, ranges: Sequence[range]) -> tuple[Manifest, list[int]]:
    """Verify existing shards against the manifest (checksum) or adopt unrecorded ones; returns the manifest with
    only valid entries and the shard indices still to compute."""
    expected = schema(manifest.d, manifest.dtype, manifest.attributes)
    valid, todo = [], []
    for i, ids in enumerate(ranges):
        entry = manifest.entry(shard_name(i))
        if entry is not None and verify_shard(out, entry):
            valid.append(entry)
            continue
        adopted = _adopt(out, i, ids, expected) if (out / shard_name(i)).is_file() else None
        if adopted is not None:
            valid.append(adopted)
        else:
            todo.append(i)
    return manifest.replace(shards=tuple(valid)), todo


def _worker_models(cfg: EmbedConfig, fingerprint: str, need_detector: bool) -> tuple[Any, Any]:
    """This worker process's Embedder (and detector), built on first use and cached."""
    key = ("embedder", str(cfg.checkpoint), fingerprint, cfg.device, cfg.precision, cfg.batch_size, cfg.flip_average)
    if key not in _WORKER_CACHE:
        embedder = build_embedder(cfg)
        if embedder.fingerprint != fingerprint:
            raise ValueError(f"{cfg.checkpoint} changed during the job (model {embedder.fingerprint[:16]}, the job "
                             f"started with {fingerprint[:16]})")  # fmt: skip
        _WORKER_CACHE[key] = embedder
    detector = None
    if need_detector:
        dkey = ("detector", str(cfg.detector_model), cfg.detector_pad)
        if dkey not in _WORKER_CACHE:
            _WORKER_CACHE[dkey] = build_detector(cfg)
        detector = _WORKER_CACHE[dkey]
    return _WORKER_CACHE[key], detector


def embed_shard(
    index: int, items: Sequence[InputItem], ids: range, cfg: EmbedConfig, fingerprint: str
) -> tuple[ShardEntry, dict[str, float]]:
    """The Dask task: embed shard ``index`` and write it atomically into ``cfg.out``; returns its manifest entry and
    per-stage seconds.  Runs in a worker with the model cached per process."""
    import cv2
    import torch

    torch.set_num_threads(cfg.threads_per_worker)
    cv2.setNumThreads(cfg.threads_per_worker)
    need_detector = not cfg.sidecars and any(it.landmarks is None for it in items)
    embedder, detector = _worker_models(cfg, fingerprint, need_detector)
    timings: dict[str, float] = {}
    table = embed_partition(items, embedder, detector, cfg, timings)
    with stage(timings, "write"):
        entry = write_shard(cfg.out / shard_name(index), table, (ids.start, ids.stop))
    return entry, timings


def _gpu_count(cfg: EmbedConfig) -> int:
    import torch

    if cfg.device not in ("auto", "cuda") or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


@contextmanager
def _client(cfg: EmbedConfig) -> Iterator[Any]:
    """A client on ``cfg.scheduler``, or on a LocalCluster sized to the machine: cores / threads_per_worker worker
    processes, or one worker per GPU (``CUDA_VISIBLE_DEVICES``) when GPUs exist and the device allows it."""
    import dask
    from distributed import Client

    if cfg.scheduler:
        with Client(cfg.scheduler) as client:
            yield client
        return
    # Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which returns every freed activation buffer to the OS:
    # CNN inference then runs ~40% slower (measured, benchmarks/embed_speed).  Keep glibc's adaptive default.
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        cluster = _start_cluster(cfg)
    with cluster, Client(cluster) as client:
        yield client


def _start_cluster(cfg: EmbedConfig) -> Any:
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    # Importing distributed sets its loggers to INFO (a page of scheduler chatter per cluster, in this process):
    # follow the application's level instead, at least WARNING unless it asked for DEBUG.
    root = logging.getLogger().getEffectiveLevel()
    logging.getLogger("distributed").setLevel(root if root <= logging.DEBUG else max(root, logging.WARNING))
    gpus = _gpu_count(cfg)
    if gpus:
        n = cfg.workers or gpus
        workers = {i: {"cls": Nanny, "options": {"nthreads": cfg.threads_per_worker,
                                                 "env": {"CUDA_VISIBLE_DEVICES": str(i % gpus)}}}
                   for i in range(n)}  # fmt: skip
        scheduler = {"cls": Scheduler, "options": {"dashboard": False, "dashboard_address": ":0"}}
        return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR)
    n = cfg.workers or max(1, (os.cpu_count() or 1) // cfg.threads_per_worker)
    return LocalCluster(n_workers=n, threads_per_worker=cfg.threads_per_worker, processes=True,
                        dashboard_address=":0", silence_logs=logging.ERROR)  # fmt: skip


def _compute(cfg: EmbedConfig, items: Sequence[InputItem], ranges: Sequence[range], todo: list[int],
             manifest: Manifest, progress: ProgressFn | None) -> tuple[Manifest, dict[str, float]]:  # fmt: skip
    from distributed import as_completed

    total = sum(len(ranges[i]) for i in todo)
    done, t0, stages = 0, time.perf_counter(), Counter[str]()
    with _client(cfg) as client:
        futures = [client.submit(embed_shard, i, items[ranges[i].start : ranges[i].stop], ranges[i], cfg,
                                 manifest.fingerprint, key=f"embed-shard-{i:05d}-{manifest.fingerprint[:8]}",
                                 pure=False) for i in todo]  # fmt: skip
        for future in as_completed(futures):
            entry, timings = future.result()
            manifest = write_manifest(cfg.out, manifest.with_entry(entry))
            stages.update(timings)
            done += entry.rows
            if progress is not None:
                rate = done / max(time.perf_counter() - t0, 1e-9)
                progress({"event": "shard", "file": entry.file, "rows": entry.rows, "done": done, "total": total,
                          "images_per_s": rate})  # fmt: skip
    return manifest, dict(stages)


def _status_counts(out: Path, manifest: Manifest) -> Counter[str]:
    counts: Counter[str] = Counter()
    for entry in manifest.shards:
        status = pq.read_table(out / entry.file, columns=["status"]).column("status")
        counts.update(status.to_pylist())
    return counts


def _prepare_out(cfg: EmbedConfig, new: Manifest) -> Manifest:
    out = cfg.out
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        _check_compatible(out, old, new, cfg)
        return old.replace(config=new.config, versions=new.versions)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not a shard directory (no {MANIFEST}); use an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    return write_manifest(out, new)


def run_embed(cfg: EmbedConfig, progress: ProgressFn | None = None) -> EmbedResult:
    """Embed ``cfg``'s images into the shard directory ``cfg.out``, computing only missing or invalid shards.

    Raises ``ValueError`` when ``cfg.out`` holds shards of another model (naming both fingerprints), input or
    config, and ``FileNotFoundError`` for a missing input, checkpoint or detector model."""
    t0 = time.perf_counter()
    resolve_device(cfg.device)  # a requested GPU that is absent fails here, before any worker starts
    items = plan_inputs(cfg)
    ranges = plan_shards(len(items), cfg.shard_rows)
    manifest = _prepare_out(cfg, _new_manifest(cfg, items, len(ranges)))
    for tmp in cfg.out.glob("part-*.tmp"):
        tmp.unlink(missing_ok=True)  # left by a killed job
    manifest, todo = _reconcile(cfg.out, manifest, ranges)
    already = manifest.complete and not todo
    stages: dict[str, float] = {}
    if not already:
        manifest = write_manifest(cfg.out, manifest.replace(complete=False))
        if progress is not None:
            progress({"event": "start", "total": sum(len(ranges[i]) for i in todo), "shards": len(todo),
                      "reused_shards": len(ranges) - len(todo)})  # fmt: skip
        if todo:
            manifest, stages = _compute(cfg, items, ranges, todo, manifest, progress)
        manifest = write_manifest(cfg.out, manifest.replace(complete=True))
    counts = _status_counts(cfg.out, manifest)
    ok = counts.pop("ok", 0)
    return EmbedResult(out=cfg.out, manifest=manifest, already_complete=already, computed_shards=len(todo),
                       reused_shards=len(ranges) - len(todo), rows=ok + sum(counts.values()), ok_rows=ok,
                       failed_by_reason=dict(sorted(counts.items())), seconds=time.perf_counter() - t0,
                       computed_images=sum(len(ranges[i]) for i in todo), stage_seconds=stages)  # fmt: skip


__all__ = ["EmbedResult", "embed_shard", "run_embed"]
