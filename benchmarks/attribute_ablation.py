"""MGMTN's ablation table (ATTRIBUTE_MODELS.md §2): which of its parts earn their keep, over several seeds.

Variants (:data:`VARIANTS`), each trained by ``facesearch attributes train --method mgmtn`` with the same data,
schedule and seed set:

- ``g2ff`` — the reference: group + global fusion, analytic masks, 128x112 margin crop;
- ``global`` — global features only (no masks: the multi-scale pooled trunk);
- ``groups`` — group features only;
- ``learned`` — G2FF with the learned masks (the mask network, trained first, predicts each face's masks);
- ``template`` — G2FF on the 112x96 crop instead of the margin crop (chin and second chin partly cut off).

Every predictor of every seed runs on the same test faces (:func:`facesearch.benchmarks.attribute_compare.score_faces`);
per variant the table gives the per-attribute balanced accuracy averaged over seeds, the mean over attributes
(mean ± standard deviation over seeds), and the paired difference to ``g2ff``: the seed-averaged difference of the
means, with a 95 % interval from identity-bootstrap resamples of the test people shared by every predictor (the
difference is recomputed per resample as the mean over seeds of variant − reference of the same seed).

Run: ``python -m facesearch.benchmarks.attribute_ablation --data DATA/celeba --out runs/ablation --seeds 0,1,2``
(trained predictors already in ``--out`` are reused; an interrupted one resumes).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.benchmarks.attribute_compare import _balanced_columns, mean_balanced, read_split, score_faces
from facesearch.model.attributes import AttributeTrainConfig
from facesearch.model.fileio import atomic_write_text
from facesearch.model.predictors import AttributePredictor, load_predictor
from facesearch.model.provenance import provenance
from facesearch.model.tables import render_table

log = logging.getLogger(__name__)

#: name -> (description, AttributeTrainConfig changes); the first is the reference.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "g2ff": ("G2FF, analytic masks, 128x112 (reference)", {}),
    "global": ("global features only", {"fusion": "global"}),
    "groups": ("group features only", {"fusion": "groups"}),
    "learned": ("G2FF, learned masks", {"masks": "learned"}),
    "template": ("G2FF, 112x96 crop", {"crop": "template"}),
}


def train_variants(
    data: Path, out: Path, seeds: Sequence[int], variants: Sequence[str], **options: Any
) -> dict[str, dict[int, Path]]:
    """Train (or reuse) every variant x seed under ``out/VARIANT/seedS``; ``options`` go to every
    :class:`AttributeTrainConfig`.  Returns variant -> seed -> predictor file."""
    from facesearch.model.predictors.training import PREDICTOR_FILE, train_attribute_predictor

    paths: dict[str, dict[int, Path]] = {}
    for name in variants:
        changes = VARIANTS[name][1]
        for seed in seeds:
            run = out / name / f"seed{seed}"
            path = run / PREDICTOR_FILE
            if not path.is_file():
                log.info("training %s seed %d", name, seed)
                cfg = AttributeTrainConfig(data=data, out=run, method="mgmtn", seed=seed, **{**options, **changes})
                train_attribute_predictor(cfg)
            paths.setdefault(name, {})[seed] = path
    return paths


def ablation(
    predictors: Mapping[str, Mapping[int, AttributePredictor]],
    samples: Sequence[Any],
    bootstrap: int = 1000,
    seed: int = 0,
    num_workers: int = 0,
) -> dict[str, Any]:
    """The table's numbers (see the module docstring) as a JSON-ready dict; the first variant is the reference."""
    flat = {f"{v}@{s}": p for v, runs in predictors.items() for s, p in runs.items()}
    scored = score_faces(flat, samples, num_workers=num_workers)
    draws = scored.draws(bootstrap, seed)
    y = scored.labels
    names = list(predictors)
    ref = names[0]
    rows: dict[str, Any] = {}
    for v in names:
        seeds = sorted(predictors[v])
        per_seed = {s: _balanced_columns(scored.probabilities[f"{v}@{s}"], y) for s in seeds}
        means = np.array([np.nanmean(per_seed[s]) for s in seeds])
        row: dict[str, Any] = {
            "seeds": seeds,
            "per_attribute": dict(
                zip(scored.attributes, np.mean([per_seed[s] for s in seeds], 0).tolist(), strict=True)
            ),
            "mean": float(means.mean()),
            "sd_over_seeds": float(means.std(ddof=1)) if len(means) > 1 else None,
            "per_seed_mean": dict(zip(map(str, seeds), means.tolist(), strict=True)),
            "train_seconds": float(
                np.mean([(predictors[v][s].meta.get("train_seconds") or {}).get("total", np.nan) for s in seeds])
            ),
            "parameters": predictors[v][seeds[0]].parameters,
            "macs": predictors[v][seeds[0]].macs,
        }
        if v != ref:
            common = [s for s in seeds if s in predictors[ref]]
            if common:
                point = np.mean([np.nanmean(per_seed[s]) - rows[ref]["per_seed_mean"][str(s)] for s in common])
                prob = scored.probabilities
                boot = np.mean(
                    [mean_balanced(prob[f"{v}@{s}"], y, draws) - mean_balanced(prob[f"{ref}@{s}"], y, draws)
                     for s in common], 0
                )  # fmt: skip
                ci = [float(np.nanpercentile(boot, 2.5)), float(np.nanpercentile(boot, 97.5))] if len(boot) else None
                row["difference"] = {"versus": ref, "seeds": common, "mean": float(point), "ci95": ci}
        rows[v] = row
    return {
        "attributes": scored.attributes,
        "images": len(y),
        "identities": scored.n_people,
        "bootstrap": bootstrap,
        "variants": {v: {"description": VARIANTS.get(v, (v,))[0], **rows[v]} for v in names},
    }


def render_ablation(doc: Mapping[str, Any]) -> str:
    """Markdown: per-attribute balanced accuracy (seed mean) per variant, then means, differences and costs."""

    def pct(x: float | None) -> str:
        return "—" if x is None or x != x else f"{100 * x:.1f}"

    variants = doc["variants"]
    head = ["attribute", *variants]
    rows = [[a, *(pct(variants[v]["per_attribute"][a]) for v in variants)] for a in doc["attributes"]]
    table = render_table(head, rows)
    summary = []
    for v, r in variants.items():
        d = r.get("difference")
        diff = "—" if d is None or d["ci95"] is None else \
            f"{100 * d['mean']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"  # fmt: skip
        sd = "" if r["sd_over_seeds"] is None else f" ± {100 * r['sd_over_seeds']:.1f}"
        cost = [f"{r['parameters'] / 1e6:.2f} M", f"{r['macs'] / 1e6:.0f} M", f"{r['train_seconds']:.0f}"]
        summary.append([v, r["description"], f"{pct(r['mean'])}{sd}", diff, len(r["seeds"]), *cost])
    ref = next(iter(variants))
    summary_table = render_table(["variant", "what", "mean bal. acc % (± sd over seeds)", f"vs {ref} [95 % CI]",
                                  "seeds", "parameters", "MACs / image", "train s"], summary)  # fmt: skip
    note = (f"{doc['images']} test images of {doc['identities']} people; per-attribute values are means over seeds; "
            f"intervals: {doc['bootstrap']} identity-bootstrap resamples shared by every predictor, the difference "
            "averaged over seeds within each resample.")  # fmt: skip
    return f"{table}\n\n{summary_table}\n\n{note}\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m facesearch.benchmarks.attribute_ablation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--data", type=Path, required=True, help="CelebA-format root (train/val/test partitions)")
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"), help="run directory (reused, resumed)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)} (first = reference)"
    )
    ap.add_argument("--iterations", type=int, default=300, help="attribute-stage steps per run")
    ap.add_argument("--mask-iterations", type=int, default=300, help="mask-network steps (learned variant)")
    ap.add_argument("--arch", default="fast")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; valid: {list(VARIANTS)}")
    options = {"arch": args.arch, "width": args.width, "lr": args.lr, "iterations": args.iterations,
               "mask_iterations": args.mask_iterations, "num_workers": args.workers}  # fmt: skip
    paths = train_variants(args.data, args.out, seeds, variants, **options)
    predictors = {v: {s: load_predictor(p) for s, p in runs.items()} for v, runs in paths.items()}
    doc = ablation(predictors, read_split(args.data, "celeba", "test"), args.bootstrap,
                   num_workers=args.workers or 0)  # fmt: skip
    doc.update(data=str(args.data), options=options, seeds=seeds, provenance=provenance())
    atomic_write_text(args.out / "ablation.json", json.dumps(doc, indent=2) + "\n")
    text = render_ablation(doc)
    atomic_write_text(args.out / "ablation.md", text)
    print(text)
    return 0


__all__ = ["VARIANTS", "ablation", "main", "render_ablation", "train_variants"]

if __name__ == "__main__":
    raise SystemExit(main())
