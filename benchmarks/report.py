"""Tables and plots for MegaFace-style result files (``kind: facesearch.megaface_result``).

Mirrors the figures of Wang et al. (ICMR 2017): rank-1 identification with 1M distractors (Table 2), TAR at
FAR = 1e-6 (Table 3), CMC curves (Fig. 6) and ROC curves (Fig. 7), plus MegaFace's rank-1 vs number of distractors.
Curves are drawn as post-steps: between two stored points the conservative (lower) reading holds, which is also the
right reading of the devkit's compressed curves.  A FAR below 1/N_neg (N_neg = probes x distractors) is not
measurable — not even one false accept fits — so tables print it as ``n/a (<1/N_neg)`` with a footnote and the ROC
plot leaves it out.  Pure library: no printing, every file written atomically.
"""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from facesearch.model.fileio import atomic_write_text, atomic_write_with
from facesearch.model.tables import FORMATS, render_table

log = logging.getLogger(__name__)

KIND = "facesearch.megaface_result"
FORMAT_VERSIONS = (1,)
REPORT_FARS = (1e-6, 1e-5, 1e-4, 1e-3)
_REQUIRED = (
    "kind", "format_version", "label", "size", "cleaned", "filter", "counts", "counts.N", "counts.n_distractors",
    "counts.rank1_hits", "rank1", "cmc", "cmc.ranks", "cmc.rates", "roc", "roc.far", "roc.tar", "tar_at_far",
    "filter_stats",
)  # fmt: skip
_FILTER_STATS = ("mates_excluded_fraction", "distractors_removed_fraction", "speedup")
_DASH = "—"
NA_FAR = "n/a (<1/N_neg)"
LIST_RULE = (
    "MegaFace distractors are other people: a drawn list never holds a probe image or another image of a probe "
    "identity. A given list holding probe images is refused unless --allow-probe-overlap (each would outscore its own "
    "mates); one holding other images of probe identities is evaluated, as the devkit does, with a warning (the "
    "official lists hold a few: the noise lists and --cleaned are the published remedy)."
)
_FIGSIZE = (7.0, 5.0)
_DPI = 120


def _get(r: dict[str, Any], dotted: str) -> Any:
    """``r["a"]["b"]`` for ``"a.b"``; KeyError when any step is absent or not an object."""
    value: Any = r
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(dotted)
        value = value[key]
    return value


def validate_result(r: Any, source: str = "<result>") -> dict[str, Any]:
    """Check that ``r`` is a MegaFace result with every key this module reads; returns it unchanged.

    Raises ValueError naming ``source`` (a file name) and the bad or missing key."""
    if not isinstance(r, dict):
        raise ValueError(f"{source}: a result must be a JSON object, got {type(r).__name__}")
    if r.get("kind") != KIND:
        raise ValueError(f"{source}: key 'kind' is {r.get('kind')!r}, expected {KIND!r}")
    for key in _REQUIRED + tuple(f"filter_stats.{k}" for k in _FILTER_STATS if r.get("filter_stats") is not None):
        try:
            _get(r, key)
        except KeyError:
            raise ValueError(f"{source}: missing key {key!r}") from None
    if r["format_version"] not in FORMAT_VERSIONS:
        raise ValueError(f"{source}: format_version {r['format_version']!r} is not one of {FORMAT_VERSIONS}")
    for curve, (xs, ys) in (("cmc", ("ranks", "rates")), ("roc", ("far", "tar"))):
        if len(r[curve][xs]) != len(r[curve][ys]) or not r[curve][xs]:
            raise ValueError(f"{source}: {curve}.{xs} and {curve}.{ys} must be non-empty and of equal length")
    if not isinstance(r["tar_at_far"], list) or any("far" not in e or "tar" not in e for e in r["tar_at_far"]):
        raise ValueError(f"{source}: key 'tar_at_far' must be a list of objects with 'far' and 'tar'")
    return r


def load_results(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Read and validate result JSON files, in the order given."""
    results = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read a result file: {e}") from e
        results.append(validate_result(data, str(path)))
    return results


def result_label(r: dict[str, Any]) -> str:
    """The legend/row name: ``label``, `` @R`` when noise-cleaned, `` [<filter description>]`` when filtered."""
    text = str(r["label"]) + (" @R" if r["cleaned"] else "")
    if r["filter"]:
        desc = r["filter"].get("description") or "+".join(r["filter"].get("attributes", [])) or "filtered"
        text += f" [{desc}]"
    return text


def tar_at(r: dict[str, Any], far: float) -> float | None:
    """TAR at the reported ``far`` (``tar_at_far`` entry), or None when absent or null (too few negatives)."""
    for entry in r["tar_at_far"]:
        if entry["tar"] is not None and np.isclose(entry["far"], far, rtol=1e-6, atol=0.0):
            return float(entry["tar"])
    return None


def _far_measurable(far: float, n_neg: int) -> bool:
    """FAR 0, or floor(far * N_neg) >= 1 computed exactly (1e-6 * 10^6 is 1, not 0.999…)."""
    return far == 0 or int(Fraction(repr(float(far))) * n_neg) >= 1


def _n_neg(r: dict[str, Any]) -> int | None:
    """N_neg of a harness result, for files written before rows carried ``supported`` (recognised by the harness's
    ``roc.m`` column); None for anything else, whose FARs are then taken as measured."""
    n_neg = r["counts"].get("N_neg")
    return int(n_neg) if isinstance(n_neg, int) and "m" in r["roc"] else None


def tar_supported(r: dict[str, Any], far: float) -> bool:
    """Whether TAR at ``far`` is measurable, i.e. far >= 1/N_neg: the ``tar_at_far`` entry's ``supported`` flag,
    else (older harness files) computed from ``counts.N_neg``."""
    for entry in r["tar_at_far"]:
        if "supported" in entry and np.isclose(entry["far"], far, rtol=1e-6, atol=0.0):
            return bool(entry["supported"])
    n_neg = _n_neg(r)
    return True if n_neg is None else _far_measurable(far, n_neg)


def _tar_cell(r: dict[str, Any], far: float) -> str:
    return _pct(tar_at(r, far)) if tar_supported(r, far) else NA_FAR


def _pct(x: float | None, digits: int = 2) -> str:
    return _DASH if x is None else f"{100.0 * x:.{digits}f} %"


def _with_prediction(measured: float | None, predicted: float | None) -> str:
    return _pct(measured, 1) + ("" if predicted is None else f" (pred. {_pct(predicted, 1)})")


def summary_table(results: Sequence[dict[str, Any]], fmt: str = "markdown") -> str:
    """One row per result: label, distractors, rank-1 with its exact count, TAR at each of ``REPORT_FARS``; and,
    when any result is filtered, the fraction of mates the filter excluded, of distractors it removed (each with
    the filter's predicted value when the attribute columns carry validation statistics), its speed-up."""
    filtered = any(r["filter_stats"] is not None for r in results)
    headers = ["Method", "Distractors", "Rank-1", *(f"TAR@{f:.0e}".replace("e-0", "e-") for f in REPORT_FARS)]
    if filtered:
        headers += ["Mates excluded", "Distractors removed", "Speed-up"]
    rows = []
    for r in results:
        c = r["counts"]
        rank1 = f"{_pct(r['rank1'])} ({c['rank1_hits']:,} / {c['N']:,})"
        row = [result_label(r), f"{c['n_distractors']:,}", rank1, *(_tar_cell(r, f) for f in REPORT_FARS)]
        if filtered:
            fs = r["filter_stats"] or {}
            pred = fs.get("predicted") or {}
            mates = _with_prediction(fs.get("mates_excluded_fraction"), pred.get("mates_lost"))
            row += [mates, _with_prediction(fs.get("distractors_removed_fraction"), pred.get("distractors_removed"))]
            row += [f"{fs['speedup']:.2f}×" if fs and fs.get("speedup") is not None else _DASH]
        rows.append(row)
    return render_table(headers, rows, fmt)


def _by_label_and_size(results: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """``{label: {size: result}}`` in first-appearance order; two results for one label and size are ambiguous."""
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        cells = table.setdefault(result_label(r), {})
        if int(r["size"]) in cells:
            raise ValueError(f"two results for {result_label(r)!r} at size {r['size']:,}: pass one per label and size")
        cells[int(r["size"])] = r
    return table


def size_table(results: Sequence[dict[str, Any]], fmt: str = "markdown") -> str:
    """MegaFace's "identification rate vs #distractors" table (rows = methods, columns = distractor list sizes,
    cells = rank-1), followed by the same layout for TAR at FAR = 1e-6."""
    table = _by_label_and_size(results)
    sizes = sorted({int(r["size"]) for r in results})
    headers = ["Method", *(f"{s:,}" for s in sizes)]
    blocks = []
    for title, value in (
        ("Rank-1 identification rate vs number of distractors", lambda r: r["rank1"]),
        ("TAR at FAR = 1e-6 vs number of distractors", lambda r: _tar_cell(r, 1e-6)),
    ):
        rows = [
            [label, *(_cell(value, cells[s]) if s in cells else _DASH for s in sizes)] for label, cells in table.items()
        ]
        heading = f"**{title}**" if fmt == "markdown" else title
        blocks.append(f"{heading}\n\n{render_table(headers, rows, fmt)}")
    return "\n\n".join(blocks)


def _cell(value: Any, r: dict[str, Any]) -> str:
    v = value(r)
    return v if isinstance(v, str) else _pct(v)


def footnotes(results: Sequence[dict[str, Any]]) -> str:
    """The note under a table that prints ``n/a (<1/N_neg)`` (empty when no cell does)."""
    limits: dict[int, int] = {}
    for r in results:
        if any(not tar_supported(r, f) for f in REPORT_FARS) and r["counts"].get("N_neg"):
            limits[int(r["counts"]["n_distractors"])] = int(r["counts"]["N_neg"])
    if not limits:
        return ""
    where = ", ".join(f"1/N_neg = {1 / n:.1e} with {d:,} distractors" for d, n in sorted(limits.items()))
    return (f"{NA_FAR}: the FAR is below 1/N_neg (N_neg = probes x distractors impostor pairs: {where}), so not "
            f"even one false accept fits and the TAR there is not measured (the threshold would be the single highest "
            f"impostor score). More distractors resolve lower FARs; the ROC plot starts at 1/N_neg.")  # fmt: skip


def warnings_of(results: Sequence[dict[str, Any]]) -> list[str]:
    """Every distinct warning the results carry (given lists that overlap the probes, mislabelled list sizes)."""
    return list(dict.fromkeys(w for r in results for w in r.get("warnings") or ()))


def list_notes(results: Sequence[dict[str, Any]]) -> list[str]:
    """One line per distractor list used: given (its file) or drawn (seed, candidates, what was excluded)."""
    lines: dict[str, None] = {}
    for r in results:
        rec = r.get("distractor_list") or {}
        size = f"{int(r['size']):,} (set {r.get('set', 1)})"
        if rec.get("source") == "drawn":
            text = f"size {size}: **drawn** (no list given) with seed {rec.get('seed')}"
            if "candidates" in rec:
                text += (f" from {rec['candidates']:,} candidates of the {rec['rows']:,} rows of "
                         f"`{rec['drawn_from']}` (excluded {rec['excluded_probe_images']:,} probe images and "
                         f"{rec['excluded_probe_identities']:,} other images of probe identities)")  # fmt: skip
            text += f", written to `{rec['written']}`" if rec.get("written") else ""
        elif rec.get("source"):
            text = f"size {size}: given list `{rec['source']}` ({rec.get('count', 0):,} paths)"
        else:
            continue
        lines.setdefault(text + ".", None)
    return list(lines)


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the interior points of runs of equal ``y``: the drawn curve is unchanged, and an exact 1M-rank CMC
    shrinks to its distinct rates."""
    if len(y) < 3:
        return x, y
    keep = np.ones(len(y), dtype=bool)
    keep[1:-1] = (y[1:-1] != y[:-2]) | (y[1:-1] != y[2:])
    return x[keep], y[keep]


def _legend(r: dict[str, Any]) -> str:
    """A plot legend entry: the label with a short filter name (the full description is the table's), wrapped."""
    text = str(r["label"]) + (" @R" if r["cleaned"] else "")
    flt = r["filter"]
    if flt:
        attrs = flt.get("attributes") or []
        what = " & ".join(attrs) if len(attrs) <= 2 else f"{len(attrs)} attributes"
        mode = flt.get("mode", "hard")
        extra = {"confident": f", mate loss ≤ {flt['max_mate_loss']:g}" if flt.get("max_mate_loss") is not None
                 else "", "soft": f", w {flt.get('weight')}"}.get(mode, "")  # fmt: skip
        text += f" [{mode}: {what}{extra}]"
    return textwrap.fill(f"{text} ({r['counts']['n_distractors']:,} distractors)", 60)


def _new_axes(results: Sequence[dict[str, Any]], title: str | None, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    if not results:
        raise ValueError("no results to plot")
    # Figure without pyplot: headless (Agg canvas on save), no global figure registry to leak or close.
    fig = Figure(figsize=_FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.5)
    ax.grid(True, which="minor", alpha=0.15)
    if title:
        ax.set_title(title)
    return fig, ax


def _save(fig: Figure, out: Path) -> Path:
    """Save ``fig`` as a PNG at ``out`` atomically (temporary in the same folder, then ``os.replace``)."""
    out = Path(out)
    atomic_write_with(out, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))
    log.info("wrote %s", out)
    return out


def plot_cmc(results: Sequence[dict[str, Any]], out: Path, title: str | None = None) -> Path:
    """CMC curves (Fig. 6): identification rate (%) vs rank = 0-based rank + 1, log x, one line per result."""
    fig, ax = _new_axes(results, title, "Rank", "Identification rate (%)")
    for r in results:
        x, y = _thin(np.asarray(r["cmc"]["ranks"], dtype=np.float64) + 1, np.asarray(r["cmc"]["rates"], np.float64))
        ax.plot(x, 100.0 * y, drawstyle="steps-post", label=_legend(r))
    ax.set_xlim(1, max(r["counts"]["n_distractors"] + 1 for r in results))
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, out)


def measured_roc(r: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The ROC points a plot may draw: FAR > 0 and measurable (far >= 1/N_neg, the ``roc.supported`` column, else
    computed for older harness files); (far, tar) float64."""
    far = np.asarray(r["roc"]["far"], dtype=np.float64)
    tar = np.asarray([np.nan if t is None else t for t in r["roc"]["tar"]], dtype=np.float64)
    if "supported" in r["roc"]:
        ok = np.asarray(r["roc"]["supported"], dtype=bool)
    else:
        n_neg = _n_neg(r)
        ok = np.asarray([n_neg is None or _far_measurable(f, n_neg) for f in far.tolist()], dtype=bool)
    keep = ok & (far > 0) & np.isfinite(tar)
    return far[keep], tar[keep]


def plot_roc(results: Sequence[dict[str, Any]], out: Path, title: str | None = None) -> Path:
    """ROC curves (Fig. 7): TAR (%) vs FAR on a log axis, dotted marker at FAR = 1e-6.  Only measured points are
    drawn (FAR = 0 and FARs below 1/N_neg are left out; the legend then says where the curve starts)."""
    fig, ax = _new_axes(results, title, "False accept rate", "True accept rate (%)")
    for r in results:
        x, y = measured_roc(r)
        label = _legend(r)
        if r["counts"].get("N_neg") and len(x) < int(np.count_nonzero(np.asarray(r["roc"]["far"], np.float64) > 0)):
            label += f", FAR >= 1/N_neg = {1 / r['counts']['N_neg']:.1e}"
        x, y = _thin(x, y)
        ax.plot(x, 100.0 * y, drawstyle="steps-post", label=label)
    ax.axvline(1e-6, linestyle=":", color="0.3", label="FAR = 1e-6")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, out)


def plot_rank1_vs_size(results: Sequence[dict[str, Any]], out: Path, title: str | None = None) -> Path:
    """MegaFace's rank-1 identification rate (%) vs number of distractors (log x), one line per method."""
    fig, ax = _new_axes(results, title, "Number of distractors", "Rank-1 identification rate (%)")
    for label, cells in _by_label_and_size(results).items():
        sizes = sorted(cells)
        ax.plot(sizes, [100.0 * cells[s]["rank1"] for s in sizes], marker="o", label=label)
    ax.set_ylim(0, 100)
    ax.legend(loc="lower left", fontsize="small")
    return _save(fig, out)


def write_report(results: Sequence[dict[str, Any]], out_dir: Path, stem: str = "megaface") -> dict[str, Path]:
    """Write ``<stem>_summary.md`` (both tables, linking the plots), ``<stem>_cmc.png``, ``<stem>_roc.png`` and,
    when more than one distractor size is present, ``<stem>_rank1_vs_size.png``.  Returns the paths by kind
    (``summary``, ``cmc``, ``roc``, ``rank1_vs_size``)."""
    if not results:
        raise ValueError("no results to report")
    for i, r in enumerate(results):
        validate_result(r, f"<result {i}>")
    out_dir = Path(out_dir)
    paths = {
        "cmc": plot_cmc(results, out_dir / f"{stem}_cmc.png", "CMC"),
        "roc": plot_roc(results, out_dir / f"{stem}_roc.png", "ROC"),
    }
    if len({r["size"] for r in results}) > 1:
        paths["rank1_vs_size"] = plot_rank1_vs_size(results, out_dir / f"{stem}_rank1_vs_size.png", "Rank-1 vs size")
    figures = "\n".join(f"![{kind}]({p.name})" for kind, p in paths.items())
    warnings = "".join(f"- **Warning:** {w}\n" for w in warnings_of(results))
    notes = footnotes(results)
    lists = "".join(f"- {line}\n" for line in list_notes(results))
    text = (
        "# MegaFace results\n\n"
        + (f"## Warnings\n\n{warnings}\n" if warnings else "")
        + f"## Summary\n\n{summary_table(results)}\n\n"
        f"Rank-1 counts are over N ordered (gallery, probe) mate pairs; TAR uses the exact threshold at each FAR.\n\n"
        + (f"{notes}\n\n" if notes else "")
        + f"## By number of distractors\n\n{size_table(results)}\n\n"
        + (f"## Distractor lists\n\n{lists}\n{LIST_RULE}\n\n" if lists else "")
        + f"## Figures\n\n{figures}\n"
    )
    paths["summary"] = out_dir / f"{stem}_summary.md"
    atomic_write_text(paths["summary"], text)
    return paths


__all__ = [
    "FORMATS",
    "KIND",
    "NA_FAR",
    "REPORT_FARS",
    "footnotes",
    "list_notes",
    "load_results",
    "measured_roc",
    "plot_cmc",
    "plot_rank1_vs_size",
    "plot_roc",
    "result_label",
    "size_table",
    "summary_table",
    "tar_at",
    "tar_supported",
    "validate_result",
    "warnings_of",
    "write_report",
]
