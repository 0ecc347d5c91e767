"""LFW-format pairs sets from any identity-labelled images: the pair sampler against the full enumeration, folds of
disjoint people with correct matched / mismatched pairs, people restricted to a split's test people, errors, and
``facesearch bench lfw-pairs --list`` (synthetic faces, and the ORL tree read as a folder per identity)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facesearch.benchmarks.lfw import pair_image_path, read_pairs
from facesearch.benchmarks.lfw_pairs import _matched_line, _mismatched_line, lfw_name, write_lfw_pairs
from facesearch.benchmarks.split import TEST_IDENTITIES, SplitConfig, read_identity_samples, write_split
from facesearch.cli._app import main
from facesearch.model.faces.images import read_image


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_lines_follow_the_full_enumeration(seed: int) -> None:
    """Pair ``i`` of the sampler is line ``i`` of the enumeration ``write_orl_pairs`` used to list (so ORL's pairs are
    unchanged), for people of 1 to 6 images."""
    rng = np.random.default_rng(seed)
    group = [f"p{k}" for k in range(int(rng.integers(2, 7)))]
    images = {g: sorted(rng.choice(20, int(rng.integers(1, 7)), replace=False).tolist()) for g in group}
    matched = [f"{g} {a} {b}" for g in group for i, a in enumerate(images[g]) for b in images[g][i + 1 :]]
    mismatched = [f"{g} {a} {h} {b}" for i, g in enumerate(group) for h in group[i + 1 :]
                  for a in images[g] for b in images[h]]  # fmt: skip
    assert [_matched_line(group, images, i) for i in range(len(matched))] == matched
    assert [_mismatched_line(group, images, i) for i in range(len(mismatched))] == mismatched


@pytest.fixture(scope="module")
def casia(synth_data: Path) -> Path:
    return synth_data / "casia"


def _samples(casia: Path) -> list[tuple[Path, str]]:
    return [(s.path, str(s.identity)) for s in read_identity_samples(casia / "landmarks.csv")]


def test_folds_hold_disjoint_people_and_true_labels(casia: Path, tmp_path: Path) -> None:
    pairs_path = write_lfw_pairs(_samples(casia), tmp_path, folds=4, per_fold=30, seed=1)
    pairs = read_pairs(pairs_path)
    assert pairs_path.read_text().splitlines()[0] == "4 30"
    people = [{n for p in fold for n in (p.name1, p.name2)} for fold in pairs.folds]
    assert all(len(f) == 6 for f in people) and len(set().union(*people)) == 24  # 24 people in 4 disjoint folds
    for fold in pairs.folds:
        assert len(fold) == 60 and len(set(fold)) == 60  # no pair twice
        assert all(p.same == (p.name1 == p.name2) for p in fold) and sum(p.same for p in fold) == 30
        assert all(p.n1 != p.n2 for p in fold if p.same)
    files = {n: sorted(p for p, i in _samples(casia) if i == n) for n in {i for _, i in _samples(casia)}}
    for p in pairs.flat()[:20]:  # image n of a person is its n-th file in path order, copied (the source is JPEG)
        assert pair_image_path(tmp_path / "lfw", p.name1, p.n1).read_bytes() == files[p.name1][p.n1 - 1].read_bytes()
    again = tmp_path / "again"
    assert write_lfw_pairs(reversed(_samples(casia)), again, folds=4, per_fold=30, seed=1).read_text() == (
        pairs_path.read_text()
    )  # the same set whatever the order of the samples


def test_people_restrict_to_a_splits_test_people(casia: Path, tmp_path: Path) -> None:
    split = tmp_path / "split"
    write_split(SplitConfig(data=casia / "landmarks.csv", out=split, probe_identities=6, distractor_identities=6))
    tested = (split / TEST_IDENTITIES).read_text().split()
    pairs = read_pairs(write_lfw_pairs(_samples(casia), tmp_path / "pairs", folds=3, per_fold=20, people=tested))
    assert {n for p in pairs.flat() for n in (p.name1, p.name2)} == set(tested)
    assert sorted(d.name for d in (tmp_path / "pairs" / "lfw").iterdir()) == sorted(tested)


def test_errors(casia: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"24 people, need >= 2 per fold \(26 for 13 folds\)"):
        write_lfw_pairs(_samples(casia), tmp_path, folds=13)
    with pytest.raises(ValueError, match=r"fold 1 \(.*\) has only 56 matched and 64 mismatched pairs; lower per_fold"):
        write_lfw_pairs(_samples(casia), tmp_path, folds=12, per_fold=100)
    fewer = write_lfw_pairs(_samples(casia), tmp_path / "fewer", folds=12, per_fold=100, fewer_ok=True)
    head = fewer.read_text().splitlines()[0].split()
    assert head[0] == "12" and 1 <= int(head[1]) <= 56  # as many as the poorest fold gives
    assert all(len(f) == 2 * int(head[1]) for f in read_pairs(fewer).folds)
    with pytest.raises(ValueError, match=r"1 of the 2 people asked for have no images, e.g. \['nobody'\]"):
        write_lfw_pairs(_samples(casia), tmp_path, people=["0000001", "nobody"])
    a, b = casia / "0000001" / "001.jpg", casia / "0000002" / "001.jpg"
    with pytest.raises(ValueError, match="'Jane Doe' and 'Jane_Doe' both become the LFW name 'Jane_Doe'"):
        write_lfw_pairs([(a, "Jane Doe"), (b, "Jane_Doe")], tmp_path, folds=1)
    assert lfw_name("Zoë O'Neil/2") == "Zo__O_Neil_2" and lfw_name("..") == "_.."


def test_cli_lfw_pairs_from_a_list(casia: Path, tmp_path: Path) -> None:
    people = tmp_path / "people.txt"
    people.write_text("".join(f"{k:07d}\n" for k in range(1, 13)))
    args = ["bench", "lfw-pairs", "--list", str(casia / "landmarks.csv"), "--people", str(people), "--folds", "3",
            "--per-fold", "10", "--pad", "8", "--out", str(tmp_path / "out")]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "(3 folds x 10 matched + 10 mismatched)" in r.output
    pairs = read_pairs(tmp_path / "out" / "pairs.txt")
    assert {n for p in pairs.flat() for n in (p.name1, p.name2)} == {f"{k:07d}" for k in range(1, 13)}
    assert read_image(pair_image_path(tmp_path / "out" / "lfw", "0000001", 1)).shape == (96 + 16, 96 + 16, 3)
    for extra, message in ((["--orl", str(casia)], "exactly one of --orl and --list"),
                           ([], "exactly one of --orl and --list")):  # fmt: skip
        bad = [a for a in args if a not in ("--list", str(casia / "landmarks.csv"))] if not extra else [*args, *extra]
        r = CliRunner().invoke(main, bad)
        assert r.exit_code == 2 and message in r.output, r.output
    r = CliRunner().invoke(main, ["bench", "lfw-pairs", "--orl", str(casia), "--people", str(people), "--out",
                                  str(tmp_path / "x")])  # fmt: skip
    assert r.exit_code == 2 and "--people: only with --list" in r.output, r.output


def test_cli_lfw_pairs_from_the_orl_tree(orl_dir: Path, tmp_path: Path) -> None:
    """ORL read as a folder per identity: grey PGMs converted to JPEG, padded as asked, 10 folds of 4 people."""
    args = ["bench", "lfw-pairs", "--list", str(orl_dir), "--format", "casia", "--pad", "20", "--out", str(tmp_path)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    pairs = read_pairs(tmp_path / "pairs.txt")
    assert len(pairs.folds) == 10 and all(len(f) == 200 for f in pairs.folds)
    people = [{n for p in fold for n in (p.name1, p.name2)} for fold in pairs.folds]
    assert all(len(f) == 4 for f in people) and len(set().union(*people)) == 40
    assert read_image(pair_image_path(tmp_path / "lfw", "s1", 1)).shape == (152, 132, 3)  # 112x92 + 20 px each side
