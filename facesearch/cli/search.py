"""``facesearch search``: who is this?  Rank-k identification against an index (see :mod:`facesearch.engine.search`).

Queries are L2-normalised by the library before the search (scores are cosines); a query row with NaN or infinite
values, or all zeros, is a one-line error naming it.  ``--out`` writes every hit to a file and prints a summary."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import click
import pyarrow.parquet as pq

from facesearch.benchmarks.thresholds import threshold_from_result
from facesearch.cli._app import DEVICE_OPTION, SCREEN_OPTION, config_option, default_of, finite, user_errors
from facesearch.engine.attribute_match import AttributeMatch, match_summary, resolve_match
from facesearch.engine.queries import (
    id_queries,
    parse_ids,
    prepare_queries,
    query_images,
    read_query_embeddings,
    results_records,
    results_table,
)
from facesearch.engine.search import STRATEGIES, QueryResult, SearchEngine, format_results
from facesearch.model.fileio import atomic_write_text, atomic_write_with

_option = functools.partial(config_option, SearchEngine.search)


def _parse_ids(text: str) -> list[int]:
    try:
        return parse_ids(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--ids'") from None


def _match_names(text: str) -> list[str]:
    """--match's attribute names (``all`` is resolved once the index is open)."""
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise click.BadParameter(f"expected comma-separated attribute names such as Male,Big_Nose, or all; got "
                                 f"{text!r}", param_hint="'--match'")  # fmt: skip
    return names


def _check_match(match: str | None, max_mate_loss: float | None, margin: float | None, embeddings: Path | None) -> None:
    """The combinations of --match, --max-mate-loss and --match-margin a search can run."""
    if match is None:
        if max_mate_loss is not None or margin is not None:
            raise click.UsageError("--max-mate-loss and --match-margin go with --match (the attributes the probe must "
                                   "not be confidently opposed on)")  # fmt: skip
        return
    if (max_mate_loss is None) == (margin is None):
        raise click.UsageError("--match needs exactly one of --max-mate-loss (margins chosen from the index's "
                               "validation statistics) and --match-margin (one fixed margin)")  # fmt: skip
    if embeddings is not None:
        raise click.UsageError("--match needs the probes' predicted attributes: use --probes or --ids (embedding "
                               "queries carry none)")  # fmt: skip


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


def _summary(results: list[QueryResult], out: Path) -> str:
    """What ``--out`` prints instead of every hit: one line."""
    hits = sum(len(r.hits) for r in results)
    strategies = ", ".join(sorted({r.strategy for r in results})) or "none"
    ms = 1e3 * sum(r.seconds for r in results) / max(len(results), 1)
    line = f"{len(results)} queries, {hits} hits ({strategies} search, {ms:.1f} ms per query)"
    if any(r.accepted is not None for r in results):
        line += f", {sum(bool(r.accepted) for r in results)} accepted at the threshold"
    return f"{line}; results: {out}"


@click.command("search")
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
@click.option("--attributes-from", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="The predictor that filled the index's attributes, if not at its recorded path.")  # fmt: skip
@click.option("--detector-pad", type=click.IntRange(min=0), default=default_of(SearchEngine.embed_images, "pad"),
              show_default=True, help="Black border added around probe images before detection (tightly cropped "
              "faces).")  # fmt: skip
@_option(
    "-k",
    "k",
    type=click.IntRange(min=1),
    help="Hits (or identities) per query; a k above the gallery size returns the whole gallery, ranked.",
)
@click.option("--filter", "expr", help='Attribute filter, e.g. "Male > 0.5 and Big_Nose", "not Chubby".')
@click.option("--group-by", type=click.Choice(["identity"]), help="Aggregate hits per identity.")
@_option("--agg", type=click.Choice(["max", "mean"]))
@_option("--soft-weight", type=click.FloatRange(0, 1), callback=finite,
         help="Soft mode: rank by (1-w)*score + w*attribute agreement (image or id queries).")  # fmt: skip
@click.option("--match", "match_names",
              help="Keep only items whose predicted attributes are not confidently opposed to the probe's "
                   "own, e.g. Male,Big_Nose or all (image or id queries; with --max-mate-loss or "
                   "--match-margin).")  # fmt: skip
@click.option("--max-mate-loss", type=click.FloatRange(0, 1, max_open=True), callback=finite,
              help="With --match: margins chosen from the index's validation statistics so that at most this share "
                   "of true mates is predicted lost.")  # fmt: skip
@click.option("--match-margin", type=click.FloatRange(0, 0.5), callback=finite,
              help="With --match: one margin m for every attribute (confident: p > 1 - m or p < m).")  # fmt: skip
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
@_option(
    "--strategy",
    type=click.Choice(STRATEGIES),
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
                   exclude_self: bool, checkpoint: Path | None, attributes_from: Path | None, detector_pad: int,
                   k: int, expr: str | None,
                   group_by: str | None, agg: str, soft_weight: float, match_names: str | None,
                   max_mate_loss: float | None, match_margin: float | None, threshold: float | None,
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
    _check_match(match_names, max_mate_loss, match_margin, embeddings)
    matched = _match_names(match_names) if match_names not in (None, "all") else None
    if out is not None:
        _check_out(out)
    if threshold_from is not None:
        threshold = threshold_from_result(threshold_from, far)
    # Read the queries before loading the index: a bad input file fails at once.
    wanted = _parse_ids(ids) if ids is not None else []
    images = query_images(probes) if probes is not None else []
    x, names = read_query_embeddings(embeddings) if embeddings is not None else (None, [])
    engine = SearchEngine.open(
        index_dir, checkpoint=checkpoint, device=device, screen=screen, attributes_from=attributes_from
    )
    match, resolved = None, None
    if match_names is not None:  # resolved before any probe is embedded: a missing statistic fails at once
        margins = None if match_margin is None else (match_margin,)
        match = AttributeMatch(tuple(matched or engine.attribute_names), margins, max_mate_loss)
        resolved = resolve_match(match, engine.attribute_names, engine.loaded.info.attribute_provenance)
    probe_attrs, exclude = None, None
    if probes is not None:
        xq, probe_attrs, names = engine.embed_images(images, pad=detector_pad)
    elif x is not None:
        assert embeddings is not None, "x comes from --embeddings"
        xq = prepare_queries(x, engine.d, embeddings)
    else:
        xq, probe_attrs, names = id_queries(engine, wanted)
        exclude = wanted if exclude_self else None
    results = engine.search(xq, k=k, filter=expr, group_by=group_by, agg=agg, threshold=threshold,
                            soft_weight=soft_weight, probe_attributes=probe_attrs, strategy=strategy,
                            exclude_ids=exclude, match=match)  # fmt: skip
    if resolved is not None and not as_json:
        click.echo(match_summary(resolved, [r.passing or 0 for r in results], len(engine.columns["id"])))
    docs = results_records(names, results)
    if out is not None:
        if out.suffix == ".parquet":
            table = results_table(names, results)
            atomic_write_with(out, lambda tmp: pq.write_table(table, tmp))
        else:
            atomic_write_text(out, json.dumps(docs, indent=1) + "\n")
    if as_json:
        click.echo(json.dumps(docs, indent=1))
    elif out is None:
        first = [*(engine.parse(expr).names if expr else ()), *(match.attributes if match else ())]
        click.echo(format_results(names, results, engine.attribute_names, first))
    if out is not None:
        click.echo(_summary(results, out))
