"""``facesearch train``: options -> :class:`facesearch.model.train_config.TrainConfig` ->
:func:`facesearch.model.train.train` -> summary.

Precedence of settings (later wins): the run's own ``train_config.json`` (only with ``--resume``), ``--config``
JSON, command-line options.  So ``facesearch train --out RUN --resume`` continues a run without repeating options.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from facesearch.cli._app import DEVICE_OPTION, StepBar, main, parse_size, user_errors
from facesearch.model.config import ARCHS, HEADS
from facesearch.model.device import PRECISIONS
from facesearch.model.losses import ATTRIBUTE_LOSSES
from facesearch.model.train import train
from facesearch.model.train_config import TrainConfig, rescale_stage
from facesearch.model.trainer_data import DATA_FORMATS


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object of TrainConfig fields")
    return data


def _stages(base: TrainConfig, iters: tuple[int | None, int | None], lrs: tuple[float | None, float | None]) -> Any:
    stages = list(base.stages)
    for i, (n, lr) in enumerate(zip(iters, lrs, strict=True)):
        if (n is not None or lr is not None) and i >= len(stages):
            raise ValueError(f"the schedule has {len(stages)} stage(s); cannot set stage {i + 1}")
        if n is not None or lr is not None:
            stages[i] = rescale_stage(stages[i], n, lr)
    return tuple(stages)


def build_config(opts: Mapping[str, Any], config_file: Path | None) -> TrainConfig:
    """Merge ``train_config.json`` (resume), ``--config`` and the given options into a validated TrainConfig."""
    merged: dict[str, Any] = {}
    out = opts.get("out")
    if opts.get("resume") and out is not None and (Path(out) / "train_config.json").is_file():
        merged.update(_read_json(Path(out) / "train_config.json", "run config"))
        merged.pop("stop_at", None)  # a stop point belongs to the invocation that set it
    if config_file is not None:
        merged.update(_read_json(config_file, "config"))
    stage_keys = ("stage1_iterations", "stage2_iterations", "lr", "finetune_lr")
    merged.update({k: v for k, v in opts.items() if v is not None and k not in stage_keys})
    if "data" not in merged:
        raise click.UsageError("--data is required (unless resuming a run whose train_config.json has it)")
    if merged.get("identities") is not None and "data_format" not in merged:
        merged["data_format"] = "flat"  # --identities with a plain folder: the folder is the flat image folder
    cfg = TrainConfig.from_dict(merged)
    stages = _stages(cfg, (opts["stage1_iterations"], opts["stage2_iterations"]), (opts["lr"], opts["finetune_lr"]))
    return cfg.replace(stages=stages)


def _opt(name: str, type_: Any, help_: str, *decls: str) -> Any:
    return click.option(name, *decls, type=type_, default=None, help=help_)


_IDENTITIES_HELP = ("Identity file ('file identity' lines, as identity_CelebA.txt) naming the images of a flat --data "
                    "folder, or replacing a CelebA root's.")  # fmt: skip
_DETECTIONS_HELP = "Face detection cache to use and extend [default: OUT/detections.jsonl]; runs may share one."
_SKIPPED_HELP = "Stop when more than this fraction of the steps is skipped (< 2 readable images) [default: 0.1]."
_FORMAT_HELP = "Layout of --data [default: casia; flat with --identities]."

_OPTIONS = [
    _opt("--data", click.Path(path_type=Path), "Training data: CASIA folder, list CSV, CelebA root or image folder."),
    _opt("--format", click.Choice(DATA_FORMATS), _FORMAT_HELP, "data_format"),
    _opt("--identities", click.Path(path_type=Path), _IDENTITIES_HELP),
    _opt("--detections", click.Path(path_type=Path), _DETECTIONS_HELP),
    _opt("--min-readable", float, "Stop unless this fraction of the listed images is readable [default: 0.9]."),
    _opt("--max-skipped-steps", float, _SKIPPED_HELP),
    _opt("--labels", click.Path(path_type=Path), "Per-identity attribute labels CSV (identity,<attr>,...)."),
    _opt("--out", click.Path(path_type=Path), "Run directory (checkpoint, metrics, config) [default: runs/train]."),
    _opt("--config", click.Path(path_type=Path), "JSON file of TrainConfig fields (options override it).", "config"),
    _opt("--arch", click.Choice(ARCHS), "Building block: full, fast or variant [default: full]."),
    _opt("--head", click.Choice([str(h) for h in HEADS]), "Attribute head, Fig. 9 configuration [default: 1]."),
    _opt("--width", float, "Filter-count multiplier (small models for CPU demos) [default: 1.0]."),
    _opt("--input-size", str, "Aligned crop HEIGHTxWIDTH [default: 112x96].", "input_size"),
    _opt("--embedding-dim", int, "Identity feature size [default: 1024]."),
    _opt("--stage1-iterations", int, "Stage 1 length (identity only; paper 70000). Milestones scale along."),
    _opt("--stage2-iterations", int, "Stage 2 length (fine-tune with attributes; paper 30000)."),
    _opt("--lr", float, "Stage 1 base learning rate (paper 0.01)."),
    _opt("--finetune-lr", float, "Stage 2 base learning rate (paper 0.001)."),
    _opt("--batch-size", int, "Images per step [default: 40 full, 48 fast/variant]."),
    _opt("--attribute-loss", click.Choice(ATTRIBUTE_LOSSES), "mse (paper) or moon (re-balanced) [default: mse]."),
    _opt("--moon-target", float, "MOON target positive rate per attribute [default: 0.5 = balanced]."),
    _opt("--holdout", int, "Images per identity held out for validation [default: 1].", "holdout_per_identity"),
    _opt("--precision", click.Choice(PRECISIONS), "fp32, bf16 autocast, or auto (bf16 where native) [default: auto]."),
    _opt("--workers", int, "DataLoader worker processes [default: min(2, CPUs)].", "num_workers"),
    _opt("--seed", int, "Seed of initialisation, data order, flips and dropout [default: 0]."),
    _opt("--val-every", int, "Validate on the held-out images every N steps (0: only at the end) [default: 2000]."),
    _opt("--checkpoint-every", int, "Write the checkpoint every N steps (0: only at the end) [default: 2000]."),
    _opt("--log-every", int, "Append a metrics.jsonl record every N steps [default: 20]."),
    _opt("--stop-at", int, "Stop this invocation after global step N (resumable)."),
]


def _apply(fn: Any) -> Any:
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


@main.command("train")
@_apply
@click.option("--resume", is_flag=True, default=None, help="Continue the run in --out from its checkpoint.")
@click.option("--deterministic", is_flag=True, default=None, help="Deterministic cuDNN kernels (exact GPU resume).")
@DEVICE_OPTION
@user_errors
def train_command(config: Path | None, input_size: str | None, head: str | None, device: str, **opts: Any) -> None:
    """Train the multi-task network (paper §4.4 two-stage schedule by default) and write a checkpoint."""
    opts.update(input_size=parse_size(input_size), head=None if head is None else int(head), device=device)
    cfg = build_config(opts, config)
    bar = StepBar(cfg.total_steps)
    try:
        result = train(cfg, progress=bar)
    finally:
        bar.close()
    final = result.final
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
