"""The main job (`make run`): the whole pipeline that exists, end to end, on the embedded synthetic data.

synthetic faces -> a calibrated attribute predictor trained on the CelebA-style set (MGMTN, Platt-scaled on its
validation people, who also give the statistics filters are costed from) -> per-identity attribute labels for the
CASIA-style set (majority vote) -> two-stage multi-task training of a small Fast-Model -> Dask embedding of the
FaceScrub-style probes and the MegaFace-style distractors into shards, attribute columns from the predictor ->
a flat index of the distractors -> the MegaFace Challenge 1 benchmark of *unseen* people at every distractor list
size (10 … 10,000): unfiltered, with the ``hard`` ``Male`` filter, with the ``confident`` filter on every attribute
(margins chosen for at most 1 % of true mates lost) and with ``soft`` attribute scoring, CMC / ROC plots ->
held-out identification with a probe-relative confident match -> the identity classifier's held-out top-1 and
per-attribute balanced accuracy of the predictor, the labels and the trained model against the generator's truth
-> ``report.md`` + ``report.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.benchmarks.attribute_accuracy import balanced_accuracy  # NaN where a class is absent
from facesearch.benchmarks.megaface_data import AttributeFilter
from facesearch.benchmarks.megaface_run import BenchConfig, embed_inputs, run_megaface
from facesearch.benchmarks.report import footnotes, summary_table
from facesearch.engine.attribute_match import AttributeMatch
from facesearch.engine.search import SearchEngine, format_results
from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, add_shards, build_index
from facesearch.model.attributes import AttributeTrainConfig, LabelConfig, label_identities
from facesearch.model.config import ATTRIBUTES, INPUT_SIZE
from facesearch.model.faces.datasets import FaceDataset, Sample, read_attribute_labels, read_casia, split_holdout
from facesearch.model.faces.synth import SynthConfig, generate_faces
from facesearch.model.fileio import atomic_write_text
from facesearch.model.inference import Embedder, embed_dataset
from facesearch.model.measure import StageTimer
from facesearch.model.predictors.training import train_attribute_predictor
from facesearch.model.provenance import our_version, provenance
from facesearch.model.tables import render_table
from facesearch.model.train import CHECKPOINT, TrainResult, train
from facesearch.model.train_config import TrainConfig, rescale_stage

log = logging.getLogger(__name__)
ENROL_ID_OFFSET = 1 << 40  # enrolled probe images get ids past every distractor's


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo.  The defaults take about 13 minutes on 2 CPU cores (benchmarks/RESULTS.md)."""

    out: Path = Path("runs/demo")
    seed: int = 1
    identities: int = 200
    images_per_identity: int = 10
    celeba_images: int = 3000
    probe_identities: int = 20
    probe_images_per_identity: int = 10
    distractors: int = 10_000
    arch: str = "fast"
    width: float = 0.25
    input_size: tuple[int, int] = (56, 48)
    #: The attribute predictor (``facesearch attributes train --method``): MGMTN is the most accurate at this budget
    #: (benchmarks/RESULTS.md, "Attribute predictors side by side").  The traits are small: it reads the margin crop
    #: of the 112x96 template; identity learning does well at 56x48.
    attribute_method: str = "mgmtn"
    attribute_input_size: tuple[int, int] = INPUT_SIZE
    attribute_iterations: int = 500
    stage1_iterations: int = 800
    stage2_iterations: int = 300
    lr: float = 0.05
    batch_size: int = 48
    device: str = "auto"
    #: The attribute variants of the MegaFace benchmark: ``hard_filter`` decided at 0.5 must agree; the confident
    #: filter on ``filter_attributes`` excludes only confident disagreements, its margins chosen so at most
    #: ``max_mate_loss`` of the true mates are predicted lost; soft scoring weighs their agreement by ``soft_weight``.
    hard_filter: tuple[str, ...] = ("Male",)
    filter_attributes: tuple[str, ...] = ATTRIBUTES
    max_mate_loss: float = 0.01
    soft_weight: float = 0.15
    #: The closing identification query: held-out probe images against the enrolled gallery with this filter.
    search_filter: str = "Male > 0.5"

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))


def _bench_filters(cfg: DemoConfig, validation: dict[str, Any]) -> tuple[AttributeFilter, ...]:
    """The hard, confident and soft variants; the confident and soft ones on the ``filter_attributes`` whose
    validation people held both classes (a tiny run may have none of a rare attribute: no statistics to cost it)."""
    stats = validation.get("attributes", {})
    both = tuple(a for a in cfg.filter_attributes if stats.get(a, {}).get("n_pos") and stats.get(a, {}).get("n_neg"))
    if not both:
        raise ValueError(f"the attribute predictor's validation people hold no attribute of {cfg.filter_attributes} "
                         "in both classes: more CelebA-style images are needed")  # fmt: skip
    return (
        AttributeFilter(cfg.hard_filter),
        AttributeFilter(both, mode="confident", max_mate_loss=cfg.max_mate_loss),
        AttributeFilter(both, mode="soft", weight=cfg.soft_weight),
    )


def _embed(embedder: Embedder, samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings (N, D), attribute probabilities (N, M) and a mask of the readable rows of ``samples``."""
    ds = FaceDataset(samples, size=embedder.model_config.input_size, attributes=embedder.attributes)
    emb, probs, _ = embed_dataset(embedder, ds)
    return emb, probs, np.isfinite(probs).all(1)


def _truth_matrix(samples: Sequence[Sample], truth: dict[str, dict[str, float]], names: Sequence[str]) -> np.ndarray:
    return np.array([[truth[str(s.identity)][a] for a in names] for s in samples], dtype=np.float32)


def _train_configs(cfg: DemoConfig, data: Path) -> tuple[AttributeTrainConfig, TrainConfig]:
    common = dict(arch=cfg.arch, width=cfg.width, batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device)
    attr = AttributeTrainConfig(
        data=data / "celeba", out=cfg.out / "attributes", method=cfg.attribute_method,
        iterations=cfg.attribute_iterations, lr=cfg.lr, input_size=cfg.attribute_input_size,
        **common,  # type: ignore[arg-type]
    )  # fmt: skip
    base = TrainConfig(data=data / "casia", out=cfg.out / "model", labels=cfg.out / "labels.csv",
                       input_size=cfg.input_size, **common)  # type: ignore[arg-type]  # fmt: skip
    stages = (
        rescale_stage(base.stages[0], cfg.stage1_iterations, cfg.lr),
        rescale_stage(base.stages[1], cfg.stage2_iterations, cfg.lr / 10),
    )
    n = cfg.stage1_iterations + cfg.stage2_iterations
    return attr, base.replace(stages=stages, val_every=max(1, n // 4), checkpoint_every=max(1, n // 4))


def _resumed(cfg: TrainConfig) -> TrainConfig:
    """A training stage of an earlier run in the same directory continues from its checkpoint (a finished one just
    re-exports its weights), so ``make run`` twice never trains twice; another config is refused by the resume
    check, naming the fields that differ."""
    return dataclasses.replace(cfg, resume=True) if (cfg.out / CHECKPOINT).is_file() else cfg


def run_demo(cfg: DemoConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every stage and write ``report.json`` / ``report.md`` in ``cfg.out``; returns the report."""
    say = progress or (lambda msg: log.info("%s", msg))
    timer, data = StageTimer(), cfg.out / "data"
    say(f"synthesising faces into {data}")
    with timer("synthesise"):
        synth = generate_faces(SynthConfig(
            out=data, seed=cfg.seed, identities=cfg.identities, images_per_identity=cfg.images_per_identity,
            celeba_images=cfg.celeba_images, probe_identities=cfg.probe_identities,
            probe_images_per_identity=cfg.probe_images_per_identity, distractors=cfg.distractors,
        ))  # fmt: skip
    attr_cfg, train_cfg = _train_configs(cfg, data)
    say(f"training the attribute predictor ({cfg.attribute_method}, {attr_cfg.iterations} steps) and calibrating it")
    with timer("attribute_predictor"):
        attr_run = train_attribute_predictor(attr_cfg)  # resumes its network stage from a checkpoint
    say("labelling the CASIA-style identities by majority vote")
    with timer("label"):
        labelled = label_identities(LabelConfig(attr_run.path, data / "casia", cfg.out / "labels.csv",
                                                device=cfg.device))  # fmt: skip
    say(f"training the multi-task {cfg.arch} model ({train_cfg.total_steps} steps, two stages)")
    with timer("train"):
        model_run = train(_resumed(train_cfg))
    assert model_run.weights is not None, "a complete run exports weights"
    say("embedding the probes and distractors with Dask")
    with timer("embed"):
        probes_dir, distractors_dir = embed_inputs(
            cfg.out, model_run.weights, data / "megaface" / "templatelists" / "facescrub_features_list.json",
            data / "megaface" / "facescrub", data / "megaface" / "facescrub_landmarks.csv",
            data / "megaface" / "templatelists", data / "megaface" / "megaface",
            data / "megaface" / "megaface_landmarks.csv", cfg.device, progress=say, attributes_from=attr_run.path,
        )  # fmt: skip
    say("building a flat index of the distractors")
    with timer("index"):
        shutil.rmtree(cfg.out / "index", ignore_errors=True)  # derived from the shards in a second: rebuilt each run
        info = build_index(distractors_dir, cfg.out / "index", IndexConfig(kind="flat", recall_sample=100))
    filters = _bench_filters(cfg, attr_run.validation)
    say("MegaFace benchmark at every distractor list size")
    with timer("megaface"):
        bench = run_megaface(BenchConfig(
            out=cfg.out / "megaface", probes=probes_dir, probe_list=data / "megaface" / "templatelists" /
            "facescrub_features_list.json", distractors=distractors_dir, distractor_lists=data / "megaface" /
            "templatelists", filters=filters, device=cfg.device,
        ), progress=say)  # fmt: skip
    say(f"identification: held-out probe images against the enrolled gallery, filter {cfg.search_filter!r}")
    with timer("search"):
        search = _search_demo(cfg, probes_dir, cfg.out / "index", model_run.weights, filters[1].attributes)
    say("evaluating the classifier and the attributes")
    with timer("evaluate"):
        evaluation = _evaluate(cfg, data, model_run)
    report = {
        "version": our_version(),
        "provenance": provenance(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "synth": {"images": synth.images, "images_per_s": round(synth.images_per_second, 1)},
        "attribute_predictor": {
            "method": cfg.attribute_method,
            "fingerprint": attr_run.predictor.fingerprint,
            "path": str(attr_run.path),
            "seconds": attr_run.seconds,
            "validation_balanced_accuracy": attr_run.validation["balanced_accuracy"],
        },
        "labels": {"identities": labelled.identities, "skipped": labelled.skipped, "path": str(labelled.labels)},
        "model": {"fingerprint": model_run.fingerprint, "weights": str(model_run.weights), **model_run.final},
        **evaluation,
        "index": {"dir": str(cfg.out / "index"), "kind": info.kind, "rows": info.nb},
        "megaface": {
            "dir": str(cfg.out / "megaface"),
            "summary": "\n\n".join(t for t in (summary_table(bench), footnotes(bench)) if t),
            "results": [_bench_row(r) for r in bench],
        },
        "search": search,
        "seconds": {k: round(v, 2) for k, v in timer.seconds.items()},
    }
    report["losses"] = _loss_curve(model_run)
    atomic_write_text(cfg.out / "report.json", json.dumps(report, indent=2, default=float) + "\n")
    atomic_write_text(cfg.out / "report.md", render_report(report))
    return report


def _evaluate(cfg: DemoConfig, data: Path, model_run: TrainResult) -> dict[str, Any]:
    assert model_run.weights is not None, "a complete run exports weights"
    embedder = Embedder(model_run.weights, device=cfg.device)
    names = list(embedder.attributes)
    truth = read_attribute_labels(data / "casia" / "attributes.csv")
    labels = read_attribute_labels(cfg.out / "labels.csv")
    ids = sorted(truth)
    label_bal = balanced_accuracy(
        np.array([[labels[i][a] for a in names] for i in ids]), np.array([[truth[i][a] for a in names] for i in ids])
    )
    _, val = split_holdout(read_casia(data / "casia"), per_identity=1, seed=cfg.seed)
    _, probs, ok = _embed(embedder, val)
    model_bal = balanced_accuracy((probs[ok] >= 0.5).astype(np.float32), _truth_matrix(val, truth, names)[ok])
    return {
        "label_balanced_accuracy": dict(zip(names, label_bal.round(3).tolist(), strict=True)),
        "model_attribute_balanced_accuracy": dict(zip(names, model_bal.round(3).tolist(), strict=True)),
    }


def _search_demo(
    cfg: DemoConfig, probes_dir: Path, index_dir: Path, weights: Path, match_attributes: tuple[str, ...]
) -> dict[str, Any]:
    """Enrol all but the first image of every probe identity into the distractor index (ids offset past the
    distractors'), then identify the held-out first images in one batched search each: unfiltered, with the literal
    ``search_filter``, and with a probe-relative confident match on ``match_attributes`` (margins for at most
    ``max_mate_loss`` of a person's images predicted lost)."""
    block = shards.read_all(probes_dir)
    ident = np.asarray(block.meta.column("identity").to_pylist(), dtype=object)
    first = np.unique(ident, return_index=True)[1]
    enrol = np.setdiff1d(np.arange(len(ident)), first)
    add_shards(index_dir, probes_dir, id_offset=ENROL_ID_OFFSET, shard_ids=block.ids[enrol])
    engine = SearchEngine.open(index_dir, checkpoint=weights, device=cfg.device)
    names = [str(p) for p in np.asarray(block.meta.column("path").to_pylist())[first]]
    xq = block.xb[first]
    probe = np.stack([block.meta.column(a).to_numpy(zero_copy_only=False)[first] for a in engine.attribute_names], 1)
    match = AttributeMatch(match_attributes, max_mate_loss=cfg.max_mate_loss)
    runs = {
        "none": engine.search(xq, k=5),
        f"filter `{cfg.search_filter}`": engine.search(xq, k=5, filter=cfg.search_filter),
        "confident match": engine.search(xq, k=5, match=match, probe_attributes=probe),
    }
    rows = []
    for what, results in runs.items():
        correct = sum(bool(r.hits) and r.hits[0].identity == ident[q] for q, r in zip(first, results, strict=True))
        passing = [r.passing for r in results if r.passing is not None]
        loss = results[0].expected_recall_loss
        rows.append({"search": what, "rank1_correct": int(correct), "strategy": results[0].strategy,
                     "passing_mean": float(np.mean(passing)) if passing else None,
                     "expected_recall_loss": loss})  # fmt: skip
    matched = runs["confident match"]
    margins = matched[0].margins
    return {
        "filter": cfg.search_filter,
        "match": {"attributes": list(match_attributes), "max_mate_loss": cfg.max_mate_loss, "margins": margins},
        "queries": len(first),
        "enrolled": len(enrol),
        "gallery": int(engine.loaded.ids.size),
        "rows": rows,
        "table": format_results(names[:2], matched[:2], engine.attribute_names, match_attributes),
    }


def _bench_row(r: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one MegaFace result (the full result is the JSON file beside the plots)."""
    c = r["counts"]
    return {"size": r["size"], "filter": None if r["filter"] is None else r["filter"]["description"],
            "mode": None if r["filter"] is None else r["filter"]["mode"],
            "rank1": r["rank1"], "rank1_hits": c["rank1_hits"], "N": c["N"], "n_probes": c["n_probes"],
            "tar_at_far": {str(t["far"]): t["tar"] for t in r["tar_at_far"]},
            "filter_stats": r["filter_stats"]}  # fmt: skip


def _loss_curve(run: TrainResult) -> list[list[float]]:
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines() if line.strip()]
    return [[r["step"], round(r["loss"], 4)] for r in rows if r.get("event") == "train" and "loss" in r]


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def _count(v: float | None) -> str:
    return "all" if v is None else f"{v:,.0f}"


def _search_row(x: dict[str, Any], queries: int) -> list[str]:
    correct = f"{x['rank1_correct']} / {queries}"
    return [x["search"], correct, _count(x["passing_mean"]), _pct(x["expected_recall_loss"])]


def _margins(margins: dict[str, float] | None) -> str:
    return ", ".join(f"{a} {m:.2f}" for a, m in (margins or {}).items()) or "none"


def render_report(r: dict[str, Any]) -> str:
    """The report as Markdown (what `make run` leaves for a person to read)."""
    m, losses, mf, ap = r["model"], r["losses"], r["megaface"]["results"], r["attribute_predictor"]
    names = list(r["label_balanced_accuracy"])
    measures = (
        [["training loss, first -> last logged", f"{losses[0][1]:.3f} -> {losses[-1][1]:.3f}", ""]] if losses else []
    )
    measures.append(
        [
            f"held-out identification top-1 (classifier, {m.get('val_images', 0)} images)",
            f"{m.get('val_top1', float('nan')):.3f}",
            f"{m.get('chance', float('nan')):.4f}",
        ]
    )
    lines = [
        f"# facesearch demo report (version {r['version']})",
        "",
        f"Synthetic data: {r['synth']['images']} images ({r['synth']['images_per_s']} images/s).",
        f"Stage seconds: {r['seconds']}.",
        "",
        render_table(["measure", "value", "chance"], measures),
        "",
        f"## MegaFace Challenge 1 on unseen people ({mf[-1]['n_probes']} probes, {mf[-1]['N']:,} mate pairs)",
        "",
        "Exact counts (protocol: ../shared/MEGAFACE_PROTOCOL.md); each size is its own independent distractor list. "
        "Attribute variants (probabilities from the calibrated attribute predictor): `hard` keeps only distractors "
        "whose decided attributes agree with the probe's; `confident` excludes a distractor only when an attribute "
        "is confidently positive on one side and confidently negative on the other, its margins chosen from the "
        "predictor's validation statistics so at most "
        f"{r['config']['max_mate_loss']:.0%} of the true mates are predicted lost (predicted values in brackets); "
        "`soft` excludes nothing and adds the attributes' agreement to the score.",
        "",
        r["megaface"]["summary"],
        "",
        f"Plots: `{r['megaface']['dir']}/megaface_cmc.png` (CMC), `megaface_roc.png` (ROC), "
        "`megaface_rank1_vs_size.png`; result JSON and devkit JSON beside them.",
        "",
        "## Identification with attribute filters",
        "",
        f"{r['search']['queries']} held-out probe images (one per person) against the index of "
        f"{r['search']['gallery']:,} faces ({r['search']['enrolled']} enrolled images of those people + the "
        f"distractors), in one batched search each: unfiltered, with a literal filter, and keeping per probe only the "
        "faces whose predicted attributes are not confidently opposed to the probe's own (margins "
        f"{_margins(r['search']['match']['margins'])}, chosen for at most {r['config']['max_mate_loss']:.0%} of a "
        "person's images predicted lost).",
        "",
        render_table(
            ["search", "rank-1 correct", "faces searched per query", "expected share of a person's images lost"],
            [_search_row(x, r["search"]["queries"]) for x in r["search"]["rows"]],
        ),
        "",
        "The first two answers of the confident match:",
        "",
        "```",
        r["search"]["table"],
        "```",
        "",
        f"Balanced accuracy per attribute (0.5 = chance): the {ap['method']} attribute predictor on its validation "
        "people (CelebA-style labels), the labels it gave the training people (majority vote, against the "
        "generator's truth), and the trained multi-task model's own attribute head on held-out images.",
        "",
        render_table(
            ["attribute", "attribute predictor (validation)", "labels (per identity)", "multi-task model (held-out)"],
            [
                [
                    a,
                    _fmt(ap["validation_balanced_accuracy"].get(a)),
                    f"{r['label_balanced_accuracy'][a]:.3f}",
                    f"{r['model_attribute_balanced_accuracy'][a]:.3f}",
                ]
                for a in names
            ],
        ),
    ]
    lines += ["", f"Model fingerprint: `{m['fingerprint']}`; weights: `{m['weights']}`.", ""]
    return "\n".join(line for line in lines if line is not None)


__all__ = ["DemoConfig", "balanced_accuracy", "render_report", "run_demo"]
