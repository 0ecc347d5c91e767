"""``facesearch embed``: options -> :class:`indexer.embed.EmbedConfig` -> :func:`indexer.pipeline.run_embed` ->
summary.  Re-running the same command resumes a killed job; on a finished output it says so and does nothing."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from engine.cli._app import DEVICE_OPTION, main, user_errors
from indexer.embed import EmbedConfig
from indexer.pipeline import EmbedResult, run_embed
from indexer.shards import DTYPES
from model.device import PRECISIONS


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


def _summary(result: EmbedResult) -> None:
    totals = result.manifest.totals
    if result.already_complete:
        done = f"{totals['shards']} shards, {totals['rows']} rows"
        click.echo(f"{result.out} is already complete ({done}): nothing to do")
        return
    click.echo(f"shards       {totals['shards']} in {result.out} ({result.computed_shards} embedded now, "
               f"{result.reused_shards} already done)")  # fmt: skip
    failed = ", ".join(f"{n} {reason}" for reason, n in result.failed_by_reason.items()) or "none"
    click.echo(f"rows         {result.rows} ({result.ok_rows} ok; failed: {failed})")
    click.echo(f"speed        {result.images_per_s:.1f} images/s ({result.computed_images} images in "
               f"{result.seconds:.1f} s)")  # fmt: skip
    click.echo(f"model        {result.manifest.fingerprint}")


_P = click.Path(path_type=Path)


@main.command("embed")
@click.option("--input", "input_dir", type=_P, help="Image folder tree (identity = parent folder).")
@click.option("--list", "list_file", type=_P, help="Generic list CSV: path,identity[,x1,y1..x5,y5].")
@click.option("--devkit", type=_P, help='MegaFace/FaceScrub devkit JSON {"path": [...], "id": [...]} (needs --root).')
@click.option("--root", type=_P, help="Folder the list/devkit paths are relative to [default: the list's folder].")
@click.option("--landmarks", type=_P, help="Landmarks CSV (path,x1,y1..x5,y5), matched by path; else YuNet.")
@click.option("--sidecars", is_flag=True, help="Read landmarks from <image>.json sidecar files.")
@click.option("--checkpoint", type=_P, required=True, help="Trained weights (facesearch train output).")
@click.option("--out", type=_P, required=True, help="Shard directory (created; re-run to resume).")
@click.option("--shard-rows", type=int, default=50_000, show_default=True, help="Images per Parquet shard.")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Crops per forward pass.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True, help="Stored embeddings.")
@click.option("--flip-average", is_flag=True, help="Average the embeddings of each crop and its mirror image.")
@click.option("--workers", type=int, help="Dask worker processes [default: cores / threads, or one per GPU].")
@click.option("--threads-per-worker", type=int, default=1, show_default=True, help="Threads per Dask worker.")
@click.option("--scheduler", help="Address of an existing Dask scheduler (tcp://host:8786) instead of a local one.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True, help="Autocast.")
@click.option("--detector-pad", type=int, default=0, show_default=True, help="Black border for YuNet (ORL: 20).")
@DEVICE_OPTION
@user_errors
def embed_command(input_dir: Path | None, list_file: Path | None, devkit: Path | None, **opts: Any) -> None:
    """Embed face images into Parquet shards on Dask (resumable; failures become rows with a reason)."""
    given = [(fmt, p) for fmt, p in (("images", input_dir), ("list", list_file), ("devkit", devkit)) if p is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --input, --list, --devkit")
    cfg = EmbedConfig(input=given[0][1], format=given[0][0], **opts)
    bar = _Bar()
    try:
        result = run_embed(cfg, progress=bar)
    finally:
        bar.close()
    _summary(result)


if __name__ == "__main__":  # python -m engine.cli.embed, until engine.cli imports this module
    main()
