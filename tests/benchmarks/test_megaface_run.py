"""The MegaFace run end to end on real shard directories and devkit .bin trees: counts equal the brute-force
reference for every size's own list, both feature sources agree, cleaned and filtered variants, the CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from facesearch.benchmarks import devkit
from facesearch.benchmarks.megaface import Evaluation, ProbeSet
from facesearch.benchmarks.megaface_counts import ThresholdGuessMissed
from facesearch.benchmarks.megaface_data import AttributeFilter, CachedDistractors, ShardDistractors, shard_paths
from facesearch.benchmarks.megaface_run import BenchConfig, run_megaface
from facesearch.cli import main
from facesearch.indexer import shards
from facesearch.indexer.screen import int8_products_exact
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Probes (12 identities x 6) and 700 distractors of other identities, as shard directories."""
    root = tmp_path_factory.mktemp("mf")
    write_synth_features(SynthFeaturesConfig(out=root / "probes", rows=72, dim=32, identities=12, spread=1.2, seed=3))
    write_synth_features(
        SynthFeaturesConfig(out=root / "dis", rows=700, dim=32, identities=350, shard_rows=256, seed=4)
    )
    return root


def _rows(directory: Path) -> tuple[np.ndarray, list[str], list[str], dict[str, np.ndarray]]:
    m = shards.read_manifest(directory)
    b = shards.read_all(directory, columns=["path", "identity", *m.attributes])
    attrs = {a: b.meta.column(a).to_numpy() for a in m.attributes}
    paths = [devkit.stem_key(p) for p in b.meta.column("path").to_pylist()]
    return b.xb, paths, b.meta.column("identity").to_pylist(), attrs


def _check_against_reference(result, xq, ids, xb, brute_force, codes_q=None, codes_b=None):
    hist, excluded, ties, tar = brute_force(xq, ids, xb, codes_q, codes_b)
    got = np.zeros(len(xb) + 1, np.int64)
    got[result["rank_histogram"]["rank"]] = result["rank_histogram"]["count"]
    assert got.tolist() == hist.tolist()
    assert result["counts"]["rank1_hits"] == hist[0]
    assert result["counts"]["mates_excluded"] == excluded
    assert result["ties"]["tied_distractor_comparisons"] == ties
    for far, count in zip(result["roc"]["far"], result["roc"]["tar_count"], strict=True):
        assert count == tar[far]


def test_shard_run_equals_reference_for_each_drawn_list(features, tmp_path, brute_force):
    out = tmp_path / "res"
    flt = AttributeFilter(("Male",))
    cfg = BenchConfig(out=out, probes=features / "probes", distractors=features / "dis", sizes=(10, 100, 500),
                      filters=(flt,), seed=9)  # fmt: skip
    results = run_megaface(cfg)
    assert [(r["size"], bool(r["filter"])) for r in results] == [(s, f) for s in (10, 100, 500) for f in (0, 1)]
    xq, _, ids, pattrs = _rows(features / "probes")
    xall, paths, _, dattrs = _rows(features / "dis")
    where = {p: i for i, p in enumerate(paths)}
    lists = {}
    for r in results:
        listed = devkit.read_distractor_list(out / "lists" / f"megaface_features_list.json_{r['size']}_1")
        lists[r["size"]] = listed
        rows = np.array([where[devkit.stem_key(p)] for p in listed])
        assert len(rows) == r["size"] == r["counts"]["n_distractors"]
        cq = cb = None
        if r["filter"]:
            cq, cb = (pattrs["Male"] > 0.5).astype(int), (dattrs["Male"][rows] > 0.5).astype(int)
            assert r["filter_stats"]["distractors_removed_fraction"] > 0
        _check_against_reference(r, xq, ids, xall[rows], brute_force, cq, cb)
        assert r["counts"]["N"] == 72 * 5 and r["counts"]["N_pos"] == 72 * 5 // 2
        assert (out / "devkit" / f"cmc_facescrub_megaface_facesearch_{r['size']}_1.json").is_file()
    assert set(lists[100]) != set(lists[500][:100])  # independent samples, not prefixes
    dk = devkit.read_devkit_json(out / "devkit" / "cmc_facescrub_megaface_facesearch_500_1.json")
    assert dk["cmc"][0][0] == 0 and dk["cmc"][0][-1] == 500 and dk["cmc"][1][-1] == pytest.approx(1.0)
    assert dk["cmc"][1][0] == pytest.approx(results[4]["rank1"])
    for name in ("megaface_summary.md", "megaface_cmc.png", "megaface_roc.png"):
        assert (out / name).stat().st_size > 0


def test_devkit_trees_give_the_same_counts_as_shards(features, tmp_path):
    runner = CliRunner()
    for name in ("probes", "dis"):
        res = runner.invoke(
            main,
            [
                "bench",
                "export-bins",
                "--shards",
                str(features / name),
                "--out",
                str(tmp_path / name),
                "--file-ending",
                "_alg.bin",
            ],
        )
        assert res.exit_code == 0, res.output
    b = shards.read_all(features / "probes", columns=["path", "identity"])
    raw = b.meta.column("path").to_pylist()
    devkit.write_probe_list(tmp_path / "facescrub_features_list.json", raw, b.meta.column("identity").to_pylist())
    shard_out = tmp_path / "a"
    run_megaface(BenchConfig(out=shard_out, probes=features / "probes", distractors=features / "dis", sizes=(50, 200)))
    lists = shard_out / "lists"

    def devkit_run(out: Path):
        args = ["bench", "megaface", "--out", str(out), "--probe-root", str(tmp_path / "probes"), "--probe-list",
                str(tmp_path / "facescrub_features_list.json"), "--distractor-root", str(tmp_path / "dis"),
                "--distractor-lists", str(lists), "--file-ending", "_alg.bin"]  # fmt: skip
        return runner.invoke(main, args)

    res = devkit_run(tmp_path / "b")
    assert res.exit_code == 0, res.output
    assert "TAR@1e-6" in res.output and "report:" in res.output
    for size in (50, 200):
        a = json.loads((shard_out / f"result_facesearch_{size}_1.json").read_text())
        b = json.loads((tmp_path / "b" / f"result_alg_{size}_1.json").read_text())
        assert a["rank_histogram"] == b["rank_histogram"] and a["roc"]["tar_count"] == b["roc"]["tar_count"]
    # A malformed feature file is named.
    bad = tmp_path / "dis" / (devkit.read_distractor_list(lists / "megaface_features_list.json_50_1")[7] + "_alg.bin")
    bad.write_bytes(bad.read_bytes()[:20])
    res = devkit_run(tmp_path / "c")
    assert res.exit_code != 0 and bad.name in res.output and "Traceback" not in res.output


def test_cleaned_variant_replaces_noisy_probes_and_drops_noisy_distractors(features, tmp_path):
    _, ppaths, _, _ = _rows(features / "probes")
    _, dpaths, _, _ = _rows(features / "dis")
    (tmp_path / "fs_noise.txt").write_text(f"# comment\n{ppaths[1]}.png\n{ppaths[7]}\n")
    (tmp_path / "mf_noise.txt").write_text("# comment\n" + "\n".join(p + ".jpg" for p in dpaths[:300]) + "\n")
    base = BenchConfig(out=tmp_path / "plain", probes=features / "probes", distractors=features / "dis", sizes=(400,))
    cleaned = BenchConfig(
        out=tmp_path / "clean",
        probes=features / "probes",
        distractors=features / "dis",
        sizes=(400,),
        cleaned=True,
        probe_noise=tmp_path / "fs_noise.txt",
        distractor_noise=tmp_path / "mf_noise.txt",
    )
    (plain,) = run_megaface(base)
    (clean,) = run_megaface(cleaned)
    assert clean["cleaned"] and clean["provenance"]["probes"]["noisy_probes_replaced"] == 2
    removed = clean["distractor_list"]["noisy_removed"]
    assert removed > 0 and clean["counts"]["n_distractors"] == 400 - removed
    assert clean["counts"]["N"] == plain["counts"]["N"]
    assert (tmp_path / "clean" / "devkit_cleaned").is_dir()


def test_official_probe_list_counts(shared_dir):
    plist = devkit.read_probe_list(shared_dir / "data/megaface/templatelists/facescrub_features_list.json")
    rng = np.random.default_rng(0)
    xq = rng.normal(size=(len(plist.paths), 8)).astype(np.float32)
    ev = Evaluation(ProbeSet(xq, plist.ids), 20)
    ev.add(rng.normal(size=(20, 8)).astype(np.float32))
    out = ev.finish(lambda i: np.zeros((len(i), 8)))
    assert (len(plist.paths), out["N"], out["roc"]["N_pos"], out["roc"]["N_neg"]) == (3530, 153_634, 76_817, 70_600)


def test_bad_configurations_are_one_line_errors(features, tmp_path):
    def run(*extra: str) -> str:
        res = CliRunner().invoke(main, ["bench", "megaface", "--out", str(tmp_path), *extra])
        assert res.exit_code != 0 and "Traceback" not in res.output
        return res.output

    both = ["--probes", str(features / "probes"), "--distractors", str(features / "dis")]
    assert "probes" in run("--distractors", str(features / "dis"))
    assert "cannot draw 5,000" in run(*both, "--sizes", "5000")
    assert "Beard" in run(*both, "--sizes", "10", "--filter", "Beard")
    assert "expected comma-separated integers" in run(*both, "--sizes", "ten")


def test_cleaned_cli_defaults_to_the_shared_noise_lists(features, tmp_path, shared_dir):
    args = ["bench", "megaface", "--out", str(tmp_path), "--probes", str(features / "probes"), "--distractors",
            str(features / "dis"), "--sizes", "10", "--cleaned"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "result_facesearch_10_1_cleaned.json").read_text())
    assert result["cleaned"] and result["provenance"]["config"]["probe_noise"].endswith("facescrub_noises.txt")


def test_cached_distractors_take_equals_the_source(features):
    ids, _ = shard_paths(features / "dis")
    for limit in (1 << 30, 1000):  # everything cached / nothing cached (falls back to reading the shards)
        src = CachedDistractors(ShardDistractors(features / "dis", ids[::3]), limit_bytes=limit)
        streamed = np.concatenate([xb for xb, _ in src.blocks()])
        idx = np.array([0, 5, 100, len(streamed) - 1])
        assert np.array_equal(src.take(idx), streamed[idx])
        assert (src.rows is not None) == (limit > 1000)
        again = np.concatenate([xb for xb, _ in src.blocks()])  # a second pass: from memory when cached
        assert np.array_equal(again, streamed)


def test_confident_filter_chooses_margins_and_reports_predicted_beside_measured(features, tmp_path, brute_force):
    """The synthetic features carry their attribute law's validation statistics: --max-mate-loss picks the margin,
    the counts equal the brute-force reference on per-attribute states, and the result JSON holds the predicted
    cost beside the measured one."""
    out = tmp_path / "conf"
    flt = AttributeFilter(("Male", "Chubby"), mode="confident", max_mate_loss=0.01)
    results = run_megaface(BenchConfig(out=out, probes=features / "probes", distractors=features / "dis", sizes=(500,),
                                       filters=(flt,), seed=9))  # fmt: skip
    r = results[1]
    margins = r["filter"]["margins"]
    assert r["filter"]["mode"] == "confident" and len(margins) == 2 and all(0 < m <= 0.5 for m in margins)
    pred = r["filter_stats"]["predicted"]
    assert pred["mates_lost"] <= 0.01 and 0 < pred["distractors_removed"] < 1
    assert set(pred["per_attribute"]) == {"Male", "Chubby"}
    assert 0 <= r["filter_stats"]["mates_excluded_fraction"] <= 0.05  # measured on 360 mate pairs: near the target
    xq, _, ids, pattrs = _rows(features / "probes")
    xall, paths, _, dattrs = _rows(features / "dis")
    where = {p: i for i, p in enumerate(paths)}
    rows = np.array([where[devkit.stem_key(p)] for p in devkit.read_distractor_list(
        out / "lists" / "megaface_features_list.json_500_1")])  # fmt: skip

    def states(attrs: dict[str, np.ndarray], sel: Any = slice(None)) -> np.ndarray:
        cols = []
        for a, m in zip(("Male", "Chubby"), margins, strict=True):
            p = attrs[a][sel].astype(np.float64)
            cols.append(np.where(p > 1 - m, 1, np.where(p < m, -1, 0)))
        return np.stack(cols, 1)

    _check_against_reference(r, xq, ids, xall[rows], brute_force, states(pattrs), states(dattrs, rows))
    summary = (out / "megaface_summary.md").read_text()
    assert "pred." in summary and "not confidently opposed" in summary


def test_filter_mode_options_are_checked(features, tmp_path):
    def run(*extra: str) -> str:
        args = ["bench", "megaface", "--out", str(tmp_path / "x"), "--probes", str(features / "probes"),
                "--distractors", str(features / "dis"), "--sizes", "10", *extra]  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0
        return result.output

    assert "needs --max-mate-loss" in run("--filter", "Male", "--filter-mode", "confident")
    assert "need --filter-mode confident" in run("--filter", "Male", "--max-mate-loss", "0.01")
    assert "not both" in run("--filter", "Male", "--filter-mode", "confident", "--max-mate-loss", "0.01",
                             "--filter-margin", "0.1")  # fmt: skip
    assert "need --filter ATTRIBUTES" in run("--max-mate-loss", "0.01")
    assert "needs --soft-weight" in run("--filter", "Male", "--filter-mode", "hard,soft")
    assert "distinct modes" in run("--filter", "Male", "--filter-mode", "hard,hard")
    assert "distinct modes" in run("--filter", "Male", "--filter-mode", "fuzzy")


def test_soft_mode_scores_every_pair_by_identity_and_attribute_agreement(features, tmp_path):
    """Soft mode beside hard and confident in one run: nothing excluded, and the rank of every mate pair equals a
    float64 reference of (1 - w) cos + w * mean cos(pi (p - q) / 2) over every distractor of the list."""
    w, attrs = 0.3, ("Male", "Chubby")
    filters = tuple(AttributeFilter(attrs, mode=m, margins=(0.2,) if m == "confident" else None,
                                    weight=w if m == "soft" else None)
                    for m in ("hard", "confident", "soft"))  # fmt: skip
    out = tmp_path / "soft"
    results = run_megaface(BenchConfig(out=out, probes=features / "probes", distractors=features / "dis",
                                       sizes=(300,), filters=filters, seed=3))  # fmt: skip
    assert [r["filter"] and r["filter"]["mode"] for r in results] == [None, "hard", "confident", "soft"]
    for mode in ("", "_filtered", "_filtered_confident", "_filtered_soft"):
        assert (out / f"result_facesearch_300_1{mode}.json").is_file()
    soft = results[3]
    assert soft["counts"]["mates_excluded"] == 0 and soft["filter_stats"]["distractors_removed_fraction"] == 0
    xq, _, ids, pattrs = _rows(features / "probes")
    xall, paths, _, dattrs = _rows(features / "dis")
    where = {p: i for i, p in enumerate(paths)}
    rows = np.array([where[devkit.stem_key(p)] for p in devkit.read_distractor_list(
        out / "lists" / "megaface_features_list.json_300_1")])  # fmt: skip

    def unit(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def score(xa, pa, xb, pb):
        agree = np.mean([np.cos(np.pi / 2 * (pa[a][:, None] - pb[a][None, :])) for a in attrs], axis=0)
        return (1 - w) * unit(xa) @ unit(xb).T + w * agree

    p64 = {a: pattrs[a].astype(np.float64) for a in attrs}
    d64 = {a: dattrs[a][rows].astype(np.float64) for a in attrs}
    S, M = score(xq, p64, xall[rows], d64), score(xq, p64, xq, p64)
    hist = np.zeros(len(rows) + 1, np.int64)
    ids = np.asarray(ids)
    for p in range(len(xq)):
        for g in np.flatnonzero(ids == ids[p]):
            if g != p:
                hist[int((S[p] > M[p, g]).sum())] += 1
    got = np.zeros(len(rows) + 1, np.int64)
    got[soft["rank_histogram"]["rank"]] = soft["rank_histogram"]["count"]
    assert got.tolist() == hist.tolist() and soft["counts"]["rank1_hits"] == hist[0]
    assert soft["rank1"] != results[0]["rank1"]  # the attributes moved some mates
    assert "soft: Male & Chubby agreement, weight 0.3" in (out / "megaface_summary.md").read_text()


class _SmallKeep(Evaluation):
    """The harness with room for only 100 negatives, so a small run prunes, guesses its threshold and screens."""

    missed_once = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "keep_cap": 100, "tile_rows": 100})

    def finish(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self.guess > -np.inf and not _SmallKeep.missed_once:
            _SmallKeep.missed_once = True  # the first guessed run "misses": the run must repeat without the guess
            raise ThresholdGuessMissed("forced")
        return super().finish(*args, **kwargs)


@pytest.mark.parametrize("screen", ["none", pytest.param("int8", marks=pytest.mark.skipif(
    not int8_products_exact(), reason="no exact int8"))])  # fmt: skip
def test_screened_guessed_runs_equal_reference_and_restore_threads(features, tmp_path, brute_force, monkeypatch,
                                                                   screen):  # fmt: skip
    """Through run_megaface with pruned negatives: the guessed threshold (a forced miss, then the repeat without it),
    the screen, a filtered variant replayed from memory, counts equal to the reference, torch's threads restored."""
    import facesearch.benchmarks.megaface_run as mr

    monkeypatch.setattr(mr, "Evaluation", _SmallKeep)
    monkeypatch.setattr(_SmallKeep, "missed_once", False)
    threads = torch.get_num_threads()
    out = tmp_path / screen
    cfg = BenchConfig(out=out, probes=features / "probes", distractors=features / "dis", sizes=(500,), seed=9,
                      far_max=0.02, screen=screen, filters=(AttributeFilter(("Male",)),))  # fmt: skip
    results = run_megaface(cfg)
    assert torch.get_num_threads() == threads
    xq, _, ids, pattrs = _rows(features / "probes")
    xall, paths, _, dattrs = _rows(features / "dis")
    where = {p: i for i, p in enumerate(paths)}
    listed = devkit.read_distractor_list(out / "lists" / "megaface_features_list.json_500_1")
    rows = np.array([where[devkit.stem_key(p)] for p in listed])
    plain, filtered = results
    assert plain["screen"] == screen and plain["threshold_guess"]["missed"] == "forced"
    assert filtered["threshold_guess"]["missed"] is None and filtered["threshold_guess"]["value"] is not None
    _check_against_reference(plain, xq, ids, xall[rows], brute_force)
    cq, cb = (pattrs["Male"] > 0.5).astype(int), (dattrs["Male"][rows] > 0.5).astype(int)
    _check_against_reference(filtered, xq, ids, xall[rows], brute_force, cq, cb)


def test_prefetch_runs_ahead_only_while_allowed():
    from facesearch.benchmarks.megaface_run import prefetch

    for ahead, expect in ((True, True), (False, False)):
        finished = threading.Event()
        it = prefetch(iter(range(20)), depth=2, ahead=lambda a=ahead: a, finished=finished)
        assert next(it) == 0
        assert finished.wait(2 if expect else 0.3) is expect  # bounded: the producer waits at depth 2
        assert list(it) == list(range(1, 20))
        assert finished.is_set()

    def bad():
        yield 1
        raise OSError("shard unreadable")

    with pytest.raises(OSError, match="unreadable"):
        list(prefetch(bad()))
