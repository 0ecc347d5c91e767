"""Training: losses (masking, λ = 0, MOON), schedule and data order, a short run that learns, exact resume, skipped
files, resume refusals, the ``facesearch train`` command, and the attribute sets (Table 7 groups, no attributes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import facesearch.cli.train  # noqa: F401  (registers `train` on the click group)
from facesearch.cli._app import main
from facesearch.model.checkpoint import load_checkpoint
from facesearch.model.config import ATTRIBUTE_GROUPS, ATTRIBUTES, ModelConfig
from facesearch.model.faces.align import REFERENCE_112x96
from facesearch.model.losses import moon_loss, moon_weights, multitask_loss
from facesearch.model.network import FaceNet, Outputs, to_input
from facesearch.model.train import TrainConfig, train
from facesearch.model.train_config import (
    PAPER_STAGES,
    StageConfig,
    rescale_stage,
    resolve_train_config,
    select_attributes,
    without_attributes,
)
from facesearch.model.trainer_data import StepBatchSampler

torch.set_num_threads(1)

_COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40), (200, 50, 210), (40, 210, 210), (240, 140, 30),
            (120, 120, 120)]  # fmt: skip


def _draw(k: int, rng: np.random.Generator) -> np.ndarray:
    """Identity ``k``: a background colour and a shape (circle, square, triangle, cross) in the complementary colour,
    with a random shift of up to 5 px, brightness jitter and Gaussian pixel noise (sigma 12)."""
    bg = np.array(_COLOURS[k % len(_COLOURS)], np.float32)
    fg = (255 - bg).tolist()
    img = np.empty((112, 96, 3), np.float32)
    img[:] = bg * rng.uniform(0.8, 1.2)
    cx, cy = (int(v) for v in np.array([48, 60]) + rng.integers(-5, 6, size=2))
    shape = k % 4
    if shape == 0:
        cv2.circle(img, (cx, cy), 22, fg, -1)
    elif shape == 1:
        cv2.rectangle(img, (cx - 20, cy - 20), (cx + 20, cy + 20), fg, -1)
    elif shape == 2:
        cv2.fillPoly(img, [np.array([[cx, cy - 24], [cx - 22, cy + 18], [cx + 22, cy + 18]], np.int32)], fg)
    else:
        cv2.line(img, (cx - 22, cy), (cx + 22, cy), fg, 9)
        cv2.line(img, (cx, cy - 22), (cx, cy + 22), fg, 9)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def make_casia(root: Path, identities: int = 8, per_identity: int = 10, seed: int = 0) -> Path:
    """A CASIA-style folder of 112x96 PNGs, ``landmarks.csv`` (the alignment template, so alignment is a pure rescale)
    and a per-identity ``attributes.csv`` (attribute i = bit i % 3 of the identity number)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lm = ",".join(f"{v:.4f}" for v in REFERENCE_112x96.reshape(-1))
    rows = ["path,identity," + ",".join(f"{a}{i}" for i in range(1, 6) for a in "xy")]
    for k in range(identities):
        (root / f"id{k:02d}").mkdir(exist_ok=True)
        for j in range(per_identity):
            rel = f"id{k:02d}/{j:03d}.png"
            cv2.imwrite(str(root / rel), cv2.cvtColor(_draw(k, rng), cv2.COLOR_RGB2BGR))
            rows.append(f"{rel},id{k:02d},{lm}")
    (root / "landmarks.csv").write_text("\n".join(rows) + "\n")
    bits = [[(k >> (i % 3)) & 1 for i in range(len(ATTRIBUTES))] for k in range(identities)]
    attrs = [f"id{k:02d}," + ",".join(map(str, row)) for k, row in enumerate(bits)]
    (root / "attributes.csv").write_text("\n".join(["identity," + ",".join(ATTRIBUTES), *attrs]) + "\n")
    return root


@pytest.fixture(scope="module")
def casia(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_casia(tmp_path_factory.mktemp("data") / "casia")


def small_config(data: Path, out: Path, **changes: object) -> TrainConfig:
    """A tiny Fast model (width 1/8, 56x48 input) for CPU tests: ~330 images/s on one core in fp32."""
    base: dict[str, object] = dict(
        data=data, out=out, labels=data / "attributes.csv", arch="fast", width=0.125, input_size=(56, 48),
        embedding_dim=32, attribute_hidden=16, batch_size=16, num_workers=0, precision="fp32", device="cpu",
        stages=(StageConfig(8, 0.05), StageConfig(4, 0.005, lambda1=0.1)), log_every=1, val_every=0,
        checkpoint_every=0,
    )  # fmt: skip
    base.update(changes)
    return TrainConfig(**base)  # type: ignore[arg-type]


def read_metrics(out: Path, event: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


# ---------------------------------------------------------------------------------------------------- losses


def _outputs(b: int = 6, p: int = 5, m: int = 3, seed: int = 0) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    ident = torch.randn(b, p, generator=g, requires_grad=True)
    attr = torch.randn(b, m, generator=g, requires_grad=True)
    return Outputs(torch.randn(b, 4, generator=g), ident, attr)


def test_unknown_labels_are_masked() -> None:
    out = _outputs()
    ids = torch.tensor([0, -1, 2, 4, -1, 1])
    attrs = torch.tensor([[1.0, float("nan"), 0.0]] * 3 + [[float("nan")] * 3] * 3)
    total, parts = multitask_loss(out, ids, attrs, lambda1=0.5, lambda2=2.0)
    assert out.identity_logits is not None
    known = ids >= 0
    ce = F.cross_entropy(out.identity_logits[known], ids[known])
    p = torch.sigmoid(out.attribute_logits[:3, [0, 2]])
    mse = ((p - torch.tensor([1.0, 0.0])) ** 2).mean()
    torch.testing.assert_close(parts["identity"], ce.detach())
    torch.testing.assert_close(parts["attribute"], mse.detach())
    torch.testing.assert_close(total, 0.5 * mse + 2.0 * ce)
    total.backward()
    assert out.attribute_logits.grad is not None and out.identity_logits.grad is not None
    assert torch.all(out.attribute_logits.grad[3:] == 0) and torch.all(out.attribute_logits.grad[:3, 1] == 0)
    assert torch.all(out.identity_logits.grad[~known] == 0)


def test_all_unknown_batch_gives_zero_and_backward_works() -> None:
    out = _outputs()
    total, parts = multitask_loss(out, torch.full((6,), -1), torch.full((6, 3), float("nan")), 0.1, 1.0)
    assert float(total.detach()) == 0.0 and set(parts) == {"attribute", "identity"}
    total.backward()  # still on the graph


def test_zero_lambda_term_is_skipped() -> None:
    out = _outputs()
    attrs = torch.zeros(6, 3)
    total, parts = multitask_loss(out, torch.arange(6) % 5, attrs, lambda1=0.0, lambda2=1.0)
    assert set(parts) == {"identity"}
    total.backward()
    assert out.attribute_logits.grad is None  # the attribute head is not even on the graph
    out = _outputs()
    total, parts = multitask_loss(out._replace(identity_logits=None), torch.zeros(6, dtype=torch.long), attrs, 1.0, 0.0)
    assert set(parts) == {"attribute"}
    with pytest.raises(ValueError, match="not both 0"):
        multitask_loss(out, torch.zeros(6, dtype=torch.long), attrs, 0.0, 0.0)


def test_moon_weights_make_the_effective_balance_the_target() -> None:
    # Source 20 % positive, target 50 %: negatives (the majority) get the odds ratio 0.25, positives keep 1.
    labels = torch.tensor([[1.0]] * 20 + [[0.0]] * 80)
    w = moon_weights(labels, torch.tensor([0.2]), 0.5)
    assert torch.allclose(w[:20], torch.tensor(1.0)) and torch.allclose(w[20:], torch.tensor(0.25))
    share = float((w * labels).sum() / w.sum())
    assert share == pytest.approx(0.5, abs=1e-6)
    # Majority positives (source 80 %, target 30 %): positives are down-weighted, negatives keep 1.
    w2 = moon_weights(1 - labels, torch.tensor([0.8]), 0.3)
    assert float(((1 - labels) * w2).sum() / w2.sum()) == pytest.approx(0.3, abs=1e-6) and float(w2.max()) == 1.0
    # The best constant prediction under each loss is the effective positive share: 0.2 (MSE) vs 0.5 (MOON).
    for loss_fn, expected in [
        (lambda z: moon_loss(z, labels, 0.5, torch.tensor([0.2])), 0.5),
        (lambda z: ((torch.sigmoid(z) - labels) ** 2).mean(), 0.2),
    ]:
        z = torch.zeros(1, 1, requires_grad=True)
        opt = torch.optim.SGD([z], lr=20.0)
        for _ in range(500):
            opt.zero_grad()
            loss_fn(z.expand(100, 1)).backward()
            opt.step()
        assert float(torch.sigmoid(z.detach())) == pytest.approx(expected, abs=1e-3)
    # Already balanced: MOON is the plain MSE.
    z = torch.randn(100, 1)
    plain = ((torch.sigmoid(z) - labels) ** 2).mean()
    torch.testing.assert_close(moon_loss(z, labels, 0.2, torch.tensor([0.2])), plain)


# ---------------------------------------------------------------------------------------------------- schedule, data


def test_paper_schedule_and_lr_is_a_function_of_the_step() -> None:
    s1, s2 = PAPER_STAGES
    assert (s1.iterations, s1.lr, s1.milestones, s1.lambda1, s1.lambda2) == (70_000, 0.01, (40_000, 58_000), 0, 1)
    assert (s2.iterations, s2.lr, s2.milestones, s2.lambda1, s2.lambda2) == (30_000, 0.001, (10_000, 20_000), 0.1, 1)
    assert [s1.lr_at(i) for i in (0, 39_999, 40_000, 58_000)] == pytest.approx([0.01, 0.01, 0.001, 0.0001])
    short = rescale_stage(s1, 200)
    assert short.milestones == (114, 166) and short.iterations == 200
    cfg = TrainConfig(data=Path("x"))
    assert cfg.resolved_batch_size == 40 and cfg.replace(arch="fast").resolved_batch_size == 48
    assert cfg.stage_at(0) == (0, 0) and cfg.stage_at(70_000) == (1, 0) and cfg.stage_at(99_999) == (1, 29_999)


def test_train_config_validation_and_round_trip() -> None:
    with pytest.raises(ValueError, match=r"unknown TrainConfig key\(s\) \['epochs'\]; valid keys: \['data'"):
        TrainConfig.from_dict({"data": "x", "epochs": 3})
    with pytest.raises(ValueError, match="data_format must be one of"):
        TrainConfig(data=Path("x"), data_format="lfw")
    with pytest.raises(ValueError, match="arch must be one of"):
        TrainConfig(data=Path("x"), arch="resnet")
    cfg = TrainConfig(data=Path("d"), stages=(StageConfig(5, 0.1, (2, 4)),), input_size=(56, 48))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_batch_order_is_a_pure_function_of_seed_and_step() -> None:
    full = list(StepBatchSampler(50, 8, seed=3, start=0, stop=20))
    assert len(full) == 20 and all(len(b) == 8 for b in full)
    assert list(StepBatchSampler(50, 8, seed=3, start=13, stop=20)) == full[13:]  # resume skips, same batches
    epoch0 = [i for b in full[:6] for i, _ in b]
    assert len(set(epoch0)) == 48  # 6 steps/epoch, no repeats within an epoch (tail of 2 dropped)
    assert [i for i, _ in full[6]] != [i for i, _ in full[0]]  # a new permutation each epoch
    flips = [f for b in full for _, f in b]
    assert 0.35 < sum(flips) / len(flips) < 0.65
    assert list(StepBatchSampler(50, 8, seed=4, start=0, stop=20)) != full
    assert not any(f for b in StepBatchSampler(50, 8, 3, 0, 5, flip=False) for _, f in b)


# ---------------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_short_run_learns(casia: Path, tmp_path: Path) -> None:
    """60 steps (stage 1: 48, stage 2: 12) on 8 synthetic identities, 2 held out per identity.  Stated bars: the
    training loss falls by >= 30 % from the first to the last window, and held-out top-1 is >= 3x chance (0.375);
    measured: loss 2.1 -> ~0.05, held-out top-1 1.0."""
    cfg = small_config(casia, tmp_path / "run", stages=(StageConfig(48, 0.05), StageConfig(12, 0.005, lambda1=0.1)),
                       holdout_per_identity=2, log_every=4)  # fmt: skip
    seen: list[dict] = []
    result = train(cfg, progress=seen.append)
    records = read_metrics(cfg.out)
    assert [r["step"] for r in records] == list(range(4, 61, 4))
    assert records[-1]["loss"] <= 0.7 * records[0]["loss"]
    assert result.final["val_top1"] >= 3 * result.final["chance"] == pytest.approx(3 / 8)
    assert result.final["val_images"] == 16 and "val_attribute_acc" in result.final
    assert "loss_attribute" in records[-1] and "loss_attribute" not in records[0]
    assert {"loss", "acc", "lr", "images_per_s", "step", "stage"} <= set(records[-1])
    assert seen[-1]["event"] == "val" and len(seen) == len(records) + 1
    assert result.complete and result.weights is not None and result.num_identities == 8
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.step == 60 and ckpt.identities == tuple(f"id{k:02d}" for k in range(8))
    assert ckpt.fingerprint == result.fingerprint == load_checkpoint(result.weights).fingerprint
    assert TrainConfig.from_dict(json.loads((cfg.out / "train_config.json").read_text())) == cfg


def test_resume_reproduces_the_uninterrupted_run(casia: Path, tmp_path: Path) -> None:
    """12 steps in one run == 6 steps, stop, resume, 6 steps: identical per-step losses (fp32, no workers, dropout on,
    flips on, a stage boundary at step 8).  Tolerance 1e-5 relative: the two runs execute the same float operations
    in the same order on one thread, so in practice they agree exactly; the slack only guards against
    nondeterministic CPU kernels."""
    one = small_config(casia, tmp_path / "one", dropout=0.3)
    train(one)
    two = small_config(casia, tmp_path / "two", dropout=0.3)
    first = train(two.replace(stop_at=6))
    assert first.step == 6 and not first.complete and first.weights is None
    second = train(two.replace(resume=True))
    assert second.step == 12 and second.complete
    a, b = read_metrics(one.out), read_metrics(two.out)
    assert [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b, strict=True):
        assert ra["lr"] == rb["lr"]
        assert math.isclose(ra["loss"], rb["loss"], rel_tol=1e-5), (ra["step"], ra["loss"], rb["loss"])
    ca, cb = load_checkpoint(one.out / "checkpoint.safetensors"), load_checkpoint(two.out / "checkpoint.safetensors")
    for name, t in ca.model_state.items():
        torch.testing.assert_close(cb.model_state[name], t, rtol=1e-5, atol=1e-7)


def test_resume_refusals(casia: Path, tmp_path: Path) -> None:
    cfg = small_config(casia, tmp_path / "run", stages=(StageConfig(2, 0.05),))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(cfg.replace(resume=True))
    train(cfg)
    with pytest.raises(ValueError, match="already exists: pass resume"):
        train(cfg)
    with pytest.raises(ValueError, match=r"config differs in \['seed'\]"):
        train(cfg.replace(resume=True, seed=1))


def test_bad_files_are_skipped_not_fatal(casia: Path, tmp_path: Path) -> None:
    data = make_casia(tmp_path / "casia", identities=4, per_identity=6, seed=1)
    (data / "id01" / "002.png").write_bytes(b"<html>not an image</html>")
    (data / "id02" / "000.png").write_bytes((data / "id02" / "001.png").read_bytes()[:200])  # truncated
    cfg = small_config(data, tmp_path / "run", batch_size=8, stages=(StageConfig(6, 0.05),))
    result = train(cfg)
    assert result.step == 6 and "skipped 2 of 24 files" in result.skipped_summary
    skipped = [json.loads(ln) for ln in (cfg.out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(Path(s["path"]).name for s in skipped) == ["000.png", "002.png"]


def test_bf16_training_is_finite(casia: Path, tmp_path: Path) -> None:
    cfg = small_config(casia, tmp_path / "run", precision="bf16", stages=(StageConfig(2, 0.05), StageConfig(2, 0.01,
                       lambda1=0.1)), head=3)  # fmt: skip
    train(cfg)
    assert all(math.isfinite(r["loss"]) for r in read_metrics(cfg.out))
    state = load_checkpoint(cfg.out / "checkpoint.safetensors").model_state
    assert all(torch.isfinite(t.float()).all() for t in state.values())
    assert all(t.dtype != torch.bfloat16 for t in state.values())  # weights stay float32 under autocast


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_train_and_resume(casia: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(casia), "--labels", str(casia / "attributes.csv"), "--arch", "fast", "--width",
            "0.125", "--input-size", "56x48", "--embedding-dim", "32", "--stage1-iterations", "4",
            "--stage2-iterations", "2", "--batch-size", "16", "--workers", "0", "--precision", "fp32", "--device",
            "cpu", "--out", str(out), "--stop-at", "3", "--log-every", "1"]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "steps        3/6 (stopped)" in r.output and "fingerprint" in r.output
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["stages"][0]["iterations"] == 4 and saved["input_size"] == [56, 48]
    r = CliRunner().invoke(main, ["train", "--out", str(out), "--resume", "--device", "cpu"])  # options from the run
    assert r.exit_code == 0, r.output
    assert "steps        6/6 (complete)" in r.output and "held-out     top-1" in r.output
    assert str(out / "model.safetensors") in r.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "/no/such/dir"], "CASIA root /no/such/dir does not exist"),
        (["--data", "{casia}", "--config", "{bad}"], "is not valid JSON"),
        (["--data", "{casia}", "--input-size", "56by48"], "expected HEIGHTxWIDTH"),
        (["--data", "{casia}", "--device", "cuda:7"], "cuda:7"),
        (["--stage1-iterations", "3"], "--data is required"),
    ],
)
def test_cli_errors_are_one_line(casia: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    args = ["train", "--out", str(tmp_path / "run"), *(a.format(casia=casia, bad=bad) for a in extra)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and message in r.output, r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)


def test_model_config_matches_training_config(casia: Path, tmp_path: Path) -> None:
    cfg = small_config(casia, tmp_path / "run", stages=(StageConfig(1, 0.05),), head=2, deterministic=True)
    flags = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    result = train(cfg)
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == flags  # process flags restored
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.model_config == ModelConfig(arch="fast", head=2, num_identities=8, width=0.125, input_size=(56, 48),
                                            embedding_dim=32, attribute_hidden=16)  # fmt: skip
    model = FaceNet(ckpt.model_config)
    model.load_state_dict(ckpt.model_state)
    assert model.eval()(to_input(torch.zeros(2, 56, 48, 3, dtype=torch.uint8))).features.shape == (2, 32)


def test_worker_processes_do_not_change_the_data(casia: Path, tmp_path: Path) -> None:
    """Flips and order come from the sampler, so 2 DataLoader workers give the same losses as none (exactly: the
    batches are bit-identical and the math runs in the main process either way)."""
    runs = []
    for workers in (0, 2):
        cfg = small_config(casia, tmp_path / f"w{workers}", num_workers=workers, stages=(StageConfig(3, 0.05),))
        train(cfg)
        runs.append([r["loss"] for r in read_metrics(cfg.out)])
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------------------------------- attribute sets


def test_attribute_options_make_the_train_config(casia: Path) -> None:
    """``attributes`` / ``attribute_group`` choose the head (paper order), ``no_attributes`` sets lambda1 = 0 in every
    stage and changes nothing else of the schedule."""
    base = {"data": casia, "stage1_iterations": 70, "stage2_iterations": 30}
    assert resolve_train_config(base).attributes == ATTRIBUTES
    assert resolve_train_config({**base, "attributes": "Male, Big_Nose"}).attributes == ("Big_Nose", "Male")
    assert resolve_train_config({**base, "attributes": ["Male"]}).attributes == ("Male",)
    for group, names in ATTRIBUTE_GROUPS.items():
        assert resolve_train_config({**base, "attribute_group": group}).attributes == names
    assert ATTRIBUTE_GROUPS["nose"] == ("Big_Nose", "Pointy_Nose") and ATTRIBUTE_GROUPS["all"] == ATTRIBUTES
    assert ATTRIBUTE_GROUPS["global"] == ("Chubby", "Double_Chin", "High_Cheekbones", "Male")
    with_attrs = resolve_train_config(base)
    without = resolve_train_config({**base, "no_attributes": True})
    assert [s.lambda1 for s in with_attrs.stages] == [0.0, 0.1] and [s.lambda1 for s in without.stages] == [0.0, 0.0]
    assert without == without_attributes(with_attrs) == without_attributes(without)  # idempotent
    for a, b in zip(with_attrs.stages, without.stages, strict=True):
        assert (a.iterations, a.lr, a.milestones, a.lambda2, a.gamma) == (b.iterations, b.lr, b.milestones, b.lambda2,
                                                                          b.gamma)  # fmt: skip
    assert without.replace(stages=with_attrs.stages) == with_attrs  # nothing else changed
    assert TrainConfig.from_dict(without.to_dict()) == without
    with pytest.raises(ValueError, match=r"unknown attribute\(s\) \['Smiling'\]; valid: \['Narrow_Eyes'"):
        resolve_train_config({**base, "attributes": "Male,Smiling"})
    with pytest.raises(ValueError, match=r"unknown attribute group 'mouth'; valid: \['eye', 'nose', 'global', 'all'\]"):
        select_attributes(group="mouth")
    with pytest.raises(ValueError, match="not both"):
        resolve_train_config({**base, "attributes": "Male", "attribute_group": "eye"})
    with pytest.raises(ValueError, match="excludes attributes and attribute_group"):
        resolve_train_config({**base, "attribute_group": "eye", "no_attributes": True})
    with pytest.raises(ValueError, match="no attribute given"):
        select_attributes(" , ")
    mgmtn = TrainConfig(data=casia, network="mgmtn", stages=(StageConfig(5, 0.01, lambda1=1.0, lambda2=0.0),))
    with pytest.raises(ValueError, match=r"stage\(s\) \[1\] have lambda2 = 0"):
        without_attributes(mgmtn)


_TINY = ["--arch", "fast", "--width", "0.125", "--input-size", "56x48", "--embedding-dim", "32", "--batch-size",
         "16", "--workers", "0", "--precision", "fp32", "--device", "cpu", "--log-every", "1",
         "--val-every", "0"]  # fmt: skip


def test_cli_no_attributes_trains_no_attribute(casia: Path, tmp_path: Path) -> None:
    """``--no-attributes`` without a labels file: lambda1 = 0 in both stages, no attribute loss computed in any step
    (the logged loss is the identity loss exactly), and the attribute head keeps its initial weights (no gradient, so
    no weight decay either)."""
    out = tmp_path / "run"
    args = ["train", "--data", str(casia), *_TINY, "--stage1-iterations", "3", "--stage2-iterations", "3",
            "--no-attributes", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "attributes   none (lambda1 = 0; head of 7 untrained)" in r.output
    cfg = TrainConfig.from_dict(json.loads((out / "train_config.json").read_text()))
    assert [(s.iterations, s.lambda1) for s in cfg.stages] == [(3, 0.0), (3, 0.0)] and cfg.labels is None
    records = read_metrics(out)
    assert [r["stage"] for r in records] == [1, 1, 1, 2, 2, 2]  # 1-based
    assert all("loss_attribute" not in r and r["loss"] == r["loss_identity"] for r in records), records
    ckpt = load_checkpoint(out / "model.safetensors")
    assert ckpt.model_config is not None and ckpt.model_config.attributes == ATTRIBUTES
    torch.manual_seed(cfg.seed)  # training initialises the network from this seed
    initial = FaceNet(cfg.model_config(8)).state_dict()
    assert torch.equal(ckpt.model_state["attribute_out.weight"], initial["attribute_out.weight"])
    assert not torch.equal(ckpt.model_state["feature.0.weight"], initial["feature.0.weight"])  # identity did train


def test_cli_attribute_group_sizes_the_head(casia: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(casia), "--labels", str(casia / "attributes.csv"), *_TINY, "--stage1-iterations",
            "1", "--stage2-iterations", "2", "--attribute-group", "nose", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "attributes   Big_Nose, Pointy_Nose" in r.output
    ckpt = load_checkpoint(out / "model.safetensors")
    assert ckpt.model_config is not None and ckpt.model_config.attributes == ("Big_Nose", "Pointy_Nose")
    assert ckpt.model_state["attribute_out.weight"].shape[0] == 2
    assert json.loads((out / "train_config.json").read_text())["attributes"] == ["Big_Nose", "Pointy_Nose"]
    assert "loss_attribute" in read_metrics(out)[-1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attributes", "Male,Smiling"], "unknown attribute(s) ['Smiling']; valid: ['Narrow_Eyes', 'Big_Nose'"),
        (["--attribute-group", "mouth"], "'mouth' is not one of 'eye', 'nose', 'global', 'all'"),
        (["--attributes", "Male", "--attribute-group", "eye"], "--attributes and --attribute-group are mutually"),
        (["--attribute-group", "eye", "--no-attributes"], "--no-attributes trains no attribute (lambda1 = 0); drop "
                                                          "--attribute-group"),
    ],
)  # fmt: skip
def test_cli_attribute_option_errors(casia: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    r = CliRunner().invoke(main, ["train", "--data", str(casia), "--out", str(tmp_path / "run"), *extra])
    assert r.exit_code != 0 and message in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "run").exists()
