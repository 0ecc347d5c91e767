"""The main job (`make run`): its metrics against brute force, and a tiny end-to-end run through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facesearch.cli import main
from facesearch.demo import balanced_accuracy
from facesearch.indexer.index import is_index_directory


def test_balanced_accuracy_matches_definition() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, (50, 3)).astype(np.float32)
    pred = rng.integers(0, 2, (50, 3)).astype(np.float32)
    got = balanced_accuracy(pred, truth)
    for j in range(3):
        t, p = truth[:, j], pred[:, j]
        expected = (np.mean(p[t == 1] == 1) + np.mean(p[t == 0] == 0)) / 2
        assert got[j] == expected
    assert np.isnan(balanced_accuracy(np.ones((3, 1)), np.ones((3, 1))))[0], "no negatives: undefined, not 1.0"


@pytest.mark.slow
def test_demo_end_to_end_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--identities", "12", "--stage1-iterations", "30", "--stage2-iterations", "10",
            "--attribute-iterations", "10", "--device", "cpu", "--small"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    first = json.loads((out / "report.json").read_text())
    # `make run` twice: the second run continues from the finished checkpoints (no training again) and succeeds
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert "report:" in result.output and (out / "report.md").is_file()
    assert report["model"]["fingerprint"] and Path(report["model"]["weights"]).is_file()
    mf = report["megaface"]["results"]
    modes = [None, "hard", "confident", "soft"]
    assert [(r["size"], r["mode"]) for r in mf] == [(s, m) for s in (10, 40) for m in modes]
    confident = mf[2]["filter_stats"]
    assert confident["predicted"]["mates_lost"] <= 0.01 and 0 <= confident["mates_excluded_fraction"] <= 1
    assert report["attribute_predictor"]["method"] == "mgmtn" and Path(report["attribute_predictor"]["path"]).is_file()
    assert all(0 <= r["rank1"] <= 1 and r["N"] == 4 * 3 * 2 for r in mf)
    assert (out / "megaface" / "megaface_cmc.png").is_file() and "TAR@1e-6" in (out / "report.md").read_text()
    assert is_index_directory(out / "index")
    search = report["search"]
    assert search["queries"] == 4 and search["enrolled"] == 8 and search["gallery"] == 40 + 8
    assert "Identification with attribute filters" in (out / "report.md").read_text() and "rank" in search["table"]
    assert [x["search"] for x in search["rows"]] == ["none", "filter `Male > 0.5`", "confident match"]
    assert set(search["match"]["margins"]) == set(search["match"]["attributes"])
    assert all(0 <= m <= 0.5 for m in search["match"]["margins"].values())
    assert set(report["label_balanced_accuracy"]) == set(report["model_attribute_balanced_accuracy"])
    assert report["model"]["fingerprint"] == first["model"]["fingerprint"] and report["losses"] == first["losses"]
    counts = [[(r["rank1_hits"], r["N"], r["tar_at_far"]) for r in x["megaface"]["results"]] for x in (report, first)]
    assert counts[0] == counts[1]  # the same model: the same benchmark counts (timings aside)
    assert report["losses"] and all(np.isfinite(loss) for _, loss in report["losses"])
