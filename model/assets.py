"""Where the project's external files are: the YuNet face-detector model and the MegaFace noise lists.

One resolver for the library, the command line and the tests, in this order:

1. an explicit path (``--detector-model``, ``model_path=``, ``--probe-noise``...), used as given;
2. ``$FACESEARCH_YUNET`` (the ONNX file itself), then ``$FACESEARCH_SHARED`` (a folder laid out like the project's
   shared folder: ``models/yunet/face_detection_yunet_s_640_640.onnx``, ``data/megaface/noises/*.txt``);
3. ``../shared`` beside a source checkout (the folder next to the one holding ``setup.cfg``).  An installed wheel has
   no checkout, so it relies on 1 or 2.

A file that cannot be found is a :class:`AssetNotFoundError` (a ``FileNotFoundError``) saying where it was looked for
and where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_ENV = "FACESEARCH_SHARED"
YUNET_ENV = "FACESEARCH_YUNET"
YUNET_FILE = "face_detection_yunet_s_640_640.onnx"
YUNET_IN_SHARED = Path("models") / "yunet" / YUNET_FILE
NOISES_IN_SHARED = Path("data") / "megaface" / "noises"


class AssetNotFoundError(FileNotFoundError):
    """A model or list file the project needs is not where it was looked for; the message says where to put it."""


def checkout_shared() -> Path | None:
    """``../shared`` beside the source checkout this module runs from (None for an installed wheel, or when the
    folder is absent)."""
    root = Path(__file__).resolve().parents[1]  # <checkout>/model/assets.py -> <checkout>
    if not (root / "setup.cfg").is_file() or not (root / "model" / "assets.py").is_file():
        return None
    shared = root.parent / "shared"
    return shared if shared.is_dir() else None


def shared_dir() -> Path | None:
    """``$FACESEARCH_SHARED`` when set (whether or not it exists: a wrong setting is reported, not skipped), else
    :func:`checkout_shared`."""
    env = os.environ.get(SHARED_ENV)
    return Path(env) if env else checkout_shared()


def _yunet_candidates() -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    if env := os.environ.get(YUNET_ENV):
        out.append((f"${YUNET_ENV}", Path(env)))
    if env := os.environ.get(SHARED_ENV):
        out.append((f"${SHARED_ENV}", Path(env) / YUNET_IN_SHARED))
    if (shared := checkout_shared()) is not None:
        out.append(("../shared beside the checkout", shared / YUNET_IN_SHARED))
    return out


def find_yunet(explicit: Path | str | None = None) -> Path | None:
    """The YuNet model the resolution order picks, or None when there is none.  An explicit path is returned as
    given (whether or not it exists); ``$FACESEARCH_YUNET`` is final when set (a wrong setting is reported, not
    passed over)."""
    if explicit is not None:
        return Path(explicit)
    candidates = _yunet_candidates()
    if candidates and candidates[0][0] == f"${YUNET_ENV}":
        return candidates[0][1]
    return next((path for _, path in candidates if path.is_file()), None)


def yunet_help() -> str:
    """Where a YuNet model may be put, for error messages."""
    return (
        f"pass --detector-model FILE (model_path= in Python), set ${YUNET_ENV} to the {YUNET_FILE} file, or set "
        f"${SHARED_ENV} to a folder holding {YUNET_IN_SHARED.as_posix()} (a source checkout also looks in ../shared "
        "beside it)"
    )


def yunet_path(explicit: Path | str | None = None) -> Path:
    """The YuNet model file to use: :func:`find_yunet`, checked to exist.  :class:`AssetNotFoundError` otherwise,
    naming what was tried and where to put the file."""
    path = find_yunet(explicit)
    if path is not None and path.is_file():
        return path
    if path is not None:
        source = "given" if explicit is not None else f"from ${YUNET_ENV}"
        raise AssetNotFoundError(f"YuNet model not found at {path} ({source}); {yunet_help()}")
    tried = ", ".join(f"{p} ({src})" for src, p in _yunet_candidates()) or (
        f"${YUNET_ENV} and ${SHARED_ENV} are unset and there is no ../shared beside a checkout"
    )
    raise AssetNotFoundError(f"YuNet face detector model not found (tried: {tried}); {yunet_help()}")


def noise_list(name: str, explicit: Path | str | None = None) -> Path | None:
    """A MegaFace noise list (``facescrub_noises.txt`` / ``megaface_noises.txt``): the explicit path, else the file
    under the shared folder (``$FACESEARCH_SHARED`` or ``../shared`` beside a checkout) when it exists, else None."""
    if explicit is not None:
        return Path(explicit)
    shared = shared_dir()
    if shared is None:
        return None
    path = shared / NOISES_IN_SHARED / name
    return path if path.is_file() else None


__all__ = [
    "NOISES_IN_SHARED",
    "SHARED_ENV",
    "YUNET_ENV",
    "YUNET_FILE",
    "YUNET_IN_SHARED",
    "AssetNotFoundError",
    "checkout_shared",
    "find_yunet",
    "noise_list",
    "shared_dir",
    "yunet_help",
    "yunet_path",
]
