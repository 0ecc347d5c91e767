"""The measuring helpers behind every floor in benchmarks/RESULTS.md: rates come out positive and finite for each
dtype the speed scripts ask for, and bad arguments are refused by name."""

from __future__ import annotations

import math

import pytest

from facesearch.model.measure import copy_bandwidth, gemm_flops, seconds_per_call


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_gemm_rates_are_measured_for_every_screen_dtype(dtype: str) -> None:
    rate = gemm_flops(16, 32, 24, dtype, min_run_time=0.01)
    assert math.isfinite(rate) and rate > 0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        gemm_flops(8, dtype="int4")
    with pytest.raises(ValueError, match="GEMM sizes must be >= 1"):
        gemm_flops(0)
    with pytest.raises(ValueError, match="unknown stat"):
        seconds_per_call(lambda: None, stat="p50")
    assert copy_bandwidth(1 << 16, min_run_time=0.01) > 0
