"""Resume with changed inputs: an image rewritten under the same name after its shard was embedded makes the next
run recompute that shard (and only it), giving the rows a fresh run on the new files gives; a run that found the
change and then failed leaves no stale shard to adopt; an output from before the check (no recorded input state)
is trusted as it is.  Synthetic faces with listed landmarks; an in-process Dask cluster as ``--scheduler``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import facesearch.indexer.pipeline as pipeline
from facesearch.indexer.cluster import ClusterError
from facesearch.indexer.embed import EmbedConfig, InputItem, plan_inputs
from facesearch.indexer.pipeline import SHARD_INPUTS, run_embed
from facesearch.indexer.shards import read_manifest, write_manifest


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as c:
        yield c.scheduler_address


@pytest.fixture
def listed(tmp_path: Path, synth_data: Path) -> Path:
    """A list CSV of 12 synthetic faces with landmarks, their images copied beside it (3 shards of 4)."""
    src = synth_data / "casia"
    lines = (src / "landmarks.csv").read_text().splitlines()[:13]
    for line in lines[1:]:
        rel = line.split(",")[0]
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, tmp_path / "in" / rel)
    (tmp_path / "in/faces.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "in/faces.csv"


def _cfg(listed: Path, ckpt: Path, out: Path, scheduler: str) -> EmbedConfig:
    return EmbedConfig(input=listed, format="list", checkpoint=ckpt, out=out, shard_rows=4, batch_size=4,
                       device="cpu", dtype="float32", scheduler=scheduler)  # fmt: skip


def _tables(out: Path) -> list[pa.Table]:
    return [pq.read_table(out / e.file) for e in read_manifest(out).shards]


def _rewrite(item: InputItem, content: bytes) -> None:
    """Replace the file's content, its mtime moved on by a second (whatever the filesystem's mtime resolution)."""
    before = item.path.stat().st_mtime_ns
    item.path.write_bytes(content)
    os.utime(item.path, ns=(before + 10**9, before + 10**9))


def test_changed_input_recomputes_its_shard(listed: Path, ckpt: Path, scheduler: str, tmp_path: Path) -> None:
    cfg = _cfg(listed, ckpt, tmp_path / "out", scheduler)
    items = plan_inputs(cfg)
    first = run_embed(cfg)
    assert first.computed_shards == 3 and first.changed_shards == 0
    assert sorted(first.manifest.source[SHARD_INPUTS]) == [f"part-0000{i}.parquet" for i in range(3)]
    before = _tables(cfg.out)
    _rewrite(items[5], items[0].path.read_bytes())  # shard 1 (rows 4..7): another face under the same name
    again = run_embed(cfg)
    assert (again.computed_shards, again.reused_shards, again.changed_shards) == (1, 2, 1)
    after = _tables(cfg.out)
    assert after[0].equals(before[0]) and after[2].equals(before[2]) and not after[1].equals(before[1])
    fresh = run_embed(cfg.replace(out=tmp_path / "fresh"))  # a run from scratch on the files as they are now
    assert all(a.equals(b) for a, b in zip(after, _tables(fresh.out), strict=True))
    assert run_embed(cfg).already_complete, "nothing changed since"
    # The CLI says so; a file rewritten with the same bytes counts too (the state is size and mtime, not content).
    _rewrite(items[9], items[9].path.read_bytes())
    from facesearch.cli._app import main
    from facesearch.cli.embed import embed_command  # noqa: F401  registers the command

    res = CliRunner().invoke(main, ["embed", "--list", str(listed), "--checkpoint", str(ckpt), "--out", str(cfg.out),
                                    "--shard-rows", "4", "--batch-size", "4", "--device", "cpu", "--dtype", "float32",
                                    "--scheduler", scheduler])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "inputs       1 shard(s) recomputed: inputs changed" in res.output
    assert "(1 embedded now, 2 already done)" in res.output


def test_failed_run_leaves_no_stale_shard(listed: Path, ckpt: Path, scheduler: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    cfg = _cfg(listed, ckpt, tmp_path / "out", scheduler)
    items = plan_inputs(cfg)
    run_embed(cfg)
    _rewrite(items[1], items[2].path.read_bytes())

    def no_space(path: Path, *args: object, **kw: object) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(pipeline, "write_shard", no_space)
    with pytest.raises(ClusterError, match="No space left on device"):
        run_embed(cfg)
    assert not (cfg.out / "part-00000.parquet").exists(), "the stale shard is gone: no later run adopts it"
    assert [e.file for e in read_manifest(cfg.out).shards] == ["part-00001.parquet", "part-00002.parquet"]
    monkeypatch.undo()
    resumed = run_embed(cfg)
    assert resumed.computed_shards == 1 and resumed.changed_shards == 0  # the change was already acted on
    fresh = run_embed(cfg.replace(out=tmp_path / "fresh"))
    assert all(a.equals(b) for a, b in zip(_tables(cfg.out), _tables(fresh.out), strict=True))


def test_output_without_recorded_inputs_is_trusted(listed: Path, ckpt: Path, scheduler: str, tmp_path: Path) -> None:
    cfg = _cfg(listed, ckpt, tmp_path / "out", scheduler)
    items = plan_inputs(cfg)
    run_embed(cfg)
    man = read_manifest(cfg.out)  # as written before the check existed
    write_manifest(cfg.out, man.replace(source={k: v for k, v in man.source.items() if k != SHARD_INPUTS}))
    _rewrite(items[0], items[3].path.read_bytes())
    result = run_embed(cfg)
    assert result.already_complete and result.changed_shards == 0


def test_damaged_shard_is_recomputed_not_readopted(listed: Path, ckpt: Path, scheduler: str, tmp_path: Path) -> None:
    """One byte of a finished shard changed: the next run does not call the output complete (or adopt the damaged
    file under a new checksum); it recomputes that shard and the rows equal the original run's."""
    cfg = _cfg(listed, ckpt, tmp_path / "out", scheduler)
    run_embed(cfg)
    before = _tables(cfg.out)
    path = cfg.out / "part-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the column data: Parquet may still parse it
    path.write_bytes(bytes(data))
    again = run_embed(cfg)
    assert not again.already_complete
    assert (again.computed_shards, again.reused_shards, again.damaged_shards, again.changed_shards) == (1, 2, 1, 0)
    assert all(a.equals(b) for a, b in zip(_tables(cfg.out), before, strict=True))
    assert run_embed(cfg).already_complete


def test_second_job_into_the_same_out_is_refused(listed: Path, ckpt: Path, scheduler: str, tmp_path: Path) -> None:
    """Two embed runs into one --out: the second is refused at once, naming the holder; the first's work is kept."""
    from facesearch.indexer.locks import directory_lock

    cfg = _cfg(listed, ckpt, tmp_path / "out", scheduler)
    cfg.out.mkdir()
    with directory_lock(cfg.out), pytest.raises(ValueError, match=r"locked by pid \d+"):
        run_embed(cfg)
    assert run_embed(cfg).computed_shards == 3, "the lock file alone does not make --out 'not a shard directory'"
    with directory_lock(cfg.out, shared=True), pytest.raises(ValueError, match="is being read"):
        run_embed(cfg)  # an index build reading the shards holds a shared lock
