"""facesearch.model.faces.image_guard against the decoder: the header gives the decoded size of every format and depth,
its memory estimate bounds decode_image's measured peak, headers cut short are typed errors, and the limits refuse bombs
(pixels, memory, JPEG scans) without decoding them."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from facesearch.model.faces.image_guard import (
    MAX_JPEG_SCANS,
    ImageTooLarge,
    check_image,
    decode_checked,
    read_image_header,
)
from facesearch.model.faces.images import ImageError, decode_image

H, W = 61, 97  # odd sizes: rows are padded in BMP, packed in 1-bit images


def _pil(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def _samples() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    arrays = {"grey8": rgb[:, :, 0].copy(), "rgb8": rgb, "rgba8": np.dstack([rgb, rgb[:, :, :1]]),
              "grey16": rgb[:, :, 0].astype(np.uint16) * 257, "rgb16": rgb.astype(np.uint16) * 257,
              "rgba16": np.dstack([rgb, rgb[:, :, :1]]).astype(np.uint16) * 257,
              "float": rgb.astype(np.float32) / 255}  # fmt: skip
    files = {}
    encodable = {".png": ("grey8", "rgb8", "rgba8", "grey16", "rgb16", "rgba16"), ".jpg": ("grey8", "rgb8"),
                 ".tif": tuple(arrays), ".webp": ("rgb8", "rgba8"), ".bmp": ("grey8", "rgb8", "rgba8"),
                 ".ppm": ("rgb8", "rgb16"), ".pgm": ("grey8", "grey16")}  # fmt: skip
    for ext, names in encodable.items():
        for name in names:
            ok, buf = cv2.imencode(ext, arrays[name])
            assert ok, (name, ext)
            files[name + ext] = buf.tobytes()
    image = Image.fromarray(rgb)
    files.update({
        "grey_alpha.png": _pil(Image.fromarray(rgb[:, :, :2].copy(), "LA"), "PNG"),
        "palette.png": _pil(image.quantize(16), "PNG"),
        "palette_trns.png": _pil(image.quantize(16), "PNG", transparency=3),
        "bilevel.png": _pil(Image.fromarray(rgb[:, :, 0] > 99), "PNG"),
        "cmyk.jpg": _pil(image.convert("CMYK"), "JPEG"),
        "progressive.jpg": _pil(image, "JPEG", progressive=True),
        "lossless.webp": _pil(image, "WEBP", lossless=True),
        "bilevel.bmp": _pil(Image.fromarray(rgb[:, :, 0] > 99), "BMP"),
        "lzw.tif": _pil(image, "TIFF", compression="tiff_lzw"),
        "ascii.pgm": b"P2\n# a comment\n%d %d\n255\n" % (W, H) + b" ".join(b"7" for _ in range(H * W)) + b"\n",
    })  # fmt: skip
    return files


SAMPLES = _samples()


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_header_gives_the_decoded_size_and_bounds_the_decoding_memory(name):
    data = SAMPLES[name]
    tracemalloc.start()
    try:
        header = read_image_header(data, name)
        header_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        rgb = decode_image(data, name)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (header.height, header.width) == rgb.shape[:2] == (H, W)
    assert header_peak < 64 << 10  # the header alone: nothing the size of the image
    # an upper bound of the measured peak (numpy's allocations: the decoder's and ours) ...
    assert peak <= header.decode_bytes, (header, peak)
    # ... and not a loose one (progressive JPEG adds libjpeg's coefficients, outside tracemalloc's view)
    assert header.decode_bytes <= 3 * peak + (64 << 10), (header, peak)
    enough = -(-(header.decode_bytes - (64 << 10)) // 6)  # the pixel limit whose memory budget fits it exactly
    np.testing.assert_array_equal(decode_checked(data, enough, name), rgb)
    with pytest.raises(ImageTooLarge):
        check_image(data, enough - 1, name)


def test_header_of_a_bomb_is_read_without_decoding():
    row = bytes(1 + 100_000)
    z = zlib.compressobj(9)
    idat = z.compress(row) + z.flush()  # one row of 100,000 declared: never decoded
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    header = read_image_header(bomb, "bomb.png")
    assert header.pixels == 10**10 and header.decode_bytes > 6 * 10**10
    with pytest.raises(ImageTooLarge, match=r"bomb.png: 100000x100000 8-bit grey PNG: 10000.0 megapixels"):
        check_image(bomb, 40_000_000, "bomb.png")


def test_memory_budget_refuses_deep_images_that_fit_the_pixel_limit():
    rgba16 = SAMPLES["rgba16.png"]
    header = check_image(rgba16, H * W * 7, "deep.png")  # 40 bytes a pixel <= 7 x 6
    assert header.bits == 16 and header.channels == 4
    with pytest.raises(ImageTooLarge, match="decoding it takes"):
        check_image(rgba16, H * W * 6, "deep.png")  # the pixels fit, the memory does not
    check_image(SAMPLES["rgb8.png"], H * W, "rgb.png")
    with pytest.raises(ImageTooLarge, match="5,917 pixels; the limit is 5,916 pixels"):
        check_image(SAMPLES["rgb8.png"], H * W - 1, "rgb.png")


def test_jpeg_with_too_many_scans_is_refused():
    data = SAMPLES["progressive.jpg"]
    first_scan = data.index(b"\xff\xda")
    scans = data[first_scan:-2]  # every scan (and the tables between them), without the end-of-image marker
    bomb = data[:first_scan] + scans * (MAX_JPEG_SCANS // scans.count(b"\xff\xda") + 1) + b"\xff\xd9"
    assert read_image_header(bomb).scans > MAX_JPEG_SCANS
    with pytest.raises(ImageTooLarge, match="scans; the limit is"):
        check_image(bomb, 10**9, "scans.jpg")


@pytest.mark.parametrize("name", ["rgb8.png", "rgb8.jpg", "rgb8.tif", "rgb8.webp", "rgb8.bmp", "rgb8.ppm"])
def test_headers_cut_short_are_typed_errors(name):
    data = SAMPLES[name]
    for size in (5,) if name.endswith(".ppm") else (4, 12, 20):  # ppm: "P6\n97" and no height
        with pytest.raises(ImageError) as err:
            read_image_header(data[:size], name)
        assert err.value.reason in ("truncated", "unsupported_format", "not_an_image") and name in str(err.value), (
            err.value
        )


def test_not_an_image():
    cases = ((b"", "empty"), (b"<html>hello</html>", "not_an_image"), (b"\x00\x01\x02\x03", "unsupported_format"))
    for data, reason in cases:
        with pytest.raises(ImageError) as err:
            read_image_header(data, "x")
        assert err.value.reason == reason
    with pytest.raises(ValueError, match="max_pixels"):
        check_image(SAMPLES["rgb8.png"], 0)
