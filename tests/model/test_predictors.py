"""The attribute-predictor interface (ATTRIBUTE_MODELS.md §0-1): calibration, the registry's file round trip for
every key, LNets+ANet's ten views and their averaging, the SVM fit, and training every method end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from facesearch.model.config import preset
from facesearch.model.faces.align import margin_geometry, window_offsets
from facesearch.model.faces.celeba import read_celeba
from facesearch.model.faces.prepare import prepare_image
from facesearch.model.network import FaceNet
from facesearch.model.predictors import PREDICTORS, InputSpec, checkpoint_key, load_predictor, predictor_class
from facesearch.model.predictors.calibration import (
    Calibration,
    calibration_report,
    expected_calibration_error,
    fit_platt,
    reliability,
)
from facesearch.model.predictors.facenet import MoonPredictor
from facesearch.model.predictors.lnets import LNetsPredictor, fit_svms, patch_views, view_list
from facesearch.model.train import centre_view, training_views
from facesearch.model.train_config import TrainConfig

SIZE = (56, 48)


def _net(input_size: tuple[int, int], seed: int = 0, identities: int = 0) -> FaceNet:
    torch.manual_seed(seed)
    cfg = preset("fast", width=0.125, input_size=input_size, num_identities=identities, embedding_dim=32,
                 attribute_hidden=16, head=2)  # fmt: skip
    return FaceNet(cfg).eval()


def _crops(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


# --- calibration -------------------------------------------------------------------------------------------------


def test_platt_recovers_a_known_logistic_map() -> None:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, (20_000, 2))
    y = (rng.random(true_logit.shape) < 1 / (1 + np.exp(-true_logit))).astype(np.float64)
    scores = (true_logit - np.array([1.0, -0.5])) / np.array([3.0, 0.5])  # logit = a * s + b with known a, b
    cal = fit_platt(scores, y)
    np.testing.assert_allclose(cal.scale, [3.0, 0.5], rtol=0.06)
    np.testing.assert_allclose(cal.bias, [1.0, -0.5], atol=0.08)
    p = cal.apply(scores)
    assert p.dtype == np.float32 and (p >= 0).all() and (p <= 1).all()
    assert expected_calibration_error(p, y).max() < 0.02
    assert expected_calibration_error(1 / (1 + np.exp(-scores)), y).min() > 0.05  # the raw scores are not


def test_calibration_maps_any_score_into_the_unit_interval_and_keeps_nan_rows() -> None:
    cal = Calibration(np.array([50.0, -3.0]), np.array([0.0, 1.0]))
    s = np.array([[1e6, -1e6], [-1e6, 1e6], [np.nan, np.nan], [0.0, 0.0]])
    p = cal.apply(s)
    assert np.isnan(p[2]).all()
    ok = p[[0, 1, 3]]
    assert (ok >= 0).all() and (ok <= 1).all()
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        cal.apply(np.zeros((3, 5)))


def test_one_class_and_unknown_labels_leave_identity_calibration() -> None:
    s = np.random.default_rng(1).normal(size=(50, 2))
    y = np.zeros((50, 2))
    y[:, 1] = np.nan
    cal = fit_platt(s, y)
    assert cal.scale.tolist() == [1.0, 1.0] and cal.bias.tolist() == [0.0, 0.0]
    assert np.isnan(expected_calibration_error(cal.apply(s), y)[1])


def test_reliability_bins_count_every_known_label() -> None:
    rng = np.random.default_rng(2)
    p, y = rng.random(1000), (rng.random(1000) < 0.3).astype(float)
    y[:10] = np.nan
    bins = reliability(p, y, bins=10)
    assert sum(b.n for b in bins) == 990 and all(0 <= b.positive_rate <= 1 for b in bins)
    report = calibration_report(p[:, None], y[:, None], ["A"], bins=10)
    assert report["attributes"]["A"]["n_pos"] + report["attributes"]["A"]["n_neg"] == 990


# --- the interface and its file format --------------------------------------------------------------------------


def _lnets(seed: int = 0) -> LNetsPredictor:
    net = _net(SIZE, seed)
    rng = np.random.default_rng(seed)
    m, d = len(net.cfg.attributes), net.cfg.embedding_dim
    cal = Calibration(rng.uniform(0.5, 2, m), rng.normal(0, 0.3, m))
    return LNetsPredictor(net, rng.normal(size=(m, d)), rng.normal(size=m), "ten", cal, {"note": "test"})


def _make(key: str, tmp_path: Path) -> Path:
    """A tiny predictor of ``key`` saved to a file."""
    path = tmp_path / f"{key}.safetensors"
    if key == "icmr":
        from facesearch.model.checkpoint import save_checkpoint

        net = _net(SIZE, identities=5)
        save_checkpoint(path, net.cfg, net.state_dict())
    elif key == "moon":
        net = _net(margin_geometry(SIZE)[0], 1)
        cal = Calibration(np.full(len(net.cfg.attributes), 0.7), np.full(len(net.cfg.attributes), 0.1))
        MoonPredictor(net, InputSpec(SIZE, margin=True), cal).save(path)
    elif key == "mgmtn":
        from facesearch.model.mgmtn import MGMTN, MgmtnConfig, mgmtn_config
        from facesearch.model.predictors.mgmtn import MgmtnPredictor

        torch.manual_seed(2)
        cfg = mgmtn_config(preset("fast", width=0.125, input_size=margin_geometry(SIZE)[0], num_identities=0))
        mnet = MGMTN(cfg, MgmtnConfig(template=SIZE, margin=True)).eval()
        cal = Calibration(np.full(len(cfg.attributes), 0.9), np.full(len(cfg.attributes), -0.1))
        MgmtnPredictor(mnet, InputSpec(SIZE, margin=True), cal).save(path)
    elif key == "mtl-cnn":
        from facesearch.model.mtl_cnn import MtlCnn, MtlConfig, Task, mtl_model_config
        from facesearch.model.predictors.mtl_cnn import MtlCnnPredictor

        torch.manual_seed(3)
        tasks = (Task("Male"), Task("Chubby"), Task("Hair_Colour", ("black", "blond", "grey")))
        mcfg = MtlConfig(tasks, groups=4, hidden=8, together=(("Chubby", "Male"), ("Hair_Colour", "Male")))
        base = preset("fast", width=0.125, input_size=margin_geometry(SIZE)[0], num_identities=0)
        tnet = MtlCnn(mtl_model_config(dataclasses.replace(base, embedding_dim=32), mcfg), mcfg).eval()
        with torch.no_grad():
            tnet.correlation.copy_(torch.randn(5, 5) * tnet.get_buffer("correlation_mask"))
        cal = Calibration(np.full(5, 1.1), np.full(5, 0.2))
        MtlCnnPredictor(tnet, InputSpec(SIZE, margin=True), cal).save(path)
    else:
        _lnets().save(path)
    return path


@pytest.mark.parametrize("key", list(PREDICTORS))
def test_every_registered_predictor_round_trips_through_its_file(key: str, tmp_path: Path) -> None:
    path = _make(key, tmp_path)
    p = load_predictor(path)
    assert p.key == key and predictor_class(key) is type(p)
    assert p.input_spec.crop_size == (margin_geometry(SIZE)[0] if p.input_spec.margin else SIZE)
    crops = _crops(5, p.input_spec.crop_size)
    probs = p.predict_crops(crops)
    assert probs.shape == (5, len(p.attributes)) and probs.dtype == np.float32
    assert (probs >= 0).all() and (probs <= 1).all()
    again = load_predictor(path)
    assert again.fingerprint == p.fingerprint and len(p.fingerprint) == 64
    np.testing.assert_array_equal(again.predict_crops(crops), probs)
    resaved = tmp_path / "again.safetensors"
    assert again.save(resaved) == p.fingerprint  # the fingerprint covers the network, SVMs and calibration alike
    d = p.describe()
    assert d["key"] == key and d["parameters"] > 0 and d["macs"] > 0
    with pytest.raises(ValueError, match=f"{key} predictor reads"):
        p.predict_crops(_crops(2, (40, 40)))


def test_calibration_changes_the_fingerprint_and_the_probabilities(tmp_path: Path) -> None:
    p = _lnets()
    other = p.with_calibration(Calibration(np.ones(len(p.attributes)), np.full(len(p.attributes), 2.0)))
    assert other.fingerprint != p.fingerprint
    crops = _crops(3, p.input_spec.crop_size)
    np.testing.assert_array_equal(p.scores(crops), other.scores(crops))
    assert not np.allclose(p.predict_crops(crops), other.predict_crops(crops))


def test_unknown_key_and_foreign_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown attribute predictor 'nope'; valid: icmr, moon, lnets-anet"):
        predictor_class("nope")
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"x\.safetensors"):
        load_predictor(bad)


def test_plain_checkpoints_are_read_as_icmr_or_moon(tmp_path: Path) -> None:
    from facesearch.model.checkpoint import load_checkpoint, save_checkpoint

    net = _net(SIZE)
    moon_cfg = {"attribute_loss": "moon", "stages": [{"lambda1": 1.0, "lambda2": 0.0}]}
    save_checkpoint(tmp_path / "m.safetensors", net.cfg, net.state_dict(), train_config=moon_cfg)
    save_checkpoint(tmp_path / "i.safetensors", net.cfg, net.state_dict())
    assert checkpoint_key(load_checkpoint(tmp_path / "m.safetensors")) == "moon"
    assert checkpoint_key(load_checkpoint(tmp_path / "i.safetensors")) == "icmr"


def test_predict_from_images_aligns_each_with_its_landmarks(synth_data: Path, tmp_path: Path) -> None:
    p = load_predictor(_make("moon", tmp_path))
    samples = read_celeba(synth_data / "celeba", 2)[:4]
    paths = [s.path for s in samples] + [tmp_path / "missing.jpg"]
    probs = p.predict(paths, [s.landmarks for s in samples] + [None])
    assert np.isnan(probs[-1]).all() and np.isfinite(probs[:-1]).all()
    crops = np.stack([prepare_image(s.path, s.landmarks, size=SIZE, margin=True).first().crop for s in samples])
    np.testing.assert_allclose(probs[:-1], p.predict_crops(crops), rtol=1e-6)


# --- LNets+ANet ----------------------------------------------------------------------------------------------------


def test_ten_views_and_the_centred_view_is_the_aligned_crop(synth_data: Path) -> None:
    samples = read_celeba(synth_data / "celeba", 2)[:3]
    size = (112, 96)
    wide = np.stack([prepare_image(s.path, s.landmarks, size=size, margin=True).first().crop for s in samples])
    std = np.stack([prepare_image(s.path, s.landmarks, size=size).first().crop for s in samples])
    views = patch_views(wide, size)
    assert views.shape == (3, 10, 112, 96, 3)
    assert [o for o, _ in view_list(size, "ten")][:5] == [(0, 0), (16, 0), (0, 16), (16, 16), (8, 4)]
    np.testing.assert_array_equal(views[:, 4], std)  # the centred window, pixel for pixel
    np.testing.assert_array_equal(views[:, 9], std[:, :, ::-1])  # and its mirror image
    np.testing.assert_array_equal(views[:, 0], wide[:, :112, :96])
    np.testing.assert_array_equal(views[:, 3], wide[:, 16:, 16:])
    assert patch_views(wide, size, "centre").shape == (3, 1, 112, 96, 3)


def test_score_is_the_mean_of_the_per_view_decisions() -> None:
    p = _lnets(3)
    crops = _crops(4, p.input_spec.crop_size)
    per_view = p.view_decisions(crops)
    assert per_view.shape == (4, 10, len(p.attributes))
    np.testing.assert_allclose(p.scores(crops), per_view.mean(axis=1), rtol=1e-5, atol=1e-6)
    feats = np.stack([p.embedder.forward_crops(np.ascontiguousarray(v))[0] for v in
                      patch_views(crops, SIZE).transpose(1, 0, 2, 3, 4)], axis=1)  # fmt: skip
    np.testing.assert_allclose(per_view, feats @ p.svm_weight.T + p.svm_bias, rtol=1e-4, atol=1e-4)


def test_svms_learn_a_planted_direction_with_identity_grouped_cv() -> None:
    rng = np.random.default_rng(0)
    n, v, d = 240, 3, 16
    people = np.repeat(np.arange(40), 6)
    y = np.stack([(people % 2), (people % 3 == 0)], axis=1).astype(np.float64)  # identity-stable labels
    x = rng.normal(size=(n, v, d))
    x[..., 0] += 2.0 * (y[:, :1] - 0.5)
    x[..., 1] += 2.0 * (y[:, 1:2] - 0.5)
    y[:5, 1] = np.nan  # unknown labels are left out
    fit = fit_svms(x, y, [f"p{p}" for p in people])
    decision = np.einsum("nvd,md->nvm", x, fit.weight).mean(1) + fit.bias
    assert ((decision[:, 0] > 0) == (y[:, 0] > 0.5)).mean() > 0.9
    known = np.isfinite(y[:, 1])
    assert ((decision[known, 1] > 0) == (y[known, 1] > 0.5)).mean() > 0.9
    assert all(c in (0.01, 0.1, 1.0) for c in fit.c) and all(
        s is not None and s > 0.85 for s in fit.cv_balanced_accuracy
    )


def test_training_views_are_windows_of_the_margin_crop_and_repeatable() -> None:
    crops = torch.from_numpy(_crops(16, margin_geometry(SIZE)[0], 5))
    a, b = training_views(crops, SIZE, 0, 7), training_views(crops, SIZE, 0, 7)
    assert a.shape == (16, *SIZE, 3) and torch.equal(a, b)
    windows = [crops[:, y : y + SIZE[0], x : x + SIZE[1]] for x, y in window_offsets(SIZE)]
    for i in range(16):
        assert any(torch.equal(a[i], w[i]) for w in windows)
    assert not torch.equal(a, training_views(crops, SIZE, 0, 8))  # another step, other windows (16 picks of 5)
    x, y = window_offsets(SIZE)[-1]
    assert torch.equal(centre_view(crops, SIZE), crops[:, y : y + SIZE[0], x : x + SIZE[1]])


def test_margin_training_reads_the_margin_canvas(tmp_path: Path) -> None:
    cfg = TrainConfig(data=tmp_path, arch="fast", width=0.125, input_size=SIZE, crop="margin")
    assert cfg.model_config(3).input_size == (64, 56)
    assert TrainConfig(data=tmp_path, arch="fast", input_size=SIZE, crop="views").model_config(3).input_size == SIZE
    with pytest.raises(ValueError, match="crop must be one of"):
        TrainConfig(data=tmp_path, crop="wide")
    with pytest.raises(ValueError, match="partition"):
        TrainConfig(data=tmp_path, partition=0)  # casia has no partitions


def test_similarity_loss_pulls_one_person_together_and_pushes_people_apart() -> None:
    from facesearch.model.losses import similarity_loss

    ids = torch.tensor([0, 0, 1, 1, -1])
    apart = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [0, 3.0, 0], [5.0, 5.0, 5.0]])
    assert float(similarity_loss(apart, ids)) == 0.0  # same person identical, people orthogonal (d = sqrt 2 > 1)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01], [0.0, 1.0]], requires_grad=True)
    loss = similarity_loss(f, torch.tensor([0, 0, 1, 2]))
    loss.backward()
    assert loss.item() > 0 and f.grad is not None and float(f.grad.abs().sum()) > 0
    assert float(similarity_loss(torch.ones(1, 3), torch.tensor([0]))) == 0.0  # no pair
