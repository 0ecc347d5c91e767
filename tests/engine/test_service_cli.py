"""``facesearch serve`` at the command line: bad ports, hosts, limits and unreadable indexes are one-line errors,
never tracebacks; a missing face detector is reported at start; the options reach the served app's limits."""

from __future__ import annotations

import logging
import socket

import pytest
import uvicorn
from click.testing import CliRunner
from fastapi.testclient import TestClient

import facesearch.cli.serve as serve_cli
from facesearch.cli import main
from facesearch.engine.search import SearchEngine
from facesearch.indexer.index import IndexConfig, build_index
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cli")
    write_synth_features(SynthFeaturesConfig(out=root / "s", rows=100, dim=8, identities=10, dtype="float32"))
    build_index(root / "s", root / "i", IndexConfig(kind="flat", recall_sample=0))
    return root / "i"


@pytest.fixture
def never_serve(monkeypatch):
    """Nothing may reach uvicorn: a test that got that far instead of failing on its options fails here."""

    def refuse(*args, **kwargs):
        raise AssertionError("the server was started")

    monkeypatch.setattr(uvicorn, "run", refuse)
    monkeypatch.setattr(uvicorn.Server, "run", refuse)


def _free_port() -> str:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def _serve(*args: str):
    return CliRunner().invoke(main, ["serve", *args])


def _one_line_error(result, status: int, *texts: str) -> None:
    assert result.exit_code == status, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    for text in texts:
        assert text in result.output, result.output


@pytest.mark.parametrize(
    ("option", "value"),
    [("--port", "99999"), ("--port", "0"), ("--max-k", "0"), ("--max-bytes", "-1"), ("--max-rows", "0"),
     ("--max-hits", "0"), ("--max-filter-chars", "0"), ("--max-filter-terms", "-5"), ("--max-pixels", "0"),
     ("--queue-size", "0"), ("--time-budget", "0"), ("--detector-pad", "-1")],
)  # fmt: skip
def test_bad_option_values_are_usage_errors(index_dir, never_serve, option, value):
    _one_line_error(_serve("--index", str(index_dir), option, value), 2, option, value)


def test_unknown_host_and_busy_port_are_one_line_errors(index_dir, never_serve):
    _one_line_error(_serve("--index", str(index_dir), "--host", "no.such.host.invalid"), 1, "cannot listen on")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        result = _serve("--index", str(index_dir), "--port", port)
    _one_line_error(result, 1, f"cannot listen on 127.0.0.1:{port}", "in use")


def test_unreadable_index_is_a_one_line_error(index_dir, tmp_path, never_serve, monkeypatch):
    _one_line_error(_serve("--index", str(tmp_path)), 1, "not an index directory")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(index_dir / "index.faiss"))

    monkeypatch.setattr(SearchEngine, "open", denied)
    _one_line_error(
        _serve("--index", str(index_dir), "--port", "8123"), 1, "cannot read the index", "Permission denied"
    )


def test_options_reach_the_app_and_a_missing_detector_is_reported(index_dir, monkeypatch, tmp_path, caplog):
    served = []
    monkeypatch.setattr(serve_cli, "serve", lambda app, sock: served.append((app, sock.getsockname())))
    real_open = SearchEngine.open

    def with_model(*args, **kwargs):  # an engine that claims a model, so the detector is loaded at start
        engine = real_open(*args, **kwargs)
        engine.embedder = object()  # type: ignore[assignment]
        return engine

    monkeypatch.setattr(SearchEngine, "open", with_model)
    monkeypatch.setenv("FACESEARCH_YUNET", str(tmp_path / "missing.onnx"))
    monkeypatch.setenv("FACESEARCH_TOKEN", "t0k")
    port = _free_port()
    with caplog.at_level(logging.WARNING, logger="facesearch.engine.service"):
        result = _serve("--index", str(index_dir), "--port", port, "--max-rows", "7", "--time-budget", "2.5",
                        "--public-docs")  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    assert "image queries UNAVAILABLE" in result.output and "bearer token from $FACESEARCH_TOKEN" in result.output
    assert any("YuNet model not found" in r.getMessage() for r in caplog.records), caplog.text
    ((app, address),) = served
    assert address == ("127.0.0.1", int(port))
    client = TestClient(app)
    limits = client.get("/health").json()["limits"]
    assert limits["max_rows"] == 7 and limits["time_budget"] == 2.5 and limits["public_docs"] and limits["token"]
    assert client.get("/openapi.json").status_code == 200
