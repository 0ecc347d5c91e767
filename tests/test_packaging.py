"""Packaging: every third-party package the code imports is declared (FAISS through the ``cpu`` / ``gpu`` extras,
never both), and the wheel holds one import package, ``facesearch``, that works installed, away from the checkout."""

from __future__ import annotations

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("facesearch", "model", "indexer", "engine", "benchmarks")


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def _names(requirements: str) -> set[str]:
    """Normalised distribution names of a setup.cfg requirement list (``dask[distributed]>=1`` -> ``dask``)."""
    found = (re.match(r"[A-Za-z0-9._-]+", line.strip()) for line in requirements.splitlines())
    return {re.sub(r"[-_.]+", "-", m.group(0)).lower() for m in found if m}


def _imported_modules() -> set[str]:
    """Top-level modules the package code imports, less the standard library and itself."""
    modules: set[str] = set()
    for folder in PACKAGE_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m not in ("facesearch", "__future__")}


def test_every_imported_package_is_declared() -> None:
    cfg = _setup_cfg()
    required = _names(cfg["options"]["install_requires"])
    extras = {name: _names(cfg["options.extras_require"][name]) for name in ("cpu", "gpu")}
    owners = packages_distributions()  # module -> the installed distributions providing it
    missing = {}
    for module in sorted(_imported_modules()):
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(module, [])}
        assert dists, f"{module} is imported but no installed distribution provides it"
        if module == "faiss":  # from exactly one extra: faiss-cpu and faiss-gpu-* both install the faiss module
            assert dists & extras["cpu"] and not dists & required, (dists, extras)
            assert any(name.startswith("faiss-gpu") for name in extras["gpu"]), extras["gpu"]
        elif not dists & required:
            missing[module] = sorted(dists)
    assert not missing, f"imported but not in install_requires: {missing}"
    assert not any(name.startswith("faiss") for name in required), "faiss belongs in the cpu / gpu extras"


def _source_copy(dest: Path) -> Path:
    """What a build needs from the checkout, copied (the build writes build/ and *.egg-info beside its sources)."""
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for folder in PACKAGE_DIRS:
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = _source_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: build with this environment's setuptools instead of downloading one
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(out), str(src)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    (path,) = out.glob("facesearch-*.whl")
    return path


@pytest.mark.slow
def test_the_wheel_holds_only_the_facesearch_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"facesearch", wheel.name.split("-py3")[0] + ".dist-info"}, tops  # no model/, indexer/, tests/...
    # every module of the checkout, at its installed place (a subpackage left out of setup.cfg's list would be missing)
    sources = {f"facesearch/{path.relative_to(REPO / folder)}" if folder == "facesearch"
               else f"facesearch/{folder}/{path.relative_to(REPO / folder)}"
               for folder in PACKAGE_DIRS for path in (REPO / folder).rglob("*.py")}  # fmt: skip
    assert sources - set(names) == set()
    assert "facesearch/model/ARCHITECTURE.md" in names
    assert "facesearch = facesearch.cli:main" in entry_points
    requires = [line.removeprefix("Requires-Dist: ") for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    faiss = [r for r in requires if r.startswith("faiss")]
    assert faiss and all('extra == "cpu"' in r or 'extra == "gpu"' in r for r in faiss), faiss


@pytest.mark.slow
def test_the_installed_wheel_runs_away_from_the_checkout(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          str(wheel)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    # -S: no site module, so none of this environment's .pth files run -- in particular not the editable install's
    # finder, which would map facesearch to the checkout.  Its dependencies come from its site-packages, after the
    # installed wheel; the working directory is an empty folder, so the checkout is nowhere on sys.path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_path("purelib")])}
    env.pop("PYTHONHOME", None)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()

    def python(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                              env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "Usage:" in python("-m", "facesearch", "--help")
    check = (
        "import importlib.resources, sys\n"
        "import facesearch, facesearch.model.network\n"
        "print(facesearch.__file__)\n"
        "print(facesearch.model.network.__file__)\n"
        "print(importlib.resources.files('facesearch.model').joinpath('ARCHITECTURE.md').is_file())\n"
        "print(any(name.startswith('__editable__') for name in sys.modules))\n"
    )
    package, network, has_doc, editable = python("-c", check).splitlines()
    assert Path(package).is_relative_to(target) and Path(network).is_relative_to(target), (package, network)
    assert has_doc == "True" and editable == "False"
