"""Ablation tables of the attribute predictors (ATTRIBUTE_MODELS.md §2, §3): which parts earn their keep, over
several seeds.  Variants (:data:`VARIANTS`, per method), each trained by ``facesearch attributes train`` with the
same data, schedule and seed set; the first is the reference.

MGMTN (``--method mgmtn``):

- ``g2ff`` — the reference: group + global fusion, analytic masks, 128x112 margin crop;
- ``global`` — global features only (no masks: the multi-scale pooled trunk);
- ``groups`` — group features only;
- ``learned`` — G2FF with the learned masks (the mask network, trained first, predicts each face's masks);
- ``template`` — G2FF on the 112x96 crop instead of the margin crop (chin and second chin partly cut off).

MTL-CNN (``--method mtl-cnn``, trained on the ``--train-data`` databases):

- ``fused`` — the reference: every database, learned gates, correlation layer, centre loss;
- ``fixed-gates`` — every gate fixed at 1 (the shared layer reads all of ``f`` for every task);
- ``no-correlation`` — without the correlation layer (its stage 1 is the reference's, reused when present);
- ``no-centre`` — without the centre loss;
- ``single`` — the last database alone (its attributes only: the difference is over the attributes it predicts).

Every predictor of every seed runs on the same test faces (:func:`facesearch.benchmarks.attribute_compare.score_faces`);
per variant the table gives the per-attribute balanced accuracy averaged over seeds, the mean over attributes
(mean ± standard deviation over seeds), and the paired difference to the reference: the seed-averaged difference of
the means over the attributes the variant predicts, with a 95 % interval from identity-bootstrap resamples of the test
people shared by every predictor (the difference is recomputed per resample as the mean over seeds of variant −
reference of the same seed).

Run: ``python -m facesearch.benchmarks.attribute_ablation --data DATA/celeba --out runs/ablation --seeds 0,1,2``
(``--method mtl-cnn --train-data A.csv --train-data B.csv --categorical Hair_Colour`` for MTL-CNN; trained
predictors already in ``--out`` are reused; an interrupted one resumes).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.benchmarks.attribute_compare import _balanced_columns, mean_balanced, read_split, score_faces
from facesearch.model.attributes import AttributeTrainConfig
from facesearch.model.fileio import atomic_write_text, atomic_write_with
from facesearch.model.predictors import AttributePredictor, load_predictor
from facesearch.model.provenance import provenance
from facesearch.model.tables import render_table

log = logging.getLogger(__name__)

#: method -> variant name -> (description, AttributeTrainConfig changes); the first of a method is its reference.
VARIANTS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "mgmtn": {
        "g2ff": ("G2FF, analytic masks, 128x112 (reference)", {}),
        "global": ("global features only", {"fusion": "global"}),
        "groups": ("group features only", {"fusion": "groups"}),
        "learned": ("G2FF, learned masks", {"masks": "learned"}),
        "template": ("G2FF, 112x96 crop", {"crop": "template"}),
    },
    "mtl-cnn": {
        "fused": ("all databases, learned gates, correlation, centre loss (reference)", {}),
        "fixed-gates": ("every gate fixed at 1", {"gates": "fixed"}),
        "no-correlation": ("no correlation layer", {"correlation": False}),
        "no-centre": ("no centre loss", {"centre_loss": 0.0}),
        "single": ("the last database alone", {"databases": "last"}),
    },
}


def _reuse_stage1(reference: Path, run: Path) -> None:
    """Seed ``run`` with the reference run's finished stage-1 checkpoint (MTL-CNN's ``no-correlation`` variant
    trains exactly the same network; training accepts it because stage-2 options are not part of its record)."""
    src, dst = reference / "network" / "checkpoint.safetensors", run / "network" / "checkpoint.safetensors"
    if src.is_file() and not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)

        def copy(tmp: Path) -> None:
            shutil.copyfile(src, tmp)

        atomic_write_with(dst, copy)


def train_variants(
    data: Path | Sequence[Path], out: Path, seeds: Sequence[int], variants: Sequence[str], method: str = "mgmtn",
    **options: Any,
) -> dict[str, dict[int, Path]]:  # fmt: skip
    """Train (or reuse) every variant x seed of ``method`` under ``out/VARIANT/seedS``; ``data``: the training root
    (or, for MTL-CNN, its databases); ``options`` go to every :class:`AttributeTrainConfig`.  Returns variant ->
    seed -> predictor file."""
    from facesearch.model.predictors.training import PREDICTOR_FILE, train_attribute_predictor

    table = VARIANTS[method]
    reference = next(iter(table))
    roots = [Path(data)] if isinstance(data, str | Path) else [Path(d) for d in data]
    paths: dict[str, dict[int, Path]] = {}
    for name in variants:
        changes = dict(table[name][1])
        dbs = roots[-1:] if changes.pop("databases", "all") == "last" else roots
        for seed in seeds:
            run = out / name / f"seed{seed}"
            path = run / PREDICTOR_FILE
            if not path.is_file():
                log.info("training %s %s seed %d", method, name, seed)
                if method == "mtl-cnn" and changes.get("correlation") is False:
                    _reuse_stage1(out / reference / f"seed{seed}", run)
                cfg = AttributeTrainConfig(data=dbs[0], more_data=tuple(dbs[1:]), out=run, method=method, seed=seed,
                                           **{**options, **changes})  # fmt: skip
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
                prob = scored.probabilities
                cols = np.flatnonzero(np.all([np.isfinite(prob[f"{v}@{s}"]).any(0) for s in seeds], 0))
                ref_seed = {s: _balanced_columns(prob[f"{ref}@{s}"], y) for s in common}
                point = np.mean([np.nanmean(per_seed[s][cols]) - np.nanmean(ref_seed[s][cols]) for s in common])
                boot = np.mean(
                    [mean_balanced(prob[f"{v}@{s}"][:, cols], y[:, cols], draws)
                     - mean_balanced(prob[f"{ref}@{s}"][:, cols], y[:, cols], draws) for s in common], 0
                )  # fmt: skip
                ci = [float(np.nanpercentile(boot, 2.5)), float(np.nanpercentile(boot, 97.5))] if len(boot) else None
                row["difference"] = {"versus": ref, "seeds": common, "mean": float(point), "ci95": ci,
                                     "attributes": [scored.attributes[c] for c in cols]}  # fmt: skip
        rows[v] = row
    return {
        "attributes": scored.attributes,
        "images": len(y),
        "identities": scored.n_people,
        "bootstrap": bootstrap,
        "variants": {v: {"description": _description(v), **rows[v]} for v in names},
    }


def _description(variant: str) -> str:
    return next((table[variant][0] for table in VARIANTS.values() if variant in table), variant)


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
    ap.add_argument("--method", choices=list(VARIANTS), default="mgmtn", help="whose ablation")
    ap.add_argument("--train-data", type=Path, action="append", default=None,
                    help="mtl-cnn: a training database (repeat; default: --data)")  # fmt: skip
    ap.add_argument("--categorical", action="append", default=[], help="mtl-cnn: categorical list-CSV column")
    ap.add_argument("--variants", default=None, help="subset of the method's variants (first = reference)")
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
    table = VARIANTS[args.method]
    variants = [v.strip() for v in (args.variants or ",".join(table)).split(",") if v.strip()]
    unknown = [v for v in variants if v not in table]
    if unknown:
        ap.error(f"unknown {args.method} variant(s) {unknown}; valid: {list(table)}")
    options: dict[str, Any] = {"arch": args.arch, "width": args.width, "lr": args.lr, "iterations": args.iterations,
                               "num_workers": args.workers}  # fmt: skip
    if args.method == "mgmtn":
        options["mask_iterations"] = args.mask_iterations
    else:
        options["categorical"] = tuple(args.categorical)
    train_data = args.train_data or [args.data]
    paths = train_variants(train_data, args.out, seeds, variants, args.method, **options)
    predictors = {v: {s: load_predictor(p) for s, p in runs.items()} for v, runs in paths.items()}
    doc = ablation(predictors, read_split(args.data, "celeba", "test"), args.bootstrap,
                   num_workers=args.workers or 0)  # fmt: skip
    doc.update(method=args.method, data=str(args.data), train_data=[str(p) for p in train_data],
               options={k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}, seeds=seeds,
               provenance=provenance())  # fmt: skip
    atomic_write_text(args.out / "ablation.json", json.dumps(doc, indent=2) + "\n")
    text = render_ablation(doc)
    atomic_write_text(args.out / "ablation.md", text)
    print(text)
    return 0


__all__ = ["VARIANTS", "ablation", "main", "render_ablation", "train_variants"]

if __name__ == "__main__":
    raise SystemExit(main())
