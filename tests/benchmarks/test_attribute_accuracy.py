"""Per-attribute accuracy (Table 4): the metric on handmade arrays, predictions on the synthetic CelebA-format set
with a tiny checkpoint, and ``facesearch bench attributes`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facesearch.benchmarks.attribute_accuracy import (
    AttributeScore,
    evaluate_attributes,
    format_attribute_table,
    mean_scores,
    predict_celeba,
)
from facesearch.cli import main
from facesearch.model.config import ATTRIBUTES


def test_evaluate_attributes_handmade() -> None:
    probs = {
        "Male": np.array([0.9, 0.2, 0.6, 0.4, 0.5, 0.1]),
        "Chubby": np.array([0.7, 0.1, 0.2, 0.3, 0.6, 0.0]),
        "Only_Predicted": np.zeros(6),
    }
    truth = {
        "Chubby": np.zeros(6, bool),
        "Male": np.array([True, False, False, True, True, False]),
        "Only_Labelled": np.ones(6, bool),
    }
    male, chubby = evaluate_attributes(probs, truth)
    # Male: predicted [T F T F T F] (0.5 counts as positive) vs truth [T F F T T F]: 4/6 right; TP 2/3, TN 2/3.
    assert male == AttributeScore("Male", 6, 0.5, 4 / 6, 2 / 3, 2 / 3, 2 / 3)
    # Chubby: no positives, so TPR is undefined and balanced accuracy = TNR = 4/6.
    assert chubby.attribute == "Chubby" and chubby.n == 6 and chubby.positive_rate == 0.0
    assert chubby.accuracy == 4 / 6 and chubby.tnr == 4 / 6 and math.isnan(chubby.tpr)
    assert chubby.balanced_accuracy == 4 / 6 and chubby.to_dict()["tpr"] is None
    (strict,) = evaluate_attributes({"Male": probs["Male"]}, truth, threshold=0.55)
    assert strict.accuracy == 3 / 6 and strict.tpr == 1 / 3  # 0.5 is now negative
    assert mean_scores([male, chubby]) == pytest.approx({"accuracy": 4 / 6, "balanced_accuracy": 4 / 6,
                                                         "positive_rate": 0.25})  # fmt: skip
    table = format_attribute_table([male, chubby])
    assert "| Male | 66.67 | 66.67 | 0.500 | 6 |" in table
    assert "| **mean** | 66.67 | 66.67 | 0.250 | 6 |" in table


def test_evaluate_attributes_errors() -> None:
    with pytest.raises(ValueError, match="no attribute in common"):
        evaluate_attributes({"A": np.zeros(2)}, {"B": np.zeros(2, bool)})
    with pytest.raises(ValueError, match="A: 3 probabilities for 2 labels"):
        evaluate_attributes({"A": np.zeros(3)}, {"A": np.zeros(2, bool)})
    with pytest.raises(ValueError, match="A: 1 probabilities are NaN"):
        evaluate_attributes({"A": np.array([0.1, np.nan])}, {"A": np.zeros(2, bool)})
    with pytest.raises(ValueError, match="bool"):
        evaluate_attributes({"A": np.zeros(2)}, {"A": np.zeros(2)})
    with pytest.raises(ValueError, match="threshold"):
        evaluate_attributes({"A": np.zeros(2)}, {"A": np.zeros(2, bool)}, threshold=2.0)


def test_predict_celeba_synthetic(synth_data: Path, ckpt: Path) -> None:
    pred = predict_celeba(synth_data / "celeba", ckpt, device="cpu", batch_size=64, split="test", limit=40)
    assert list(pred.probabilities) == list(ATTRIBUTES) and list(pred.truth) == list(ATTRIBUTES)
    assert pred.n + pred.skipped == 40 and pred.n > 0  # the test split has 60 images
    for name in ATTRIBUTES:
        p = pred.probabilities[name]
        assert p.shape == (pred.n,) and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
        assert pred.truth[name].dtype == bool and pred.truth[name].shape == (pred.n,)
    scores = evaluate_attributes(pred.probabilities, pred.truth)
    assert [s.attribute for s in scores] == list(ATTRIBUTES)
    assert all(0.0 <= s.accuracy <= 1.0 and s.n == pred.n for s in scores)
    with pytest.raises(ValueError, match="split must be one of"):
        predict_celeba(synth_data / "celeba", ckpt, split="dev")


def test_bench_attributes_command(synth_data: Path, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "attributes.json"
    args = ["bench", "attributes", "--data", str(synth_data / "celeba"), "--checkpoint", str(ckpt),
            "--split", "val", "--limit", "24", "--device", "cpu", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "| attribute | accuracy % |" in res.output and "**mean**" in res.output
    doc = json.loads(out.read_text())
    assert [a["attribute"] for a in doc["attributes"]] == list(ATTRIBUTES)
    assert doc["split"] == "val" and doc["threshold"] == 0.5 and doc["fingerprint"] and 0 < doc["n"] <= 24
    res = CliRunner().invoke(main, ["bench", "attributes", "--data", str(tmp_path), "--checkpoint", str(ckpt)])
    assert res.exit_code == 1 and "list_attr_celeba.txt" in res.output and "Traceback" not in res.output
