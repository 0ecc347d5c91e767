"""TAR at a FAR below 1/N_neg is not a measurement: the result JSON flags it, every table prints ``n/a (<1/N_neg)``
with a footnote, the ROC plot and the devkit ROC leave it out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facesearch.benchmarks import devkit, report
from facesearch.benchmarks.megaface_run import BenchConfig, run_megaface
from facesearch.cli import main
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """72 probes x 100 distractors: N_neg = 7,200, so FAR 1e-6, 1e-5 and 1e-4 are below 1/N_neg and 1e-3 is not."""
    root = tmp_path_factory.mktemp("far")
    write_synth_features(SynthFeaturesConfig(out=root / "probes", rows=72, dim=16, identities=12, spread=1.2, seed=3))
    write_synth_features(SynthFeaturesConfig(out=root / "dis", rows=300, dim=16, identities=150, seed=7))
    args = ["bench", "megaface", "--out", str(root / "out"), "--probes", str(root / "probes"), "--distractors",
            str(root / "dis"), "--sizes", "100"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return root / "out", res.output


def _result(out: Path) -> dict:
    return json.loads((out / "result_facesearch_100_1.json").read_text())


def test_result_json_flags_unmeasurable_fars(run: tuple[Path, str]) -> None:
    r = _result(run[0])
    n_neg = r["counts"]["N_neg"]
    assert n_neg == 72 * 100
    assert [(e["far"], e["supported"]) for e in r["tar_at_far"]] == [
        (1e-6, False), (1e-5, False), (1e-4, False), (1e-3, True)]  # fmt: skip
    for far, ok in zip(r["roc"]["far"], r["roc"]["supported"], strict=True):
        assert ok == (far == 0 or far * n_neg >= 1), far
    assert not report.tar_supported(r, 1e-4) and report.tar_supported(r, 1e-3)


def test_tables_print_na_with_a_footnote(run: tuple[Path, str]) -> None:
    out, console = run
    r = _result(out)
    table = report.summary_table([r], fmt="text")
    row = table.splitlines()[2]
    assert row.count(report.NA_FAR) == 3 and f"{100 * report.tar_at(r, 1e-3):.2f} %" in row
    assert table in console and "the FAR is below 1/N_neg" in console and "1/N_neg = 1.4e-04 with 100" in console
    assert "TAR@1e-6 n/a (<1/N_neg)" in console, "the progress line too"
    summary = (out / "megaface_summary.md").read_text()
    assert report.summary_table([r]) in summary and "the FAR is below 1/N_neg" in summary
    tar_block = report.size_table([r]).split("TAR at FAR = 1e-6")[1]
    assert f"| {report.NA_FAR} |" in tar_block


def test_bench_plot_table_marks_them_too(run: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = run
    res = CliRunner().invoke(main, ["bench", "plot", str(out / "result_facesearch_100_1.json"), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert res.output.count(report.NA_FAR) >= 3 and "the FAR is below 1/N_neg" in res.output


def test_roc_plot_and_devkit_roc_draw_only_measured_points(run: tuple[Path, str]) -> None:
    out, _ = run
    r = _result(out)
    far, tar = report.measured_roc(r)
    assert len(far) and far.min() >= 1 / 7200 and np.all(np.isfinite(tar))
    assert set(far.tolist()) == {f for f, ok in zip(r["roc"]["far"], r["roc"]["supported"], strict=True) if ok and f}
    dk = devkit.read_devkit_json(out / "devkit" / "cmc_facescrub_megaface_facesearch_100_1.json")
    assert all(f == 0 or f >= np.float32(1 / 7200) for f in dk["roc"][0])


def test_older_harness_files_are_judged_by_their_n_neg(run: tuple[Path, str]) -> None:
    """Files written before rows carried ``supported``: the harness's ``roc.m`` column identifies them."""
    r = _result(run[0])
    for e in r["tar_at_far"]:
        del e["supported"]
    del r["roc"]["supported"]
    assert [report.tar_supported(r, f) for f in report.REPORT_FARS] == [False, False, False, True]
    assert report.measured_roc(r)[0].min() >= 1 / 7200
    del r["roc"]["m"]  # not a harness file: nothing to judge by, shown as given
    assert report.tar_supported(r, 1e-6)


def test_the_evaluators_supported_flag_wins() -> None:
    from facesearch.benchmarks.megaface_run import far_supported

    assert not far_supported({"far": 1e-6}, 10_000) and far_supported({"far": 1e-6}, 1_000_000)
    assert far_supported({"far": 0.0}, 10) and not far_supported({"far": 1e-3, "supported": False}, 10**9)


def test_config_check(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="probe set name 'a/b'"):
        BenchConfig(out=tmp_path, probes=tmp_path, distractors=tmp_path, probe_name="a/b")
    with pytest.raises(ValueError, match="distractor set name 'x_y'"):
        run_megaface(BenchConfig(out=tmp_path, probes=tmp_path, distractors=tmp_path, distractor_name="x_y"))
