"""``facesearch embed --attributes-from W``: an attribute predictor (a tiny MOON network on the 64x56 margin crop of the
56x48 template) fills the shards' attribute columns from its own crop of each face, the embeddings stay the identity
model's; the manifest and ``index_info.json`` record where the columns came from; resuming with another filler and
``index add`` of shards filled otherwise are refused; a missing or wrong W fails before any Dask work.  Synthetic faces
with listed landmarks; an in-process Dask cluster as ``--scheduler``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from facesearch.indexer.embed import EmbedConfig, embed_partition, plan_inputs
from facesearch.indexer.index import IndexConfig, add_to_index, build_index, load_index
from facesearch.indexer.pipeline import run_embed
from facesearch.indexer.shards import read_manifest
from facesearch.model.checkpoint import load_checkpoint
from facesearch.model.config import ModelConfig
from facesearch.model.faces.align import margin_geometry
from facesearch.model.faces.prepare import prepare_image
from facesearch.model.inference import Embedder
from facesearch.model.network import FaceNet
from facesearch.model.predictors import InputSpec, load_predictor
from facesearch.model.predictors.facenet import MoonPredictor

#: The predictor's attributes: a subset of the identity model's, in another order (column names and order follow the
#: predictor).
ATTRS = ("Male", "Chubby", "Narrow_Eyes")


def _save_predictor(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    spec = InputSpec((56, 48), margin=True)
    cfg = ModelConfig(arch="fast", width=0.25, input_size=margin_geometry(spec.size)[0], head=2, num_identities=0,
                      attributes=ATTRS, embedding_dim=32, attribute_hidden=16)  # fmt: skip
    MoonPredictor(FaceNet(cfg), spec).save(path)
    return path


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as c:
        yield c.scheduler_address


@pytest.fixture(scope="module")
def predictor_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_predictor(tmp_path_factory.mktemp("predictor") / "moon.safetensors", seed=1)


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory, synth_data: Path) -> Path:
    """A list CSV of 8 synthetic faces with landmarks, their images copied beside it (2 shards of 4)."""
    src, root = synth_data / "casia", tmp_path_factory.mktemp("listed") / "in"
    lines = (src / "landmarks.csv").read_text().splitlines()[:9]
    for line in lines[1:]:
        rel = line.split(",")[0]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, root / rel)
    (root / "faces.csv").write_text("\n".join(lines) + "\n")
    return root / "faces.csv"


def _cfg(listed: Path, ckpt: Path, out: Path, scheduler: str, attributes_from: Path | None = None) -> EmbedConfig:
    return EmbedConfig(input=listed, format="list", checkpoint=ckpt, out=out, shard_rows=4, batch_size=4,
                       device="cpu", dtype="float32", scheduler=scheduler, attributes_from=attributes_from)  # fmt: skip


def _cli_args(cfg: EmbedConfig) -> list[str]:
    args = ["embed", "--list", str(cfg.input), "--checkpoint", str(cfg.checkpoint), "--out", str(cfg.out),
            "--shard-rows", "4", "--batch-size", "4", "--device", "cpu", "--dtype", "float32",
            "--scheduler", str(cfg.scheduler)]  # fmt: skip
    return args + ([] if cfg.attributes_from is None else ["--attributes-from", str(cfg.attributes_from)])


def _invoke(args: list[str]) -> object:
    from facesearch.cli._app import main
    from facesearch.cli.embed import embed_command  # noqa: F401  registers the command

    return CliRunner().invoke(main, args)


def _table(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(out / e.file) for e in read_manifest(out).shards)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, listed: Path, ckpt: Path, predictor_path: Path,
             scheduler: str) -> tuple[EmbedConfig, EmbedConfig, str]:  # fmt: skip
    """The same faces embedded with the predictor (through the CLI: its output returned) and without."""
    base = tmp_path_factory.mktemp("embedded")
    with_p = _cfg(listed, ckpt, base / "predictor", scheduler, predictor_path)
    res = _invoke(_cli_args(with_p))
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    plain = _cfg(listed, ckpt, base / "plain", scheduler)
    assert run_embed(plain).computed_shards == 2
    return with_p, plain, res.output  # type: ignore[attr-defined]


def test_predictor_fills_the_attribute_columns(embedded: tuple[EmbedConfig, EmbedConfig, str], ckpt: Path,
                                               predictor_path: Path) -> None:  # fmt: skip
    with_p, plain, output = embedded
    predictor = load_predictor(predictor_path)
    got, base = _table(with_p.out), _table(plain.out)
    assert got.column("status").to_pylist() == ["ok"] * 8
    names = [f.name for f in got.schema]
    assert names[names.index("embedding") + 1 : names.index("det_score")] == list(ATTRS)
    # The reference, computed independently: each face's margin crop from the one face path, through the predictor.
    items = plan_inputs(with_p)
    crops = np.stack([prepare_image(it.path, it.landmarks, size=(56, 48), margin=True).first().crop for it in items])
    assert crops.shape[1:] == (64, 56, 3)
    ref = predictor.predict_crops(crops)
    stored = np.stack([got.column(a).to_numpy() for a in ATTRS], axis=1)
    np.testing.assert_allclose(stored, ref, atol=1e-5)
    # The identity embedding is the same as without the predictor; the attribute columns are not the model's head.
    assert got.column("embedding").equals(base.column("embedding"))
    model_head = np.stack([base.column(a).to_numpy() for a in ATTRS], axis=1)
    assert np.abs(stored - model_head).max() > 1e-3
    model_attrs = load_checkpoint(ckpt).model_config.attributes
    assert set(ATTRS) < set(model_attrs) and read_manifest(plain.out).attributes == model_attrs
    assert len(base.schema.names) - len(got.schema.names) == len(model_attrs) - len(ATTRS)
    # Provenance: the manifest says which predictor filled the columns; the CLI says so too.
    man = read_manifest(with_p.out)
    assert man.attributes == ATTRS and man.fingerprint == load_checkpoint(ckpt).fingerprint
    assert man.attribute_source == {"source": "predictor", "key": "moon", "fingerprint": predictor.fingerprint,
                                    "path": str(predictor_path.absolute()), "input": {"size": [56, 48], "margin": True},
                                    "calibration": "identity"}  # fmt: skip
    raw = json.loads((with_p.out / "_manifest.json").read_text())
    assert raw["attribute_source"]["fingerprint"] == predictor.fingerprint
    assert read_manifest(plain.out).attribute_source == {"source": "model", "fingerprint": man.fingerprint}
    assert f"attributes   3 columns from the moon predictor {predictor.fingerprint[:16]} ({predictor_path}" in output


def test_index_carries_the_provenance_and_add_refuses_another_filler(
    embedded: tuple[EmbedConfig, EmbedConfig, str], predictor_path: Path, tmp_path: Path
) -> None:
    with_p, plain, _ = embedded
    fp = load_predictor(predictor_path).fingerprint
    cfg = IndexConfig(kind="flat", recall_sample=0)
    info = build_index(with_p.out, tmp_path / "idx", cfg)
    assert info.attribute_source["source"] == "predictor" and info.attribute_source["fingerprint"] == fp
    on_disk = load_index(tmp_path / "idx").info
    assert on_disk.attribute_source == read_manifest(with_p.out).attribute_source
    assert on_disk.attribute_source["key"] == "moon"
    assert load_index(tmp_path / "idx").attributes.column_names == ["id", "path", "identity", *ATTRS]
    # Shards whose attribute columns came from the model's own head: refused, naming both fillers.
    with pytest.raises(ValueError, match=r"attribute columns come from the model's own attribute head.*"
                                         r"index .* from the moon predictor"):  # fmt: skip
        add_to_index(tmp_path / "idx", plain.out, fresh_ids=True)
    # Shards of the same predictor pass the check (these are already in: nothing to add); an index of model-filled
    # shards records that.
    again = add_to_index(tmp_path / "idx", with_p.out)
    assert not again.changed and again.skipped_present == 8
    plain_info = build_index(plain.out, tmp_path / "idx2", cfg)
    assert plain_info.attribute_source == {"source": "model", "fingerprint": plain_info.fingerprint}
    from facesearch.cli._app import main
    from facesearch.cli.index import index  # noqa: F401  registers the command

    res = CliRunner().invoke(main, ["index", "info", "--index", str(tmp_path / "idx")])
    assert res.exit_code == 0, res.output
    assert f"attributes from the moon predictor {fp[:16]}" in res.output


def test_resume_refuses_another_filler(embedded: tuple[EmbedConfig, EmbedConfig, str], predictor_path: Path,
                                       tmp_path: Path) -> None:  # fmt: skip
    with_p, plain, _ = embedded
    other = _save_predictor(tmp_path / "other.safetensors", seed=2)
    with pytest.raises(ValueError, match=r"holds attribute columns from the moon predictor .* but this run fills them "
                                         r"from the moon predictor .*other\.safetensors"):  # fmt: skip
        run_embed(with_p.replace(attributes_from=other))
    with pytest.raises(ValueError, match=r"holds attribute columns from the moon predictor .* from the model's own"):
        run_embed(with_p.replace(attributes_from=None))
    with pytest.raises(ValueError, match=r"holds attribute columns from the model's own .* moon predictor"):
        run_embed(plain.replace(attributes_from=predictor_path))
    # The same predictor under another path is the same filler: the finished output is complete as it is (and left
    # alone: its manifest, which an index records by SHA-256, is not rewritten).
    before = (with_p.out / "_manifest.json").read_bytes()
    moved = shutil.copy(predictor_path, tmp_path / "moved.safetensors")
    assert run_embed(with_p.replace(attributes_from=Path(moved))).already_complete
    assert (with_p.out / "_manifest.json").read_bytes() == before


def test_missing_or_wrong_predictor_fails_fast(listed: Path, ckpt: Path, tmp_path: Path) -> None:
    """Before any Dask work: no scheduler at this address is ever contacted, and --out is not created."""
    missing = tmp_path / "nowhere" / "moon.safetensors"
    cfg = _cfg(listed, ckpt, tmp_path / "out", "tcp://127.0.0.1:9", missing)
    with pytest.raises(FileNotFoundError, match=r"attribute predictor .*nowhere/moon\.safetensors not found"):
        run_embed(cfg)
    res = _invoke(_cli_args(cfg))
    assert res.exit_code == 1 and "nowhere/moon.safetensors not found" in res.output  # type: ignore[attr-defined]
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"--attributes-from .*notes\.txt is not an attribute predictor"):
        run_embed(cfg.replace(attributes_from=bogus))
    assert not cfg.out.exists()


def test_identity_crop_predictor_reuses_the_crop(listed: Path, ckpt: Path, tmp_path: Path) -> None:
    """A predictor reading the identity crop itself (the checkpoint read as ``icmr``, uncalibrated) gives the model's
    own attribute-head probabilities: its crop is the identity crop, taken as is."""
    cfg = _cfg(listed, ckpt, tmp_path / "o", "unused", ckpt)
    items = plan_inputs(cfg)
    embedder = Embedder(ckpt, "cpu", batch_size=4)
    predictor = load_predictor(ckpt)
    assert predictor.key == "icmr" and predictor.input_spec == InputSpec((56, 48))
    timings: dict[str, float] = {}
    got = embed_partition(items, embedder, None, cfg, timings, predictor=predictor)
    base = embed_partition(items, embedder, None, cfg)
    assert got.schema == base.schema and got.column("embedding").equals(base.column("embedding"))
    for name in predictor.attributes:
        np.testing.assert_allclose(got.column(name).to_numpy(), base.column(name).to_numpy(), atol=1e-6)
    assert {"read", "decode", "align", "infer"} <= set(timings)


def test_image_queries_take_their_attributes_from_the_index_predictor(
    embedded: tuple[EmbedConfig, EmbedConfig, str], ckpt: Path, predictor_path: Path, tmp_path: Path,
    yunet_path: Path,
) -> None:  # fmt: skip
    """Probe and gallery probabilities must come from one source: the engine opens the predictor recorded in
    index_info.json and runs it on its own crop of each probe face."""
    from facesearch.engine.search import SearchEngine
    from facesearch.model.faces.detect import FaceDetector

    with_p, plain, _ = embedded
    build_index(with_p.out, tmp_path / "idx", IndexConfig(kind="flat", recall_sample=0))
    engine = SearchEngine.open(tmp_path / "idx", checkpoint=ckpt, device="cpu")
    assert engine.predictor is not None and engine.attribute_names == ATTRS
    probes = [it.path for it in plan_inputs(with_p)[:3]]
    xq, attrs, _ = engine.embed_images(probes)
    detector = FaceDetector(pad=0)
    crops = np.stack([prepare_image(p, detector=detector, size=(56, 48), max_faces=1, margin=True).first().crop
                      for p in probes])  # fmt: skip
    np.testing.assert_allclose(attrs, load_predictor(predictor_path).predict_crops(crops), atol=1e-5)
    plain_engine = SearchEngine.open(tmp_path / "idx", checkpoint=ckpt, device="cpu", attributes_from=predictor_path)
    np.testing.assert_array_equal(plain_engine.embed_images(probes)[0], xq)
    other = _save_predictor(tmp_path / "other.safetensors", seed=9)
    with pytest.raises(ValueError, match="would not be comparable"):
        SearchEngine.open(tmp_path / "idx", checkpoint=ckpt, device="cpu", attributes_from=other)
    build_index(plain.out, tmp_path / "idx2", IndexConfig(kind="flat", recall_sample=0))
    assert SearchEngine.open(tmp_path / "idx2", checkpoint=ckpt, device="cpu").predictor is None
    with pytest.raises(ValueError, match="model's own head"):
        SearchEngine.open(tmp_path / "idx2", checkpoint=ckpt, device="cpu", attributes_from=predictor_path)
