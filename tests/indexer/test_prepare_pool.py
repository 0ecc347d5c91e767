"""Decode processes (:mod:`facesearch.indexer.prepare_pool`): a shard's rows are the same whether its images are
prepared on threads or in spawned processes (landmarks from a list, YuNet detection in the children, failures,
an attribute predictor's own crops), a daemonic worker falls back to threads, and the local cluster's workers may
start processes.  Real ORL faces and synthetic faces; real spawned processes and a real Dask cluster."""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facesearch.indexer import prepare_pool
from facesearch.indexer.cluster import cluster_client
from facesearch.indexer.embed import EmbedConfig, build_detector, build_predictor, embed_partition, plan_inputs
from facesearch.model.config import ModelConfig
from facesearch.model.faces.align import margin_geometry
from facesearch.model.inference import Embedder
from facesearch.model.network import FaceNet
from facesearch.model.predictors import InputSpec
from facesearch.model.predictors.facenet import MoonPredictor


def test_auto_processes() -> None:
    assert prepare_pool.auto_processes("cpu", cores=16) == 0
    assert prepare_pool.auto_processes("cuda", cores=16) == 15
    assert prepare_pool.auto_processes("cuda", cores=16, gpus=4) == 3
    assert prepare_pool.auto_processes("cuda", cores=1) == 1
    with pytest.raises(ValueError, match="decode_processes must be >= 0"):
        EmbedConfig(input=Path("x"), checkpoint=Path("c"), out=Path("o"), decode_processes=-1)


def test_listed_faces_same_rows_in_processes(tmp_path: Path, ckpt: Path, synth_data: Path) -> None:
    casia = synth_data / "casia"
    cfg = EmbedConfig(input=casia / "landmarks.csv", root=casia, format="list", checkpoint=ckpt, out=tmp_path / "o",
                      batch_size=8, dtype="float32", decode_processes=0)  # fmt: skip
    items = plan_inputs(cfg)[:30]
    embedder = Embedder(ckpt, "cpu", precision="fp32", batch_size=8)
    threads = embed_partition(items, embedder, None, cfg)
    timings: dict[str, float] = {}
    procs = embed_partition(items, embedder, None, cfg.replace(decode_processes=2), timings)
    assert procs.equals(threads), "decode processes must not change a shard's rows"
    assert 2 in prepare_pool._POOLS, "the process pool was not used"
    assert {"read", "decode", "align", "infer"} <= set(timings) and timings["decode"] > 0


def test_detection_and_failures_same_rows_in_processes(tmp_path: Path, ckpt: Path, orl_dir: Path,
                                                       yunet_path: Path) -> None:  # fmt: skip
    """YuNet runs in each decode process (built there on first need); bad files are the same failed rows."""
    root = tmp_path / "in"
    shutil.copytree(orl_dir / "s3", root / "s3")
    (root / "bad").mkdir()
    (root / "bad/empty.jpg").write_bytes(b"")
    (root / "bad/trunc.pgm").write_bytes((orl_dir / "s2/1.pgm").read_bytes()[:500])
    (root / "bad/noface.png").write_bytes(cv2.imencode(".png", np.full((64, 64, 3), 128, np.uint8))[1].tobytes())
    cfg = EmbedConfig(input=root, checkpoint=ckpt, out=tmp_path / "out", detector_pad=20, batch_size=4,
                      detector_model=yunet_path, device="cpu", dtype="float32", decode_processes=0)  # fmt: skip
    items = plan_inputs(cfg)
    embedder = Embedder(ckpt, "cpu", precision="fp32", batch_size=4)
    threads = embed_partition(items, embedder, build_detector(cfg), cfg)
    procs = embed_partition(items, embedder, build_detector(cfg), cfg.replace(decode_processes=2))
    assert procs.equals(threads)
    statuses = procs.column("status").to_pylist()
    assert statuses.count("ok") == 10 and {"empty", "truncated", "no_face"} <= set(statuses)


def test_predictor_crops_same_in_processes(tmp_path: Path, ckpt: Path, synth_data: Path) -> None:
    """The predictor's own margin crops are cut in the decode process from the pixels it decoded."""
    torch.manual_seed(1)
    spec = InputSpec((56, 48), margin=True)
    mcfg = ModelConfig(arch="fast", width=0.25, input_size=margin_geometry(spec.size)[0], head=2, num_identities=0,
                       attributes=("Male", "Chubby"), embedding_dim=32, attribute_hidden=16)  # fmt: skip
    path = tmp_path / "moon.safetensors"
    MoonPredictor(FaceNet(mcfg), spec).save(path)
    casia = synth_data / "casia"
    cfg = EmbedConfig(input=casia / "landmarks.csv", root=casia, format="list", checkpoint=ckpt, out=tmp_path / "o",
                      batch_size=8, dtype="float32", attributes_from=path, precision="fp32",
                      decode_processes=0)  # fmt: skip
    items = plan_inputs(cfg)[:12]
    embedder = Embedder(ckpt, "cpu", precision="fp32", batch_size=8)
    predictor = build_predictor(cfg, "cpu")
    threads = embed_partition(items, embedder, None, cfg, predictor=predictor)
    procs = embed_partition(items, embedder, None, cfg.replace(decode_processes=1), predictor=predictor)
    assert procs.equals(threads)
    assert procs.column("Male").null_count == 0


def _pool_in_daemon(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put(prepare_pool.process_pool(1) is None)


def test_daemonic_worker_falls_back_to_threads() -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_pool_in_daemon, args=(queue,), daemon=True)
    proc.start()
    assert queue.get(timeout=60) is True, "a daemonic process cannot start decode processes: threads instead"
    proc.join(30)


def _is_daemon() -> bool:
    return multiprocessing.current_process().daemon


@pytest.mark.slow
def test_local_cluster_workers_may_start_processes(tmp_path: Path, ckpt: Path) -> None:
    cfg = EmbedConfig(input=tmp_path, checkpoint=ckpt, out=tmp_path / "o", workers=1, device="cpu")
    with cluster_client(cfg) as client:
        assert client.run(_is_daemon) and not any(client.run(_is_daemon).values())


_ORPHAN_SCRIPT = """
import os, signal
from facesearch.indexer import prepare_pool
pool = prepare_pool.process_pool(1)
pool.submit(os.getpid).result()
print(*pool._processes, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_decode_processes_leave_with_a_killed_worker() -> None:
    """A worker killed outright (SIGKILL: no atexit, no pool shutdown) leaves no decode process behind."""
    import subprocess
    import sys
    import time

    proc = subprocess.run([sys.executable, "-c", _ORPHAN_SCRIPT], capture_output=True, text=True, timeout=120)
    children = [int(p) for p in proc.stdout.split()]
    assert proc.returncode == -9 and children, proc.stderr
    deadline = time.monotonic() + 10
    alive = children
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in children if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
    assert not alive, f"decode processes {alive} outlived their killed parent"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
