"""``facesearch bench megaface`` / ``bench plot`` / ``bench export-bins``: the MegaFace harness on the command line
(see :mod:`benchmarks.megaface_run`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from benchmarks import devkit, report
from benchmarks.megaface_data import AttributeFilter
from benchmarks.megaface_run import BenchConfig, embed_inputs, run_megaface
from engine.cli._app import DEVICE_OPTION, user_errors
from engine.cli.bench import bench
from indexer import shards

# The noise lists of the cleaned ("@R") variant, when the repository sits beside the project's shared folder.
NOISE_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "megaface" / "noises"
_DIR = click.Path(path_type=Path, file_okay=False)
_FILE = click.Path(path_type=Path, dir_okay=False, exists=True)


def _sizes(value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(v.replace("_", "")) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 10,100,1000, got {value!r}") from None


@bench.command("megaface")
@click.option("--out", type=_DIR, required=True, help="Result folder (JSON, devkit JSON, report, plots).")
@click.option("--probes", type=_DIR, help="Probe features: a shard directory (facesearch embed / synth features).")
@click.option("--probe-root", type=_DIR, help="Probe features: a devkit .bin tree (with --probe-list).")
@click.option("--probe-list", type=_FILE, help="facescrub_features_list.json: probe order and identities.")
@click.option("--distractors", type=_DIR, help="Distractor features: a shard directory.")
@click.option("--distractor-root", type=_DIR, help="Distractor features: a devkit .bin tree (with --distractor-lists).")
@click.option("--distractor-lists", type=_DIR, help="Folder of <name>_features_list.json_<size>_<set> files (the "
              "official ones are megaface_features_list.json_<size>_<set>).")  # fmt: skip
@click.option("--file-ending", default="_facesearch.bin", show_default=True, help="Devkit feature file ending.")
@click.option(
    "--checkpoint", type=_FILE, help="Embed images first with this model (needs --probe-images, --distractor-images)."
)
@click.option("--probe-images", type=_DIR, help="Probe image root (paths of --probe-list are relative to it).")
@click.option("--probe-landmarks", type=_FILE, help="Landmarks CSV for the probe images (else YuNet detection).")
@click.option("--distractor-images", type=_DIR, help="Distractor image root (paths of the lists are relative to it).")
@click.option("--distractor-landmarks", type=_FILE, help="Landmarks CSV for the distractor images.")
@click.option("--sizes", help="Distractor sizes, e.g. 10,100,1000 (default: every listed size and every standard "
              "size the distractors can fill).")  # fmt: skip
@click.option("--set", "set_number", type=int, default=1, show_default=True, help="Distractor list set number.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of drawn distractor lists (recorded). A "
              "drawn list never holds a probe image or another image of a probe identity.")  # fmt: skip
@click.option("--allow-probe-overlap", is_flag=True, help="Evaluate a given distractor list that holds probe images "
              "(refused by default: each outscores its own mates); reported as a warning.")  # fmt: skip
@click.option("--probe-name", help="Probe set name in output file names (default: from the --probe-list file name as "
              "the devkit takes it, e.g. facescrub; else facescrub).")  # fmt: skip
@click.option("--distractor-name", help="Distractor set name in output file names (default: from the list file names, "
              "e.g. megaface; else megaface).")  # fmt: skip
@click.option("--algorithm", help="Algorithm name in file names and tables (default: from --file-ending / facesearch).")
@click.option("--tie-rule", type=click.Choice(["mate", "distractor"]), default="mate", show_default=True,
              help="Who wins a tie between a distractor and the mate (ties are always counted).")  # fmt: skip
@click.option("--cleaned", is_flag=True, help="The cleaned (@R) variant: needs --probe-noise and --distractor-noise.")
@click.option("--probe-noise", type=_FILE, help="facescrub_noises.txt [default: ../shared/data/megaface/noises/].")
@click.option("--distractor-noise", type=_FILE, help="megaface_noises.txt [default: ../shared/data/megaface/noises/].")
@click.option("--filter", "filter_attrs", help="Attribute-filtered variant too: comma-separated attributes that must "
              "agree between probe and distractor, e.g. Male or Male,Big_Nose.")  # fmt: skip
@click.option("--filter-threshold", type=float, default=0.5, show_default=True, help="Attribute decision threshold.")
@click.option("--far-max", type=float, default=1e-3, show_default=True,
              help="Largest FAR of the ROC when the negatives do not all fit in memory.")  # fmt: skip
@DEVICE_OPTION
@user_errors
def megaface_command(sizes: str | None, filter_attrs: str | None, filter_threshold: float, checkpoint: Path | None,
                     probe_images: Path | None, probe_landmarks: Path | None, distractor_images: Path | None,
                     distractor_landmarks: Path | None, **opts: object) -> None:  # fmt: skip
    """MegaFace Challenge 1: exact CMC (rank-1) and ROC (TAR at FAR 1e-6 …) for each distractor size."""
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
            if opts[key] is None and (NOISE_DIR / name).is_file():
                opts[key] = NOISE_DIR / name
    flt = None
    if filter_attrs:
        flt = AttributeFilter(tuple(a.strip() for a in filter_attrs.split(",") if a.strip()), filter_threshold)
    cfg = BenchConfig(sizes=_sizes(sizes), filter=flt, **opts)  # type: ignore[arg-type]
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


@bench.command("plot")
@click.argument("results", nargs=-1, required=True, type=_FILE)
@click.option("--out", type=_DIR, required=True, help="Folder for the summary table and the PNG plots.")
@click.option("--stem", default="megaface", show_default=True, help="File name stem.")
@user_errors
def plot_command(results: tuple[Path, ...], out: Path, stem: str) -> None:
    """Overlay one or several result files: CMC (log rank), ROC (log FAR), rank-1 vs size, summary table."""
    loaded = report.load_results(list(results))
    paths = report.write_report(loaded, out, stem)
    _echo_table(loaded)
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")


@bench.command("export-bins")
@click.option("--shards", "shard_dir", type=_DIR, required=True, help="A shard directory of features.")
@click.option("--out", type=_DIR, required=True, help="Root of the devkit feature tree to write.")
@click.option("--file-ending", default="_facesearch.bin", show_default=True, help="e.g. _myalgo.bin")
@user_errors
def export_bins_command(shard_dir: Path, out: Path, file_ending: str) -> None:
    """Write a shard directory's features as devkit .bin files (<out>/<path><file-ending>) for the official devkit."""
    n = 0
    for block in shards.iter_shards(shard_dir, 65536, columns=["path"]):
        devkit.write_feature_tree(out, block.meta.column("path").to_pylist(), block.xb.astype("float32"), file_ending)
        n += len(block)
    click.echo(f"wrote {n:,} feature files under {out} (algorithm name {devkit.algorithm_name(file_ending)!r})")
