"""One (variant, seed) of ``facesearch ablate``: train, embed the probes and distractors, benchmark, write
``D/runs/<variant key>/seed<s>/result.json``.

Pairing: every variant of seed s starts from the same initial weights wherever the architectures agree: the network
of the block at that seed is built once (``D/runs/_init/<arch>-seed<s>.safetensors``, the Configuration-1 head with
all seven attributes) and every variant of that block starts from it where names and shapes match (trunk, f, the
identity classifier, and the head's tensors of the same shape); the batch order is a function of (seed, data, batch
size) alone (:mod:`facesearch.model.trainer_data`), the same for every variant.

The probe and distractor images are embedded in this process (landmark-aligned, the model's input) into two shard
directories, which :func:`facesearch.benchmarks.megaface_run.run_megaface` benchmarks exactly at every distractor
list size; the features are deleted once the result is written (the harness results stay under ``megaface/``).
Beside the harness's counts the result holds, for the paired intervals, the rank-1 hits per probe identity at the
largest size (brute force, checked against the harness's total), the LFW-style fold accuracies and the attribute
head's confusion counts per probe identity.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facesearch.benchmarks import devkit
from facesearch.benchmarks.ablate_plan import Tier, Variant
from facesearch.benchmarks.ablate_shared import Shared
from facesearch.benchmarks.ablate_stats import attribute_counts, attribute_rates, rank1_by_identity
from facesearch.benchmarks.lfw import evaluate_lfw, read_pairs
from facesearch.benchmarks.megaface_exact import NAMED_FARS
from facesearch.benchmarks.megaface_run import BenchConfig, run_megaface
from facesearch.benchmarks.report import NA_FAR
from facesearch.indexer import shards
from facesearch.model.checkpoint import save_checkpoint
from facesearch.model.config import ATTRIBUTES, ModelConfig
from facesearch.model.device import resolve_device
from facesearch.model.faces.datasets import FaceDataset, Sample
from facesearch.model.fileio import atomic_write_text
from facesearch.model.inference import Embedder, embed_dataset
from facesearch.model.measure import StageTimer
from facesearch.model.provenance import provenance
from facesearch.model.train import CHECKPOINT, TrainResult, build_network, train
from facesearch.model.trainer_data import detector_factory

log = logging.getLogger(__name__)
Say = Callable[[str], None]

KIND = "facesearch.ablate_run"
RESULT = "result.json"
_SHARD_ROWS = 100_000


@dataclass(frozen=True)
class RunSpec:
    """Where and how one (variant, seed) runs: ``runs`` is ``D/runs``."""

    runs: Path
    shared: Shared
    tier: Tier
    variant: Variant
    seed: int
    device: str = "auto"

    @property
    def out(self) -> Path:
        return self.runs / self.variant.key / f"seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        """What a finished result must match to be reused."""
        return {"kind": KIND, "key": self.variant.key, "seed": self.seed, "tier": self.tier.name,
                "shared_sha256": self.shared.digest}  # fmt: skip


def finished(spec: RunSpec) -> dict[str, Any] | None:
    """The result of ``spec`` when it is complete and belongs to this config and shared data, else None."""
    path = spec.out / RESULT
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    same = all(result.get(k) == v for k, v in spec.identity().items())
    return result if same else None


def initial_weights(path: Path, tier: Tier, arch: str, seed: int, identities: int) -> Path:
    """Write (once) the initial weights of block ``arch`` at ``seed`` for ``identities`` classes: the network of
    ``Variant(arch)`` (Configuration-1, all seven attributes) as training initialises it, seeded with ``seed``."""
    if path.is_file():
        return path
    cfg = Variant(arch).train_config(tier, seed, data=Path("."))
    torch.manual_seed(seed)  # as training seeds its own initialisation
    model = build_network(cfg, identities)
    save_checkpoint(path, model.cfg, model.state_dict(), extra={"purpose": "ablate initial weights"})
    return path


def init_checkpoint(spec: RunSpec) -> Path:
    """The initial weights of ``spec``'s block at its seed (see the module docstring)."""
    path = spec.runs / "_init" / f"{spec.variant.arch}-seed{spec.seed}.safetensors"
    return initial_weights(path, spec.tier, spec.variant.arch, spec.seed, spec.shared.identities)


def _train(spec: RunSpec, say: Say) -> TrainResult:
    s = spec.shared
    cfg = spec.variant.train_config(spec.tier, spec.seed, data=s.train_data, data_format=s.train_format,
                                    labels=s.labels, out=spec.out / "model", init=init_checkpoint(spec),
                                    device=spec.device)  # fmt: skip
    cfg = cfg.replace(resume=(cfg.out / CHECKPOINT).is_file())
    quarter = [1]  # the next quarter of the schedule to report

    def progress(record: dict[str, Any]) -> None:
        if record.get("event") == "train" and quarter[0] < 4 and record["step"] >= quarter[0] * cfg.total_steps / 4:
            quarter[0] = int(4 * record["step"] // cfg.total_steps) + 1
            say(f"  {spec.variant.key} seed {spec.seed}: step {record['step']}/{cfg.total_steps}, loss "
                f"{record.get('loss', float('nan')):.3f}")  # fmt: skip

    result = train(cfg, progress)
    if result.weights is None:
        raise RuntimeError(f"{cfg.out}: training stopped at step {result.step} of {result.total_steps}")
    return result


def _embed(embedder: Embedder, samples: Sequence[Sample], workers: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (n, D) and head probabilities (n, M); every image must embed (the lists are fixed)."""
    ds = FaceDataset(samples, size=embedder.input_size, attributes=embedder.attributes,
                     detector_factory=detector_factory(samples))  # fmt: skip
    emb, prob, skips = embed_dataset(embedder, ds, num_workers=workers)
    if len(skips):
        raise ValueError(f"{len(skips)} {what} image(s) could not be embedded ({skips.summary()}); the benchmark lists "
                         f"need every image")  # fmt: skip
    return emb, prob


def write_features(directory: Path, paths: Sequence[str], identities: Sequence[str | None], xb: np.ndarray,
                   model: ModelConfig, fingerprint: str) -> Path:  # fmt: skip
    """A complete shard directory of ``xb`` (n, d) float32 features (row ids 0 .. n-1), replacing any there."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    entries = []
    for i, lo in enumerate(range(0, len(xb), _SHARD_ROWS)):
        hi = min(lo + _SHARD_ROWS, len(xb))
        table = shards.table_from_arrays(np.arange(lo, hi), paths[lo:hi], identities[lo:hi], xb[lo:hi], {}, None,
                                         None, ["ok"] * (hi - lo), [None] * (hi - lo), dtype="float32")  # fmt: skip
        entries.append(shards.write_shard(directory / shards.shard_name(i), table, (lo, hi)))
    manifest = shards.Manifest(fingerprint=fingerprint, d=int(xb.shape[1]), dtype="float32", attributes=(),
                               model_config=model.to_dict(), source={"writer": "facesearch ablate"},
                               provenance=provenance(), shards=tuple(entries), planned_shards=len(entries),
                               complete=True)  # fmt: skip
    shards.write_manifest(directory, manifest)
    return directory


def _megaface(spec: RunSpec, key: str, emb_q: np.ndarray, emb_b: np.ndarray, model: ModelConfig,
              fingerprint: str) -> list[dict[str, Any]]:  # fmt: skip
    s, feat = spec.shared, spec.out / "features"
    ids = [str(x.identity) for x in s.probes]
    probes = write_features(feat / "probes", s.probe_paths, ids, emb_q, model, fingerprint)
    dis = write_features(feat / "distractors", s.distractor_paths, [x.identity for x in s.distractors], emb_b, model,
                         fingerprint)  # fmt: skip
    shutil.rmtree(spec.out / "megaface", ignore_errors=True)
    cfg = BenchConfig(out=spec.out / "megaface", probes=probes, probe_list=s.probe_list, distractors=dis,
                      distractor_lists=s.distractor_lists, sizes=s.sizes, algorithm=key,
                      device=spec.device)  # fmt: skip
    return run_megaface(cfg, progress=lambda msg: log.info("%s", msg))


def _largest(spec: RunSpec, results: list[dict[str, Any]], emb_q: np.ndarray, emb_b: np.ndarray) -> dict[str, Any]:
    """Rank-1 hits per probe identity at the largest size, by brute force, checked against the harness."""
    top = max(results, key=lambda r: r["size"])
    listed = {p: i for i, p in enumerate(spec.shared.distractor_paths)}
    rows = [listed[p] for p in _list_entries(spec.shared, top["size"])]
    names, mates, hits = rank1_by_identity(emb_q, [str(x.identity) for x in spec.shared.probes], emb_b[rows],
                                           str(resolve_device(spec.device)))  # fmt: skip
    harness = top["counts"]["rank1_hits"]
    if int(hits.sum()) != harness or int(mates.sum()) != top["counts"]["N"]:
        log.warning("brute-force rank-1 hits %d of %d differ from the harness's %d of %d (a float64 near-tie)",
                    hits.sum(), mates.sum(), harness, top["counts"]["N"])  # fmt: skip
    roc = top["roc"]
    return {"size": top["size"], "identities": names, "mates": mates.tolist(), "hits": hits.tolist(),
            "harness_rank1_hits": harness, "agrees_with_harness": int(hits.sum()) == harness,
            "N": top["counts"]["N"], "N_neg": top["counts"]["N_neg"],
            "roc": {"far": roc["far"], "tar": roc["tar"], "supported": roc["supported"]},
            "result": str(_result_file(top))}  # fmt: skip


def _list_entries(shared: Shared, size: int) -> tuple[str, ...]:
    lists = devkit.find_distractor_lists(shared.distractor_lists)
    return devkit.read_distractor_list(lists[(size, 1)])


def _result_file(r: dict[str, Any]) -> Path:
    return Path("megaface") / f"result_{r['algorithm']}_{r['size']}_{r['set']}.json"


def _tars(r: dict[str, Any]) -> list[dict[str, Any]]:
    """TAR at 1e-6 … 1e-3, ``n/a (<1/N_neg)`` where the negatives leave room for no false accept."""
    return [{"far": t["far"], "supported": t["supported"], "tar": t["tar"] if t["supported"] else NA_FAR}
            for t in r["tar_at_far"]]  # fmt: skip


def _lfw(spec: RunSpec, emb_q: np.ndarray, emb_b: np.ndarray) -> dict[str, Any]:
    rows = {"probes": emb_q, "distractors": emb_b}
    features = {k: rows[role][i] for k, (role, i) in spec.shared.lfw_images.items()}
    res = evaluate_lfw(read_pairs(spec.shared.lfw_pairs), features)
    return {"mean_accuracy": res.mean_accuracy, "standard_error": res.standard_error,
            "fold_accuracies": res.fold_accuracies, "n_pairs": sum(res.fold_sizes)}  # fmt: skip


def _attributes(spec: RunSpec, names: Sequence[str], prob: np.ndarray) -> dict[str, Any] | None:
    truth = spec.shared.truth
    if truth is None:
        return None
    cols = [ATTRIBUTES.index(a) for a in names]
    ids, counts = attribute_counts(prob, truth[:, cols], [str(x.identity) for x in spec.shared.probes])
    acc, bal = attribute_rates(counts)
    return {"attributes": list(names), "trained": spec.variant.attributes != "none",
            "accuracy": dict(zip(names, _finite(acc), strict=True)),
            "balanced_accuracy": dict(zip(names, _finite(bal), strict=True)),
            "identities": ids, "counts": counts.tolist()}  # fmt: skip


def _finite(x: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in x]


def run_variant(spec: RunSpec, say: Say) -> dict[str, Any]:
    """Train and evaluate ``spec`` (resuming its training from a checkpoint), write its result atomically and
    return it."""
    timer, t0 = StageTimer(), time.perf_counter()
    with timer("train"):
        trained = _train(spec, say)
    assert trained.weights is not None, "_train checks the run finished"
    embedder = Embedder(trained.weights, device=spec.device)
    workers = spec.tier.workers if spec.tier.workers is not None else min(8, os.cpu_count() or 1)
    with timer("embed"):
        emb_q, prob_q = _embed(embedder, spec.shared.probes, workers, "probe")
        emb_b, _ = _embed(embedder, spec.shared.distractors, workers, "distractor")
    with timer("megaface"):
        bench = _megaface(spec, spec.variant.key, emb_q, emb_b, embedder.model_config, embedder.fingerprint)
        largest = _largest(spec, bench, emb_q, emb_b)
    with timer("lfw"):
        lfw = _lfw(spec, emb_q, emb_b)
    shutil.rmtree(spec.out / "features", ignore_errors=True)  # large at scale; derived from the weights
    result = {
        **spec.identity(),
        "variant": {"arch": spec.variant.arch, "head": spec.variant.head, "attributes": spec.variant.attributes},
        "tier_sizes": spec.tier.to_dict(),
        "train": {"fingerprint": trained.fingerprint, "weights": str(trained.weights), "steps": trained.step,
                  "final": trained.final, "config": json.loads((trained.out / "train_config.json").read_text())},
        "megaface": [{"size": r["size"], "rank1": r["rank1"], "rank1_hits": r["counts"]["rank1_hits"],
                      "N": r["counts"]["N"], "N_neg": r["counts"]["N_neg"], "tar_at_far": _tars(r),
                      "result": str(_result_file(r))} for r in bench],
        "largest": largest,
        "named_fars": list(NAMED_FARS),
        "lfw": lfw,
        "attributes": _attributes(spec, embedder.attributes, prob_q),
        "seconds": {**{k: round(v, 2) for k, v in timer.seconds.items()}, "total": round(time.perf_counter() - t0, 2)},
        "provenance": provenance(),
    }  # fmt: skip
    atomic_write_text(spec.out / RESULT, json.dumps(result, indent=1, default=float) + "\n")
    return result


__all__ = ["KIND", "RESULT", "RunSpec", "finished", "init_checkpoint", "initial_weights", "run_variant",
           "write_features"]  # fmt: skip
