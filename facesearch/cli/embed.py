"""``facesearch embed``: options -> :class:`facesearch.indexer.embed.EmbedConfig` ->
:func:`facesearch.indexer.pipeline.run_embed` -> summary.  Re-running the same command resumes a killed job; on a
finished output it says so and does nothing."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from facesearch.cli._app import DEVICE_OPTION, config_option, main, user_errors
from facesearch.indexer.embed import EmbedConfig
from facesearch.indexer.manifest import describe_attribute_source
from facesearch.indexer.pipeline import LOW_POSE_SCORE, ClusterError, EmbedResult, run_embed
from facesearch.indexer.shards import DTYPES
from facesearch.model.device import PRECISIONS
from facesearch.model.faces.align import KEEP_FACE


class _Bar:
    """Draws the pipeline's progress records (images done, images/s; tqdm adds the ETA)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, record: Mapping[str, Any]) -> None:
        if record["event"] == "start" and record["total"]:
            self.bar = tqdm(total=record["total"], unit="img", dynamic_ncols=True, desc="embed")
        elif record["event"] == "shard" and self.bar is not None:
            self.bar.update(record["done"] - self.bar.n)
            self.bar.set_postfix({"img/s": f"{record['images_per_s']:.1f}"}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _attributes_line(result: EmbedResult) -> str:
    """Which predictor filled the attribute columns (the manifest's record)."""
    n = len(result.manifest.attributes)
    return f"attributes   {n} columns from {describe_attribute_source(result.manifest.attribute_provenance)}"


def _summary(result: EmbedResult) -> None:
    totals = result.manifest.totals
    if result.already_complete:
        done = f"{totals['shards']} shards, {totals['rows']} rows"
        click.echo(f"{result.out} is already complete ({done}): nothing to do")
        click.echo(_attributes_line(result))
        return
    click.echo(f"shards       {totals['shards']} in {result.out} ({result.computed_shards} embedded now, "
               f"{result.reused_shards} already done)")  # fmt: skip
    failed = ", ".join(f"{n} {reason}" for reason, n in result.failed_by_reason.items()) or "none"
    images = f" from {result.images} images" if result.images != result.rows else ""
    click.echo(f"rows         {result.rows}{images} ({result.ok_rows} ok; failed: {failed})")
    if result.unlabeled_images:
        click.echo(f"identity     {result.unlabeled_images} images not named by the identity file (embedded, identity "
                   "null)")  # fmt: skip
    if result.warned_rows:
        click.echo(f"warnings     {result.warned_rows} ok rows decoded past damaged JPEG data (kept; the decoder's "
                   "warning is in their error column)")  # fmt: skip
    if result.changed_shards:
        click.echo(f"inputs       {result.changed_shards} shard(s) recomputed: inputs changed")
    if result.damaged_shards:
        click.echo(f"damaged      {result.damaged_shards} shard(s) recomputed: bytes no longer matched the manifest")
    if result.low_pose_rows:
        where = ("in the pose_score column" if "pose_score" in result.manifest.columns
                 else "computed from the landmarks column")  # fmt: skip
        click.echo(f"pose         {result.low_pose_rows} ok rows with pose_score < {LOW_POSE_SCORE} (turned towards "
                   f"profile: over-zoomed crops; pose_score is {where})")  # fmt: skip
    click.echo(f"speed        {result.images_per_s:.1f} images/s ({result.computed_images} images in "
               f"{result.seconds:.1f} s)")  # fmt: skip
    click.echo(f"model        {result.manifest.fingerprint}")
    click.echo(_attributes_line(result))


_P = click.Path(path_type=Path)
_option = functools.partial(config_option, EmbedConfig)


@click.command("embed")
@click.option("--input", "input_dir", type=_P, help="Image folder tree (identity = parent folder, or --identities).")
@click.option("--list", "list_file", type=_P, help="Generic list CSV: path,identity[,x1,y1..x5,y5].")
@click.option("--devkit", type=_P, help='MegaFace/FaceScrub devkit JSON {"path": [...], "id": [...]} (needs --root).')
@click.option(
    "--celeba",
    type=_P,
    help="CelebA root: img_align_celeba/ named by identity_CelebA.txt (and list_attr_celeba.txt), with "
    "list_landmarks_align_celeba.txt's landmarks when present.",
)
@click.option(
    "--identities",
    type=_P,
    help="Identity file ('000001.jpg 2880' per line, CelebA's identity_CelebA.txt) labelling the --input folder's "
    "images (those it does not name get no identity), or replacing a --celeba root's.",
)
@click.option("--root", type=_P, help="Folder the list/devkit paths are relative to [default: the list's folder].")
@click.option("--landmarks", type=_P, help="Landmarks CSV (path,x1,y1..x5,y5), matched by path; else YuNet.")
@click.option("--sidecars", is_flag=True, help="Read landmarks from <image>.json sidecar files.")
@click.option("--checkpoint", type=_P, required=True, help="Trained weights (facesearch train output).")
@click.option("--out", type=_P, required=True, help="Shard directory (created; re-run to resume).")
@click.option(
    "--attributes-from",
    type=_P,
    help="Attribute predictor whose probabilities fill the attribute columns (from `facesearch attributes train`) "
    "[default: the identity model's own head].",
)
@_option("--shard-rows", type=int, help="Images per Parquet shard.")
@_option("--batch-size", type=int, help="Crops per forward pass.")
@_option("--dtype", type=click.Choice(DTYPES), help="Stored embeddings.")
@click.option("--flip-average", is_flag=True, help="Average the embeddings of each crop and its mirror image.")
@click.option("--workers", type=int, help="Dask worker processes [default: cores / threads, or one per GPU].")
@_option("--threads-per-worker", type=int, help="Threads per Dask worker.")
@click.option(
    "--decode-processes",
    type=click.IntRange(min=0),
    help="Processes per Dask worker that read, decode and align the images (0: on the worker's threads) "
    "[default: on a GPU worker one per core of its share but one; on the CPU 0].",
)
@click.option(
    "--scheduler",
    help="Address of an existing Dask scheduler (tcp://host:8786) instead of a local cluster. "
    "Its workers open the checkpoint, the images, the YuNet model and --out by this machine's absolute "
    "paths, so those must be on a filesystem every worker sees; every worker is checked before embedding.",
)
@_option("--precision", type=click.Choice(PRECISIONS), help="Autocast.")
@_option("--detector-pad", type=int, help="Black border for YuNet (ORL: 20).")
@_option("--det-threshold", type=float, help="YuNet's minimum face score.")
@_option(
    "--det-size",
    type=int,
    help="Longest image side YuNet sees (larger images are downscaled; larger finds smaller faces).",
)
@_option(
    "--keep-face",
    type=click.Choice(KEEP_FACE),
    help="Which detected face of a photo is embedded: the largest, the most central, the best scored, or "
    "all (one row each; id = image index * 1000 + face index, faces largest first).",
)
@click.option(
    "--detector-model",
    type=_P,
    help="YuNet ONNX file [default: $FACESEARCH_YUNET, else under $FACESEARCH_SHARED or ../shared].",
)
@DEVICE_OPTION
@user_errors
def embed_command(input_dir: Path | None, list_file: Path | None, devkit: Path | None, celeba: Path | None,
                  **opts: Any) -> None:  # fmt: skip
    """Embed face images into Parquet shards on Dask (resumable; failures become rows with a reason)."""
    sources = (("images", input_dir), ("list", list_file), ("devkit", devkit), ("celeba", celeba))
    given = [(fmt, p) for fmt, p in sources if p is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --input, --list, --devkit, --celeba")
    if opts["identities"] is not None and given[0][0] not in ("images", "celeba"):
        raise click.UsageError("--identities labels the images of --input or --celeba (a list names its identities)")
    cfg = EmbedConfig(input=given[0][1], format=given[0][0], **opts)
    bar = _Bar()
    try:
        result = run_embed(cfg, progress=bar)
    except ClusterError as e:
        raise click.ClickException(str(e)) from e
    finally:
        bar.close()
    _summary(result)


if __name__ == "__main__":  # python -m facesearch.cli.embed: the whole command line, as `facesearch`
    main()
