"""``facesearch split``: identity-disjoint training / probe / distractor people, counts, determinism, the written lists
read back by the devkit and list readers, refusal and no-op behaviour, too-few errors, and ``bench megaface`` running
unchanged on the lists (from devkit features, and end to end from images with a tiny model)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facesearch.benchmarks import devkit
from facesearch.benchmarks.split import (
    PROBE_LIST,
    RECORD,
    TEST_IDENTITIES,
    TRAIN_LIST,
    SplitConfig,
    plan_split,
    read_identity_samples,
    write_split,
)
from facesearch.cli._app import main
from facesearch.model.faces.samples import read_list

SMALL = {"probe_identities": 4, "probe_images_per_identity": 3, "distractor_identities": 6}


@pytest.fixture(scope="module")
def casia(synth_data: Path) -> Path:
    """24 people x 8 images with landmarks (``landmarks.csv`` is also a list CSV of the whole folder)."""
    return synth_data / "casia"


def _identity(casia: Path) -> dict[str, str]:
    """Relative path -> identity, from the source list."""
    return {str(s.path.relative_to(casia)): str(s.identity) for s in read_list(casia / "landmarks.csv")}


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != RECORD}


def test_split_is_identity_disjoint_with_the_asked_counts(casia: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    result = write_split(SplitConfig(data=casia / "landmarks.csv", out=out, seed=3, **SMALL))
    assert result.written
    who = _identity(casia)
    train = read_list(out / TRAIN_LIST)
    probes = devkit.read_probe_list(out / PROBE_LIST)
    lists = devkit.find_distractor_lists(out)
    assert list(lists) == [(10, 1)]  # 48 distractor images fill size 10 only
    distractors = devkit.read_distractor_list(lists[(10, 1)])
    train_people = {str(s.identity) for s in train}
    probe_people = set(probes.ids)
    distractor_people = set(result.record["distractor_people"])
    assert {who[p] for p in distractors} <= distractor_people and len(distractor_people) == 6
    assert not train_people & probe_people and not train_people & distractor_people
    assert not probe_people & distractor_people
    assert all(who[p] == i for p, i in zip(probes.paths, probes.ids, strict=True))  # ids are the people's
    assert len(probe_people) == 4 and len(probes.paths) == 12 and probes.n_pairs == 4 * 3 * 2
    assert len(train_people) == 24 - 4 - 6 and len(train) == 8 * len(train_people)
    assert all(s.path.is_file() and s.landmarks is not None for s in train)  # paths relative to out, landmarks kept
    assert (out / TEST_IDENTITIES).read_text().split() == sorted(probe_people | distractor_people)
    record = json.loads((out / RECORD).read_text())
    assert record == json.loads(json.dumps(result.record))
    assert record["counts"] == {"train_people": 14, "train_images": 112, "probe_people": 4, "probe_images": 12,
                                "distractor_people": 6, "distractor_images": 48, "unused_images": 20}  # fmt: skip
    assert record["request"]["seed"] == 3 and record["sizes"] == [10]
    assert record["source"]["sha256"] == hashlib.sha256((casia / "landmarks.csv").read_bytes()).hexdigest()
    assert all(hashlib.sha256((out / n).read_bytes()).hexdigest() == h for n, h in record["files"].items())
    marked = {str(s.path.resolve().relative_to(casia.resolve())) for s in read_list(out / "landmarks.csv")}
    assert marked == set(probes.paths) | {p for p in who if who[p] in distractor_people}


def test_distractor_lists_nest_and_cap_images_per_person(casia: Path) -> None:
    samples = read_identity_samples(casia / "landmarks.csv")
    cfg = SplitConfig(data=casia, out=Path("unused"), probe_identities=2, distractor_identities=15)
    plan = plan_split(samples, cfg)
    assert plan.sizes == (10, 100) and len(plan.distractors) == 120  # all 8 images of 15 people
    one = plan_split(samples, dataclasses.replace(cfg, distractor_images_per_identity=1))
    assert len(one.distractors) == 15 and len({s.identity for s in one.distractors}) == 15
    assert one.unused == 2 * 8 - len(one.probes) + 15 * 7
    fraction = plan_split(samples, SplitConfig(data=casia, out=Path("unused"), probe_identities=4))
    assert len(fraction.distractor_people) == round(0.2 * 20)  # the default fraction of the non-probe people


def test_split_is_deterministic_and_order_free(casia: Path, tmp_path: Path) -> None:
    """The same seed gives the same bytes; the rows' order in the list does not matter (the CASIA tree gives the same
    split as its list); another seed gives other people."""
    rows = (casia / "landmarks.csv").read_text().splitlines()
    shuffled = casia / "shuffled.csv"  # beside the images, so its paths are the same
    rng = np.random.default_rng(0)
    shuffled.write_text("\n".join([rows[0], *(rows[1:][i] for i in rng.permutation(len(rows) - 1))]) + "\n")
    try:
        outs = {}
        for name, data, fmt, seed in (("a", casia / "landmarks.csv", "list", 0), ("b", shuffled, "list", 0),
                                      ("c", casia, "casia", 0), ("d", casia / "landmarks.csv", "list", 1)):  # fmt: skip
            write_split(SplitConfig(data=data, out=tmp_path / name, data_format=fmt, seed=seed, **SMALL))
            outs[name] = _files(tmp_path / name)
    finally:
        shuffled.unlink()
    assert outs["a"] == outs["b"] == outs["c"]
    assert outs["a"][PROBE_LIST] != outs["d"][PROBE_LIST]
    requests = [json.loads((tmp_path / n / RECORD).read_text())["request"] for n in "abc"]
    assert requests[0] == requests[1] == requests[2]


def test_rerun_is_a_no_op_and_another_split_is_refused(casia: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    cfg = SplitConfig(data=casia / "landmarks.csv", out=out, **SMALL)
    first = write_split(cfg)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = write_split(cfg)
    assert not again.written and again.record == json.loads((out / RECORD).read_text())
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    with pytest.raises(ValueError, match=r"already holds a different split \(it differs in \['seed'\]\)"):
        write_split(SplitConfig(data=casia / "landmarks.csv", out=out, seed=5, **SMALL))
    (out / PROBE_LIST).unlink()  # the same split with a file missing: written again, identically
    assert write_split(cfg).written and (out / PROBE_LIST).read_text() and _files(out)
    assert json.loads((out / RECORD).read_text())["files"] == first.record["files"]
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "megaface_features_list.json_10_1").write_text("{}")
    with pytest.raises(ValueError, match=r"holds \['megaface_features_list.json_10_1'\] but no split.json"):
        write_split(SplitConfig(data=casia / "landmarks.csv", out=stray, **SMALL))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"probe_identities": 30}, r"too few people for 30 probe identities: 24 of its 24 people have >= 3 images"),
        ({"probe_images_per_identity": 9}, r"4 probe identities: 0 of its 24 people have >= 9 images"),
        ({"distractor_identities": 20}, r"too few people: 24 people, 4 of them probes, leave 20"),
        ({"distractor_identities": 1}, r"too few distractor images: the 1 distractor people give 8, .* smallest size "
                                       r"is 10"),
    ],
)  # fmt: skip
def test_too_few_people_or_images(casia: Path, tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_split(SplitConfig(data=casia / "landmarks.csv", out=tmp_path / "s", **{**SMALL, **changes}))
    assert not (tmp_path / "s").exists()


def test_unlabelled_images_and_bad_configs(casia: Path, tmp_path: Path) -> None:
    listed = casia / "nolabel.csv"
    listed.write_text("path,identity\n0000001/001.jpg,0000001\n0000001/002.jpg,\n")
    try:
        with pytest.raises(ValueError, match=r"1 of 2 images have no identity"):
            read_identity_samples(listed)
    finally:
        listed.unlink()
    with pytest.raises(ValueError, match=r"data_format must be one of \['list', 'casia', 'flat', 'celeba'\]"):
        SplitConfig(data=casia, out=tmp_path, data_format="lfw")
    with pytest.raises(ValueError, match="distractor_fraction must be in"):
        SplitConfig(data=casia, out=tmp_path, distractor_fraction=1.0)
    with pytest.raises(ValueError, match="needs an identity file"):
        read_identity_samples(casia, "flat")


def test_cli_split(casia: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    args = ["split", "--list", str(casia), "--format", "casia", "--out", str(out), "--probe-identities", "4",
            "--probe-images-per-identity", "3", "--distractor-identities", "6"]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "training 14 (112), probes 4 (12), distractors 6 (48); 20 images unused" in r.output
    assert "sizes        10\n" in r.output and "written" in r.output
    assert f"--probe-images {casia} --probe-list {out / PROBE_LIST}" in r.output
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "unchanged    " in r.output, r.output
    r = CliRunner().invoke(main, [*args, "--seed", "2"])
    assert r.exit_code == 1 and "already holds a different split" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, [*args, "--distractor-fraction", "0.5"])
    assert r.exit_code == 2 and "mutually exclusive" in r.output


def _devkit_features(root: Path, paths: list[str], identity: dict[str, str], d: int = 16) -> None:
    """One feature per image: its person's random centre plus small noise (rank-1 is then 1.0 for certain)."""
    rng = np.random.default_rng(0)
    centres = {name: rng.normal(size=d) for name in sorted(set(identity.values()))}
    xb = np.stack([centres[identity[p]] + 0.01 * rng.normal(size=d) for p in paths]).astype(np.float32)
    devkit.write_feature_tree(root, paths, xb, "_facesearch.bin")


def test_bench_megaface_runs_on_the_split_lists(casia: Path, tmp_path: Path) -> None:
    """The lists go into ``bench megaface`` unchanged (devkit features named by the list paths): no probe overlap
    warning, N = sum n(n-1) over the probe people, rank-1 = 1 on separable features."""
    out = tmp_path / "split"
    write_split(SplitConfig(data=casia / "landmarks.csv", out=out, **SMALL))
    probes = devkit.read_probe_list(out / PROBE_LIST)
    distractors = devkit.read_distractor_list(out / "megaface_features_list.json_10_1")
    _devkit_features(tmp_path / "feats", [*probes.paths, *distractors], _identity(casia))
    feats = str(tmp_path / "feats")
    args = ["bench", "megaface", "--probe-root", feats, "--probe-list", str(out / PROBE_LIST), "--distractor-root",
            feats, "--distractor-lists", str(out), "--out", str(tmp_path / "r")]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "r" / "result_facesearch_10_1.json").read_text())
    assert result["counts"]["N"] == 24 and result["counts"]["rank1_hits"] == 24 and result["warnings"] == []
    assert result["distractor_list"]["probe_images"] == 0 and result["distractor_list"]["probe_identities"] == 0


@pytest.mark.slow
def test_bench_megaface_from_images_end_to_end(casia: Path, tmp_path: Path, ckpt: Path) -> None:
    """The command the split prints, with a tiny model: the images are embedded (landmarks from the split's
    landmarks.csv, so no detector is needed) and every size runs (~15 s: two local Dask clusters)."""
    out = tmp_path / "split"
    write_split(SplitConfig(data=casia / "landmarks.csv", out=out, **SMALL))
    args = ["bench", "megaface", "--checkpoint", str(ckpt), "--probe-images", str(casia), "--probe-list",
            str(out / PROBE_LIST), "--distractor-images", str(casia), "--distractor-lists", str(out),
            "--probe-landmarks", str(out / "landmarks.csv"), "--distractor-landmarks", str(out / "landmarks.csv"),
            "--device", "cpu", "--out", str(tmp_path / "r")]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "probes: 12 of 12 images embedded (0 failed)" in r.output
    assert "distractors: 10 of 10 images embedded (0 failed)" in r.output
    result = json.loads((tmp_path / "r" / "result_facesearch_10_1.json").read_text())
    assert result["counts"]["N"] == 24 and result["counts"]["n_distractors"] == 10 and result["warnings"] == []


def test_train_reads_the_training_list(casia: Path, tmp_path: Path) -> None:
    """train.csv is a list CSV that ``facesearch train --format list`` reads: same rows as the split says."""
    from facesearch.model.trainer_data import read_samples

    out = tmp_path / "split"
    write_split(SplitConfig(data=casia / "landmarks.csv", out=out, **SMALL))
    samples = read_samples(out / TRAIN_LIST, "list")
    with open(out / TRAIN_LIST, newline="") as f:
        header = next(csv.reader(f))
    assert header[:2] == ["path", "identity"] and header[2:] == [f"{a}{i}" for i in range(1, 6) for a in "xy"]
    assert len(samples) == 112 and all(s.path.resolve().is_relative_to(casia.resolve()) for s in samples)
