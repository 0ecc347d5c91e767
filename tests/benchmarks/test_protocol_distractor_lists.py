"""MegaFace distractor lists against the probes: drawn lists never hold a probe image or another image of a probe
identity (and say what they were drawn from), given lists that do are refused or warned about, a list whose name
misstates its size is reported, a probe set without mates is a one-line error, and output names come from the lists.

Data: 350 synthetic identities x 2 images (``synth/synth_0000XXX/{0,1}.jpg``, one shard directory, ``dis``) and 12
identities x 6 images (``probes``, another directory whose identity names ``synth_0000000`` … reappear in ``dis``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from facesearch.benchmarks import devkit
from facesearch.benchmarks.megaface_data import selection_record
from facesearch.benchmarks.megaface_run import BenchConfig, run_megaface
from facesearch.cli import main
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features


def _path(identity: int, k: int) -> str:
    return f"synth/synth_{identity:07d}/{k}.jpg"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lists")
    write_synth_features(SynthFeaturesConfig(out=root / "probes", rows=72, dim=16, identities=12, spread=1.2, seed=3))
    write_synth_features(
        SynthFeaturesConfig(out=root / "dis", rows=700, dim=16, identities=350, shard_rows=256, seed=4)
    )
    # Probes taken from the distractor directory itself (the real-photo mistake): identities 100..139 with both
    # images (80 probes, N = 80) and identities 140..149 with image 0 only (their image 1 is "same identity").
    paths = [_path(i, k) for i in range(100, 140) for k in (0, 1)] + [_path(i, 0) for i in range(140, 150)]
    ids = [p.split("/")[1] for p in paths]
    devkit.write_probe_list(root / "facescrub_features_list.json", paths, ids)
    # Probes from their own directory, images 2..5 only: images 0 and 1 of the same names sit in "dis".
    paths = [_path(i, k) for i in range(12) for k in range(2, 6)]
    devkit.write_probe_list(root / "own_features_list.json", paths, [p.split("/")[1] for p in paths])
    return root


def _cfg(data: Path, out: Path, **kw: object) -> BenchConfig:
    base: dict[str, object] = {"out": out, "probes": data / "dis", "probe_list": data / "facescrub_features_list.json",
                               "distractors": data / "dis"}  # fmt: skip
    return BenchConfig(**{**base, **kw})  # type: ignore[arg-type]


def _identity(path: str) -> str:
    return path.split("/")[1]


def test_drawn_list_from_the_probe_directory_excludes_probe_images_and_identities(data: Path, tmp_path: Path) -> None:
    messages: list[str] = []
    (res,) = run_megaface(_cfg(data, tmp_path, sizes=(500,), seed=5), progress=messages.append)
    rec = res["distractor_list"]
    assert (rec["source"], rec["seed"], rec["rows"], rec["candidates"]) == ("drawn", 5, 700, 600)
    assert (rec["excluded_probe_images"], rec["excluded_probe_identities"]) == (90, 10)
    assert rec["drawn_from"] == str(data / "dis") and res["counts"]["N"] == 80
    probes = devkit.read_probe_list(data / "facescrub_features_list.json")
    listed = devkit.read_distractor_list(Path(rec["written"]))
    assert len(listed) == 500
    # written beside the scoring, settled before the result: the record checks the file, nothing left pending
    assert {k: rec[k] for k in ("count", "sha256")} == selection_record(listed) and "_pending" not in rec
    assert not set(map(devkit.stem_key, listed)) & set(map(devkit.stem_key, probes.paths)), "no probe image"
    assert not {_identity(p) for p in listed} & set(probes.ids), "no image of a probe identity"
    said = "\n".join(messages)
    assert "drew 500 distractors with seed 5 from 600 candidates of the 700 rows" in said
    assert "excluded 90 probe images and 10 other images of probe identities" in said
    summary = (tmp_path / "megaface_summary.md").read_text()
    assert "## Distractor lists" in summary and "**drawn** (no list given) with seed 5 from 600 candidates" in summary
    assert "excluded 90 probe images and 10 other images of probe identities" in summary


def test_drawn_list_from_another_directory_excludes_shared_identities(data: Path, tmp_path: Path) -> None:
    cfg = _cfg(data, tmp_path, probes=data / "probes", probe_list=data / "own_features_list.json", sizes=(600,))
    (res,) = run_megaface(cfg)
    rec = res["distractor_list"]
    assert (rec["candidates"], rec["excluded_probe_images"], rec["excluded_probe_identities"]) == (676, 0, 24)
    listed = devkit.read_distractor_list(Path(rec["written"]))
    assert not {_identity(p) for p in listed} & {f"synth_{i:07d}" for i in range(12)}


def test_too_few_candidates_is_a_clear_error(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot draw 650 distractors for size 650: only 600 of the 700 rows") as e:
        run_megaface(_cfg(data, tmp_path, sizes=(10, 650)))
    assert "90 excluded as probe images, 10 as other images of probe identities" in str(e.value)
    assert not list(tmp_path.glob("result_*.json")), "refused before any size ran"
    args = ["bench", "megaface", "--out", str(tmp_path / "cli"), "--probes", str(data / "dis"), "--probe-list",
            str(data / "facescrub_features_list.json"), "--distractors", str(data / "dis"),
            "--sizes", "650"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "Traceback" not in res.output and "only 600 of the 700 rows" in res.output


def _write_list(folder: Path, name: str, paths: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"path": paths}))
    return path


def _others(n: int, start: int = 200) -> list[str]:
    """``n`` distractor paths of identities that are not probes."""
    return [_path(start + i // 2, i % 2) for i in range(n)]


def test_given_list_with_a_probe_image_is_refused_unless_allowed(data: Path, tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    listed = _write_list(lists, "megaface_features_list.json_20_1", [*_others(19), _path(100, 1)])
    with pytest.raises(ValueError, match=r"json_20_1: 1 of 20 distractors are probe images") as e:
        run_megaface(_cfg(data, tmp_path / "a", distractor_lists=lists))
    assert "--allow-probe-overlap" in str(e.value) and "synth_0000100/1" in str(e.value)
    base = ["bench", "megaface", "--probes", str(data / "dis"), "--probe-list",
            str(data / "facescrub_features_list.json"), "--distractors", str(data / "dis"), "--distractor-lists",
            str(lists), "--sizes", "20"]  # fmt: skip
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "b")])
    assert res.exit_code != 0 and "Traceback" not in res.output and "1 of 20 distractors are probe images" in res.output
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "c"), "--allow-probe-overlap"])
    assert res.exit_code == 0, res.output
    assert res.output.count("WARNING: ") == 2, "when the list is read and again under the table"
    result = json.loads((tmp_path / "c" / "result_facesearch_20_1.json").read_text())
    assert result["distractor_list"]["probe_images"] == 1 and str(listed) in result["warnings"][0]
    assert "evaluated anyway" in (tmp_path / "c" / "megaface_summary.md").read_text()


def test_given_list_sharing_probe_identities_is_a_loud_warning(data: Path, tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    _write_list(lists, "megaface_features_list.json_20_1", [*_others(18), _path(140, 1), _path(141, 1)])
    args = ["bench", "megaface", "--out", str(tmp_path / "a"), "--probes", str(data / "dis"), "--probe-list",
            str(data / "facescrub_features_list.json"), "--distractors", str(data / "dis"), "--distractor-lists",
            str(lists), "--sizes", "20"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "WARNING: " in res.output and "2 of 20 distractors are other images of probe identities" in res.output
    result = json.loads((tmp_path / "a" / "result_facesearch_20_1.json").read_text())
    assert (result["distractor_list"]["probe_images"], result["distractor_list"]["probe_identities"]) == (0, 2)
    summary = (tmp_path / "a" / "megaface_summary.md").read_text()
    assert "## Warnings" in summary and "other images of probe identities" in summary
    # The same list over a devkit feature tree (no identity column): the identity is the image's folder.
    runner = CliRunner()
    for name in ("dis",):
        res = runner.invoke(main, ["bench", "export-bins", "--shards", str(data / name), "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
    cfg = _cfg(data, tmp_path / "b", distractors=None, distractor_root=tmp_path / "dis", distractor_lists=lists)
    (tree,) = run_megaface(cfg)
    assert tree["distractor_list"]["probe_identities"] == 2 and tree["warnings"]
    assert tree["rank_histogram"] == result["rank_histogram"]


def test_list_whose_name_misstates_its_size_is_reported(data: Path, tmp_path: Path) -> None:
    # The devkit's run_experiment.py reads whatever the list holds and names its output by the size in the list's
    # name; we do the same (label = the name's size, counts = the real ones) and say so loudly.
    lists = tmp_path / "lists"
    _write_list(lists, "megaface_features_list.json_300_1", _others(250))
    _write_list(lists, "megaface_features_list.json_30_1", _others(40, start=150))
    messages: list[str] = []
    small, big = run_megaface(
        _cfg(data, tmp_path / "a", distractor_lists=lists, sizes=(30, 300)), progress=messages.append
    )
    assert (big["size"], big["counts"]["n_distractors"], small["size"], small["counts"]["n_distractors"]) == (
        300, 250, 30, 40)  # fmt: skip
    assert "named for 300 distractors but holds 250" in big["warnings"][0]
    assert "named for 30 distractors but holds 40" in small["warnings"][0]
    assert any(m.startswith("WARNING: ") and "json_300_1" in m for m in messages)
    assert "named for 300 distractors but holds 250" in (tmp_path / "a" / "megaface_summary.md").read_text()
    dk = devkit.read_devkit_json(tmp_path / "a" / "devkit" / "cmc_facescrub_megaface_facesearch_30_1.json")
    assert dk["cmc"][0][-1] == 40 and dk["cmc"][1][-1] == pytest.approx(1.0)


def test_probes_without_mates_are_a_one_line_error(data: Path, tmp_path: Path) -> None:
    singles = [_path(i, 0) for i in range(100, 110)]
    devkit.write_probe_list(tmp_path / "single_features_list.json", singles, [_identity(p) for p in singles])
    with pytest.raises(ValueError, match=r"single_features_list\.json: no probe has a mate: each of the 10 probes"):
        run_megaface(_cfg(data, tmp_path / "a", probe_list=tmp_path / "single_features_list.json", sizes=(10,)))
    args = ["bench", "megaface", "--out", str(tmp_path / "b"), "--probes", str(data / "dis"), "--probe-list",
            str(tmp_path / "single_features_list.json"), "--distractors", str(data / "dis"),
            "--sizes", "10"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "Traceback" not in res.output and "no probe has a mate" in res.output
    assert "roc curve" not in res.output


def test_output_names_come_from_the_lists_or_the_options(data: Path, tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    _write_list(lists, "mydis_features_list.json_20_1", _others(20))
    plist = tmp_path / "myprobes_features_list.json"
    plist.write_text((data / "facescrub_features_list.json").read_text())
    run_megaface(_cfg(data, tmp_path / "a", probe_list=plist, distractor_lists=lists, sizes=(20, 100)))
    assert (tmp_path / "a" / "devkit" / "cmc_myprobes_mydis_facesearch_20_1.json").is_file()
    assert (tmp_path / "a" / "devkit" / "cmc_myprobes_mydis_facesearch_100_1.json").is_file()
    assert (tmp_path / "a" / "lists" / "mydis_features_list.json_100_1").is_file(), "the drawn list joins the set"
    result = json.loads((tmp_path / "a" / "result_facesearch_20_1.json").read_text())
    assert (result["probe_set"], result["distractor_set"]) == ("myprobes", "mydis")
    args = ["bench", "megaface", "--out", str(tmp_path / "b"), "--probes", str(data / "dis"), "--probe-list",
            str(plist), "--distractors", str(data / "dis"), "--distractor-lists", str(lists), "--sizes", "20",
            "--probe-name", "celebs", "--distractor-name", "flickr"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b" / "devkit" / "cmc_celebs_flickr_facesearch_20_1.json").is_file()
    res = CliRunner().invoke(main, [*args[:-1], "my_set"])
    assert res.exit_code != 0 and "'my_set'" in res.output and "Traceback" not in res.output
    # The official names stay: facescrub_features_list.json + megaface_features_list.json_<size>_<set>.
    official = tmp_path / "official"
    _write_list(official, "megaface_features_list.json_20_1", _others(20))
    run_megaface(_cfg(data, tmp_path / "c", distractor_lists=official))
    assert (tmp_path / "c" / "devkit" / "cmc_facescrub_megaface_facesearch_20_1.json").is_file()


def test_lists_of_two_sets_in_one_folder_are_refused(tmp_path: Path) -> None:
    _write_list(tmp_path, "megaface_features_list.json_10_1", _others(10))
    _write_list(tmp_path, "other_features_list.json_10_1", _others(10))
    with pytest.raises(ValueError, match=r"distractor lists of 2 sets \(megaface, other\)"):
        devkit.find_distractor_lists(tmp_path)
    assert devkit.list_set_name("facescrub_uncropped_features_list.json") == "facescrub"
    assert devkit.list_set_name("probes.json") == "probes"
    with pytest.raises(ValueError, match="no set name"):
        devkit.list_set_name("_x.json")
