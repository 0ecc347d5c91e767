"""Reading image files into uint8 RGB arrays, with a typed error for every way a file can be bad.

Large face datasets always contain a few broken files (truncated downloads, HTML error pages saved as ``.jpg``, GIFs,
zero-byte files).  OpenCV's ``imdecode`` reports most of these as ``None`` and some not at all: a truncated JPEG
decodes "successfully" with a grey bottom half.  So the header is sniffed first, completeness is checked per format,
and only then is the file decoded.  Every failure is an :class:`ImageError` carrying a short ``reason`` code, so
callers (the dataset, the indexer) can skip the file and count the reasons.

Files are opened without blocking (:func:`read_image_bytes`): a FIFO, socket or device named ``x.jpg`` is
``not_a_file`` at once, where a plain ``open`` of a FIFO would wait forever for a writer.

A JPEG whose entropy-coded data is damaged (bit errors, spliced files) is decoded by libjpeg anyway, with the blocks
after the damage wrong, and its only report is a warning printed to stderr ("Corrupt JPEG data: 158 extraneous bytes
before marker 0xd9"): OpenCV has no API for it.  :func:`decode_image` collects those warnings on request
(``warnings=``) by capturing file descriptor 2 around the decode (:func:`libjpeg_warnings`).  A structural check
cannot see them (the markers and segment lengths of such a file are intact), and walking the Huffman-coded scan in
Python to find where it desynchronises costs 15-30x the decode itself (measured: 15 ms against 1 ms for 250x250).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import cv2
import numpy as np

log = logging.getLogger(__name__)

#: Every ``ImageError.reason`` this package produces.
REASONS: tuple[str, ...] = (
    "missing",
    "unreadable",
    "not_a_file",
    "empty",
    "not_an_image",
    "unsupported_format",
    "truncated",
    "corrupt",
    "no_face",
    "no_landmarks",
    "bad_landmarks",
    "too_large",
)

#: Images with more pixels than this are refused from their header, before decoding (decompression bombs: a 0.4 MB
#: PNG can declare gigapixels).  40 megapixels is a large phone photo; pass ``max_pixels`` to change it.
DEFAULT_MAX_PIXELS = 40_000_000

_EXPECTED = "expected a complete JPEG, PNG, PGM/PPM/PBM, BMP, TIFF or WebP file"
_BMP_DIB_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
_PNG_IEND = b"IEND\xaeB`\x82"
#: libjpeg's warnings (jerror.h ``JWRN_*``): the decoder carries on past them, printing one line to stderr.
_LIBJPEG_WARNING = re.compile(
    rb"^(?:Corrupt JPEG data|Premature end of JPEG file|Warning: |Invalid SOS parameters|Inconsistent progression"
    rb"|Unknown Adobe color transform|Application transferred too)"
)
#: File descriptor 2 is one per process: decodes whose warnings are collected take turns.
_STDERR_LOCK = threading.Lock()
_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
               stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}  # fmt: skip


class ImageError(ValueError):
    """A file that cannot be used as a face image.

    ``path`` is the file (or a name such as ``"<bytes>"``), ``reason`` one of :data:`REASONS`, ``detail`` a short
    human explanation.  ``str(err)`` is one line naming the file, what is wrong and what was expected.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, detail: str) -> None:
        assert reason in REASONS, f"unknown ImageError reason {reason!r}"
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {detail} [{reason}]")

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, str, str]]:
        # Custom __init__ arguments: make the error survive pickling (DataLoader workers, multiprocessing).
        return (type(self), (self.path, self.reason, self.detail))


def sniff_format(data: bytes) -> str | None:
    """The image format of ``data`` from its magic bytes: ``jpeg png pnm bmp tiff webp gif`` or ``None``."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if len(data) >= 3 and data[:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return "pnm"
    if data[:2] == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in _BMP_DIB_SIZES:
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def _looks_like_text(data: bytes) -> bool:
    head = data[:1024]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at the 1024-byte boundary is still text.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(ch.isprintable() or ch in "\t\r\n\f\v" for ch in text)


def _pnm_expected_size(data: bytes) -> int | None:
    """Byte size a binary PNM (P4/P5/P6) must have according to its header; ``None`` for ASCII PNM."""
    magic = data[1] - ord("0")
    if magic in (1, 2, 3):
        return None
    tokens: list[int] = []
    pos = 2
    while len(tokens) < (2 if magic == 4 else 3):
        while pos < len(data) and (data[pos : pos + 1].isspace() or data[pos : pos + 1] == b"#"):
            if data[pos : pos + 1] == b"#":
                pos = data.find(b"\n", pos)
                if pos < 0:
                    return len(data) + 1
            pos += 1
        start = pos
        while pos < len(data) and data[pos : pos + 1].isdigit():
            pos += 1
        if start == pos:
            return len(data) + 1 if pos >= len(data) else -1
        tokens.append(int(data[start:pos]))
    pos += 1  # exactly one whitespace byte separates the header from the raster
    width, height = tokens[0], tokens[1]
    if magic == 4:
        return pos + (width + 7) // 8 * height
    channels = 1 if magic == 5 else 3
    sample_bytes = 1 if tokens[2] < 256 else 2
    return pos + width * height * channels * sample_bytes


def _incomplete(fmt: str, data: bytes) -> str | None:
    """Why ``data`` (of format ``fmt``) is truncated or malformed before decoding, or ``None`` if it looks whole."""
    if fmt == "jpeg":
        # Entropy-coded data escapes 0xFF, so an EOI marker after the last start-of-scan means the scan finished.
        if data.rfind(b"\xff\xd9") <= data.rfind(b"\xff\xda"):
            return "truncated JPEG (no end-of-image marker after the last scan)"
    elif fmt == "png":
        if data.rfind(_PNG_IEND) < 0:
            return "truncated PNG (no IEND chunk)"
    elif fmt == "pnm":
        expected = _pnm_expected_size(data)
        if expected is not None and expected < 0:
            return "malformed PNM header"
        if expected is not None and len(data) < expected:
            return f"truncated PNM ({len(data)} of {expected} bytes)"
    elif fmt == "bmp":
        declared = int.from_bytes(data[2:6], "little")
        if declared > len(data):
            return f"truncated BMP ({len(data)} of {declared} bytes)"
    elif fmt == "webp":
        declared = int.from_bytes(data[4:8], "little") + 8
        if declared > len(data):
            return f"truncated WebP ({len(data)} of {declared} bytes)"
    return None


def _to_rgb8(img: np.ndarray, name: str) -> np.ndarray:
    """Decoded OpenCV image (BGR/BGRA/grey, any depth) -> (H, W, 3) uint8 RGB."""
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        scale = 255.0 if np.nanmax(img) <= 1.0 else 1.0
        img = np.clip(np.nan_to_num(img) * scale + 0.5, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageError(name, "unsupported_format", f"unsupported pixel type {img.dtype}; {_EXPECTED}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        # Composite over black: transparent pixels often hold garbage colour; black matches the detector padding.
        alpha = img[:, :, 3:4].astype(np.uint16)
        img = ((img[:, :, :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ImageError(name, "unsupported_format", f"unsupported channel layout {img.shape}; {_EXPECTED}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


#: The file libjpeg's stderr goes to while a block of :func:`libjpeg_warnings` runs: one per process (made on first
#: use, emptied after every block; a new one after a fork), not a new temporary file per decode (~40 us each).
_WARN_FILE: tuple[int, Any] | None = None


def _warn_file() -> Any:
    global _WARN_FILE
    if _WARN_FILE is None or _WARN_FILE[0] != os.getpid():
        _WARN_FILE = (os.getpid(), tempfile.TemporaryFile())
    return _WARN_FILE[1]


@contextmanager
def libjpeg_warnings(found: list[str]) -> Iterator[None]:
    """Append to ``found`` the libjpeg warnings printed to stderr inside the block; anything else written to file
    descriptor 2 meanwhile (another thread's output) is passed on to it afterwards.  One block at a time per process;
    without a usable descriptor 2 the block just runs."""
    with _STDERR_LOCK:
        try:
            saved = os.dup(2)
        except OSError:
            yield
            return
        tmp = _warn_file()
        try:
            os.dup2(tmp.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            if tmp.tell():  # something was written (descriptor 2 shared the file's offset)
                tmp.seek(0)
                lines = tmp.read().splitlines(keepends=True)
                tmp.seek(0)
                tmp.truncate()
                found += [line.decode("utf-8", "replace").strip() for line in lines if _LIBJPEG_WARNING.match(line)]
                rest = b"".join(line for line in lines if not _LIBJPEG_WARNING.match(line))
                if rest:
                    os.write(saved, rest)
            os.close(saved)


def decode_image(
    data: bytes, name: str = "<bytes>", warnings: list[str] | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode in-memory image bytes into an (H, W, 3) uint8 RGB array.

    ``name`` is used in error messages only.  Grey images are replicated to 3 channels, 16-bit and float images are
    scaled to 8 bits, alpha is composited over black, and JPEG EXIF orientation is applied.
    Raises :class:`ImageError` with reason ``empty``, ``not_an_image``, ``unsupported_format``, ``truncated`` or
    ``corrupt``.  With a ``warnings`` list, the warnings libjpeg prints while decoding a JPEG whose data is damaged
    but decodable (``"Corrupt JPEG data: ..."``: some blocks are wrong) are appended to it instead of printed.
    Before decoding, the header is read (:mod:`facesearch.model.faces.image_guard`): an image over ``max_pixels``
    pixels, or one whose decoding would take more memory than an 8-bit colour image at that size, is ``too_large``
    (``None``: no limit).
    """
    if len(data) == 0:
        raise ImageError(name, "empty", f"zero-byte file; {_EXPECTED}")
    fmt = sniff_format(data)
    if fmt is None:
        if _looks_like_text(data):
            raise ImageError(name, "not_an_image", f"text, not an image (starts {data[:16]!r}); {_EXPECTED}")
        raise ImageError(name, "unsupported_format", f"unknown header bytes {data[:8].hex(' ')}; {_EXPECTED}")
    if fmt == "gif":
        raise ImageError(name, "unsupported_format", f"GIF is not supported; {_EXPECTED}")
    problem = _incomplete(fmt, data)
    if problem is not None:
        reason = "corrupt" if problem.startswith("malformed") else "truncated"
        raise ImageError(name, reason, f"{problem}; {_EXPECTED}")
    if max_pixels is not None:
        _check_size(data, name, max_pixels)
    # JPEG: IMREAD_COLOR applies EXIF orientation (phone photos); others keep depth and alpha for _to_rgb8.
    flags = cv2.IMREAD_COLOR if fmt == "jpeg" else cv2.IMREAD_UNCHANGED
    try:
        if warnings is not None and fmt == "jpeg":
            with libjpeg_warnings(warnings):
                img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
        else:
            img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        raise ImageError(name, "corrupt", f"{fmt} decoder failed ({exc.msg.strip()}); {_EXPECTED}") from exc
    if img is None or img.size == 0:
        raise ImageError(name, "corrupt", f"{fmt} header found but the decoder failed; {_EXPECTED}")
    return _to_rgb8(img, name)


def _check_size(data: bytes, name: str, max_pixels: int) -> None:
    from facesearch.model.faces.image_guard import (  # it reads headers with this module's errors
        ImageTooLarge,
        check_image,
    )

    try:
        check_image(data, max_pixels, name)
    except ImageTooLarge as e:
        raise ImageError(name, "too_large", f"{e.header.describe()}: {e.detail}; refused before decoding") from None
    except ImageError:
        pass  # a header the guard cannot parse: the decoder decides (and names what is wrong)


def read_image_bytes(path: str | os.PathLike[str], name: str | None = None) -> bytes:
    """The bytes of the regular file ``path``, never blocking: it is opened non-blocking and checked with
    ``fstat`` before any read.  ``name`` (default ``path``) is used in error messages.

    Raises :class:`ImageError`: ``missing`` (no such file), ``not_a_file`` (a directory, FIFO, socket or device) or
    ``unreadable`` (no permission, an I/O error)."""
    name = str(path) if name is None else name
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError(name, "missing", "no such file; expected an image file") from None
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a socket; a directory (where it cannot be opened)
            kind = "a directory" if exc.errno == errno.EISDIR else "a socket"
            raise ImageError(name, "not_a_file", f"is {kind}, not a regular file; expected an image file") from None
        raise ImageError(name, "unreadable", f"cannot read ({exc.strerror}); expected a readable image file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise ImageError(name, "not_a_file", f"is {kind}, not a regular file; expected an image file")
        chunks = [os.read(fd, st.st_size + 1)]  # one read for a file that does not grow meanwhile
        while chunks[-1]:
            chunks.append(os.read(fd, 1 << 20))
        return b"".join(chunks)
    except OSError as exc:
        raise ImageError(name, "unreadable", f"cannot read ({exc.strerror}); expected a readable image file") from None
    finally:
        os.close(fd)


def read_image(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file into an (H, W, 3) uint8 RGB array (see :func:`decode_image`).

    Raises :class:`ImageError`: ``missing`` (no such file), ``not_a_file`` (a directory, FIFO, socket or device),
    ``unreadable`` (no permission) or any reason of :func:`decode_image`.
    """
    return decode_image(read_image_bytes(path), str(path), max_pixels=max_pixels)


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "REASONS",
    "ImageError",
    "decode_image",
    "libjpeg_warnings",
    "read_image",
    "read_image_bytes",
    "sniff_format",
]
