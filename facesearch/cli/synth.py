"""``facesearch synth ...``: the procedural synthetic face generator (the project's embedded default data)."""

from __future__ import annotations

from pathlib import Path

import click
from tqdm import tqdm

from facesearch.cli._app import main, user_errors
from facesearch.model.faces.synth import LAYOUTS, SynthConfig, generate_faces


@main.group()
def synth() -> None:
    """Procedurally rendered synthetic faces in the CASIA, CelebA and MegaFace/FaceScrub on-disk layouts."""


@synth.command("faces")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory (new or empty, or one made earlier by the same config).",
)
@click.option("--seed", default=0, show_default=True, help="Seed; the same config gives byte-identical files.")
@click.option("--identities", default=50, show_default=True, help="CASIA-style training identities (>= 2).")
@click.option("--images-per-identity", default=10, show_default=True, help="Images per CASIA identity (>= 1).")
@click.option("--celeba-images", default=1000, show_default=True, help="CelebA-style aligned images (>= 1).")
@click.option("--celeba-images-per-identity", default=20, show_default=True, help="CelebA images per identity.")
@click.option("--probe-identities", default=10, show_default=True, help="FaceScrub-style probe identities (>= 1).")
@click.option("--probe-images-per-identity", default=10, show_default=True, help="Images per probe identity (>= 2).")
@click.option("--distractors", default=1000, show_default=True, help="MegaFace-style distractors, one per identity.")
@click.option(
    "--layouts",
    default=",".join(LAYOUTS),
    show_default=True,
    help=f"Comma-separated layouts to write, from {', '.join(LAYOUTS)}.",
)
@click.option("--size", default=128, show_default=True, help="Square canvas side for casia/megaface (CelebA: 178x218).")
@click.option("--nuisance", default=1.0, show_default=True, help="Scale of per-image nuisance; 0 = clean renders.")
@click.option("--workers", type=click.IntRange(max=1024), default=None,
              help="Worker processes (at most 1024) [default: all CPUs]; 1 = in-process.")  # fmt: skip
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@user_errors
def faces(out: Path, seed: int, identities: int, images_per_identity: int, celeba_images: int,
          celeba_images_per_identity: int, probe_identities: int, probe_images_per_identity: int, distractors: int,
          layouts: str, size: int, nuisance: float, workers: int | None, progress: bool) -> None:  # fmt: skip
    """Render synthetic faces with known identities, attributes and landmarks, in the real on-disk layouts."""
    cfg = SynthConfig(
        out=out,
        seed=seed,
        identities=identities,
        images_per_identity=images_per_identity,
        celeba_images=celeba_images,
        celeba_images_per_identity=celeba_images_per_identity,
        probe_identities=probe_identities,
        probe_images_per_identity=probe_images_per_identity,
        distractors=distractors,
        layouts=tuple(s.strip() for s in layouts.split(",") if s.strip()),
        size=size,
        nuisance=nuisance,
        workers=workers,
    )
    bars: list[tqdm] = []  # opened on the first finished chunk, so a refused --out prints no empty bar

    def update(n: int) -> None:
        if not bars:
            bars.append(tqdm(total=sum(cfg.images.values()), unit="img", disable=not progress, desc="synth"))
        bars[0].update(n)

    try:
        summary = generate_faces(cfg, progress=update)
    finally:
        for bar in bars:
            bar.close()
    total = sum(summary.images.values())
    click.echo(f"wrote {total} images to {summary.out} in {summary.seconds:.1f} s ({summary.images_per_second:.0f}/s)")
    for name, n in summary.images.items():
        click.echo(f"  {name:<9} {n:>8} images {summary.identities[name]:>8} identities  {summary.out / name}")
    click.echo(f"  manifest  {summary.manifest}")
