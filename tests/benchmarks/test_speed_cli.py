"""``facesearch bench speed <name>``: each subcommand takes its script's options (the same config as ``python -m``
with the same arguments) and runs the script's library function; smoke runs at tiny sizes check the real output."""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from facesearch.cli.bench_speed import speed

# subcommand -> (script module, config class)
SCRIPTS = {
    "model": ("model_speed", "ModelSpeedConfig"),
    "synth": ("synth_speed", "SynthSpeedConfig"),
    "embed": ("embed_speed", "EmbedSpeedConfig"),
    "index": ("index_speed", "IndexSpeedConfig"),
    "search": ("search_speed", "SearchSpeedConfig"),
    "megaface": ("megaface_speed", "MegafaceSpeedConfig"),
    "latency": ("search_latency", "SearchLatencyConfig"),
    "crop-store": ("crop_store", "CropStoreSpeedConfig"),
}
# arguments that differ from every default, for each subcommand
NON_DEFAULT = {
    "model": ["--device", "cuda", "--models", "fast", "--precisions", "bf16", "--min-seconds", "0.5", "--gemm-n", "64",
              "--batch-scale", "2", "--batch", "4", "--width", "0.5", "--input-size", "56x48", "--json", "m.json"],
    "synth": ["--images", "30", "--workers", "1,3", "--repeats", "1", "--size", "64"],
    "embed": ["--identities", "4", "--images-per-identity", "2", "--width", "0.5", "--input-size", "56x48",
              "--batch-size", "8", "--shard-rows", "4", "--workers", "1", "--threads-per-worker", "2", "--repeats",
              "1", "--detect", "--json", "e.json"],
    "index": ["--work", "w", "--rows", "100", "--dim", "8", "--identities", "5", "--queries", "3", "--k", "2",
              "--kinds", "flat,hnsw", "--tile-rows", "8", "--block-rows", "16", "--backends", "faiss:none", "--keep",
              "--in-process"],
    "search": ["--rows", "100", "--queries", "3", "--dim", "8", "--identities", "5", "--k", "2", "--device", "cuda",
               "--backends", "torch:bf16", "--tile-rows", "8", "--block-rows", "16"],
    "megaface": ["--work", "w", "--rows", "100", "--dim", "8", "--probes", "4", "--device", "cuda", "--screen", "none"],
    "latency": ["--shards", "s", "--probes", "p", "--rows", "100", "--dim", "8", "--kinds", "flat", "--single", "2",
                "--batch", "3", "--k", "2", "--http", "--concurrency", "2,8", "--http-seconds", "1", "--work", "w"],
    "crop-store": ["--images", "40", "--identities", "4", "--image-size", "96", "--arch", "full", "--width", "0.5",
                   "--input-size", "56x48", "--batch-size", "4", "--workers", "1", "--device", "cuda", "--precision",
                   "bf16", "--json", "c.json"],
}  # fmt: skip


class _Stop(Exception):
    """Raised by the stand-in ``run`` once it has the config."""


def _module(name: str) -> Any:
    return importlib.import_module(f"facesearch.benchmarks.speed.{SCRIPTS[name][0]}")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
@pytest.mark.parametrize("args", ["defaults", "given"])
def test_subcommand_builds_the_scripts_config(name: str, args: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every option of the script is one of the subcommand (same name, default and parsed value), and no more."""
    module = _module(name)
    argv = [] if args == "defaults" else NON_DEFAULT[name]
    seen: list[Any] = []

    def stand_in(cfg: Any, *a: Any, **k: Any) -> Any:
        seen.append(cfg)
        raise _Stop

    monkeypatch.setattr(module, "run", stand_in)
    result = CliRunner().invoke(speed, [name, *argv])
    assert isinstance(result.exception, _Stop), result.output
    expected = getattr(module, SCRIPTS[name][1])(**vars(module.build_parser().parse_args(argv)))
    assert seen == [expected]


def test_every_script_has_a_subcommand() -> None:
    assert set(speed.commands) == set(SCRIPTS)


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", line)]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: tiny layers on a loaded 2-core machine spend far more in thread barriers than in work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_model(tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "model.json"
    args = ["model", "--models", "fast", "--precisions", "fp32", "--min-seconds", "0.01", "--gemm-n", "64",
            "--batch", "2", "--width", "0.25", "--input-size", "56x48", "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(speed, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"GEMM peak \(measured\): fp32 \d+\.\d\d TFLOP/s", result.output)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "fast" and row["batch"] == 2 and row["macs_per_image"] > 0
    assert row["infer_images_per_s"] > 0 and row["train_images_per_s"] > 0 and row["gemm_peak_flops"] > 0
    assert f"| fast | fp32 | 2 | {row['macs_per_image'] / 1e9:.3f} |" in result.output
    assert json.loads(out.read_text())["provenance"]["facesearch"]


def test_synth() -> None:
    result = CliRunner().invoke(speed, ["synth", "--images", "20", "--workers", "1", "--repeats", "1", "--size", "64"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[1].split() == ["workers", "images", "seconds", "images/s", "ms/image"]
    workers, images, seconds, per_s, ms = _numbers(lines[-1])
    assert workers == 1 and images >= 20 and seconds > 0 and per_s > 0 and ms > 0


@pytest.mark.slow  # starts a Dask cluster (~15 s on 2 cores)
def test_embed(tmp_path: Path) -> None:
    out = tmp_path / "embed.json"
    args = ["embed", "--identities", "3", "--images-per-identity", "2", "--input-size", "56x48", "--batch-size", "4",
            "--shard-rows", "2", "--workers", "1", "--repeats", "1", "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(speed, args)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["pipeline"]["images"] == r["model_alone"]["images"] == 6 and r["pipeline"]["images_per_s"] > 0
    assert "| Dask pipeline, 1 workers x 1 thread, decode on its threads, incl. cluster start | 6 |" in result.output
    assert "| infer |" in result.output


def test_index(tmp_path: Path) -> None:
    work = tmp_path / "idx"
    args = ["index", "--work", str(work), "--rows", "600", "--dim", "16", "--identities", "30", "--queries", "10",
            "--backends", "faiss:none,torch:none", "--tile-rows", "256", "--block-rows", "200",
            "--in-process"]  # fmt: skip
    result = CliRunner().invoke(speed, args)
    assert result.exit_code == 0, result.output
    assert "| synth features 600 x 16 fp16 |" in result.output
    assert re.search(r"\| index build flat \| \d+\.\d \| \d+\.\d\d \| recall@1 1\.0000", result.output)
    for backend in ("faiss none", "torch none"):
        line = next(x for x in result.output.splitlines() if f"k=10: {backend} |" in x)
        assert "up to ties 1.00000" in line
    assert not work.exists(), "the scratch directory goes unless --keep"


def test_search() -> None:
    args = ["search", "--rows", "600", "--queries", "10", "--dim", "16", "--identities", "30",
            "--backends", "faiss:none,torch:none", "--tile-rows", "256", "--block-rows", "200"]  # fmt: skip
    result = CliRunner().invoke(speed, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("10 queries x 600 rows x d=16, k=10, on CPU")
    rows = [x for x in result.output.splitlines() if x.startswith(("| faiss |", "| torch |"))]
    assert len(rows) == 2 and all(x.endswith("| 1.00000 |") for x in rows)
    assert all(re.search(r"\(\d+\.\d\d T\)", x) for x in rows)


def test_megaface(tmp_path: Path) -> None:
    args = ["megaface", "--work", str(tmp_path), "--rows", "300", "--dim", "16", "--probes", "40"]
    result = CliRunner().invoke(speed, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "speed.json").read_text())
    assert summary["N"] == 40 and summary["floor_s"] > 0 and summary["peak_rss_gib"] > 0
    assert summary["provenance"]["config"]["rows"] == 300
    assert "[megaface]" in result.output and f"wrote {tmp_path / 'speed.json'}" in result.output


def test_latency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from facesearch.benchmarks.speed import search_latency

    # machine probes small enough for a smoke run (the defaults take seconds each on 2 cores)
    monkeypatch.setattr(search_latency, "GEMM_N", 256)
    monkeypatch.setattr(search_latency, "COPY_BYTES", 1 << 24)
    args = ["latency", "--rows", "1000", "--dim", "16", "--kinds", "flat", "--single", "3", "--batch", "8",
            "--work", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(speed, args)
    assert result.exit_code == 0, result.output
    r = json.loads((tmp_path / "latency.json").read_text())
    assert r["rows"] and all(x["kind"] == "flat" and x["p50_ms"] > 0 for x in r["rows"])
    assert r["machine"]["gemm_fp32_tflops"] > 0 and r["machine"]["bandwidth_gbs"] > 0 and r["provenance"]["machine"]
    assert (tmp_path / "latency.md").read_text().count("\n| flat |") == len(r["rows"])
    assert "| flat | none |" in result.output


@pytest.mark.slow  # synthetic images, a store build, two loaders and four timed paths (~5 s on 2 cores)
def test_crop_store(tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "crop_store.json"
    args = ["crop-store", "--images", "24", "--identities", "4", "--image-size", "96", "--width", "0.125",
            "--input-size", "56x48", "--batch-size", "6", "--workers", "0", "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(speed, args)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert set(r["paths"]) == {"loader_decode", "store_build", "loader_store", "model_alone", "train_decode",
                               "train_store"}  # fmt: skip
    assert all(p["images_per_s"] > 0 for p in r["paths"].values()) and r["paths"]["store_build"]["images"] == 24
    assert 0 < r["ratios"]["store"]["bound"] <= 1 and r["ratios"]["store"]["measured"] > 0
    assert r["provenance"]["config"]["images"] == 24 and r["store_failed"] == 0
    assert "| data loader, crop store | " in result.output and "| store | " in result.output
