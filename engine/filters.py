"""Filter expressions over a gallery's metadata, for attribute-filtered face search.

A filter is a small boolean language over columns (attribute probabilities, ``id``, ``identity``, ``path``)::

    Male > 0.5 and not Chubby and identity not in ("a", "b")

The text is tokenised and parsed by recursive descent into an AST (user text never reaches ``eval``), names and types
are checked against the gallery's columns once in :func:`parse_filter`, and :meth:`Filter.mask` evaluates the AST with
numpy over whole columns. Semantics: a bare attribute name is ``name > threshold``; any comparison or ``in`` with a NaN
is False; a None string equals nothing (so ``!=`` and ``not in`` are True on it).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Filter", "FilterError", "parse_filter", "selectivity"]


class FilterError(ValueError):
    """A filter that cannot be parsed, bound to its columns, or evaluated."""


_TOKEN = re.compile(
    r"(?P<ws>\s+)|(?P<num>-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"""|(?P<op><=|>=|==|!=|<|>|\(|\)|,)|(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""",
    re.S,
)
_KEYWORDS = frozenset({"and", "or", "not", "in", "true", "false"})
_CMP = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}


def _error(text: str, message: str, pos: int, detail: str = "") -> FilterError:
    """One-line error: the filter, the message, the 1-based column, a caret at the spot, then any detail."""
    flat = re.sub(r"\s", " ", text)
    hint = flat[max(0, pos - 20) : pos] + "^" + flat[pos : pos + 20]
    detail = f"; {detail}" if detail else ""
    return FilterError(f"filter {text!r} : {message} at column {pos + 1} (here: {hint!r}){detail}")


@dataclass(frozen=True)
class _Tok:
    kind: str  # num | name | kw | op | str | end
    value: Any
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    toks, i = [], 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if m is None:
            raise _error(text, "unterminated string" if text[i] in "'\"" else f"unexpected character {text[i]!r}", i)
        kind, word = m.lastgroup or "", m.group()
        if kind == "str":
            for esc in re.finditer(r"\\(.)", word[1:-1], re.S):  # a backslash escapes only a quote or a backslash
                if esc.group(1) not in "'\"\\":
                    raise _error(text, f"unsupported escape {esc.group()!r}", i + 1 + esc.start())
            toks.append(_Tok("str", re.sub(r"\\(.)", r"\1", word[1:-1]), i))
        elif kind == "num":
            if m.end() < len(text) and (text[m.end()].isalnum() or text[m.end()] in "_."):
                raise _error(text, f"malformed number {text[i : m.end() + 1]!r}", i)
            toks.append(_Tok("num", _number(text, word, i), i))
        elif kind != "ws":
            toks.append(_Tok("kw" if word in _KEYWORDS else kind, word, i))
        i = m.end()
    toks.append(_Tok("end", None, len(text)))
    return toks


def _number(text: str, word: str, pos: int) -> int | float:
    if re.fullmatch(r"-?[0-9]+", word) and abs(int(word)) < 2**63:
        return int(word)  # exact against int64 ids
    value = float(word)
    if not math.isfinite(value):
        raise _error(text, f"number {word!r} is out of range", pos)
    return value


# AST. Positions serve error messages only, so they take no part in equality.
@dataclass(frozen=True)
class _Name:
    name: str
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class _Lit:
    value: bool | int | float | str
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class _Truth:
    name: str
    threshold: float


@dataclass(frozen=True)
class _Cmp:
    op: str
    left: _Node
    right: _Node
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class _In:
    operand: _Node
    values: tuple[_Lit, ...]
    negated: bool
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class _Not:
    operand: _Node


@dataclass(frozen=True)
class _BoolOp:
    op: str  # and | or
    operands: tuple[_Node, ...]


_Node = _Name | _Lit | _Truth | _Cmp | _In | _Not | _BoolOp


class _Parser:
    """Recursive descent over the grammar in :func:`parse_filter`'s docstring; syntax only, no names or types."""

    def __init__(self, text: str) -> None:
        self.text, self.toks, self.i = text, _tokenize(text), 0

    def parse(self) -> _Node:
        node = self.bool_op("or")
        if self.toks[self.i].kind != "end":
            raise self.error("expected 'and', 'or' or the end of the filter")
        return node

    def error(self, message: str) -> FilterError:
        return _error(self.text, message, self.toks[self.i].pos)

    def at(self, kind: str, value: str | None = None, ahead: int = 0) -> bool:
        tok = self.toks[min(self.i + ahead, len(self.toks) - 1)]
        return tok.kind == kind and (value is None or tok.value == value)

    def expect(self, value: str, message: str) -> None:
        if not self.at("op", value):
            raise self.error(message)
        self.i += 1

    def bool_op(self, op: str) -> _Node:
        operands = [self.bool_op("and") if op == "or" else self.not_expr()]
        while self.at("kw", op):
            self.i += 1
            operands.append(self.bool_op("and") if op == "or" else self.not_expr())
        return operands[0] if len(operands) == 1 else _BoolOp(op, tuple(operands))

    def not_expr(self) -> _Node:
        if self.at("kw", "not"):
            self.i += 1
            return _Not(self.not_expr())
        return self.comparison()

    def comparison(self) -> _Node:
        left = self.primary()
        tok = self.toks[self.i]
        if tok.kind == "op" and tok.value in _CMP:
            self.i += 1
            return _Cmp(tok.value, left, self.primary(), tok.pos)
        negated = self.at("kw", "not") and self.at("kw", "in", ahead=1)
        if negated or self.at("kw", "in"):
            self.i += 2 if negated else 1
            self.expect("(", "expected '(' after 'in'")
            values = [self.literal()]
            while self.at("op", ","):
                self.i += 1
                if self.at("op", ")"):
                    break  # trailing comma, as in ("a",)
                values.append(self.literal())
            self.expect(")", "expected ',' or ')'")
            return _In(left, tuple(values), negated, tok.pos)
        return left

    def literal(self) -> _Lit:
        tok = self.toks[self.i]
        if tok.kind in ("num", "str") or (tok.kind == "kw" and tok.value in ("true", "false")):
            self.i += 1
            return _Lit(tok.value == "true" if tok.kind == "kw" else tok.value, tok.pos)
        raise self.error("expected a number, a string, true or false")

    def primary(self) -> _Node:
        tok = self.toks[self.i]
        if tok.kind == "name":
            self.i += 1
            return _Name(tok.value, tok.pos)
        if self.at("op", "("):
            self.i += 1
            node = self.bool_op("or")
            self.expect(")", "expected ')'")
            return node
        try:
            return self.literal()
        except FilterError:
            raise self.error("expected a value") from None


def _lit_type(value: object) -> str:
    return "bool" if isinstance(value, bool) else "string" if isinstance(value, str) else "number"


class _Binder:
    """Checks names and types, and turns bare numeric names in condition position into ``name > threshold``."""

    def __init__(self, text: str, names: set[str], numeric: set[str], threshold: float) -> None:
        self.text, self.names, self.numeric, self.threshold = text, names, numeric, threshold
        self.used: set[str] = set()

    def kind(self, node: _Name) -> str:
        if node.name not in self.names:
            valid = ", ".join(sorted(self.names))
            raise _error(self.text, f"unknown name {node.name!r}", node.pos, f"valid names: {valid}")
        self.used.add(node.name)
        return "number" if node.name in self.numeric else "string"

    def describe(self, node: _Node, kind: str) -> str:
        if isinstance(node, _Name):
            return f"{kind} column {node.name!r}"
        return f"{kind} {_render(node)}" if isinstance(node, _Lit) else "a condition"

    def cond(self, node: _Node) -> _Node:
        if isinstance(node, _Name):
            if self.kind(node) != "number":
                raise _error(self.text, f"string column {node.name!r} is not a condition; compare it", node.pos)
            return _Truth(node.name, self.threshold)
        if isinstance(node, _Lit):
            if not isinstance(node.value, bool):
                raise _error(self.text, f"expected a condition, got {_render(node)}", node.pos)
            return node
        if isinstance(node, _Not):
            return _Not(self.cond(node.operand))
        if isinstance(node, _BoolOp):
            return _BoolOp(node.op, tuple(self.cond(x) for x in node.operands))
        if isinstance(node, _Cmp):
            (left, lt), (right, rt) = self.value(node.left), self.value(node.right)
            if lt != rt:
                what = f"{self.describe(node.left, lt)} with {self.describe(node.right, rt)}"
                raise _error(self.text, f"cannot compare {what}", node.pos)
            if lt == "bool" and node.op not in ("==", "!="):
                raise _error(self.text, f"conditions can only be compared with == or !=, not {node.op}", node.pos)
            return _Cmp(node.op, left, right, node.pos)
        assert isinstance(node, _In), f"unexpected node {node!r}"
        operand, kind = self.value(node.operand)
        for lit in node.values:
            if _lit_type(lit.value) != kind:
                what = f"{self.describe(node.operand, kind)} with {self.describe(lit, _lit_type(lit.value))}"
                raise _error(self.text, f"cannot compare {what}", lit.pos)
        return _In(operand, node.values, node.negated, node.pos)

    def value(self, node: _Node) -> tuple[_Node, str]:
        if isinstance(node, _Name):
            return node, self.kind(node)
        if isinstance(node, _Lit):
            return node, _lit_type(node.value)
        return self.cond(node), "bool"


def _render(node: _Node, need: int = 0) -> str:
    """Normalised text; ``need`` is the binding the context requires (or 1, and 2, not 3, compare 4, atom 5)."""
    if isinstance(node, _Name | _Truth):
        return node.name
    if isinstance(node, _Lit):
        v = node.value
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)
    if isinstance(node, _BoolOp):
        strength = 1 if node.op == "or" else 2
        text = f" {node.op} ".join(_render(x, strength + 1) for x in node.operands)
    elif isinstance(node, _Not):
        text, strength = "not " + _render(node.operand, 3), 3
    elif isinstance(node, _Cmp):
        text, strength = f"{_render(node.left, 5)} {node.op} {_render(node.right, 5)}", 4
    else:
        values = ", ".join(_render(v) for v in node.values)
        text, strength = f"{_render(node.operand, 5)} {'not in' if node.negated else 'in'} ({values})", 4
    return f"({text})" if strength < need else text


def _missing(x: np.ndarray) -> np.ndarray:
    """NaN in float columns, None in string columns."""
    if x.dtype.kind == "f":
        return np.isnan(x)
    if x.dtype == object:
        return np.fromiter((v is None for v in x), dtype=bool, count=x.size)
    return np.zeros(x.shape, dtype=bool)


def _compare(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise ``a op b``, False where either side is missing, except that None ``!=`` anything is True."""
    if a.dtype.kind in "biuf" and b.dtype.kind in "biuf":
        # numbers: one vectorised pass (a literal side stays a zero-stride view); NaN already compares False except
        # under !=, where it is masked out
        with np.errstate(invalid="ignore"):
            out = np.asarray(_CMP[op](a, b), dtype=bool)
        return out & ~(_missing(a) | _missing(b)) if op == "!=" else out
    ok = ~(_missing(a) | _missing(b))
    out = np.zeros(ok.shape, dtype=bool)
    out[ok] = _CMP[op](a[ok], b[ok])  # only present values: None < "x" would raise
    if op == "!=" and object in (a.dtype, b.dtype):
        out |= ~ok
    return out


def _values(node: _Node, columns: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    if isinstance(node, _Name):
        col = np.asarray(columns[node.name])
        return col.astype(np.float64, copy=False) if col.dtype.kind == "f" else col  # float32 vs 0.1 compares exactly
    if isinstance(node, _Lit):
        return np.broadcast_to(np.asarray(node.value, dtype=object if isinstance(node.value, str) else None), (n,))
    return _eval(node, columns, n)


def _eval(node: _Node, columns: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """Evaluate a bound condition to an (n,) bool mask."""
    if isinstance(node, _Truth):
        return _values(_Name(node.name), columns, n) > node.threshold  # NaN > t is False
    if isinstance(node, _Lit):
        return np.full(n, bool(node.value))
    if isinstance(node, _Not):
        return ~_eval(node.operand, columns, n)
    if isinstance(node, _BoolOp):
        combine = np.logical_and if node.op == "and" else np.logical_or
        return combine.reduce([_eval(x, columns, n) for x in node.operands])
    if isinstance(node, _Cmp):
        return _compare(node.op, _values(node.left, columns, n), _values(node.right, columns, n))
    assert isinstance(node, _In), f"cannot evaluate {node!r} as a condition"
    a = _values(node.operand, columns, n)
    hit = np.logical_or.reduce([_compare("==", a, _values(v, columns, n)) for v in node.values])
    if not node.negated:
        return hit
    return ~hit if a.dtype == object else ~hit & ~_missing(a)  # None not in (...) is True, NaN not in (...) False


@dataclass(frozen=True)
class Filter:
    """A parsed, validated filter. Build with :func:`parse_filter`; ``str(f)`` is the normalised text."""

    text: str
    _ast: _Node = field(repr=False)
    names: frozenset[str] = frozenset()

    def mask(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Rows that pass: (n,) bool, n the common length of ``columns`` (each (n,))."""
        missing = sorted(self.names - set(columns))
        if missing:
            raise FilterError(f"filter {self.text!r} : columns {missing} are missing; got {sorted(columns)}")
        lengths = {name: len(columns[name]) for name in (self.names or columns)}
        if len(set(lengths.values())) > 1:
            raise FilterError(f"filter {self.text!r} : columns differ in length: {lengths}")
        n = next(iter(lengths.values()), 0)
        return _eval(self._ast, columns, n)

    def __str__(self) -> str:
        return _render(self._ast)

    def thresholds(self) -> list[tuple[str, str, float]] | None:
        """The filter as a conjunction of conditions on single columns, ``[(name, op, threshold), ...]`` with ``op``
        one of ``>``, ``>=``, ``<``, ``<=`` (a bare name is ``name > threshold``, ``not`` flips the side); None
        when it is anything else (``or``, ``in``, equality, string columns): then no cost can be read off it."""
        flip = {">": "<=", ">=": "<", "<": ">=", "<=": ">"}
        mirror = {">": "<", ">=": "<=", "<": ">", "<=": ">="}

        def walk(node: _Node, negated: bool) -> list[tuple[str, str, float]] | None:
            if isinstance(node, _Truth):
                return [(node.name, "<=" if negated else ">", node.threshold)]
            if isinstance(node, _Not):
                return walk(node.operand, not negated)
            if isinstance(node, _BoolOp) and node.op == "and" and not negated:
                parts = [walk(x, False) for x in node.operands]
                return None if any(p is None for p in parts) else [c for p in parts for c in p or []]
            if isinstance(node, _Cmp) and node.op in flip:
                left, right, op = node.left, node.right, node.op
                if isinstance(left, _Lit) and isinstance(right, _Name):
                    left, right, op = right, left, mirror[op]
                if isinstance(left, _Name) and isinstance(right, _Lit) and isinstance(right.value, int | float):
                    if isinstance(right.value, bool):
                        return None
                    return [(left.name, flip[op] if negated else op, float(right.value))]
            return None

        return walk(self._ast, False)


def parse_filter(text: str, valid_names: Iterable[str], numeric: Iterable[str] = (), threshold: float = 0.5) -> Filter:
    """Parse and validate a filter.

    Grammar::

        expr       := and_expr ("or" and_expr)*
        and_expr   := not_expr ("and" not_expr)*
        not_expr   := "not" not_expr | comparison
        comparison := primary (("<" | "<=" | ">" | ">=" | "==" | "!=") primary)?
                    | primary ["not"] "in" "(" literal ("," literal)* [","] ")"
        primary    := NAME | NUMBER | STRING | "true" | "false" | "(" expr ")"

    ``valid_names`` are all columns; ``numeric`` the numeric ones (attributes, ``id``), the rest hold strings or None.
    A bare numeric name used as a condition means ``name > threshold``. Raises :class:`FilterError` (a ``ValueError``)
    on syntax errors (with the column), unknown names (listing the valid ones) and type mismatches.
    """
    names, numeric_set = set(valid_names), set(numeric)
    if not numeric_set <= names:
        raise ValueError(f"numeric names {sorted(numeric_set - names)} are not among valid_names {sorted(names)}")
    try:
        binder = _Binder(text, names, numeric_set, float(threshold))
        ast = binder.cond(_Parser(text).parse())
    except RecursionError:
        raise FilterError(f"filter {text[:40]!r}... : nested too deeply") from None
    return Filter(text, ast, frozenset(binder.used))


def selectivity(f: Filter, columns: Mapping[str, np.ndarray]) -> float:
    """Fraction of rows that pass ``f`` (0.0 when there are none)."""
    mask = f.mask(columns)
    return float(mask.mean()) if mask.size else 0.0
