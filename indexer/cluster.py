"""The Dask cluster of ``facesearch embed``: a ``LocalCluster`` sized to the machine, or a client on an existing
scheduler (``--scheduler``) whose workers are probed before any shard is submitted.

With the pipeline (:mod:`facesearch.indexer.pipeline`), the only code that imports dask / distributed (inside
functions, so that importing the package needs neither).  With ``scheduler``, the workers open the checkpoint, the
images and ``out`` by the driver's (absolute) paths, so those must be on a filesystem every worker sees: every
connected worker is probed (:func:`probe_worker`) and the first one that cannot read the checkpoint, the YuNet model,
the attribute predictor (``--attributes-from``), a sample image or the driver's marker in ``out``, or cannot write
there, stops the job with a one-line
:class:`ClusterError` naming the worker and the path.  An unreachable scheduler, or one without workers, is a one-line
error after
:data:`CONNECT_TIMEOUT_S`.
"""

from __future__ import annotations

import logging
import os
import stat
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from facesearch.indexer.embed import EmbedConfig
from facesearch.indexer.inputs import InputItem

log = logging.getLogger(__name__)

#: Seconds to wait for ``--scheduler`` to answer (and for it to have a worker) before giving up with one line.
CONNECT_TIMEOUT_S = 10.0
_SHARED_FS = ("with --scheduler, the checkpoint, the images and --out must be on a filesystem every worker sees, at "
              "the same paths")  # fmt: skip


class ClusterError(RuntimeError):
    """The Dask cluster cannot run the job: the scheduler is unreachable or has no workers, a worker cannot see the
    job's files, or a worker failed.  The message is one line naming the address and the path."""


def _gpu_count(cfg: EmbedConfig) -> int:
    import torch

    if cfg.device not in ("auto", "cuda") or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


@contextmanager
def cluster_client(cfg: EmbedConfig) -> Iterator[Any]:
    """A client on ``cfg.scheduler``, or on a LocalCluster sized to the machine: cores / threads_per_worker worker
    processes, or one worker per GPU (``CUDA_VISIBLE_DEVICES``) when GPUs exist and the device allows it."""
    import dask
    from distributed import Client

    if cfg.scheduler:
        with connect(cfg.scheduler) as client:
            yield client
        return
    # Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which returns every freed activation buffer to the OS:
    # CNN inference then runs ~40% slower (measured, benchmarks/embed_speed).  Keep glibc's adaptive default.
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    # Non-daemonic workers may start the decode processes that feed a GPU (facesearch.indexer.prepare_pool).
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ, "distributed.worker.daemon": False}):
        cluster = _start_cluster(cfg)
    with cluster, Client(cluster) as client:
        yield client


def _start_cluster(cfg: EmbedConfig) -> Any:
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    # Importing distributed sets its loggers to INFO (a page of scheduler chatter per cluster, in this process):
    # follow the application's level instead, at least WARNING unless it asked for DEBUG.
    root = logging.getLogger().getEffectiveLevel()
    logging.getLogger("distributed").setLevel(root if root <= logging.DEBUG else max(root, logging.WARNING))
    gpus = _gpu_count(cfg)
    if gpus:
        n = cfg.workers or gpus
        # Memory: the GPU's share of the machine (Dask's default, cores x threads, would give a one-thread GPU worker
        # 1/cores of it; its decode processes are not counted against it).
        workers = {i: {"cls": Nanny, "options": {"nthreads": cfg.threads_per_worker, "memory_limit": 1.0 / n,
                                                 "env": {"CUDA_VISIBLE_DEVICES": str(i % gpus)}}}
                   for i in range(n)}  # fmt: skip
        scheduler = {"cls": Scheduler, "options": {"dashboard": False, "dashboard_address": ":0"}}
        return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR)
    n = cfg.workers or max(1, (os.cpu_count() or 1) // cfg.threads_per_worker)
    return LocalCluster(n_workers=n, threads_per_worker=cfg.threads_per_worker, processes=True,
                        dashboard_address=":0", silence_logs=logging.ERROR)  # fmt: skip


def connect(address: str) -> Any:
    """A client on the scheduler at ``address`` that has at least one worker, or a one-line :class:`ClusterError`."""
    from distributed import Client

    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, ValueError, TypeError) as e:  # unreachable (OSError after the timeout) or a malformed address
        why = " ".join(str(e).split()) or type(e).__name__
        raise ClusterError(f"cannot connect to the Dask scheduler --scheduler {address}: {why}; is `dask "
                           "scheduler` running there, and is the address tcp://HOST:PORT?") from None  # fmt: skip
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
    except TimeoutError:
        client.close()
        raise ClusterError(f"the Dask scheduler at {address} has no workers (waited {CONNECT_TIMEOUT_S:g} s); start "
                           f"some with `dask worker {address}`") from None  # fmt: skip
    return client


@dataclass(frozen=True)
class ProbeSpec:
    """What every worker must be able to open, by the paths the tasks will use: ``marker`` is a file the driver
    wrote into ``out`` (a worker that cannot read it sees another folder, or none, at that path)."""

    checkpoint: str
    detector_model: str | None
    images: tuple[str, ...]
    out: str
    marker: str
    attributes_from: str | None = None


def _unreadable(path: str) -> str | None:
    """Why this process cannot read the regular file ``path``, or ``None``.  Opened non-blocking and checked before
    the read: a FIFO at ``path`` would otherwise wait for a writer forever."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        return e.strerror or type(e).__name__
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
        os.read(fd, 1)
    except OSError as e:
        return e.strerror or type(e).__name__
    finally:
        os.close(fd)
    return None


def _unwritable(folder: str) -> str | None:
    """Why this process cannot create (and remove) a file in ``folder``, or ``None``."""
    tmp = os.path.join(folder, f".probe-{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(b"probe\n")
        os.remove(tmp)
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def probe_worker(spec: ProbeSpec) -> str | None:
    """Run on a worker: what it cannot do of the job's file access (one phrase), or ``None`` when it can do it all."""
    checks = [("the checkpoint", spec.checkpoint)]
    checks += [("the YuNet model", spec.detector_model)] if spec.detector_model else []
    checks += [("the attribute predictor", spec.attributes_from)] if spec.attributes_from else []
    checks += [("the input image", path) for path in spec.images]
    for what, path in checks:
        why = _unreadable(path)
        if why is not None:
            return f"cannot read {what} {path} ({why})"
    why = _unreadable(os.path.join(spec.out, spec.marker))
    if why is not None:
        return f"does not see the --out folder {spec.out} the job created ({spec.marker}: {why})"
    why = _unwritable(spec.out)
    return None if why is None else f"cannot write to the --out folder {spec.out} ({why})"


def probe_workers(client: Any, cfg: EmbedConfig, items: Sequence[InputItem]) -> None:
    """Raise :class:`ClusterError` naming the first worker (by address) that cannot open the job's files (``cfg`` as
    the workers get it: absolute paths)."""
    marker = f".probe-{uuid.uuid4().hex}"
    (cfg.out / marker).write_text("facesearch embed: a worker that can read this sees the job's --out\n")
    # Sample images the driver itself can read (a missing file is a row, not a cluster problem).
    ends = sorted({0, len(items) - 1}) if items else []
    sample = [str(items[i].path) for i in ends if _unreadable(str(items[i].path)) is None]
    spec = ProbeSpec(str(cfg.checkpoint), str(cfg.detector_model) if cfg.detector_model else None, tuple(sample),
                     str(cfg.out), marker, str(cfg.attributes_from) if cfg.attributes_from else None)  # fmt: skip
    try:
        results = client.run(probe_worker, spec, on_error="return")
    finally:
        (cfg.out / marker).unlink(missing_ok=True)
    bad = [(addr, r) for addr, r in sorted(results.items()) if r is not None]
    if bad:
        addr, why = bad[0]
        if isinstance(why, BaseException):
            why = f"cannot run facesearch code ({type(why).__name__}: {' '.join(str(why).split())})"
        more = f" ({len(bad) - 1} more of {len(results)} workers fail too)" if len(bad) > 1 else ""
        raise ClusterError(f"worker {addr} {why}{more}; {_SHARED_FS}")


__all__ = ["CONNECT_TIMEOUT_S", "ClusterError", "ProbeSpec", "cluster_client", "connect", "probe_worker",
           "probe_workers"]  # fmt: skip
