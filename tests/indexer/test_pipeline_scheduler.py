"""``embed --scheduler``: the same rows as a local run, a one-line error for an unreachable scheduler or one without
workers, and the probe that stops the job before any shard when a worker cannot see the checkpoint, the YuNet model,
the images or ``--out`` (real missing files for the probe itself; a worker that sees another filesystem is simulated
by patching the probe's file checks in an in-process cluster)."""

from __future__ import annotations

import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import facesearch.indexer.cluster as cluster
import facesearch.indexer.pipeline as pipeline
from facesearch.indexer.embed import EmbedConfig
from facesearch.indexer.pipeline import ClusterError, ProbeSpec, probe_worker, run_embed
from facesearch.indexer.shards import read_manifest


@pytest.fixture(scope="module")
def inproc() -> Iterator[tuple[str, str]]:
    """An in-process cluster with one worker: (scheduler address, worker address)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as c:
        with Client(c) as client:
            worker = next(iter(client.scheduler_info()["workers"]))
        yield c.scheduler_address, worker


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, orl_dir: Path, yunet_path: Path) -> Path:
    root = tmp_path_factory.mktemp("sched") / "in"
    shutil.copytree(orl_dir / "s3", root / "s3")
    return root


def _cfg(images: Path, ckpt: Path, out: Path, yunet: Path, scheduler: str | None) -> EmbedConfig:
    return EmbedConfig(input=images, checkpoint=ckpt, out=out, detector_pad=20, detector_model=yunet, shard_rows=4,
                       batch_size=4, device="cpu", workers=1, scheduler=scheduler)  # fmt: skip


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(args: list[str]) -> tuple[int, str]:
    from facesearch.cli._app import main
    from facesearch.cli.embed import embed_command  # noqa: F401  registers the command

    res = CliRunner().invoke(main, args)
    return res.exit_code, res.output


@pytest.mark.slow
def test_same_rows_as_a_local_run(images: Path, ckpt: Path, yunet_path: Path, inproc: tuple[str, str],
                                  tmp_path: Path) -> None:  # fmt: skip
    local = run_embed(_cfg(images, ckpt, tmp_path / "local", yunet_path, None))
    remote = run_embed(_cfg(images, ckpt, tmp_path / "remote", yunet_path, inproc[0]))
    assert local.computed_shards == remote.computed_shards == 3 and remote.rows == 10
    # same model, same crops, one thread each (torch.set_num_threads in the task): bit-identical shards
    assert [e.sha256 for e in local.manifest.shards] == [e.sha256 for e in remote.manifest.shards]
    assert not list((tmp_path / "remote").glob(".probe-*")), "the probe cleans up after itself"


def test_unreachable_scheduler_is_one_line(images: Path, ckpt: Path, yunet_path: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 1.0)
    address = f"tcp://127.0.0.1:{_closed_port()}"
    with pytest.raises(ClusterError, match=f"cannot connect to the Dask scheduler --scheduler {address}: ") as info:
        run_embed(_cfg(images, ckpt, tmp_path / "a", yunet_path, address))
    assert "\n" not in str(info.value) and "after 1 s" in str(info.value)
    code, output = _cli(["embed", "--input", str(images), "--checkpoint", str(ckpt), "--out", str(tmp_path / "b"),
                         "--scheduler", address, "--device", "cpu"])  # fmt: skip
    assert code == 1 and "Traceback" not in output, output
    assert [line for line in output.splitlines() if line.strip()] == [f"Error: {info.value}".replace("/a", "/b")]
    with pytest.raises(ClusterError, match="missing port number"):
        run_embed(_cfg(images, ckpt, tmp_path / "c", yunet_path, "nonsense"))


def test_scheduler_without_workers(images: Path, ckpt: Path, yunet_path: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from distributed import LocalCluster

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 0.5)
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty:
        with pytest.raises(ClusterError, match=f"has no workers .*`dask worker {empty.scheduler_address}`"):
            run_embed(_cfg(images, ckpt, tmp_path / "a", yunet_path, empty.scheduler_address))


def test_probe_on_real_files(tmp_path: Path, ckpt: Path, yunet_path: Path, images: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".marker").write_text("x")
    image = str(images / "s3/1.pgm")
    ok = ProbeSpec(str(ckpt), str(yunet_path), (image,), str(out), ".marker")
    assert probe_worker(ok) is None and sorted(p.name for p in out.iterdir()) == [".marker"]
    missing = tmp_path / "elsewhere/weights.safetensors"
    assert probe_worker(ProbeSpec(str(missing), None, (), str(out), ".marker")) == (
        f"cannot read the checkpoint {missing} (No such file or directory)")  # fmt: skip
    assert "cannot read the YuNet model /nonexistent/yunet.onnx" in str(
        probe_worker(ProbeSpec(str(ckpt), "/nonexistent/yunet.onnx", (), str(out), ".marker")))  # fmt: skip
    assert f"cannot read the input image {images}/s3/99.pgm" in str(
        probe_worker(ProbeSpec(str(ckpt), None, (str(images / "s3/99.pgm"),), str(out), ".marker")))  # fmt: skip
    assert "cannot read the attribute predictor /nonexistent/moon.safetensors" in str(
        probe_worker(ProbeSpec(str(ckpt), None, (), str(out), ".marker", "/nonexistent/moon.safetensors")))  # fmt: skip
    other = tmp_path / "other"  # a folder at the same path on the worker, but not the driver's
    other.mkdir()
    assert f"does not see the --out folder {other} the job created" in str(
        probe_worker(ProbeSpec(str(ckpt), None, (), str(other), ".marker")))  # fmt: skip
    blocked = tmp_path / "file"  # --out is a file on this worker: the marker cannot be read, nothing written
    blocked.write_text("x")
    assert "does not see the --out folder" in str(probe_worker(ProbeSpec(str(ckpt), None, (), str(blocked), "m")))


@pytest.mark.parametrize(
    "what, expect",
    [
        ("checkpoint", "cannot read the checkpoint {ckpt} (No such file or directory)"),
        ("yunet", "cannot read the YuNet model {yunet} (No such file or directory)"),
        ("marker", "does not see the --out folder {out} the job created"),
        ("write", "cannot write to the --out folder {out} (Read-only file system)"),
        ("crash", "cannot run facesearch code (ModuleNotFoundError: No module named 'indexer')"),
    ],
)
def test_worker_that_cannot_see_the_files(what: str, expect: str, images: Path, ckpt: Path, yunet_path: Path,
                                          inproc: tuple[str, str], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    out = tmp_path / "out"
    real_unreadable = cluster._unreadable

    def unreadable(path: str) -> str | None:  # the worker's view of the files
        hidden = {"checkpoint": str(ckpt), "yunet": str(yunet_path)}.get(what)
        if path == hidden or (what == "marker" and "/.probe-" in path):
            return "No such file or directory"
        return real_unreadable(path)

    def probe(spec: ProbeSpec) -> str | None:
        raise ModuleNotFoundError("No module named 'indexer'")

    monkeypatch.setattr(cluster, "_unreadable", unreadable)
    monkeypatch.setattr(cluster, "_unwritable", lambda folder: "Read-only file system" if what == "write" else None)
    if what == "crash":
        monkeypatch.setattr(cluster, "probe_worker", probe)
    with pytest.raises(ClusterError) as info:
        run_embed(_cfg(images, ckpt, out, yunet_path, inproc[0]))
    message = str(info.value)
    assert message.startswith(f"worker {inproc[1]} " + expect.format(ckpt=ckpt, yunet=yunet_path, out=out)), message
    assert message.endswith("must be on a filesystem every worker sees, at the same paths") and "\n" not in message
    # stopped before embedding: no shard written, no probe marker left, and the job can be resumed
    assert read_manifest(out).shards == () and not list(out.glob("part-*")) and not list(out.glob(".probe-*"))
    code, output = _cli(["embed", "--input", str(images), "--checkpoint", str(ckpt), "--out", str(out),
                         "--detector-pad", "20", "--detector-model", str(yunet_path), "--shard-rows", "4",
                         "--batch-size", "4", "--device", "cpu", "--scheduler", inproc[0]])  # fmt: skip
    marker = re.compile(r"\.probe-[0-9a-f]{32}")  # a new marker name per run
    assert code == 1 and "Traceback" not in output
    assert marker.sub(".probe-X", output.strip()) == marker.sub(".probe-X", f"Error: {message}")


def test_worker_io_error_is_one_line(images: Path, ckpt: Path, yunet_path: Path, inproc: tuple[str, str],
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def no_space(path: Path, *args: object, **kw: object) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(pipeline, "write_shard", no_space)
    with pytest.raises(ClusterError, match=r"part-0000\d\.parquet failed on a worker: .*No space left on device"):
        run_embed(_cfg(images, ckpt, tmp_path / "out", yunet_path, inproc[0]))
    monkeypatch.undo()
    result = run_embed(_cfg(images, ckpt, tmp_path / "out", yunet_path, inproc[0]))  # resumes once space is back
    # A shard task still running on the worker when the error came may write its (whole) shard after the undo; the
    # resume adopts it then, so only the total is fixed.
    assert result.computed_shards + result.reused_shards == 3 and result.computed_shards >= 1
    assert [pq.read_table(tmp_path / f"out/part-0000{i}.parquet").num_rows for i in range(3)] == [4, 4, 2]
