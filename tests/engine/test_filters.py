"""Filter expressions: the documented examples, NaN/None semantics, errors, and ~200 random filters against a
row-by-row plain-Python evaluation."""

from __future__ import annotations

import math
import operator
import random

import numpy as np
import pytest

from facesearch.engine.filters import Filter, FilterError, parse_filter, selectivity

ATTRS = ["Male", "Big_Nose", "Chubby"]
NUMERIC = [*ATTRS, "id"]
NAMES = [*NUMERIC, "identity", "path"]
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}


def make_columns(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Attributes on a 0.1 grid (so == and `in` hit) with ~15% NaN; identity with ~20% None."""
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {}
    for name in ATTRS:
        x = np.round(rng.random(n), 1)
        x[rng.random(n) < 0.15] = np.nan
        cols[name] = x
    cols["id"] = np.arange(n, dtype=np.int64)
    cols["identity"] = np.array([[None, "a", "b", "c", "d"][i] for i in rng.integers(0, 5, n)], dtype=object)
    cols["path"] = np.array([f"img/{i:03d}.jpg" for i in range(n)], dtype=object)
    return cols


@pytest.fixture(scope="module")
def cols() -> dict[str, np.ndarray]:
    return make_columns(8)


def mask(text: str, columns: dict[str, np.ndarray], **kw: float) -> list[bool]:
    return parse_filter(text, NAMES, NUMERIC, **kw).mask(columns).tolist()


# Hand-made columns where each example's answer can be read off.
HAND = {
    "Male": np.array([0.9, 0.9, 0.1, np.nan, 0.6]),
    "Big_Nose": np.array([0.8, 0.2, 0.9, 0.9, np.nan]),
    "Chubby": np.array([0.1, 0.7, np.nan, 0.2, 0.9]),
    "id": np.array([1, 5, 10, 11, 20], dtype=np.int64),
    "identity": np.array(["a", "b", None, "x", "c"], dtype=object),
    "path": np.array(["p0", "p1", "p2", "p3", None], dtype=object),
}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Male > 0.5 and Big_Nose > 0.5", [1, 0, 0, 0, 0]),
        ("Male and Big_Nose", [1, 0, 0, 0, 0]),
        ("not Chubby", [1, 0, 1, 1, 0]),  # NaN Chubby is not chubby, so `not Chubby` holds
        ('identity != "x"', [1, 1, 1, 0, 1]),  # None != "x"
        ('identity == "x"', [0, 0, 0, 1, 0]),
        ('identity in ("a", "b")', [1, 1, 0, 0, 0]),
        ("identity not in ('a',)", [0, 1, 1, 1, 1]),
        ("(Male or Chubby) and not (id >= 10)", [1, 1, 0, 0, 0]),
        ("Male != 0.9", [0, 0, 1, 0, 1]),  # NaN != 0.9 is False
        ("Male in (0.1, 0.6)", [0, 0, 1, 0, 1]),
        ("Male not in (0.1,)", [1, 1, 0, 0, 1]),  # NaN not in (...) is False
        ("Male > Chubby", [1, 1, 0, 0, 0]),
        ('identity < "b"', [1, 0, 0, 0, 0]),  # None orders with nothing
        ("(Male > 0.5) == (Chubby > 0.5)", [0, 1, 1, 1, 1]),
        ("Chubby > .5", [0, 1, 0, 0, 1]),
        ("Male >= 6e-1", [1, 1, 0, 0, 1]),
        ("Chubby > -0.2 and Chubby < 1e-3 or id == 1", [1, 0, 0, 0, 0]),
        ("true", [1, 1, 1, 1, 1]),
        ("false or 1 < 2", [1, 1, 1, 1, 1]),
        ("path == 'p1' or path != \"p1\" and id > 10", [0, 1, 0, 1, 1]),
        ("Male and\n  not Chubby\tand\r\n   id   <   11", [1, 0, 0, 0, 0]),
    ],
)
def test_examples(text: str, expected: list[int]) -> None:
    assert mask(text, HAND) == [bool(x) for x in expected]


def test_precedence() -> None:
    cols = make_columns(200, seed=1)
    a, b, c = "Male", "Big_Nose", "Chubby"
    assert mask(f"not {a} and {b}", cols) == mask(f"(not {a}) and {b}", cols)
    assert mask(f"not {a} and {b}", cols) != mask(f"not ({a} and {b})", cols)
    assert mask(f"{a} or {b} and {c}", cols) == mask(f"{a} or ({b} and {c})", cols)
    assert mask(f"{a} or {b} and {c}", cols) != mask(f"({a} or {b}) and {c}", cols)
    assert mask(f"not {a} > 0.3", cols) == mask(f"not ({a} > 0.3)", cols)


def test_threshold_and_float32() -> None:
    cols = {"Male": np.array([0.2, 0.5, 0.8, np.nan], dtype=np.float32)}
    assert parse_filter("Male", ["Male"], ["Male"], threshold=0.1).mask(cols).tolist() == [True, True, True, False]
    assert parse_filter("Male", ["Male"], ["Male"]).mask(cols).tolist() == [False, False, True, False]
    # float32(0.2) > 0.2 in exact arithmetic; comparing in float32 would say False.
    assert parse_filter("Male > 0.2", ["Male"], ["Male"]).mask(cols).tolist() == [True, True, True, False]


def test_strings_and_escapes() -> None:
    cols = {"identity": np.array(['o"b', "it's", "a\\b", None], dtype=object)}
    parse = lambda t: parse_filter(t, ["identity"]).mask(cols).tolist()  # noqa: E731
    assert parse(r'identity == "o\"b"') == [True, False, False, False]
    assert parse(r"identity == 'it\'s'") == [False, True, False, False]
    assert parse(r"identity == 'a\\b'") == [False, False, True, False]
    f = parse_filter(r'identity in ("o\"b", "a\\b")', ["identity"])
    assert parse_filter(str(f), ["identity"]).mask(cols).tolist() == f.mask(cols).tolist() == [True, False, True, False]


def test_filter_object(cols: dict[str, np.ndarray]) -> None:
    f = parse_filter("(Male or Chubby) and not (id >= 10)  and identity!='a'", NAMES, NUMERIC)
    assert isinstance(f, Filter)
    assert f.names == frozenset({"Male", "Chubby", "id", "identity"})
    assert str(f) == '(Male or Chubby) and not id >= 10 and identity != "a"'
    assert f.mask(cols).dtype == np.bool_ and f.mask(cols).shape == (8,)
    assert f == parse_filter(str(f), NAMES, NUMERIC) or str(parse_filter(str(f), NAMES, NUMERIC)) == str(f)
    with pytest.raises(AttributeError):
        f.text = "x"  # type: ignore[misc]
    assert selectivity(f, cols) == pytest.approx(f.mask(cols).mean())
    empty = {k: v[:0] for k, v in cols.items()}
    assert f.mask(empty).shape == (0,) and selectivity(f, empty) == 0.0
    assert parse_filter("true", NAMES, NUMERIC).mask(cols).shape == (8,)


def test_mask_checks_columns(cols: dict[str, np.ndarray]) -> None:
    f = parse_filter("Male and identity == 'a'", NAMES, NUMERIC)
    with pytest.raises(FilterError, match="identity"):
        f.mask({"Male": cols["Male"]})
    with pytest.raises(FilterError, match="length"):
        f.mask({"Male": cols["Male"], "identity": cols["identity"][:3]})


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("Male > ", ["filter 'Male > ' : expected a value at column 8", "^"]),
        ("__import__('os')", ["at column 11"]),
        ("Male.__class__", ["unexpected character '.'", "column 5"]),
        ("Male; x", ["unexpected character ';'", "column 5"]),
        ("Male and (Chubby", ["expected ')'", "column 17"]),
        ("Male < 0.5 < 0.7", ["column 12"]),
        ("identity in 'a'", ["expected '('"]),
        ("identity not 'a'", ["column 10"]),
        ("identity in ()", ["column 14"]),
        ("Male > 1e", ["malformed number"]),
        ("Male > 1e999", ["out of range"]),
        ("identity == 'abc", ["unterminated string", "column 13"]),
        (r"identity == 'a\n'", ["unsupported escape", "column 15"]),
        ('identity == "a\\', ["unterminated string", "column 13"]),
        ("", ["expected a value", "column 1"]),
        ("and", ["expected a value", "column 1"]),
        ("exec('1')", ["column 5"]),
        ("Male > - 0.2", ["unexpected character '-'"]),
        ("Male\n and ?", ["column 11"]),
    ],
)
def test_syntax_errors(text: str, fragments: list[str]) -> None:
    with pytest.raises(FilterError) as err:
        parse_filter(text, NAMES, NUMERIC)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"filter {text!r} : ")
    for fragment in fragments:
        assert fragment in message


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(FilterError, match=r"unknown name 'Smiling'.*valid names: Big_Nose, Chubby, Male, id, identity"):
        parse_filter("Male and Smiling", ["Male", "Big_Nose", "Chubby", "id", "identity"], ["Male"])
    with pytest.raises(FilterError, match="unknown name '__import__'"):
        parse_filter("__import__", NAMES, NUMERIC)  # a name, then nothing to call it with


@pytest.mark.parametrize(
    "text, fragments",
    [
        ('Male == "x"', ["number column 'Male'", 'string "x"']),
        ("identity > 3", ["string column 'identity'", "number 3"]),
        ("id in (1, 'a')", ["number column 'id'", 'string "a"']),
        ("identity in ('a', 2)", ["string column 'identity'", "number 2"]),
        ("identity", ["string column 'identity' is not a condition"]),
        ("Male and 3", ["expected a condition"]),
        ("(Male and Chubby) > 0.5", ["a condition with number 0.5"]),
        ("(Male and Chubby) < true", ["only be compared with == or !="]),
    ],
)
def test_type_errors(text: str, fragments: list[str]) -> None:
    with pytest.raises(FilterError) as err:
        parse_filter(text, NAMES, NUMERIC)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_bad_arguments_and_deep_nesting() -> None:
    with pytest.raises(ValueError, match="numeric"):
        parse_filter("x", ["x"], ["y"])
    with pytest.raises(FilterError, match="nested too deeply"):
        parse_filter("(" * 5000 + "Male" + ")" * 5000, NAMES, NUMERIC)
    assert parse_filter("(" * 50 + "Male" + ")" * 50, NAMES, NUMERIC).names == {"Male"}


# --- random filters against a plain-Python reference --------------------------------------------------------------

PREC = {"or": 1, "and": 2, "not": 3, "cmp": 4, "in": 4}


def random_number(rng: random.Random) -> tuple[float, str]:
    value = round(rng.uniform(-0.2, 1.1), 1)
    spellings = [repr(value), f"{value:.3f}", f"{value * 10:g}e-1", f"{value:e}"]
    if 0 < value < 1:
        spellings.append(repr(value)[1:])  # .5
    return value, rng.choice(spellings)


def random_condition(rng: random.Random, depth: int) -> tuple:
    """A random filter tree; leaves are comparisons, `in`, bare attributes or booleans."""
    if depth > 0 and rng.random() < 0.6:
        op = rng.choice(["and", "or", "not"])
        if op == "not":
            return ("not", random_condition(rng, depth - 1))
        return (op, random_condition(rng, depth - 1), random_condition(rng, depth - 1))
    kind = rng.random()
    if kind < 0.2:
        return ("attr", rng.choice(ATTRS))
    if kind < 0.45:
        lhs = ("col", rng.choice(ATTRS))
        rhs = ("col", rng.choice(ATTRS)) if rng.random() < 0.2 else ("num", *random_number(rng))
        return ("cmp", rng.choice(list(OPS)), *((lhs, rhs) if rng.random() < 0.7 else (rhs, lhs)))
    if kind < 0.55:
        k = rng.randint(0, 40)
        return ("cmp", rng.choice(list(OPS)), ("col", "id"), ("num", k, str(k)))
    if kind < 0.75:
        lit = rng.choice(["a", "b", "c", "zz"])
        return ("cmp", rng.choice(list(OPS)), ("col", "identity"), ("str", lit, rng.choice([f'"{lit}"', f"'{lit}'"])))
    if kind < 0.85:
        values = [("str", s, f'"{s}"') for s in rng.sample(["a", "b", "c", "zz"], rng.randint(1, 3))]
        return ("in", ("col", "identity"), values, rng.random() < 0.5)
    if kind < 0.97:
        return ("in", ("col", rng.choice(ATTRS)), [("num", *random_number(rng)) for _ in range(3)], rng.random() < 0.5)
    return ("bool", rng.random() < 0.5)


def render(rng: random.Random, node: tuple, need: int = 0) -> str:
    """Minimal parentheses by precedence, extra ones at random, and random spaces, tabs and newlines."""
    ws = lambda: rng.choice([" ", " ", "  ", "\n", "\t ", " \n  "])  # noqa: E731
    tight = lambda: rng.choice(["", " ", "\n"])  # noqa: E731
    kind = node[0]
    if kind in ("col", "attr"):
        return node[1]
    if kind in ("num", "str"):
        return node[2]
    if kind == "bool":
        return "true" if node[1] else "false"
    if kind in ("and", "or"):
        text = render(rng, node[1], PREC[kind]) + ws() + kind + ws() + render(rng, node[2], PREC[kind] + 1)
    elif kind == "not":
        text = "not" + ws() + render(rng, node[1], 3)
    elif kind == "cmp":
        text = render(rng, node[2], 5) + tight() + node[1] + tight() + render(rng, node[3], 5)
    else:
        items = ("," + tight()).join(render(rng, v) for v in node[2]) + rng.choice(["", ","])
        text = render(rng, node[1], 5) + ws() + ("not in" if node[3] else "in") + tight() + "(" + items + ")"
    strength = PREC[kind]
    return f"({tight()}{text}{tight()})" if strength < need or rng.random() < 0.15 else text


def reference(node: tuple, row: dict) -> bool:
    """Row-wise truth of a tree: NaN makes every comparison False, None equals nothing."""

    def value(v: tuple) -> object:
        return row[v[1]] if v[0] == "col" else v[1]

    def missing(x: object) -> bool:
        return x is None or (isinstance(x, float) and math.isnan(x))

    kind = node[0]
    if kind == "and":
        return reference(node[1], row) and reference(node[2], row)
    if kind == "or":
        return reference(node[1], row) or reference(node[2], row)
    if kind == "not":
        return not reference(node[1], row)
    if kind == "bool":
        return node[1]
    if kind == "attr":
        return row[node[1]] > 0.5
    if kind == "cmp":
        a, b = value(node[2]), value(node[3])
        if missing(a) or missing(b):
            return node[1] == "!=" and (a is None or b is None)
        return OPS[node[1]](a, b)
    x, values, negated = value(node[1]), [v[1] for v in node[2]], node[3]
    if missing(x):
        return x is None and negated
    return (x in values) != negated


def test_random_filters_match_row_by_row_reference() -> None:
    rng = random.Random(1234)
    cols = make_columns(60, seed=7)
    rows = [{k: v[i].item() if isinstance(v[i], np.generic) else v[i] for k, v in cols.items()} for i in range(60)]
    seen = set()
    for _ in range(200):
        tree = random_condition(rng, depth=rng.randint(0, 4))
        text = render(rng, tree)
        f = parse_filter(text, NAMES, NUMERIC)
        expected = [reference(tree, row) for row in rows]
        assert f.mask(cols).tolist() == expected, text
        again = parse_filter(str(f), NAMES, NUMERIC)
        assert str(again) == str(f) and again.mask(cols).tolist() == expected, (text, str(f))
        seen.add(sum(expected))
    assert len(seen) > 20, "random filters should select many different numbers of rows"
