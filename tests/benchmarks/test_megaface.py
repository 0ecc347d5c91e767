"""The exact MegaFace counting against a brute-force reference: every score materialised, plain sorting."""

from __future__ import annotations

import numpy as np
import pytest

from facesearch.benchmarks.megaface import Evaluation, ProbeSet
from facesearch.benchmarks.megaface_counts import ThresholdGuessMissed
from facesearch.benchmarks.megaface_exact import canonical_normalize, floor_m
from facesearch.indexer.screen import int8_products_exact

#: The harness's screens to test: float32 everywhere, int8 where this CPU's int8 sums are exact.
SCREENS = ["none", pytest.param("int8", marks=pytest.mark.skipif(not int8_products_exact(), reason="no exact int8"))]


def evaluate(xq, ids, xb, codes_q=None, codes_b=None, tile_rows=37, keep_cap=1 << 25, far_max=1e-3, tie_rule="mate",
             screen="none", guess=True, block=50):  # fmt: skip
    """The harness as ``facesearch bench megaface`` runs it: streamed in blocks, again without the guessed threshold
    when it missed."""
    for g in (True, False) if guess else (False,):
        ev = Evaluation(ProbeSet(xq, ids, codes_q), len(xb), far_max=far_max, keep_cap=keep_cap, tile_rows=tile_rows,
                        screen=screen, guess=g)  # fmt: skip
        for s in range(0, len(xb), block):  # blocks of 50 rows, tiles of tile_rows: boundaries everywhere
            ev.add(xb[s : s + block], None if codes_b is None else codes_b[s : s + block])
        try:
            out = ev.finish(lambda idx: xb[idx], tie_rule=tie_rule)
        except ThresholdGuessMissed:
            continue
        out["evaluation"] = ev
        return out
    raise AssertionError("the run without a guess cannot miss")


def check(out, ref, nb):
    """The evaluation's counts equal the reference's."""
    hist, excluded, ties, tar = ref
    got = np.zeros(nb + 1, np.int64)
    got[out["rank_values"]] = out["rank_counts"]
    assert got.tolist() == hist.tolist()
    assert out["excluded"] == excluded
    assert out["ties_total"] == ties
    assert out["hits"][-1] == out["N"] - excluded
    for row in out["roc"]["points"]:
        assert row["tar_count"] == tar[row["far"]], row


def random_set(rng, nq_ids=6, per=5, nb=300, d=16):
    ids = np.repeat([f"id{i}" for i in range(nq_ids)], per)
    centres = rng.normal(size=(nq_ids, d))
    xq = (np.repeat(centres, per, 0) + 0.9 * rng.normal(size=(nq_ids * per, d))).astype(np.float32)
    xb = rng.normal(size=(nb, d)).astype(np.float32)
    return xq, ids, xb


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_features_equal_brute_force(seed, brute_force):
    rng = np.random.default_rng(seed)
    xq, ids, xb = random_set(rng)
    out = evaluate(xq, ids, xb)
    check(out, brute_force(xq, ids, xb), len(xb))
    assert out["N"] == 6 * 5 * 4


def test_tied_and_zero_vectors_equal_brute_force(brute_force):
    rng = np.random.default_rng(3)
    xq, ids, xb = random_set(rng, nb=200)
    xq[3] = 0  # a zero probe: every distractor ties with its mates' score 0 ... and mates score 0 against it
    xb[:40] = xq[rng.integers(0, len(xq), 40)]  # distractors identical to probes: exact ties with mates
    xb[40:50] = 0  # zero distractors
    xb[50:60] = xb[60:70]  # duplicated distractors
    xq[7] = xq[8]  # two identical probes of the same identity
    for rule in ("mate", "distractor"):
        out = evaluate(xq, ids, xb, tie_rule=rule)
        ref = brute_force(xq, ids, xb, tie_rule=rule)
        check(out, ref, len(xb))
        assert out["ties_total"] > 0


def test_quantised_features_with_many_ties(brute_force):
    rng = np.random.default_rng(4)
    xq = rng.integers(-1, 2, size=(24, 8)).astype(np.float32)
    ids = np.repeat(["a", "b", "c", "d"], 6)
    xb = rng.integers(-1, 2, size=(400, 8)).astype(np.float32)
    check(evaluate(xq, ids, xb), brute_force(xq, ids, xb), len(xb))


@pytest.mark.parametrize("screen", SCREENS)
def test_streamed_top_negatives_with_pruning(brute_force, screen):
    """Keep only the negatives FAR <= far_max needs (pruned while streaming): the TAR counts stay exact."""
    rng = np.random.default_rng(5)
    xq, ids, xb = random_set(rng, nq_ids=10, per=4, nb=3000, d=12)
    out = evaluate(xq, ids, xb, keep_cap=100, far_max=0.05, tile_rows=256, screen=screen)
    ref = brute_force(xq, ids, xb)
    check(out, ref, len(xb))
    assert out["roc"]["kept_negatives"] < 40 * 3000 // 2
    assert max(r["far"] for r in out["roc"]["points"] if r["far"] < 1) <= 0.05


def hard(codes: np.ndarray, bits: int = 2) -> np.ndarray:
    """Hard filter codes from decided bit patterns: every attribute is decided, positive or negative."""
    codes = np.asarray(codes, np.int64)
    return codes | ((~codes & ((1 << bits) - 1)) << 32)


def encode(states: np.ndarray) -> np.ndarray:
    """(n, k) states (+1 positive, -1 negative, 0 undecided) -> codes: positive bits low, negative bits high."""
    weights = 1 << np.arange(states.shape[1], dtype=np.int64)
    return ((states > 0) @ weights) | (((states < 0) @ weights) << 32)


def test_attribute_filter_equal_brute_force(brute_force):
    rng = np.random.default_rng(6)
    xq, ids, xb = random_set(rng, nb=250)
    codes_q = rng.integers(0, 3, len(xq))
    codes_b = rng.integers(0, 3, len(xb))
    out = evaluate(xq, ids, xb, hard(codes_q), hard(codes_b))
    check(out, brute_force(xq, ids, xb, codes_q, codes_b), len(xb))
    assert out["excluded"] > 0
    assert out["compared"] < len(xq) * len(xb)


def test_confident_filter_equal_brute_force(brute_force):
    """Undecided attributes never exclude; only a confident positive against a confident negative does."""
    rng = np.random.default_rng(16)
    xq, ids, xb = random_set(rng, nb=250)
    sq = rng.choice([-1, 0, 1], size=(len(xq), 3), p=[0.3, 0.4, 0.3])
    sb = rng.choice([-1, 0, 1], size=(len(xb), 3), p=[0.3, 0.4, 0.3])
    out = evaluate(xq, ids, xb, encode(sq), encode(sb))
    check(out, brute_force(xq, ids, xb, sq, sb), len(xb))
    assert 0 < out["excluded"] and out["compared"] < len(xq) * len(xb)
    hard_out = evaluate(xq, ids, xb, encode(np.where(sq >= 0, 1, -1)), encode(np.where(sb >= 0, 1, -1)))
    assert out["compared"] > hard_out["compared"]  # undecided rows are kept


def test_curve_invariants_and_counts():
    rng = np.random.default_rng(7)
    xq, ids, xb = random_set(rng)
    out = evaluate(xq, ids, xb)
    hits = np.asarray(out["hits"])
    assert (np.diff(hits) >= 0).all() and hits[-1] == out["N"]
    tars = [r["tar_count"] for r in out["roc"]["points"]]
    assert tars == sorted(tars)
    assert out["roc"]["N_pos"] * 2 == out["N"]


def test_floor_m_is_exact():
    assert floor_m(1e-6, 3_530_000_000) == 3530
    assert floor_m(1e-3, 3_530_000) == 3530
    assert floor_m(0.1, 30) == 3


def test_bad_input_is_named():
    xq = np.ones((4, 3), np.float32)
    xq[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"probes.*NaN"):
        ProbeSet(xq, ["a"] * 4)
    ev = Evaluation(ProbeSet(np.ones((4, 3), np.float32), ["a"] * 4), 5)
    with pytest.raises(ValueError, match=r"expected \(n, 3\)"):
        ev.add(np.ones((5, 4), np.float32))
    with pytest.raises(ValueError, match="announced"):
        ev.finish(lambda i: np.zeros((len(i), 3)))


@pytest.mark.parametrize("screen", SCREENS)
def test_near_ties_below_float32_resolution_are_resolved_exactly(brute_force, screen):
    """Distractors within ~1e-7 of a mate (closer than the float32 screen can tell apart) are re-scored canonically;
    the TAR threshold near positives is resolved from re-fetched distractors."""
    rng = np.random.default_rng(8)
    xq, ids, xb = random_set(rng, nb=300, d=32)
    src = rng.integers(0, len(xq), 150)
    xb[:150] = xq[src] * (1 + rng.normal(scale=2e-7, size=(150, 32))).astype(np.float32)
    out = evaluate(xq, ids, xb, keep_cap=500, far_max=0.2, tile_rows=64, screen=screen)
    check(out, brute_force(xq, ids, xb), len(xb))
    assert any(r["threshold_exact"] and r["threshold"] is not None for r in out["roc"]["points"])


def test_extreme_magnitudes_and_nan_distractors(brute_force):
    """Rows whose float32 norm would overflow or underflow are normalised in float64, not zeroed; NaN is named."""
    rng = np.random.default_rng(9)
    xq, ids, xb = random_set(rng, nb=120)
    xb[5] *= np.float32(1e30)
    xb[9] *= np.float32(1e-25)
    xq[2] *= np.float32(1e-25)
    check(evaluate(xq, ids, xb), brute_force(xq, ids, xb), len(xb))
    xb[77, 3] = np.nan
    with pytest.raises(ValueError, match=r"distractors: 1 feature row\(s\) contain NaN/inf \(first: distractor 77 "):
        evaluate(xq, ids, xb)


def _rounding_split_ties(seed: int, d: int = 64, n_ids: int = 4, per: int = 5, nb: int = 300):
    """Clustered features on a 1/8 grid; each distractor is a mate of some probe p with coordinates swapped where p's
    own values are equal, so cos(p, distractor) = cos(p, mate) exactly while float64 rounding splits many of them."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(-6, 7, size=(n_ids, d))
    xq = ((np.repeat(centres, per, 0) + rng.integers(-2, 3, size=(n_ids * per, d))) / 8).astype(np.float32)
    ids = np.repeat([f"id{i}" for i in range(n_ids)], per)
    xb = np.empty((nb, d), np.float32)
    for n in range(nb):
        p = int(rng.integers(len(xq)))
        v = xq[rng.choice([g for g in range(len(xq)) if ids[g] == ids[p] and g != p])].copy()
        for _ in range(3):
            i = int(rng.integers(d))
            js = np.flatnonzero((xq[p] == xq[p, i]) & (v != v[i]))
            if len(js):
                j = int(rng.choice(js))
                v[i], v[j] = v[j], v[i]
        xb[n] = v
    return xq, ids, xb


@pytest.mark.parametrize("screen", SCREENS)
@pytest.mark.parametrize("seed", [0, 1])
def test_mathematical_ties_are_not_split_by_rounding(seed, brute_force, screen):
    """cos(p, d) == cos(p, g) exactly for different vectors d, g: a tie (counted, going to the mate), not a rank lost
    or won by 1e-17 of float64 rounding; the TAR threshold among such ties is exact too."""
    xq, ids, xb = _rounding_split_ties(seed)
    q, b = canonical_normalize(xq), canonical_normalize(xb)
    split = 0  # distractor-mate pairs within 1e-12 whose canonical scores differ
    for p in range(len(q)):
        s_b = np.sum(q[p] * b, axis=1)
        for g in (g for g in range(len(q)) if ids[g] == ids[p] and g != p):
            s = np.sum(q[p] * q[g])
            split += int(((np.abs(s_b - s) < 1e-12) & (s_b != s)).sum())
    assert split > 10, "the case must contain ties that float64 rounding splits"
    for rule in ("mate", "distractor"):
        for keep_cap, far_max in ((1 << 25, 1e-3), (300, 0.05)):
            out = evaluate(xq, ids, xb, keep_cap=keep_cap, far_max=far_max, tie_rule=rule, screen=screen)
            check(out, brute_force(xq, ids, xb, tie_rule=rule), len(xb))
            assert out["ties_total"] > 0


def test_filtered_roc_never_accepts_more_than_was_compared():
    """A filtered-out comparison is a rejection: at FAR = 1 the false accepts are the comparisons made, not N_neg."""
    rng = np.random.default_rng(10)
    xq, ids, xb = random_set(rng, nb=200)
    codes_q, codes_b = rng.integers(0, 3, len(xq)), rng.integers(0, 3, len(xb))
    out = evaluate(xq, ids, xb, hard(codes_q), hard(codes_b))
    roc = out["roc"]
    assert out["compared"] < roc["N_neg"]
    for row in roc["points"]:
        if row["false_accepts"] is not None:
            assert row["false_accepts"] <= out["compared"], row
    last = roc["points"][-1]
    assert last["far"] == 1.0 and last["false_accepts"] == out["compared"]


def test_rows_below_one_over_n_neg_are_marked_unsupported():
    rng = np.random.default_rng(11)
    xq, ids, xb = random_set(rng, nb=100)  # N_neg = 3000: 1e-4 and below are not measurable
    points = evaluate(xq, ids, xb)["roc"]["points"]
    flags = {r["far"]: r["supported"] for r in points}
    assert flags[0.0] and flags[1e-3] and flags[1.0]
    assert not flags[1e-6] and not flags[1e-5] and not flags[1e-4]


def test_descending_order_is_the_stable_argsort() -> None:
    from facesearch.benchmarks.megaface_counts import _descending

    rng = np.random.default_rng(5)
    v = rng.standard_normal(10_000).astype(np.float32)
    v[::7] = v[1::7][: len(v[::7])]  # ties
    v[::101], v[1::101] = 0.0, -0.0  # signed zeros are one score
    v[:4] = [np.float32(3.4e38), np.float32(-3.4e38), np.float32(1e-45), np.float32(-1e-45)]  # extremes, subnormals
    assert np.array_equal(_descending(v), np.argsort(-v, kind="stable"))
    assert np.array_equal(_descending(v.astype(np.float64)), np.argsort(-v, kind="stable"))  # other dtypes: argsort
    assert _descending(np.zeros(0, np.float32)).tolist() == []
