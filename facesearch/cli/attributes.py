"""``facesearch attributes``: train the CelebA attribute classifier and label identity datasets (paper §3.2)."""

from __future__ import annotations

from pathlib import Path

import click

from facesearch.cli._app import DEVICE_OPTION, StepBar, main, parse_size, user_errors
from facesearch.model.attributes import AttributeTrainConfig, LabelConfig, label_identities, train_attribute_classifier
from facesearch.model.config import ARCHS
from facesearch.model.device import PRECISIONS
from facesearch.model.trainer_data import DATA_FORMATS


@main.group("attributes")
def attributes_group() -> None:
    """Attribute labels for identity datasets: a MOON-trained classifier + per-identity majority vote."""


@attributes_group.command("train")
@click.option(
    "--data", type=click.Path(path_type=Path), required=True, help="CelebA-format root (list_attr_celeba.txt)."
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/attributes"), show_default=True,
              help="Run directory of the classifier.")  # fmt: skip
@click.option("--arch", type=click.Choice(ARCHS), default="fast", show_default=True, help="Building block.")
@click.option("--width", type=float, default=1.0, show_default=True, help="Filter-count multiplier.")
@click.option("--input-size", default="112x96", show_default=True, help="Aligned crop HEIGHTxWIDTH.")
@click.option("--iterations", type=int, default=20_000, show_default=True, help="Training steps (lr x0.1 at 50/75 %).")
@click.option("--lr", type=float, default=0.01, show_default=True, help="Base learning rate.")
@click.option("--batch-size", type=int, default=None, help="Images per step [default: 40 full, 48 fast/variant].")
@click.option("--moon-target", type=float, default=0.5, show_default=True,
              help="MOON target positive rate per attribute (0.5 = balanced).")  # fmt: skip
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True, help="fp32/bf16/auto.")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes [default: min(2, CPUs)].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed.")
@click.option("--resume", is_flag=True, help="Continue the run in --out.")
@click.option("--detections", type=click.Path(path_type=Path), default=None,
              help="Face detection cache to use and extend [default: OUT/detections.jsonl].")  # fmt: skip
@click.option("--min-readable", type=float, default=0.9, show_default=True,
              help="Stop unless this fraction of the listed images is readable.")  # fmt: skip
@click.option("--max-skipped-steps", type=float, default=0.1, show_default=True,
              help="Stop when more than this fraction of the steps is skipped (< 2 readable images).")  # fmt: skip
@DEVICE_OPTION
@user_errors
def train_command(input_size: str, workers: int | None, **opts: object) -> None:
    """Train the attribute classifier on CelebA-format data with MOON's re-balanced loss."""
    cfg = AttributeTrainConfig(input_size=parse_size(input_size) or (112, 96), num_workers=workers, **opts)  # type: ignore[arg-type]
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
@click.option("--threshold", type=float, default=0.5, show_default=True, help="Per-image positive threshold.")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Images per forward pass.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True, help="fp32/bf16/auto.")
@click.option("--workers", "num_workers", type=int, default=0, show_default=True, help="Decode/align processes.")
@click.option("--detections", type=click.Path(path_type=Path), default=None,
              help="Face detection cache to use and extend [default: OUT stem + .detections.jsonl].")  # fmt: skip
@click.option("--min-readable", type=float, default=0.9, show_default=True,
              help="Stop unless this fraction of the listed images is readable.")  # fmt: skip
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
