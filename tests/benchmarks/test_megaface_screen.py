"""The MegaFace harness's int8 screen: the entries it selects are the float32 screen's, its bound holds on hard rows,
and the guessed negatives' threshold is either proven or the run repeated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from facesearch.benchmarks.megaface import Evaluation, ProbeSet, _select, resolve_screen
from facesearch.benchmarks.megaface_counts import ThresholdGuessMissed
from facesearch.benchmarks.megaface_exact import canonical_normalize
from facesearch.benchmarks.megaface_run import BenchConfig
from facesearch.benchmarks.megaface_screen import Int8Screen, Scratch, _group_rows
from facesearch.indexer.screen import auto_screen, int8_products_exact, query_terms, screen_bound

from .test_megaface import check, evaluate, hard, random_set

pytestmark = pytest.mark.skipif(not int8_products_exact(), reason="int8 sums are not exact on this CPU")


def unit32(x: np.ndarray) -> torch.Tensor:
    """Rows normalised as the harness does (float64, zero rows stay zero), in float32."""
    return torch.from_numpy(canonical_normalize(x).astype(np.float32))


def hard_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Rows that stress a shared int8 scale: one-hot, one spike over noise, constant, zero, tiny, and plain noise."""
    x = rng.normal(size=(n, d))
    x[0] = 0
    x[1, :] = 0
    x[1, 3] = 1
    x[2] = rng.normal(scale=1e-3, size=d)
    x[2, 5] = 1  # a spike: its group's scale is its own, the others' precision is lost
    x[3] = 1.0
    x[4] *= 1e-30
    x[5] = -x[6]
    return x.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_holds_for_every_pair(seed):
    """|int8 score - float32 score| <= the (probe, group) bound, for every pair, hard rows included."""
    rng = np.random.default_rng(seed)
    p32 = unit32(hard_rows(rng, 40, 96))
    d32 = unit32(hard_rows(rng, 300, 96))
    screen = Int8Screen(p32)
    order, low, bounds = _group_rows(d32, Scratch(torch.device("cpu")))
    assert low.scale is not None and screen.low.scale is not None
    size = len(low.values) // len(low.scale)  # rows per group (the last padded with zero rows)
    row_scale = torch.repeat_interleave(low.scale.double(), size)
    assert (low.values[len(d32) :] == 0).all()
    real = (screen.low.values.double() * screen.low.scale.double()[:, None]) @ (
        low.values[: len(d32)].double() * row_scale[: len(d32), None]
    ).T
    exact32 = p32 @ d32[order].T  # the float32 product the screen stands for
    dq, nq_s, nq32 = query_terms(p32, screen.low)
    E = screen_bound((dq[:, None], nq_s[:, None], nq32[:, None]), bounds, 96)
    E_pair = torch.repeat_interleave(E, size, dim=1)[:, : len(d32)]
    err = (real - exact32.double()).abs()
    assert (err <= E_pair.double()).all()
    assert float(E.max()) < 0.2  # and it is a useful bound, not a vacuous one


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_selects_exactly_the_float32_entries(seed):
    """The same (row, column) entries as the float32 screen at every threshold, with float32 scores."""
    rng = np.random.default_rng(seed)
    xq, _, xb = random_set(rng, nq_ids=8, per=5, nb=700, d=64)
    xb[:20] = hard_rows(rng, 20, 64)
    xb[20:40] = xq[:20]  # exact duplicates of probes: scores of 1
    p32, d32 = unit32(xq), unit32(xb)
    screen = Int8Screen(p32)
    S = p32 @ d32.T
    rows_sets: list[np.ndarray | None] = [None, np.sort(rng.choice(len(xq), 17, replace=False))]
    for rows in rows_sets:
        for t in (np.full(len(xq), -3.0), np.full(len(xq), 2.0), rng.uniform(-0.1, 0.6, len(xq)),
                  np.quantile(S.numpy(), 0.9, axis=1)):  # fmt: skip
            t_all = torch.from_numpy(t.astype(np.float32))
            t_row = t_all if rows is None else t_all[torch.from_numpy(rows)]
            S_rows = S if rows is None else S[torch.from_numpy(rows)]
            v_ref, r_ref, c_ref = _select(S_rows, t_row)
            v, r, c = screen.select(rows, d32, t_row)
            assert sorted(zip(r.tolist(), c.tolist(), strict=True)) == sorted(zip(r_ref.tolist(), c_ref.tolist(),
                                                                                 strict=True))  # fmt: skip
            got = dict(zip(zip(r.tolist(), c.tolist(), strict=True), v.tolist(), strict=True))
            for rr, cc, vv in zip(r_ref.tolist(), c_ref.tolist(), v_ref.tolist(), strict=True):
                assert abs(got[(rr, cc)] - vv) <= 1e-5
    assert screen.seconds["products_s"] > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_runs_equal_brute_force_with_filters(seed, brute_force):
    """Whole runs through the int8 screen (pruned negatives, attribute filters, tiles of several sizes) count exactly
    what the brute-force reference counts, and the int8 screen did the products."""
    rng = np.random.default_rng(20 + seed)
    xq, ids, xb = random_set(rng, nq_ids=8, per=4, nb=1600, d=40)
    xb[::97] = xq[rng.integers(0, len(xq), len(xb[::97]))]  # exact ties with mates
    for tile_rows in (64, 301):
        out = evaluate(xq, ids, xb, keep_cap=200, far_max=0.02, tile_rows=tile_rows, screen="int8", block=400)
        check(out, brute_force(xq, ids, xb), len(xb))
        assert out["screen"] == "int8" and out["evaluation"].int8.seconds["products_s"] > 0
    codes_q, codes_b = rng.integers(0, 3, len(xq)), rng.integers(0, 3, len(xb))
    out = evaluate(xq, ids, xb, hard(codes_q), hard(codes_b), keep_cap=200, far_max=0.02, tile_rows=128,
                   screen="int8", block=400)  # fmt: skip
    check(out, brute_force(xq, ids, xb, codes_q, codes_b), len(xb))


def test_a_missed_guess_is_detected_and_the_rerun_is_exact(brute_force):
    """A first block of distractors far closer to the probes than the rest makes the guessed threshold too high:
    finish refuses to count from it, and the run without the guess is exact."""
    rng = np.random.default_rng(30)
    xq, ids, xb = random_set(rng, nq_ids=6, per=5, nb=1200, d=24)
    xb[:300] = np.repeat(xq, 10, axis=0) + 0.3 * rng.normal(size=(300, 24)).astype(np.float32)
    ev = Evaluation(ProbeSet(xq, ids), len(xb), far_max=0.05, keep_cap=100, tile_rows=300, screen="int8")
    for s in range(0, len(xb), 300):
        ev.add(xb[s : s + 300])
    assert ev.guess > ev.thr
    with pytest.raises(ThresholdGuessMissed, match="too high"):
        ev.finish(lambda idx: xb[idx])
    out = evaluate(xq, ids, xb, keep_cap=100, far_max=0.05, tile_rows=300, screen="int8", block=300)
    check(out, brute_force(xq, ids, xb), len(xb))
    assert out["threshold_guess"] is None


@pytest.mark.parametrize("screen", ["none", "int8"])
def test_a_held_guess_counts_the_same_as_no_guess(screen):
    rng = np.random.default_rng(31)
    xq, ids, xb = random_set(rng, nq_ids=6, per=5, nb=3000, d=24)
    a = evaluate(xq, ids, xb, keep_cap=100, far_max=0.01, tile_rows=500, screen=screen, block=500)
    b = evaluate(xq, ids, xb, keep_cap=100, far_max=0.01, tile_rows=500, screen=screen, block=500, guess=False)
    assert a["threshold_guess"] is not None and b["threshold_guess"] is None
    assert a["roc"]["kept_negatives"] <= b["roc"]["kept_negatives"]
    assert a["rank_counts"] == b["rank_counts"] and a["rank_values"] == b["rank_values"]
    assert [r["tar_count"] for r in a["roc"]["points"]] == [r["tar_count"] for r in b["roc"]["points"]]


def test_screen_choice_and_bad_names():
    cpu = torch.device("cpu")
    assert resolve_screen("auto", cpu, 1024) == ("int8" if auto_screen(cpu) == "int8" else "none")
    assert resolve_screen("none", torch.device("cpu"), 1024) == "none"
    with pytest.raises(ValueError, match="screens with one of auto, none, int8"):
        resolve_screen("bf16", torch.device("cpu"), 1024)
    with pytest.raises(ValueError, match="int32"):
        resolve_screen("int8", torch.device("cpu"), 200_000)
    with pytest.raises(ValueError, match="screen must be one of"):
        BenchConfig(out=Path("x"), probes=Path("p"), distractors=Path("d"), screen="fp8")
