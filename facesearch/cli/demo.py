"""``facesearch demo``: the main job of `make run` (see :mod:`facesearch.demo`)."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from facesearch.cli._app import DEVICE_OPTION, config_option, user_errors
from facesearch.demo import DemoConfig, run_demo

_option = functools.partial(config_option, DemoConfig)

SMALL_DEMO = {"celeba_images": 600, "distractors": 40, "probe_identities": 4, "probe_images_per_identity": 3,
              "batch_size": 16, "attribute_input_size": (56, 48)}  # fmt: skip


@click.command("demo")
@_option("--out", type=click.Path(path_type=Path), help="Where the data, runs and report go.")
@_option("--identities", type=int, help="Training identities (CASIA-style).")
@_option("--stage1-iterations", type=int, help="Multi-task training, stage 1 (identity only).")
@_option("--stage2-iterations", type=int, help="Multi-task training, stage 2 (with the attribute loss).")
@_option("--attribute-iterations", type=int, help="Attribute classifier training steps.")
@_option("--seed", type=int, help="Seed of data and training.")
@click.option("--small", is_flag=True, help="A seconds-long smoke run: tiny data sets and batches (for tests).")
@DEVICE_OPTION
@user_errors
def demo_command(small: bool, **opts: object) -> None:
    """Synthesise faces, label attributes, train the multi-task network, evaluate, and write a report."""
    if small:
        opts.update(SMALL_DEMO)
    cfg = DemoConfig(**opts)  # type: ignore[arg-type]
    report = run_demo(cfg, progress=lambda msg: click.echo(f"[demo] {msg}"))
    click.echo("")
    click.echo((cfg.out / "report.md").read_text())
    click.echo(f"report: {cfg.out / 'report.md'} (and report.json); fingerprint {report['model']['fingerprint']}")
