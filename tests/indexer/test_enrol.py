"""Enrolling part of a shard set into an existing index: ``add_to_index(..., id_offset= | fresh_ids=, shard_ids=)``
and ``facesearch index add --id-offset N | --fresh-ids [--shard-ids-file F]``.  The enrolled rows come back from a
search under their new ids with their own path, identity and attributes; the id bookkeeping (sources, history,
``max_id``, :func:`trace_id`) stays exact; duplicates, unknown ids and overflow are refused before anything is
written; a killed enrolment leaves the index as it was before or after."""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids)
from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from facesearch.cli import main
from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, add_shards, add_to_index, build_index, load_index, remove_ids
from facesearch.indexer.index_ids import RowSelection, trace_id
from facesearch.indexer.index_store import KILL_STEPS, current_layout

D = 16
NB = 400  # gallery rows: enough to train the small IVF below
SMALL_IVF = {"kind": "ivf-flat", "nlist": 4, "nprobe": 4, "train_size": NB, "recall_sample": 0}
ENROL = 1 << 40  # the demo's offset: enrolled ids past every gallery id
REPO = Path(__file__).resolve().parents[2]
SWITCH = KILL_STEPS.index("pointer-switched")  # killed before it: the old state; at or after it: the new one


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_set(directory: Path, ids: np.ndarray, prefix: str, x: np.ndarray, status: list[str] | None = None,
              shard_rows: int = 1 << 30) -> None:  # fmt: skip
    """A complete shard directory with one attribute (``Male`` = id / 1000, so each row's is its own) and
    ``shard_rows`` rows per shard; paths ``{prefix}/{id}.jpg``, identities ``{prefix}{id // 3}``."""
    n, entries = len(ids), []
    status = status or ["ok"] * n
    for s, lo in enumerate(range(0, max(n, 1), shard_rows)):
        sl = slice(lo, lo + shard_rows)
        m = len(ids[sl])
        table = shards.table_from_arrays(
            ids[sl], [f"{prefix}/{i}.jpg" for i in ids[sl]], [f"{prefix}{i // 3}" for i in ids[sl]], x[sl],
            {"Male": ids[sl] / 1000.0}, None, None, status[sl], [None] * m, dtype="float32",
        )  # fmt: skip
        entries.append(shards.write_shard(directory / shards.shard_name(s), table))
    shards.write_manifest(directory, shards.Manifest("fp-enrol", D, "float32", ("Male",), shards=tuple(entries),
                                                     planned_shards=len(entries), complete=True))  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A gallery (ids 0..399, paths g/…) and a probe set (ids 0..29 in two shards, paths p/…; row 7 failed to
    embed), both numbered from 0 as every embed output is."""
    root = tmp_path_factory.mktemp("enrol")
    rng = np.random.default_rng(0)
    xg, xp = unit(rng, NB), unit(rng, 30)
    write_set(root / "gallery", np.arange(NB, dtype=np.int64), "g", xg)
    status = ["ok"] * 30
    status[7] = "corrupt"
    write_set(root / "probes", np.arange(30, dtype=np.int64), "p", xp, status, shard_rows=16)
    built = {}
    for kind in ("flat", "ivf-flat"):
        cfg = IndexConfig(kind="flat", recall_sample=0) if kind == "flat" else IndexConfig(**SMALL_IVF)
        build_index(root / "gallery", root / f"built-{kind}", cfg)
        built[kind] = root / f"built-{kind}"
    return {"root": root, "gallery": root / "gallery", "probes": root / "probes", "xp": xp, "built": built}


def fresh_copy(data: dict[str, Any], kind: str, tmp_path: Path) -> Path:
    idx = tmp_path / f"idx-{kind}"
    shutil.copytree(data["built"][kind], idx)
    return idx


def generation(idx: Path) -> str | None:
    return current_layout(idx).generation


def check_enrolled(idx: Path, data: dict[str, Any], shard_ids: np.ndarray, offset: int) -> None:
    """Every enrolled probe row is in the index under shard id + offset with its own metadata, and a search with
    its own embedding finds it first."""
    loaded = load_index(idx)  # the consistency checks: FAISS ids == attribute table ids, sizes, checksums
    assert sorted(loaded.ids.tolist()) == [*range(NB), *(shard_ids + offset).tolist()]
    rows = {r["id"]: r for r in loaded.attributes.to_pylist()}
    for s in shard_ids.tolist():
        r = rows[s + offset]
        assert (r["path"], r["identity"], r["Male"]) == (f"p/{s}.jpg", f"p{s // 3}", pytest.approx(s / 1000.0))
    _, I = loaded.search(data["xp"][shard_ids], 1)
    np.testing.assert_array_equal(I[:, 0], shard_ids + offset)


@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_enrol_a_subset_with_an_id_offset(data: dict[str, Any], kind: str, tmp_path: Path) -> None:
    idx = fresh_copy(data, kind, tmp_path)
    take = np.array([20, 3, 17, 4, 3])  # any order, a repeat is the same row
    r = add_to_index(idx, data["probes"], id_offset=ENROL, shard_ids=take)
    assert (r.added, r.skipped_present, r.id_offset, r.changed) == (4, 0, ENROL, True)
    check_enrolled(idx, data, np.array([3, 4, 17, 20]), ENROL)
    info = load_index(idx).info
    src = info.sources[-1]
    assert (src["id_mode"], src["id_offset"], src["rows_selected"], src["rows"]) == ("offset", ENROL, 4, 4)
    assert src["index_ids"] == [ENROL + 3, ENROL + 21] and src["shard_ids"] == [3, 21]
    assert src["shards_dir"] == str(data["probes"].resolve()) and info.sources[0]["id_mode"] == "as-is"
    event = info.history[-1]
    assert (event["op"], event["id_mode"], event["id_offset"], event["rows_selected"]) == ("add", "offset", ENROL, 4)
    assert info.max_id == ENROL + 20 and info.nb == NB + 4
    found = trace_id(info, ENROL + 17)
    assert found is not None and found[0]["shards_dir"] == str(data["probes"].resolve()) and found[1] == 17
    # the same shard set again: its offset is kept, only rows not yet in go in, the rest are "already present"
    more = add_to_index(idx, data["probes"], shard_ids=np.array([4, 5, 6]))
    assert (more.added, more.skipped_present, more.id_offset, more.prior is not None) == (2, 1, ENROL, True)
    check_enrolled(idx, data, np.array([3, 4, 5, 6, 17, 20]), ENROL)
    before = generation(idx)
    again = add_to_index(idx, data["probes"], id_offset=ENROL, shard_ids=np.array([5, 6]))
    assert not again.changed and again.skipped_present == 2 and generation(idx) == before


@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_enrol_a_subset_with_fresh_ids(data: dict[str, Any], kind: str, tmp_path: Path) -> None:
    idx = fresh_copy(data, kind, tmp_path)
    remove_ids(idx, np.array([398, 399]))  # fresh ids never hand out an id the index once held
    take = np.array([10, 11, 12, 14])
    r = add_to_index(idx, data["probes"], fresh_ids=True, shard_ids=take)
    # the first taken row gets the next id after the largest ever held; the others keep their shard id spacing,
    # so index id - offset is always the shard id
    assert (r.added, r.id_offset) == (4, NB - 10) and "fresh ids" in r.note
    loaded = load_index(idx)
    assert sorted(loaded.ids.tolist()) == [*range(NB - 2), NB, NB + 1, NB + 2, NB + 4]
    rows = {row["id"]: row for row in loaded.attributes.to_pylist()}
    assert [rows[NB + i]["path"] for i in (0, 1, 2, 4)] == ["p/10.jpg", "p/11.jpg", "p/12.jpg", "p/14.jpg"]
    _, I = loaded.search(data["xp"][take], 1)
    np.testing.assert_array_equal(I[:, 0], take + NB - 10)
    assert loaded.info.sources[-1]["id_mode"] == "fresh" and loaded.info.sources[-1]["rows_selected"] == 4


def test_search_engine_answers_with_the_enrolled_rows_metadata(data: dict[str, Any], tmp_path: Path) -> None:
    from facesearch.engine.search import SearchEngine

    idx = fresh_copy(data, "flat", tmp_path)
    add_shards(idx, data["probes"], id_offset=ENROL, shard_ids=np.array([2, 9]))
    engine = SearchEngine.open(idx, device="cpu")
    results = engine.search(data["xp"][[9, 2]], k=1)
    got = [(h.id, h.path, h.identity, round(h.attributes["Male"], 6)) for r in results for h in r.hits]
    assert got == [(ENROL + 9, "p/9.jpg", "p3", 0.009), (ENROL + 2, "p/2.jpg", "p0", 0.002)]


def test_every_row_default_and_the_empty_selection(data: dict[str, Any], tmp_path: Path) -> None:
    idx = fresh_copy(data, "flat", tmp_path)
    before = generation(idx)
    r = add_to_index(idx, data["probes"], id_offset=ENROL, shard_ids=np.array([], np.int64))
    assert (r.added, r.changed) == (0, False) and generation(idx) == before
    r = add_to_index(idx, data["probes"], id_offset=ENROL)  # no selection: every row that has an embedding
    ok = np.array([i for i in range(30) if i != 7])
    assert r.added == 29 and load_index(idx).info.sources[-1]["rows_selected"] is None
    check_enrolled(idx, data, ok, ENROL)


def test_duplicates_unknown_ids_and_overflow_are_refused_and_nothing_is_written(data: dict[str, Any],
                                                                              tmp_path: Path) -> None:  # fmt: skip
    idx = fresh_copy(data, "flat", tmp_path)
    before, probes = generation(idx), data["probes"]
    # as-is ids collide with the gallery's: the error names the shard directory, an example id and the way out
    with pytest.raises(ValueError, match=rf"2 id\(s\) of {probes} .* taken .*: 1, 2 \(e\.g\. id 1: path 'g/1\.jpg' "
                                         r"in the index, 'p/1\.jpg' in the shards\).*--fresh-ids"):  # fmt: skip
        add_to_index(idx, probes, shard_ids=np.array([1, 2]))
    # ids the shard set lacks (or whose row failed to embed) are named, never skipped silently
    with pytest.raises(ValueError, match=rf"{probes} has no row with an embedding for 2 of the 3 shard id\(s\) "
                                         r"asked for: 7, 99"):  # fmt: skip
        add_to_index(idx, probes, id_offset=ENROL, shard_ids=np.array([1, 7, 99]))
    with pytest.raises(ValueError, match=r"ids 3\.\.5 with id offset .* outside 0\.\.2\^63-1"):
        add_to_index(idx, probes, id_offset=2**63 - 5, shard_ids=np.array([3, 5]))
    with pytest.raises(ValueError, match=r"id offset 18446744073709551616 is not a 64-bit integer"):
        add_to_index(idx, probes, id_offset=2**64, shard_ids=np.array([3]))
    with pytest.raises(ValueError, match="not both"):
        add_to_index(idx, probes, id_offset=5, fresh_ids=True)
    assert generation(idx) == before and load_index(idx).info.nb == NB
    # repeated ids within the batch: a damaged shard set, named with the repeated id
    rng = np.random.default_rng(5)
    write_set(tmp_path / "twice", np.array([0, 1, 2, 1], np.int64), "t", unit(rng, 4), shard_rows=2)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'twice'} holds the same id more than once \(ids {ENROL + 1} "):
        add_to_index(idx, tmp_path / "twice", id_offset=ENROL, shard_ids=np.array([1, 2]))
    add_to_index(idx, tmp_path / "twice", id_offset=ENROL, shard_ids=np.array([0, 2]))  # the repeat not taken: fine
    assert generation(idx) != before


@pytest.mark.parametrize(
    ("shard_ids", "message"),
    [
        (np.array([1.5]), "integer ids"),
        (np.array([[1, 2]]), "1-d"),
        ([2**70], "1180591620717411303424 is out of range"),
        (np.array([2**64 - 1], np.uint64), "18446744073709551615 is out of range"),
    ],
)
def test_bad_shard_ids(shard_ids: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RowSelection(shard_ids)


def test_cli_enrol_with_a_shard_ids_file(data: dict[str, Any], tmp_path: Path) -> None:
    idx = fresh_copy(data, "flat", tmp_path)
    (tmp_path / "take.txt").write_text("3 4\n17\n")
    run = CliRunner().invoke
    base = ["index", "add", "--index", str(idx), "--shards", str(data["probes"])]
    r = run(main, [*base, "--id-offset", str(ENROL), "--shard-ids-file", str(tmp_path / "take.txt")])
    assert r.exit_code == 0, r.output
    assert f"added 3 of the 3 selected rows (0 already present) with id offset {ENROL}; nb = {NB + 3}" in r.output
    check_enrolled(idx, data, np.array([3, 4, 17]), ENROL)
    r = run(main, ["index", "info", "--index", str(idx)])
    assert r.exit_code == 0 and f"id offset {ENROL}, ids {ENROL + 3}..{ENROL + 17} (offset given, 3 rows selected)" \
        in r.output, r.output  # fmt: skip
    (tmp_path / "bad.txt").write_text("3\n99\n")
    r = run(main, [*base, "--fresh-ids", "--shard-ids-file", str(tmp_path / "bad.txt")])
    assert r.exit_code == 1 and "99" in r.output and "Traceback" not in r.output, r.output
    r = run(main, [*base, "--fresh-ids", "--id-offset", "3"])
    assert r.exit_code == 2 and "not both" in r.output, r.output


# -- atomicity: the enrolment killed at every step of the writer ---------------------------------------------------
# One interpreter imports the CLI and the ``index`` commands once and forks a child per step (as in
# test_index_atomic, which explains why); the command module is imported before forking because the CLI loads its
# commands lazily, and importing FAISS and Arrow again in every child would cost seconds each.


def _state(idx: Path) -> dict[str, Any]:
    loaded = load_index(idx)
    order = np.argsort(loaded.ids)
    sources = [(s.get("id_mode"), s["id_offset"], s.get("rows_selected")) for s in loaded.info.sources]
    return {"ids": loaded.ids[order].tolist(), "attributes": loaded.attributes.take(pa.array(order)).to_pydict(),
            "sources": sources}  # fmt: skip


def test_enrolment_killed_at_every_step_is_before_or_after_and_reruns(
    data: dict[str, Any], tmp_path: Path, kill_driver: Callable[..., tuple[list[int], str]]
) -> None:
    (tmp_path / "take.txt").write_text("1\n5\n6\n")
    args = ["index", "add", "--shards", str(data["probes"]), "--id-offset", str(ENROL), "--shard-ids-file",
            str(tmp_path / "take.txt")]  # fmt: skip
    before = _state(data["built"]["flat"])
    ref = fresh_copy(data, "flat", tmp_path)
    add_shards(ref, data["probes"], id_offset=ENROL, shard_ids=np.array([1, 5, 6]))
    after = _state(ref)
    steps = [s for s in KILL_STEPS if s != "old-layout-partly-removed"]
    jobs = []
    for step in steps:
        shutil.copytree(data["built"]["flat"], tmp_path / step)
        jobs.append({"step": step, "args": [*args[:2], "--index", str(tmp_path / step), *args[2:]]})
    codes, stderr = kill_driver(jobs)
    for step, code in zip(steps, codes, strict=True):
        idx = tmp_path / step
        assert code == -signal.SIGKILL, f"not killed at {step} (exit {code}): {stderr[-2000:]}"
        assert _state(idx) == (after if KILL_STEPS.index(step) >= SWITCH else before), step
        add_shards(idx, data["probes"], id_offset=ENROL, shard_ids=np.array([1, 5, 6]))  # the re-run completes
        assert _state(idx) == after, step
