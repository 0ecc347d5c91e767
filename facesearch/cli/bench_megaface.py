"""``facesearch bench megaface`` / ``bench plot`` / ``bench export-bins``: the MegaFace harness on the command line
(see :mod:`facesearch.benchmarks.megaface_run`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from facesearch.benchmarks import devkit, report
from facesearch.benchmarks.devkit_export import export_bins
from facesearch.benchmarks.megaface import SCREENS
from facesearch.benchmarks.megaface_data import FILTER_MODES, AttributeFilter
from facesearch.benchmarks.megaface_run import BenchConfig, embed_inputs, run_megaface
from facesearch.cli._app import DEVICE_OPTION, config_option, finite, user_errors
from facesearch.indexer import shards
from facesearch.model.assets import noise_list

_DIR = click.Path(path_type=Path, file_okay=False)
_FILE = click.Path(path_type=Path, dir_okay=False, exists=True)


_IN_DIR = click.Path(path_type=Path, file_okay=False, exists=True)
_option = functools.partial(config_option, BenchConfig)


def _sizes(value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        sizes = tuple(int(v.replace("_", "")) for v in value.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"expected comma-separated integers >= 1 (distractor counts) such as 10,100,1000, "
                                 f"got {value!r}", param_hint="'--sizes'")  # fmt: skip
    return sizes


def _file_ending(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A devkit feature file ending names files beside each image: no folder part, and an algorithm name in it."""
    if "/" in value or "\\" in value:
        raise click.BadParameter(f"{value!r} must not contain a path separator (e.g. _myalgo.bin)", ctx, param)
    try:
        devkit.algorithm_name(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None
    return value


def _algorithm(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            devkit.devkit_result_name("probe", "distractor", value, 1, 1)  # the devkit's rule for the name
        except ValueError as e:
            raise click.BadParameter(str(e), ctx, param) from None
    return value


def _stem(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value or "/" in value or "\\" in value or value in (".", ".."):
        raise click.BadParameter(f"{value!r} must be a file name stem such as megaface (no folder part)", ctx, param)
    return value


def _attribute_filters(
    value: str | None, threshold: float, modes: str, margin: float | None, max_mate_loss: float | None,
    soft_weight: float | None,
) -> tuple[AttributeFilter, ...]:  # fmt: skip
    """One filter per mode of ``--filter-mode`` (comma-separated), each on the ``--filter`` attributes."""
    wanted = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in wanted if m not in FILTER_MODES]
    if not wanted or bad or len(set(wanted)) != len(wanted):
        raise click.BadParameter(f"expected distinct modes from {', '.join(FILTER_MODES)} (comma-separated), got "
                                 f"{modes!r}", param_hint="'--filter-mode'")  # fmt: skip
    tuned = margin is not None or max_mate_loss is not None or soft_weight is not None
    if not value:
        if wanted != ["hard"] or tuned:
            raise click.UsageError("--filter-mode, --filter-margin, --max-mate-loss and --soft-weight need --filter "
                                   "ATTRIBUTES")  # fmt: skip
        return ()
    names = tuple(a.strip() for a in value.split(",") if a.strip())
    if not names:
        raise click.BadParameter(f"expected comma-separated attribute names such as Male,Big_Nose, got {value!r}",
                                 param_hint="'--filter'")  # fmt: skip
    if "confident" in wanted and margin is None and max_mate_loss is None:
        raise click.UsageError("--filter-mode confident needs --max-mate-loss RATE (or --filter-margin M)")
    if margin is not None and max_mate_loss is not None:
        raise click.UsageError("give one of --filter-margin and --max-mate-loss, not both")
    if "confident" not in wanted and (margin is not None or max_mate_loss is not None):
        raise click.UsageError("--filter-margin and --max-mate-loss need --filter-mode confident")
    if ("soft" in wanted) != (soft_weight is not None):
        raise click.UsageError("--filter-mode soft needs --soft-weight W, and --soft-weight needs --filter-mode soft")
    margins = None if margin is None else (margin,)
    return tuple(
        AttributeFilter(names, threshold, m, margins if m == "confident" else None,
                        max_mate_loss if m == "confident" else None, soft_weight if m == "soft" else None)
        for m in wanted
    )  # fmt: skip


def _check_inputs(cfg: BenchConfig) -> None:
    """What can be checked before any work (the harness finds these out only after loading the probes): shard
    manifests that read, agree on d and hold the --filter attributes; distractor rows enough for every size without a
    list; a devkit distractor root with lists of the set."""
    manifests = {what: shards.read_manifest(path) for what, path in (("probes", cfg.probes),
                 ("distractors", cfg.distractors)) if path is not None}  # fmt: skip
    if len(manifests) == 2 and manifests["probes"].d != manifests["distractors"].d:
        raise ValueError(f"the probes {cfg.probes} have d={manifests['probes'].d} but the distractors "
                         f"{cfg.distractors} have d={manifests['distractors'].d}")  # fmt: skip
    for what, manifest in manifests.items():
        wanted = dict.fromkeys(a for f in cfg.filters for a in f.attributes)
        missing = [a for a in wanted if a not in manifest.attributes]
        if missing:
            raise ValueError(f"--filter: the {what} {getattr(cfg, what)} have no attribute(s) {missing}; they hold "
                             f"{list(manifest.attributes)}")  # fmt: skip
    found = devkit.find_distractor_lists(cfg.distractor_lists) if cfg.distractor_lists is not None else {}
    if "distractors" in manifests:
        rows = manifests["distractors"].totals["ok_rows"]
        for size in cfg.sizes:
            if size > rows and (size, cfg.set_number) not in found:
                raise ValueError(f"--sizes: cannot draw {size:,} distractors from the {rows:,} rows of "
                                 f"{cfg.distractors} (give a list for this size or more distractor rows)")  # fmt: skip
    if cfg.distractor_root is not None and cfg.distractor_lists is not None:
        if not any(n == cfg.set_number for _, n in found):
            raise ValueError(f"{cfg.distractor_lists}: no <name>_features_list.json_<size>_{cfg.set_number} distractor "
                             f"list of set {cfg.set_number} (a devkit distractor root needs them)")  # fmt: skip


@click.command("megaface")
@click.option("--out", type=_DIR, required=True, help="Result folder (JSON, devkit JSON, report, plots).")
@click.option("--probes", type=_IN_DIR, help="Probe features: a shard directory (facesearch embed / synth features).")
@click.option("--probe-root", type=_IN_DIR, help="Probe features: a devkit .bin tree (with --probe-list).")
@click.option("--probe-list", type=_FILE, help="facescrub_features_list.json: probe order and identities.")
@click.option("--distractors", type=_IN_DIR, help="Distractor features: a shard directory.")
@click.option("--distractor-root", type=_IN_DIR,
              help="Distractor features: a devkit .bin tree (with --distractor-lists).")  # fmt: skip
@click.option("--distractor-lists", type=_IN_DIR, help="Folder of <name>_features_list.json_<size>_<set> files (the "
              "official ones are megaface_features_list.json_<size>_<set>).")  # fmt: skip
@_option("--file-ending", callback=_file_ending, help="Devkit feature file ending.")
@click.option(
    "--checkpoint", type=_FILE, help="Embed images first with this model (needs --probe-images, --distractor-images)."
)
@click.option("--probe-images", type=_IN_DIR, help="Probe image root (paths of --probe-list are relative to it).")
@click.option("--probe-landmarks", type=_FILE, help="Landmarks CSV for the probe images (else YuNet detection).")
@click.option("--distractor-images", type=_IN_DIR,
              help="Distractor image root (paths of the lists are relative to it).")  # fmt: skip
@click.option("--distractor-landmarks", type=_FILE, help="Landmarks CSV for the distractor images.")
@click.option("--sizes", help="Distractor sizes, e.g. 10,100,1000 (default: every listed size and every standard "
              "size the distractors can fill).")  # fmt: skip
@_option("--set", "set_number", type=click.IntRange(min=1), help="Distractor list set number.")
@_option("--seed", type=click.IntRange(min=0),
         help="Seed of drawn distractor lists (recorded). A drawn list never holds a probe image or another image of a "
              "probe identity.")  # fmt: skip
@click.option("--allow-probe-overlap", is_flag=True, help="Evaluate a given distractor list that holds probe images "
              "(refused by default: each outscores its own mates); reported as a warning.")  # fmt: skip
@click.option("--probe-name", help="Probe set name in output file names (default: from the --probe-list file name as "
              "the devkit takes it, e.g. facescrub; else facescrub).")  # fmt: skip
@click.option("--distractor-name", help="Distractor set name in output file names (default: from the list file names, "
              "e.g. megaface; else megaface).")  # fmt: skip
@click.option("--algorithm", callback=_algorithm,
              help="Algorithm name in file names and tables (default: from --file-ending / facesearch).")  # fmt: skip
@_option("--tie-rule", type=click.Choice(["mate", "distractor"]),
         help="Who wins a tie between a distractor and the mate (ties are always counted).")  # fmt: skip
@click.option("--cleaned", is_flag=True, help="The cleaned (@R) variant: needs --probe-noise and --distractor-noise.")
@click.option(
    "--probe-noise", type=_FILE, help="facescrub_noises.txt [default: data/megaface/noises/ under the shared folder]."
)
@click.option(
    "--distractor-noise",
    type=_FILE,
    help="megaface_noises.txt [default: data/megaface/noises/ under the shared folder].",
)
@click.option("--filter", "filter_attrs", help="Attribute-filtered variant too: comma-separated attributes that must "
              "agree between probe and distractor, e.g. Male or Male,Big_Nose.")  # fmt: skip
@config_option(AttributeFilter, "--filter-threshold", field="threshold", callback=finite,
               type=click.FloatRange(0, 1, min_open=True, max_open=True),
               help="hard mode: attribute decision threshold (0 < t < 1).")  # fmt: skip
@click.option("--filter-mode", default="hard", show_default=True, metavar="hard|confident|soft",
              help="hard: decided sides must agree; confident: exclude only when both sides are confident and "
                   "disagree; soft: exclude nothing, score (1-w) cos + w * attribute agreement. Several, "
                   "comma-separated (e.g. hard,confident), run side by side.")  # fmt: skip
@click.option("--max-mate-loss", type=click.FloatRange(0, 1, max_open=True), default=None, callback=finite,
              help="confident mode: choose the margins from the attribute predictor's validation statistics so at "
                   "most this fraction of true mates is predicted lost, e.g. 0.01.")  # fmt: skip
@click.option(
    "--filter-margin",
    type=click.FloatRange(0, 0.5),
    default=None,
    callback=finite,
    help="confident mode: a fixed margin m (confident = p > 1-m or p < m) instead of --max-mate-loss.",
)
@click.option("--soft-weight", type=click.FloatRange(0, 1, min_open=True), default=None, callback=finite,
              help="soft mode: the weight w of the attribute agreement in the score, e.g. 0.1.")  # fmt: skip
@_option("--far-max", type=click.FloatRange(0, 1, min_open=True), callback=finite,
         help="Largest FAR of the ROC when the negatives do not all fit in memory (0 < FAR <= 1).")  # fmt: skip
@_option("--screen", type=click.Choice(list(SCREENS)),
         help="How the probe x distractor products are screened before exact re-scoring (counts are identical): "
              "int8 products (on a CPU with VNNI / AMX-INT8, 3.5-5x the float32 rate), none (float32 products of "
              "every pair), auto (int8 where the CPU has int8 dot-product units).")  # fmt: skip
@DEVICE_OPTION
@user_errors
def megaface_command(sizes: str | None, filter_attrs: str | None, filter_threshold: float, filter_mode: str,
                     max_mate_loss: float | None, filter_margin: float | None, soft_weight: float | None,
                     checkpoint: Path | None,
                     probe_images: Path | None, probe_landmarks: Path | None, distractor_images: Path | None,
                     distractor_landmarks: Path | None, **opts: object) -> None:  # fmt: skip
    """MegaFace Challenge 1: exact CMC (rank-1) and ROC (TAR at FAR 1e-6 …) for each distractor size."""
    _sizes(sizes)  # a bad --sizes is refused before any embedding
    filters = _attribute_filters(filter_attrs, filter_threshold, filter_mode, filter_margin, max_mate_loss, soft_weight)
    if checkpoint is not None:
        if probe_images is None or distractor_images is None or opts["probe_list"] is None:
            raise click.UsageError("--checkpoint needs --probe-images, --probe-list and --distractor-images")
        if opts["distractor_lists"] is None:
            raise click.UsageError("--checkpoint needs --distractor-lists (which distractor images to embed)")
        opts["probes"], opts["distractors"] = embed_inputs(
            Path(str(opts["out"])), checkpoint, Path(str(opts["probe_list"])), probe_images, probe_landmarks,
            Path(str(opts["distractor_lists"])), distractor_images, distractor_landmarks, str(opts["device"]),
            progress=lambda msg: click.echo(f"[embed] {msg}"))  # fmt: skip
    if opts["cleaned"]:
        for key, name in (("probe_noise", "facescrub_noises.txt"), ("distractor_noise", "megaface_noises.txt")):
            if opts[key] is None:
                opts[key] = noise_list(name)
    cfg = BenchConfig(sizes=_sizes(sizes), filters=filters, **opts)  # type: ignore[arg-type]
    _check_inputs(cfg)
    results = run_megaface(cfg, progress=lambda msg: click.echo(f"[megaface] {msg}"))
    click.echo("")
    _echo_table(results)
    click.echo(f"\nreport: {cfg.out / 'megaface_summary.md'} (results, devkit JSON and plots in {cfg.out})")


def _echo_table(results: Sequence[dict[str, Any]]) -> None:
    """The summary table, its footnote, and every warning again (after the table, where a reader looks)."""
    click.echo(report.summary_table(results, fmt="text"))
    if note := report.footnotes(results):
        click.echo(f"\n{note}")
    for warning in report.warnings_of(results):
        click.echo(f"\nWARNING: {warning}")


@click.command("plot")
@click.argument("results", nargs=-1, required=True, type=_FILE)
@click.option("--out", type=_DIR, required=True, help="Folder for the summary table and the PNG plots.")
@config_option(report.write_report, "--stem", callback=_stem, help="File name stem.")
@user_errors
def plot_command(results: tuple[Path, ...], out: Path, stem: str) -> None:
    """Overlay one or several result files: CMC (log rank), ROC (log FAR), rank-1 vs size, summary table."""
    loaded = _load_results(results)
    paths = report.write_report(loaded, out, stem)
    _echo_table(loaded)
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")


def _load_results(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """:func:`facesearch.benchmarks.report.load_results`, with a file that is not UTF-8 text named (its decoding error
    does not say which file)."""
    loaded = []
    for path in paths:
        try:
            loaded += report.load_results([path])
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: cannot read a result file: not UTF-8 text ({e.reason})") from None
    return loaded


@click.command("export-bins")
@click.option("--shards", "shard_dir", type=_IN_DIR, required=True, help="A shard directory of features.")
@click.option("--out", type=_DIR, required=True, help="Root of the devkit feature tree to write.")
@config_option(export_bins, "--file-ending", callback=_file_ending, help="e.g. _myalgo.bin")
@user_errors
def export_bins_command(shard_dir: Path, out: Path, file_ending: str) -> None:
    """Write a shard directory's features as devkit .bin files (<out>/<path><file-ending>) for the official devkit."""
    n = export_bins(shard_dir, out, file_ending)
    click.echo(f"wrote {n:,} feature files under {out} (algorithm name {devkit.algorithm_name(file_ending)!r})")
