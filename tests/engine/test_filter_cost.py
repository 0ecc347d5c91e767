"""The predicted cost of attribute filters: planted cases with known error rates, simulated pair by pair."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facesearch.engine.filter_cost import (
    BOUND_Z,
    MIN_CLASS_FACES,
    AttributeStats,
    choose_margins,
    predicted_cost,
    statistics_from_source,
    wilson_upper,
)
from facesearch.indexer.manifest import predictor_source
from facesearch.indexer.synth_features import attribute_statistics
from facesearch.model.predictors.calibration import calibration_report, score_histogram

PRIOR = 0.3


def draw(rng: np.random.Generator, cls: np.ndarray) -> np.ndarray:
    """Calibrated-looking probabilities: Beta(6, 1.5) for positives, Beta(1.5, 6) for negatives."""
    return np.where(cls, rng.beta(6, 1.5, len(cls)), rng.beta(1.5, 6, len(cls)))


@pytest.fixture(scope="module")
def stats() -> AttributeStats:
    rng = np.random.default_rng(0)
    cls = rng.random(400_000) < PRIOR
    h = score_histogram(draw(rng, cls), cls.astype(float))
    return AttributeStats("Male", np.array(h["positive"], float), np.array(h["negative"], float))


def simulate(rng: np.random.Generator, mode: str, value: float, n: int = 400_000) -> tuple[float, float]:
    """(mates lost, distractors removed) measured: a person's two images share the class; two people do not."""
    a, b = rng.random(n) < PRIOR, rng.random(n) < PRIOR

    def sides(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if mode == "hard":
            return p > value, p <= value
        return p > 1 - value, p < value

    p1, p2, p3 = draw(rng, a), draw(rng, a), draw(rng, b)
    (s1, n1), (s2, n2), (s3, n3) = sides(p1), sides(p2), sides(p3)
    return float(((s1 & n2) | (n1 & s2)).mean()), float(((s1 & n3) | (n1 & s3)).mean())


@pytest.mark.parametrize(("mode", "value"), [("hard", 0.5), ("hard", 0.3), ("confident", 0.2), ("confident", 0.05)])
def test_prediction_matches_the_planted_rates(stats: AttributeStats, mode: str, value: float) -> None:
    cost = predicted_cost({"Male": stats}, mode, {"Male": value})
    lost, removed = simulate(np.random.default_rng(1), mode, value)
    assert cost.mates_lost == pytest.approx(lost, abs=0.003)
    assert cost.distractors_removed == pytest.approx(removed, abs=0.004)


def test_chosen_margin_keeps_the_mate_loss_target(stats: AttributeStats) -> None:
    for target in (0.002, 0.01, 0.05):
        m = choose_margins({"Male": stats}, target)["Male"]
        lost, removed = simulate(np.random.default_rng(2), "confident", m)
        assert lost <= target + 0.002 and removed > 0
        wider = m + 1 / stats.bins
        if wider <= 0.5:  # the next grid step would break the budget: the margin is the widest that fits
            assert predicted_cost({"Male": stats}, "confident", {"Male": wider}).mates_lost > target
        mb = choose_margins({"Male": stats}, target, z=BOUND_Z)["Male"]  # the cautious variant: the bound fits
        assert mb <= m and stats.lost_bound("confident", mb) <= target
    m0 = choose_margins({"Male": stats}, 0.0)["Male"]
    assert predicted_cost({"Male": stats}, "confident", {"Male": m0}).mates_lost == 0


def test_budget_is_shared_between_attributes(stats: AttributeStats) -> None:
    two = {"Male": stats, "Chubby": AttributeStats("Chubby", stats.positive, stats.negative)}
    margins = choose_margins(two, 0.02)
    cost = predicted_cost(two, "confident", margins)
    assert cost.mates_lost <= 0.02 and margins["Male"] == margins["Chubby"]
    assert (
        cost.distractors_removed
        > predicted_cost({"Male": stats}, "confident", {"Male": margins["Male"]}).distractors_removed
    )


def test_margins_are_the_best_split_of_the_budget(stats: AttributeStats) -> None:
    """A sharp and a poor attribute: the chosen pair equals the exhaustive search over every pair of grid margins
    (most distractors removed within the budget, up to the budget grid), and the poor one gets the narrower margin."""
    rng = np.random.default_rng(5)
    cls = rng.random(200_000) < 0.5
    poor = np.where(cls, rng.beta(2.5, 1.8, len(cls)), rng.beta(1.8, 2.5, len(cls)))
    h = score_histogram(poor, cls.astype(float))
    two = {"Male": stats, "Chubby": AttributeStats("Chubby", np.array(h["positive"], float),
                                                   np.array(h["negative"], float))}  # fmt: skip
    grid = np.arange(stats.bins // 2 + 1) / stats.bins
    for budget in (0.005, 0.02, 0.1):
        chosen = choose_margins(two, budget)
        cost = predicted_cost(two, "confident", chosen)
        best = max(
            c.distractors_removed
            for a in grid
            for b in grid
            if (c := predicted_cost(two, "confident", {"Male": a, "Chubby": b})).mates_lost <= budget
        )
        assert cost.mates_lost <= budget
        assert cost.distractors_removed == pytest.approx(best, abs=2e-3)
        assert chosen["Chubby"] < chosen["Male"]


def test_few_validation_faces_narrow_the_margin(stats: AttributeStats) -> None:
    """The same distributions seen on 60 positives and 140 negatives instead of 400,000 faces: the estimate is the
    same, the bound wider, the cautious margin narrower; below MIN_CLASS_FACES of a class no margin at all; the
    Wilson bound is the textbook one (p = 0 of n: z^2 / (n + z^2))."""
    few = AttributeStats("Narrow_Eyes", stats.positive * 60 / stats.positive.sum(),
                         stats.negative * 140 / stats.negative.sum())  # fmt: skip
    m_many = choose_margins({"x": stats}, 0.01, z=BOUND_Z)["x"]
    m_few = choose_margins({"x": few}, 0.01, z=BOUND_Z)["x"]
    assert m_few < m_many and choose_margins({"x": few}, 0.01)["x"] == m_many  # the estimate alone: as many faces
    scarce = AttributeStats("x", stats.positive * (MIN_CLASS_FACES - 1) / stats.positive.sum(), stats.negative)
    assert choose_margins({"x": scarce, "Male": stats}, 0.01)["x"] == 0 < choose_margins({"x": stats}, 0.01)["x"]
    assert few.lost_bound("confident", m_many) > stats.lost_bound("confident", m_many)
    assert few.cost("confident", m_many) == pytest.approx(stats.cost("confident", m_many), rel=1e-3)  # same estimate
    z = 1.2816
    assert wilson_upper(0.0, 20, z) == pytest.approx(z * z / (20 + z * z))
    assert wilson_upper(0.3, 1e12, z) == pytest.approx(0.3, abs=1e-5) and wilson_upper(0.3, 50, 0.0) == pytest.approx(
        0.3
    )


def test_synthetic_feature_law() -> None:
    v = attribute_statistics()
    st = statistics_from_source({"source": "synthetic", "fingerprint": "x", "validation": v}, ["Male"])["Male"]
    assert st.prior == pytest.approx(0.4) and st.balanced_accuracy == pytest.approx(0.99379, abs=1e-4)
    assert st.positive.sum() == pytest.approx(40_000, rel=1e-3) and st.negative.sum() == pytest.approx(60_000, rel=1e-3)
    # hard at 0.5 loses a mate when one of two images falls on the wrong side: 2 q (1 - q), q = P(z < -2.5)
    q = 1 - st.balanced_accuracy
    assert predicted_cost({"Male": st}, "hard", {"Male": 0.5}).mates_lost == pytest.approx(2 * q * (1 - q), rel=1e-3)


def test_columns_without_statistics_are_named() -> None:
    with pytest.raises(ValueError, match=r"no validation statistics for \['Male'\].*own attribute head"):
        statistics_from_source({"source": "model", "fingerprint": "f"}, ["Male"])
    with pytest.raises(ValueError, match="both positives and negatives"):
        AttributeStats("Male", np.zeros(10), np.ones(10))


def test_a_predictors_validation_report_travels_into_the_provenance_record() -> None:
    """``calibrate``'s report -> the manifest's ``attribute_source`` -> the filter's statistics, unchanged."""
    rng = np.random.default_rng(3)
    y = (rng.random((500, 2)) < 0.3).astype(float)
    p = np.clip(np.where(y > 0, 0.8, 0.2) + rng.normal(0, 0.15, y.shape), 0, 1)
    report = {"split": "val", "images": 500, "balanced_accuracy": {"Male": 0.9, "Chubby": 0.8},
              **calibration_report(p, y, ["Male", "Chubby"])}  # fmt: skip
    record = predictor_source({"key": "moon", "fingerprint": "f" * 64, "validation": report})
    json.dumps(record)  # JSON-ready, as manifests and index_info.json store it
    st = statistics_from_source(record, ["Chubby"])["Chubby"]
    assert st.balanced_accuracy == 0.8 and st.positive.sum() == (y[:, 1] > 0).sum()
    assert record["validation"]["attributes"]["Male"]["reliability"] and record["validation"]["split"] == "val"


def test_literal_filters_read_as_thresholds(stats: AttributeStats) -> None:
    from facesearch.engine.filter_cost import literal_recall_loss
    from facesearch.engine.filters import parse_filter

    def conds(text: str) -> list[tuple[str, str, float]] | None:
        return parse_filter(text, ["Male", "Chubby", "id", "path"], numeric=["Male", "Chubby", "id"]).thresholds()

    assert conds("Male") == [("Male", ">", 0.5)]
    assert conds("not Male and 0.2 > Chubby") == [("Male", "<=", 0.5), ("Chubby", "<", 0.2)]
    assert conds("not (Male >= 0.9)") == [("Male", "<", 0.9)]
    assert conds("Male or Chubby") is None and conds('path == "x"') is None and conds("Male == 1") is None
    loss, per = literal_recall_loss({"Male": stats}, [("Male", ">", 0.5)])
    assert loss == pytest.approx(stats.sides("hard", 0.5)[1][0])  # positives read at or below 0.5
    assert list(per) == ["Male > 0.5"] and per["Male > 0.5"] == pytest.approx(loss)
