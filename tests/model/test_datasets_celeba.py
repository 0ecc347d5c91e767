"""CelebA-style inputs on files the synthetic generator wrote: a root with only the identity file, a flat image folder
plus an identity file, partial list files (a count line larger than the rows), a missing partition file, and the
malformed-row cases (bad lines named by number, duplicated rows, rows for missing images)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from facesearch.model.faces.datasets import read_celeba, read_identity_file
from facesearch.model.train import train
from facesearch.model.train_config import StageConfig, TrainConfig
from facesearch.model.trainer_data import read_samples

LISTS = ("list_attr_celeba.txt", "list_landmarks_align_celeba.txt", "identity_CelebA.txt", "list_eval_partition.txt")
COUNTED = ("list_attr_celeba.txt", "list_landmarks_align_celeba.txt")


def celeba_copy(synth_data: Path, dst: Path, n: int = 60, lists: tuple[str, ...] = LISTS,
                declared: int | None = None) -> Path:  # fmt: skip
    """The first ``n`` images of the synthetic CelebA set and the first ``n`` rows of each of ``lists``; the count line
    of the counted lists says ``declared`` (default ``n``)."""
    src = synth_data / "celeba"
    (dst / "img_align_celeba").mkdir(parents=True)
    for k in range(1, n + 1):
        shutil.copy2(src / "img_align_celeba" / f"{k:06d}.jpg", dst / "img_align_celeba" / f"{k:06d}.jpg")
    for name in lists:
        lines = (src / name).read_text().splitlines()
        if name in COUNTED:
            lines = [str(n if declared is None else declared), lines[1], *lines[2 : 2 + n]]
        else:
            lines = lines[:n]
        (dst / name).write_text("\n".join(lines) + "\n")
    return dst


def test_identity_file_alone_is_a_celeba_root(synth_data: Path, tmp_path: Path) -> None:
    root = celeba_copy(
        synth_data, tmp_path / "celeba", lists=("identity_CelebA.txt", "list_landmarks_align_celeba.txt")
    )
    samples = read_celeba(root)
    truth = dict(line.split() for line in (root / "identity_CelebA.txt").read_text().splitlines())
    assert [s.path.name for s in samples] == sorted(truth)
    assert all(s.identity == truth[s.path.name] and s.attributes is None for s in samples)
    assert all(s.landmarks is not None for s in samples), "the landmark list still applies"
    assert read_samples(root, "celeba") == samples


def test_a_root_with_neither_list_names_both(synth_data: Path, tmp_path: Path) -> None:
    root = celeba_copy(synth_data, tmp_path / "celeba", lists=("list_landmarks_align_celeba.txt",))
    with pytest.raises(FileNotFoundError, match=r"neither list_attr_celeba\.txt .* nor identity_CelebA\.txt"):
        read_celeba(root)
    with pytest.raises(FileNotFoundError, match=r"CelebA root .*nothere does not exist"):
        read_celeba(tmp_path / "nothere")


def test_flat_folder_with_an_identity_file(synth_data: Path, tmp_path: Path) -> None:
    root = celeba_copy(synth_data, tmp_path / "celeba", lists=("identity_CelebA.txt",))
    images, ids = root / "img_align_celeba", root / "identity_CelebA.txt"
    samples = read_identity_file(ids, images)
    assert len(samples) == 60 and all(s.path.parent == images and s.path.is_file() for s in samples)
    assert samples[0].identity == ids.read_text().split()[1] and samples[0].landmarks is None
    assert read_samples(images, "flat", identities=ids) == samples
    with pytest.raises(ValueError, match="flat needs an identity file"):
        read_samples(images, "flat")
    with pytest.raises(FileNotFoundError, match=r"image folder .*nothere does not exist"):
        read_identity_file(ids, tmp_path / "nothere")
    # --identities with a CelebA root replaces the root's own identity file.
    other = tmp_path / "other_ids.txt"
    other.write_text("".join(f"{k:06d}.jpg person{k % 3}\n" for k in range(1, 61)))
    assert {s.identity for s in read_celeba(root, identities=other)} == {"person0", "person1", "person2"}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("000001.jpg 5\n000002.jpg\n", r"identity_CelebA\.txt:2: expected a file name and 1 values, got 1 cells"),
        ("000001.jpg 5\n\n000002.jpg 7 9\n", r"identity_CelebA\.txt:3: expected a file name and 1 values"),
        ("000001.jpg 5\n000002.jpg 6\n000001.jpg 7\n", r"identity_CelebA\.txt:3: duplicate file 000001\.jpg "
                                                        r"\(first on line 1\) with different values"),
        ("\n\n", r"identity_CelebA\.txt has no rows"),
    ],
)  # fmt: skip
def test_identity_file_errors_name_the_line(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "identity_CelebA.txt").write_text(text)
    with pytest.raises(ValueError, match=match):
        read_identity_file(tmp_path / "identity_CelebA.txt", tmp_path / "img")


def test_identity_file_repeated_rows_and_missing_images(synth_data: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    root = celeba_copy(synth_data, tmp_path / "celeba", n=10, lists=("identity_CelebA.txt",))
    lines = (root / "identity_CelebA.txt").read_text().splitlines()
    extra = [lines[3], "000099.jpg 5"]  # an exact repeat, and a row whose image is not in the folder
    (root / "identity_CelebA.txt").write_text("\n".join([*lines, *extra]) + "\n")
    with caplog.at_level(logging.WARNING):
        samples = read_identity_file(root / "identity_CelebA.txt", root / "img_align_celeba")
    assert len(samples) == 11, "the repeat is read once; the missing image is listed (the readability check counts it)"
    assert "1 repeated row" in caplog.text and "line 4" in caplog.text


def test_partial_list_files_are_read_with_a_warning(synth_data: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    # The real lists cut to their first rows: the count line still says 202599.
    root = celeba_copy(synth_data, tmp_path / "celeba", n=40, declared=202599)
    with caplog.at_level(logging.WARNING):
        samples = read_celeba(root)
    assert len(samples) == 40 and all(s.attributes and s.landmarks is not None for s in samples)
    assert "list_attr_celeba.txt declares 202599 rows but holds 40" in caplog.text
    assert "partial copy" in caplog.text


def test_more_rows_than_declared_is_still_an_error(synth_data: Path, tmp_path: Path) -> None:
    root = celeba_copy(synth_data, tmp_path / "celeba", n=40, declared=30)
    with pytest.raises(ValueError, match=r"list_attr_celeba\.txt:1: declares 30 rows but has 40"):
        read_celeba(root)


def test_missing_partition_file_suggests_split_all(synth_data: Path, tmp_path: Path) -> None:
    root = celeba_copy(synth_data, tmp_path / "celeba", lists=("list_attr_celeba.txt", "identity_CelebA.txt"))
    assert len(read_celeba(root)) == 60, "no partition asked for: the file is not needed"
    with pytest.raises(FileNotFoundError) as err:
        read_celeba(root, partition=2)
    message = str(err.value)
    assert "list_eval_partition.txt does not exist" in message and "--split all" in message
    assert "\n" not in message and "Errno" not in message


def test_partition_file_errors_and_unlisted_images(synth_data: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    root = celeba_copy(synth_data, tmp_path / "celeba", n=20)
    lines = (root / "list_eval_partition.txt").read_text().splitlines()
    (root / "list_eval_partition.txt").write_text("\n".join(lines[:15]) + "\n")
    with caplog.at_level(logging.WARNING):
        parts = [read_celeba(root, partition=p) for p in (0, 1, 2)]
    assert sum(map(len, parts)) == 15 and "5 images are not in" in caplog.text
    (root / "list_eval_partition.txt").write_text("\n".join([*lines[:3], "000004.jpg 7"]) + "\n")
    with pytest.raises(ValueError, match=r"list_eval_partition\.txt:4: the split must be 0, 1 or 2, got '7'"):
        read_celeba(root, partition=0)


def test_identity_training_on_a_celeba_root_without_attributes(synth_data: Path, tmp_path: Path) -> None:
    root = celeba_copy(synth_data, tmp_path / "celeba", n=120,
                       lists=("identity_CelebA.txt", "list_landmarks_align_celeba.txt"))  # fmt: skip
    cfg = TrainConfig(data=root, out=tmp_path / "run", data_format="celeba", arch="fast", width=0.125,
                      input_size=(56, 48), embedding_dim=32, attribute_hidden=16, batch_size=16, num_workers=0,
                      precision="fp32", device="cpu", stages=(StageConfig(3, 0.05),), val_every=0,
                      checkpoint_every=0)  # fmt: skip
    for name in ("000007.jpg", "000050.jpg", "000101.jpg"):  # rows of the identity file whose image is missing
        (root / "img_align_celeba" / name).unlink()
    result = train(cfg)
    assert result.complete and result.num_identities == len({s.identity for s in read_celeba(root)})
    assert result.skipped_summary == "skipped 3 of 120 files: 3 missing"


def test_cli_trains_on_a_flat_folder_with_identities(synth_data: Path, tmp_path: Path, yunet_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from click.testing import CliRunner

    import facesearch.cli.train  # noqa: F401  (registers `train`)
    from facesearch.cli._app import main

    monkeypatch.setenv("FACESEARCH_YUNET", str(yunet_path))
    root = celeba_copy(synth_data, tmp_path / "celeba", n=80, lists=("identity_CelebA.txt",))
    out = tmp_path / "run"
    args = ["train", "--data", str(root / "img_align_celeba"), "--identities", str(root / "identity_CelebA.txt"),
            "--arch", "fast", "--width", "0.125", "--input-size", "56x48", "--embedding-dim", "32",
            "--stage1-iterations", "3", "--stage2-iterations", "0", "--batch-size", "16", "--workers", "0",
            "--precision", "fp32", "--device", "cpu", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "steps        3/3 (complete)" in r.output
    assert (out / "detections.jsonl").is_file()
    r = CliRunner().invoke(main, ["train", "--data", str(root / "img_align_celeba"), "--format", "flat",
                                  "--out", str(tmp_path / "run2")])  # fmt: skip
    assert r.exit_code != 0 and "needs an identity file" in r.output and "Traceback" not in r.output
