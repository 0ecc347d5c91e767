"""Image queries under hostile input: a decompression bomb (a tiny PNG declaring a huge image) is refused from its
header with bounded memory; 16-bit images are decoded when their decoding fits the memory budget and refused (413)
when it does not; running out of memory is a 503; a missing face detector is a warning at start and a 503."""

from __future__ import annotations

import logging
import struct
import tracemalloc
import zlib

import cv2
import numpy as np
from fastapi.testclient import TestClient

import facesearch.engine.service as service
from facesearch.engine.service import create_app
from facesearch.engine.service_limits import ServiceLimits


def png_of_zeros(width: int, height: int, bit_depth: int = 8, colour: int = 0) -> bytes:
    """A valid PNG of ``width`` x ``height`` black pixels, compressed as far as zlib goes (~1000:1)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    row = bytes(1 + width * channels * bit_depth // 8)  # filter byte 0, then the samples
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _blank_png() -> bytes:
    ok, png = cv2.imencode(".png", np.zeros((64, 64), np.uint8))
    assert ok
    return png.tobytes()


def _post(client: TestClient, name: str, data: bytes):
    return client.post("/search/image", files={"image": (name, data, "image/png")}, data={"k": "2"})


def test_decompression_bomb_is_refused_from_its_header(faces):
    bomb = png_of_zeros(10_000, 10_000)  # 100 megapixels in ~100 kB
    assert len(bomb) < 200_000
    client = TestClient(create_app(faces, detector_pad=20))
    tracemalloc.start()
    try:
        res = _post(client, "bomb.png", bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.status_code == 413 and "10000x10000" in res.text and "--max-pixels" in res.text, res.text
    assert peak < 16 << 20, f"peak traced memory {peak:,} bytes"  # decoding would hold 300 MB


def test_16_bit_images_are_decoded_or_refused(faces, orl_dir):
    """A 16-bit face is decoded to the 8-bit image it came from (same top hit, same score); a 16-bit RGBA image
    within the pixel limit but whose decoding would take more memory than the budget is a 413, not a 500."""
    client = TestClient(create_app(faces, detector_pad=20))
    grey = cv2.imread(str(orl_dir / "s1" / "3.pgm"), cv2.IMREAD_GRAYSCALE)
    ok, png16 = cv2.imencode(".png", grey.astype(np.uint16) * 257)
    assert ok
    res = _post(client, "deep.png", png16.tobytes())
    assert res.status_code == 200, res.text
    top = res.json()["results"][0]["hits"][0]
    assert top["path"].endswith("3.pgm") and top["score"] > 0.999
    deep = png_of_zeros(3000, 3000, bit_depth=16, colour=6)  # 9 MP, but 40 bytes a pixel to decode
    res = _post(client, "deep_rgba.png", deep)
    assert res.status_code == 413 and "16-bit RGBA" in res.text and "MiB" in res.text, res.text
    small = TestClient(create_app(faces, detector_pad=20, limits=ServiceLimits(max_pixels=5000)))
    res = _post(small, "face.png", png16.tobytes())  # 92 x 112 = 10,304 pixels
    assert res.status_code == 413 and "10,304 pixels; the limit is 5,000 pixels" in res.text, res.text


def test_running_out_of_memory_while_decoding_is_a_503(faces, monkeypatch):
    def no_memory(data: bytes, name: str, **kw: object) -> np.ndarray:
        raise MemoryError

    monkeypatch.setattr(service, "decode_image", no_memory)
    client = TestClient(create_app(faces, detector_pad=20), raise_server_exceptions=False)
    res = _post(client, "x.png", _blank_png())
    assert res.status_code == 503 and "memory" in res.text, res.text


def test_missing_detector_model_warns_at_start_and_answers_503(faces, monkeypatch, tmp_path, caplog):
    missing = tmp_path / "no_yunet.onnx"
    monkeypatch.setenv("FACESEARCH_YUNET", str(missing))
    with caplog.at_level(logging.WARNING, logger="facesearch.engine.service"):
        client = TestClient(create_app(faces, detector_pad=20), raise_server_exceptions=False)
    assert any("YuNet model not found" in r.getMessage() for r in caplog.records), caplog.text
    health = client.get("/health").json()
    assert health["images"] is False and str(missing) in health["images_problem"]
    res = _post(client, "x.png", _blank_png())
    assert res.status_code == 503 and "YuNet model not found" in res.text, res.text
    emb = client.post(
        "/search/embedding", json={"embedding": faces.vectors([int(faces.columns["id"][0])])[0].tolist(), "k": 1}
    )
    assert emb.status_code == 200  # embedding queries are unaffected
