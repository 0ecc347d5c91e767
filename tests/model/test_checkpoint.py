"""Checkpoints: bit-exact round trip, refusal of foreign / tampered / non-checkpoint files, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from facesearch.model.checkpoint import (
    FORMAT,
    capture_rng_state,
    export_weights,
    load_checkpoint,
    model_fingerprint,
    restore_rng_state,
    save_checkpoint,
)
from facesearch.model.config import ModelConfig
from facesearch.model.network import FaceNet, to_input

torch.set_num_threads(1)

CFG = ModelConfig(arch="fast", head=1, num_identities=5, width=0.125, input_size=(56, 48), embedding_dim=16,
                  attribute_hidden=8)  # fmt: skip


def _trained_state() -> tuple[FaceNet, torch.optim.Optimizer]:
    """A model and SGD optimizer after two steps, so BN stats and momentum buffers are non-trivial."""
    torch.manual_seed(0)
    model = FaceNet(CFG).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = to_input(torch.randint(0, 255, (4, 56, 48, 3), dtype=torch.uint8))
    for _ in range(2):
        out = model(x)
        assert out.identity_logits is not None
        loss = out.identity_logits.logsumexp(1).mean() + out.attribute_logits.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def _save(path: Path, model: FaceNet, opt: torch.optim.Optimizer) -> str:
    return save_checkpoint(
        path,
        CFG,
        model.state_dict(),
        step=2,
        optimizer_state=opt.state_dict(),
        rng_state=capture_rng_state(),
        train_config={"seed": 3, "stages": [[10, 0.01]]},
        identities=[f"id{i}" for i in range(5)],
        extra={"stage": 0},
    )


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model, opt = _trained_state()
    fingerprint = _save(tmp_path / "c.safetensors", model, opt)
    ckpt = load_checkpoint(tmp_path / "c.safetensors")
    assert ckpt.kind == "training" and ckpt.step == 2 and ckpt.model_config == CFG
    assert ckpt.identities == tuple(f"id{i}" for i in range(5)) and ckpt.attributes == CFG.attributes
    assert ckpt.train_config == {"seed": 3, "stages": [[10, 0.01]]} and ckpt.extra == {"stage": 0}
    assert ckpt.fingerprint == fingerprint == model_fingerprint(CFG, model.state_dict())
    for name, t in model.state_dict().items():
        assert torch.equal(ckpt.model_state[name], t), name
    # Optimizer: a fresh SGD loaded from the checkpoint has identical momentum buffers and hyper-parameters.
    model2 = FaceNet(CFG).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model2.load_state_dict(ckpt.model_state)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5)
    assert ckpt.optimizer_state is not None
    opt2.load_state_dict(ckpt.optimizer_state)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for pid in s1["state"]:
        assert torch.equal(s1["state"][pid]["momentum_buffer"], s2["state"][pid]["momentum_buffer"])
    # RNG: restoring reproduces the same draws.
    restore_rng_state(ckpt.rng_state)
    a = torch.rand(5)
    restore_rng_state(ckpt.rng_state)
    assert torch.equal(a, torch.rand(5))
    # Same outputs in eval mode.
    x = to_input(torch.randint(0, 255, (3, 56, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        assert torch.equal(model.eval()(x).features, model2.eval()(x).features)


def test_fingerprint_depends_on_weights_and_config_not_memory_format() -> None:
    torch.manual_seed(0)
    model = FaceNet(CFG)
    fp = model_fingerprint(CFG, model.state_dict())
    assert fp == model_fingerprint(CFG, model.to(memory_format=torch.channels_last).state_dict())  # type: ignore[call-overload]
    assert fp != model_fingerprint(CFG.replace(dropout=0.4), model.state_dict())
    with torch.no_grad():
        next(model.parameters())[0, 0, 0, 0] += 1e-6
    assert fp != model_fingerprint(CFG, model.state_dict())


def test_export_weights_drops_training_state_and_keeps_fingerprint(tmp_path: Path) -> None:
    model, opt = _trained_state()
    fp = _save(tmp_path / "c.safetensors", model, opt)
    out = export_weights(tmp_path / "c.safetensors", tmp_path / "w.safetensors")
    w = load_checkpoint(out)
    assert w.kind == "weights" and w.optimizer_state is None and w.rng_state == {}
    assert w.fingerprint == fp and w.identities == tuple(f"id{i}" for i in range(5))
    assert out.stat().st_size < (tmp_path / "c.safetensors").stat().st_size


def test_no_tmp_file_is_left_behind(tmp_path: Path) -> None:
    model, opt = _trained_state()
    _save(tmp_path / "c.safetensors", model, opt)
    _save(tmp_path / "c.safetensors", model, opt)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


@pytest.mark.parametrize("where", ["tensor data", "metadata"])
def test_tampered_file_is_refused(tmp_path: Path, where: str) -> None:
    model, opt = _trained_state()
    path = tmp_path / "c.safetensors"
    _save(path, model, opt)
    data = bytearray(path.read_bytes())
    if where == "tensor data":
        data[-10] ^= 0x01  # one bit of the last tensor
    else:
        # Change a digit inside the JSON header (the seed in train_config) while keeping it valid JSON.
        i = data.index(b'\\"seed\\": 3')
        data[i + len(b'\\"seed\\": ')] = ord("4")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"c\.safetensors failed its SHA-256 checksum"):
        load_checkpoint(path)


def test_foreign_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"not a facesearch checkpoint: .*foreign\.safetensors.*{FORMAT}"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n", json.dumps({"a": 1}).encode()])
def test_non_checkpoint_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"^not a facesearch checkpoint: .*x\.ckpt") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="is a directory"):
        load_checkpoint(tmp_path)
