"""MGMTN's ablation table: the paired, seed-averaged difference and its identity-bootstrap interval, checked against
a direct computation on tiny real predictors over the synthetic test people."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from facesearch.benchmarks.attribute_ablation import VARIANTS, ablation, main, render_ablation
from facesearch.benchmarks.attribute_compare import _balanced_columns, read_split, score_faces
from facesearch.model.config import preset
from facesearch.model.faces.align import margin_geometry
from facesearch.model.mgmtn import MGMTN, MgmtnConfig, mgmtn_config
from facesearch.model.predictors.base import InputSpec
from facesearch.model.predictors.calibration import Calibration
from facesearch.model.predictors.mgmtn import MgmtnPredictor

SIZE = (56, 48)


def _predictor(seed: int, fusion: str = "g2ff", attributes: tuple[str, ...] | None = None) -> MgmtnPredictor:
    torch.manual_seed(seed)
    cfg = mgmtn_config(preset("fast", width=0.125, input_size=margin_geometry(SIZE)[0]))
    if attributes is not None:
        cfg = dataclasses.replace(cfg, attributes=attributes)
    net = MGMTN(cfg, MgmtnConfig(fusion=fusion, template=SIZE)).eval()
    m = len(cfg.attributes)
    # a steep calibration spreads the random network's scores across 0.5, so accuracies differ between seeds
    return MgmtnPredictor(net, InputSpec(SIZE, margin=True), Calibration(np.full(m, 40.0), np.zeros(m)))


def test_paired_difference_is_the_seed_mean_of_per_seed_differences(synth_data: Path) -> None:
    samples = read_split(synth_data / "celeba", "celeba", "test")
    p = {s: _predictor(s) for s in (0, 1)}
    q = {s: _predictor(10 + s, "global") for s in (0, 1)}
    doc = ablation({"g2ff": p, "global": q, "same": dict(p)}, samples, bootstrap=200)
    scored = score_faces({f"{k}{s}": v for k, d in (("p", p), ("q", q)) for s, v in d.items()}, samples)
    y = scored.labels
    means = {k: [np.nanmean(_balanced_columns(scored.probabilities[f"{k}{s}"], y)) for s in (0, 1)] for k in "pq"}
    ref, glob, same = doc["variants"]["g2ff"], doc["variants"]["global"], doc["variants"]["same"]
    assert ref["mean"] == pytest.approx(np.mean(means["p"])) and glob["mean"] == pytest.approx(np.mean(means["q"]))
    assert ref["sd_over_seeds"] == pytest.approx(np.std(means["p"], ddof=1))
    d = glob["difference"]
    assert d["versus"] == "g2ff" and d["seeds"] == [0, 1]
    assert d["mean"] == pytest.approx(np.mean(means["q"]) - np.mean(means["p"]))
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert same["difference"]["mean"] == 0 and same["difference"]["ci95"] == [0.0, 0.0]  # identical predictors
    assert "difference" not in ref and doc["identities"] == len({s.identity for s in samples})
    text = render_ablation(doc)
    assert "vs g2ff [95 % CI]" in text and "± " in text and "Male" in text


def test_runner_refuses_unknown_variants(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--data", "nowhere", "--variants", "g2ff,bogus"])
    assert "unknown mgmtn variant" in capsys.readouterr().err and "g2ff" in VARIANTS["mgmtn"]
    with pytest.raises(SystemExit):
        main(["--data", "nowhere", "--method", "mtl-cnn", "--variants", "fused,g2ff"])
    assert "unknown mtl-cnn variant" in capsys.readouterr().err and "single" in VARIANTS["mtl-cnn"]


def test_a_variant_with_fewer_attributes_is_compared_on_its_own(synth_data: Path) -> None:
    """MTL-CNN's ``single`` variant predicts one database's attributes: its difference to the reference is taken
    over those attributes only, never counting a missing column as "always negative"."""
    samples = read_split(synth_data / "celeba", "celeba", "test")
    few = ("Male", "Chubby", "High_Cheekbones")
    p = {s: _predictor(s) for s in (0, 1)}
    q = {s: _predictor(20 + s, attributes=few) for s in (0, 1)}
    doc = ablation({"fused": p, "single": q}, samples, bootstrap=100)
    scored = score_faces({**{f"p{s}": v for s, v in p.items()}, **{f"q{s}": v for s, v in q.items()}}, samples)
    cols = [scored.attributes.index(a) for a in few]
    y = scored.labels
    per = {k: [np.nanmean(_balanced_columns(scored.probabilities[f"{k}{s}"], y)[cols]) for s in (0, 1)] for k in "pq"}
    single = doc["variants"]["single"]
    assert sorted(single["difference"]["attributes"]) == sorted(few)
    assert single["difference"]["mean"] == pytest.approx(np.mean(per["q"]) - np.mean(per["p"]))
    missing = [a for a in doc["attributes"] if a not in few]
    assert all(single["per_attribute"][a] != single["per_attribute"][a] for a in missing)  # NaN, not 50 %
