"""Inputs of ``facesearch embed``: a flat folder labelled by a CelebA identity file, a CelebA root (identities and
landmarks from its lists), a FIFO named like an image (a ``not_a_file`` row, never a hang: neither the worker's read
nor the driver's probe may block), and a JPEG decoded past damaged data (kept, its warning in ``error``).  Synthetic
CelebA images and real ORL faces; an in-process Dask cluster as ``--scheduler``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from facesearch.indexer.embed import EmbedConfig, build_detector, embed_partition, plan_inputs
from facesearch.indexer.shards import read_manifest
from facesearch.model.faces.images import read_image
from facesearch.model.inference import Embedder


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """An in-process cluster (one worker thread) used as an external ``--scheduler``."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as c:
        yield c.scheduler_address


@pytest.fixture(scope="module")
def celeba(tmp_path_factory: pytest.TempPathFactory, synth_data: Path) -> Path:
    """A CelebA root of 8 synthetic images: ``img_align_celeba/``, ``identity_CelebA.txt`` naming all 8 and
    ``list_landmarks_align_celeba.txt`` (count line, header, 8 rows)."""
    src = synth_data / "celeba"
    root = tmp_path_factory.mktemp("celeba") / "CelebA"
    (root / "img_align_celeba").mkdir(parents=True)
    files = sorted(p.name for p in (src / "img_align_celeba").iterdir())[:8]
    for f in files:
        shutil.copy(src / "img_align_celeba" / f, root / "img_align_celeba" / f)
    idents = {line.split()[0]: line for line in (src / "identity_CelebA.txt").read_text().splitlines() if line}
    (root / "identity_CelebA.txt").write_text("".join(idents[f] + "\n" for f in files))
    lms = (src / "list_landmarks_align_celeba.txt").read_text().splitlines()
    rows = {line.split()[0]: line for line in lms[2:] if line}
    (root / "list_landmarks_align_celeba.txt").write_text("\n".join(["8", lms[1], *(rows[f] for f in files)]) + "\n")
    return root


def _identities(celeba: Path) -> dict[str, str]:
    return dict(line.split() for line in (celeba / "identity_CelebA.txt").read_text().splitlines())


def _cli(args: list[str]) -> tuple[int, str]:
    from facesearch.cli._app import main
    from facesearch.cli.embed import embed_command  # noqa: F401  registers the command

    res = CliRunner().invoke(main, args)
    return res.exit_code, res.output


def test_folder_labelled_by_an_identity_file(celeba: Path, tmp_path: Path) -> None:
    folder = celeba / "img_align_celeba"
    names = _identities(celeba)
    files = sorted(names)
    named = tmp_path / "ids.txt"  # names 6 of the 8 images, and one image the folder does not hold
    named.write_text("".join(f"{f} {names[f]}\n" for f in files[:6]) + "999999.jpg 77\n")
    cfg = EmbedConfig(input=folder, identities=named, checkpoint=tmp_path / "c", out=tmp_path / "o")
    items = plan_inputs(cfg)
    assert [it.rel for it in items] == files, "the folder's images are the rows, in sorted order"
    assert [it.identity for it in items] == [names[f] for f in files[:6]] + [None, None]
    assert all(it.landmarks is None for it in items)
    with pytest.raises(ValueError, match="identities file names the images of a folder or a CelebA root"):
        cfg.replace(format="list")
    with pytest.raises(FileNotFoundError, match="identity file"):
        plan_inputs(cfg.replace(identities=tmp_path / "absent.txt"))


def test_celeba_root(celeba: Path, tmp_path: Path) -> None:
    cfg = EmbedConfig(input=celeba, format="celeba", checkpoint=tmp_path / "c", out=tmp_path / "o")
    assert cfg.image_root == celeba / "img_align_celeba"
    items = plan_inputs(cfg)
    names = _identities(celeba)
    assert [(it.rel, it.identity) for it in items] == sorted(names.items())
    first = (celeba / "list_landmarks_align_celeba.txt").read_text().splitlines()[2].split()
    np.testing.assert_array_equal(items[0].landmarks, np.array(first[1:], np.float32).reshape(5, 2))
    other = tmp_path / "other_ids.txt"  # --identities replaces the root's identity file
    other.write_text("".join(f"{f} person{k % 2}\n" for k, f in enumerate(sorted(names))))
    assert {it.identity for it in plan_inputs(cfg.replace(identities=other))} == {"person0", "person1"}
    with pytest.raises(ValueError, match="root does not apply"):
        cfg.replace(root=tmp_path)


def test_cli_identities_and_celeba(celeba: Path, ckpt: Path, yunet_path: Path, scheduler: str, tmp_path: Path) -> None:
    names = _identities(celeba)
    named = tmp_path / "ids.txt"
    named.write_text("".join(f"{f} {names[f]}\n" for f in sorted(names)[:6]))
    common = ["--checkpoint", str(ckpt), "--device", "cpu", "--scheduler", scheduler, "--shard-rows", "5"]
    code, output = _cli(["embed", "--input", str(celeba / "img_align_celeba"), "--identities", str(named),
                         "--out", str(tmp_path / "a"), "--detector-model", str(yunet_path), *common])  # fmt: skip
    assert code == 0, output
    assert "identity     2 images not named by the identity file (embedded, identity null)" in output
    table = pa.concat_tables(pq.read_table(tmp_path / "a" / e.file) for e in read_manifest(tmp_path / "a").shards)
    assert table.column("identity").to_pylist() == [names[f] for f in sorted(names)[:6]] + [None, None]
    code, output = _cli(["embed", "--celeba", str(celeba), "--out", str(tmp_path / "b"), *common])
    assert code == 0, output
    assert "rows         8 (8 ok; failed: none)" in output and "identity " not in output
    man = read_manifest(tmp_path / "b")
    table = pa.concat_tables(pq.read_table(tmp_path / "b" / e.file) for e in man.shards)
    assert table.column("identity").to_pylist() == [names[f] for f in sorted(names)]
    assert table.column("det_score").null_count == 8, "landmarks from the list: nothing detected"
    assert man.source["format"] == "celeba" and man.source["detection"]["used"] is False
    code, output = _cli(["embed", "--list", str(named), "--identities", str(named), "--out", str(tmp_path / "c"),
                         *common])  # fmt: skip
    assert code == 2 and "--identities labels the images of --input or --celeba" in output
    code, output = _cli(["embed", "--celeba", str(celeba), "--input", str(celeba), "--out", str(tmp_path / "c"),
                         *common])  # fmt: skip
    assert code == 2 and "exactly one of --input, --list, --devkit, --celeba" in output


def _damaged_jpeg(good: bytes) -> bytes:
    """``good`` with 4 bytes inverted in the middle of its entropy-coded scan (libjpeg warns, still decodes)."""
    sos = good.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(good[sos + 2 : sos + 4], "big")
    mid = (start + len(good) - 2) // 2
    return good[:mid] + bytes(b ^ 0xFF for b in good[mid : mid + 4]) + good[mid + 4 :]


@pytest.fixture
def odd_inputs(
    tmp_path: Path, orl_dir: Path, yunet_path: Path, fifo: Callable[..., Any]
) -> Iterator[tuple[Path, list[float]]]:
    """``s1/good.jpg`` and ``s1/bad.jpg`` (ORL s1/1 as JPEG, intact and damaged), ``s1/2.pgm`` with sidecar
    landmarks (found by YuNet on the intact images), and ``zz/pipe.jpg``: a FIFO, last in order (the probe samples
    the first and last images), with the watchdog's list of releases of blocked readers."""
    root = tmp_path / "in"
    (root / "s1").mkdir(parents=True)
    good = cv2.imencode(".jpg", cv2.imread(str(orl_dir / "s1/1.pgm")))[1].tobytes()
    (root / "s1/good.jpg").write_bytes(good)
    (root / "s1/bad.jpg").write_bytes(_damaged_jpeg(good))
    shutil.copy(orl_dir / "s1/2.pgm", root / "s1/2.pgm")
    detector = build_detector(EmbedConfig(input=root, checkpoint=root, out=root, detector_pad=20,
                                          detector_model=yunet_path))  # fmt: skip
    for src, names in (("s1/good.jpg", ("good.jpg", "bad.jpg")), ("s1/2.pgm", ("2.pgm",))):
        lm = detector.detect_faces(read_image(root / src))[0].landmarks
        for name in names:
            (root / "s1" / f"{name}.json").write_text(json.dumps(np.asarray(lm).tolist()))
    with fifo(root / "zz/pipe.jpg") as released:
        yield root, released


@pytest.mark.timeout(120)
def test_fifo_and_damaged_jpeg_rows(odd_inputs: tuple[Path, list[float]], ckpt: Path, tmp_path: Path) -> None:
    root, released = odd_inputs
    cfg = EmbedConfig(input=root, checkpoint=ckpt, out=tmp_path / "out", sidecars=True, device="cpu")
    items = plan_inputs(cfg)
    assert [it.rel for it in items] == ["s1/2.pgm", "s1/bad.jpg", "s1/good.jpg", "zz/pipe.jpg"]
    rows = {r["path"]: r for r in embed_partition(items, Embedder(ckpt, "cpu"), None, cfg).to_pylist()}
    assert rows["zz/pipe.jpg"]["status"] == "not_a_file" and rows["zz/pipe.jpg"]["embedding"] is None
    assert "is a FIFO (named pipe), not a regular file" in rows["zz/pipe.jpg"]["error"]
    bad, good = rows["s1/bad.jpg"], rows["s1/good.jpg"]
    assert bad["status"] == good["status"] == "ok" and bad["embedding"] is not None, "kept: it is decodable"
    assert good["error"] is None and bad["error"].startswith("s1/bad.jpg: decoded despite damaged data (Corrupt JPEG")
    # same landmarks, other pixels below the damage: the embedding moved
    assert not np.allclose(bad["embedding"], good["embedding"], atol=1e-3)
    assert not released, "nothing blocked on the pipe"


@pytest.mark.timeout(120)
def test_fifo_and_damaged_jpeg_in_a_run(odd_inputs: tuple[Path, list[float]], ckpt: Path, scheduler: str,
                                        tmp_path: Path) -> None:  # fmt: skip
    # The probe samples the last image, the FIFO: the driver must not open it blocking, nor may the worker.
    root, released = odd_inputs
    code, output = _cli(["embed", "--input", str(root), "--sidecars", "--checkpoint", str(ckpt), "--out",
                         str(tmp_path / "out"), "--device", "cpu", "--scheduler", scheduler])  # fmt: skip
    assert code == 0, output
    assert "rows         4 (3 ok; failed: 1 not_a_file)" in output
    assert "warnings     1 ok rows decoded past damaged JPEG data (kept; the decoder's warning is in their error " \
        "column)" in output  # fmt: skip
    assert not released, "nothing blocked on the pipe"
