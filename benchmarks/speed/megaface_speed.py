"""The full-size MegaFace run (3,530 probes x 1,000,000 distractors at d = 1024 by default) against the machine's
float32 GEMM floor, with peak memory.

    python -m facesearch.benchmarks.speed.megaface_speed --work runs/mf1m [--rows 1000000] [--dim 1024] [--device
    cpu|cuda] [--screen auto|int8|none]
    facesearch bench speed megaface ...   (the same options)

Features: identity-clustered synthetic unit vectors in our shard format (``facesearch synth features``; generated
once under ``--work``), probes of 80 other identities (another seed, and their own identity names ``probe_…`` so
that no distractor is an image of a probe identity: the drawn list may use every distractor row).  The harness runs
exactly as ``facesearch bench megaface`` does (drawn list, every count exact, result JSON, devkit JSON, report).  The
floor is ``2 nq nb d / FLOP/s`` of the float32 product (nq, d) @ (d, tile) measured in the same process before and
after the run (the best of both: on a shared machine the rate swings); reported: wall time, its ratio to the floor,
per-stage seconds, peak RSS, N and TAR at FAR 1e-6 (``n/a (<1/N_neg)`` when the run has too few impostor pairs),
in ``<work>/speed.json`` with the provenance record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facesearch.benchmarks import report
from facesearch.benchmarks.megaface import SCREENS
from facesearch.benchmarks.megaface_run import BenchConfig, run_megaface
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features
from facesearch.model.measure import gemm_flops, peak_rss_bytes
from facesearch.model.provenance import provenance

PROBE_PREFIX = "probe"  # probe identity names: never a distractor's (those are synth_…)
PROBE_IDENTITIES = 80
TILE = 8192  # columns of the float32 product whose rate sets the floor


@dataclass(frozen=True)
class MegafaceSpeedConfig:
    """The options of the run (one field per command-line option)."""

    work: Path = Path("runs/megaface_speed")
    rows: int = 1_000_000
    dim: int = 1024
    probes: int = 3530
    device: str = "cpu"
    screen: str = "auto"


def _features(work: Path, rows: int, dim: int, probes: int) -> tuple[Path, Path]:
    """The distractor and probe shard directories under ``work`` (written once; a complete one is reused)."""
    dis, prb = work / f"distractors_{rows}_{dim}", work / f"probes_{probes}_{dim}_{PROBE_PREFIX}"
    write_synth_features(SynthFeaturesConfig(out=dis, rows=rows, dim=dim, identities=max(rows // 100, 10), seed=11))
    # At least 2 probes an identity, so that every probe has a mate (a small --probes gets fewer identities).
    n_ids = min(PROBE_IDENTITIES, max(probes // 2, 1))
    write_synth_features(SynthFeaturesConfig(out=prb, rows=probes, dim=dim, identities=n_ids, spread=1.9, seed=12,
                                             identity_prefix=PROBE_PREFIX))  # fmt: skip
    return prb, dis


def run(cfg: MegafaceSpeedConfig, progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Features (once), the MegaFace run, the GEMM floor before and after; the summary, also in ``speed.json``."""
    prb, dis = _features(cfg.work, cfg.rows, cfg.dim, cfg.probes)
    before = gemm_flops(cfg.probes, cfg.dim, TILE, "fp32", cfg.device)
    t0 = time.perf_counter()
    (res,) = run_megaface(BenchConfig(out=cfg.work / "result", probes=prb, distractors=dis, sizes=(cfg.rows,),
                                      device=cfg.device, screen=cfg.screen), progress=progress)  # fmt: skip
    wall = time.perf_counter() - t0
    after = gemm_flops(cfg.probes, cfg.dim, TILE, "fp32", cfg.device)
    flop = 2.0 * cfg.probes * cfg.rows * cfg.dim
    floor = flop / max(before, after)
    tar = res["tar_at_far"][0]
    config = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    summary = {"rows": cfg.rows, "dim": cfg.dim, "probes": cfg.probes, "device": cfg.device, "wall_s": wall,
               "gemm_tflops_before": before / 1e12, "gemm_tflops_after": after / 1e12, "floor_s": floor,
               "ratio_to_floor": wall / floor, "peak_rss_gib": peak_rss_bytes() / 2**30, "stages": res["timings"],
               "rank1": res["rank1"], "N": res["counts"]["N"],
               "tar_at_1e-6": tar["tar"] if tar.get("supported", True) else report.NA_FAR, "screen": res["screen"],
               "threshold_guess": res["threshold_guess"],
               "screen_eps": res["screen_eps"], "provenance": provenance(config=config)}  # fmt: skip
    (cfg.work / "speed.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/megaface_speed"), help="Folder for features and results.")
    ap.add_argument("--rows", type=int, default=1_000_000, help="Distractors (all of them form the one drawn list).")
    ap.add_argument("--dim", type=int, default=1024, help="Feature dimension.")
    ap.add_argument("--probes", type=int, default=3530, help="Probe images (80 identities, fewer below 160 probes).")
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    ap.add_argument(
        "--screen", default="auto", choices=SCREENS, help="auto (int8 on a CPU with int8 units), int8, none."
    )
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    summary = run(MegafaceSpeedConfig(**vars(build_parser().parse_args(argv))))
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
