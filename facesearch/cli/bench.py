"""``facesearch bench``: the benchmark harness (MegaFace Challenge 1, LFW verification, attribute accuracy, plots,
speed runs).

The group lives here; each benchmark's command lives in its own module (``bench_*.py``), imported when it runs."""

from __future__ import annotations

import click

from facesearch.cli._app import LazyCommand, LazyGroup

#: The ``facesearch bench`` commands, imported when they run (see :class:`facesearch.cli._app.LazyGroup`).
BENCH_COMMANDS = {
    "attributes": LazyCommand("facesearch.cli.bench_more:attributes_command", "Per-attribute accuracy of predicted "
                              "attributes: one network against CelebA-format labels (the paper's Table 4), or "
                              "several attribute predictors side by side on one identity-disjoint split."),
    "export-bins": LazyCommand("facesearch.cli.bench_megaface:export_bins_command", "Write a shard directory's "
                               "features as devkit .bin files (<out>/<path><file-ending>) for the official devkit."),
    "lfw": LazyCommand("facesearch.cli.bench_more:lfw_command", "Ten-fold LFW verification accuracy (thresholds "
                       "chosen on the other nine folds; mean ± standard error)."),
    "lfw-pairs": LazyCommand("facesearch.cli.bench_more:lfw_pairs_command", "Build an LFW-format verification set "
                             "from the ORL faces or any identity-labelled images (for `bench lfw`)."),
    "megaface": LazyCommand("facesearch.cli.bench_megaface:megaface_command", "MegaFace Challenge 1: exact CMC "
                            "(rank-1) and ROC (TAR at FAR 1e-6 …) for each distractor size."),
    "plot": LazyCommand("facesearch.cli.bench_megaface:plot_command", "Overlay one or several result files: CMC (log "
                        "rank), ROC (log FAR), rank-1 vs size, summary table."),
    "speed": LazyCommand("facesearch.cli.bench_speed:speed", "Speed benchmarks against the machine's measured GEMM "
                         "rate and memory bandwidth (see benchmarks/RESULTS.md)."),
}  # fmt: skip


@click.group("bench", cls=LazyGroup, lazy_subcommands=BENCH_COMMANDS)
def bench() -> None:
    """MegaFace-style identification/verification, LFW verification, attribute accuracy, and result plots."""
