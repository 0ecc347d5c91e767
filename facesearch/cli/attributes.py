"""``facesearch attributes``: train the CelebA attribute classifier and label identity datasets (paper §3.2)."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from facesearch.cli._app import DEVICE_OPTION, StepBar, config_option, default_of, parse_size, user_errors
from facesearch.model.attributes import AttributeTrainConfig, LabelConfig, label_identities, train_attribute_classifier
from facesearch.model.config import ARCHS
from facesearch.model.device import PRECISIONS
from facesearch.model.trainer_data import DATA_FORMATS

_train_option = functools.partial(config_option, AttributeTrainConfig)
_label_option = functools.partial(config_option, LabelConfig)


@click.group("attributes")
def attributes_group() -> None:
    """Attribute labels for identity datasets: a MOON-trained classifier + per-identity majority vote."""


@attributes_group.command("train")
@click.option(
    "--data", type=click.Path(path_type=Path), required=True, help="CelebA-format root (list_attr_celeba.txt)."
)
@_train_option("--out", type=click.Path(path_type=Path), help="Run directory of the classifier.")
@_train_option("--arch", type=click.Choice(ARCHS), help="Building block.")
@_train_option("--width", type=float, help="Filter-count multiplier.")
@click.option("--input-size", default="{}x{}".format(*default_of(AttributeTrainConfig, "input_size")),
              show_default=True, help="Aligned crop HEIGHTxWIDTH.")  # fmt: skip
@_train_option("--iterations", type=int, help="Training steps (lr x0.1 at 50/75 %).")
@_train_option("--lr", type=float, help="Base learning rate.")
@click.option("--batch-size", type=int, default=None, help="Images per step [default: 40 full, 48 fast/variant].")
@_train_option("--moon-target", type=float, help="MOON target positive rate per attribute (0.5 = balanced).")
@_train_option("--precision", type=click.Choice(PRECISIONS), help="fp32/bf16/auto.")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes [default: min(2, CPUs)].")
@_train_option("--seed", type=int, help="Seed.")
@click.option("--resume", is_flag=True, help="Continue the run in --out.")
@click.option("--detections", type=click.Path(path_type=Path), default=None,
              help="Face detection cache to use and extend [default: OUT/detections.jsonl].")  # fmt: skip
@_train_option("--min-readable", type=float, help="Stop unless this fraction of the listed images is readable.")
@_train_option("--max-skipped-steps", type=float,
               help="Stop when more than this fraction of the steps is skipped (< 2 readable images).")  # fmt: skip
@DEVICE_OPTION
@user_errors
def train_command(input_size: str, workers: int | None, **opts: object) -> None:
    """Train the attribute classifier on CelebA-format data with MOON's re-balanced loss."""
    size = parse_size(input_size)
    assert size is not None, "--input-size has a default"
    cfg = AttributeTrainConfig(input_size=size, num_workers=workers, **opts)  # type: ignore[arg-type]
    bar = StepBar(cfg.iterations)
    try:
        result = train_attribute_classifier(cfg, progress=bar)
    finally:
        bar.close()
    for key in ("val_attribute_acc",):
        if key in result.final:
            click.echo(f"{key:<22} {result.final[key]:.3f}")
    if result.skipped_summary:
        click.echo(f"{result.skipped_summary} (see {result.skipped})")
    if result.skipped_steps:
        click.echo(f"skipped steps {result.skipped_steps} of {result.step} (fewer than 2 readable images in the batch)")
    click.echo(f"classifier   {result.weights or result.checkpoint}")
    click.echo(f"fingerprint  {result.fingerprint}")


@attributes_group.command("label")
@click.option("--classifier", type=click.Path(path_type=Path), required=True,
              help="Attribute classifier checkpoint (from `facesearch attributes train`).")  # fmt: skip
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Identity dataset to label.")
@click.option("--format", "data_format", type=click.Choice(DATA_FORMATS), default=None,
              help="Layout of --data [default: casia; flat with --identities].")  # fmt: skip
@click.option("--identities", type=click.Path(path_type=Path), default=None,
              help="Identity file ('file identity' lines) naming the images of a flat --data folder.")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Labels CSV to write (identity,<attr>...).")
@_label_option("--threshold", type=float, help="Per-image positive threshold.")
@_label_option("--batch-size", type=int, help="Images per forward pass.")
@_label_option("--precision", type=click.Choice(PRECISIONS), help="fp32/bf16/auto.")
@_label_option("--workers", "num_workers", type=int, help="Decode/align processes.")
@click.option("--detections", type=click.Path(path_type=Path), default=None,
              help="Face detection cache to use and extend [default: OUT stem + .detections.jsonl].")  # fmt: skip
@_label_option("--min-readable", type=float, help="Stop unless this fraction of the listed images is readable.")
@DEVICE_OPTION
@user_errors
def label_command(data_format: str | None, **opts: object) -> None:
    """Predict attributes on every image and write per-identity majority-vote labels for `facesearch train`."""
    fmt = data_format or ("flat" if opts.get("identities") is not None else "casia")
    result = label_identities(LabelConfig.from_dict({**opts, "data_format": fmt}))
    click.echo(f"labelled     {result.identities} identities from {result.images} images")
    if result.skipped_summary and result.skipped:
        click.echo(result.skipped_summary)
    rates = ", ".join(f"{k} {v:.2f}" for k, v in result.positive_rate.items())
    click.echo(f"positive     {rates}")
    click.echo(f"labels       {result.labels}")
    click.echo(f"provenance   {result.provenance}")
