"""``facesearch embed`` on Dask: plan, then embed only the missing shards, each written atomically by its worker.

With :mod:`facesearch.indexer.cluster` (the cluster: local, or ``--scheduler`` with its worker probe), the only code of
the project that imports dask / distributed.  Tasks carry (shard index, that shard's input items, the config, the
expected model fingerprint); each worker builds its Embedder and YuNet detector once (a module-level cache in the worker
process) and never receives a live model.  The driver records every finished shard in the manifest as it arrives, so
a job killed at any moment resumes where it stopped, and a shard's rows depend only on its items (fixed per-shard
batches, eval mode), never on which worker ran it.

Changed inputs: before a shard is submitted, the driver records the state of its input files (size and mtime of
each, :func:`facesearch.indexer.inputs.inputs_digest`) in the manifest's ``source["shard_inputs"]``; a later run
compares every shard it finds with the state of its files now, and deletes and recomputes those whose inputs changed.
A shard with no recorded state (written before this check existed) is trusted as it is.

Attribute predictor (``attributes_from``): the driver opens it once before any Dask work (a missing file or one that
is no predictor fails there, naming it) for its fingerprint and attribute names; the manifest records where the
attribute columns came from (``attribute_source``: :func:`facesearch.indexer.manifest.predictor_source`, or the
model's own head); each worker loads it once, like the Embedder, and refuses a file whose fingerprint is no longer
the one the job started with.  Resuming into an output whose attribute columns came from another predictor (another
fingerprint, or the model's head) is refused like another model's checkpoint; the predictor's path alone may change.

Optional columns: a new output's manifest names them (``columns``: :func:`facesearch.indexer.embed.optional_columns`)
and every shard has them; a resumed output keeps writing its manifest's, so an output from before them stays without
them and a directory never mixes two schemas.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facesearch.indexer.cluster import ClusterError, ProbeSpec, cluster_client, probe_worker, probe_workers
from facesearch.indexer.embed import (
    DETECTION_FIELDS,
    FACE_STRIDE,
    EmbedConfig,
    InputItem,
    ProgressFn,
    build_detector,
    build_embedder,
    build_predictor,
    embed_partition,
    optional_columns,
    plan_inputs,
    plan_shards,
    shard_id_range,
    stage,
)
from facesearch.indexer.inputs import inputs_digest
from facesearch.indexer.locks import LOCK_FILE, directory_lock
from facesearch.indexer.manifest import (
    describe_attribute_source,
    model_source,
    predictor_source,
    same_attribute_source,
)
from facesearch.indexer.prepare_pool import close_pools
from facesearch.indexer.shards import (
    MANIFEST,
    Manifest,
    ShardEntry,
    embeddings_to_numpy,
    file_sha256,
    is_shard_directory,
    read_manifest,
    remove_temporaries,
    same_schema,
    schema,
    shard_name,
    verify_shard,
    write_manifest,
    write_shard,
)
from facesearch.model.assets import find_yunet, yunet_path
from facesearch.model.checkpoint import load_checkpoint
from facesearch.model.device import resolve_device
from facesearch.model.faces.align import pose_score
from facesearch.model.provenance import provenance, versions

log = logging.getLogger(__name__)

#: Per worker process: (what, key...) -> a built Embedder or FaceDetector.
_WORKER_CACHE: dict[tuple[Any, ...], Any] = {}
#: What a manifest written before the detection options existed was embedded with (how YuNet was then used).
_LEGACY_DETECTION = {"det_threshold": 0.6, "det_size": 640, "keep_face": "score"}
#: Below this :func:`facesearch.model.faces.align.pose_score` a face is turned ~45 degrees or more (counted in the
#: summary).
LOW_POSE_SCORE = 0.3
#: ``Manifest.source`` key: {shard file: :func:`facesearch.indexer.inputs.inputs_digest` of its inputs when it was
#: submitted}.
SHARD_INPUTS = "shard_inputs"


@dataclass(frozen=True)
class EmbedResult:
    """What a run did: shards computed now vs found valid, rows by status, throughput of the computed part and
    per-stage seconds summed over tasks (read, decode, align, infer, write); ``images`` planned (rows differ with
    ``keep_face="all"``) and ``low_pose_rows``: ok rows with :func:`facesearch.model.faces.align.pose_score` <
    :data:`LOW_POSE_SCORE` (turned ~45 degrees or more: their crops are over-zoomed half faces); ``changed_shards``: of
    the computed shards, those found with changed inputs; ``damaged_shards``: of the computed shards, recorded ones
    whose bytes no longer matched the manifest; ``warned_rows``: ok rows decoded past damaged data (the decoder's
    warning in their ``error``); ``unlabeled_images``: images an identity file (``identities``, CelebA) does not
    name."""

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
    images: int = 0
    low_pose_rows: int = 0
    changed_shards: int = 0
    damaged_shards: int = 0
    warned_rows: int = 0
    unlabeled_images: int = 0

    @property
    def images_per_s(self) -> float:
        return self.computed_images / self.seconds if self.seconds > 0 else 0.0


def _items_sha256(items: Sequence[InputItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        lm = None if it.landmarks is None else it.landmarks.round(4).tolist()
        h.update(json.dumps([it.rel, it.identity, lm]).encode() + b"\n")
    return h.hexdigest()


def _needs_detector(cfg: EmbedConfig, items: Sequence[InputItem]) -> bool:
    return not cfg.sidecars and any(it.landmarks is None for it in items)


def _provenance(cfg: EmbedConfig, items: Sequence[InputItem]) -> dict[str, Any]:
    """How rows were located and numbered: the YuNet options (``used``: whether any image needed detection) and the
    id scheme."""
    found = find_yunet(cfg.detector_model)
    model = None if found is None else str(found)
    detection = {**cfg.detect_options.to_dict(), "model": model, "used": _needs_detector(cfg, items)}
    ids = "image_index * 1000 + face_index (faces largest first)" if cfg.keep_face == "all" else "image_index"
    return {"detection": detection, "ids": ids}


@dataclass(frozen=True)
class _AttributeFiller:
    """What the driver learnt of the attribute predictor: its provenance record and attribute names (column order)."""

    source: dict[str, Any]
    attributes: tuple[str, ...]


def _open_predictor(cfg: EmbedConfig) -> _AttributeFiller | None:
    """Open ``cfg.attributes_from`` once in the driver (on the CPU): fails fast naming the file when it is missing
    or not a predictor; ``None`` without one."""
    if cfg.attributes_from is None:
        return None
    predictor = build_predictor(cfg, device="cpu")
    source = predictor_source({**predictor.describe(), "path": str(cfg.attributes_from)})
    return _AttributeFiller(source, tuple(predictor.attributes))


def _new_manifest(cfg: EmbedConfig, items: Sequence[InputItem], n_shards: int,
                  filler: _AttributeFiller | None = None) -> Manifest:  # fmt: skip
    ckpt = load_checkpoint(cfg.checkpoint)
    source = {"format": cfg.format, "input": str(cfg.input), "root": str(cfg.image_root),
              "landmarks": None if cfg.landmarks is None else str(cfg.landmarks), "sidecars": cfg.sidecars,
              "identities": None if cfg.identities is None else str(cfg.identities),
              "count": len(items), "items_sha256": _items_sha256(items), **_provenance(cfg, items)}  # fmt: skip
    return Manifest(
        fingerprint=ckpt.fingerprint,
        d=ckpt.model_config.embedding_dim,
        dtype=cfg.dtype,
        attributes=ckpt.model_config.attributes if filler is None else filler.attributes,
        model_config=ckpt.model_config.to_dict(),
        source=source,
        config=cfg.to_dict(),
        versions=versions(),
        provenance=provenance(),
        planned_shards=n_shards,
        columns=optional_columns(cfg.keep_face),
        attribute_source=model_source(ckpt.fingerprint) if filler is None else filler.source,
    )


def _check_compatible(out: Path, old: Manifest, new: Manifest, cfg: EmbedConfig) -> None:
    """Refuse to add to ``out`` shards from another model, input or content-changing config."""
    if old.fingerprint != new.fingerprint:
        raise ValueError(
            f"{out} holds embeddings of model {old.fingerprint[:16]}, but {cfg.checkpoint} is model "
            f"{new.fingerprint[:16]}; use another --out (or delete {out}) to embed with this model"
        )
    old_attrs, new_attrs = old.attribute_provenance, new.attribute_provenance
    if not same_attribute_source(old_attrs, new_attrs):
        raise ValueError(
            f"{out} holds attribute columns from {describe_attribute_source(old_attrs)}, but this run fills them "
            f"from {describe_attribute_source(new_attrs)}; use another --out (or delete {out}) to embed with "
            + ("this predictor" if new_attrs["source"] == "predictor" else "the model's own attribute head")
        )
    if old.source.get("items_sha256") != new.source["items_sha256"]:
        raise ValueError(
            f"{out} was embedded from another input ({old.source.get('count')} images from "
            f"{old.source.get('input')}; now {new.source['count']} from {cfg.input}); use another --out"
        )
    # the checkpoint's and the predictor's files are compared by fingerprint above: their paths may change
    ignore = {"checkpoint", "attributes_from", "out", "workers", "threads_per_worker", "decode_processes", "scheduler"}
    if not new.source["detection"]["used"]:
        ignore |= set(DETECTION_FIELDS)  # every image has landmarks: how YuNet would choose cannot change a row
    keys = sorted((set(old.config) | set(new.config)) - ignore)
    old_cfg, new_cfg = {**_LEGACY_DETECTION, **old.config}, new.config
    diff = [f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in keys if old_cfg.get(k) != new_cfg.get(k)]
    if (old_cfg.get("keep_face") == "all") != (new_cfg.get("keep_face") == "all") and "keep_face" in ignore:
        # with landmarks for every image the face choice is moot, but keep_face='all' also sets the id scheme
        diff.append(f"keep_face: {old_cfg.get('keep_face')!r} -> {new_cfg.get('keep_face')!r} (another id scheme)")
    if diff or old.dtype != new.dtype:
        raise ValueError(f"{out} was embedded with another config ({'; '.join(diff)}); use another --out")


def _ids_match(got: list[int], images: range, keep_face: str) -> bool:
    """Whether a shard's row ids are exactly those of the input ids ``images``: the ids themselves, or with ``all``
    every image in order with faces 0, 1, 2, ... (at least face 0)."""
    if keep_face != "all":
        return got == list(images)
    pairs = [divmod(row, FACE_STRIDE) for row in got]
    if [image for image, face in pairs if face == 0] != list(images):
        return False
    prev = None
    for image, face in pairs:
        if face != 0 and (image, face - 1) != prev:
            return False
        prev = (image, face)
    return True


def _adopt(out: Path, i: int, ids: range, expected: pa.Schema, keep_face: str) -> ShardEntry | None:
    """Entry for a shard file written before the driver recorded it (killed in between), if it is whole and right."""
    path = out / shard_name(i)
    try:
        pf = pq.ParquetFile(path)
        if not same_schema(pf.schema_arrow, expected) or (keep_face != "all" and pf.metadata.num_rows != len(ids)):
            return None
        table = pf.read(columns=["id", "status"])
    except (OSError, pa.ArrowException):
        return None
    if not _ids_match(table.column("id").to_pylist(), ids, keep_face):
        return None
    ok = int(pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0)
    return ShardEntry(path.name, table.num_rows, ok, file_sha256(path), *shard_id_range(ids, keep_face),
                      size=path.stat().st_size)  # fmt: skip


def _reconcile(out: Path, manifest: Manifest, ranges: Sequence[range], keep_face: str,
               states: Sequence[str]) -> tuple[Manifest, list[int], list[int], list[int]]:  # fmt: skip
    """Verify recorded shards against the manifest (size, SHA-256, rows) or adopt unrecorded ones (written by a job
    killed before it recorded them), and compare the state of each one's inputs now (``states``) with the state
    recorded when it was submitted.  Returns the manifest with only the valid, unchanged entries, the shard indices
    still to compute, those of them whose inputs changed and those found damaged (a recorded shard whose bytes no
    longer match: never re-adopted; the files of both are deleted here, so that no later run adopts them)."""
    expected = schema(manifest.d, manifest.dtype, manifest.attributes, manifest.columns)
    recorded = manifest.source.get(SHARD_INPUTS) or {}
    valid, todo, changed, damaged = [], [], [], []
    for i, ids in enumerate(ranges):
        name = shard_name(i)
        entry = manifest.entry(name)
        if entry is not None and not verify_shard(out, entry):
            log.warning("%s does not match its manifest entry (damaged or replaced): recomputing it", out / name)
            (out / name).unlink(missing_ok=True)
            damaged.append(i)
            entry = None
        elif entry is None and (out / name).is_file():
            entry = _adopt(out, i, ids, expected, keep_face)
        if entry is not None and recorded.get(name, states[i]) != states[i]:  # none recorded: trusted
            (out / name).unlink(missing_ok=True)
            changed.append(i)
            entry = None
        if entry is None:
            todo.append(i)
        else:
            valid.append(entry)
    return manifest.replace(shards=tuple(valid)), todo, changed, damaged


def _worker_models(cfg: EmbedConfig, fingerprint: str, need_detector: bool,
                   attributes_fingerprint: str | None = None) -> tuple[Any, Any, Any]:  # fmt: skip
    """This worker process's Embedder (and detector, and attribute predictor), built on first use and cached."""
    key = ("embedder", str(cfg.checkpoint), fingerprint, cfg.device, cfg.precision, cfg.batch_size, cfg.flip_average)
    if key not in _WORKER_CACHE:
        embedder = build_embedder(cfg)
        if embedder.fingerprint != fingerprint:
            raise ValueError(f"{cfg.checkpoint} changed during the job (model {embedder.fingerprint[:16]}, the job "
                             f"started with {fingerprint[:16]})")  # fmt: skip
        _WORKER_CACHE[key] = embedder
    detector = None
    if need_detector:
        dkey = ("detector", str(cfg.detector_model), cfg.detect_options)
        if dkey not in _WORKER_CACHE:
            _WORKER_CACHE[dkey] = build_detector(cfg)
        detector = _WORKER_CACHE[dkey]
    predictor = None
    if cfg.attributes_from is not None:
        if attributes_fingerprint is None:
            raise ValueError("an embed task with an attribute predictor needs its fingerprint")
        embedder = _WORKER_CACHE[key]
        pkey = ("predictor", str(cfg.attributes_from), attributes_fingerprint, str(embedder.device), cfg.precision,
                cfg.batch_size)  # fmt: skip
        if pkey not in _WORKER_CACHE:
            built = build_predictor(cfg, device=str(embedder.device))
            if built.fingerprint != attributes_fingerprint:
                raise ValueError(f"{cfg.attributes_from} changed during the job (predictor {built.fingerprint[:16]}, "
                                 f"the job started with {attributes_fingerprint[:16]})")  # fmt: skip
            _WORKER_CACHE[pkey] = built
        predictor = _WORKER_CACHE[pkey]
    return _WORKER_CACHE[key], detector, predictor


def embed_shard(
    index: int,
    items: Sequence[InputItem],
    ids: range,
    cfg: EmbedConfig,
    fingerprint: str,
    columns: Sequence[str] | None = None,
    attributes_fingerprint: str | None = None,
) -> tuple[ShardEntry, dict[str, float]]:
    """The Dask task: embed shard ``index`` and write it atomically into ``cfg.out``; returns its manifest entry and
    per-stage seconds.  ``columns``: the optional columns of the directory (``Manifest.columns``; ``None``: those of a
    new output); ``attributes_fingerprint``: the fingerprint ``cfg.attributes_from`` had when the job started (needed
    with a predictor).  Runs in a worker with the models cached per process."""
    import cv2
    import torch

    torch.set_num_threads(cfg.threads_per_worker)
    cv2.setNumThreads(cfg.threads_per_worker)
    embedder, detector, predictor = _worker_models(cfg, fingerprint, _needs_detector(cfg, items),
                                                   attributes_fingerprint)  # fmt: skip
    timings: dict[str, float] = {}
    table = embed_partition(items, embedder, detector, cfg, timings, columns, predictor)
    with stage(timings, "write"):
        entry = write_shard(cfg.out / shard_name(index), table, shard_id_range(ids, cfg.keep_face))
    return entry, timings


def _for_workers(cfg: EmbedConfig, items: Sequence[InputItem]) -> EmbedConfig:
    """``cfg`` as the workers need it: absolute paths (a worker does not share the driver's working directory) and
    the YuNet model resolved here, so every worker uses the same file."""
    model = yunet_path(cfg.detector_model) if _needs_detector(cfg, items) else cfg.detector_model
    attrs = None if cfg.attributes_from is None else cfg.attributes_from.absolute()
    return cfg.replace(checkpoint=cfg.checkpoint.absolute(), out=cfg.out.absolute(), attributes_from=attrs,
                       detector_model=None if model is None else model.absolute())  # fmt: skip


def _compute(cfg: EmbedConfig, items: Sequence[InputItem], ranges: Sequence[range], todo: list[int],
             manifest: Manifest, progress: ProgressFn | None) -> tuple[Manifest, dict[str, float]]:  # fmt: skip
    from distributed import KilledWorker, as_completed

    total = sum(len(ranges[i]) for i in todo)
    done, t0, stages = 0, time.perf_counter(), Counter[str]()
    wcfg = _for_workers(cfg, items)
    attrs_fp = manifest.attribute_source["fingerprint"] if cfg.attributes_from is not None else None
    with cluster_client(cfg) as client:
        if cfg.scheduler:
            probe_workers(client, wcfg, items)
        if progress is not None:  # only now: a cluster that fails to start or to see the files prints just the error
            progress({"event": "start", "total": total, "shards": len(todo), "reused_shards": len(ranges) - len(todo)})
        futures = {client.submit(embed_shard, i, items[ranges[i].start : ranges[i].stop], ranges[i], wcfg,
                                 manifest.fingerprint, manifest.columns, attrs_fp,
                                 key=f"embed-shard-{i:05d}-{manifest.fingerprint[:8]}",
                                 pure=False): i for i in todo}  # fmt: skip
        for future in as_completed(futures):
            try:
                entry, timings = future.result()
            except (OSError, KilledWorker) as e:  # an I/O error on a worker, or a worker that died (out of memory)
                why = " ".join(str(e).split()) or type(e).__name__
                raise ClusterError(f"{shard_name(futures[future])} failed on a worker: {why}") from e
            manifest = write_manifest(cfg.out, manifest.with_entry(entry))
            stages.update(timings)
            done += len(ranges[futures[future]])  # images (rows differ with keep_face='all'), as is total
            if progress is not None:
                rate = done / max(time.perf_counter() - t0, 1e-9)
                progress({"event": "shard", "file": entry.file, "rows": entry.rows, "done": done, "total": total,
                          "images_per_s": rate})  # fmt: skip
        if todo:
            client.run(close_pools)  # the workers' decode processes end with the job (a local cluster closes now)
    return manifest, dict(stages)


def _row_counts(out: Path, manifest: Manifest) -> tuple[Counter[str], int, int]:
    """Rows by status, ok rows whose :func:`facesearch.model.faces.align.pose_score` is below :data:`LOW_POSE_SCORE`
    (the stored
    ``pose_score`` column, else computed from ``landmarks``), and ok rows with a decoder warning."""
    counts: Counter[str] = Counter()
    low_pose = warned = 0
    stored = "pose_score" in manifest.columns
    for entry in manifest.shards:
        table = pq.read_table(out / entry.file, columns=["status", "pose_score" if stored else "landmarks", "error"])
        ok = np.array(table.column("status").to_pylist()) == "ok"
        counts.update(table.column("status").to_pylist())
        if stored:
            pose = table.column("pose_score").to_numpy(zero_copy_only=False).astype(np.float32)  # null -> NaN
        else:
            pose = pose_score(embeddings_to_numpy(table.column("landmarks"), 10))
        low_pose += int(((pose < LOW_POSE_SCORE) & ok).sum())
        warned += int((ok & table.column("error").is_valid().to_numpy(zero_copy_only=False)).sum())
    return counts, low_pose, warned


def _prepare_out(cfg: EmbedConfig, new: Manifest) -> Manifest:
    out = cfg.out
    if is_shard_directory(out):
        old = read_manifest(out)
        _check_compatible(out, old, new, cfg)
        detection = {k: new.source[k] for k in ("detection", "ids")}
        # the same attribute filler (checked above), its path perhaps new
        return old.replace(config=new.config, versions=new.versions, source={**old.source, **detection},
                           attribute_source=new.attribute_source)  # fmt: skip
    if out.exists() and (not out.is_dir() or any(p.name != LOCK_FILE for p in out.iterdir())):
        raise ValueError(f"--out {out} exists and is not a shard directory (no {MANIFEST}); use an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    return write_manifest(out, new)


def run_embed(cfg: EmbedConfig, progress: ProgressFn | None = None) -> EmbedResult:
    """Embed ``cfg``'s images into the shard directory ``cfg.out``, computing only missing or invalid shards.

    Raises ``ValueError`` when ``cfg.out`` holds shards of another model (naming both fingerprints), attribute
    predictor, input or config, or ``cfg.attributes_from`` is no predictor, and ``FileNotFoundError`` for a missing
    input, checkpoint, attribute predictor or detector model."""
    t0 = time.perf_counter()
    resolve_device(cfg.device)  # a requested GPU that is absent fails here, before any worker starts
    items = plan_inputs(cfg)
    if _needs_detector(cfg, items):
        yunet_path(cfg.detector_model)  # a missing detector model fails here, before any Dask work starts
    filler = _open_predictor(cfg)  # so does a missing or wrong attribute predictor
    if cfg.out.exists() and not cfg.out.is_dir():
        raise ValueError(f"--out {cfg.out} is a file; expected a shard directory (new or empty, or one to resume)")
    cfg.out.mkdir(parents=True, exist_ok=True)
    with directory_lock(cfg.out):  # a second job into the same --out is refused, naming this one
        return _run_locked(cfg, items, progress, t0, filler)


def _run_locked(cfg: EmbedConfig, items: Sequence[InputItem], progress: ProgressFn | None, t0: float,
                filler: _AttributeFiller | None = None) -> EmbedResult:  # fmt: skip
    ranges = plan_shards(len(items), cfg.shard_rows)
    manifest = _prepare_out(cfg, _new_manifest(cfg, items, len(ranges), filler))
    remove_temporaries(cfg.out)  # left by a killed job
    states = [inputs_digest(items[r.start : r.stop], cfg.sidecars) for r in ranges]
    manifest, todo, changed, damaged = _reconcile(cfg.out, manifest, ranges, cfg.keep_face, states)
    already = manifest.complete and not todo
    stages: dict[str, float] = {}
    if not already:
        # The inputs' state as they are submitted: a later run compares it with theirs then (shards adopted too).
        recorded = {**(manifest.source.get(SHARD_INPUTS) or {}), **{shard_name(i): states[i] for i in todo}}
        source = {**manifest.source, SHARD_INPUTS: dict(sorted(recorded.items()))}
        manifest = write_manifest(cfg.out, manifest.replace(complete=False, source=source))
        if todo:
            manifest, stages = _compute(cfg, items, ranges, todo, manifest, progress)
        manifest = write_manifest(cfg.out, manifest.replace(complete=True))
    counts, low_pose, warned = _row_counts(cfg.out, manifest)
    ok = counts.pop("ok", 0)
    by_file = cfg.identities is not None or cfg.format == "celeba"  # labelled by an identity file
    return EmbedResult(out=cfg.out, manifest=manifest, already_complete=already, computed_shards=len(todo),
                       reused_shards=len(ranges) - len(todo), rows=ok + sum(counts.values()), ok_rows=ok,
                       failed_by_reason=dict(sorted(counts.items())), seconds=time.perf_counter() - t0,
                       computed_images=sum(len(ranges[i]) for i in todo), stage_seconds=stages,
                       images=len(items), low_pose_rows=low_pose, changed_shards=len(changed), warned_rows=warned,
                       damaged_shards=len(damaged),
                       unlabeled_images=sum(it.identity is None for it in items) if by_file else 0)  # fmt: skip


__all__ = [
    "LOW_POSE_SCORE",
    "SHARD_INPUTS",
    "ClusterError",
    "EmbedResult",
    "ProbeSpec",
    "embed_shard",
    "probe_worker",
    "run_embed",
]
