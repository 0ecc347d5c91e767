"""An image's size from its header, so a decompression bomb is refused before a single pixel is decoded.

A 0.4 MB PNG of zeros can declare 30000 x 30000 pixels, and decoding it takes gigabytes.  :func:`read_image_header`
reads the dimensions, channels and sample depth from the header bytes alone (PNG IHDR, JPEG SOFn, WebP VP8 / VP8L /
VP8X, BMP, GIF, TIFF IFD0, PNM), never from the pixel data, and estimates the peak memory of decoding the file with
:func:`facesearch.model.faces.images.decode_image` (``ImageHeader.decode_bytes``: measured with tracemalloc, per pixel:
6 bytes for 8-bit grey or colour, 18 with alpha, 10 per channel for 16-bit samples, 13 per channel for float ones).
:func:`check_image` refuses, with :class:`ImageTooLarge`, an image of more than ``max_pixels`` pixels, one whose
decoding would take more memory than an 8-bit colour image of ``max_pixels`` (so a 16-bit or alpha image may have
fewer pixels), and a JPEG of more than :data:`MAX_JPEG_SCANS` scans (each scan re-decodes the whole image: a CPU
bomb); :func:`decode_checked` checks and then decodes.  A header that cannot be read is an
:class:`facesearch.model.faces.images.ImageError` (``empty``, ``not_an_image``, ``unsupported_format``, ``truncated``
or ``corrupt``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from facesearch.model.faces.images import ImageError, decode_image, sniff_format

MAX_JPEG_SCANS = 100  # progressive JPEGs have about 10; libjpeg-turbo's tools offer the same kind of cap
RGB8_BYTES_PER_PIXEL = 6  # decode_image's peak for 8-bit grey or colour: the decoded image plus its RGB copy
_DECODER_BYTES = 64 << 10  # the decoder's own buffers (rows, tables), whatever the image
_MAX_STEPS = 4096  # chunks, segments or comments before the image data: real files have tens; loops stay short
_FILL = re.compile(rb"\xff+")
_SPACE = re.compile(rb"\s*")
_DIGITS = re.compile(rb"[0-9]{1,10}(?![0-9])")
_EXPECTED = "expected a JPEG, PNG, PGM/PPM/PBM, BMP, TIFF or WebP file"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}


@dataclass(frozen=True)
class ImageHeader:
    """What an image file declares: ``format`` (:func:`facesearch.model.faces.images.sniff_format`'s name), ``width`` x
    ``height``,
    ``channels`` as decoded (1 grey, 3 colour, 4 with alpha; palettes decode to 3, or 4 with transparency),
    ``bits`` per sample (8 for palette and 1/2/4-bit images, which decode to 8 bits), ``sample`` ``uint`` or
    ``float``; for JPEG also ``progressive`` and ``scans``."""

    format: str
    width: int
    height: int
    channels: int
    bits: int = 8
    sample: str = "uint"
    progressive: bool = False
    scans: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decode_bytes(self) -> int:
        """Estimated peak memory of :func:`facesearch.model.faces.images.decode_image` on this file, in bytes."""
        alpha = self.channels == 2 or self.channels >= 4
        channels = 4 if alpha else self.channels
        if self.sample == "float":
            per_pixel = 13 * channels
        elif self.bits > 8:
            per_pixel = 10 * channels
        else:
            per_pixel = 18 if alpha else RGB8_BYTES_PER_PIXEL
        if self.progressive:  # libjpeg keeps every DCT coefficient (2 bytes per sample) until the last scan
            per_pixel += 2 * self.channels
        return self.pixels * per_pixel + _DECODER_BYTES

    def describe(self) -> str:
        """``3000x2000 16-bit RGBA PNG``."""
        kind = {1: "grey", 2: "grey+alpha", 3: "colour", 4: "RGBA"}.get(self.channels, f"{self.channels}-channel")
        depth = f"{self.bits}-bit {'float ' if self.sample == 'float' else ''}"
        return f"{self.width}x{self.height} {depth}{kind} {self.format.upper()}"


class ImageTooLarge(ValueError):
    """An image refused before decoding: too many pixels, too much memory to decode, or too many JPEG scans."""

    def __init__(self, name: str, header: ImageHeader, detail: str) -> None:
        self.name, self.header, self.detail = name, header, detail
        super().__init__(f"{name}: {header.describe()}: {detail}")


_Order = Literal["big", "little"]


def _u16(data: bytes, at: int, order: _Order = "big") -> int:
    return int.from_bytes(data[at : at + 2], order)


def _u32(data: bytes, at: int, order: _Order = "big") -> int:
    return int.from_bytes(data[at : at + 4], order)


def _need(data: bytes, size: int, name: str, what: str) -> None:
    if len(data) < size:
        raise ImageError(name, "truncated", f"{what} header cut short ({len(data)} bytes); {_EXPECTED}")


def _png(data: bytes, name: str) -> ImageHeader:
    _need(data, 33, name, "PNG")
    if data[12:16] != b"IHDR" or _u32(data, 8) != 13:
        raise ImageError(name, "corrupt", f"PNG without an IHDR chunk first; {_EXPECTED}")
    width, height, bits, colour = _u32(data, 16), _u32(data, 20), data[24], data[25]
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour)
    if channels is None or bits not in (1, 2, 4, 8, 16):
        raise ImageError(name, "corrupt", f"PNG with colour type {colour} and bit depth {bits}; {_EXPECTED}")
    at = 8
    for _ in range(_MAX_STEPS):  # chunk headers only, up to the image data: is there a transparency chunk?
        if at + 8 > len(data):
            break
        size, kind = _u32(data, at), data[at + 4 : at + 8]
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"tRNS" and colour in (2, 3):  # grey + tRNS decodes to grey: measured
            channels = 4
        at += 12 + size
    else:
        raise ImageError(name, "corrupt", f"PNG with over {_MAX_STEPS} chunks before its image data; {_EXPECTED}")
    return ImageHeader("png", width, height, channels, 8 if colour == 3 else max(bits, 8))


def _jpeg(data: bytes, name: str) -> ImageHeader:
    at, sof = 2, None
    for _ in range(_MAX_STEPS):
        if at >= len(data):
            break
        fill = _FILL.match(data, at)  # a marker: 0xFF, any number of 0xFF fill bytes, the code
        if fill is None:
            raise ImageError(name, "corrupt", f"JPEG marker expected at byte {at}; {_EXPECTED}")
        at = fill.end()
        if at >= len(data):
            break
        marker = data[at]
        at += 1
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9 or at + 2 > len(data):
            break
        length = _u16(data, at)
        if length < 2:
            raise ImageError(name, "corrupt", f"JPEG segment of length {length} at byte {at}; {_EXPECTED}")
        if marker in _JPEG_SOF:
            _need(data, at + 8, name, "JPEG frame")
            sof = (marker, data[at + 2], _u16(data, at + 3), _u16(data, at + 5), data[at + 7])
        if marker == 0xDA:  # start of scan: the frame header must have come; scans are counted from here
            if sof is None:
                break
            marker, precision, height, width, components = sof
            if height == 0 or width == 0 or components not in (1, 3, 4):
                detail = f"JPEG frame {width}x{height} of {components} components (a DNL height is not supported)"
                raise ImageError(name, "unsupported_format", f"{detail}; {_EXPECTED}")
            scans = data.count(b"\xff\xda", at - 2)  # entropy-coded data escapes 0xFF: this counts markers
            return ImageHeader("jpeg", width, height, 3 if components == 4 else components, max(precision, 8),
                               progressive=marker in _JPEG_PROGRESSIVE, scans=scans)  # fmt: skip
        at += length
    else:
        raise ImageError(name, "corrupt", f"JPEG with over {_MAX_STEPS} segments before its image data; {_EXPECTED}")
    raise ImageError(name, "truncated" if sof is None else "corrupt", f"JPEG without a frame and scan; {_EXPECTED}")


def _webp(data: bytes, name: str) -> ImageHeader:
    _need(data, 30, name, "WebP")
    kind = data[12:16]
    if kind == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ImageError(name, "corrupt", f"WebP VP8 frame without its start code; {_EXPECTED}")
        return ImageHeader("webp", _u16(data, 26, "little") & 0x3FFF, _u16(data, 28, "little") & 0x3FFF, 3)
    if kind == b"VP8L":
        if data[20] != 0x2F:
            raise ImageError(name, "corrupt", f"WebP VP8L stream without its signature; {_EXPECTED}")
        bits = _u32(data, 21, "little")
        alpha = (bits >> 28) & 1
        return ImageHeader("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 4 if alpha else 3)
    if kind == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return ImageHeader("webp", width, height, 4 if data[20] & 0x10 else 3)
    raise ImageError(name, "unsupported_format", f"WebP chunk {kind!r}; {_EXPECTED}")


def _bmp(data: bytes, name: str) -> ImageHeader:
    _need(data, 30, name, "BMP")
    if _u32(data, 14, "little") == 12:  # OS/2 BITMAPCOREHEADER
        width, height, bpp = _u16(data, 18, "little"), _u16(data, 20, "little"), _u16(data, 24, "little")
    else:
        width = int.from_bytes(data[18:22], "little", signed=True)
        height = abs(int.from_bytes(data[22:26], "little", signed=True))  # negative: rows stored top-down
        bpp = _u16(data, 28, "little")
    if width <= 0 or height == 0:
        raise ImageError(name, "corrupt", f"BMP of {width}x{height} pixels; {_EXPECTED}")
    return ImageHeader("bmp", width, height, 4 if bpp == 32 else 3)


def _gif(data: bytes, name: str) -> ImageHeader:
    _need(data, 10, name, "GIF")
    return ImageHeader("gif", _u16(data, 6, "little"), _u16(data, 8, "little"), 3)


def _tiff(data: bytes, name: str) -> ImageHeader:
    order: _Order = "little" if data[:2] == b"II" else "big"
    _need(data, 8, name, "TIFF")
    at = _u32(data, 4, order)
    _need(data, at + 2, name, "TIFF directory")
    count = _u16(data, at, order)
    if count > _MAX_STEPS:
        raise ImageError(name, "corrupt", f"TIFF directory of {count} entries; {_EXPECTED}")
    _need(data, at + 2 + 12 * count, name, "TIFF directory")
    tags: dict[int, int] = {}
    for i in range(count):
        entry = at + 2 + 12 * i
        tag, kind, n = _u16(data, entry, order), _u16(data, entry + 2, order), _u32(data, entry + 4, order)
        size = {3: 2, 4: 4}.get(kind)  # SHORT, LONG: the only types these tags use
        if size is None:
            continue
        where = entry + 8 if n * size <= 4 else _u32(data, entry + 8, order)  # inline, or at an offset
        values = [int.from_bytes(data[where + j * size : where + (j + 1) * size], order) for j in range(min(n, 8))]
        if values:
            tags[tag] = max(values)
    if 256 not in tags or 257 not in tags:
        raise ImageError(name, "corrupt", f"TIFF without ImageWidth / ImageLength; {_EXPECTED}")
    samples = tags.get(277, 1)
    sample = "float" if tags.get(339) == 3 else "uint"
    return ImageHeader("tiff", tags[256], tags[257], samples, max(tags.get(258, 1), 8), sample)


def _pnm(data: bytes, name: str) -> ImageHeader:
    magic = data[1] - ord("0")
    wanted = 2 if magic in (1, 4) else 3
    tokens: list[int] = []
    at = 2
    for _ in range(_MAX_STEPS):  # whitespace, comments (to the end of their line) and the numbers
        space = _SPACE.match(data, at)
        at = space.end() if space else at
        if len(tokens) == wanted or at >= len(data):
            break
        if data[at] == ord("#"):
            end = data.find(b"\n", at)
            at = len(data) if end < 0 else end + 1
            continue
        number = _DIGITS.match(data, at)
        if number is None:
            raise ImageError(name, "corrupt", f"malformed PNM header at byte {at}; {_EXPECTED}")
        tokens.append(int(number.group()))
        at = number.end()
    if len(tokens) < wanted:
        raise ImageError(name, "truncated", f"PNM header cut short; {_EXPECTED}")
    bits = 16 if wanted == 3 and tokens[2] > 255 else 8
    return ImageHeader("pnm", tokens[0], tokens[1], 3 if magic in (3, 6) else 1, bits)


_READERS = {"png": _png, "jpeg": _jpeg, "webp": _webp, "bmp": _bmp, "gif": _gif, "tiff": _tiff, "pnm": _pnm}


def read_image_header(data: bytes, name: str = "<bytes>") -> ImageHeader:
    """The :class:`ImageHeader` of in-memory image bytes, read from the header only (no pixel is decoded).

    Raises :class:`facesearch.model.faces.images.ImageError` (``empty``, ``not_an_image``, ``unsupported_format``,
    ``truncated`` or
    ``corrupt``) naming ``name`` when the header is missing, cut short or inconsistent."""
    if not data:
        raise ImageError(name, "empty", f"zero-byte file; {_EXPECTED}")
    fmt = sniff_format(data)
    if fmt is None:
        printable = all(32 <= b < 127 or b in b"\t\r\n" for b in data[:64])
        reason, what = ("not_an_image", "text") if printable else ("unsupported_format", "unknown header bytes")
        raise ImageError(name, reason, f"{what}, not an image (starts {data[:16]!r}); {_EXPECTED}")
    header = _READERS[fmt](data, name)
    if header.width <= 0 or header.height <= 0:
        raise ImageError(name, "corrupt", f"{fmt.upper()} of {header.width}x{header.height} pixels; {_EXPECTED}")
    return header


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _pixels(n: int) -> str:
    return f"{n / 1e6:.1f} megapixels" if n >= 100_000 else f"{n:,} pixels"


def check_image(data: bytes, max_pixels: int, name: str = "<bytes>") -> ImageHeader:
    """The header of ``data`` if it may be decoded: at most ``max_pixels`` pixels, a decoding peak of at most
    ``max_pixels`` x :data:`RGB8_BYTES_PER_PIXEL` bytes (+ 64 kB) and, for JPEG, at most :data:`MAX_JPEG_SCANS` scans.
    Raises :class:`ImageTooLarge` (a ``ValueError``) otherwise, and :class:`facesearch.model.faces.images.ImageError`
    for a header that cannot be read."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    header = read_image_header(data, name)
    limit = f"the limit is {_pixels(max_pixels)}"
    if header.pixels > max_pixels:
        raise ImageTooLarge(name, header, f"{_pixels(header.pixels)}; {limit}")
    budget = max_pixels * RGB8_BYTES_PER_PIXEL + _DECODER_BYTES
    if header.decode_bytes > budget:
        raise ImageTooLarge(name, header, f"decoding it takes ~{_mib(header.decode_bytes)}, over the "
                            f"{_mib(budget)} of an 8-bit colour image at the limit ({limit}); send "
                            "fewer pixels or 8-bit samples")  # fmt: skip
    if header.format == "jpeg" and header.scans > MAX_JPEG_SCANS:
        raise ImageTooLarge(name, header, f"{header.scans} scans; the limit is {MAX_JPEG_SCANS}")
    return header


def decode_checked(data: bytes, max_pixels: int, name: str = "<bytes>") -> np.ndarray:
    """:func:`check_image`, then :func:`facesearch.model.faces.images.decode_image`: (H, W, 3) uint8 RGB."""
    check_image(data, max_pixels, name)
    return decode_image(data, name, max_pixels=max_pixels)


__all__ = [
    "MAX_JPEG_SCANS",
    "RGB8_BYTES_PER_PIXEL",
    "ImageHeader",
    "ImageTooLarge",
    "check_image",
    "decode_checked",
    "read_image_header",
]
