"""The main job (`make run`): its metrics against brute force, and a tiny end-to-end run through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from engine.cli import main
from engine.demo import balanced_accuracy, rank1_unseen


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


def test_rank1_unseen_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    ids = [f"p{i // 4}" for i in range(20)]
    xq = rng.normal(size=(20, 8)).astype(np.float32)
    xq += 2 * np.repeat(rng.normal(size=(5, 8)), 4, axis=0).astype(np.float32)  # identity structure
    xb = rng.normal(size=(30, 8)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    hits = 0
    for i in range(20):
        gallery = [(float(xq[i] @ xq[j]), ids[j]) for j in range(20) if j != i]
        gallery += [(float(xq[i] @ xb[j]), "distractor") for j in range(30)]
        hits += max(gallery)[1] == ids[i]
    assert rank1_unseen(xq, ids, xb) == hits / 20
    assert 0 < hits < 20, "the fixture must exercise both hits and misses"


def test_demo_end_to_end_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        main,
        ["demo", "--out", str(out), "--identities", "12", "--stage1-iterations", "30", "--stage2-iterations", "10",
         "--attribute-iterations", "10", "--device", "cpu", "--small"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert "report:" in result.output and (out / "report.md").is_file()
    assert report["model"]["fingerprint"] and Path(report["model"]["weights"]).is_file()
    assert 0 <= report["unseen_rank1"] <= 1 and report["unseen_probes"] > 0
    assert set(report["label_balanced_accuracy"]) == set(report["model_attribute_balanced_accuracy"])
    assert report["losses"] and all(np.isfinite(loss) for _, loss in report["losses"])
