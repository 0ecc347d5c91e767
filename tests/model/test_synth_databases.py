"""Multi-database training data: the categorical hair colour of synthetic people, categorical columns of the list
CSV, and the two CelebA-style list-CSV databases of ``--celeba-databases`` (disjoint people, differing label sets)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from facesearch.cli import main
from facesearch.model.faces.samples import read_list
from facesearch.model.faces.synth import MANIFEST, SynthConfig, generate_faces
from facesearch.model.faces.synth_identity import _HAIR_P, _HAIRS, HAIR_COLOURS, sample_identity
from facesearch.model.trainer_data import read_samples

SEED = 1
#: 20 people of 6 images: 16 in the train partition (2 validation, 2 test), 8 per database.
SMALL: dict[str, Any] = dict(seed=SEED, layouts=("celeba",), celeba_images=120, celeba_images_per_identity=6,
                             workers=1, celeba_databases=True)  # fmt: skip
A_COLUMNS = ["Male", "Big_Nose", "Pointy_Nose", "Narrow_Eyes"]
B_COLUMNS = ["Male", "Chubby", "Double_Chin", "High_Cheekbones", "Hair_Colour"]


@pytest.fixture(scope="module")
def dbs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthdb") / "d"
    generate_faces(SynthConfig(out=out, **SMALL))
    return out


def _celeba_lists(celeba: Path) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]], dict[str, list]]:
    """Partition, identity, 0/1 attributes and integer landmarks per file name, from the four CelebA list files."""
    part = dict(line.split() for line in (celeba / "list_eval_partition.txt").read_text().splitlines())
    ident = dict(line.split() for line in (celeba / "identity_CelebA.txt").read_text().splitlines())
    lines = (celeba / "list_attr_celeba.txt").read_text().splitlines()
    names = lines[1].split()
    attrs = {f: {n: int(v == "1") for n, v in zip(names, vals, strict=True)} for f, *vals in map(str.split, lines[2:])}
    lms = {f: [int(v) for v in xy] for f, *xy in map(str.split, (celeba / "list_landmarks_align_celeba.txt")
                                                    .read_text().splitlines()[2:])}  # fmt: skip
    return part, ident, attrs, lms


# ------------------------------------------------------------------------------------------------ hair colour trait
#: Fields of three people recorded before ``hair_colour`` was added: adding it must not change any other trait.
PINNED = {
    (0, 1, 0): dict(hair_colour=3, face_w=0.9996089814151549, hair=(109.32949040653791, 166.3709636621229,
                    204.3986124991796), hair_style=0, ear=1.080755760108273, nose_w=0.24354590291745626),
    (0, 1, 7): dict(hair_colour=1, face_w=1.0673702543584644, hair=(31.07538001446882, 46.61307002170323,
                    72.50922003376058), stubble=0.9954636435795109, eye_ap=0.21674021005684357),
    (5, 2, 13): dict(hair_colour=0, face_w=1.2341209531779005, hair=(24.286962992724213, 24.286962992724213,
                     29.144355591269058), iris=(30.0, 50.0, 90.0), lip_lo=0.09359988246918517),
}  # fmt: skip


def test_adding_hair_colour_changed_no_other_trait() -> None:
    for args, fields in PINNED.items():
        idn = sample_identity(*args)
        assert {k: getattr(idn, k) for k in fields} == fields, args
    assert sample_identity(0, 1, 0).labels == (0, 1, 1, 0, 0, 1, 1) and len(sample_identity(0, 1, 0).moles) == 2


def test_hair_colour_indexes_the_palette_row_the_hair_was_drawn_from() -> None:
    """``hair`` is ``_HAIRS[hair_colour]`` times one brightness factor (the same for all three channels), which no
    other palette row matches; the classes follow the palette's probabilities."""
    assert len(HAIR_COLOURS) == len(_HAIRS) == len(_HAIR_P) and HAIR_COLOURS[3] == "blond"
    classes = []
    for i in range(2000):
        idn = sample_identity(0, 2, i)
        assert 0 <= idn.hair_colour < len(HAIR_COLOURS)
        ratio = np.array(idn.hair) / _HAIRS
        fits = np.flatnonzero(np.ptp(ratio, axis=1) < 1e-9)
        assert fits.tolist() == [idn.hair_colour], (i, idn.hair, idn.hair_colour)
        classes.append(idn.hair_colour)
    share = np.bincount(classes, minlength=len(HAIR_COLOURS)) / len(classes)
    assert np.abs(share - np.array(_HAIR_P)).max() < 0.03, share


# ----------------------------------------------------------------------------------------- read_list: categorical
def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_list_categorical_columns(tmp_path: Path) -> None:
    f = _csv(tmp_path / "l.csv", "path,identity,Male,Hair_Colour\na.jpg,1,1,3\nb.jpg,1,0,\nc.jpg,2,,-1\nd.jpg,2,1,0\n")
    samples = read_list(f, categorical=["Hair_Colour"])
    assert [s.attributes for s in samples] == [{"Male": 1.0, "Hair_Colour": 3.0}, {"Male": 0.0}, {},
                                               {"Male": 1.0, "Hair_Colour": 0.0}]  # fmt: skip
    assert isinstance(samples[0].attributes["Hair_Colour"], float)  # type: ignore[index]


@pytest.mark.parametrize("cell", ["1.5", "-2", "blond", "nan"])
def test_read_list_bad_categorical_value_names_file_line_and_column(tmp_path: Path, cell: str) -> None:
    f = _csv(tmp_path / "l.csv", f"path,Male,Hair_Colour\na.jpg,1,2\nb.jpg,0,{cell}\n")
    with pytest.raises(ValueError, match=r"l\.csv:3: categorical attribute Hair_Colour must be an integer class >= 0"):
        read_list(f, categorical=["Hair_Colour"])


def test_read_list_unknown_categorical_name_lists_the_columns(tmp_path: Path) -> None:
    f = _csv(tmp_path / "l.csv", "path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5,Male,Chubby\na.jpg,1,1,2,2,3,3,4,4,5,5,1,0\n")
    with pytest.raises(ValueError, match=r"l\.csv: categorical column\(s\) \['Hair'\].*\['Male', 'Chubby'\]"):
        read_list(f, categorical=["Hair"])


def test_read_list_hints_at_an_undeclared_categorical_column(tmp_path: Path) -> None:
    f = _csv(tmp_path / "l.csv", "path,Male,Hair_Colour\na.jpg,1,1\nb.jpg,0,4\n")
    with pytest.raises(ValueError, match=r"l\.csv:3: .*Hair_Colour.*declare it: --categorical Hair_Colour"):
        read_list(f)
    f = _csv(tmp_path / "m.csv", "path,Male\na.jpg,1.5\n")  # not an integer: no hint
    with pytest.raises(ValueError, match=r"m\.csv:2: attribute Male must be in \[0, 1\]") as e:
        read_list(f)
    assert "categorical" not in str(e.value)


def test_read_samples_passes_categorical_to_list_only(tmp_path: Path) -> None:
    f = _csv(tmp_path / "l.csv", "path,identity,Hair_Colour\na.jpg,1,5\n")
    assert [s.attributes for s in read_samples(f, "list", categorical=["Hair_Colour"])] == [{"Hair_Colour": 5.0}]
    with pytest.raises(ValueError, match="declare it"):
        read_samples(f, "list")
    for fmt in ("celeba", "casia", "flat"):
        with pytest.raises(ValueError, match=r"categorical columns .* are read from list CSVs"):
            read_samples(tmp_path, fmt, categorical=["Hair_Colour"])


# ------------------------------------------------------------------------------------------- the two databases
def test_databases_read_back_with_disjoint_train_people(dbs: Path) -> None:
    celeba = dbs / "celeba"
    part, ident, attrs, lms = _celeba_lists(celeba)
    a = read_list(celeba / "databases/a.csv")
    b = read_list(celeba / "databases/b.csv", categorical=["Hair_Colour"])
    assert (celeba / "databases/a.csv").read_text().splitlines()[0] == (
        "path,identity,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5," + ",".join(A_COLUMNS)
    )
    assert (celeba / "databases/b.csv").read_text().splitlines()[0].endswith(",".join(B_COLUMNS))
    people_a, people_b = {s.identity for s in a}, {s.identity for s in b}
    assert len(people_a) == len(people_b) == 8 and not people_a & people_b
    train = {f for f, p in part.items() if p == "0"}
    assert {s.path.name for s in a + b} == train, "every train image in exactly one database, nothing else"
    assert len(a) + len(b) == len(train) == 96
    assert sorted(int(i) for i in people_a | people_b)[::2] == sorted(int(i) for i in people_a), "alternating"
    for db, columns in ((a, A_COLUMNS), (b, B_COLUMNS)):
        for s in db:
            f = s.path.name
            assert s.path.is_file() and s.path.resolve().parent == (celeba / "img_align_celeba").resolve()
            assert s.identity == ident[f]
            assert s.landmarks is not None and s.landmarks.ravel().tolist() == lms[f]
            assert s.attributes is not None and list(s.attributes) == columns
            assert {c: s.attributes[c] for c in columns if c != "Hair_Colour"} == {
                c: float(attrs[f][c]) for c in columns if c != "Hair_Colour"
            }
    for s in b:
        hair = sample_identity(SEED, 2, int(s.identity) - 1).hair_colour  # type: ignore[arg-type]
        assert s.attributes is not None and s.attributes["Hair_Colour"] == float(hair)
        assert 0 <= hair < len(HAIR_COLOURS)


def test_a_has_no_categorical_column(dbs: Path) -> None:
    with pytest.raises(ValueError, match=r"a\.csv: categorical column\(s\) \['Hair_Colour'\]"):
        read_list(dbs / "celeba/databases/a.csv", categorical=["Hair_Colour"])


def test_manifest_records_the_databases(dbs: Path) -> None:
    man = json.loads((dbs / MANIFEST).read_text())
    assert man["config"]["celeba_databases"] is True
    assert man["celeba_databases"] == {
        "a": {"file": "celeba/databases/a.csv", "images": 48, "people": 8, "attributes": A_COLUMNS,
              "categorical": {}},
        "b": {"file": "celeba/databases/b.csv", "images": 48, "people": 8, "attributes": B_COLUMNS,
              "categorical": {"Hair_Colour": list(HAIR_COLOURS)}},
    }  # fmt: skip
    assert not list(dbs.rglob("*.tmp"))


def test_option_needs_the_celeba_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"celeba_databases \(--celeba-databases\) needs the celeba layout"):
        SynthConfig(out=tmp_path, layouts=("casia", "megaface"), celeba_databases=True)
    with pytest.raises(ValueError, match="at least 2 train-partition people"):
        generate_faces(SynthConfig(out=tmp_path / "one", **{**SMALL, "celeba_images": 6}))
    assert not (tmp_path / "one").exists(), "refused before writing anything"
    res = CliRunner().invoke(main, ["synth", "faces", "--out", str(tmp_path / "c"), "--layouts", "casia",
                                    "--celeba-databases", "--no-progress"])  # fmt: skip
    assert res.exit_code == 1 and "--celeba-databases" in res.output and "Traceback" not in res.output


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_off_writes_the_same_files_and_old_manifests_still_resume(tmp_path: Path) -> None:
    """Without the option the output is what it always was (the databases are the only extra files), a manifest from
    before the option (no such key) is recognised as the same config, and switching the option is refused."""
    small = {**SMALL, "celeba_images": 24, "celeba_images_per_identity": 3}  # 8 people, 6 of them train
    res = CliRunner().invoke(main, ["synth", "faces", "--out", str(tmp_path / "on"), "--layouts", "celeba",
                                    "--celeba-images", "24", "--celeba-images-per-identity", "3", "--seed", str(SEED),
                                    "--workers", "1", "--celeba-databases", "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    off = SynthConfig(out=tmp_path / "off", **{**small, "celeba_databases": False})
    generate_faces(off)
    on_files, off_files = _files(tmp_path / "on"), _files(tmp_path / "off")
    on_files.pop(MANIFEST), off_files.pop(MANIFEST)
    assert sorted(set(on_files) - set(off_files)) == ["celeba/databases/a.csv", "celeba/databases/b.csv"]
    assert all(off_files[k] == on_files[k] for k in off_files)
    man_path = tmp_path / "off" / MANIFEST
    man = json.loads(man_path.read_text())
    assert "celeba_databases" not in man
    del man["config"]["celeba_databases"]  # as written before the option existed
    man_path.write_text(json.dumps(man))
    generate_faces(off)  # same config: fine
    with pytest.raises(ValueError, match=r"different config \(celeba_databases: False -> True\)"):
        generate_faces(SynthConfig(out=tmp_path / "off", **small))
    with pytest.raises(ValueError, match=r"different config \(celeba_databases: True -> False\)"):
        generate_faces(SynthConfig(out=tmp_path / "on", **{**small, "celeba_databases": False}))
