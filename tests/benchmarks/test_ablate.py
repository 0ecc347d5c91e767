"""``facesearch ablate``: the smoke tier end to end (tables with the paper's numbers and paired differences, the
shared inputs, resume), pairing (same initial weights and batch order across variants of a seed), the statistics
against references, the tiers and the variants as data, and clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from facesearch.benchmarks.ablate import AblateConfig, check_out, run_ablation
from facesearch.benchmarks.ablate_plan import TABLES, TIERS, Variant, get_tier, plan_variants, resolve_tables
from facesearch.benchmarks.ablate_runs import initial_weights
from facesearch.benchmarks.ablate_stats import (
    attribute_counts,
    attribute_rates,
    paired_attribute_difference,
    paired_ratio_difference,
    rank1_by_identity,
)
from facesearch.benchmarks.attribute_accuracy import balanced_accuracy
from facesearch.cli import main
from facesearch.indexer.shards import file_sha256
from facesearch.model.checkpoint import load_checkpoint
from facesearch.model.config import ATTRIBUTES
from facesearch.model.faces.synth import SynthConfig, generate_faces
from facesearch.model.train import build_network, init_from
from facesearch.model.trainer_data import StepBatchSampler

torch.set_num_threads(1)

PAIR = "fast-head1-none,fast-head1-all"  # Table 7's reference and "all" (= Table 2 Fast without / with)


def _ablate(out: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["ablate", *args, "--out", str(out), "--device", "cpu"], catch_exceptions=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Tables 7 and 4 at the smoke tier, restricted to Table 7's none / all, two seeds."""
    out = tmp_path_factory.mktemp("ablate") / "D"
    result = _ablate(out, "t7", "t4", "--tier", "smoke", "--seeds", "2", "--only", PAIR)
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_smoke_tables_hold_the_paper_beside_ours_with_paired_differences(smoke: tuple[Path, str]) -> None:
    out, output = smoke
    assert "4 to run" in output and "about" in output and "left" in output  # progress with a time estimate
    for name in ("t7.md", "t7.json", "t7_cmc.png", "t7_roc.png", "t4.md", "t4.json"):
        assert (out / "tables" / name).is_file(), name
    t7 = json.loads((out / "tables" / "t7.json").read_text())
    assert [r["name"] for r in t7["rows"]] == ["none", "all"] and t7["seeds"] == [0, 1]
    none, every = t7["rows"]
    assert none["paper"] == {"rank1": 70.28, "lfw": 97.20} and every["paper"] == {"rank1": 73.07, "lfw": 97.62}
    assert none["difference"] is None and every["reference"] == "none"
    diff = every["difference"]
    assert diff["seeds"] == [0, 1]
    for what in ("rank1", "lfw"):
        d = diff[what]
        assert d["lo"] <= d["estimate"] + 1e-12 and d["estimate"] <= d["hi"] + 1e-12, (what, d)
    ours = every["ours"]["rank1"]
    assert set(ours["seeds"]) == {"0", "1"} and ours["sd"] is not None
    assert t7["far"] == 1e-3 and t7["N_neg"] == 60 * 100  # 60 probes x 100 distractors: FAR 1e-6 is n/a
    md = (out / "tables" / "t7.md").read_text()
    assert "70.28" in md and "73.07" in md and "FAR 1e-6 needs" in md and "[" in md
    t4 = json.loads((out / "tables" / "t4.json").read_text())
    assert [r["attribute"] for r in t4["rows"]] == [*ATTRIBUTES, "mean"]
    assert t4["rows"][0]["paper"] == [83.40, 85.60] and t4["teacher"]["key"] == "moon"
    assert len(t4["difference"]["balanced"]["estimate"]) == 7
    report = (out / "REPORT.md").read_text()
    assert "facesearch ablate" in report and "## t7" in report and "## t4" in report and "tables/t7_cmc.png" in report


@pytest.mark.slow
def test_smoke_runs_record_exact_counts_and_the_shared_inputs(smoke: tuple[Path, str]) -> None:
    out, _ = smoke
    shared = json.loads((out / "shared" / "shared.json").read_text())
    assert shared["lfw_people"] == 20 and shared["teacher"]["key"] == "moon"
    for path, sha in shared["files"].items():
        assert file_sha256(Path(path)) == sha
    for key in PAIR.split(","):
        for seed in (0, 1):
            r = json.loads((out / "runs" / key / f"seed{seed}" / "result.json").read_text())
            assert r["key"] == key and r["seed"] == seed and r["tier"] == "smoke"
            largest = r["largest"]
            assert largest["size"] == 100 and sum(largest["mates"]) == largest["N"] == 20 * 3 * 2
            assert sum(largest["hits"]) == largest["harness_rank1_hits"]  # brute force = the exact harness
            assert [m["size"] for m in r["megaface"]] == [10, 100]
            assert len(r["lfw"]["fold_accuracies"]) == 10 and r["lfw"]["n_pairs"] == 100
            assert r["attributes"]["trained"] == (key == "fast-head1-all")
            assert r["seconds"]["train"] > 0 and not (out / "runs" / key / f"seed{seed}" / "features").exists()


@pytest.mark.slow
def test_resume_skips_finished_runs_and_refuses_other_experiments(smoke: tuple[Path, str]) -> None:
    out, _ = smoke
    results = sorted((out / "runs").glob("*/seed*/result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    again = _ablate(out, "t7", "t4", "--tier", "smoke", "--seeds", "2", "--only", PAIR)
    assert again.exit_code == 0 and "4 finished, 0 to run" in again.output and "0 runs trained now" in again.output
    assert [p.stat().st_mtime_ns for p in results] == stamps
    fewer = _ablate(out, "t7", "--tier", "smoke", "--seeds", "1", "--only", PAIR)
    assert fewer.exit_code == 1 and "--resume" in fewer.output and "seeds" in fewer.output and "tables" in fewer.output
    other = _ablate(out, "t7", "--tier", "cpu", "--seeds", "2", "--only", PAIR, "--resume")
    assert other.exit_code == 1 and "tier: 'smoke' -> 'cpu'" in other.output
    resumed = _ablate(out, "t7", "t4", "--tier", "smoke", "--seeds", "1", "--only", PAIR, "--resume")
    assert resumed.exit_code == 0 and "2 finished, 0 to run" in resumed.output
    assert json.loads((out / "tables" / "t7.json").read_text())["seeds"] == [0]
    assert [p.stat().st_mtime_ns for p in results] == stamps


def _list_csv(root: Path) -> Path:
    """An identity-labelled list CSV (landmarks and per-identity attribute columns) of synthetic CASIA-style faces."""
    generate_faces(SynthConfig(out=root, seed=4, identities=40, images_per_identity=4, layouts=("casia",), size=64,
                               workers=1))  # fmt: skip
    truth = {r["identity"]: r for r in csv.DictReader(open(root / "casia" / "attributes.csv"))}
    rows = list(csv.DictReader(open(root / "casia" / "landmarks.csv")))
    path = root / "faces.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*rows[0].keys(), *ATTRIBUTES])
        for r in rows:
            w.writerow([f"casia/{r['path']}", *list(r.values())[1:], *(truth[r["identity"]][a] for a in ATTRIBUTES)])
    return path


@pytest.mark.slow
def test_a_list_csv_is_split_by_person_and_uses_its_own_labels(tmp_path: Path) -> None:
    data = _list_csv(tmp_path / "src")
    cfg = AblateConfig(out=tmp_path / "D", tables=("t4",), data=str(data), tier="smoke", seeds=1, device="cpu")
    result = run_ablation(cfg)
    shared = json.loads((tmp_path / "D" / "shared" / "shared.json").read_text())
    assert shared["train_format"] == "list" and shared["labels"] is None and shared["teacher"] is None
    assert shared["probe_identities"] == 20 and result.trained == (("fast-head1-all", 0),)
    t4 = json.loads(result.tables["t4"].with_suffix(".json").read_text())
    assert t4["teacher"] is None and t4["difference"] is None and t4["rows"][0]["student"]["accuracy"][0] is not None
    assert "none given" in result.tables["t4"].read_text()


def test_variants_of_a_seed_share_initial_weights_and_batch_order(tmp_path: Path) -> None:
    """What the runner gives every variant of seed s: the same batches (a function of seed, data and the tier's batch
    size) and, built exactly as training builds it (seeded, then initialised from the block's weights), the same
    initial parameters wherever names and shapes agree; all of them when only λ1 differs."""
    tier, seed, n_ids = get_tier("smoke"), 3, 12
    keys = ("fast-head1-all", "fast-head1-none", "fast-head1-eye", "fast-head3-all", "full-head1-all")
    cfgs = {k: Variant.from_key(k).train_config(tier, seed, data=tmp_path) for k in keys}
    first = {k: StepBatchSampler(55, c.resolved_batch_size, c.seed, 0, 4, c.flip).batch(3) for k, c in cfgs.items()}
    assert all(b == first["fast-head1-all"] for b in first.values())
    params = {}
    for k in keys[:4]:
        init = initial_weights(tmp_path / f"fast-{seed}.safetensors", tier, "fast", seed, n_ids)
        torch.manual_seed(cfgs[k].seed)  # as model.train._new_run does
        model = build_network(cfgs[k].replace(init=init), n_ids)
        init_from(model, init)
        params[k] = model.state_dict()
    ref = params["fast-head1-all"]
    assert all(torch.equal(ref[n], params["fast-head1-none"][n]) for n in ref)  # only λ1 differs: everything
    for k in ("fast-head1-eye", "fast-head3-all"):
        shared = [n for n in ref if n.startswith(("trunk.", "feature.", "classifier."))]
        assert shared and all(torch.equal(ref[n], params[k][n]) for n in shared), k
    other = load_checkpoint(initial_weights(tmp_path / "fast-4.safetensors", tier, "fast", 4, n_ids)).model_state
    trunk = [n for n in ref if n.startswith("trunk.") and n.endswith("weight") and ref[n].dim() > 1]
    assert trunk and not any(torch.equal(other[n], ref[n]) for n in trunk)  # another seed: other weights


def test_variants_are_trained_once_and_differ_only_where_they_should() -> None:
    every = plan_variants(resolve_tables(["all"]))
    assert len(every) == len({v.key for v in every}) == 10
    assert TABLES["t5"].rows[0].variant == TABLES["t6"].rows[0].variant == TABLES["t7"].rows[-1].variant
    assert TABLES["t2t3"].rows[0].variant == TABLES["t7"].rows[0].variant
    tier = get_tier("cpu")
    dicts = {v.key: v.train_config(tier, 1, data=Path("d")).to_dict() for v in every}
    varying = {"arch", "head", "attributes", "stages"}
    base = {k: v for k, v in dicts["fast-head1-all"].items() if k not in varying}
    assert all({k: v for k, v in d.items() if k not in varying} == base for d in dicts.values())
    none = dicts["fast-head1-none"]
    assert [s["lambda1"] for s in none["stages"]] == [0.0, 0.0] and none["attributes"] == list(ATTRIBUTES)
    assert [s["lambda1"] for s in dicts["fast-head1-all"]["stages"]] == [0.0, 0.1]
    assert dicts["fast-head1-nose"]["attributes"] == ["Big_Nose", "Pointy_Nose"]


@pytest.mark.parametrize("name", list(TIERS))
def test_every_tier_builds_valid_configs(name: str, tmp_path: Path) -> None:
    tier = TIERS[name]
    synth = tier.synth_config(tmp_path, 0)
    assert synth.probe_identities >= 20 and synth.size == tier.image_size
    for v in plan_variants(resolve_tables(["all"])):
        cfg = v.train_config(tier, 0, data=tmp_path)
        assert cfg.total_steps == tier.stage1_iterations + tier.stage2_iterations
        assert cfg.model_config(100).input_size == tier.input_size and cfg.resolved_batch_size == tier.batch_size
    teacher = tier.teacher_config(tmp_path / "celeba", tmp_path / "teacher", 0)
    assert teacher.method == tier.teacher_method and teacher.train_config().total_steps == tier.teacher_iterations
    assert tier.to_dict()["name"] == name
    assert TIERS["gpu"].input_size == (112, 96) and TIERS["gpu"].width == 1.0


def test_rank1_by_identity_equals_the_reference_brute_force(brute_force: Any) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    ids = np.repeat([f"p{i}" for i in range(6)], 4)
    xq = (centres[np.arange(24) // 4] + rng.normal(scale=0.9, size=(24, 16))).astype(np.float32)
    xb = rng.normal(size=(300, 16)).astype(np.float32)
    xb[7] = xq[1]  # a distractor identical to probe 0's mate 1: an exact tie, which goes to the mate
    xb[8] = xq[3]  # identical to a probe: it outscores all that probe's mates
    names, mates, hits = rank1_by_identity(xq, ids, xb, chunk=64)
    hist, *_ = brute_force(xq, ids, xb)
    assert names == sorted(set(ids)) and mates.tolist() == [12] * 6
    assert int(hits.sum()) == int(hist[0]) and 0 < hits.sum() < mates.sum()


def test_attribute_counts_match_balanced_accuracy() -> None:
    rng = np.random.default_rng(1)
    prob = rng.uniform(size=(40, 3))
    truth = (rng.uniform(size=(40, 3)) < 0.3).astype(float)
    truth[5, 1], prob[6, 2] = np.nan, np.nan
    ids = [f"p{i % 7}" for i in range(40)]
    names, counts = attribute_counts(prob, truth, ids)
    acc, bal = attribute_rates(counts)
    for j in range(3):
        ok = np.isfinite(prob[:, j]) & np.isfinite(truth[:, j])
        pred = (prob[ok, j] >= 0.5).astype(float)
        assert bal[j] == pytest.approx(balanced_accuracy(pred[:, None], truth[ok, j][:, None])[0])
        assert acc[j] == pytest.approx((pred == truth[ok, j]).mean())
    assert len(names) == 7


def test_paired_differences_are_exact_for_a_shift_and_zero_for_the_same_runs() -> None:
    rng = np.random.default_rng(2)
    mates = rng.integers(2, 20, size=30)
    hits = np.minimum(mates, rng.integers(0, 20, size=(3, 30)))
    same = paired_ratio_difference(hits, hits, mates, resamples=300)
    assert same["estimate"] == 0 and same["lo"] == same["hi"] == 0
    more = paired_ratio_difference(hits + 1, hits, mates, resamples=300)  # one more hit per identity
    assert more["estimate"] == pytest.approx(30 / mates.sum())
    assert more["lo"] <= more["estimate"] <= more["hi"] and more["lo"] > 0
    counts = rng.integers(0, 5, size=(2, 10, 3, 4))
    d = paired_attribute_difference(counts, counts[0], resamples=100)
    assert d["accuracy"]["estimate"][0] == pytest.approx(
        float(attribute_rates(counts)[0][:, 0].mean() - attribute_rates(counts[0])[0][0])
    )


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    missing = _ablate(tmp_path / "D", "t7", "--data", str(tmp_path / "nope.csv"), "--tier", "smoke")
    assert missing.exit_code == 1 and "no such list CSV" in missing.output and "synth" in missing.output
    table = _ablate(tmp_path / "D", "t9", "--tier", "smoke")
    assert table.exit_code == 2 and "t9" in table.output and "t2t3" in table.output
    tier = _ablate(tmp_path / "D", "t7", "--tier", "huge")
    assert tier.exit_code == 2 and "huge" in tier.output and "smoke" in tier.output
    only = _ablate(tmp_path / "D", "t5", "--tier", "smoke", "--only", "fast-head2-all")
    assert only.exit_code == 1 and "fast-head2-all" in only.output and "full-head1-all" in only.output
    with pytest.raises(ValueError, match="valid"):
        resolve_tables(["t1"])
    with pytest.raises(ValueError, match="unknown tier"):
        get_tier("huge")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an ablation folder"):
        check_out(AblateConfig(out=tmp_path / "busy", tables=("t7",), tier="smoke"), resume=True)
    with pytest.raises(ValueError, match="not a variant key"):
        Variant.from_key("fast-all")
