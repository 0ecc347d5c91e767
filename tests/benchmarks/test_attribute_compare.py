"""The side-by-side attribute table: predictors trained end to end by ``facesearch attributes train --method`` on
the synthetic CelebA-format set, compared by ``facesearch bench attributes --predictors`` on its test people, and
the same table's statistics checked against a direct computation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facesearch.benchmarks.attribute_compare import (
    _balanced_columns,
    compare_predictors,
    identity_bucket,
    read_split,
)
from facesearch.cli import main
from facesearch.model.attributes import LabelConfig, label_identities
from facesearch.model.predictors import load_predictor

TRAIN = ["--arch", "fast", "--width", "0.125", "--input-size", "56x48", "--iterations", "6", "--batch-size", "12",
         "--workers", "0", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """moon, lnets-anet and mgmtn trained a few steps each through the CLI (lnets: pretraining, fine-tuning, SVMs;
    mgmtn: its mask network, then the network with the learned masks)."""
    out = tmp_path_factory.mktemp("predictors")
    paths = {}
    for method, extra in (("moon", []), ("lnets-anet", ["--identity-iterations", "6", "--svm-images", "120"]),
                          ("mgmtn", ["--masks", "learned", "--mask-iterations", "3"])):  # fmt: skip
        args = ["attributes", "train", "--data", str(synth_data / "celeba"), "--method", method,
                "--out", str(out / method), *TRAIN, *extra]  # fmt: skip
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        assert "validation (val split" in res.output and "ECE calibrated" in res.output
        paths[method] = out / method / "predictor.safetensors"
        assert paths[method].is_file() and (out / method / "predictor.json").is_file()
    return paths


@pytest.mark.slow
def test_trained_predictors_record_what_made_them(trained: dict[str, Path]) -> None:
    lnets = load_predictor(trained["lnets-anet"])
    assert lnets.key == "lnets-anet" and lnets.input_spec.margin and lnets.calibration.method == "platt"
    seconds = lnets.meta["train_seconds"]
    assert {"identity_pretraining", "attribute_finetuning", "svm", "calibration", "total"} <= set(seconds)
    assert lnets.meta["svm"]["images"] <= 120 and lnets.meta["validation"]["split"] == "val"
    assert (Path(trained["lnets-anet"]).parent / "identity" / "model.safetensors").is_file()
    moon = load_predictor(trained["moon"])
    assert moon.key == "moon" and moon.input_spec.crop_size == (64, 56)
    assert moon.meta["options"]["method"] == "moon"
    mgmtn = load_predictor(trained["mgmtn"])
    assert mgmtn.key == "mgmtn" and mgmtn.input_spec.crop_size == (64, 56)
    assert mgmtn.describe()["mgmtn"] == {"fusion": "g2ff", "masks": "learned", "template": [56, 48], "margin": True}
    assert {"mask_network", "network", "calibration"} <= set(mgmtn.meta["train_seconds"])
    assert (Path(trained["mgmtn"]).parent / "masks" / "mask_net.safetensors").is_file()


@pytest.mark.slow
def test_mask_picture_shows_landmark_and_learned_masks(trained: dict[str, Path], synth_data: Path,
                                                       tmp_path: Path) -> None:  # fmt: skip
    import cv2

    from facesearch.model.faces.celeba import read_celeba

    sample = next(s for s in read_celeba(synth_data / "celeba") if s.landmarks is not None)
    marks = ",".join(f"{v:.2f}" for v in np.asarray(sample.landmarks).reshape(-1))
    out = tmp_path / "masks.png"
    args = ["attributes", "masks", "--image", str(sample.path), "--landmarks", marks, "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    alone = cv2.imread(str(out))
    res = CliRunner().invoke(main, [*args, "--classifier", str(trained["mgmtn"])])
    assert res.exit_code == 0 and "learned + from landmarks" in res.output, res.output
    both = cv2.imread(str(out))
    assert both.shape[0] / both.shape[1] > 1.5 * alone.shape[0] / alone.shape[1]  # a second row: the learned masks
    res = CliRunner().invoke(main, [*args[:-2], "--landmarks", "1,2,3", "--out", str(out)])
    assert res.exit_code != 0 and "ten numbers" in res.output
    res = CliRunner().invoke(main, [*args, "--classifier", str(trained["moon"])])
    assert res.exit_code != 0 and "not mgmtn" in res.output


@pytest.mark.slow
def test_bench_attributes_compares_predictors_side_by_side(
    trained: dict[str, Path], synth_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cmp.json"
    spec = f"moon={trained['moon']},lnets={trained['lnets-anet']}"
    args = ["bench", "attributes", "--data", str(synth_data / "celeba"), "--predictors", spec, "--bootstrap", "50",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "moon bal. acc % (acc %)" in res.output and "vs moon [95 % CI]" in res.output
    doc = json.loads(out.read_text())
    assert [p["name"] for p in doc["predictors"]] == ["moon", "lnets"]
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").stat().st_size > 1000
    test_people = {s.identity for s in read_split(synth_data / "celeba", "celeba", "test")}
    assert doc["identities"] == len(test_people) and doc["split"] == "test"
    for p in doc["predictors"]:
        lo, hi = p["ci95"]
        assert lo <= p["mean_balanced_accuracy"] <= hi
        assert sum(v["n_pos"] + v["n_neg"] for v in p["per_attribute"].values()) == doc["images"] * 7
    assert doc["predictors"][1]["difference"]["versus"] == "moon"

    res = CliRunner().invoke(main, ["bench", "attributes", "--data", str(synth_data / "celeba"),
                                    "--predictors", "mgmtn"])  # fmt: skip
    assert res.exit_code != 0 and "mgmtn" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_comparison_statistics_match_a_direct_computation(trained: dict[str, Path], synth_data: Path) -> None:
    samples = read_split(synth_data / "celeba", "celeba", "test")
    p = load_predictor(trained["moon"])
    c = compare_predictors({"moon": p}, samples, bootstrap=0)
    probs = p.predict([s.path for s in samples], [s.landmarks for s in samples])
    y = np.array([[s.attributes[a] for a in p.attributes] for s in samples])
    expect = _balanced_columns(probs.astype(np.float64), y)
    got = np.array([c.predictors[0].per_attribute[a]["balanced_accuracy"] for a in p.attributes])
    np.testing.assert_allclose(got, expect)
    pos = y[:, 0] > 0.5
    manual = ((probs[pos, 0] > 0.5).mean() + (probs[~pos, 0] <= 0.5).mean()) / 2 if pos.any() and (~pos).any() else None
    if manual is not None:
        assert got[0] == pytest.approx(manual)


@pytest.mark.slow
def test_any_predictor_labels_identities(trained: dict[str, Path], synth_data: Path, tmp_path: Path) -> None:
    result = label_identities(LabelConfig(trained["lnets-anet"], synth_data / "casia", tmp_path / "labels.csv",
                                          device="cpu"))  # fmt: skip
    assert result.identities == 24
    doc = json.loads(result.provenance.read_text())
    assert doc["predictor"] == "lnets-anet" and doc["classifier_fingerprint"] == load_predictor(
        trained["lnets-anet"]).fingerprint  # fmt: skip
    with open(result.labels, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and all(r["Male"] in ("0.0", "1.0", "0", "1") for r in rows)


def test_list_csv_split_by_person(tmp_path: Path) -> None:
    rows = [f"img{i}.jpg,person{i % 30},{i % 2}," for i in range(300)]
    (tmp_path / "l.csv").write_text("path,identity,Male,Chubby\n" + "\n".join(rows) + "\n")
    test = read_split(tmp_path / "l.csv", "list", "test")
    train = read_split(tmp_path / "l.csv", "list", "train")
    assert {s.identity for s in test}.isdisjoint({s.identity for s in train})
    assert all(identity_bucket(str(s.identity)) == 2 for s in test)
    assert all(s.attributes == {"Male": s.attributes["Male"]} for s in test)  # empty cell = unknown
    assert len(read_split(tmp_path / "l.csv", "list", "all")) == 300
    with pytest.raises(ValueError, match="no labelled image"):
        (tmp_path / "e.csv").write_text("path,identity,Male\na.jpg,x,\n")
        read_split(tmp_path / "e.csv", "list", "all")


def test_calibrate_any_network_on_held_out_people(ckpt: Path, synth_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cal.safetensors"
    args = ["attributes", "calibrate", "--classifier", str(ckpt), "--data", str(synth_data / "celeba"),
            "--out", str(out), "--device", "cpu"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "validation (val split" in res.output and "ECE calibrated" in res.output
    p, raw = load_predictor(out), load_predictor(ckpt)
    assert p.key == "icmr" and p.calibration.method == "platt" and raw.calibration.method == "identity"
    assert p.fingerprint != raw.fingerprint and p.meta["calibrated_on"]["split"] == "val"
    val = read_split(synth_data / "celeba", "celeba", "val")
    probs = p.predict([s.path for s in val], [s.landmarks for s in val])
    y = np.array([[s.attributes[a] for a in p.attributes] for s in val])
    # Platt's fit on these same people: the calibrated mean probability follows the positive rate closely (where
    # both classes are present; a one-class attribute keeps the identity map)
    both = (y.min(0) == 0) & (y.max(0) == 1)
    assert both.any() and np.abs(probs.mean(0) - y.mean(0))[both].max() < 0.1
    assert (p.calibration.scale[~both] == 1).all()


def test_mask_picture_of_a_real_face_found_by_the_detector(orl_dir: Path, tmp_path: Path) -> None:
    import cv2

    out = tmp_path / "orl_masks.png"
    res = CliRunner().invoke(main, ["attributes", "masks", "--image", str(orl_dir / "s1" / "1.pgm"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    picture = cv2.imread(str(out))
    assert picture is not None and picture.shape[0] > 2 * 128 and picture.shape[1] > 4 * 112  # 2 rows x 4 panels
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.zeros((200, 200, 3), np.uint8))
    res = CliRunner().invoke(main, ["attributes", "masks", "--image", str(blank), "--out", str(tmp_path / "x.png")])
    assert res.exit_code != 0 and "no_face" in res.output and not (tmp_path / "x.png").exists()
