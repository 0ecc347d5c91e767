"""The readers on files the synthetic generator wrote, in every layout; alignment of those faces; a short training run.

These tie the two halves of the data pipeline together: what ``facesearch synth faces`` writes is exactly what the
CASIA, CelebA and list readers (and therefore ``facesearch train``) consume.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facesearch.model.config import ATTRIBUTES
from facesearch.model.faces.align import similarity_transform, template
from facesearch.model.faces.datasets import (
    FaceDataset,
    FaceItem,
    read_attribute_labels,
    read_casia,
    read_celeba,
    read_list,
)


def test_casia_layout_reads_with_landmarks_and_labels(synth_data: Path) -> None:
    samples = read_casia(synth_data / "casia")
    assert len(samples) == 24 * 8
    assert len({s.identity for s in samples}) == 24
    assert all(s.landmarks is not None and s.landmarks.shape == (5, 2) for s in samples)
    labels = read_attribute_labels(synth_data / "casia" / "attributes.csv")
    assert set(labels) == {s.identity for s in samples}
    assert all(set(v) == set(ATTRIBUTES) and set(v.values()) <= {0.0, 1.0} for v in labels.values())


def test_celeba_layout_reads_with_attributes_partitions_and_identities(synth_data: Path) -> None:
    everything = read_celeba(synth_data / "celeba")
    assert len(everything) == 600
    assert all(s.attributes is not None and set(s.attributes) == set(ATTRIBUTES) for s in everything)
    assert all(s.landmarks is not None for s in everything) and all(s.identity is not None for s in everything)
    parts = [read_celeba(synth_data / "celeba", partition=p) for p in (0, 1, 2)]
    assert sum(len(p) for p in parts) == 600 and all(len(p) for p in parts)
    train_ids, test_ids = {s.identity for s in parts[0]}, {s.identity for s in parts[2]}
    assert not train_ids & test_ids, "partitions split by identity, as in CelebA"


def test_megaface_layout_reads_as_list_files_matching_the_devkit_lists(synth_data: Path) -> None:
    mf = synth_data / "megaface"
    probes = read_list(mf / "facescrub_landmarks.csv")
    distractors = read_list(mf / "megaface_landmarks.csv")
    assert len(probes) == 4 * 5 and len(distractors) == 60
    assert all(s.path.is_file() and s.landmarks is not None for s in probes + distractors)
    lst = json.loads((mf / "templatelists" / "facescrub_features_list.json").read_text())
    assert len(lst["path"]) == len(lst["id"]) == 20
    assert {str(s.path.relative_to(mf / "facescrub")) for s in probes} == set(lst["path"])
    ten = json.loads((mf / "templatelists" / "megaface_features_list.json_10_1").read_text())["path"]
    assert len(ten) == 10 and all((mf / "megaface" / p).is_file() for p in ten)


@pytest.mark.parametrize("layout", ["casia", "celeba"])
def test_generated_faces_align_onto_the_template(synth_data: Path, layout: str) -> None:
    samples = read_casia(synth_data / "casia") if layout == "casia" else read_celeba(synth_data / "celeba")
    ds = FaceDataset(samples[:32], size=(112, 96))
    items = [ds[i] for i in range(len(ds))]
    assert all(isinstance(it, FaceItem) and it.image.shape == (112, 96, 3) for it in items)
    # The generator's landmarks are exact, so the alignment residual at the eyes is what the 5-point geometry of a
    # rendered face leaves against the template.  Measured max ~1 px; tolerance 2 px (the eye tolerance).
    for s in samples[:32]:
        assert s.landmarks is not None
        m = similarity_transform(s.landmarks, template(), weights=np.array([1.0, 1.0, 0.1, 0.1, 0.1]))
        moved = s.landmarks @ m[:, :2].T + m[:, 2]
        assert np.abs(moved[:2] - template()[:2]).max() < 2.0


@pytest.mark.slow
def test_short_training_on_synthetic_faces_learns_identities(synth_data: Path, tmp_path: Path) -> None:
    """A small Fast-Model (width 0.25, 56x48) for 160 steps on 24 synthetic identities x 7 training images.

    Measured on this 2-core CPU: the logged loss falls from 3.86 to 0.24 (ln 24 = 3.18 is the uniform guess);
    held-out top-1 0.917 against a chance of 1/24 = 0.042.  Bars, with room for platform and BLAS differences: the
    loss falls by at least 40 % and held-out top-1 reaches at least 5x chance (0.21)."""
    from facesearch.model.train import train
    from facesearch.model.train_config import StageConfig, TrainConfig

    cfg = TrainConfig(
        data=synth_data / "casia",
        out=tmp_path / "run",
        labels=synth_data / "casia" / "attributes.csv",
        arch="fast",
        width=0.25,
        input_size=(56, 48),
        stages=(StageConfig(120, 0.05, (90,)), StageConfig(40, 0.005, lambda1=0.1, lambda2=1.0)),
        batch_size=32,
        device="cpu",
        num_workers=0,
        log_every=10,
        val_every=0,
        checkpoint_every=0,
    )
    result = train(cfg)
    records = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("event") == "train"]
    assert losses[-1] < 0.6 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    top1, chance = result.final["val_top1"], result.final["chance"]
    assert chance == pytest.approx(1 / 24)
    assert top1 >= 5 * chance, f"held-out top-1 {top1:.3f} vs chance {chance:.3f}"
