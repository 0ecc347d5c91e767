"""Without FAISS (it comes from the ``cpu`` or ``gpu`` extra, not from the base install) the import error names the
extra to install; a FAISS that is installed but broken keeps its own error."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from facesearch.indexer import faiss_import


def _import_fresh() -> None:
    """Run the helper module again, under another name, with whatever ``faiss`` ``sys.modules`` now holds."""
    spec = importlib.util.spec_from_file_location("faiss_import_fresh", faiss_import.__file__)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_missing_faiss_names_the_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` sees when it is not installed
    with pytest.raises(ModuleNotFoundError) as e:
        _import_fresh()
    assert str(e.value) == "faiss is not installed: pip install 'facesearch[cpu]' (or 'facesearch[gpu]' for CUDA 12)"
    assert e.value.name == "faiss" and isinstance(e.value, ImportError)


def test_a_broken_faiss_keeps_its_own_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "faiss").mkdir()
    (tmp_path / "faiss" / "__init__.py").write_text("import _facesearch_test_missing_cuda_library\n")
    monkeypatch.delitem(sys.modules, "faiss")  # restored afterwards
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="_facesearch_test_missing_cuda_library") as e:
        _import_fresh()
    assert e.value.name == "_facesearch_test_missing_cuda_library"


def test_the_index_code_uses_the_helper() -> None:
    """Every module that needs FAISS gets it through the helper, so none fails first with a bare import error."""
    root = Path(faiss_import.__file__).resolve().parents[1]
    plain = sorted(
        str(path.relative_to(root))
        for folder in ("facesearch", "model", "indexer", "engine", "benchmarks")
        for path in (root / folder).rglob("*.py")
        if path.name != "faiss_import.py"
        and re.search(r"^\s*(import faiss\b|from faiss import)", path.read_text(), re.M)
    )
    assert plain == [], f"import faiss through facesearch.indexer.faiss_import in {plain}"
