"""``facesearch bench speed ...``: the speed benchmarks of :mod:`facesearch.benchmarks.speed`, one subcommand per
script, each with the script's options (``python -m facesearch.benchmarks.speed.<script>`` runs the same code).

Each command imports its script (and so torch, FAISS, Dask) only when it runs: importing this module, or asking for
``--help``, stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from facesearch.cli._app import user_errors

_JSON = click.Path(dir_okay=False, path_type=Path)
_DIR = click.Path(file_okay=False, path_type=Path)
_DEVICE_HELP = "cpu | cuda | cuda:N (a requested GPU that is absent is an error)."


def _ints(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """``1,4,16`` -> (1, 4, 16)."""
    try:
        return tuple(int(c) for c in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,4,16, got {value!r}") from None


@click.group("speed")
def speed() -> None:
    """Speed benchmarks against the machine's measured GEMM rate and memory bandwidth (see benchmarks/RESULTS.md)."""


@speed.command("model")
@click.option("--device", default="cpu", show_default=True, help=_DEVICE_HELP)
@click.option("--models", default="full,fast", show_default=True, help="Comma-separated architectures.")
@click.option("--precisions", default="fp32,bf16", show_default=True, help="Comma-separated precisions (fp32, bf16).")
@click.option("--min-seconds", type=float, default=3.0, show_default=True, help="Time each measurement this long.")
@click.option("--gemm-n", type=int, default=2048, show_default=True, help="Side of the square GEMM for the peak.")
@click.option("--batch-scale", type=int, default=1, show_default=True,
              help="Multiply the paper's batch sizes (GPU saturation).")  # fmt: skip
@click.option("--batch", type=int, default=None, help="Images per batch instead of the paper's x --batch-scale.")
@click.option("--width", type=float, default=1.0, show_default=True, help="Filter-count multiplier (1.0: the paper's).")
@click.option("--input-size", default="112x96", show_default=True, help="Input HEIGHTxWIDTH (112x96: the paper's).")
@click.option("--json", type=_JSON, default=None, help="Also write the results here.")
@user_errors
def model_command(**opts: Any) -> None:
    """Forward and training images/s of the Full and Fast models against the measured GEMM peak."""
    from facesearch.benchmarks.speed import model_speed

    click.echo(model_speed.format_report(model_speed.run(model_speed.ModelSpeedConfig(**opts))))


@speed.command("synth")
@click.option("--images", type=int, default=2000, show_default=True, help="Images per run (all three layouts).")
@click.option("--workers", default="1,2", show_default=True, help="Comma-separated worker counts.")
@click.option("--repeats", type=int, default=2, show_default=True, help="Runs per worker count; the best is reported.")
@click.option("--size", type=int, default=128, show_default=True, help="CASIA/MegaFace canvas side in pixels.")
@user_errors
def synth_command(**opts: Any) -> None:
    """Images/s of the synthetic face generator end to end, per worker count."""
    from facesearch.benchmarks.speed import synth_speed

    click.echo(synth_speed.format_report(synth_speed.run(synth_speed.SynthSpeedConfig(**opts))))


@speed.command("embed")
@click.option("--identities", type=int, default=40, show_default=True, help="Synthetic identities.")
@click.option("--images-per-identity", type=int, default=10, show_default=True, help="Images per identity.")
@click.option("--width", type=float, default=0.25, show_default=True, help="Width multiplier of the Fast network.")
@click.option("--input-size", default="112x96", show_default=True, help="Network input HEIGHTxWIDTH.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per inference batch.")
@click.option("--shard-rows", type=int, default=100, show_default=True, help="Rows per output shard.")
@click.option("--workers", type=int, default=None, help="Dask workers [default: cores / threads per worker].")
@click.option("--threads-per-worker", type=int, default=1, show_default=True, help="Threads per Dask worker.")
@click.option("--decode-processes", type=click.IntRange(min=0), default=None,
              help="Decode/align processes per worker [default: as facesearch embed].")  # fmt: skip
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--precision", type=click.Choice(("auto", "fp32", "bf16")), default="auto", show_default=True,
              help="Autocast (as facesearch embed).")  # fmt: skip
@click.option("--repeats", type=int, default=2, show_default=True, help="Runs of each path; the best is reported.")
@click.option("--detect", is_flag=True, help="YuNet detection instead of the list's landmarks.")
@click.option("--json", type=_JSON, default=None, help="Also write the results here.")
@user_errors
def embed_command(**opts: Any) -> None:
    """Images/s of the Dask embedding pipeline against the model alone on the same images."""
    from facesearch.benchmarks.speed import embed_speed

    click.echo(embed_speed.format_report(embed_speed.run(embed_speed.EmbedSpeedConfig(**opts))))


@speed.command("index")
@click.option("--work", type=_DIR, default=Path("/tmp/facesearch-index-bench"), show_default=True,
              help="Scratch directory.")  # fmt: skip
@click.option("--rows", type=int, default=1_000_000, show_default=True, help="Gallery rows.")
@click.option("--dim", type=int, default=1024, show_default=True, help="Feature dimension.")
@click.option("--identities", type=int, default=10_000, show_default=True, help="Gallery identities.")
@click.option("--queries", type=int, default=3530, show_default=True,
              help="Probes (one per identity; <= identities).")  # fmt: skip
@click.option("--k", type=int, default=10, show_default=True, help="Neighbours per query.")
@click.option("--kinds", default="flat", show_default=True, help="Comma-separated index kinds to build.")
@click.option("--tile-rows", type=int, default=16384, show_default=True, help="Gallery rows per search tile.")
@click.option("--block-rows", type=int, default=65536, show_default=True, help="Rows read from the shards at a time.")
@click.option("--backends", default="faiss:none,torch:none,torch:bf16", show_default=True,
              help="Comma-separated back-end:screen pairs of the exact search.")  # fmt: skip
@click.option("--keep", is_flag=True, help="Keep the scratch directory.")
@click.option("--in-process", is_flag=True, help="Run every stage in this process (quick checks; cumulative RSS).")
@user_errors
def index_command(**opts: Any) -> None:
    """Index build and exact search on synthetic features: seconds, peak RSS, recall, the GEMM floor."""
    from facesearch.benchmarks.speed import index_speed

    click.echo(index_speed.format_report(index_speed.run(index_speed.IndexSpeedConfig(**opts))))


@speed.command("search")
@click.option("--rows", type=int, default=1_000_000, show_default=True, help="Database rows (nb).")
@click.option("--queries", type=int, default=3530, show_default=True, help="Queries (nq).")
@click.option("--dim", type=int, default=1024, show_default=True, help="Feature dimension (d).")
@click.option("--identities", type=int, default=10_000, show_default=True, help="Identity centres of the data.")
@click.option("--k", type=int, default=10, show_default=True, help="Neighbours per query.")
@click.option("--device", default="cpu", show_default=True, help=_DEVICE_HELP)
@click.option("--backends", default="faiss:none,torch:none,torch:bf16", show_default=True,
              help="Comma-separated back-end:screen pairs.")  # fmt: skip
@click.option("--tile-rows", type=int, default=65536, show_default=True, help="Database rows per GEMM tile.")
@click.option(
    "--block-rows", type=int, default=262144, show_default=True, help="Rows streamed to the search at a time."
)
@user_errors
def search_command(**opts: Any) -> None:
    """Exact top-k search per back-end against the device's GEMM floor."""
    from facesearch.benchmarks.speed import search_speed

    click.echo(search_speed.format_report(search_speed.run(search_speed.SearchSpeedConfig(**opts))))


@speed.command("crop-store")
@click.option("--images", type=int, default=256, show_default=True, help="Synthetic training images.")
@click.option("--identities", type=int, default=16, show_default=True, help="Synthetic identities.")
@click.option("--image-size", type=int, default=250, show_default=True, help="Side of the synthetic JPEGs in pixels.")
@click.option("--arch", default="fast", show_default=True, help="Architecture of the network.")
@click.option("--width", type=float, default=0.25, show_default=True, help="Filter-count multiplier.")
@click.option("--input-size", default="112x96", show_default=True, help="Network input HEIGHTxWIDTH.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per step.")
@click.option("--workers", type=int, default=None, help="DataLoader workers [default: min(2, CPUs)].")
@click.option("--device", default="cpu", show_default=True, help=_DEVICE_HELP)
@click.option("--precision", default="fp32", show_default=True, help="fp32, bf16 or auto (as facesearch train).")
@click.option("--json", type=_JSON, default=None, help="Also write the results here.")
@user_errors
def crop_store_command(**opts: Any) -> None:
    """Data-loader images/s without and with the crop store, against the model's training step alone."""
    from facesearch.benchmarks.speed import crop_store

    click.echo(crop_store.format_report(crop_store.run(crop_store.CropStoreSpeedConfig(**opts))))


@speed.command("megaface")
@click.option("--work", type=_DIR, default=Path("runs/megaface_speed"), show_default=True,
              help="Folder for features and results.")  # fmt: skip
@click.option("--rows", type=int, default=1_000_000, show_default=True,
              help="Distractors (all of them form the one drawn list).")  # fmt: skip
@click.option("--dim", type=int, default=1024, show_default=True, help="Feature dimension.")
@click.option("--probes", type=int, default=3530, show_default=True,
              help="Probe images (80 identities, fewer below 160 probes).")  # fmt: skip
@click.option("--device", default="cpu", show_default=True, help=_DEVICE_HELP)
@click.option(
    "--screen",
    type=click.Choice(["auto", "int8", "none"]),
    default="auto",
    show_default=True,
    help="Screen of the products: int8 (where the CPU has int8 dot-product units under auto) or none.",
)
@user_errors
def megaface_command(**opts: Any) -> None:
    """The MegaFace run on synthetic features against the float32 GEMM floor, with peak memory."""
    from facesearch.benchmarks.speed import megaface_speed

    cfg = megaface_speed.MegafaceSpeedConfig(**opts)
    summary = megaface_speed.run(cfg, progress=lambda msg: click.echo(f"[megaface] {msg}"))
    click.echo(json.dumps(summary, indent=1))
    click.echo(f"wrote {cfg.work / 'speed.json'}")


@speed.command("latency")
@click.option("--shards", type=_DIR, default=None, help="Gallery shard directory [default: a synthetic one in --work].")
@click.option("--probes", type=_DIR, default=None, help="Probe shard directory (queries) [default: gallery vectors].")
@click.option("--rows", type=int, default=100_000, show_default=True, help="Synthetic gallery size (without --shards).")
@click.option("--dim", type=int, default=1024, show_default=True, help="Feature dimension of the synthetic gallery.")
@click.option("--kinds", default="flat,ivf-flat", show_default=True, help="Comma-separated index kinds.")
@click.option("--single", type=int, default=100, show_default=True, help="Queries timed one at a time.")
@click.option("--batch", type=int, default=256, show_default=True, help="Queries in the batched call.")
@click.option("--k", type=int, default=10, show_default=True, help="Neighbours per query.")
@click.option("--http", is_flag=True, help="Load `facesearch serve` on the flat index with wrk.")
@click.option("--concurrency", default="1,4,16", show_default=True, callback=_ints,
              help="Comma-separated wrk client counts.")  # fmt: skip
@click.option("--http-seconds", type=int, default=20, show_default=True, help="Seconds of each wrk run.")
@click.option("--work", type=_DIR, default=Path("runs/search_latency"), show_default=True,
              help="Folder for the indexes and the results.")  # fmt: skip
@user_errors
def latency_command(**opts: Any) -> None:
    """Query latency and throughput of the search engine per index kind and filter, and over HTTP."""
    from facesearch.benchmarks.speed import search_latency

    cfg = search_latency.SearchLatencyConfig(**opts)
    click.echo(search_latency.markdown(search_latency.run(cfg)))
    click.echo(f"wrote {cfg.work / 'latency.json'} and latency.md")


__all__ = ["speed"]
