"""MegaFace report: loading and validation, table formatting, PNG plots and the full report folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from facesearch.benchmarks.report import (
    load_results,
    plot_cmc,
    plot_rank1_vs_size,
    plot_roc,
    result_label,
    size_table,
    summary_table,
    write_report,
)


def make_result(label: str, size: int, seed: int, cleaned: bool = False, filtered: bool = False) -> dict[str, Any]:
    """A result in the megaface.py contract: the CMC of a seeded random rank list, a monotone ROC from two normals."""
    rng = np.random.default_rng(seed)
    n_probes, n_ids = 20, 4  # 5 images per identity: N = 4 * 5 * 4 ordered pairs
    N, N_pos, N_neg = 80, 40, n_probes * size
    ranks = np.minimum(rng.geometric(0.4, N) - 1, size)
    hits = np.searchsorted(np.sort(ranks), np.arange(size + 1), side="right")
    neg, pos = rng.normal(0, 1, 2000), rng.normal(2.5, 1, N_pos)
    thr = np.linspace(6, -6, 60)
    far = [float((neg > t).mean()) for t in thr]
    return {
        "kind": "facesearch.megaface_result", "format_version": 1, "label": label, "algorithm": label,
        "size": size, "set": 1, "cleaned": cleaned,
        "filter": {"attributes": ["Male"], "threshold": 0.5, "description": "Male agrees"} if filtered else None,
        "counts": {"n_probes": n_probes, "n_identities": n_ids, "n_distractors": size, "N": N, "N_pos": N_pos,
                   "N_neg": N_neg, "rank1_hits": int(hits[0])},
        "rank1": float(hits[0] / N),
        "cmc": {"ranks": list(range(size + 1)), "hits": hits.tolist(), "rates": (hits / N).tolist()},
        "roc": {"far": far, "tar": [float((pos > t).mean()) for t in thr], "threshold": thr.tolist()},
        # Too few negatives for FAR 1e-6 and 1e-5 at these sizes: one null entry, one missing entry.
        "tar_at_far": [{"far": 1e-6, "tar": None, "tar_count": None, "threshold": None, "m": 0},
                       {"far": 1e-4, "tar": 0.25, "tar_count": 10, "threshold": 3.1, "m": 0},
                       {"far": 1e-3, "tar": 0.5, "tar_count": 20, "threshold": 2.2, "m": 0}],
        "filter_stats": {"mates_excluded_fraction": 0.03, "distractors_removed_fraction": 0.5, "speedup": 1.9}
        if filtered else None,
        "timings": {"total_s": 0.1},
    }  # fmt: skip


def paper_like() -> dict[str, Any]:
    """A 1M result with the official N and a known rank-1 count and TAR at 1e-6."""
    r = make_result("paper", 1000, seed=9)
    N, hits = 153_634, [119_988, 130_000, 150_000, 153_634]
    r["size"] = 1_000_000
    r["counts"].update(n_distractors=1_000_000, N=N, rank1_hits=hits[0])
    r["rank1"] = hits[0] / N
    r["cmc"] = {"ranks": [0, 9, 9999, 1_000_000], "hits": hits, "rates": [h / N for h in hits]}
    r["tar_at_far"][0].update(tar=0.5, tar_count=38_408)
    return r


@pytest.fixture
def results() -> list[dict[str, Any]]:
    return [make_result("alpha", 10, 0), make_result("alpha", 100, 1), make_result("beta", 100, 2, True, True)]


def save(tmp_path: Path, results: list[dict[str, Any]]) -> list[Path]:
    paths = [tmp_path / f"r{i}.json" for i in range(len(results))]
    for p, r in zip(paths, results, strict=True):
        p.write_text(json.dumps(r))
    return paths


def test_load_results_round_trip(tmp_path: Path, results: list[dict[str, Any]]) -> None:
    assert load_results(save(tmp_path, results)) == results


@pytest.mark.parametrize("key", ["label", "counts.N", "cmc.rates", "roc.far", "tar_at_far", "filter_stats"])
def test_load_results_names_file_and_missing_key(tmp_path: Path, results: list[dict[str, Any]], key: str) -> None:
    head, _, tail = key.partition(".")
    del (results[2][head] if tail else results[2])[tail or head]
    paths = save(tmp_path, results)
    with pytest.raises(ValueError, match=rf"r2\.json: missing key '{key}'"):
        load_results(paths)


def test_load_results_rejects_wrong_kind_bad_json_and_ragged_curve(tmp_path: Path) -> None:
    r = make_result("a", 10, 0)
    (bad := tmp_path / "kind.json").write_text(json.dumps({**r, "kind": "other"}))
    with pytest.raises(ValueError, match=r"kind\.json: key 'kind' is 'other'"):
        load_results([bad])
    (bad := tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json: cannot read"):
        load_results([bad])
    r["cmc"]["rates"].pop()
    (bad := tmp_path / "ragged.json").write_text(json.dumps(r))
    with pytest.raises(ValueError, match=r"ragged\.json: cmc\.ranks and cmc\.rates"):
        load_results([bad])


def test_result_label(results: list[dict[str, Any]]) -> None:
    assert [result_label(r) for r in results] == ["alpha", "alpha", "beta @R [Male agrees]"]


def test_summary_table_markdown(results: list[dict[str, Any]]) -> None:
    table = summary_table([paper_like(), *results])
    lines = table.splitlines()
    assert len(lines) == 2 + 4
    assert lines[0].startswith("| Method | Distractors | Rank-1 | TAR@1e-6 | TAR@1e-5")
    assert lines[0].endswith("| Mates excluded | Distractors removed | Speed-up |")
    paper = lines[2]
    assert "| 1,000,000 |" in paper and "| 78.10 % (119,988 / 153,634) |" in paper and "| 50.00 % |" in paper
    assert paper.endswith("| 25.00 % | 50.00 % | — | — | — |"), "unfiltered rows show dashes in filter columns"
    beta = lines[5]
    assert beta.startswith("| beta @R [Male agrees] | 100 | ")
    assert beta.endswith("| — | — | 25.00 % | 50.00 % | 3.0 % | 50.0 % | 1.90× |"), "null and missing TAR are —"
    assert "Mates excluded" not in summary_table(results[:2]), "filter columns only when a result is filtered"


def test_summary_table_text_is_fixed_width(results: list[dict[str, Any]]) -> None:
    lines = summary_table([paper_like(), *results], fmt="text").splitlines()
    assert len({len(line) for line in lines}) == 1 and set(lines[1]) == {"-", " "}
    assert "78.10 % (119,988 / 153,634)" in lines[2] and "|" not in lines[2]
    with pytest.raises(ValueError, match="valid: markdown, text"):
        summary_table(results, fmt="html")


def test_size_table(results: list[dict[str, Any]]) -> None:
    results.append(paper_like())
    text = size_table(results)
    rank1, tar = text.split("**TAR at FAR = 1e-6 vs number of distractors**")
    r = results
    assert "| Method | 10 | 100 | 1,000,000 |" in rank1
    assert f"| alpha | {100 * r[0]['rank1']:.2f} % | {100 * r[1]['rank1']:.2f} % | — |" in rank1
    assert f"| beta @R [Male agrees] | — | {100 * r[2]['rank1']:.2f} % | — |" in rank1
    assert "| paper | — | — | 78.10 % |" in rank1
    assert "| alpha | — | — | — |" in tar and "| paper | — | — | 50.00 % |" in tar
    assert "Rank-1 identification rate vs number of distractors" in size_table(results, fmt="text")
    with pytest.raises(ValueError, match="two results for 'alpha' at size 10"):
        size_table([*results, make_result("alpha", 10, 5)])


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[:2] == (600, 840), "7 x 5 inches at dpi 120"
    assert image[..., :3].std() > 0.05, "something was drawn"
    assert not list(path.parent.glob("*.tmp")), "no temporary left behind"


def test_plots_overlay_three_results(tmp_path: Path, results: list[dict[str, Any]]) -> None:
    for plot in (plot_cmc, plot_roc, plot_rank1_vs_size):
        out = tmp_path / f"{plot.__name__}.png"
        assert plot(results, out, title="t") == out
        assert_png(out)
    with pytest.raises(ValueError, match="no results"):
        plot_cmc([], tmp_path / "empty.png")


def test_write_report(tmp_path: Path, results: list[dict[str, Any]]) -> None:
    paths = write_report(results, tmp_path / "out", stem="run")
    assert sorted(paths) == ["cmc", "rank1_vs_size", "roc", "summary"]
    assert paths["cmc"] == tmp_path / "out" / "run_cmc.png"
    for key in ("cmc", "roc", "rank1_vs_size"):
        assert_png(paths[key])
    summary = paths["summary"].read_text()
    assert summary_table(results) in summary and size_table(results) in summary and "(run_roc.png)" in summary
    one_size = write_report(results[1:], tmp_path / "one")
    assert "rank1_vs_size" not in one_size and not (tmp_path / "one" / "megaface_rank1_vs_size.png").exists()


def test_non_utf8_result_file_is_named(tmp_path):
    from facesearch.benchmarks.report import load_results

    bad = tmp_path / "result_x.json"
    bad.write_bytes(b"\xff\xfe{not utf8")
    with pytest.raises(ValueError, match=r"result_x\.json: cannot read a result file"):
        load_results([bad])
