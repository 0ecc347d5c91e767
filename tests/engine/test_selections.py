"""Recent filters' selections: kept by recency within their bounds, shared read-only, the same rows as evaluating."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from facesearch.engine.filters import parse_filter
from facesearch.engine.selections import Selection, Selections


@pytest.fixture()
def columns() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 10_000
    return {"id": np.arange(n, dtype=np.int64), "Male": rng.random(n).astype(np.float32),
            "Chubby": rng.random(n).astype(np.float32)}  # fmt: skip


def f(text: str, columns: dict[str, np.ndarray]):
    return parse_filter(text, columns, numeric=("id", "Male", "Chubby"))


def test_a_kept_selection_is_the_evaluated_one_and_shared(columns):
    sel = Selections(columns)
    flt = f("Male > 0.3 and Chubby < 0.9", columns)
    first = sel.get(flt)
    assert first.passing == int(flt.mask(columns).sum())
    assert np.array_equal(first.mask, flt.mask(columns))
    assert np.array_equal(first.rows, np.flatnonzero(flt.mask(columns)))
    assert sel.get(f("Male > 0.3 and Chubby < 0.9", columns)) is first  # equal filters share it
    with pytest.raises(ValueError):
        first.mask[0] = not first.mask[0]  # read-only: a query cannot change another's rows
    with pytest.raises(ValueError):
        first.rows[0] = 1


def test_least_recent_go_first_within_count_and_bytes(columns):
    sel = Selections(columns, max_entries=2)
    a, b, c = (f(t, columns) for t in ("Male > 0.1", "Male > 0.2", "Male > 0.3"))
    sa = sel.get(a)
    sel.get(b)
    assert sel.get(a) is sa  # a is now the most recent
    sel.get(c)
    assert len(sel) == 2 and sel.get(a) is sa  # b went
    small = Selections(columns, max_bytes=100_000)  # a mask (10 kB) and its rows (~70 kB): one entry
    small.get(a)
    got = small.get(b)
    assert len(small) == 1 and small.get(b) is got and small.nbytes <= 100_000
    tiny = Selections(columns, max_bytes=50_000)  # too big to keep: evaluated, answered, not kept
    assert np.array_equal(tiny.get(a).rows, np.flatnonzero(a.mask(columns))) and len(tiny) == 0


def test_given_masks_and_threads(columns):
    mask = columns["Male"] > 0.5
    s = Selection.of(mask)
    assert s.passing == int(mask.sum()) and np.array_equal(s.rows, np.flatnonzero(mask))
    sel = Selections(columns)
    flts = [f(f"Male > {t}", columns) for t in (0.1, 0.2, 0.3, 0.4)]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(50):
                for flt in flts:
                    assert np.array_equal(sel.get(flt).rows, np.flatnonzero(flt.mask(columns)))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(sel) == 4
