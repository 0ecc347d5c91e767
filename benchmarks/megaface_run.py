"""``facesearch bench megaface``: the MegaFace Challenge 1 run — every distractor size against its own list, the
unfiltered / cleaned / attribute-filtered variants, our exact result JSON, the devkit-compatible JSON, and the report.

Result file (``kind = facesearch.megaface_result``): exact integer counts (N, N_pos, N_neg, rank-1 hits, ties,
the rank histogram = the exact CMC at every rank), the CMC exactly up to rank 10^4 plus the devkit-compressed tail,
the ROC at a grid of FARs with exact TAR counts and thresholds, TAR at FAR 1e-6 … 1e-3, timings per stage and the
provenance of the features, the distractor list's record (given file, or drawn: seed, candidates, rows excluded as
probe images / probe identities) and every warning.  ROC rows carry ``supported`` (FAR 0 or FAR >= 1/N_neg); the
others are kept but never shown as measured.  The devkit file ``cmc_<probe>_<distractor>_<alg>_<size>_<set>.json``
holds the compressed curves (protocol §4), its set names taken from the list file names as the devkit takes them.
Which distractors each size uses (given or drawn list, the exclusion of probes) is
:mod:`facesearch.benchmarks.megaface_lists`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from facesearch.benchmarks import devkit, report
from facesearch.benchmarks.megaface import SCREENS, Evaluation, ProbeSet
from facesearch.benchmarks.megaface_counts import ThresholdGuessMissed
from facesearch.benchmarks.megaface_data import (
    AttributeFilter,
    CachedDistractors,
    DistractorSource,
    Probes,
    probes_from_devkit,
    probes_from_shards,
)
from facesearch.benchmarks.megaface_exact import NAMED_FARS, floor_m
from facesearch.benchmarks.megaface_lists import DEFAULT_SIZES, DistractorLists, ListConfig, settle
from facesearch.benchmarks.megaface_soft import SoftDistractors, soft_features
from facesearch.benchmarks.megaface_store import DecodedShards, fits
from facesearch.engine.filter_cost import AttributeStats, FilterCost, statistics_from_source
from facesearch.indexer import shards
from facesearch.indexer.embed import EmbedConfig
from facesearch.indexer.manifest import describe_attribute_source, same_attribute_source
from facesearch.indexer.pipeline import run_embed
from facesearch.model.device import resolve_device
from facesearch.model.fileio import atomic_write_text
from facesearch.model.provenance import provenance

log = logging.getLogger(__name__)
T = TypeVar("T")

KIND = "facesearch.megaface_result"
EXACT_CMC_RANKS = 10_000
NA_FAR = report.NA_FAR
_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")


@dataclass(frozen=True)
class BenchConfig:
    """One MegaFace run.  Probes: a shard directory (``probes``) or a devkit tree (``probe_root`` + ``probe_list``);
    distractors: a shard directory (``distractors``) or a devkit tree (``distractor_root``, lists required).
    ``distractor_lists``: a folder of ``<name>_features_list.json_<size>_<set>``; sizes without a list are drawn
    from the shard rows with ``seed`` (recorded, and the drawn list is written beside the results), never from a
    probe image or another image of a probe identity.  ``sizes`` empty: every size with a list, plus every standard
    size (10 … 10^6) the candidate rows can fill.  ``allow_probe_overlap``: evaluate a given list that holds probe
    images (refused by default).  ``probe_name`` / ``distractor_name``: the set names in output file names (default:
    from the list file names as the devkit takes them, else ``facescrub`` / ``megaface``)."""

    out: Path
    probes: Path | None = None
    probe_root: Path | None = None
    probe_list: Path | None = None
    distractors: Path | None = None
    distractor_root: Path | None = None
    distractor_lists: Path | None = None
    file_ending: str = "_facesearch.bin"
    sizes: tuple[int, ...] = ()
    set_number: int = 1
    seed: int = 0
    algorithm: str | None = None
    tie_rule: str = "mate"
    cleaned: bool = False
    probe_noise: Path | None = None
    distractor_noise: Path | None = None
    filters: tuple[AttributeFilter, ...] = ()
    far_max: float = 1e-3
    device: str = "auto"
    screen: str = "auto"
    probe_name: str | None = None
    distractor_name: str | None = None
    allow_probe_overlap: bool = False

    def __post_init__(self) -> None:
        if (self.probes is None) == (self.probe_root is None):
            raise ValueError("give the probes as exactly one of a shard directory or a devkit feature root")
        if self.probe_root is not None and self.probe_list is None:
            raise ValueError("a devkit probe feature root needs the probe list (facescrub_features_list.json)")
        if (self.distractors is None) == (self.distractor_root is None):
            raise ValueError("give the distractors as exactly one of a shard directory or a devkit feature root")
        if self.distractor_root is not None and self.distractor_lists is None:
            raise ValueError("a devkit distractor feature root needs --distractor-lists (the devkit template lists)")
        if self.cleaned and (self.probe_noise is None or self.distractor_noise is None):
            raise ValueError("the cleaned variant needs both noise lists (facescrub_noises.txt, megaface_noises.txt)")
        if self.sizes and min(self.sizes) < 1:
            raise ValueError(f"distractor sizes must be >= 1, got {list(self.sizes)}")
        if self.screen not in SCREENS:
            raise ValueError(f"screen must be one of {', '.join(SCREENS)}, got {self.screen!r}")
        if not 0 < self.far_max <= 1:
            raise ValueError(f"far_max must be in (0, 1], got {self.far_max}")
        for what, name in (("probe", self.probe_name), ("distractor", self.distractor_name)):
            if name is not None and not _SET_NAME.fullmatch(name):
                raise ValueError(f"{what} set name {name!r} must be letters, digits, '.' or '-' (no '_' or '/': "
                                 f"it is one field of cmc_<probe>_<distractor>_<alg>_<size>_<set>.json)")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}
        d["filters"] = [f.to_dict() for f in self.filters]
        return d


def _load_probes(cfg: BenchConfig) -> Probes:
    if cfg.probes is not None:
        return probes_from_shards(cfg.probes, cfg.probe_list)
    assert cfg.probe_root is not None and cfg.probe_list is not None
    return probes_from_devkit(cfg.probe_root, cfg.probe_list, cfg.file_ending)


def _probe_name(cfg: BenchConfig) -> str:
    """The probe set's name in output file names: the option, else the probe list's set name, else facescrub."""
    if cfg.probe_name:
        return cfg.probe_name
    return devkit.list_set_name(cfg.probe_list.name) if cfg.probe_list is not None else "facescrub"


def _check_mates(cfg: BenchConfig, probes: Probes) -> None:
    """MegaFace ranks every (gallery, probe) pair of one identity: without such a pair there is nothing to rank."""
    if any(n > 1 for n in Counter(probes.identity).values()):
        return
    source = cfg.probe_list or cfg.probes
    raise ValueError(f"{source}: no probe has a mate: each of the {len(probes.keys):,} probes is the only image of "
                     f"its identity, so there is no (gallery, probe) pair to rank (N = 0); MegaFace needs identities "
                     f"with at least 2 probe images")  # fmt: skip


def far_supported(row: dict[str, Any], n_neg: int) -> bool:
    """Whether a ROC row's FAR is measurable with ``n_neg`` negatives: FAR 0, or at least one false accept allowed
    (floor(far * N_neg) >= 1).  The row's own ``supported`` key, when the evaluator wrote one, wins."""
    return bool(row.get("supported", row["far"] == 0 or floor_m(row["far"], n_neg) >= 1))


def _algorithm(cfg: BenchConfig, probes: Probes) -> str:
    if cfg.algorithm:
        return cfg.algorithm
    if cfg.probe_root is not None:
        return devkit.algorithm_name(cfg.file_ending)
    return "facesearch"


def _distractor_lists(
    cfg: BenchConfig, probes: Probes, noise: tuple[str, ...], say: Callable[[str], None], store: DecodedShards | None
) -> DistractorLists:
    """The run's distractor selections; drawn lists go to ``<out>/lists``."""
    lists = ListConfig(out=cfg.out / "lists", distractors=cfg.distractors, distractor_root=cfg.distractor_root,
                       lists=cfg.distractor_lists, file_ending=cfg.file_ending, sizes=cfg.sizes,
                       set_number=cfg.set_number, seed=cfg.seed, name=cfg.distractor_name,
                       allow_probe_overlap=cfg.allow_probe_overlap)  # fmt: skip
    return DistractorLists(lists, probes, noise, say, store)


def _evaluate(
    probes: Probes, src: CachedDistractors, cfg: BenchConfig, device: str, flt: AttributeFilter | None
) -> tuple[dict[str, Any], float]:
    """One variant's exact counts over ``src`` (replayed from memory once a first pass has cached it all)."""
    t0 = time.perf_counter()
    exclude = flt is not None and flt.excludes
    codes = flt.codes(probes.attributes, "probes") if exclude and flt is not None else None
    xq = probes.xq
    stream: DistractorSource = src
    if flt is not None and flt.mode == "soft":  # re-scored, not excluded: attribute-augmented features
        assert flt.weight is not None
        xq = soft_features(xq, probes.attributes, flt.attributes, flt.weight, "probes")
        stream = SoftDistractors(src, flt.attributes, flt.weight)
    missed = None
    threads = torch.get_num_threads()
    for guess in (True, False):
        ev = Evaluation(ProbeSet(xq, probes.identity, codes), src.n, far_max=cfg.far_max, device=device,
                        screen=cfg.screen, guess=guess)  # fmt: skip
        # Not in memory yet: a background thread decodes the blocks (the run's store, or the prefetch below running
        # ahead while they are cached) and the scoring leaves it a core until it is done — decoding beside scoring on
        # every core slowed the products' threads (each waits for the core the decoder holds) more than it took.
        finished = threading.Event()
        share = src.decoding() and threads > 1
        blocks = prefetch(stream.blocks(), ahead=lambda: src.caching, finished=finished) if src.rows is None else (
            stream.blocks())  # fmt: skip
        read = 0.0
        try:
            if share:
                torch.set_num_threads(threads - 1)
            t_read = time.perf_counter()
            for xb, attrs in blocks:
                read += time.perf_counter() - t_read
                if share and (finished.is_set() or not src.decoding()):
                    torch.set_num_threads(threads)
                    share = False
                ev.add(xb, flt.codes(attrs, "distractors") if exclude and flt is not None else None)
                t_read = time.perf_counter()
        finally:
            torch.set_num_threads(threads)
        try:
            out = ev.finish(stream.take, tie_rule=cfg.tie_rule)
        except ThresholdGuessMissed as e:  # rare (an unusual first block): the same run without the guess
            log.warning("%s; streaming the distractors again without it", e)
            missed = str(e)
            continue
        break
    out["threshold_guess"] = {"value": out["threshold_guess"], "missed": missed}
    out["timings"]["read_s"] = read
    seconds = time.perf_counter() - t0
    out["timings"]["total_s"] = seconds
    return out, seconds


def prefetch(
    items: Iterator[T], depth: int = 2, ahead: Callable[[], bool] | None = None,
    finished: threading.Event | None = None,
) -> Iterator[T]:  # fmt: skip
    """Produce ``items`` on a background thread, ``depth`` ahead — or without bound while ``ahead()`` says the items
    are kept in memory anyway (a cached source); ``finished`` is set when the producer has made its last item."""
    q: queue.Queue[Any] = queue.Queue()
    room = threading.Condition()
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                with room:
                    room.wait_for(lambda: stop.is_set() or q.qsize() < depth or (ahead is not None and ahead()))
                if stop.is_set():
                    return
                q.put(item)
            if finished is not None:
                finished.set()
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=work, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            with room:
                room.notify()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with room:
            room.notify()


def _cmc_points(hits: np.ndarray, n: int) -> dict[str, Any]:
    """Exact CMC up to rank EXACT_CMC_RANKS - 1, then the devkit-compressed tail (always ending at rank |D|)."""
    rates = hits / max(n, 1)
    head = min(len(hits), EXACT_CMC_RANKS)
    ranks = list(range(head))
    if len(hits) > head:
        tail_x, _ = devkit.compress_curve(list(range(head, len(hits))), rates[head:].tolist())
        ranks += [int(x) for x in tail_x]
    idx = np.asarray(ranks, np.int64)
    return {"ranks": ranks, "hits": hits[idx].tolist(), "rates": rates[idx].tolist(), "exact_upto": head - 1}


def _result(
    cfg: BenchConfig, alg: str, probes: Probes, src: DistractorSource, record: dict[str, Any], out: dict[str, Any],
    size: int, flt: AttributeFilter | None, names: tuple[str, str],
) -> dict[str, Any]:  # fmt: skip
    n, roc = out["N"], out["roc"]
    points = [{**p, "supported": far_supported(p, roc["N_neg"])} for p in roc["points"]]
    tar_at = []
    for far in NAMED_FARS:
        row = next((p for p in points if p["far"] == far), None)
        missing = {"tar": None, "supported": far_supported({"far": far}, roc["N_neg"])}
        tar_at.append({"far": far, **(missing if row is None else row)})
    label = alg
    return {
        "kind": KIND,
        "format_version": 1,
        "label": label,
        "algorithm": alg,
        "probe_set": names[0],
        "distractor_set": names[1],
        "size": size,
        "set": cfg.set_number,
        "cleaned": cfg.cleaned,
        "filter": None if flt is None else flt.to_dict(),
        "tie_rule": cfg.tie_rule,
        "distractor_list": record,
        "warnings": list(record.get("warnings", [])),
        "counts": {
            "n_probes": len(probes.keys),
            "n_identities": len(set(probes.identity)),
            "n_distractors": src.n,
            "N": n,
            "N_pos": roc["N_pos"],
            "N_neg": roc["N_neg"],
            "rank1_hits": int(out["hits"][0]),
            "mates_excluded": out["excluded"],
            "compared": out["compared"],
        },
        "rank1": float(out["hits"][0] / n) if n else None,
        "cmc": _cmc_points(np.asarray(out["hits"]), n),
        "rank_histogram": {"rank": out["rank_values"], "count": out["rank_counts"]},
        "ties": {
            "tied_distractor_comparisons": out["ties_total"],
            "pairs_with_ties": out["pairs_with_ties"],
            "rule": f"ties go to the {cfg.tie_rule}",
        },
        "roc": {
            k: [p.get(k) for p in points]
            for k in ("far", "tar", "tar_count", "threshold", "threshold_exact", "false_accepts", "m", "supported")
        },
        "roc_far_max": roc["far_max"],
        "tar_at_far": tar_at,
        "filter_stats": None,
        "screen": out["screen"],
        "screen_eps": out["eps"],
        "threshold_guess": out["threshold_guess"],
        "timings": out["timings"],
        "provenance": provenance(probes=probes.provenance, distractors=src.provenance, config=cfg.to_dict()),
    }


def _write(cfg: BenchConfig, result: dict[str, Any]) -> Path:
    flt = result["filter"]
    mode = "" if not flt or flt.get("mode", "hard") == "hard" else f"_{flt['mode']}"
    variant = ("_cleaned" if result["cleaned"] else "") + ("_filtered" + mode if flt else "")
    name = f"result_{result['algorithm']}_{result['size']}_{result['set']}{variant}.json"
    path = cfg.out / name
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    if not result["filter"]:
        folder = cfg.out / ("devkit_cleaned" if result["cleaned"] else "devkit")
        folder.mkdir(parents=True, exist_ok=True)
        fname = devkit.devkit_result_name(result["probe_set"], result["distractor_set"], result["algorithm"],
                                          result["size"], cfg.set_number)  # fmt: skip
        n = max(result["counts"]["N"], 1)
        hits = np.zeros(max(result["size"], result["counts"]["n_distractors"]) + 1, np.int64)
        hits[np.asarray(result["rank_histogram"]["rank"], np.int64)] = result["rank_histogram"]["count"]
        rates = (np.cumsum(hits) / n).tolist()
        roc = result["roc"]
        # Only measured points: a FAR below 1/N_neg (no false accept fits) is not written as if it were one.
        kept = [
            (f, t) for f, t, ok in zip(roc["far"], roc["tar"], roc["supported"], strict=True) if ok and t is not None
        ]
        far, tar = [f for f, _ in kept], [t for _, t in kept]
        devkit.write_devkit_json(folder / fname, list(range(len(rates))), rates, far, tar)
    return path


def _statistics(cfg: BenchConfig, flt: AttributeFilter, say: Callable[[str], None]) -> dict[str, AttributeStats] | None:
    """The validation statistics of ``flt``'s attributes that the probe shards' attribute columns carry (None when
    they carry none: said, not an error, unless margins must be chosen from them)."""
    if cfg.probes is None:
        return None
    source = shards.read_manifest(cfg.probes).attribute_provenance
    try:
        stats = statistics_from_source(source, flt.attributes)
    except ValueError as e:
        if flt.mode == "confident" and flt.margins is None:
            raise ValueError(f"--max-mate-loss: {cfg.probes}: {e}") from None
        if flt.excludes:
            say(f"filter cost not predicted: {e}")
        return None
    if cfg.distractors is not None:
        theirs = shards.read_manifest(cfg.distractors).attribute_provenance
        same_law = source.get("source") == theirs.get("source") == "synthetic"  # one generator law, any seed
        if not same_law and not same_attribute_source(source, theirs):
            say(
                f"WARNING: the probes' attributes come from {describe_attribute_source(source)}, the "
                f"distractors' from {describe_attribute_source(theirs)}: the predicted cost assumes one predictor"
            )
    return stats


def _resolve_filters(cfg: BenchConfig, say: Callable[[str], None]) -> list[tuple[AttributeFilter, FilterCost | None]]:
    """Each filter with its margins chosen (``--max-mate-loss``) from the validation statistics, and its predicted
    cost (None when the columns carry no statistics)."""
    out = []
    for f in cfg.filters:
        stats = _statistics(cfg, f, say)
        flt = f.resolved(stats)
        cost = None if stats is None or not flt.excludes else flt.predicted(stats)
        if cost is not None:
            say(
                f"filter [{flt.description}]: predicted mates lost {cost.mates_lost:.3f}, distractors removed "
                f"{cost.distractors_removed:.3f} (from the validation statistics of the attribute predictor)"
            )
        out.append((flt, cost))
    return out


def run_megaface(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every size (and each filtered variant configured); write results, devkit files and the report."""
    say = progress or (lambda msg: log.info(msg))
    device = str(resolve_device(cfg.device))
    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # The distractor shards decode from now on, once for every size, beside everything up to the scoring (a
    # directory too large for memory is decoded per size as it streams).
    attrs = tuple(dict.fromkeys(a for f in cfg.filters for a in f.attributes))
    store = DecodedShards(cfg.distractors, attrs) if cfg.distractors is not None and fits(cfg.distractors) else None
    try:
        return _run(cfg, say, device, t0, store)
    finally:
        if store is not None:
            store.close()


def _run(
    cfg: BenchConfig, say: Callable[[str], None], device: str, t0: float, store: DecodedShards | None
) -> list[dict[str, Any]]:
    probes = _load_probes(cfg)
    _check_mates(cfg, probes)
    noise: tuple[str, ...] = ()
    if cfg.cleaned:
        assert cfg.probe_noise is not None and cfg.distractor_noise is not None
        probes, n_noisy = probes.cleaned(devkit.read_noise_list(cfg.probe_noise))
        probes.provenance["noisy_probes_replaced"] = n_noisy
        noise = devkit.read_noise_list(cfg.distractor_noise)
    alg = _algorithm(cfg, probes)
    lists = _distractor_lists(cfg, probes, noise, say, store)
    names = (_probe_name(cfg), lists.name)
    filters = _resolve_filters(cfg, say)
    attrs = tuple(dict.fromkeys(a for f, _ in filters for a in f.attributes))
    n_ids = len(set(probes.identity))
    say(f"{len(probes.keys):,} probes of {n_ids} identities loaded in {time.perf_counter() - t0:.1f} s")
    results = []
    for size in lists.sizes():
        listed, record = lists.source(size, attrs)
        src = CachedDistractors(listed)  # read once for every variant of the size
        out, secs = _evaluate(probes, src, cfg, device, None)
        settle(record)
        res = _result(cfg, alg, probes, src, record, out, size, None, names)
        results.append(res)
        _write(cfg, res)
        say(f"size {size:>9,}: rank-1 {res['rank1']:.4f}  TAR@1e-6 {_fmt_tar(res['tar_at_far'][0])}  ({secs:.1f} s)")
        for flt, predicted in filters:
            fout, fsecs = _evaluate(probes, src, cfg, device, flt)
            fres = _result(cfg, alg, probes, src, record, fout, size, flt, names)
            nq_nb = len(probes.keys) * src.n
            fres["filter_stats"] = {
                "mates_excluded": fout["excluded"],
                "mates_excluded_fraction": fout["excluded"] / max(fout["N"], 1),
                "distractors_removed_fraction": 1.0 - fout["compared"] / max(nq_nb, 1),
                "speedup": secs / fsecs if fsecs > 0 and flt.excludes else None,  # soft re-scores every pair
                "unfiltered_seconds": secs,
                "filtered_seconds": fsecs,
                "predicted": None if predicted is None else predicted.to_dict(),
            }
            results.append(fres)
            _write(cfg, fres)
            fs = fres["filter_stats"]
            say(f"size {size:>9,} [{flt.description}]: rank-1 {fres['rank1']:.4f}  mates excluded "
                f"{fs['mates_excluded_fraction']:.3f}, distractors removed {fs['distractors_removed_fraction']:.3f}"
                f"  ({fsecs:.1f} s)")  # fmt: skip
    report.write_report(results, cfg.out)
    return results


def embed_inputs(
    out: Path, checkpoint: Path, probe_list: Path, probe_images: Path, probe_landmarks: Path | None,
    distractor_lists: Path, distractor_images: Path, distractor_landmarks: Path | None, device: str = "auto",
    progress: Callable[[str], None] | None = None, attributes_from: Path | None = None,
) -> tuple[Path, Path]:  # fmt: skip
    """Embed the probe list and the union of the distractor lists through the indexer (resumable; a finished run
    is reused) into ``out/features/{probes,distractors}``, attribute columns from ``attributes_from`` (an attribute
    predictor) when given, else from the model's own head; returns the two shard directories."""
    say = progress or (lambda msg: log.info(msg))
    feat = out / "features"
    lists = devkit.find_distractor_lists(distractor_lists)
    if not lists:
        raise ValueError(f"no megaface_features_list.json_<size>_<set> files in {distractor_lists}")
    union = list(dict.fromkeys(p for f in lists.values() for p in devkit.read_distractor_list(f)))
    feat.mkdir(parents=True, exist_ok=True)
    union_list = feat / "distractor_inputs.json"
    devkit.write_distractor_list(union_list, union)
    jobs = (("probes", probe_list, probe_images, probe_landmarks), ("distractors", union_list, distractor_images,
            distractor_landmarks))  # fmt: skip
    for name, listed, root, landmarks in jobs:
        cfg = EmbedConfig(input=listed, format="devkit", root=root, landmarks=landmarks, checkpoint=checkpoint,
                          out=feat / name, device=device, attributes_from=attributes_from)  # fmt: skip
        res = run_embed(cfg)
        failed = res.rows - res.ok_rows
        say(f"{name}: {res.ok_rows:,} of {res.rows:,} images embedded ({failed} failed) in {res.seconds:.1f} s")
    return feat / "probes", feat / "distractors"


def _fmt_tar(entry: dict[str, Any]) -> str:
    if not entry.get("supported", True):
        return NA_FAR
    return "—" if entry["tar"] is None else f"{entry['tar']:.4f}"


__all__ = ["DEFAULT_SIZES", "KIND", "BenchConfig", "embed_inputs", "run_megaface"]
