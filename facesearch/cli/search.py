"""``facesearch search``: who is this?  Rank-k identification against an index (see :mod:`facesearch.engine.search`).

Queries are L2-normalised by the library before the search (scores are cosines); a query row with NaN or infinite
values, or all zeros, is a one-line error naming it.  ``--out`` writes every hit to a file and prints a summary."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facesearch.cli._app import DEVICE_OPTION, SCREEN_OPTION, error_message, finite, main, user_errors
from facesearch.engine.search import STRATEGIES, QueryResult, SearchEngine, format_results, threshold_from_result
from facesearch.indexer import shards
from facesearch.indexer.embed import walk_images
from facesearch.indexer.search import normalize_queries
from facesearch.model.faces.datasets import IMAGE_SUFFIXES
from facesearch.model.fileio import atomic_write_text, atomic_write_with


def _read_embeddings(path: Path) -> tuple[np.ndarray, list[str]]:
    """Query embeddings from a .npy (n, d), a Parquet file with an ``embedding`` column, or a shard directory, in
    their stored precision (the library scales them before rounding to float32; a null Parquet row becomes NaN,
    which the search refuses by row).  A file that cannot be read as one of these, or holds no rows, is a
    ``ValueError`` naming it."""
    if path.is_dir():
        block = shards.read_all(path, columns=["path"])
        x, names = block.xb, [str(p) for p in block.meta.column("path").to_pylist()]
    elif path.suffix == ".npy":
        x, names = _read_npy(path)
    elif path.suffix == ".parquet":
        x, names = _read_parquet(path)
    else:
        raise ValueError(f"{path}: embeddings must be .npy, .parquet or a shard directory")
    if not len(x):
        raise ValueError(f"{path} holds no query rows")
    return x, names


def _read_npy(path: Path) -> tuple[np.ndarray, list[str]]:
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, pickle.UnpicklingError) as e:  # numpy's errors do not name the file
        raise ValueError(f"{path}: not a readable .npy array of numbers ({error_message(e)})") from e
    if not isinstance(x, np.ndarray) or x.ndim != 2 or not _real(x.dtype):
        what = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{path}: expected an (n, d) array of real embeddings, got {what}")
    return x, [f"{path.name}[{i}]" for i in range(len(x))]


def _real(dtype: np.dtype) -> bool:
    return bool(np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer))


def _read_parquet(path: Path) -> tuple[np.ndarray, list[str]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid says "Parquet magic bytes not found", not which file
        raise ValueError(f"{path}: not a readable Parquet file ({error_message(e)})") from e
    if "embedding" not in table.column_names:
        raise ValueError(f"{path}: no 'embedding' column (have {table.column_names})")
    column = table.column("embedding")
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)):  # fmt: skip
        raise ValueError(f"{path}: the 'embedding' column must hold a list of numbers per row, got {column.type}")
    rows = column.to_pylist()
    d = max((len(r) for r in rows if r is not None), default=0)
    try:
        x = np.asarray([[np.nan] * d if r is None else r for r in rows], dtype=np.float64).reshape(len(rows), d)
    except (ValueError, TypeError):
        raise ValueError(f"{path}: the 'embedding' rows must all hold {d} numbers") from None
    names = table.column("path").to_pylist() if "path" in table.column_names else range(len(x))
    return x, [str(n) for n in names]


def _queries(x: np.ndarray, source: Path, d: int) -> np.ndarray:
    """Read query embeddings checked against the index and L2-normalised (what the search does itself, done here so
    that a bad row is reported with its file); the library leaves unit rows as they are."""
    if x.shape[1] != d:
        raise ValueError(f"{source}: queries have d={x.shape[1]} but the index holds d={d}")
    try:
        return normalize_queries(x)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _images(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{path}: not an image file (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
        return [path]
    files = walk_images(path)
    if not files:
        raise ValueError(f"{path}: no image files in this folder (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _parse_ids(text: str) -> list[int]:
    tokens = [t.strip() for t in text.split(",")]
    try:
        if not all(tokens):
            raise ValueError("empty id")
        return [int(t) for t in tokens]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integer ids such as 5,77, got {text!r}",
                                 param_hint="'--ids'") from None  # fmt: skip


def _check_out(out: Path) -> None:
    """Refuse an --out the search could not write, before searching: by suffix, and its nearest existing folder
    (missing folders below it are created) must be a writable directory."""
    if out.suffix not in (".parquet", ".json"):
        raise click.BadParameter(f"{out}: the file name must end in .parquet or .json (it picks the format)",
                                 param_hint="'--out'")  # fmt: skip
    folder = next(p for p in out.absolute().parents if p.exists())
    if not folder.is_dir():
        raise click.BadParameter(f"{out}: {folder} is not a directory", param_hint="'--out'")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{out}: the directory {folder} is not writable", param_hint="'--out'")


def _rows(names: list[str], results: list[QueryResult]) -> pa.Table:
    cols: dict[str, list[Any]] = {"query": [], "rank": [], "id": [], "path": [], "identity": [], "score": []}
    for name, res in zip(names, results, strict=True):
        for r, h in enumerate(res.hits, 1):
            for key, value in (("query", name), ("rank", r), ("id", h.id), ("path", h.path),
                               ("identity", h.identity), ("score", h.score)):  # fmt: skip
                cols[key].append(value)
            for a, v in h.attributes.items():
                cols.setdefault(a, []).append(v)
    return pa.table(cols)


def _summary(results: list[QueryResult], out: Path) -> str:
    """What ``--out`` prints instead of every hit: one line."""
    hits = sum(len(r.hits) for r in results)
    strategies = ", ".join(sorted({r.strategy for r in results})) or "none"
    ms = 1e3 * sum(r.seconds for r in results) / max(len(results), 1)
    line = f"{len(results)} queries, {hits} hits ({strategies} search, {ms:.1f} ms per query)"
    if any(r.accepted is not None for r in results):
        line += f", {sum(bool(r.accepted) for r in results)} accepted at the threshold"
    return f"{line}; results: {out}"


@main.command("search")
@click.option("--index", "index_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True)
@click.option("--probes", type=click.Path(path_type=Path, exists=True), help="A probe image or a folder of them.")
@click.option("--embeddings", type=click.Path(path_type=Path, exists=True),
              help="Query embeddings: .npy (n, d), .parquet with an 'embedding' column, or shards.")  # fmt: skip
@click.option("--ids", help="Query by gallery ids, e.g. 5,77 (each query is the id's stored vector).")
@click.option("--exclude-self", is_flag=True,
              help="With --ids: leave each query's own id out of its hits (still k hits; grouped, only that item "
                   "is left out, its identity still ranks by its other items).")  # fmt: skip
@click.option("--checkpoint", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="The model that built the index (needed for --probes; another model is refused).")  # fmt: skip
@click.option("--detector-pad", type=click.IntRange(min=0), default=0, show_default=True,
              help="Black border added around probe images before detection (tightly cropped faces).")  # fmt: skip
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Hits (or identities) per query; a k above the gallery size returns the whole gallery, "
                   "ranked.")  # fmt: skip
@click.option("--filter", "expr", help='Attribute filter, e.g. "Male > 0.5 and Big_Nose", "not Chubby".')
@click.option("--group-by", type=click.Choice(["identity"]), help="Aggregate hits per identity.")
@click.option("--agg", type=click.Choice(["max", "mean"]), default="max", show_default=True)
@click.option("--soft-weight", type=click.FloatRange(0, 1), default=0.0, callback=finite, show_default=True,
              help="Soft mode: rank by (1-w)*score + w*attribute agreement (image or id queries).")  # fmt: skip
@click.option(
    "--threshold",
    type=float,
    callback=finite,
    help="Open-set threshold on the score (a cosine: queries are L2-normalised as the gallery is).",
)
@click.option("--threshold-from", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Take the threshold from a bench megaface result file at --far.")  # fmt: skip
@click.option("--far", type=click.FloatRange(0, 1), default=1e-6, show_default=True, callback=finite,
              help="FAR for --threshold-from.")  # fmt: skip
@click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    default="auto",
    show_default=True,
    help="Filter strategy (auto: by selectivity; subset / masked need a flat index).",
)
@SCREEN_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False),
              help="Write all hits to a .parquet/.json (by suffix; missing folders are created) and print only a "
                   "one-line summary (with --json the JSON is still printed).")  # fmt: skip
@DEVICE_OPTION
@user_errors
def search_command(index_dir: Path, probes: Path | None, embeddings: Path | None, ids: str | None,
                   exclude_self: bool, checkpoint: Path | None, detector_pad: int, k: int, expr: str | None,
                   group_by: str | None, agg: str, soft_weight: float, threshold: float | None,
                   threshold_from: Path | None, far: float, strategy: str, screen: str, as_json: bool,
                   out: Path | None, device: str) -> None:  # fmt: skip
    """Rank-k identification of probe faces (images, embeddings or gallery ids) against an index.

    Every query is L2-normalised as the gallery's embeddings are, so scores are cosine similarities and
    --threshold / --threshold-from compare cosines whatever the scale of the query; a query row with NaN or
    infinite values, or all zeros, is refused with an error naming it.  A mistake (an unknown id, an unreadable
    file, a bad filter) is one line starting with "Error:" and a non-zero exit status (2 for a bad option)."""
    if sum(x is not None for x in (probes, embeddings, ids)) != 1:
        raise click.UsageError("give exactly one of --probes, --embeddings, --ids")
    if exclude_self and ids is None:
        raise click.UsageError("--exclude-self needs --ids (only a query by id has an id of its own in the index)")
    if probes is not None and checkpoint is None:
        raise click.UsageError("--probes needs --checkpoint (the model that built the index embeds the probes)")
    if threshold is not None and threshold_from is not None:
        raise click.UsageError("give --threshold or --threshold-from, not both")
    if out is not None:
        _check_out(out)
    if threshold_from is not None:
        threshold = threshold_from_result(threshold_from, far)
    # Read the queries before loading the index: a bad input file fails at once.
    wanted = _parse_ids(ids) if ids is not None else []
    images = _images(probes) if probes is not None else []
    x, names = _read_embeddings(embeddings) if embeddings is not None else (None, [])
    engine = SearchEngine.open(index_dir, checkpoint=checkpoint, device=device, screen=screen)
    probe_attrs, exclude = None, None
    if probes is not None:
        xq, probe_attrs, names = engine.embed_images(images, pad=detector_pad)
    elif x is not None:
        assert embeddings is not None
        xq = _queries(x, embeddings, engine.d)
    else:
        rows = engine.rows(wanted)
        xq, names = engine.vectors(wanted), [f"id {i}" for i in wanted]
        probe_attrs = np.stack([engine.columns[a][rows] for a in engine.attribute_names], axis=1)
        exclude = wanted if exclude_self else None
    results = engine.search(xq, k=k, filter=expr, group_by=group_by, agg=agg, threshold=threshold,
                            soft_weight=soft_weight, probe_attributes=probe_attrs, strategy=strategy,
                            exclude_ids=exclude)  # fmt: skip
    docs = [{"query": n, **r.to_dict()} for n, r in zip(names, results, strict=True)]
    if out is not None:
        if out.suffix == ".parquet":
            table = _rows(names, results)
            atomic_write_with(out, lambda tmp: pq.write_table(table, tmp))
        else:
            atomic_write_text(out, json.dumps(docs, indent=1) + "\n")
    if as_json:
        click.echo(json.dumps(docs, indent=1))
    elif out is None:
        click.echo(format_results(names, results, engine.attribute_names, engine.parse(expr).names if expr else ()))
    if out is not None:
        click.echo(_summary(results, out))
