"""The Dask pipeline on a real LocalCluster (2 worker processes, 1 thread each): ORL + synthetic faces + bad files
into shards, exact round trip, resume after SIGKILL of the running command, adoption of unrecorded shards, refusal
of another model, and a finished output left alone."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from facesearch.indexer.embed import EmbedConfig, build_detector, embed_partition, plan_inputs, plan_shards
from facesearch.indexer.pipeline import run_embed
from facesearch.indexer.shards import MANIFEST, read_all, read_manifest, write_manifest
from facesearch.model.inference import Embedder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        yield c.scheduler_address


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, orl_dir: Path, synth_data: Path, yunet_path: Path) -> Path:
    """8 ORL people (80 PGMs), 3 synthetic CASIA identities (24 JPEGs) and 3 bad files."""
    root = tmp_path_factory.mktemp("images") / "in"
    for k in range(1, 9):
        shutil.copytree(orl_dir / f"s{k}", root / f"s{k}")
    for folder in sorted((synth_data / "casia").iterdir())[:3]:
        if folder.is_dir():
            shutil.copytree(folder, root / f"synth_{folder.name}")
    (root / "zz_bad").mkdir()
    (root / "zz_bad/empty.jpg").write_bytes(b"")
    (root / "zz_bad/text.jpg").write_text("<html>404</html>")
    (root / "zz_bad/trunc.pgm").write_bytes((orl_dir / "s9/1.pgm").read_bytes()[:300])
    return root


def _cfg(images: Path, ckpt: Path, out: Path, scheduler: str | None = None) -> EmbedConfig:
    return EmbedConfig(input=images, checkpoint=ckpt, out=out, shard_rows=10, batch_size=4, detector_pad=20,
                       device="cpu", workers=2, threads_per_worker=1, scheduler=scheduler)  # fmt: skip


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, images: Path, ckpt: Path, cluster: str) -> Path:
    out = tmp_path_factory.mktemp("clean") / "shards"
    result = run_embed(_cfg(images, ckpt, out, cluster))
    assert result.computed_shards == 11 and not result.already_complete
    return out


def _tables(out: Path) -> list[pa.Table]:
    return [pq.read_table(out / e.file) for e in read_manifest(out).shards]


@pytest.mark.slow
def test_cluster_embed(clean: Path, images: Path, ckpt: Path) -> None:
    man = read_manifest(clean)
    items = plan_inputs(_cfg(images, ckpt, clean))
    assert man.complete and man.planned_shards == 11 and man.totals["rows"] == len(items) == 107
    assert [(e.id_lo, e.id_hi) for e in man.shards] == [(r.start, r.stop) for r in plan_shards(107, 10)]
    whole = pa.concat_tables(_tables(clean))
    assert whole.column("id").to_pylist() == list(range(107))
    status = dict(zip(whole.column("path").to_pylist(), whole.column("status").to_pylist(), strict=True))
    assert [status[f"zz_bad/{n}"] for n in ("empty.jpg", "text.jpg", "trunc.pgm")] == ["empty", "not_an_image",
                                                                                         "truncated"]  # fmt: skip
    assert sum(s == "ok" and p.startswith("s") for p, s in status.items()) >= 78  # YuNet finds ORL faces
    block = read_all(clean, dtype=np.float16, only_ok=False)  # round trip through iter_shards is exact
    ok = np.array([s == "ok" for s in whole.column("status").to_pylist()])
    ref = np.array([e for e in whole.column("embedding").to_pylist() if e is not None], dtype=np.float16)
    np.testing.assert_array_equal(block.xb[ok], ref)
    # the worker-built model equals the model run here on one shard (float16 storage: 1e-3 relative rounding,
    # and a different thread count here may reorder float32 sums)
    shard = plan_shards(107, 10)[3]
    cfg = _cfg(images, ckpt, clean)
    embedder = Embedder(ckpt, "cpu", batch_size=4)
    local = embed_partition(items[shard.start : shard.stop], embedder, build_detector(cfg), cfg)
    assert local.column("status").equals(_tables(clean)[3].column("status"))
    a = np.array([e for e in local.column("embedding").to_pylist() if e is not None], np.float32)
    b = np.array([e for e in _tables(clean)[3].column("embedding").to_pylist() if e is not None], np.float32)
    np.testing.assert_allclose(a, b, atol=3e-3)
    assert man.source["count"] == 107 and man.normalized and man.d == 32 and "dask" in man.versions


def _cli(images: Path, ckpt: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "facesearch.cli.embed", "embed", "--input", str(images), "--checkpoint", str(ckpt),
            "--out", str(out), "--shard-rows", "10", "--batch-size", "4", "--detector-pad", "20", "--device", "cpu",
            "--workers", "2", "--threads-per-worker", "1"]  # fmt: skip


# The embed command with every file it atomically replaces (tmp + os.replace, as all project writes are) reported
# on the pipe whose fd is argv[1]: the test wakes when the manifest changes instead of polling for it.
REPORTING_EMBED = r"""
import os, sys
from facesearch.cli.embed import main
notes, real_replace = int(sys.argv.pop(1)), os.replace
def replace(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    os.write(notes, os.path.basename(os.fsdecode(dst)).encode() + b"\n")
os.replace = replace
main()
"""


def _wait_for_shards(proc: subprocess.Popen[bytes], notes: int, out: Path, count: int, timeout: float) -> None:
    """Block until the running embed has recorded ``count`` shards in its manifest (woken by each file it
    replaces); a clear failure if it takes longer than ``timeout`` seconds or exits first."""
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([notes], [], [], max(deadline - time.monotonic(), 0))
        assert ready, f"the embed recorded fewer than {count} shards in {timeout:g} s"
        names = os.read(notes, 65536).split()
        assert names, f"the embed exited (status {proc.wait(30)}) before recording {count} shards"  # end-of-file
        if MANIFEST.encode() in names and len(read_manifest(out).shards) >= count:
            return


def _semaphores() -> set[Path]:
    """multiprocessing's named semaphores in /dev/shm (Linux; empty elsewhere)."""
    shm = Path("/dev/shm")
    return set(shm.glob("sem.mp-*")) if shm.is_dir() else set()


def _drop_semaphores(paths: set[Path]) -> None:
    """Unlink the named semaphores a SIGKILLed process group left behind: its resource tracker died with it, and
    the kernel keeps named semaphores until they are unlinked (12 files per run otherwise)."""
    for path in paths:
        path.unlink(missing_ok=True)


@pytest.mark.slow
def test_sigkill_and_resume(tmp_path: Path, clean: Path, images: Path, ckpt: Path, yunet_path: Path) -> None:
    out = tmp_path / "shards"
    env = {**os.environ, "FACESEARCH_YUNET": str(yunet_path)}
    notes, write_end = os.pipe()
    before = _semaphores()
    command = [sys.executable, "-c", REPORTING_EMBED, str(write_end), *_cli(images, ckpt, out)[3:]]
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, env=env, pass_fds=(write_end,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    os.close(write_end)  # the child holds the only writer: end-of-file when it exits
    try:
        _wait_for_shards(proc, notes, out, 2, timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the command, its scheduler and its worker processes
        proc.wait()
        os.close(notes)
        _drop_semaphores(_semaphores() - before)
    killed = read_manifest(out)
    assert not killed.complete and 2 <= len(killed.shards) < 11, "the kill should land mid-run"
    run = subprocess.run(_cli(images, ckpt, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "rows         107" in run.stdout and "already done" in run.stdout
    resumed = _tables(out)
    assert len(resumed) == 11 and all(a.equals(b) for a, b in zip(resumed, _tables(clean), strict=True))
    again = subprocess.run(_cli(images, ckpt, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stdout


@pytest.mark.slow
def test_adopt_repair_and_refuse(
    tmp_path: Path, clean: Path, images: Path, ckpt: Path, cluster: str, make_checkpoint: Callable[..., Path]
) -> None:
    out = tmp_path / "shards"
    shutil.copytree(clean, out)
    man = read_manifest(out)
    # killed after a worker wrote shard 4 but before the driver recorded it; shard 7 corrupted on disk
    write_manifest(out, man.replace(shards=tuple(e for e in man.shards if e.file != "part-00004.parquet"),
                                    complete=False))  # fmt: skip
    (out / "part-00007.parquet").write_bytes(b"garbage")
    result = run_embed(_cfg(images, ckpt, out, cluster))
    assert result.computed_shards == 1 and result.reused_shards == 10
    assert all(a.equals(b) for a, b in zip(_tables(out), _tables(clean), strict=True))
    assert read_manifest(out).shards == read_manifest(clean).shards  # same checksums as the clean run
    assert run_embed(_cfg(images, ckpt, out, cluster)).already_complete
    other = make_checkpoint(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(ValueError, match=f"{man.fingerprint[:16]}.*{read_fp(other)[:16]}"):
        run_embed(_cfg(images, other, out, cluster))
    with pytest.raises(ValueError, match="another config"):
        run_embed(_cfg(images, ckpt, out, cluster).replace(dtype="float32"))
    from facesearch.cli._app import main
    from facesearch.cli.embed import embed_command  # noqa: F401  registers the command

    res = CliRunner().invoke(main, ["embed", "--input", str(images), "--checkpoint", str(other), "--out", str(out)])
    assert res.exit_code == 1 and "Traceback" not in res.output and "use another --out" in res.output
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a shard directory"):
        run_embed(_cfg(images, ckpt, tmp_path / "junk", cluster))


def read_fp(path: Path) -> str:
    from facesearch.model.checkpoint import load_checkpoint

    return load_checkpoint(path).fingerprint


@pytest.mark.slow
def test_manifest_is_json(clean: Path) -> None:
    data = json.loads((clean / MANIFEST).read_text())
    assert data["kind"] == "facesearch.shards" and data["totals"]["rows"] == 107 and data["complete"] is True


@pytest.mark.slow
def test_one_gpu_per_worker_cluster(tmp_path: Path, orl_dir: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU layout (a SpecCluster of Nannies, each with its own CUDA_VISIBLE_DEVICES) runs; without GPUs the
    workers' ``auto`` device is the CPU, so this checks the wiring, not CUDA."""
    import facesearch.indexer.cluster as cluster

    root = tmp_path / "in"
    shutil.copytree(orl_dir / "s1", root / "s1")
    monkeypatch.setattr(cluster, "_gpu_count", lambda cfg: 2)
    cfg = _cfg(root, ckpt, tmp_path / "out").replace(device="auto", workers=None)
    result = run_embed(cfg)
    assert result.manifest.complete and result.rows == 10 and result.computed_shards == 1


@pytest.mark.slow
def test_relative_paths_reach_the_workers(tmp_path: Path, orl_dir: Path, ckpt: Path, cluster: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Worker processes keep their own working directory (on another machine, surely): paths relative to the driver's
    must reach them as the same files, giving the same shards as absolute paths."""
    shutil.copytree(orl_dir / "s1", tmp_path / "in/s1")
    shutil.copy(ckpt, tmp_path / "w.safetensors")
    absolute = run_embed(_cfg(tmp_path / "in", tmp_path / "w.safetensors", tmp_path / "abs", cluster))
    monkeypatch.chdir(tmp_path)  # the cluster's workers started in the test's first working directory
    relative = run_embed(_cfg(Path("in"), Path("w.safetensors"), Path("rel"), cluster))
    assert relative.ok_rows == absolute.ok_rows == 10
    assert [e.sha256 for e in relative.manifest.shards] == [e.sha256 for e in absolute.manifest.shards]
