"""``facesearch synth ...``: the procedural synthetic face generator (the project's embedded default data)."""

from __future__ import annotations

import functools
from pathlib import Path

import click
from tqdm import tqdm

from facesearch.cli._app import LazyCommand, LazyGroup, config_option, default_of, user_errors
from facesearch.model.faces.synth import LAYOUTS, SynthConfig, generate_faces

#: ``synth features`` lives with the index commands (it writes shards, not images).
SYNTH_COMMANDS = {
    "features": LazyCommand("facesearch.cli.index:features", "Identity-clustered synthetic embeddings + attribute "
                            "probabilities, in the shard format, at million scale."),
}  # fmt: skip


_option = functools.partial(config_option, SynthConfig)


@click.group(cls=LazyGroup, lazy_subcommands=SYNTH_COMMANDS)
def synth() -> None:
    """Procedurally rendered synthetic faces in the CASIA, CelebA and MegaFace/FaceScrub on-disk layouts."""


@synth.command("faces")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory (new or empty, or one made earlier by the same config).",
)
@_option("--seed", help="Seed; the same config gives byte-identical files.")
@_option("--identities", help="CASIA-style training identities (>= 2).")
@_option("--images-per-identity", help="Images per CASIA identity (>= 1).")
@_option("--celeba-images", help="CelebA-style aligned images (>= 1).")
@_option("--celeba-images-per-identity", help="CelebA images per identity.")
@_option("--probe-identities", help="FaceScrub-style probe identities (>= 1).")
@_option("--probe-images-per-identity", help="Images per probe identity (>= 2).")
@_option("--distractors", help="MegaFace-style distractors, one per identity.")
@click.option(
    "--layouts",
    default=",".join(default_of(SynthConfig, "layouts")),
    show_default=True,
    help=f"Comma-separated layouts to write, from {', '.join(LAYOUTS)}.",
)
@_option("--size", help="Square canvas side for casia/megaface (CelebA: 178x218).")
@_option("--nuisance", help="Scale of per-image nuisance; 0 = clean renders.")
@click.option(
    "--celeba-databases",
    is_flag=True,
    default=default_of(SynthConfig, "celeba_databases"),
    help="With the celeba layout, also write two list-CSV databases with disjoint label sets from disjoint train "
    "people (celeba/databases/a.csv, b.csv).",
)
@click.option("--workers", type=click.IntRange(max=1024), default=None,
              help="Worker processes (at most 1024) [default: all CPUs]; 1 = in-process.")  # fmt: skip
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@user_errors
def faces(out: Path, seed: int, identities: int, images_per_identity: int, celeba_images: int,
          celeba_images_per_identity: int, probe_identities: int, probe_images_per_identity: int, distractors: int,
          layouts: str, size: int, nuisance: float, celeba_databases: bool, workers: int | None,
          progress: bool) -> None:  # fmt: skip
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
        celeba_databases=celeba_databases,
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
