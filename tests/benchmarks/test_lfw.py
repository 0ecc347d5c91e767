"""LFW verification: the pairs parser, ten-fold accuracy against a brute-force reference, pair scoring, the ORL pairs
builder on the real ORL faces and the ``facesearch bench lfw`` / ``lfw-pairs`` commands end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from facesearch.benchmarks.lfw import (
    LFW_KEEP_FACE,
    Pair,
    Pairs,
    embed_lfw_images,
    evaluate_lfw,
    features_from_npz,
    features_from_shards,
    format_lfw,
    image_key,
    pair_image_path,
    pair_key,
    read_pairs,
    score_pairs,
    ten_fold_accuracy,
    write_orl_pairs,
)
from facesearch.cli import main
from facesearch.indexer.shards import Manifest, shard_name, table_from_arrays, write_manifest, write_shard
from facesearch.model.faces.images import read_image

GOOD = "2\t2\nA 1 2\nB 1 3\nA 1 B 2\nB 3 C 1\n\nC 1 2\nA 2 3\nC 2 A 3\nA 1 C 1\n"


def brute_force(scores: np.ndarray, same: np.ndarray, fold: np.ndarray) -> tuple[list[float], list[float]]:
    """The protocol written out literally: every training score (and -inf) tried in ascending order, first best kept."""
    accs, thresholds = [], []
    for i in sorted(set(fold.tolist())):
        train = [(float(s), bool(y)) for s, y, f in zip(scores, same, fold, strict=True) if f != i]
        best_t, best_correct = -math.inf, -1
        for t in [-math.inf, *sorted(s for s, _ in train)]:
            correct = sum((s > t) == y for s, y in train)
            if correct > best_correct:
                best_t, best_correct = t, correct
        test = [(float(s), bool(y)) for s, y, f in zip(scores, same, fold, strict=True) if f == i]
        accs.append(sum((s > best_t) == y for s, y in test) / len(test))
        thresholds.append(best_t)
    return accs, thresholds


# --- the pairs file -----------------------------------------------------------------------------------------------


def test_read_pairs_good_file(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text(GOOD)
    pairs = read_pairs(path)
    assert len(pairs.folds) == 2 and [len(f) for f in pairs.folds] == [4, 4]
    assert pairs.folds[0][0] == Pair("A", 1, "A", 2, True)
    assert pairs.folds[0][3] == Pair("B", 3, "C", 1, False)
    same, fold = pairs.labels()
    assert same.tolist() == [True, True, False, False] * 2 and fold.tolist() == [0] * 4 + [1] * 4
    assert pair_image_path("/r", "A", 7) == Path("/r/A/A_0007.jpg")
    assert pair_key("A_B", 12) == "A_B/A_B_0012" == image_key("/data/lfw/A_B/A_B_0012.jpg") == image_key("A_B/A_B_0012")
    assert image_key("x/J._Smith/J._Smith_0001") == "J._Smith/J._Smith_0001"


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ("", None, "header"),
        ("10\n", 1, "<folds> <n>"),
        ("2 x\nA 1 2\n", 1, "<folds> <n>"),
        ("1 1\nA 1\nA 1 B 2\n", 2, "name n1 n2"),
        ("1 1\nA 1 2\nA 1 2\n", 3, "name1 n1 name2 n2"),
        ("1 1\nA 1 2\nA 1 B x\n", 3, "name1 n1 name2 n2"),
        ("1 1\nA 0 2\nA 1 B 2\n", 2, "name n1 n2"),
        ("1 1\nA 1 2\n", 2, "declares 1 folds"),
        ("1 1\nA 1 2\nA 1 B 2\nC 1 2\n", 4, "declares 1 folds"),
    ],
)
def test_read_pairs_malformed_names_the_line(tmp_path: Path, text: str, line: int | None, expected: str) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}{f':{line}' if line else ''}: .*{expected}"):
        read_pairs(path)


# --- ten-fold accuracy --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ten_fold_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    same = rng.random(n) < 0.5
    scores = np.round(rng.normal(same * 0.6, 0.5), 1)  # rounded: many ties between candidate thresholds
    fold = rng.integers(0, 10, n)
    result = ten_fold_accuracy(scores, same, fold)
    accs, thresholds = brute_force(scores, same, fold)
    assert result.fold_accuracies == accs  # exact: both count the same integers
    assert result.thresholds == thresholds
    assert result.mean_accuracy == float(np.mean(accs))
    assert result.standard_error == float(np.std(accs, ddof=1) / math.sqrt(10))
    assert "standard error" in result.note and "standard error" in format_lfw(result)


def test_ten_fold_perfectly_separable() -> None:
    # Every fold holds the same 60 scores, so the training folds span each test fold's range: with thresholds at
    # training scores, a test "different" score above every training one could otherwise be accepted.
    rng = np.random.default_rng(0)
    same = np.tile([True, False], 300)
    base = np.where(same[:60], rng.uniform(0.5, 1.0, 60), rng.uniform(-1.0, 0.4, 60))
    scores = np.tile(base, 10)
    result = ten_fold_accuracy(scores, same, np.repeat(np.arange(10), 60))
    assert result.fold_accuracies == [1.0] * 10 and result.mean_accuracy == 1.0 and result.standard_error == 0.0


def test_threshold_is_chosen_without_the_test_fold() -> None:
    # Fold 0: 50 same pairs at 0.1, 50 different at 0.0.  Folds 1-9: 5 same at 0.8, 5 different at 0.2 each.
    # Over all folds t = 0.0 is best (45 errors instead of 50) and would score fold 0 perfectly; over folds 1-9 only,
    # the smallest perfect threshold is 0.2, which rejects fold 0's same pairs: accuracy 0.5.
    scores = np.concatenate([[0.1] * 50, [0.0] * 50, np.tile([0.8] * 5 + [0.2] * 5, 9)])
    same = np.concatenate([[True] * 50, [False] * 50, np.tile([True] * 5 + [False] * 5, 9)])
    fold = np.concatenate([[0] * 100, np.repeat(np.arange(1, 10), 10)])

    def accuracy(t: float, rows: np.ndarray) -> float:
        return float(((scores[rows] > t) == same[rows]).mean())

    everything = np.ones(len(scores), bool)
    assert accuracy(0.0, everything) > accuracy(0.2, everything) and accuracy(0.0, fold == 0) == 1.0  # the leak
    result = ten_fold_accuracy(scores, same, fold)
    assert result.thresholds[0] == 0.2
    assert result.fold_accuracies[0] == 0.5
    assert result.fold_sizes == [100] + [10] * 9


def test_ten_fold_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 folds"):
        ten_fold_accuracy(np.zeros(4), np.ones(4, bool), np.zeros(4, int))
    with pytest.raises(ValueError, match="finite"):
        ten_fold_accuracy(np.array([0.0, np.nan]), np.ones(2, bool), np.arange(2))
    with pytest.raises(ValueError, match="equal-length"):
        ten_fold_accuracy(np.zeros(3), np.ones(2, bool), np.arange(2))


# --- scoring pairs ------------------------------------------------------------------------------------------------


def test_score_pairs_cosine_zero_and_missing() -> None:
    pairs = Pairs(((Pair("A", 1, "A", 2, True), Pair("A", 1, "B", 1, False), Pair("A", 2, "B", 1, False)),))
    feats = {"A/A_0001": np.array([3.0, 4.0]), "A/A_0002": np.array([6.0, 8.0]), "B/B_0001": np.zeros(2)}
    assert score_pairs(feats, pairs).tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-12)
    del feats["B/B_0001"]
    with pytest.raises(ValueError, match=r"1 of the 3 pair images have no features, e.g. \['B/B_0001'\]"):
        score_pairs(feats, pairs)


# --- the ORL pairs set and the commands, end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def orl_pairs(orl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_orl_pairs(orl_dir, tmp_path_factory.mktemp("orl_lfw"), folds=10, per_fold=100, seed=0)


def test_write_orl_pairs(orl_pairs: Path) -> None:
    pairs = read_pairs(orl_pairs)
    assert orl_pairs.read_text().splitlines()[0] == "10 100"
    assert len(pairs.folds) == 10 and all(len(f) == 200 for f in pairs.folds)
    people = []
    for fold in pairs.folds:
        assert sum(p.same for p in fold) == 100 and all(p.same for p in fold[:100])
        assert all((p.name1 == p.name2) == p.same for p in fold)
        assert len(set(fold)) == 200  # no duplicate pair
        people.append({p.name1 for p in fold} | {p.name2 for p in fold})
    assert all(len(g) == 4 for g in people) and len(set().union(*people)) == 40  # 4 people per fold, disjoint
    root = orl_pairs.parent / "lfw"
    for p in pairs.flat():
        assert pair_image_path(root, p.name1, p.n1).is_file() and pair_image_path(root, p.name2, p.n2).is_file()
    assert read_image(pair_image_path(root, "orl_s1", 1)).shape == (152, 132, 3)  # 112x92 + 20 px on each side


def test_bench_lfw_end_to_end(orl_pairs: Path, yunet_path: Path, tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "result.json"
    args = ["bench", "lfw", "--pairs", str(orl_pairs), "--images", str(orl_pairs.parent / "lfw"),
            "--checkpoint", str(ckpt), "--device", "cpu", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "standard error" in res.output and "| accuracy |" in res.output
    doc = json.loads(out.read_text())
    assert len(doc["fold_accuracies"]) == 10 and all(0.0 <= a <= 1.0 for a in doc["fold_accuracies"])
    assert doc["fold_sizes"] == [200] * 10 and doc["meta"]["fingerprint"] and doc["no_face"] >= 0
    assert doc["meta"]["keep_face"] == "center"
    assert 0.0 <= doc["mean_accuracy"] <= 1.0 and doc["standard_error"] >= 0.0


def _two_face_lfw(orl_dir: Path, root: Path) -> Pairs:
    """X_0001: person s1 at the centre of a 300x400 canvas and s2, 1.4x larger, in the top-left corner; X_0002: s1
    alone, Y_0001: the large s2 alone, each where it is in X_0001."""
    a, b = read_image(orl_dir / "s1" / "1.pgm"), read_image(orl_dir / "s2" / "1.pgm")
    big = cv2.resize(b, (129, 157), interpolation=cv2.INTER_CUBIC)

    def canvas(centre: bool, corner: bool) -> np.ndarray:
        image = np.zeros((300, 400, 3), np.uint8)
        if centre:
            image[94:206, 154:246] = a
        if corner:
            image[10:167, 10:139] = big
        return image

    for name, n, image in (("X", 1, canvas(True, True)), ("X", 2, canvas(True, False)), ("Y", 1, canvas(False, True))):
        path = pair_image_path(root, name, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), image)
    return Pairs(((Pair("X", 1, "X", 2, True), Pair("X", 1, "Y", 1, False)),))


def test_embed_lfw_keeps_the_centre_face(orl_dir: Path, yunet_path: Path, tmp_path: Path, ckpt: Path) -> None:
    """LFW images are centred on the named person: by default the centred face is embedded, not a larger one."""
    pairs = _two_face_lfw(orl_dir, tmp_path / "lfw")
    assert LFW_KEEP_FACE == ("largest", "center", "score")

    def cosines(**kwargs: str) -> tuple[float, float]:
        f = embed_lfw_images(tmp_path / "lfw", pairs, ckpt, "cpu", **kwargs).features  # type: ignore[arg-type]
        u = {k: v / np.linalg.norm(v) for k, v in f.items()}
        return float(u["X/X_0001"] @ u["X/X_0002"]), float(u["X/X_0001"] @ u["Y/Y_0001"])

    # The same face cropped from two canvases embeds to cosine ~0.999 (measured); another face ~0.94 with this tiny
    # random model.  0.99 separates them with margin on both sides.
    with_centre, with_large = cosines()
    assert with_centre > 0.99 > with_large
    with_centre, with_large = cosines(keep_face="largest")
    assert with_large > 0.99 > with_centre
    with pytest.raises(ValueError, match=r"keep_face must be one of \['largest', 'center', 'score'\], got 'all'"):
        embed_lfw_images(tmp_path / "lfw", pairs, ckpt, "cpu", keep_face="all")
    res = CliRunner().invoke(main, ["bench", "lfw", "--help"])
    assert "--keep-face [largest|center|score]" in res.output and "default: center" in res.output


def test_bench_lfw_features_npz_and_shards(orl_pairs: Path, tmp_path: Path) -> None:
    pairs = read_pairs(orl_pairs)
    keys = sorted({pair_key(n, i) for p in pairs.flat() for n, i in ((p.name1, p.n1), (p.name2, p.n2))})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(keys), 16)).astype(np.float32)
    x[[keys.index(pair_key(p.name2, p.n2)) for p in pairs.flat() if p.same]] += 2.0 * x[0]  # some signal
    paths = [f"/data/lfw/{k}.jpg" for k in keys]
    np.savez(tmp_path / "f.npz", keys=np.array(paths), features=x)
    # By hand: cosine similarity with numpy, then the literal protocol.
    u = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    row = {k: i for i, k in enumerate(keys)}
    scores = np.array([u[row[pair_key(p.name1, p.n1)]] @ u[row[pair_key(p.name2, p.n2)]] for p in pairs.flat()])
    same, fold = pairs.labels()
    accs, _ = brute_force(scores, same, fold)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["bench", "lfw", "--pairs", str(orl_pairs), "--features", str(tmp_path / "f.npz"),
                                    "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    # Exact: the two cosine computations differ by ~1e-16, which cannot reorder these continuous random scores.
    assert doc["fold_accuracies"] == accs and doc["mean_accuracy"] == float(np.mean(accs))
    # The same features as an indexer shard directory (float32) give the same result as the .npz.
    shards = tmp_path / "shards"
    table = table_from_arrays(np.arange(len(keys)), paths, [None] * len(keys), x, {}, None, None,
                              ["ok"] * len(keys), [None] * len(keys), dtype="float32")  # fmt: skip
    entry = write_shard(shards / shard_name(0), table, (0, len(keys)))
    write_manifest(shards, Manifest("f" * 64, 16, "float32", (), shards=(entry,), planned_shards=1, complete=True))
    from_shards = evaluate_lfw(pairs, features_from_shards(shards))
    assert from_shards.fold_accuracies == evaluate_lfw(pairs, features_from_npz(tmp_path / "f.npz")).fold_accuracies
    assert from_shards.fold_accuracies == doc["fold_accuracies"]


def test_bench_lfw_user_errors(orl_pairs: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["bench", "lfw", "--pairs", str(orl_pairs)])
    assert res.exit_code == 2 and "--features" in res.output
    bad = tmp_path / "pairs.txt"
    bad.write_text("1 1\nA 1\nA 1 B 2\n")
    res = runner.invoke(main, ["bench", "lfw", "--pairs", str(bad), "--features", str(tmp_path)])
    assert res.exit_code == 1 and f"{bad}:2" in res.output and "Traceback" not in res.output
    np.savez(tmp_path / "f.npz", keys=np.array(["orl_s1/orl_s1_0001"]), features=np.ones((1, 4), np.float32))
    res = runner.invoke(main, ["bench", "lfw", "--pairs", str(orl_pairs), "--features", str(tmp_path / "f.npz")])
    assert res.exit_code == 1 and "have no features" in res.output
    res = runner.invoke(main, ["bench", "lfw-pairs", "--orl", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "ORL people" in res.output
