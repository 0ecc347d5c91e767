"""The layers run one way: ``model`` → ``indexer`` → ``engine`` → ``benchmarks``, and only the application layer
(``facesearch/``: the command line and the demo) sees them all.  Checked on the source: every import statement of
every module, those inside functions and ``TYPE_CHECKING`` blocks included, since each is a dependency all the same.

Also: ``facesearch --help`` stays light (the command modules load lazily), checked in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from facesearch.cli import main
from facesearch.cli._app import LazyCommand, LazyGroup

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("model", "indexer", "engine", "benchmarks")  # in order: each may import those before it and itself
#: The repository folder of each installed package (setup.cfg's package_dir).
FOLDERS = {"facesearch": ROOT / "facesearch", **{f"facesearch.{layer}": ROOT / layer for layer in LAYERS}}
HEAVY = ("torch", "faiss", "fastapi", "uvicorn", "cv2", "matplotlib", "dask", "distributed", "pyarrow")


def _modules() -> dict[str, Path]:
    """Installed module name -> source file, for every .py file of the packages."""
    found: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "facesearch" and parts[0] in LAYERS:
                continue  # not there in a checkout; mapped by their own folders above
            found[".".join((package, *parts)).removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; ``from p import x`` counts as ``p.x`` when that is
    a module of ours (else as ``p``), and relative imports are resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else base))
    return found


def _layer(module: str) -> str | None:
    """The layer a module of ours belongs to (None for a module outside facesearch)."""
    parts = module.split(".")
    if parts[0] != "facesearch":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "app"


def _allowed(importer: str, imported: str) -> bool:
    """May module ``importer`` import module ``imported`` (both of facesearch)?"""
    if importer == "facesearch":  # the package itself: its version only, never a layer (``import facesearch`` is light)
        return False
    if importer == "facesearch.__main__":
        return imported == "facesearch.cli" or imported.startswith("facesearch.cli.")
    mine = _layer(importer)
    if mine == "app":
        return True
    theirs = _layer(imported)
    return theirs in LAYERS and LAYERS.index(theirs) <= LAYERS.index(str(mine))


def test_modules_found() -> None:
    """The walk sees every package (a renamed folder would otherwise make the other tests pass vacuously)."""
    for package in ("facesearch", "facesearch.cli", *(f"facesearch.{layer}" for layer in LAYERS)):
        assert package in MODULES, f"{package} not found under {ROOT}"
    assert len(MODULES) > 40, sorted(MODULES)


def test_layers_import_only_downwards() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {name} ({_layer(name)}) imports {imported} ({_layer(imported)})"
        for name, path in MODULES.items()
        for line, imported in _imports(name, path)
        if _layer(imported) is not None and not _allowed(name, imported)
    ]
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_old_style_imports() -> None:
    """The repository folders install as facesearch.<layer>: ``import model`` or ``from engine.search import ...``
    only works from a checkout's root, and means a second copy of the module."""
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {imported}"
        for name, path in MODULES.items()
        for line, imported in _imports(name, path)
        if imported.split(".")[0] in (*LAYERS, "cli")
    ]
    assert not bad, "imports of the old top-level packages (use facesearch.<layer>):\n" + "\n".join(bad)


def test_every_import_resolves_to_a_module() -> None:
    """Each ``facesearch...`` import names a module of ours, or an attribute of one (``from m import f``): a typo or a
    module that moved is found here, not when that line first runs."""
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {imported}"
        for name, path in MODULES.items()
        for line, imported in _imports(name, path)
        if _layer(imported) is not None and imported not in MODULES
    ]
    assert not bad, "imports of modules that do not exist:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("importer", "imported", "ok"),
    [
        ("facesearch.model.network", "facesearch.model.config", True),
        ("facesearch.model.network", "facesearch.indexer.shards", False),
        ("facesearch.indexer.shards", "facesearch.model.config", True),
        ("facesearch.indexer.shards", "facesearch.engine.search", False),
        ("facesearch.engine.search", "facesearch.indexer.index", True),
        ("facesearch.engine.search", "facesearch.benchmarks.report", False),
        ("facesearch.engine.search", "facesearch.cli._app", False),
        ("facesearch.benchmarks.report", "facesearch.engine.search", True),
        ("facesearch.benchmarks.report", "facesearch", False),
        ("facesearch.cli.search", "facesearch.benchmarks.report", True),
        ("facesearch.demo", "facesearch.engine.search", True),
        ("facesearch.__main__", "facesearch.cli", True),
        ("facesearch.__main__", "facesearch.model", False),
        ("facesearch", "facesearch.cli", False),
    ],
)
def test_rule(importer: str, imported: str, ok: bool) -> None:
    """The rule itself, on examples both ways (so a rule that allows everything is caught)."""
    assert _allowed(importer, imported) is ok


def test_relative_imports_resolve(tmp_path: Path) -> None:
    src = tmp_path / "x.py"
    src.write_text("from . import network\nfrom .. import engine\nfrom .config import ModelConfig\nimport model\n")
    assert _imports("facesearch.model.x", src) == [
        (1, "facesearch.model.network"),
        (2, "facesearch.engine"),
        (3, "facesearch.model.config"),
        (4, "model"),
    ]


# A fresh interpreter runs ``python -m facesearch --help`` (as runpy does it for -m) and then lists what it imported.
_HELP_WRAPPER = """
import runpy, sys
sys.argv = ["facesearch", *sys.argv[1:]]
try:
    runpy.run_module("facesearch", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert not e.code, f"exit status {e.code}"
print("MODULES", *sorted(sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["bench", "--help"], ["--version"]])
def test_help_imports_no_heavy_module(tmp_path: Path, args: list[str]) -> None:
    """``facesearch --help`` and ``facesearch bench --help`` load no command module: their short help comes with the
    lazy group (see facesearch.cli._app), so the listing costs no torch, FAISS, Arrow or Dask import."""
    proc = subprocess.run([sys.executable, "-c", _HELP_WRAPPER, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    shown, _, listed = proc.stdout.rpartition("MODULES ")
    assert ("Commands:" in shown) != (args == ["--version"]), shown
    imported = set(listed.split())
    heavy = sorted({m.split(".")[0] for m in imported} & set(HEAVY))
    assert not heavy, f"facesearch {' '.join(args)} imported {heavy}"
    assert "facesearch.cli" in imported  # the wrapper did run the command line


def test_python_m_facesearch_help(tmp_path: Path) -> None:
    """The real thing, from an unrelated folder: the command list, exit status 0."""
    proc = subprocess.run([sys.executable, "-m", "facesearch", "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for command in ("attributes", "bench", "demo", "embed", "index", "search", "serve", "synth", "train"):
        assert f"\n  {command} " in proc.stdout, proc.stdout


def _lazy_entries() -> list[tuple[str, LazyCommand]]:
    """(command path, LazyCommand) of every lazy subcommand, from the root group down (not into ``bench speed``,
    whose own commands are that group's business)."""
    assert isinstance(main, LazyGroup)
    found: list[tuple[str, LazyCommand]] = []
    todo: list[tuple[str, LazyGroup]] = [("facesearch", main)]
    while todo:
        path, group = todo.pop()
        for name, lazy in sorted(group.lazy_subcommands.items()):
            found.append((f"{path} {name}", lazy))
            if f"{path} {name}" != "facesearch bench speed":
                command = lazy.load()
                if isinstance(command, LazyGroup):
                    todo.append((f"{path} {name}", command))
    return found


@pytest.mark.parametrize(("path", "lazy"), _lazy_entries(), ids=lambda x: x if isinstance(x, str) else "")
def test_lazy_summary_is_the_command_short_help(path: str, lazy: LazyCommand) -> None:
    """A lazy group lists each command by the summary it is given (so --help imports nothing): it must be what click
    would show for the loaded command, at every screen width."""
    command = lazy.load()
    name = path.rsplit(" ", 1)[1]
    assert command.name == name, f"{lazy.target} is the command {command.name!r}, listed as {name!r}"
    assert lazy.summary == command.get_short_help_str(limit=10**6), f"{path}: update its summary in the group"
    stand_in = click.Command(name, help=lazy.summary)
    for limit in range(10, 130, 7):
        assert stand_in.get_short_help_str(limit) == command.get_short_help_str(limit), (path, limit)
    assert not command.hidden and not command.deprecated, "the listing does not show these flags"


def test_lazy_group_suggests_unloaded_commands() -> None:
    """A mistyped command gets click's suggestions from every command, loaded or not."""
    result = CliRunner().invoke(main, ["serch"])
    assert result.exit_code == 2
    assert "No such command 'serch'" in result.output
    if "Did you mean" in CliRunner().invoke(main, ["bench", "lfx"]).output:  # click >= 8.4 suggests names
        assert "'search'" in result.output and "'serve'" in result.output, result.output
