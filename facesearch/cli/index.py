"""``facesearch index ...`` (build / add / remove / info) and ``facesearch synth features``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np
import pyarrow.parquet as pq

from facesearch.cli._app import C_INT, finite, main, user_errors
from facesearch.cli.synth import synth
from facesearch.indexer.index import KINDS, IndexConfig, IndexInfo, add_to_index, build_index, load_index, remove_ids
from facesearch.indexer.index_store import ATTR_FILE, current_layout
from facesearch.indexer.manifest import describe_attribute_source
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features

_DIR = click.Path(file_okay=False, path_type=Path)
_EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)
_ID_MODES = {"offset": "offset given", "fresh": "fresh ids"}  # index_info.json's id_mode, as `index info` says it


def _summary(info: IndexInfo, where: Path) -> str:
    recall = ", ".join(f"{k} {v:.4f}" for k, v in info.recall.items() if k.startswith("recall@"))
    return (f"{info.kind} index of {info.nb} x {info.d} in {where}: built in {info.build_seconds:.1f} s, "
            f"peak RSS {info.peak_rss_bytes / 2**30:.2f} GiB" + (f", {recall}" if recall else ""))  # fmt: skip


@main.group()
def index() -> None:
    """FAISS index directories built from embedding shards: index.faiss, attributes.parquet, index_info.json (in a
    generation directory that the file CURRENT names; every update switches it at once)."""


@index.command("build")
@click.option("--shards", "shards_dir", required=True, type=_EXISTING_DIR, help="Shard directory (embed output).")
@click.option("--out", required=True, type=_DIR, help="New (or empty) index directory.")
@click.option("--kind", type=click.Choice(KINDS), default="flat", show_default=True, help="Index kind.")
@click.option("--nlist", default=1024, type=C_INT, show_default=True, help="IVF lists (ivf-flat, ivf-pq).")
@click.option("--nprobe", default=32, type=C_INT, show_default=True, help="IVF lists probed per query.")
@click.option("--m", "m", default=64, type=C_INT, show_default=True,
              help="PQ sub-quantizers (d must be divisible by it).")  # fmt: skip
@click.option("--nbits", default=8, type=click.IntRange(1, 16), show_default=True, help="Bits per PQ code.")
@click.option("--hnsw-m", default=32, type=C_INT, show_default=True, help="HNSW neighbours per node.")
@click.option("--ef-construction", default=200, type=C_INT, show_default=True, help="HNSW beam width while building.")
@click.option("--ef-search", default=128, type=C_INT, show_default=True, help="HNSW beam width while searching.")
@click.option("--train-size", default=100_000, show_default=True, help="Vectors sampled to train IVF / PQ.")
@click.option("--block-rows", default=65536, show_default=True, help="Rows streamed at a time (bounds memory).")
@click.option("--recall-sample", default=1000, show_default=True, help="Queries for recall@1/@10 (flat: <= 100).")
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option("--id-offset", default=0, show_default=True, help="Index id = shard row id + this.")
@user_errors
def build(shards_dir: Path, out: Path, kind: str, nlist: int, nprobe: int, m: int, nbits: int, hnsw_m: int,
          ef_construction: int, ef_search: int, train_size: int, block_rows: int, recall_sample: int,
          seed: int, id_offset: int) -> None:  # fmt: skip
    """Stream a shard directory into a new index directory and measure its recall against exact search (a returned
    id scoring as high as the exact k-th result counts, so ties and duplicate rows count whatever their order).
    The shards are verified against their manifest (size, SHA-256) first."""
    cfg = IndexConfig(kind=kind, nlist=nlist, nprobe=nprobe, m=m, nbits=nbits, hnsw_m=hnsw_m,
                      ef_construction=ef_construction, ef_search=ef_search, train_size=train_size,
                      block_rows=block_rows, recall_sample=recall_sample, seed=seed)  # fmt: skip
    click.echo(_summary(build_index(shards_dir, out, cfg, id_offset=id_offset), out))


@index.command("add")
@click.option("--index", "index_dir", required=True, type=_EXISTING_DIR, help="Existing index directory.")
@click.option("--shards", "shards_dir", required=True, type=_EXISTING_DIR, help="Shards of the same model.")
@click.option("--id-offset", type=int, default=None,
              help="Index id = shard row id + N (every embed output numbers its rows from 0).")  # fmt: skip
@click.option("--fresh-ids", is_flag=True,
              help="Choose the offset: new ids start after the largest id the index ever held.")  # fmt: skip
@click.option("--shard-ids-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Add only the shard rows with these ids (as in the shards, before the offset): a text file, one "
                   "per line (or separated by spaces); e.g. to enrol some images of a probe set.")  # fmt: skip
@user_errors
def add(index_dir: Path, shards_dir: Path, id_offset: int | None, fresh_ids: bool,
        shard_ids_file: Path | None) -> None:  # fmt: skip
    """Append new shards (same model fingerprint and d).  Rows already indexed unchanged are skipped; an id taken
    by a different row is an error (add a second gallery with --fresh-ids or --id-offset).  Re-adding the same
    shard directory keeps its offset and adds only what is missing.  --shard-ids-file enrols only the listed rows
    (e.g. some images of a probe set); the rest of the set can follow later under the same offset."""
    if fresh_ids and id_offset is not None:
        raise click.UsageError("give --id-offset or --fresh-ids, not both")
    take = None
    if shard_ids_file is not None:
        wanted = _read_ids_file(shard_ids_file, "'--shard-ids-file'")
        if too_big := [i for i in wanted if not _INT64_MIN <= i <= _INT64_MAX]:
            raise click.BadParameter(f"{shard_ids_file}: ids are 64-bit integers; {too_big[0]} is out of range",
                                     param_hint="'--shard-ids-file'")  # fmt: skip
        take = np.unique(np.asarray(wanted, dtype=np.int64))
    r = add_to_index(index_dir, shards_dir, id_offset=id_offset, fresh_ids=fresh_ids, shard_ids=take)
    if not r.changed and r.prior is not None:
        click.echo(f"already added: {shards_dir} (manifest SHA-256 {r.prior['manifest_sha256'][:12]}…) went in "
                   f"on {r.prior.get('time', '?')} with id offset {r.id_offset}, and its {r.skipped_present} rows are "
                   f"all in the index; nothing changed (nb = {r.info.nb})")  # fmt: skip
        return
    where = f"id offset {r.id_offset}: {r.note}" if r.note.startswith("fresh") else f"id offset {r.id_offset}"
    tail = f"; nb = {r.info.nb}" if r.changed else f"; nothing changed (nb = {r.info.nb})"
    of = "" if take is None else f" of the {len(take)} selected"
    click.echo(f"added {r.added}{of} rows ({r.skipped_present} already present) with {where}{tail}")


@index.command("remove")
@click.option("--index", "index_dir", required=True, type=_EXISTING_DIR, help="Existing index directory.")
@click.option("--id", "ids", multiple=True, type=int, help="An id to delete (repeatable).")
@click.option("--ids-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file of ids to delete, one per line (or separated by spaces).")  # fmt: skip
@click.option("--missing-ok", is_flag=True,
              help="When none of the ids is in the index, do nothing instead of failing (e.g. a removal run "
                   "again).")  # fmt: skip
@user_errors
def remove(index_dir: Path, ids: tuple[int, ...], ids_file: Path | None, missing_ok: bool) -> None:
    """Delete ids from the index, its id mapping and its attribute table.  Ids the index does not hold are named in
    the summary; when it holds none of them, nothing would change, and that is an error unless --missing-ok."""
    wanted = list(ids)
    if ids_file is not None:
        wanted += _read_ids_file(ids_file)
    if not wanted:
        raise click.UsageError("give --id and/or --ids-file")
    if too_big := [i for i in wanted if not _INT64_MIN <= i <= _INT64_MAX]:
        raise click.BadParameter(f"ids are 64-bit integers; {too_big[0]} is out of range", param_hint="'--id'")
    requested = np.unique(np.asarray(wanted, dtype=np.int64))
    present = pq.read_table(current_layout(index_dir).path(ATTR_FILE), columns=["id"]).column("id").to_numpy()
    unknown = np.setdiff1d(requested, present)
    shown = ", ".join(map(str, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    if len(unknown) == len(requested) and not missing_ok:
        raise ValueError(f"id(s) {shown} not in the index {index_dir}: nothing to remove (--missing-ok accepts that)")
    info = remove_ids(index_dir, requested)
    missing = f" ({len(unknown)} not in the index: {shown})" if len(unknown) else ""
    click.echo(f"removed {info.history[-1]['removed']} of {len(requested)} ids{missing}; nb = {info.nb}")


def _read_ids_file(path: Path, hint: str = "'--ids-file'") -> list[int]:
    """The integer ids of a text file (whitespace-separated); a bad token is a usage error naming its line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise click.BadParameter(f"{path} is not a text file of ids", param_hint=hint) from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for tok in line.split():
            try:
                out.append(int(tok))
            except ValueError:
                raise click.BadParameter(f"{path} line {n}: {tok[:40]!r} is not an integer id",
                                         param_hint=hint) from None  # fmt: skip
    if not out:
        raise click.BadParameter(f"{path} holds no ids", param_hint=hint)
    return out


@index.command("info")
@click.option("--index", "index_dir", required=True, type=_EXISTING_DIR, help="Index directory.")
@click.option("--json", "as_json", is_flag=True, help="Print index_info.json as is.")
@click.option(
    "--verify",
    is_flag=True,
    help="Also check the SHA-256 of index.faiss and scan the stored vectors for NaN / inf (~3 s per GB).",
)
@user_errors
def info(index_dir: Path, as_json: bool, verify: bool) -> None:
    """Check an index directory loads consistently (sizes, checksums of the small files, and the FAISS header,
    attribute table and index_info.json against each other) and print its summary."""
    t0 = time.perf_counter()
    loaded = load_index(index_dir, verify=verify)
    if as_json:
        click.echo(json.dumps(loaded.info.to_dict(), indent=2))
        return
    click.echo(_summary(loaded.info, index_dir))
    click.echo(f"  fingerprint {loaded.info.fingerprint}; history: "
               + ", ".join(f"{e['op']} {e['time']}" for e in loaded.info.history))  # fmt: skip
    click.echo(f"  attributes from {describe_attribute_source(loaded.info.attribute_provenance)}")
    for s in loaded.info.sources:
        ids = s.get("index_ids")
        how = [_ID_MODES[s["id_mode"]]] if s.get("id_mode") in _ID_MODES else []
        if s.get("rows_selected") is not None:
            how.append(f"{s['rows_selected']} rows selected")
        click.echo(f"  source {s.get('shards_dir')} (manifest {str(s.get('manifest_sha256'))[:12]}…): id offset "
                   f"{s.get('id_offset')}, " + (f"ids {ids[0]}..{ids[1] - 1}" if ids else "no rows")
                   + (f" ({', '.join(how)})" if how else ""))  # fmt: skip
    if not loaded.info.files:
        click.echo("  checksums: none recorded (an index from before them; the next add / remove records them)"
                   + ("; every stored vector finite" if verify else ""))  # fmt: skip
    elif verify:
        click.echo(
            f"  verified: SHA-256 of every file and every stored vector finite ({time.perf_counter() - t0:.1f} s)"
        )
    else:
        click.echo("  checked: sizes, SHA-256 of attributes.parquet and index_info.json, files agree with each other "
                   "(--verify also hashes index.faiss and scans the vectors)")  # fmt: skip


@synth.command("features")
@click.option("--out", required=True, type=_DIR, help="New (or empty) shard directory.")
@click.option("--rows", default=1_000_000, show_default=True, help="Gallery rows.")
@click.option("--dim", default=1024, show_default=True, help="Embedding dimension d.")
@click.option("--identities", default=10_000, show_default=True, help="Identities (rows are split evenly).")
@click.option("--spread", default=0.8, show_default=True, callback=finite,
              help="Within-identity noise: row = c + spread*g/sqrt(d).")  # fmt: skip
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Stored embedding dtype.")  # fmt: skip
@click.option("--shard-rows", default=100_000, show_default=True, help="Rows per Parquet shard.")
@click.option("--seed", default=0, type=click.IntRange(min=0), show_default=True,
              help="Seed of the identity space (centres, attributes).")  # fmt: skip
@click.option("--probes-per-identity", default=0, show_default=True,
              help="Write probes instead: N new rows per identity (same seed/dim: mates in the gallery).")  # fmt: skip
@click.option("--probe-identities", type=int, default=None, help="Probe only the first N identities [default: all].")
@user_errors
def features(out: Path, rows: int, dim: int, identities: int, spread: float, dtype: str, shard_rows: int, seed: int,
             probes_per_identity: int, probe_identities: int | None) -> None:  # fmt: skip
    """Identity-clustered synthetic embeddings + attribute probabilities, in the shard format, at million scale."""
    cfg = SynthFeaturesConfig(out=out, rows=rows, dim=dim, identities=identities, spread=spread, dtype=dtype,
                              shard_rows=shard_rows, seed=seed, probes_per_identity=probes_per_identity,
                              probe_identities=probe_identities)  # fmt: skip
    s = write_synth_features(cfg)
    click.echo(f"wrote {s.rows} rows in {s.shards} shards to {s.out} in {s.seconds:.1f} s "
               f"({s.rows_per_second:.0f} rows/s); fingerprint {s.fingerprint}")  # fmt: skip
