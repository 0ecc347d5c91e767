"""``facesearch train``: options -> :func:`facesearch.model.train_config.resolve_train_config` ->
:func:`facesearch.model.train.train` -> summary.

Precedence of settings (later wins): the run's own ``train_config.json`` (only with ``--resume``), ``--config``
JSON, command-line options.  So ``facesearch train --out RUN --resume`` continues a run without repeating options.
Every option therefore defaults to None (unset); the defaults its help shows are TrainConfig's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from facesearch.cli._app import DEVICE_OPTION, StepBar, default_of, parse_size, user_errors
from facesearch.model.config import ARCHS, ATTRIBUTE_GROUPS, ATTRIBUTES, HEADS
from facesearch.model.device import PRECISIONS
from facesearch.model.losses import ATTRIBUTE_LOSSES
from facesearch.model.train import train
from facesearch.model.train_config import MissingDataError, TrainConfig, resolve_train_config
from facesearch.model.trainer_data import DATA_FORMATS


def _opt(name: str, type_: Any, help_: str, *decls: str) -> Any:
    return click.option(name, *decls, type=type_, default=None, help=help_)


def _d(name: str) -> str:
    """TrainConfig's default of field ``name`` as the help text shows it (the options default to None: unset options
    leave the config file's or the resumed run's values in place)."""
    value = default_of(TrainConfig, name)
    return "x".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


_IDENTITIES_HELP = ("Identity file ('file identity' lines, as identity_CelebA.txt) naming the images of a flat --data "
                    "folder, or replacing a CelebA root's.")  # fmt: skip
_DETECTIONS_HELP = "Face detection cache to use and extend [default: OUT/detections.jsonl]; runs may share one."
_CROP_STORE_HELP = (
    "Directory of the aligned crops (uint8, memory-mapped): built on first use, then steps read crops from it "
    "instead of decoding and aligning images (the same batches); runs may share one."
)
_SKIPPED_HELP = ("Stop when more than this fraction of the steps is skipped (< 2 readable images) "
                 f"[default: {_d('max_skipped_steps')}].")  # fmt: skip
_ATTRIBUTES_HELP = f"Comma-separated attributes of the head, of {', '.join(ATTRIBUTES)} [default: all seven]."
_NO_ATTRIBUTES_HELP = ("The paper's model without attributes: lambda1 = 0 in every stage, the schedule unchanged; no "
                       "--labels needed (the head is kept, untrained).")  # fmt: skip
_GROUPS = "; ".join(f"{k} = {','.join(v)}" for k, v in ATTRIBUTE_GROUPS.items() if k != "all")
_GROUP_HELP = f"The paper's Table 7 attribute group instead of --attributes: {_GROUPS}; all = the seven."
_FORMAT_HELP = f"Layout of --data [default: {_d('data_format')}; flat with --identities]."

_OPTIONS = [
    _opt("--data", click.Path(path_type=Path), "Training data: CASIA folder, list CSV, CelebA root or image folder."),
    _opt("--format", click.Choice(DATA_FORMATS), _FORMAT_HELP, "data_format"),
    _opt("--identities", click.Path(path_type=Path), _IDENTITIES_HELP),
    _opt("--detections", click.Path(path_type=Path), _DETECTIONS_HELP),
    _opt("--crop-store", click.Path(file_okay=False, path_type=Path), _CROP_STORE_HELP),
    _opt(
        "--min-readable",
        float,
        f"Stop unless this fraction of the listed images is readable [default: {_d('min_readable')}].",
    ),
    _opt("--max-skipped-steps", float, _SKIPPED_HELP),
    _opt("--labels", click.Path(path_type=Path), "Per-identity attribute labels CSV (identity,<attr>,...)."),
    _opt("--attributes", str, _ATTRIBUTES_HELP),
    _opt("--attribute-group", click.Choice(list(ATTRIBUTE_GROUPS)), _GROUP_HELP),
    _opt("--out", click.Path(path_type=Path), f"Run directory (checkpoint, metrics, config) [default: {_d('out')}]."),
    _opt("--config", click.Path(path_type=Path), "JSON file of TrainConfig fields (options override it).", "config"),
    _opt("--arch", click.Choice(ARCHS), f"Building block: full, fast or variant [default: {_d('arch')}]."),
    _opt(
        "--head",
        click.Choice([str(h) for h in HEADS]),
        f"Attribute head, Fig. 9 configuration [default: {_d('head')}].",
    ),
    _opt("--width", float, f"Filter-count multiplier (small models for CPU demos) [default: {_d('width')}]."),
    _opt("--input-size", str, f"Aligned crop HEIGHTxWIDTH [default: {_d('input_size')}].", "input_size"),
    _opt("--embedding-dim", int, f"Identity feature size [default: {_d('embedding_dim')}]."),
    _opt("--stage1-iterations", int, "Stage 1 length (identity only; paper 70000). Milestones scale along."),
    _opt("--stage2-iterations", int, "Stage 2 length (fine-tune with attributes; paper 30000)."),
    _opt("--lr", float, "Stage 1 base learning rate (paper 0.01)."),
    _opt("--finetune-lr", float, "Stage 2 base learning rate (paper 0.001)."),
    _opt("--batch-size", int, "Images per step [default: 40 full, 48 fast/variant]."),
    _opt(
        "--attribute-loss",
        click.Choice(ATTRIBUTE_LOSSES),
        f"mse (paper) or moon (re-balanced) [default: {_d('attribute_loss')}].",
    ),
    _opt("--moon-target", float, f"MOON target positive rate per attribute [default: {_d('moon_target')} = balanced]."),
    _opt(
        "--holdout",
        int,
        f"Images per identity held out for validation [default: {_d('holdout_per_identity')}].",
        "holdout_per_identity",
    ),
    _opt(
        "--precision",
        click.Choice(PRECISIONS),
        "fp32, bf16 autocast, or auto (bf16 on GPUs and on CPUs with AMX or AMD avx512_bf16) "
        f"[default: {_d('precision')}].",
    ),
    _opt("--workers", int, "DataLoader worker processes [default: min(2, CPUs)].", "num_workers"),
    _opt("--seed", int, f"Seed of initialisation, data order, flips and dropout [default: {_d('seed')}]."),
    _opt(
        "--val-every",
        int,
        f"Validate on the held-out images every N steps (0: only at the end) [default: {_d('val_every')}].",
    ),
    _opt(
        "--checkpoint-every",
        int,
        f"Write the checkpoint every N steps (0: only at the end) [default: {_d('checkpoint_every')}].",
    ),
    _opt("--log-every", int, f"Append a metrics.jsonl record every N steps [default: {_d('log_every')}]."),
    _opt("--stop-at", int, "Stop this invocation after global step N (resumable)."),
]


def _apply(fn: Any) -> Any:
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


@click.command("train")
@_apply
@click.option("--resume", is_flag=True, default=None, help="Continue the run in --out from its checkpoint.")
@click.option("--deterministic", is_flag=True, default=None, help="Deterministic cuDNN kernels (exact GPU resume).")
@click.option("--no-attributes", is_flag=True, default=None, help=_NO_ATTRIBUTES_HELP)
@DEVICE_OPTION
@user_errors
def train_command(config: Path | None, input_size: str | None, head: str | None, device: str, **opts: Any) -> None:
    """Train the multi-task network (paper §4.4 two-stage schedule by default) and write a checkpoint."""
    opts.update(input_size=parse_size(input_size), head=None if head is None else int(head), device=device)
    for flag, value in (("--attributes", opts["attributes"]), ("--attribute-group", opts["attribute_group"])):
        if value is not None and opts["no_attributes"]:
            raise click.UsageError(f"--no-attributes trains no attribute (lambda1 = 0); drop {flag}")
    if opts["attributes"] is not None and opts["attribute_group"] is not None:
        raise click.UsageError("--attributes and --attribute-group are mutually exclusive")
    try:
        cfg = resolve_train_config(opts, config)
    except MissingDataError:
        raise click.UsageError("--data is required (unless resuming a run whose train_config.json has it)") from None
    bar = StepBar(cfg.total_steps)
    try:
        result = train(cfg, progress=bar)
    finally:
        bar.close()
    final = result.final
    lambda1 = [s.lambda1 for s in cfg.stages]
    head = ", ".join(cfg.attributes) if any(lambda1) else f"none (lambda1 = 0; head of {len(cfg.attributes)} untrained)"
    click.echo(f"attributes   {head}")
    click.echo(f"steps        {result.step}/{result.total_steps} ({'complete' if result.complete else 'stopped'})")
    if "loss" in final:
        click.echo(f"final loss   {final['loss']:.4f} (train top-1 {final.get('acc', float('nan')):.3f})")
    if "val_top1" in final:
        click.echo(f"held-out     top-1 {final['val_top1']:.3f} on {final['val_images']} images "
                   f"(chance {final['chance']:.3f})")  # fmt: skip
    if "val_attribute_acc" in final:
        click.echo(f"attributes   accuracy {final['val_attribute_acc']:.3f} at 0.5")
    if result.skipped_summary:
        click.echo(f"data         {result.skipped_summary} (see {result.skipped})")
    if result.skipped_steps:
        click.echo(f"skipped steps {result.skipped_steps} of {result.step} (fewer than 2 readable images in the batch)")
    click.echo(f"checkpoint   {result.checkpoint}")
    if result.weights is not None:
        click.echo(f"weights      {result.weights}")
    click.echo(f"fingerprint  {result.fingerprint}")
