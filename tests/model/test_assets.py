"""The one resolver of external files (YuNet, the MegaFace noise lists): explicit path, then $FACESEARCH_YUNET /
$FACESEARCH_SHARED, then ../shared beside the checkout; a clear error saying where to put a missing file, raised
before any Dask work starts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from facesearch.model import assets
from facesearch.model.faces.detect import FaceDetector


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(assets.YUNET_ENV, raising=False)
    monkeypatch.delenv(assets.SHARED_ENV, raising=False)
    return monkeypatch


def _fake_shared(root: Path) -> Path:
    (root / assets.YUNET_IN_SHARED).parent.mkdir(parents=True)
    (root / assets.YUNET_IN_SHARED).write_bytes(b"onnx")
    (root / assets.NOISES_IN_SHARED).mkdir(parents=True)
    (root / assets.NOISES_IN_SHARED / "megaface_noises.txt").write_text("x\n")
    return root


def test_explicit_path_wins_over_everything(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    shared = _fake_shared(tmp_path / "shared")
    clean_env.setenv(assets.SHARED_ENV, str(shared))
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"onnx")
    assert assets.yunet_path(mine) == mine
    with pytest.raises(assets.AssetNotFoundError, match=r"gone\.onnx \(given\).*--detector-model"):
        assets.yunet_path(tmp_path / "gone.onnx")


def test_yunet_env_is_final_when_set(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    shared = _fake_shared(tmp_path / "shared")
    clean_env.setenv(assets.SHARED_ENV, str(shared))
    assert assets.yunet_path() == shared / assets.YUNET_IN_SHARED
    clean_env.setenv(assets.YUNET_ENV, str(tmp_path / "wrong.onnx"))  # a wrong setting is reported, not passed over
    with pytest.raises(FileNotFoundError, match=r"wrong\.onnx \(from \$FACESEARCH_YUNET\)"):
        assets.yunet_path()


def test_shared_env_finds_the_noise_lists(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    shared = _fake_shared(tmp_path / "shared")
    clean_env.setenv(assets.SHARED_ENV, str(shared))
    assert assets.shared_dir() == shared
    assert assets.noise_list("megaface_noises.txt") == shared / assets.NOISES_IN_SHARED / "megaface_noises.txt"
    assert assets.noise_list("facescrub_noises.txt") is None  # absent: the caller decides
    assert assets.noise_list("x.txt", tmp_path / "given.txt") == tmp_path / "given.txt"


def test_checkout_shared_is_the_folder_beside_the_repository(clean_env: pytest.MonkeyPatch) -> None:
    repo = Path(__file__).resolve().parents[2]
    found = assets.checkout_shared()
    if (repo.parent / "shared").is_dir():
        assert found == repo.parent / "shared"
        assert assets.shared_dir() == found
    else:
        assert found is None


def test_nothing_found_says_what_was_tried_and_where_to_put_it(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setattr(assets, "checkout_shared", lambda: None)  # as in an installed wheel
    assert assets.find_yunet() is None
    with pytest.raises(assets.AssetNotFoundError) as e:
        assets.yunet_path()
    text = str(e.value)
    assert "are unset" in text and assets.YUNET_ENV in text and assets.SHARED_ENV in text
    assert assets.YUNET_IN_SHARED.as_posix() in text
    with pytest.raises(FileNotFoundError, match="YuNet"):
        FaceDetector()


def test_embed_without_a_detector_fails_before_any_dask_work(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, orl_dir: Path, ckpt: Path
) -> None:
    from facesearch.indexer.embed import EmbedConfig
    from facesearch.indexer.pipeline import run_embed

    clean_env.setenv(assets.YUNET_ENV, str(tmp_path / "missing.onnx"))
    images = tmp_path / "photos" / "s1"
    images.mkdir(parents=True)
    (images / "1.pgm").write_bytes((orl_dir / "s1" / "1.pgm").read_bytes())
    out = tmp_path / "shards"
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx"):
        run_embed(EmbedConfig(input=tmp_path / "photos", checkpoint=ckpt, out=out))
    assert time.perf_counter() - t0 < 5  # no cluster was started
    assert not out.exists()  # nothing written
