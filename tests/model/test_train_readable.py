"""Training on data that is mostly not there: the readability check before training (existence and size of every
listed file), decode failures counted during training, skipped steps reported in the metrics and the summary, and
runs that stop with a one-line error when too much is missing or too many steps were skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import facesearch.cli.train  # noqa: F401  (registers `train`)
from facesearch.cli._app import main
from facesearch.model.train import train
from facesearch.model.train_config import StageConfig, TrainConfig

from .test_datasets_celeba import celeba_copy

torch.set_num_threads(1)


@pytest.fixture
def casia_list(synth_data: Path, tmp_path: Path) -> Path:
    """A copy of the synthetic CASIA set (24 identities x 8 images) read through its list CSV (paths + landmarks)."""
    root = tmp_path / "casia"
    shutil.copytree(synth_data / "casia", root)
    return root / "landmarks.csv"


def images(data: Path) -> list[Path]:
    return sorted(data.parent.glob("*/*.jpg"))


def config(data: Path, out: Path, **changes: object) -> TrainConfig:
    base: dict[str, object] = dict(
        data=data, out=out, data_format="list", arch="fast", width=0.125, input_size=(56, 48), embedding_dim=32,
        attribute_hidden=16, batch_size=16, num_workers=0, precision="fp32", device="cpu",
        stages=(StageConfig(6, 0.05),), log_every=2, val_every=0, checkpoint_every=0,
    )  # fmt: skip
    base.update(changes)
    return TrainConfig(**base)  # type: ignore[arg-type]


def train_records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "train"]


def test_mostly_missing_files_stop_before_training(casia_list: Path, tmp_path: Path) -> None:
    files = images(casia_list)
    for f in files[20:]:
        f.unlink()
    cfg = config(casia_list, tmp_path / "run")
    with pytest.raises(ValueError) as err:
        train(cfg)
    message = str(err.value)
    assert "only 20 of 192 listed images are readable" in message and "172 missing" in message
    assert str(files[20]) in message and "min_readable 0.9" in message and "\n" not in message
    assert not (cfg.out / "checkpoint.safetensors").exists() and not (cfg.out / "metrics.jsonl").exists()


def test_mostly_missing_celeba_images_stop_the_cli_with_one_line(synth_data: Path, tmp_path: Path) -> None:
    """The reported case: CelebA list files for many more images than the folder holds."""
    root = celeba_copy(synth_data, tmp_path / "celeba", n=60)
    for f in sorted((root / "img_align_celeba").iterdir())[6:]:
        f.unlink()
    args = ["train", "--data", str(root), "--format", "celeba", "--arch", "fast", "--width", "0.125", "--input-size",
            "56x48", "--stage1-iterations", "4", "--stage2-iterations", "0", "--batch-size", "8", "--workers", "0",
            "--device", "cpu", "--out", str(tmp_path / "run")]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert "only 6 of 60 listed images are readable" in r.output and "54 missing" in r.output
    assert "--min-readable" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_a_few_missing_files_train_and_are_counted(casia_list: Path, tmp_path: Path) -> None:
    for f in images(casia_list)[:3]:
        f.unlink()
    result = train(config(casia_list, tmp_path / "run"))
    assert result.complete and result.skipped_steps == 0
    assert result.skipped_summary == "skipped 3 of 192 files: 3 missing", "counted up front, visited or not"
    skipped = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["reason"] for s in skipped) == ["missing"] * 3


def test_skipped_steps_are_reported_and_limited(casia_list: Path, tmp_path: Path) -> None:
    for f in images(casia_list)[24:]:
        f.unlink()
    # 24 of 192 readable: most 16-image batches hold fewer than 2 readable images, so those steps are skipped.
    cfg = config(casia_list, tmp_path / "run", min_readable=0.1, max_skipped_steps=1.0)
    result = train(cfg)
    assert result.complete and result.skipped_steps > 0
    records = train_records(cfg.out)
    assert sum(r["skipped_steps"] for r in records) == result.skipped_steps
    assert "168 missing" in result.skipped_summary
    with pytest.raises(ValueError, match=r"steps were skipped .*max_skipped_steps 0\.1"):
        train(cfg.replace(out=tmp_path / "strict", max_skipped_steps=0.1))
    assert (tmp_path / "strict" / "skipped.jsonl").is_file(), "the skipped files are listed before it stops"


def test_cli_summary_names_skipped_steps(casia_list: Path, tmp_path: Path) -> None:
    for f in images(casia_list)[24:]:
        f.unlink()
    args = ["train", "--data", str(casia_list), "--format", "list", "--arch", "fast", "--width", "0.125",
            "--input-size", "56x48", "--embedding-dim", "32", "--stage1-iterations", "6", "--stage2-iterations", "0",
            "--batch-size", "16", "--workers", "0", "--precision", "fp32", "--device", "cpu", "--min-readable", "0.1",
            "--max-skipped-steps", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("skipped steps"))
    assert line.split()[2].isdigit() and int(line.split()[2]) > 0 and "of 6" in line


def test_decode_failures_count_toward_the_readable_fraction(casia_list: Path, tmp_path: Path) -> None:
    # 40 % of the files exist and have a size but are not images: the up-front check passes, training stops.
    for f in images(casia_list)[::5] + images(casia_list)[1::5]:
        f.write_bytes(b"<html><body>404 Not Found</body></html>\n" * 20)
    cfg = config(casia_list, tmp_path / "run", stages=(StageConfig(40, 0.05),))
    with pytest.raises(ValueError, match=r"of 192 images are unreadable \(.*not_an_image.*\).* min_readable 0\.9"):
        train(cfg)
    skipped = [json.loads(line) for line in (cfg.out / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) > 19 and {s["reason"] for s in skipped} == {"not_an_image"}


def test_config_rejects_bad_fractions(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_readable must be in"):
        TrainConfig(data=tmp_path, min_readable=1.5)
    with pytest.raises(ValueError, match="max_skipped_steps must be in"):
        TrainConfig(data=tmp_path, max_skipped_steps=-0.1)
