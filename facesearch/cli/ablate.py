"""``facesearch ablate``: options -> :class:`facesearch.benchmarks.ablate.AblateConfig` ->
:func:`facesearch.benchmarks.ablate.run_ablation` -> the report's location and the tables."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from facesearch.benchmarks.ablate import AblateConfig, run_ablation
from facesearch.benchmarks.ablate_plan import TABLE_CHOICES, TIERS
from facesearch.cli._app import DEVICE_OPTION, config_option, user_errors

_option = functools.partial(config_option, AblateConfig)


@click.command("ablate")
@click.argument("tables", nargs=-1, required=True, type=click.Choice(TABLE_CHOICES))
@_option("--data", metavar="synth|LIST",
         help="'synth' (the synthetic set, made at the tier's sizes) or an identity-labelled list CSV "
              "(path,identity[,x1,y1..x5,y5][,attribute columns]), split by person into training, probe and "
              "distractor people.")  # fmt: skip
@_option("--tier", type=click.Choice(list(TIERS)),
         help="Sizes: smoke (seconds, for tests), cpu (a 2-core machine: minutes per variant), gpu (112x96, width "
              "1.0, 1M distractors; one GPU).")  # fmt: skip
@_option("--seeds", type=click.IntRange(min=1), help="Training seeds 0 .. N-1, the same for every variant (paired).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The ablation folder: shared/, runs/, tables/, REPORT.md. Running the same command again resumes "
                   "it.")  # fmt: skip
@click.option("--resume", is_flag=True,
              help="Reuse --out's finished runs although the tables or seeds differ (its data and tier must "
                   "not).")  # fmt: skip
@click.option("--predictor", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A list CSV only: an attribute predictor (facesearch attributes train) labelling its training "
                   "people by majority vote, and Table 4's teacher [default: the list's own attribute "
                   "columns].")  # fmt: skip
@_option("--data-seed", type=click.IntRange(min=0), help="Seed of the synthetic data or of the split by person.")
@click.option("--only", default=None, hidden=True,
              help="Comma-separated variant keys (fast-head1-all, ...) to restrict the tables' rows to (for "
                   "tests).")  # fmt: skip
@DEVICE_OPTION
@user_errors
def ablate_command(tables: tuple[str, ...], only: str | None, resume: bool, **opts: object) -> None:
    """Reproduce the paper's Tables 2-7 with paired seeds, mean and sd over seeds and bootstrap intervals.

    TABLES: t2t3 (Fast / Full, with and without attributes), t4 (attribute accuracy: the labelling teacher vs the
    multi-task head), t5 (building block), t6 (last-layer configuration), t7 (attribute groups), or all. Each variant
    is trained once per seed however many tables list it; every variant of a seed starts from the same initial weights
    where the networks agree and sees the same batches. Writes OUT/tables/<table>.md and .json (the paper's number
    beside ours, the paired difference to the table's reference row with a bootstrap 95 % interval, CMC / ROC
    overlays) and OUT/REPORT.md. Interrupted runs resume from their checkpoints.
    """
    keys = tuple(k.strip() for k in only.split(",") if k.strip()) if only else ()
    cfg = AblateConfig(tables=tables, only=keys, **opts)  # type: ignore[arg-type]
    result = run_ablation(cfg, resume=resume, progress=lambda msg: click.echo(f"[ablate] {msg}"))
    click.echo("")
    for path in result.tables.values():
        click.echo(path.read_text(encoding="utf-8"))
    click.echo(f"report: {result.report} ({len(result.trained)} runs trained now, {len(result.reused)} reused)")
