"""ARCHITECTURE.md's tables are generated from the code; this keeps the document true."""

from __future__ import annotations

from pathlib import Path

import pytest

from facesearch.model.architecture import render

DOC = Path(__file__).resolve().parents[2] / "model" / "ARCHITECTURE.md"


@pytest.mark.slow
def test_architecture_tables_match_the_code() -> None:
    text = DOC.read_text()
    start, end = text.index("<!-- generated:start -->"), text.index("<!-- generated:end -->")
    documented = text[start + len("<!-- generated:start -->") : end].strip()
    assert documented == render().strip(), (
        "run `python -m facesearch.model.architecture` and paste its output into the document"
    )
