"""MegaFace devkit formats: .bin features, template lists, noise lists, result JSON (real files in tmp_path)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from facesearch.benchmarks.devkit import (
    DevkitFormatError,
    ProbeList,
    algorithm_name,
    compress_curve,
    devkit_result_name,
    find_distractor_lists,
    noisy_mask,
    parse_list_name,
    read_bin,
    read_bins,
    read_devkit_json,
    read_distractor_list,
    read_feature_tree,
    read_noise_list,
    read_probe_list,
    stem_key,
    tar_from_compressed_roc,
    write_bin,
    write_devkit_json,
    write_distractor_list,
    write_feature_tree,
    write_probe_list,
)


def _raw_bin(path: Path, rows: int, cols: int, stride: int, kind: int, payload: bytes) -> Path:
    path.write_bytes(struct.pack("<4i", rows, cols, stride, kind) + payload)
    return path


# --- .bin -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [512, 1024])
def test_bin_round_trip_is_bit_identical(tmp_path: Path, d: int) -> None:
    vec = np.random.default_rng(d).standard_normal(d).astype(np.float32)
    path = tmp_path / "sub" / "a.jpg_myalgo.bin"
    write_bin(path, vec)
    raw = path.read_bytes()
    assert len(raw) == 16 + 4 * d
    assert struct.unpack("<4i", raw[:16]) == (d, 1, 4, 5)
    back = read_bin(path)
    assert back.dtype == np.float32 and back.shape == (d,)
    assert back.tobytes() == vec.tobytes()
    assert not list(path.parent.glob("*.tmp"))


def test_bin_float64_is_read_as_float32_and_written_as_float32(tmp_path: Path) -> None:
    vec = np.array([0.5, -1.25, 3.0], dtype=np.float64)
    back = read_bin(_raw_bin(tmp_path / "f64.bin", 3, 1, 8, 6, vec.astype("<f8").tobytes()))
    assert back.dtype == np.float32 and back.tolist() == [0.5, -1.25, 3.0]
    write_bin(tmp_path / "w.bin", vec)
    assert (tmp_path / "w.bin").stat().st_size == 16 + 4 * 3


@pytest.mark.parametrize("bad", [np.zeros((2, 3), np.float32), np.zeros(0, np.float32)])
def test_write_bin_rejects_non_vectors(tmp_path: Path, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"bad\.bin"):
        write_bin(tmp_path / "bad.bin", bad)


@pytest.mark.parametrize(
    ("header", "payload", "field"),
    [
        ((4, 1), b"", "header"),  # 8 bytes: short file
        ((0, 1, 4, 5), b"", "'rows'"),
        ((-3, 1, 4, 5), b"", "'rows'"),
        ((4, 3, 12, 5), bytes(48), "'cols'"),
        ((4, 1, 8, 5), bytes(16), "'stride'"),
        ((4, 1, 4, 6), bytes(32), "'stride'"),
        ((4, 1, 4, 7), bytes(16), "'type'"),
        ((4, 1, 4, 5), bytes(20), "'data'"),  # too long
        ((4, 1, 4, 5), bytes(12), "'data'"),  # truncated data
    ],
)
def test_read_bin_rejects_malformed_files_naming_file_and_field(
    tmp_path: Path, header: tuple[int, ...], payload: bytes, field: str
) -> None:
    path = tmp_path / "x_broken.bin"
    path.write_bytes(struct.pack(f"<{len(header)}i", *header) + payload)
    with pytest.raises(DevkitFormatError) as err:
        read_bin(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_read_bin_wrong_size_says_expected_and_actual_bytes(tmp_path: Path) -> None:
    path = _raw_bin(tmp_path / "t.bin", 4, 1, 4, 5, bytes(12))
    with pytest.raises(DevkitFormatError, match=r"file is 28 bytes, expected 32"):
        read_bin(path)


def test_read_bin_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.bin"):
        read_bin(tmp_path / "nowhere.bin")


def test_read_bins_round_trip_and_errors(tmp_path: Path) -> None:
    xb = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    paths = [tmp_path / f"f{i:02d}.bin" for i in range(20)]
    for p, v in zip(paths, xb, strict=True):
        write_bin(p, v)
    for threads in (1, 3):
        assert read_bins(paths, threads=threads).tobytes() == xb.tobytes()
    assert read_bins([]).shape == (0, 0)

    for p in paths[4:12]:
        p.unlink()
    with pytest.raises(FileNotFoundError) as err:
        read_bins(paths)
    msg = str(err.value)
    assert "8 of 20" in msg
    assert all(p.name in msg for p in paths[4:9]) and paths[9].name not in msg

    write_bin(paths[4], np.zeros(16, np.float32))
    write_bin(paths[5], np.zeros(17, np.float32))
    write_bin(paths[6], np.zeros(18, np.float32))
    with pytest.raises(DevkitFormatError, match=r"f05\.bin: header field 'rows' is 17, expected d=16"):
        read_bins(paths[:7])


def test_feature_tree_round_trip(tmp_path: Path) -> None:
    rel = ["375/37531198@N00/4174611825_0.jpg", "375/37531198@N00/4174611825_1.jpg", "Michael Landes/M L_1.png"]
    xb = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    write_feature_tree(tmp_path / "feat", rel, xb, "_myalgo.bin")
    assert (tmp_path / "feat" / "375" / "37531198@N00" / "4174611825_0.jpg_myalgo.bin").is_file()
    assert read_feature_tree(tmp_path / "feat", rel, "_myalgo.bin", threads=2).tobytes() == xb.tobytes()
    with pytest.raises(FileNotFoundError, match="1 of 1"):
        read_feature_tree(tmp_path / "feat", rel[:1], "_other.bin")
    with pytest.raises(ValueError, match="relative path"):
        write_feature_tree(tmp_path / "feat", ["../escape.jpg"], xb[:1], "_myalgo.bin")
    with pytest.raises(ValueError, match="shape"):
        write_feature_tree(tmp_path / "feat", rel[:2], xb, "_myalgo.bin")
    with pytest.raises(ValueError, match="twice"):
        write_feature_tree(tmp_path / "feat", [rel[0], rel[0]], xb[:2], "_myalgo.bin")


def test_stem_key_equals_the_posixpath_definition() -> None:
    """The inlined extension split equals ``posixpath.splitext`` (hidden files, dots only, dotted folders...)."""
    import posixpath
    import random

    def reference(path: str) -> str:
        path = path.replace("\\", "/")
        while path.startswith("./"):
            path = path[2:]
        return posixpath.splitext(path)[0].replace(" ", "_")

    rng = random.Random(1)
    paths = ["".join(rng.choice("ab./ \\\u00e9\n") for _ in range(rng.randint(0, 10))) for _ in range(50_000)]
    paths += [".a", "..", "a/.b", "a/..b.c", "a.b/c", "x.", "./././y.z", "a/b.tar.gz"]
    assert [stem_key(p) for p in paths] == [reference(p) for p in paths]


def test_algorithm_name_and_stem_key() -> None:
    assert algorithm_name("_myalgo.bin") == "myalgo"
    assert algorithm_name("__resnet_100.bin") == "resnet_100"
    with pytest.raises(ValueError, match="algorithm name"):
        algorithm_name("_.bin")
    assert stem_key("375/37531198@N00/4174611825_0.jpg") == "375/37531198@N00/4174611825_0"
    assert stem_key("Michael Landes/Michael Landes_43667.jpg") == stem_key("Michael_Landes/Michael_Landes_43667.png")
    assert stem_key(".\\a b\\c.d.jpg") == "a_b/c.d"
    assert stem_key("./dir.v2/name") == "dir.v2/name"


# --- lists ------------------------------------------------------------------------------------------------------------


def test_probe_list_counts_and_round_trip(tmp_path: Path) -> None:
    probes = ProbeList(
        ("a/1.png", "a/2.png", "a/3.png", "b/1.png", "b/2.png", "c/1.png"), ("a",) * 3 + ("b",) * 2 + ("c",)
    )
    assert (probes.n_identities, probes.n_pairs, probes.n_pos) == (3, 6 + 2, 4)
    write_probe_list(tmp_path / "p.json", probes.paths, probes.ids)
    assert read_probe_list(tmp_path / "p.json") == probes
    with pytest.raises(ValueError, match="ids"):
        ProbeList(("a",), ())


@pytest.mark.parametrize(
    ("obj", "key"),
    [({"path": ["a"]}, "'id'"), ({"path": ["a", "b"], "id": ["x"]}, "'id'"), ({"path": [], "id": []}, "'path'"),
     ({"path": ["a", 3], "id": ["x", "y"]}, "'path'"), (["a"], "'path'")],
)  # fmt: skip
def test_read_probe_list_errors_name_file_and_key(tmp_path: Path, obj: object, key: str) -> None:
    path = tmp_path / "probes.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(DevkitFormatError, match=re.escape(str(path)) + ".*" + key):
        read_probe_list(path)


def test_distractor_list_round_trip_and_duplicates(tmp_path: Path) -> None:
    paths = ("375/37531198@N00/4174611825_0.jpg", "1/2/3.jpg")
    write_distractor_list(tmp_path / "megaface_features_list.json_2_1", paths)
    assert read_distractor_list(tmp_path / "megaface_features_list.json_2_1") == paths
    (tmp_path / "dup.json").write_text(json.dumps({"path": ["x.jpg", "y.jpg", "x.jpg"]}))
    with pytest.raises(DevkitFormatError, match=r"dup\.json.*'x\.jpg'"):
        read_distractor_list(tmp_path / "dup.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DevkitFormatError, match=r"broken\.json"):
        read_distractor_list(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="unique"):
        write_distractor_list(tmp_path / "d.json", ["a", "a"])


def test_list_names(tmp_path: Path) -> None:
    assert parse_list_name("megaface_features_list.json_1000000_1") == (1000000, 1)
    for name in ("megaface_features_list.json_10", "megaface_features_list.json_10_1.tmp", "x_10_1", "facescrub.json"):
        assert parse_list_name(name) is None
    for name in ("megaface_features_list.json_100_2", "megaface_features_list.json_10_1", "other.json"):
        (tmp_path / name).write_text("{}")
    assert find_distractor_lists(tmp_path) == {
        (10, 1): tmp_path / "megaface_features_list.json_10_1",
        (100, 2): tmp_path / "megaface_features_list.json_100_2",
    }


# --- the official lists (../shared) -----------------------------------------------------------------------------------


def _megaface(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "megaface"
    if not (path / "templatelists" / "facescrub_features_list.json").is_file():
        pytest.skip(f"MegaFace template lists not found under {path}")
    return path


def test_official_facescrub_list(shared_dir: Path) -> None:
    lists = _megaface(shared_dir) / "templatelists"
    probes = read_probe_list(lists / "facescrub_features_list.json")
    assert len(probes.paths) == 3530 and probes.n_identities == 80
    assert probes.n_pairs == 153634 and probes.n_pos == 76817
    runs = [ident for i, ident in enumerate(probes.ids) if i == 0 or probes.ids[i - 1] != ident]
    assert len(runs) == 80  # each identity is one contiguous block
    uncropped = read_probe_list(lists / "facescrub_uncropped_features_list.json")
    assert [stem_key(p) for p in uncropped.paths] == [stem_key(p) for p in probes.paths]
    assert uncropped.ids == probes.ids


def test_official_distractor_lists(shared_dir: Path) -> None:
    found = find_distractor_lists(_megaface(shared_dir) / "templatelists")
    assert list(found) == [(10, 1), (100, 1), (1000, 1), (10000, 1), (100000, 1)]
    for (size, _), path in found.items():
        assert len(read_distractor_list(path)) == size


def test_official_noise_lists(shared_dir: Path) -> None:
    root = _megaface(shared_dir)
    facescrub_noise = read_noise_list(root / "noises" / "facescrub_noises.txt")
    assert len(facescrub_noise) == 605
    probes = read_probe_list(root / "templatelists" / "facescrub_features_list.json")
    assert int(noisy_mask(probes.paths, facescrub_noise).sum()) == 24
    megaface_noise = read_noise_list(root / "noises" / "megaface_noises.txt")
    assert len(megaface_noise) == 707
    for size, expected in ((10000, 7), (100000, 80)):
        paths = read_distractor_list(root / "templatelists" / f"megaface_features_list.json_{size}_1")
        assert int(noisy_mask(paths, megaface_noise).sum()) == expected


def test_noise_list_parsing_and_mask(tmp_path: Path) -> None:
    path = tmp_path / "noise.txt"
    path.write_text("#comment\nAaron_Eckhart_136.png\n\n  1/2/3_0.jpg \r\nAaron_Eckhart_136.png\n# x\n")
    entries = read_noise_list(path)
    assert entries == ("Aaron_Eckhart_136.png", "1/2/3_0.jpg")
    rel = ["Aaron_Eckhart/Aaron_Eckhart_136.png", "Aaron Eckhart/Aaron Eckhart_136.jpg", "1/2/3_0.jpg", "9/2/3_0.jpg"]
    assert noisy_mask(rel, entries).tolist() == [True, True, True, False]
    assert noisy_mask([], entries).shape == (0,)


# --- result JSON ------------------------------------------------------------------------------------------------------


def test_compress_curve_rule() -> None:
    x, y = compress_curve(range(6), [0.0, 0.005, 0.01, 0.012, 0.03, 0.031])
    assert (x, y) == ([0, 2, 4, 5], [0.0, 0.01, 0.03, 0.031])
    # 0.03 - 0.02 < 0.01 in float64: still a full step
    assert compress_curve(range(4), [0.0, 0.01, 0.02, 0.03])[0] == [0, 1, 2, 3]
    # the rise is measured from the last kept point, not the previous point
    assert compress_curve(range(5), [0.0, 0.006, 0.012, 0.015, 0.016])[0] == [0, 2, 4]
    assert compress_curve([0, 1], [0.5, 1.0]) == ([0, 1], [0.5, 1.0])  # last kept once
    assert compress_curve([3], [0.2]) == ([3], [0.2])
    assert compress_curve(range(4), [0.1, 0.1, 0.1, 0.1], step=0.5)[0] == [0, 3]
    with pytest.raises(ValueError, match="equal"):
        compress_curve([0, 1], [0.5])


def _compress_by_definition(x: list[float], y: list[float], step: float) -> tuple[list[float], list[float]]:
    keep = [0]
    for i in range(1, len(y) - 1):
        if y[i] - y[keep[-1]] >= step - 1e-12:
            keep.append(i)
    keep += [len(y) - 1] if len(y) > 1 else []
    return [float(x[i]) for i in keep], [float(y[i]) for i in keep]


def test_compress_curve_equals_its_definition_on_monotone_and_other_curves() -> None:
    """Non-decreasing curves are compressed by bisection; every kind gives the points of the defining loop."""
    rng = np.random.default_rng(0)
    for t in range(200):
        n = int(rng.integers(1, 1500))
        if t % 4 == 0:
            y = rng.random(n)  # not monotone: the loop itself
        elif t % 4 == 1:
            y = np.round(np.sort(rng.random(n)), 2)  # plateaus and exact steps of 0.01
        else:
            y = np.cumsum(rng.choice([0.0, 0.0, 0.01, 0.005, 0.02, 1e-13, 0.0099999999999], n))
        x = np.arange(n, dtype=float)
        for step in (0.01, 0.05):
            assert compress_curve(x, y, step) == _compress_by_definition(x.tolist(), y.tolist(), step)


def test_devkit_json_round_trip(tmp_path: Path) -> None:
    assert devkit_result_name("facescrub", "megaface", "myalgo", 1000000, 1) == (
        "cmc_facescrub_megaface_myalgo_1000000_1.json"
    )
    ranks = np.arange(1001)
    rates = np.minimum(1.0, 0.7 + 0.3 * np.sqrt(ranks / 1000))
    fpr = np.concatenate([[0.0], np.logspace(-8, 0, 200)])
    tpr = np.minimum(1.0, 0.5 + 0.5 * (np.log10(np.maximum(fpr, 1e-9)) + 9) / 9)
    path = tmp_path / devkit_result_name("facescrub", "megaface", "myalgo", 1000, 1)
    write_devkit_json(path, ranks, rates, fpr, tpr)
    back = read_devkit_json(path)
    cx, cy = compress_curve(ranks, rates)
    assert back["cmc"][0] == [int(r) for r in cx] and all(isinstance(r, int) for r in back["cmc"][0])
    assert back["cmc"][1] == [float(np.float32(v)) for v in cy]
    assert back["cmc"][0][0] == 0 and back["cmc"][0][-1] == 1000 and back["cmc"][1][-1] == 1.0
    assert back["roc"][0][0] == 0.0 and back["roc"][0][-1] == 1.0 and len(back["roc"][0]) < len(fpr)
    write_devkit_json(path, ranks, rates, fpr, tpr, compress=False)
    back = read_devkit_json(path)
    assert len(back["cmc"][0]) == 1001 and back["roc"][0] == [float(np.float32(v)) for v in fpr]
    with pytest.raises(ValueError, match="integers"):
        write_devkit_json(path, [0, 0.5], [0.1, 1.0], [0, 1], [0, 1])


@pytest.mark.parametrize(
    ("obj", "key"),
    [({"cmc": [[0], [1.0]]}, "'roc'"), ({"cmc": [[0, 1], [1.0]], "roc": [[0], [1]]}, "'cmc'"),
     ({"cmc": [[0.5], [1.0]], "roc": [[0], [1]]}, "'cmc'"), ({"cmc": [[0], [1.0]], "roc": [[0], ["a"]]}, "'roc'")],
)  # fmt: skip
def test_read_devkit_json_errors_name_file_and_key(tmp_path: Path, obj: object, key: str) -> None:
    path = tmp_path / "cmc_bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(DevkitFormatError, match=re.escape(str(path)) + ".*" + key):
        read_devkit_json(path)


def test_tar_from_compressed_roc_conventions() -> None:
    fpr = [0.0, 1e-8, 1e-6, 1e-4, 1.0]
    tpr = [0.5, 0.6, 0.8, 0.9, 1.0]
    for convention in ("step", "interpolate", "nearest"):
        assert tar_from_compressed_roc(fpr, tpr, 1e-6, convention) == pytest.approx(0.8)
        assert tar_from_compressed_roc(fpr, tpr, 1.0, convention) == pytest.approx(1.0)
    assert tar_from_compressed_roc(fpr, tpr, 2e-5, "step") == 0.8
    # log10(2e-5) = -4.699: 65.05 % of the way from 1e-6 to 1e-4 in log space (tolerance: float rounding only)
    assert tar_from_compressed_roc(fpr, tpr, 2e-5, "interpolate") == pytest.approx(0.8 + 0.1 * 1.30103 / 2, abs=1e-6)
    assert tar_from_compressed_roc(fpr, tpr, 2e-5, "nearest") == 0.9
    assert tar_from_compressed_roc(fpr, tpr, 1e-5, "nearest") == 0.8  # equidistant: the lower fpr
    # below the first positive fpr: the fpr-0 point gives the step value; nearest looks at 1e-8
    assert tar_from_compressed_roc(fpr, tpr, 1e-9, "step") == 0.5
    assert tar_from_compressed_roc(fpr, tpr, 1e-9, "interpolate") == 0.5
    assert tar_from_compressed_roc(fpr, tpr, 1e-9, "nearest") == 0.6
    assert tar_from_compressed_roc([1e-3, 1.0], [0.9, 1.0], 1e-6, "interpolate") == 0.0
    with pytest.raises(ValueError, match="step, interpolate, nearest"):
        tar_from_compressed_roc(fpr, tpr, 1e-6, "linear")
