"""The full-size MegaFace run (3,530 probes x 1,000,000 distractors at d = 1024 by default) against the machine's
float32 GEMM floor, with peak memory.

    python -m facesearch.benchmarks.speed.megaface_speed --work runs/mf1m [--rows 1000000] [--dim 1024] [--device
    cpu|cuda]

Features: identity-clustered synthetic unit vectors in our shard format (``facesearch synth features``; generated
once under ``--work``), probes of 80 other identities (another seed, and their own identity names ``probe_…`` so
that no distractor is an image of a probe identity: the drawn list may use every distractor row).  The harness runs
exactly as ``facesearch bench megaface`` does (drawn list, every count exact, result JSON, devkit JSON, report).  The
floor is ``2 nq nb d / FLOP/s`` of the float32 product (nq, d) @ (d, tile) measured in the same process before and
after the run (the best of both: on a shared machine the rate swings); reported: wall time, its ratio to the floor,
per-stage seconds, peak RSS, N and TAR at FAR 1e-6 (``n/a (<1/N_neg)`` when the run has too few impostor pairs).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from facesearch.benchmarks import report
from facesearch.benchmarks.megaface_run import BenchConfig, run_megaface
from facesearch.benchmarks.speed.search_speed import gemm_flops
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features

PROBE_PREFIX = "probe"  # probe identity names: never a distractor's (those are synth_…)
PROBE_IDENTITIES = 80


def _features(work: Path, rows: int, dim: int, probes: int) -> tuple[Path, Path]:
    """The distractor and probe shard directories under ``work`` (written once; a complete one is reused)."""
    dis, prb = work / f"distractors_{rows}_{dim}", work / f"probes_{probes}_{dim}_{PROBE_PREFIX}"
    write_synth_features(SynthFeaturesConfig(out=dis, rows=rows, dim=dim, identities=max(rows // 100, 10), seed=11))
    # At least 2 probes an identity, so that every probe has a mate (a small --probes gets fewer identities).
    n_ids = min(PROBE_IDENTITIES, max(probes // 2, 1))
    write_synth_features(SynthFeaturesConfig(out=prb, rows=probes, dim=dim, identities=n_ids, spread=1.9, seed=12,
                                             identity_prefix=PROBE_PREFIX))  # fmt: skip
    return prb, dis


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/megaface_speed"), help="Folder for features and results.")
    ap.add_argument("--rows", type=int, default=1_000_000, help="Distractors (all of them form the one drawn list).")
    ap.add_argument("--dim", type=int, default=1024, help="Feature dimension.")
    ap.add_argument("--probes", type=int, default=3530, help="Probe images (80 identities, fewer below 160 probes).")
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    args = ap.parse_args(argv)
    prb, dis = _features(args.work, args.rows, args.dim, args.probes)
    tile = 8192
    before = gemm_flops(args.device, torch.float32, args.probes, args.dim, tile)
    t0 = time.perf_counter()
    (res,) = run_megaface(BenchConfig(out=args.work / "result", probes=prb, distractors=dis, sizes=(args.rows,),
                                      device=args.device), progress=print)  # fmt: skip
    wall = time.perf_counter() - t0
    after = gemm_flops(args.device, torch.float32, args.probes, args.dim, tile)
    flop = 2.0 * args.probes * args.rows * args.dim
    floor = flop / max(before, after)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    tar = res["tar_at_far"][0]
    summary = {"rows": args.rows, "dim": args.dim, "probes": args.probes, "device": args.device, "wall_s": wall,
               "gemm_tflops_before": before / 1e12, "gemm_tflops_after": after / 1e12, "floor_s": floor,
               "ratio_to_floor": wall / floor, "peak_rss_gib": peak, "stages": res["timings"],
               "rank1": res["rank1"], "N": res["counts"]["N"],
               "tar_at_1e-6": tar["tar"] if tar.get("supported", True) else report.NA_FAR,
               "screen_eps": res["screen_eps"]}  # fmt: skip
    print(json.dumps(summary, indent=1))
    (args.work / "speed.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
