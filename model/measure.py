"""How fast this machine is and how much memory this process used: the one place the speed benchmarks and the
artifacts measure the GEMM rate, the copy bandwidth, the peak RSS and per-stage seconds.

    gemm_flops(3530, 1024, 16384, "bf16")     # FLOP/s of a (3530, 1024) @ (1024, 16384) bf16 product on the CPU
    copy_bandwidth(1 << 30, device="cuda")    # bytes/s of a 1 GiB device-to-device copy (read + write)
    peak_rss_bytes()                          # this process's peak resident set so far
    with stages("build"): ...                 # stages = StageTimer(); stages.seconds == {"build": 1.23}

Rates are timed with ``torch.utils.benchmark.Timer.blocked_autorange``: a warm-up that sizes the blocks so that the
timer's own cost is negligible, accelerator synchronisation around every block, and all of this process's torch
threads (the Timer's own default is one thread).  The reported rate is that of the fastest block by default: on a
shared machine it is the least disturbed one, the practical peak.  torch is imported only when a rate is measured, so
:func:`peak_rss_bytes` and :class:`StageTimer` cost nothing to import.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: How a rate summarises the timed blocks: the fastest one, the median, or the mean over all calls.
STATS: tuple[str, ...] = ("best", "median", "mean")
#: Short dtype names accepted wherever a dtype is (``fp32`` / ``bf16`` as the speed scripts spell precisions).
DTYPES: dict[str, str] = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                          "fp16": "float16", "float16": "float16", "int8": "int8"}  # fmt: skip


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)} or a torch.dtype")
    return getattr(torch, DTYPES[dtype])


def seconds_per_call(fn: Callable[[], Any], min_run_time: float = 0.2, stat: str = "best", warmup: int = 0) -> float:
    """Seconds one call of ``fn`` takes: ``warmup`` untimed calls, then ``Timer.blocked_autorange`` for at least
    ``min_run_time`` seconds; ``stat`` (``best | median | mean``) summarises its blocks.  Work ``fn`` queues on an
    accelerator is synchronised (the Timer synchronises the current accelerator around each block)."""
    import torch
    from torch.utils.benchmark import Timer

    if stat not in STATS:
        raise ValueError(f"unknown stat {stat!r}; valid: {', '.join(STATS)}")
    if min_run_time <= 0:
        raise ValueError(f"min_run_time must be > 0 seconds, got {min_run_time}")
    for _ in range(warmup):
        fn()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return float(min(m.times) if stat == "best" else m.median if stat == "median" else m.mean)


def gemm_flops(
    m: int,
    k: int | None = None,
    n: int | None = None,
    dtype: torch.dtype | str = "fp32",
    device: str | torch.device = "cpu",
    min_run_time: float = 0.2,
    stat: str = "best",
) -> float:
    """FLOP/s (2 m k n per product) of an (m, k) @ (k, n) matrix product in ``dtype`` on ``device`` (``k`` and ``n``
    default to ``m``: a square product; ``int8``: ``torch._int_mm``'s exact int32 sums, operations per second).  The
    caller sets the TF32 switches (a float32 floor wants them off).  The product is written into one reused output:
    a fresh output per call (115 MB at 3530 x 8192) would time the allocator's page faults too, ~5-15 % of the product
    on a VM, and understate the rate."""
    import torch

    k, n = m if k is None else k, m if n is None else n
    if min(m, k, n) < 1:
        raise ValueError(f"GEMM sizes must be >= 1, got m={m}, k={k}, n={n}")
    dt = _dtype(dtype)
    gen = torch.Generator().manual_seed(0)
    if dt == torch.int8:
        a8 = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8).to(device)
        b8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(device)
        c32 = torch.empty(m, n, dtype=torch.int32, device=device)
        return 2.0 * m * k * n / seconds_per_call(lambda: torch._int_mm(a8, b8.T, out=c32), min_run_time, stat)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dt)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dt)
    c = torch.empty(m, n, dtype=dt, device=device)
    return 2.0 * m * k * n / seconds_per_call(lambda: torch.mm(a, b, out=c), min_run_time, stat)


def copy_bandwidth(
    nbytes: int = 1 << 30, device: str | torch.device = "cpu", min_run_time: float = 0.2, stat: str = "best"
) -> float:
    """Memory bandwidth in bytes/s of copying an ``nbytes`` float32 buffer into another on ``device``, counting the
    read and the write (2 x nbytes per copy).  Take ``nbytes`` well above the last-level cache."""
    import torch

    if nbytes < 4:
        raise ValueError(f"nbytes must be >= 4 (one float32), got {nbytes}")
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 / seconds_per_call(lambda: dst.copy_(src), min_run_time, stat)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB, macOS bytes)."""
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


@contextmanager
def stage(timings: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the wall seconds of the block to ``timings[name]`` (nothing without ``timings``): the one stage timer of
    the project (the indexer's per-stage seconds, :class:`StageTimer`)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


class StageTimer:
    """Wall-clock seconds per named stage; a stage entered again adds to its total.

    stages = StageTimer()
    with stages("search"):
        ...
    stages.seconds  # {"search": 1.234}
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> AbstractContextManager[None]:
        return stage(self.seconds, name)


__all__ = [
    "DTYPES",
    "STATS",
    "StageTimer",
    "copy_bandwidth",
    "gemm_flops",
    "peak_rss_bytes",
    "seconds_per_call",
    "stage",
]
