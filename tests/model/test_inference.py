"""Inference: loading, embedding shapes / dtype / normalisation, zero safety, batching, flip averaging, bf16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from facesearch.model.checkpoint import model_fingerprint, save_checkpoint
from facesearch.model.config import ModelConfig
from facesearch.model.device import autocast_dtype, resolve_device
from facesearch.model.inference import Embedder, load_model
from facesearch.model.network import FaceNet

torch.set_num_threads(1)

CFG = ModelConfig(arch="variant", head=1, num_identities=6, width=0.125, input_size=(56, 48), embedding_dim=24,
                  attribute_hidden=8)  # fmt: skip


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = FaceNet(CFG)
    with torch.no_grad():  # non-trivial BN statistics, as after training
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                assert mod.running_mean is not None and mod.running_var is not None, "BN tracks statistics"
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("w") / "model.safetensors"
    save_checkpoint(path, CFG, model.state_dict(), identities=[f"p{i}" for i in range(6)])
    return path


def crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 56, 48, 3), dtype=np.uint8)


def test_load_model_is_eval_mode_with_metadata(weights: Path) -> None:
    model, cfg, meta = load_model(weights)
    assert not model.training and cfg == CFG
    assert meta["fingerprint"] == model_fingerprint(CFG, model.state_dict())
    assert meta["identities"] == [f"p{i}" for i in range(6)] and meta["kind"] == "weights"


def test_embeddings_are_float32_unit_norm_and_batch_independent(weights: Path) -> None:
    emb = Embedder(weights, precision="fp32", batch_size=3)
    assert emb.embedding_dim == 24 and emb.attributes == CFG.attributes and emb.input_size == (56, 48)
    x = crops(7)
    e, a = emb.embed_crops(x)
    assert e.shape == (7, 24) and a.shape == (7, len(CFG.attributes))
    assert e.dtype == np.float32 and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    assert ((a > 0) & (a < 1)).all()
    # Chunking does not change results (eval mode: no batch statistics).  1e-5: different GEMM blockings.
    e_all, a_all = Embedder(weights, precision="fp32", batch_size=256).embed_crops(x)
    np.testing.assert_allclose(e, e_all, atol=1e-5)
    np.testing.assert_allclose(a, a_all, atol=1e-5)
    assert set(emb.attribute_dict(a)) == set(CFG.attributes)


def test_empty_batch_and_wrong_inputs(weights: Path) -> None:
    emb = Embedder(weights, precision="fp32")
    e, a = emb.embed_crops(np.zeros((0, 56, 48, 3), np.uint8))
    assert e.shape == (0, 24) and a.shape == (0, len(CFG.attributes)) and e.dtype == np.float32
    with pytest.raises(ValueError, match=r"shape \(B, 56, 48, 3\) \(the model's 56x48 input size\), got \(2, 112, 96"):
        emb.embed_crops(np.zeros((2, 112, 96, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        emb.embed_crops(np.zeros((2, 56, 48, 3), np.float32))
    with pytest.raises(ValueError, match="not a facesearch checkpoint"):
        Embedder(Path(__file__))


def test_zero_feature_embeds_to_zero_not_nan() -> None:
    torch.manual_seed(0)
    model = FaceNet(CFG)
    linear = model.feature[0]
    assert isinstance(linear, torch.nn.Linear), "f starts with its FC layer"
    with torch.no_grad():
        linear.weight.zero_()  # f = PReLU(BN(0)) = 0 in eval mode with fresh BN statistics
    e, a = Embedder(model, precision="fp32").embed_crops(crops(3))
    assert np.isfinite(e).all() and np.isfinite(a).all()
    assert (e == 0).all()


def test_flip_average_is_mirror_invariant(weights: Path) -> None:
    emb = Embedder(weights, precision="fp32", flip_average=True)
    x = crops(4)
    e1, a1 = emb.embed_crops(x)
    e2, a2 = emb.embed_crops(np.ascontiguousarray(x[:, :, ::-1]))
    np.testing.assert_allclose(e1, e2, atol=1e-5)  # same two forward passes, summed in the other order
    np.testing.assert_allclose(a1, a2, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(e1, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(e1, Embedder(weights, precision="fp32").embed_crops(x)[0], atol=1e-3)


def test_bf16_output_is_float32_and_close_to_fp32(weights: Path) -> None:
    x = crops(5)
    e32, a32 = Embedder(weights, precision="fp32").embed_crops(x)
    e16, a16 = Embedder(weights, precision="bf16").embed_crops(x)
    assert e16.dtype == np.float32 and a16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e16, axis=1), 1.0, rtol=1e-5)  # normalised after the cast
    assert (np.sum(e32 * e16, axis=1) > 0.99).all()  # bf16 keeps ~3 significant digits: cosine, not equality
    np.testing.assert_allclose(a16, a32, atol=0.02)


def test_device_and_precision_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            resolve_device("cuda:0")
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "fp32") == torch.float32 and autocast_dtype(cpu, "bf16") == torch.bfloat16
    assert autocast_dtype(cpu, "auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown precision"):
        autocast_dtype(cpu, "fp16")


def test_cpu_bf16_autocast_rule(tmp_path: Path) -> None:
    """``auto`` precision on the CPU: bf16 with AMX, or avx512_bf16 on AMD; not on an Intel CPU with avx512_bf16 and
    no AMX (measured slower than float32 there); never without the flags or without /proc/cpuinfo."""
    from facesearch.model.device import cpu_bf16_autocast_pays, cpu_has_bf16_units, cpu_has_int8_units

    def info(vendor: str, flags: str) -> str:
        path = tmp_path / f"{vendor}-{flags.replace(' ', '_') or 'none'}"
        path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu sse2 avx2 {flags}\n\n"
                        f"processor\t: 1\nvendor_id\t: {vendor}\nflags\t\t: fpu sse2 avx2 {flags}\n")  # fmt: skip
        return str(path)

    cases = {("GenuineIntel", "avx512f avx512_bf16 amx_bf16 amx_tile"): (True, True),
             ("GenuineIntel", "avx512f avx512_bf16"): (False, True),
             ("AuthenticAMD", "avx512f avx512_bf16"): (True, True),
             ("GenuineIntel", "avx512f"): (False, False),
             ("AuthenticAMD", ""): (False, False)}  # fmt: skip
    for (vendor, flags), (pays, units) in cases.items():
        path = info(vendor, flags)
        assert cpu_bf16_autocast_pays(path) is pays and cpu_has_bf16_units(path) is units, (vendor, flags)
    assert cpu_bf16_autocast_pays(str(tmp_path / "missing")) is False
    int8 = {"avx512f avx512_vnni": True, "avx2 avx_vnni": True, "amx_int8 amx_tile": True, "avx512f avx512bw": False}
    for flags, units in int8.items():
        assert cpu_has_int8_units(info("GenuineIntel", flags)) is units, flags
    assert cpu_has_int8_units(str(tmp_path / "missing")) is False
