"""The tables of ``facesearch ablate``: ``D/tables/<table>.md`` and ``.json`` (the paper's number beside ours, the
paired difference to the table's reference row with its interval), CMC and ROC overlays per table, and
``D/REPORT.md`` collecting them with the command that made them.

Ours is the mean ± standard deviation over seeds (the paper: one run, no error bar).  Rank-1 is the exact harness
count at the largest distractor list; TAR is at the smallest of the paper's FARs (1e-6 … 1e-3) the negatives
support (FAR f needs f * N_neg >= 1).  Differences are paired (same seed, same probes, same pairs): rank-1 with a
bootstrap 95 % interval over probe identities and seeds, LFW over folds and seeds, attributes (Table 4) over probe
identities and the multi-task model's seeds; TAR differences get mean ± sd over seeds only (the threshold depends on
every negative pair, so an identity bootstrap would have to recompute it from all of them).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.benchmarks import report
from facesearch.benchmarks.ablate_plan import PAPER_TABLE4, TABLES, Row, Tier, table_rows
from facesearch.benchmarks.ablate_shared import Shared
from facesearch.benchmarks.ablate_stats import (
    attribute_rates,
    mean_sd,
    paired_attribute_difference,
    paired_ratio_difference,
)
from facesearch.benchmarks.megaface_exact import NAMED_FARS, floor_m
from facesearch.model.fileio import atomic_write_text
from facesearch.model.provenance import provenance
from facesearch.model.tables import render_table

KIND = "facesearch.ablate_table"
Results = Mapping[tuple[str, int], dict[str, Any]]
_DASH = "—"


def _pct(mean: float | None, sd: float | None = None) -> str:
    if mean is None:
        return _DASH
    return f"{100 * mean:.2f}" + (f" ± {100 * sd:.2f}" if sd is not None else "")


def _delta(d: Mapping[str, Any] | None) -> str:
    if not d or d.get("estimate") is None:
        return _DASH
    ci = f" [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]" if d.get("lo") is not None else ""
    sd = f" ± {100 * d['sd']:.2f}" if d.get("sd") is not None else ""
    return f"{100 * d['estimate']:+.2f}{sd}{ci}"


def _column(x: np.ndarray, j: int | None) -> np.ndarray:
    """Attribute column ``j`` of rates (..., m), or (``j`` None) their mean over the attributes that are defined."""
    if j is not None:
        return x[..., j]
    with warnings.catch_warnings():  # no attribute with both classes: NaN, shown as a dash
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=-1)


def _num(x: Any) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _paper(value: float | None) -> str:
    return _DASH if value is None else f"{value:.2f}"


def _runs(results: Results, row: Row, seeds: Sequence[int]) -> dict[int, dict[str, Any]]:
    if row.variant is None:
        return {}
    return {s: results[(row.variant.key, s)] for s in seeds if (row.variant.key, s) in results}


def choose_far(n_neg: int, roc: Mapping[str, Sequence[Any]]) -> float | None:
    """The smallest of the paper's FARs that ``n_neg`` negatives support, else the smallest supported FAR > 0 of
    the harness's ROC grid (None when there is none)."""
    named = [f for f in NAMED_FARS if floor_m(f, n_neg) >= 1]
    if named:
        return named[0]
    grid = [f for f, ok in zip(roc["far"], roc["supported"], strict=True) if ok and f > 0]
    return min(grid) if grid else None


def tar_at(result: Mapping[str, Any], far: float | None) -> float | None:
    """TAR of a run's largest size at ``far`` (None when not measured there)."""
    roc = result["largest"]["roc"]
    for f, t, ok in zip(roc["far"], roc["tar"], roc["supported"], strict=True):
        if far is not None and ok and t is not None and np.isclose(f, far, rtol=1e-9, atol=0.0):
            return float(t)
    return None


def _stats(runs: Mapping[int, dict[str, Any]], far: float | None) -> dict[str, Any]:
    per = {"rank1": {s: r["largest"]["harness_rank1_hits"] / r["largest"]["N"] for s, r in runs.items()},
           "tar": {s: tar_at(r, far) for s, r in runs.items()},
           "lfw": {s: r["lfw"]["mean_accuracy"] for s, r in runs.items()}}  # fmt: skip
    out = {}
    for name, values in per.items():
        mean, sd = mean_sd(list(values.values()))
        out[name] = {"mean": mean, "sd": sd, "seeds": {str(s): v for s, v in values.items()}}
    return out


def _difference(v: Mapping[int, dict[str, Any]], r: Mapping[int, dict[str, Any]], far: float | None,
                resamples: int) -> dict[str, Any] | None:  # fmt: skip
    """Paired differences v − r over their common seeds (see the module docstring)."""
    seeds = sorted(set(v) & set(r))
    if not seeds:
        return None
    lv, lr = [v[s]["largest"] for s in seeds], [r[s]["largest"] for s in seeds]
    if any(a["identities"] != b["identities"] for a, b in zip(lv, lr, strict=True)):
        raise ValueError("paired runs disagree on the probe identities: they were not made on the same shared data")
    rank1 = paired_ratio_difference(np.array([a["hits"] for a in lv]), np.array([b["hits"] for b in lr]),
                                    np.array(lv[0]["mates"]), resamples)  # fmt: skip
    folds_v = np.array([v[s]["lfw"]["fold_accuracies"] for s in seeds])
    folds_r = np.array([r[s]["lfw"]["fold_accuracies"] for s in seeds])
    lfw = paired_ratio_difference(folds_v, folds_r, np.ones(folds_v.shape[1]), resamples)
    tars = [(tar_at(v[s], far), tar_at(r[s], far)) for s in seeds]
    mean, sd = mean_sd([a - b for a, b in tars if a is not None and b is not None])
    return {"seeds": seeds, "rank1": rank1, "lfw": lfw, "tar": {"estimate": mean, "sd": sd}}


def identity_table(
    name: str, results: Results, seeds: Sequence[int], tier: Tier, only: Sequence[str] = ()
) -> dict[str, Any]:
    """The document of one identity table (rank-1, TAR, LFW); see the module docstring."""
    rows = table_rows(name, only)
    runs = {row.name: _runs(results, row, seeds) for row in rows}
    first = next((r for rr in runs.values() for r in rr.values()), None)
    far = None if first is None else choose_far(first["largest"]["N_neg"], first["largest"]["roc"])
    doc_rows = []
    for row in rows:
        ref = runs.get(row.reference) if row.reference else None
        diff = _difference(runs[row.name], ref, far, tier.bootstrap) if ref else None
        ours = _stats(runs[row.name], far) if runs[row.name] else None
        doc_rows.append({"name": row.name, "key": None if row.variant is None else row.variant.key,
                         "paper": dict(row.paper), "reference": row.reference, "ours": ours,
                         "difference": diff})  # fmt: skip
    largest = first["largest"] if first else {}
    return {"kind": KIND, "table": name, "title": TABLES[name].title, "source": TABLES[name].source,
            "tier": tier.name, "seeds": list(seeds), "far": far, "size": largest.get("size"), "N": largest.get("N"),
            "N_neg": largest.get("N_neg"), "probe_identities": len(largest.get("identities", [])),
            "bootstrap": tier.bootstrap, "rows": doc_rows, "provenance": provenance()}  # fmt: skip


def render_identity(doc: Mapping[str, Any]) -> str:
    far = doc["far"]
    far_name = _DASH if far is None else f"{far:g}"
    head = ["row", "variant", "paper rank-1", "rank-1", "Δ rank-1 [95 % CI]", "paper TAR@1e-6",
            f"TAR@{far_name}", "Δ TAR", "paper LFW", "LFW", "Δ LFW [95 % CI]"]  # fmt: skip
    body = []
    for r in doc["rows"]:
        ours, diff = r["ours"] or {}, r["difference"] or {}
        cell = {k: _pct(ours[k]["mean"], ours[k]["sd"]) if ours else "not run" for k in ("rank1", "tar", "lfw")}
        body.append([r["name"], r["key"] or _DASH, _paper(r["paper"].get("rank1")), cell["rank1"],
                     _delta(diff.get("rank1")), _paper(r["paper"].get("tar")), cell["tar"], _delta(diff.get("tar")),
                     _paper(r["paper"].get("lfw")), cell["lfw"], _delta(diff.get("lfw"))])  # fmt: skip
    title = f"## {doc['table']}: {doc['title']}\n\n{doc['source']}.\n\n"
    return title + render_table(head, body, left=2) + "\n\n" + _notes(doc)


def _notes(doc: Mapping[str, Any]) -> str:
    if doc["size"] is None or doc["far"] is None:
        return "No run of this table has finished.\n"
    lines = [
        f"- Ours: mean ± sd over seeds {doc['seeds']} (%, the paper's: one run). Rank-1 at {doc['size']:,} "
        f"distractors ({doc['N']:,} mate pairs of {doc['probe_identities']} probe people; the paper: 10^6).",
        f"- TAR at FAR {doc['far']:g}: "
        + (
            f"the smallest of 1e-6 … 1e-3 the {doc['N_neg']:,} negative pairs support "
            + ("(FAR 1e-6 needs >= 10^6; n/a here)." if doc["far"] != 1e-6 else "(the paper's).")
            if doc["far"] in NAMED_FARS
            else f"the {doc['N_neg']:,} negative pairs support none of 1e-6 … 1e-3; the smallest FAR of the harness's "
            "grid they do."
        ),
        f"- Δ: paired difference to the row's reference (percentage points, mean over common seeds); 95 % interval: "
        f"{doc['bootstrap']} bootstrap resamples of probe identities and seeds (rank-1) or LFW folds and seeds "
        f"(LFW); TAR: ± sd over seeds, no interval.",
    ]
    return "\n".join(lines) + "\n"


def attribute_table(
    results: Results, seeds: Sequence[int], shared: Shared, tier: Tier, only: Sequence[str] = ()
) -> dict[str, Any]:
    """Table 4: the teacher's and the multi-task head's accuracy and balanced accuracy per attribute on the probe
    images, the paired difference with its interval; ``skipped`` says why when it cannot be made."""
    base = {"kind": KIND, "table": "t4", "title": TABLES["t4"].title, "source": TABLES["t4"].source,
            "tier": tier.name, "seeds": list(seeds), "bootstrap": tier.bootstrap,
            "provenance": provenance()}  # fmt: skip
    student_row = next((r for r in table_rows("t4", only) if r.variant is not None), None)
    runs = {} if student_row is None else _runs(results, student_row, seeds)
    runs = {s: r for s, r in runs.items() if r.get("attributes")}
    if shared.truth is None or not runs or student_row is None or student_row.variant is None:
        why = ("the probe images have no attribute labels (synthetic truth, or attribute columns in the list CSV)"
               if shared.truth is None else "the multi-task model's runs have not finished")  # fmt: skip
        return {**base, "skipped": why}
    names = [a for a in PAPER_TABLE4 if a in runs[min(runs)]["attributes"]["attributes"]]
    cols = [runs[min(runs)]["attributes"]["attributes"].index(a) for a in names]
    student = np.array([np.asarray(r["attributes"]["counts"])[:, cols] for r in runs.values()])
    teacher = shared.teacher
    t_counts = None
    if teacher is not None:
        t_counts = np.asarray(teacher["counts"])[:, [teacher["attributes"].index(a) for a in names]]
    acc, bal = attribute_rates(student)  # (S, m)
    t_rates = None if t_counts is None else attribute_rates(t_counts)  # (m,) each
    rows = []
    for j, a in enumerate([*names, "mean"]):
        col = j if a != "mean" else None
        teacher_cell = {"accuracy": None, "balanced": None} if t_rates is None else {
            "accuracy": _num(_column(t_rates[0], col)), "balanced": _num(_column(t_rates[1], col))}  # fmt: skip
        rows.append({"attribute": a, "paper": list(PAPER_TABLE4[a]), "teacher": teacher_cell,
                     "student": {"accuracy": mean_sd(np.atleast_1d(_column(acc, col)).tolist()),
                                 "balanced": mean_sd(np.atleast_1d(_column(bal, col)).tolist())}})  # fmt: skip
    diff = None if t_counts is None else paired_attribute_difference(student, t_counts, tier.bootstrap)
    n_images = int(np.asarray(runs[min(runs)]["attributes"]["counts"])[:, :, [1, 3]].sum(axis=(0, 2)).max())
    return {**base, "attributes": names, "rows": rows, "difference": diff, "images": n_images,
            "identities": len(runs[min(runs)]["attributes"]["identities"]), "student": student_row.variant.key,
            "teacher": None if teacher is None else {k: teacher[k] for k in ("key", "fingerprint",
                                                                               "path")}}  # fmt: skip


def render_attributes(doc: Mapping[str, Any]) -> str:
    title = f"## t4: {doc['title']}\n\n{doc['source']}.\n\n"
    if "skipped" in doc:
        return title + f"Skipped: {doc['skipped']}.\n"
    head = ["attribute", "paper MOON acc", "paper multi-task acc", "teacher acc", "teacher bal. acc",
            "multi-task acc", "multi-task bal. acc", "Δ bal. acc [95 % CI]", "Δ acc [95 % CI]"]  # fmt: skip
    body, diff = [], doc["difference"]
    for j, r in enumerate(doc["rows"]):
        d = {}
        for what in ("balanced", "accuracy"):
            if diff is not None:
                x = diff[what]
                est = (x["estimate"][j], x["lo"][j], x["hi"][j]) if r["attribute"] != "mean" else (
                    x["mean_estimate"], x["mean_lo"], x["mean_hi"])  # fmt: skip
                d[what] = _delta({"estimate": est[0], "lo": est[1], "hi": est[2]})
        body.append([r["attribute"], _paper(r["paper"][0]), _paper(r["paper"][1]), _pct(r["teacher"]["accuracy"]),
                     _pct(r["teacher"]["balanced"]), _pct(*r["student"]["accuracy"]), _pct(*r["student"]["balanced"]),
                     d.get("balanced", _DASH), d.get("accuracy", _DASH)])  # fmt: skip
    teacher = doc["teacher"]
    who = f"the `{teacher['key']}` predictor that labelled the training people" if teacher else "none given"
    notes = (f"- {doc['images']} probe images of {doc['identities']} people, never trained on; truth: the generator's "
             f"(synthetic) or the list's labels. Teacher: {who} (one model). Multi-task: `{doc['student']}`'s own "
             f"attribute head, mean ± sd over seeds {doc['seeds']}.\n- The paper's are plain accuracies on 1,000 "
             f"FaceScrub images; balanced accuracy beside, since a rare attribute (Chubby, Double_Chin) scores high "
             f"accuracy by never being predicted.\n- Δ: multi-task − teacher (percentage points); 95 % interval: "
             f"{doc['bootstrap']} bootstrap resamples of probe identities (the same for both) and "
             f"seeds.\n")  # fmt: skip
    return title + render_table(head, body) + "\n\n" + notes


def _plots(doc: Mapping[str, Any], runs_dir: Path, results: Results, out: Path) -> list[Path]:
    """CMC and ROC overlays of the table's rows (their first seed's harness result at the largest size)."""
    curves = []
    for row in doc["rows"]:
        seeds = sorted(int(s) for s in ((row["ours"] or {}).get("rank1") or {}).get("seeds", {}))
        if row["key"] is None or not seeds:
            continue
        run = results[(row["key"], seeds[0])]
        r = json.loads((runs_dir / row["key"] / f"seed{seeds[0]}" / run["largest"]["result"]).read_text())
        curves.append({**r, "label": f"{row['name']} (seed {seeds[0]})"})
    if not curves:
        return []
    title = f"{doc['table']}: {doc['title']}"
    return [report.plot_cmc(curves, out / f"{doc['table']}_cmc.png", title),
            report.plot_roc(curves, out / f"{doc['table']}_roc.png", title)]  # fmt: skip


def write_tables(out: Path, tables: Sequence[str], results: Results, seeds: Sequence[int], shared: Shared, tier: Tier,
                 only: Sequence[str], command: str) -> dict[str, Path]:  # fmt: skip
    """Write every table of ``tables`` into ``out / tables`` and ``out / REPORT.md``; returns {table: .md path}."""
    folder = out / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    written, sections = {}, []
    for name in tables:
        if TABLES[name].kind == "attributes":
            doc, text, plots = attribute_table(results, seeds, shared, tier, only), "", []
            text = render_attributes(doc)
        else:
            doc = identity_table(name, results, seeds, tier, only)
            text, plots = render_identity(doc), _plots(doc, out / "runs", results, folder)
        text += "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
        atomic_write_text(folder / f"{name}.json", json.dumps(doc, indent=1, default=float) + "\n")
        atomic_write_text(folder / f"{name}.md", text)
        written[name] = folder / f"{name}.md"
        sections.append(text.replace("](", "](tables/"))
    atomic_write_text(out / "REPORT.md", _report(tables, seeds, shared, tier, command, sections))
    return written


def _report(tables: Sequence[str], seeds: Sequence[int], shared: Shared, tier: Tier, command: str,
            sections: Sequence[str]) -> str:  # fmt: skip
    rec = shared.record
    sizes = ", ".join(f"{k} {v}" for k, v in tier.to_dict().items() if k != "name")
    head = [
        "# facesearch ablate: the paper's Tables " + ", ".join(tables),
        "",
        "```bash",
        command,
        "```",
        "",
        f"Data: {rec['data']} (data seed {rec['seed']}); tier `{tier.name}`: {sizes}. Seeds {list(seeds)}. "
        f"{rec['identities']} training people; {rec['probes']} probe images of {rec['probe_identities']} people and "
        f"{rec['distractors']:,} distractors, none trained on; LFW-style pairs of {rec['lfw_people']} of those people "
        f"(10 folds). Shared inputs: `shared/shared.json` (with SHA-256s); per run: "
        f"`runs/<variant>/seed<s>/result.json`.",
        "",
    ]
    return "\n".join(head) + "\n" + "\n".join(sections)


__all__ = ["KIND", "attribute_table", "choose_far", "identity_table", "render_attributes", "render_identity",
           "tar_at", "write_tables"]  # fmt: skip
