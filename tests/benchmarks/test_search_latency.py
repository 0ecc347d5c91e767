"""The search latency benchmark runs end to end on a small synthetic gallery and reports every case it measures."""

from __future__ import annotations

import json
import sys

import pytest

from facesearch.benchmarks.speed import search_latency


@pytest.mark.slow  # builds and times two indexes (~10 s on 2 cores)
def test_small_run_reports_every_kind_filter_and_strategy(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["search_latency", "--rows", "3000", "--dim", "32", "--kinds", "flat,ivf-flat", "--single", "3",
            "--batch", "8", "--work", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(search_latency, "_KIND_CONFIG", {"flat": {}, "ivf-flat": {"nlist": 16, "nprobe": 4}})
    search_latency.main()
    result = json.loads((tmp_path / "latency.json").read_text())
    rows = result["rows"]
    flat = [r for r in rows if r["kind"] == "flat"]
    assert {r["strategy"] for r in flat} >= {"none", "subset", "masked", "selector", "postfilter", "faiss flat"}
    assert {r["strategy"] for r in rows if r["kind"] == "ivf-flat"} == {"none", "selector"}
    by = {(r["kind"], r["filter"], r["strategy"]): r for r in rows}
    assert by[("flat", "1%", "subset")]["passing"] == pytest.approx(30, abs=3)  # the filters hit their selectivity
    assert by[("flat", "50%", "masked")]["passing"] == pytest.approx(1500, abs=15)
    assert all(r["p50_ms"] > 0 and r["batch_qps"] > 0 for r in rows)
    table = (tmp_path / "latency.md").read_text()
    assert table.count("\n| flat |") == len(flat) and "GEMM" in table
