"""``python -m facesearch.benchmarks.speed.megaface_speed`` at a tiny size: its probes are other people than its
distractors (their own identity names), so the one drawn list takes every distractor row, and N is the exact count of
ordered mate pairs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from facesearch.benchmarks import report
from facesearch.benchmarks.speed import megaface_speed
from facesearch.indexer import shards
from facesearch.indexer.manifest import manifest_path
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features


def _identities(directory: Path) -> list[str]:
    return shards.read_all(directory, columns=["identity"]).meta.column("identity").to_pylist()


def test_tiny_run_draws_every_row_and_counts_exact_n(tmp_path: Path) -> None:
    summary = megaface_speed.main(["--work", str(tmp_path), "--rows", "300", "--dim", "16", "--probes", "40"])
    probes, distractors = _identities(tmp_path / "probes_40_16_probe"), _identities(tmp_path / "distractors_300_16")
    assert len(probes) == 40 and len(distractors) == 300
    assert not set(probes) & set(distractors) and all(p.startswith("probe_") for p in probes)
    assert shards.read_manifest(tmp_path / "probes_40_16_probe").config["identity_prefix"] == "probe"
    # N = ordered (gallery, probe) pairs of one identity: 40 probes -> 20 identities of 2 -> 40 pairs.
    assert summary["N"] == sum(c * (c - 1) for c in Counter(probes).values()) == 40
    assert json.loads((tmp_path / "speed.json").read_text()) == summary
    (res,) = (json.loads(p.read_text()) for p in (tmp_path / "result").glob("result_*.json"))
    lst = res["distractor_list"]
    assert lst["source"] == "drawn" and lst["rows"] == lst["candidates"] == res["counts"]["n_distractors"] == 300
    assert lst["excluded_probe_images"] == lst["excluded_probe_identities"] == 0
    # 40 x 300 impostor pairs cannot measure FAR 1e-6: reported as such, not as a TAR.
    assert summary["tar_at_1e-6"] == report.NA_FAR and 0.0 <= summary["rank1"] <= 1.0


def test_features_from_before_the_prefix_option_are_reused(tmp_path: Path) -> None:
    """A --work folder written before ``identity_prefix`` existed (its manifest lacks the key) is still accepted."""
    cfg = SynthFeaturesConfig(out=tmp_path / "d", rows=50, dim=8, identities=10, seed=11)
    write_synth_features(cfg)
    path = manifest_path(cfg.out)
    assert path is not None
    data = json.loads(path.read_text())
    del data["config"]["identity_prefix"]
    path.write_text(json.dumps(data))
    assert write_synth_features(cfg).seconds == 0.0
