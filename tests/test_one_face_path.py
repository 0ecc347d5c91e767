"""One face path and one embedding loop: image -> aligned crop is built only by
:func:`facesearch.model.faces.prepare.prepare_image` (on :func:`facesearch.model.faces.align.align_face`), and crops
reach the model only through :func:`facesearch.model.inference.iter_embeddings`.

A static check over the packages' sources (names used and called, by AST, so comments and docstrings do not count):
a new private copy of "decode + detect + align" or of "stack crops and call the model" fails here, naming the module.
The few exceptions are listed with the reason they are not copies.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "indexer", "engine", "benchmarks", "facesearch")

#: The pieces a crop is built from; only the alignment module and the prepare step touch them.
CROP_PIECES = frozenset({"align_face", "similarity_transform", "check_landmarks", "warpAffine"})
CROP_MODULES = frozenset({"model/faces/align.py", "model/faces/prepare.py"})
DECODE = frozenset({"decode_image", "read_image", "read_image_bytes", "imdecode", "imread"})
DETECT = frozenset({"detect", "detect_faces", "detect_all"})
#: Modules that both decode and detect without building crops.
DECODE_AND_DETECT = {
    "model/faces/prepare.py": "the prepare step itself",
    "model/faces/detections.py": "the detection cache: it stores landmarks; the dataset aligns them through prepare",
}
#: Modules that call the model on crops directly.
EMBED_CROPS = {
    "model/inference.py": "Embedder.embed_crops and iter_embeddings themselves",
    "benchmarks/speed/embed_speed.py": "times the model alone on pre-aligned crops, against the pipeline",
}
#: The callers of the issue and what each must import from the shared path (module -> names).
CALLERS = {
    "model/faces/datasets.py": {"prepare_image"},
    "model/inference.py": set(),  # embed_dataset: defined beside iter_embeddings
    "indexer/embed.py": {"iter_embeddings"},  # its images are prepared by indexer/prepare_pool.py
    "indexer/prepare_pool.py": {"prepare_image"},
    "engine/search.py": {"prepare_image", "iter_embeddings"},
    "benchmarks/lfw.py": {"prepare_image", "iter_embeddings"},
    "benchmarks/attribute_accuracy.py": {"FaceDataset", "embed_dataset"},
    "facesearch/demo.py": {"FaceDataset", "embed_dataset"},
}


@cache
def _trees() -> dict[str, ast.Module]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[path.relative_to(ROOT).as_posix()] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    assert "model/faces/prepare.py" in out and len(out) > 40, f"package sources not found under {ROOT}"
    return out


def _names(tree: ast.Module) -> set[str]:
    """Every name a module uses: identifiers, attribute names and imported names."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            out.update(a.name for a in node.names)
    return out


def _called(tree: ast.Module) -> set[str]:
    """The names of the functions and methods a module calls."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            out.add(func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else "")
    return out


def _imported(tree: ast.Module) -> set[str]:
    return {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}


def test_only_the_prepare_step_builds_crops() -> None:
    offenders = {m: sorted(_names(t) & CROP_PIECES) for m, t in _trees().items() if m not in CROP_MODULES}
    assert not {m: n for m, n in offenders.items() if n}, (
        "these modules build aligned crops themselves; use facesearch.model.faces.prepare.prepare_image"
    )


def test_no_module_decodes_and_detects_on_its_own() -> None:
    both = {m for m, t in _trees().items() if _called(t) & DECODE and _called(t) & DETECT}
    assert both <= set(DECODE_AND_DETECT), (
        f"{sorted(both - set(DECODE_AND_DETECT))} decode and detect faces themselves; use prepare_image"
    )


def test_only_the_embedding_loop_calls_the_model_on_crops() -> None:
    callers = {m for m, t in _trees().items() if "embed_crops" in _called(t)}
    assert callers <= set(EMBED_CROPS), f"{sorted(callers - set(EMBED_CROPS))} call embed_crops; use iter_embeddings"


@pytest.mark.parametrize("module", sorted(CALLERS))
def test_the_callers_use_the_shared_path(module: str) -> None:
    tree = _trees()[module]
    assert CALLERS[module] <= _imported(tree), f"{module} must import {sorted(CALLERS[module])}"
    if module == "model/inference.py":
        assert "iter_embeddings" in _called(tree)


def _assigned(tree: ast.Module) -> set[str]:
    """The names a module assigns anywhere (plain or annotated assignments)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        out.update(t.id for t in targets if isinstance(t, ast.Name))
    return out


def test_one_definition_of_the_image_suffixes_and_the_template() -> None:
    wanted = {"IMAGE_SUFFIXES", "REFERENCE_112x96"}
    defined = {
        (name.lstrip("_"), m) for m, t in _trees().items() for name in _assigned(t) if name.lstrip("_") in wanted
    }
    assert defined == {("IMAGE_SUFFIXES", "model/faces/samples.py"), ("REFERENCE_112x96", "model/faces/align.py")}
