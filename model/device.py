"""Resolve the compute device and mixed-precision dtype once, at the edge, and pass them down.

A requested GPU that is absent is an error, never a silent CPU fallback.  ``auto`` precision picks bf16 autocast only
where the hardware runs it natively (CPUs with AMX or AVX512-BF16 units, CUDA GPUs with bf16 support): elsewhere bf16
is emulated and slower than fp32.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
_CUDA_SPEC = re.compile(r"^cuda(?::(\d+))?$")
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: Flags of int8 dot-product instructions that sum 8-bit products into 32 bits without saturation.
_CPU_INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


def resolve_device(spec: str) -> torch.device:
    """``auto | cpu | cuda | cuda:N`` -> a ``torch.device``.  ``auto`` is ``cuda`` when one is available, else ``cpu``.

    Raises ``ValueError`` for an unknown spec, or when a CUDA device is requested and absent (or out of range).
    """
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = _CUDA_SPEC.match(spec)
    if m is None:
        raise ValueError(f"unknown device {spec!r}; valid: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but no CUDA device is available (use --device cpu or auto)")
    index = int(m.group(1)) if m.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device {spec!r} requested but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU advertises native bf16 matrix instructions (``amx_bf16`` or ``avx512_bf16`` flags)."""
    flags, _ = _cpu_flags_and_vendor(cpuinfo)
    return any(f in flags for f in _CPU_BF16_FLAGS)


@functools.lru_cache(maxsize=1)
def cpu_has_int8_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU advertises int8 dot-product instructions (``amx_int8``, ``avx512_vnni`` or ``avx_vnni``)."""
    flags, _ = _cpu_flags_and_vendor(cpuinfo)
    return any(f in flags for f in _CPU_INT8_FLAGS)


def _cpu_flags_and_vendor(cpuinfo: str) -> tuple[set[str], str]:
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set(), ""
    flags: set[str] = set()
    vendor = ""
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
        elif line.startswith("vendor_id") and not vendor:
            vendor = line.partition(":")[2].strip()
    return flags, vendor


@functools.lru_cache(maxsize=1)
def cpu_bf16_autocast_pays(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether bf16 autocast speeds the network up on this CPU: with AMX (``amx_bf16``), or ``avx512_bf16`` on an
    AMD CPU.  An Intel CPU with ``avx512_bf16`` and no AMX ran the Fast-Model at 0.78x its float32 speed (bf16 GEMMs
    at half the float32 rate, 2026-12-04, ``benchmarks/RESULTS.md``), so ``auto`` stays float32 there.  A rule on
    the CPU's flags, not a timing: the same machine always makes the same choice, and so the same numbers."""
    flags, vendor = _cpu_flags_and_vendor(cpuinfo)
    return "amx_bf16" in flags or ("avx512_bf16" in flags and vendor == "AuthenticAMD")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The autocast dtype for ``precision`` (``fp32 | bf16 | auto``) on ``device``: ``torch.bfloat16`` or
    ``torch.float32`` (meaning: autocast off).  ``auto`` -> bf16 on bf16-capable GPUs and on CPUs where it pays
    (:func:`cpu_bf16_autocast_pays`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {list(PRECISIONS)}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_autocast_pays() else torch.float32
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """An autocast context for ``device``; disabled (a no-op) when ``dtype`` is float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


__all__ = [
    "PRECISIONS",
    "autocast",
    "autocast_dtype",
    "cpu_bf16_autocast_pays",
    "cpu_has_bf16_units",
    "cpu_has_int8_units",
    "resolve_device",
]
