"""Image reading: every bad-input kind maps to its ImageError reason; good files round-trip."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from facesearch.model.faces.images import (
    REASONS,
    ImageError,
    decode_image,
    libjpeg_warnings,
    read_image,
    read_image_bytes,
)


def _rgb(h: int = 40, w: int = 30, seed: int = 0) -> np.ndarray:
    """A smooth seeded RGB image (smooth so JPEG round trips stay close)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 3, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _encode(ext: str, rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok, f"cv2 could not encode {ext}"
    return buf.tobytes()


def _reason(path: Path) -> str:
    with pytest.raises(ImageError) as info:
        read_image(path)
    assert str(path) in str(info.value), "the message must name the file"
    assert "\n" not in str(info.value), "the message must be one line"
    return info.value.reason


def test_missing_and_empty(tmp_path: Path) -> None:
    assert _reason(tmp_path / "nope.jpg") == "missing"
    (tmp_path / "zero.jpg").write_bytes(b"")
    assert _reason(tmp_path / "zero.jpg") == "empty"
    assert _reason(tmp_path) == "not_a_file"  # a directory


@pytest.mark.parametrize("ext", [".jpg", ".png", ".ppm", ".bmp", ".webp"])
def test_truncated(tmp_path: Path, ext: str) -> None:
    data = _encode(ext, _rgb(64, 48))
    path = tmp_path / f"cut{ext}"
    path.write_bytes(data[: len(data) * 2 // 3])
    assert _reason(path) == "truncated"


def test_jpeg_missing_only_eoi(tmp_path: Path) -> None:
    # OpenCV 4.x decodes such files "successfully" with a grey bottom (5.0 rejects them); the EOI check catches both.
    data = _encode(".jpg", _rgb(128, 128))
    assert data.endswith(b"\xff\xd9")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[:-2])
    assert _reason(path) == "truncated"
    path.write_bytes(data + b"\x00" * 16)  # trailing padding after EOI is common and harmless
    assert read_image(path).shape == (128, 128, 3)


def test_corrupt_text_and_unsupported(tmp_path: Path) -> None:
    data = bytearray(_encode(".png", _rgb()))
    data[40:-12] = bytes(len(data) - 52)  # header and IEND intact, pixel data zeroed: zlib fails
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert _reason(tmp_path / "bad.png") == "corrupt"
    jpeg = _encode(".jpg", _rgb())
    (tmp_path / "bad.jpg").write_bytes(jpeg[:4] + bytes(range(256)) * 4 + b"\xff\xda\x00\x02\xff\xd9")
    assert _reason(tmp_path / "bad.jpg") == "corrupt"
    (tmp_path / "page.jpg").write_text("<html><body>404 Not Found</body></html>\n")
    assert _reason(tmp_path / "page.jpg") == "not_an_image"
    (tmp_path / "anim.jpg").write_bytes(b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + bytes(20))
    assert _reason(tmp_path / "anim.jpg") == "unsupported_format"
    (tmp_path / "noise.jpg").write_bytes(bytes(np.random.default_rng(0).integers(128, 256, 100, dtype=np.uint8)))
    assert _reason(tmp_path / "noise.jpg") == "unsupported_format"


def test_error_pickles_and_reasons_are_known() -> None:
    err = ImageError("a.jpg", "truncated", "truncated JPEG")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, str(back)) == (err.path, err.reason, str(err))
    with pytest.raises(AssertionError):
        ImageError("a.jpg", "nonsense", "x")
    assert "no_face" in REASONS and "bad_landmarks" in REASONS


@pytest.mark.parametrize("ext", [".png", ".bmp", ".ppm", ".tiff", ".webp"])
def test_lossless_round_trip(tmp_path: Path, ext: str) -> None:
    rgb = _rgb(37, 23, seed=1)
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []  # 101 = lossless WebP
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    assert ok
    path = tmp_path / f"img{ext}"
    path.write_bytes(buf.tobytes())
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (37, 23, 3)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_round_trip(tmp_path: Path) -> None:
    rgb = _rgb(64, 48, seed=2)
    (tmp_path / "a.jpg").write_bytes(_encode(".jpg", rgb))
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (64, 48, 3) and out.dtype == np.uint8
    # JPEG is lossy: a smooth image at quality 95 stays within a few grey levels on average.
    assert np.abs(out.astype(int) - rgb).mean() < 3.0
    assert out[..., 0].mean() == pytest.approx(rgb[..., 0].mean(), abs=2.0), "channel order must be RGB"


def test_grey_16bit_and_alpha() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = decode_image(cv2.imencode(".png", grey)[1].tobytes())
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out[..., 1], grey)
    deep = grey.astype(np.uint16) * 257
    np.testing.assert_array_equal(decode_image(cv2.imencode(".png", deep)[1].tobytes())[..., 0], grey)
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[..., 2] = 200  # red
    bgra[..., 3] = [[255, 0], [128, 255]]
    out = decode_image(cv2.imencode(".png", bgra)[1].tobytes())
    np.testing.assert_array_equal(out[..., 0], [[200, 0], [100, 200]])  # composited over black
    assert not out[..., 1:].any()


def test_orl_pgm(orl_dir: Path) -> None:
    img = read_image(orl_dir / "s1" / "1.pgm")
    assert img.shape == (112, 92, 3) and img.dtype == np.uint8
    assert (img[..., 0] == img[..., 2]).all(), "grey replicated to three channels"


@pytest.mark.timeout(30)
def test_fifo_is_not_a_file_and_never_blocks(tmp_path: Path, fifo: Callable[..., Any]) -> None:
    path = tmp_path / "pipe.jpg"
    with fifo(path) as released:  # no writer: a plain open() would wait forever
        assert _reason(path) == "not_a_file"
        with pytest.raises(ImageError, match=r"is a FIFO \(named pipe\), not a regular file"):
            read_image_bytes(path)
    assert not released, "nothing blocked on the pipe"
    (tmp_path / "a.jpg").write_bytes(b"abc")
    assert read_image_bytes(tmp_path / "a.jpg") == b"abc"
    assert "not_a_file" in REASONS


def _corrupt_orl_jpeg(orl_dir: Path) -> tuple[bytes, bytes]:
    """ORL s1/1 as a colour JPEG (cv2.imencode), and a copy with 4 bytes inverted in the middle of its entropy-coded
    scan: the Huffman decoder loses sync, ends early and libjpeg warns of extraneous bytes (OpenCV still returns an
    image)."""
    grey = cv2.imread(str(orl_dir / "s1/1.pgm"), cv2.IMREAD_GRAYSCALE)
    good = _encode(".jpg", cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB))
    sos = good.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(good[sos + 2 : sos + 4], "big")  # first byte after the scan header
    mid = (start + len(good) - 2) // 2
    bad = bytearray(good)
    bad[mid : mid + 4] = bytes(b ^ 0xFF for b in bad[mid : mid + 4])
    return good, bytes(bad)


def test_corrupt_jpeg_data_is_a_warning(orl_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    good, bad = _corrupt_orl_jpeg(orl_dir)
    # The premise: OpenCV decodes it "successfully", printing libjpeg's warning to stderr, with no API to report it.
    capfd.readouterr()
    assert cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_COLOR) is not None
    assert "Corrupt JPEG data" in capfd.readouterr().err
    found: list[str] = []
    img = decode_image(bad, "bad.jpg", warnings=found)
    assert img.shape == (112, 92, 3) and len(found) == 1 and found[0].startswith("Corrupt JPEG data: ")
    assert "Corrupt JPEG data" not in capfd.readouterr().err, "collected, not printed"
    clean: list[str] = []
    np.testing.assert_array_equal(decode_image(good, warnings=clean), decode_image(good))
    assert clean == []
    assert decode_image(bad).shape == (112, 92, 3)  # without a list: decoded as before (the warning printed)


def test_decoder_output_capture_passes_other_output_on(capfd: pytest.CaptureFixture[str]) -> None:
    found: list[str] = []
    capfd.readouterr()
    with libjpeg_warnings(found):
        os.write(2, b"another thread's message\n")
        os.write(2, b"Premature end of JPEG file\n")
    assert found == ["Premature end of JPEG file"]
    assert capfd.readouterr().err == "another thread's message\n"
    again: list[str] = []  # the capture file is reused: nothing of the previous block may come back
    with libjpeg_warnings(again):
        os.write(2, b"x\n")
    with libjpeg_warnings(again):
        pass
    assert again == [] and capfd.readouterr().err == "x\n"


def _png_bomb(width: int, height: int) -> bytes:
    """A valid grey 8-bit PNG of ``width`` x ``height`` zero pixels: a few hundred kB declaring gigabytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    """The header is read first: a small file declaring 144 megapixels is 'too_large' for every reader (embed,
    training, search --probes go through read_image / decode_image) with memory bounded by the file, not the image."""
    import tracemalloc

    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bomb(12_000, 12_000))
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="refused before decoding") as err:
            read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.reason == "too_large" and "12000" in str(err.value)
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB: the image was decoded"
    assert read_image(path, max_pixels=None).shape == (12_000, 12_000, 3)  # no limit: it decodes
    small = _png_bomb(300, 200)
    assert decode_image(small, max_pixels=60_000).shape == (200, 300, 3)
    with pytest.raises(ImageError, match="too_large"):
        decode_image(small, max_pixels=59_999)
