"""The one table renderer: markdown (for README / RESULTS / reports) or fixed-width text (for the console).

    render_table(["size", "rank-1"], [["10", "99.1 %"], ["1,000,000", "65.2 %"]], fmt="markdown")

Cells are converted with ``str``; the first ``left`` columns are left-aligned, the others right-aligned (numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FORMATS: tuple[str, ...] = ("markdown", "text")


def render_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], fmt: str = "markdown", left: int = 1) -> str:
    """A markdown or fixed-width text table of ``rows`` under ``headers``; every row must have one cell per header.
    ``ValueError`` for an unknown ``fmt`` or a row of the wrong length."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; valid: {', '.join(FORMATS)}")
    head = [str(h) for h in headers]
    body = [[str(c) for c in row] for row in rows]
    for i, row in enumerate(body):
        if len(row) != len(head):
            raise ValueError(f"table row {i} has {len(row)} cells, expected {len(head)} (one per header)")
    if fmt == "markdown":
        esc = [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in (head, *body)]
        rule = [":---" if i < left else "---:" for i in range(len(head))]
        return "\n".join("| " + " | ".join(row) + " |" for row in (esc[0], rule, *esc[1:]))
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]

    def line(row: Sequence[str]) -> str:
        cells = (c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        return "  ".join(cells)

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(row) for row in body)])


__all__ = ["FORMATS", "render_table"]
