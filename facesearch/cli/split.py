"""``facesearch split``: options -> :class:`facesearch.benchmarks.split.SplitConfig` ->
:func:`facesearch.benchmarks.split.write_split` -> summary (and the train / bench commands that read the result)."""

from __future__ import annotations

import functools
import shlex
from pathlib import Path

import click

from facesearch.benchmarks.split import LANDMARKS, PROBE_LIST, SPLIT_FORMATS, TRAIN_LIST, SplitConfig, write_split
from facesearch.cli._app import config_option, default_of, user_errors

_P = click.Path(path_type=Path)
_option = functools.partial(config_option, SplitConfig)
_POSITIVE = click.IntRange(min=1)


@click.command("split")
@click.option("--list", "data", type=_P, required=True,
              help="The identity-labelled images: a list CSV (path,identity[,x1,y1,...,x5,y5][,attributes]), a "
                   "folder per identity (--format casia), a flat folder (--format flat --identities FILE) or a CelebA "
                   "root.")  # fmt: skip
@_option("--format", "data_format", type=click.Choice(SPLIT_FORMATS), help="Layout of --list.")
@click.option("--root", type=_P, help="Folder the list CSV's paths are relative to [default: the CSV's folder].")
@click.option("--identities", type=_P, help="Identity file ('file identity' lines) naming a flat folder's images.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder (new or empty, or one holding the same split: then nothing is written).")  # fmt: skip
@_option("--probe-identities", type=_POSITIVE, help="Probe people (FaceScrub-style; each needs >= 2 images).")
@click.option("--probe-images-per-identity", type=_POSITIVE, default=None,
              help="Probe images per probe person, drawn [default: all their images].")  # fmt: skip
@click.option("--distractor-identities", type=_POSITIVE, default=None,
              help="Distractor people (MegaFace-style), instead of --distractor-fraction.")  # fmt: skip
@click.option("--distractor-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help=f"Fraction of the non-probe people that are distractors [default: "
                   f"{default_of(SplitConfig, 'distractor_fraction')}].")  # fmt: skip
@click.option("--distractor-images-per-identity", type=_POSITIVE, default=None,
              help="Distractor images per distractor person, drawn (1 = one per person, as MegaFace) "
                   "[default: all].")  # fmt: skip
@_option("--seed", type=click.IntRange(min=0), help="Seed of every draw (people, images, distractor order).")
@user_errors
def split_command(data: Path, out: Path, distractor_identities: int | None, distractor_fraction: float | None,
                  **opts: object) -> None:  # fmt: skip
    """Split identity-labelled images into identity-disjoint training, probe and distractor people (MegaFace-style).

    Writes OUT/train.csv (for `facesearch train --format list`), OUT/facescrub_features_list.json, a
    OUT/megaface_features_list.json_<size>_1 for each size 10, 100, ... the distractor images fill (each holds the
    smaller ones), OUT/landmarks.csv (when the images have landmarks), OUT/test_identities.txt (the probe and
    distractor people: for `facesearch bench lfw-pairs --people`) and OUT/split.json (seed, counts, the source and its
    SHA-256). The devkit lists' paths are relative to the image root printed at the end. Distractors are all images of
    the distractor people unless --distractor-images-per-identity caps them; probe people's other images are unused.
    """
    if distractor_identities is not None and distractor_fraction is not None:
        raise click.UsageError("--distractor-identities and --distractor-fraction are mutually exclusive")
    if distractor_fraction is not None:
        opts["distractor_fraction"] = distractor_fraction
    cfg = SplitConfig(data=data, out=out, distractor_identities=distractor_identities, **opts)  # type: ignore[arg-type]
    result = write_split(cfg)
    rec = result.record
    c = rec["counts"]
    click.echo(f"people       {rec['source']['people']:,} ({rec['source']['images']:,} images): training "
               f"{c['train_people']:,} ({c['train_images']:,}), probes {c['probe_people']:,} ({c['probe_images']:,}), "
               f"distractors {c['distractor_people']:,} ({c['distractor_images']:,}); "
               f"{c['unused_images']:,} images unused")  # fmt: skip
    click.echo(f"sizes        {', '.join(f'{s:,}' for s in rec['sizes'])}")
    if result.written:
        click.echo(f"written      {out}: {', '.join(rec['files'])}, split.json")
    else:
        click.echo(f"unchanged    {out} already holds this split (nothing written)")
    root = shlex.quote(rec["image_root"])
    landmarks = (f" --probe-landmarks {shlex.quote(str(out / LANDMARKS))} --distractor-landmarks "
                 f"{shlex.quote(str(out / LANDMARKS))}") if LANDMARKS in rec["files"] else ""  # fmt: skip
    click.echo(f"train with   facesearch train --data {shlex.quote(str(out / TRAIN_LIST))} --format list ...")
    click.echo(f"bench with   facesearch bench megaface --checkpoint MODEL --probe-images {root} --probe-list "
               f"{shlex.quote(str(out / PROBE_LIST))} --distractor-images {root} --distractor-lists "
               f"{shlex.quote(str(out))}{landmarks} --out RESULTS")  # fmt: skip
