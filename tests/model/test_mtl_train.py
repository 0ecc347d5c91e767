"""Training MTL-CNN on two synthetic databases with disjoint label sets (binary and categorical), end to end through
the CLI, with resume, refusal of a changed run, and ``attributes inspect``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facesearch.cli import main
from facesearch.model.attributes import AttributeTrainConfig
from facesearch.model.faces.samples import Sample
from facesearch.model.faces.synth import SynthConfig, generate_faces
from facesearch.model.faces.synth_identity import HAIR_COLOURS
from facesearch.model.mtl_cnn import Task
from facesearch.model.predictors import load_predictor
from facesearch.model.predictors.mtl_cnn import MtlCnnPredictor
from facesearch.model.predictors.mtl_train import (
    Database,
    StratifiedSteps,
    database_tasks,
    label_log_odds,
    parse_categorical,
    read_database,
    unit_samples,
)

HAIR = "Hair_Colour=" + ",".join(HAIR_COLOURS)
TRAIN = ["--method", "mtl-cnn", "--categorical", HAIR, "--arch", "fast", "--width", "0.125",
         "--feature-dim", "64", "--iterations", "6", "--correlation-iterations", "20", "--batch-size", "12",
         "--lr", "0.05", "--workers", "0", "--precision", "fp32"]  # fmt: skip


@pytest.fixture(scope="module")
def dbs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mtl") / "d"
    generate_faces(SynthConfig(out=out, seed=3, layouts=("celeba",), celeba_images=120, celeba_images_per_identity=6,
                               workers=1, celeba_databases=True))  # fmt: skip
    return out / "celeba" / "databases"


@pytest.fixture(scope="module")
def trained(dbs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("mtlrun") / "run"
    args = [
        "attributes",
        "train",
        "--data",
        str(dbs / "a.csv"),
        "--data",
        str(dbs / "b.csv"),
        *TRAIN,
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_databases_keep_their_own_labels(dbs: Path) -> None:
    a = read_database(dbs / "a.csv", ["Hair_Colour"], 0.25, seed=0)
    b = read_database(dbs / "b.csv", ["Hair_Colour"], 0.25, seed=0)
    assert set(a.binary) == {"Male", "Big_Nose", "Pointy_Nose", "Narrow_Eyes"} and not a.categorical
    assert set(b.binary) == {"Male", "Chubby", "Double_Chin", "High_Cheekbones"}
    assert 0 < b.categorical["Hair_Colour"] < len(HAIR_COLOURS)
    assert {s.identity for s in a.train}.isdisjoint({s.identity for s in a.val})  # validation people held out
    tasks, together = database_tasks([a, b])
    names = [t.name for t in tasks]
    assert names[:7] == ["Narrow_Eyes", "Big_Nose", "Pointy_Nose", "Chubby", "Double_Chin", "High_Cheekbones", "Male"]
    assert tasks[-1].name == "Hair_Colour" and tasks[-1].categorical
    assert ("Chubby", "Double_Chin") in together and ("Big_Nose", "Male") in together
    assert ("Big_Nose", "Chubby") not in together and ("Big_Nose", "Hair_Colour") not in together


def test_unit_labels_and_log_odds() -> None:
    tasks = (Task("A"), Task("C", ("x", "y", "z")))
    samples = [Sample(Path(f"{i}.jpg"), str(i), None, {"A": float(i % 2), "C": float(i % 3)}) for i in range(60)]
    units = unit_samples(samples, tasks)
    assert units[4].attributes == {"A": 0.0, "C_x": 0.0, "C_y": 1.0, "C_z": 0.0}
    lor = label_log_odds(units, ["A", "C_x", "C_y", "C_z"])
    assert np.isnan(lor[0, 0]) and np.isfinite(lor[0, 1]) and lor[0, 1] == pytest.approx(lor[1, 0])


def test_batches_are_stratified_and_resume_draws_the_same() -> None:
    ranges = [range(0, 10), range(10, 100)]
    full = list(StratifiedSteps(ranges, 8, seed=4, start=0, total=6))
    assert all(sum(i < 10 for i in b) == 4 and len(set(b)) == 8 for b in full)
    assert list(StratifiedSteps(ranges, 8, seed=4, start=3, total=6)) == full[3:]


def test_trains_on_two_databases_and_predicts_every_attribute(trained: tuple[Path, str]) -> None:
    out, output = trained
    p = load_predictor(out / "predictor.safetensors")
    assert isinstance(p, MtlCnnPredictor)
    hair = [f"Hair_Colour_{c}" for c in HAIR_COLOURS]
    assert list(p.attributes) == ["Narrow_Eyes", "Big_Nose", "Pointy_Nose", "Chubby", "Double_Chin",
                                  "High_Cheekbones", "Male", *hair]  # fmt: skip
    assert "Hair_Colour_blond" in output and "validation" in output
    desc = json.loads((out / "predictor.json").read_text())
    assert set(desc["databases"]) == {"a", "b"}
    assert desc["validation"]["categorical"]["Hair_Colour"]["n"] > 0
    assert desc["parameters_gated_shared_layer"] < desc["parameters_per_task_branches"]
    c, mask = p.correlation(), p.network.get_buffer("correlation_mask").numpy()
    assert np.all(c[mask == 0] == 0) and np.abs(c[mask == 1]).sum() > 0
    crops = np.random.default_rng(0).integers(0, 256, (3, *p.input_spec.crop_size, 3), dtype=np.uint8)
    probs = p.predict_crops(crops)
    assert probs.shape == (3, len(p.attributes)) and np.all((probs >= 0) & (probs <= 1))


def test_rerun_resumes_and_a_changed_run_is_refused(dbs: Path, trained: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = trained
    first = load_predictor(out / "predictor.safetensors").fingerprint
    data = dict(data=dbs / "a.csv", more_data=(dbs / "b.csv",), categorical=(HAIR,))
    from facesearch.model.predictors.training import train_attribute_predictor

    cfg = AttributeTrainConfig(method="mtl-cnn", arch="fast", width=0.125, feature_dim=64, iterations=6,
                               correlation_iterations=20, batch_size=12, lr=0.05, num_workers=0, precision="fp32",
                               out=out, **data)  # type: ignore[arg-type]  # fmt: skip
    again = train_attribute_predictor(cfg)
    assert again.seconds["network"] < 30 and again.predictor.fingerprint == first  # nothing left to train
    changed = AttributeTrainConfig(**{**cfg.__dict__, "lr": 0.1})
    with pytest.raises(ValueError, match=r"different run.*lr"):
        train_attribute_predictor(changed)


def test_inspect_prints_routing_and_correlation(trained: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = trained
    plot = tmp_path / "c.png"
    result = CliRunner().invoke(
        main, ["attributes", "inspect", str(out / "predictor.safetensors"), "--plot", str(plot)]
    )
    assert result.exit_code == 0, result.output
    assert "routing weights" in result.output and "Hair_Colour" in result.output
    assert plot.stat().st_size > 1000


def test_a_categorical_column_no_database_has_is_named(dbs: Path, tmp_path: Path) -> None:
    from facesearch.model.predictors.training import train_attribute_predictor

    cfg = AttributeTrainConfig(data=dbs / "a.csv", categorical=("Age_Group",), method="mtl-cnn", iterations=2,
                               num_workers=0, out=tmp_path / "r")  # fmt: skip
    with pytest.raises(ValueError, match="--categorical Age_Group: no database labels such a column"):
        train_attribute_predictor(cfg)
    undeclared = dataclasses.replace(cfg, more_data=(dbs / "b.csv",), categorical=())
    with pytest.raises(ValueError, match=r"b.csv:2: attribute Hair_Colour .*declare it: --categorical Hair_Colour"):
        train_attribute_predictor(undeclared)


def test_several_databases_are_for_mtl_cnn_only(dbs: Path) -> None:
    with pytest.raises(ValueError, match="mtl-cnn only"):
        AttributeTrainConfig(data=dbs / "a.csv", more_data=(dbs / "b.csv",), method="moon")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_database(dbs / "missing.csv", [])


def test_categorical_class_names() -> None:
    assert parse_categorical(["A", "B=x, y"]) == {"A": None, "B": ("x", "y")}
    with pytest.raises(ValueError, match="two or more"):
        parse_categorical(["B=x"])
    db = Database("b", Path("b.csv"), [], [], ("Male",), {"Hair_Colour": 3})
    tasks, _ = database_tasks([db], {"Hair_Colour": ("black", "blond", "grey", "red")})
    assert tasks[-1].units == ("Hair_Colour_black", "Hair_Colour_blond", "Hair_Colour_grey", "Hair_Colour_red")
    assert database_tasks([db])[0][-1].units[-1] == "Hair_Colour_3"
    with pytest.raises(ValueError, match="holds class 3, but only 2 class names"):
        database_tasks([db], {"Hair_Colour": ("black", "blond")})
    with pytest.raises(ValueError, match="class names must be"):
        Task("Hair", ("dark brown", "blond"))
