"""The MegaFace devkit's file formats, read and written with plain numpy and json.

* Feature ``.bin`` (one per image, OpenCV-mat layout, little-endian, no padding): four int32 header fields ``rows``
  (= d), ``cols`` (= 1), ``stride`` (= 4 * cols) and ``type`` (5 = float32), then ``float32[d]``; the size is exactly
  ``16 + 4 d`` bytes. The feature of list entry ``P`` is ``<feature_root>/<P><file_ending>``, e.g.
  ``375/37531198@N00/4174611825_0.jpg_myalgo.bin``, and the algorithm name is
  ``file_ending.split('.')[0].strip('_')``. We write float32 only; type 6 (float64, stride 8, ``16 + 8 d`` bytes) is
  accepted on read and returned as float32.
* Probe list ``facescrub_features_list.json``: ``{"path": [...], "id": [...]}``; distractor lists
  ``megaface_features_list.json_<SIZE>_<SET>``: ``{"path": [...]}``. Entries are matched to feature files and to each
  other by :func:`stem_key` (no extension, spaces ≡ underscores), so the ``_uncropped`` twin matches the cropped list.
* Noise lists (``facescrub_noises.txt``: bare file names; ``megaface_noises.txt``: relative paths), one per line,
  ``#`` comments.
* Result JSON ``cmc_<probe>_<distractor>_<alg>_<size>_<set>.json``: ``{"cmc": [[ranks], [rates]], "roc": [[fpr],
  [tpr]]}``, 0-based ranks, float32 values, both curves compressed (:func:`compress_curve`).

See ``MEGAFACE_PROTOCOL.md`` §1, §4 and §5. Malformed input raises :class:`DevkitFormatError` naming the file and the
field or key.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from facesearch.model.fileio import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

HEADER_BYTES = 16
TYPE_FLOAT32 = 5
TYPE_FLOAT64 = 6
_ITEMSIZE = {TYPE_FLOAT32: 4, TYPE_FLOAT64: 8}
_DTYPE: dict[int, np.dtype[Any]] = {TYPE_FLOAT32: np.dtype("<f4"), TYPE_FLOAT64: np.dtype("<f8")}
_CHUNK = 8192  # tasks submitted per executor round: bounds the futures held for million-file trees
_LIST_NAME = re.compile(r"(.+?)_features_list\.json_([1-9][0-9]*)_([1-9][0-9]*)")
TAR_CONVENTIONS = ("step", "interpolate", "nearest")

_T = TypeVar("_T")
_R = TypeVar("_R")
FloatSeq = Sequence[float] | np.ndarray  # a curve's x or y: a list or a 1-d array


class DevkitFormatError(ValueError):
    """A devkit file (feature ``.bin``, list JSON, result JSON) is malformed; the message names the file and field."""


# --- feature .bin -----------------------------------------------------------------------------------------------------


def write_bin(path: Path, vec: np.ndarray) -> None:
    """Write ``vec`` ((d,), any real dtype, cast to float32) as a devkit ``.bin`` at ``path`` (parents created).

    Atomic (temporary file + ``os.replace``) but not fsynced: a feature tree is millions of regenerable files."""
    vec = np.asarray(vec)
    if vec.ndim != 1 or vec.shape[0] < 1:
        raise ValueError(f"{path}: a feature must be a non-empty 1-d vector, got shape {vec.shape}")
    header = np.array([vec.shape[0], 1, 4, TYPE_FLOAT32], dtype="<i4").tobytes()
    atomic_write_bytes(Path(path), header + vec.astype("<f4").tobytes(), fsync=False)


def read_bin(path: Path) -> np.ndarray:
    """Read one devkit ``.bin``: (d,) float32 (a float64 file is cast to float32).

    Raises :class:`FileNotFoundError` for a missing file and :class:`DevkitFormatError` for a short file, a header
    field out of range (``rows`` < 1, ``cols`` != 1, unknown ``type``, ``stride`` != itemsize * cols) or a size other
    than ``16 + itemsize * rows``."""
    with open(path, "rb") as fh:
        data = fh.read()
    if len(data) < HEADER_BYTES:
        raise DevkitFormatError(f"{path}: file is {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header")
    rows, cols, stride, kind = (int(v) for v in np.frombuffer(data, dtype="<i4", count=4))
    if rows < 1:
        raise DevkitFormatError(f"{path}: header field 'rows' is {rows}, expected >= 1")
    if cols != 1:
        raise DevkitFormatError(f"{path}: header field 'cols' is {cols}, expected 1")
    if kind not in _ITEMSIZE:
        raise DevkitFormatError(f"{path}: header field 'type' is {kind}, expected 5 (float32) or 6 (float64)")
    itemsize = _ITEMSIZE[kind]
    if stride != itemsize * cols:
        raise DevkitFormatError(f"{path}: header field 'stride' is {stride}, expected {itemsize} for type {kind}")
    expected = HEADER_BYTES + itemsize * rows
    if len(data) != expected:
        raise DevkitFormatError(
            f"{path}: field 'data' has the wrong size: file is {len(data)} bytes, expected {expected} "
            f"({HEADER_BYTES}-byte header + rows={rows} x {itemsize} bytes)"
        )
    return np.frombuffer(data, dtype=_DTYPE[kind], offset=HEADER_BYTES).astype(np.float32)


def _map_ordered(fn: Callable[[_T], _R], items: Sequence[_T], threads: int) -> Iterator[_R]:
    """``fn`` over ``items`` on ``threads`` threads, results in input order, at most ``_CHUNK`` tasks in flight."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(items), _CHUNK):
            yield from pool.map(fn, items[start : start + _CHUNK])


def _read_or_none(path: Path) -> np.ndarray | None:
    try:
        return read_bin(path)
    except FileNotFoundError:
        return None


def read_bins(paths: Sequence[Path], threads: int = 8) -> np.ndarray:
    """Read many ``.bin`` files on ``threads`` threads: xb (n, d) float32, row i from ``paths[i]``.

    Every file must have the same d (the error names the first file that differs). Missing files are reported
    together: one :class:`FileNotFoundError` with their count and the first five. No paths gives a (0, 0) array."""
    paths = [Path(p) for p in paths]
    xb: np.ndarray | None = None
    missing: list[Path] = []
    for i, vec in enumerate(_map_ordered(_read_or_none, paths, threads)):
        if vec is None:
            missing.append(paths[i])
            continue
        if xb is None:
            xb = np.empty((len(paths), vec.shape[0]), dtype=np.float32)
            first = paths[i]
        if vec.shape[0] != xb.shape[1]:
            raise DevkitFormatError(
                f"{paths[i]}: header field 'rows' is {vec.shape[0]}, expected d={xb.shape[1]} as in {first}"
            )
        xb[i] = vec
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} feature files are missing, first: {shown}")
    log.debug("read %d feature files", len(paths))
    return xb if xb is not None else np.empty((0, 0), dtype=np.float32)


def _feature_path(root: Path, rel_path: str, file_ending: str) -> Path:
    parts = rel_path.replace("\\", "/").split("/")
    if rel_path.startswith(("/", "\\")) or ".." in parts:
        raise ValueError(f"list entry {rel_path!r} must be a relative path inside the feature root")
    return Path(root) / (rel_path + file_ending)


def write_feature_tree(
    root: Path, rel_paths: Sequence[str], xb: np.ndarray, file_ending: str, threads: int = 8
) -> None:
    """Write row i of ``xb`` ((n, d)) to ``<root>/<rel_paths[i]><file_ending>`` (folders created), on ``threads``
    threads."""
    xb = np.asarray(xb)
    if xb.ndim != 2 or xb.shape[0] != len(rel_paths):
        raise ValueError(f"xb must be (n, d) with n = {len(rel_paths)} list entries, got shape {xb.shape}")
    algorithm_name(file_ending)  # validates the ending before any file is written
    if (dup := _first_duplicate(rel_paths)) is not None:
        raise ValueError(f"list entry {dup!r} appears twice: two threads would write the same file")
    targets = [_feature_path(root, p, file_ending) for p in rel_paths]
    for folder in {t.parent for t in targets}:
        folder.mkdir(parents=True, exist_ok=True)
    for _ in _map_ordered(lambda i: write_bin(targets[i], xb[i]), range(len(targets)), threads):
        pass
    log.debug("wrote %d feature files under %s", len(targets), root)


def read_feature_tree(root: Path, rel_paths: Sequence[str], file_ending: str, threads: int = 8) -> np.ndarray:
    """Read ``<root>/<rel_paths[i]><file_ending>`` for every entry: xb (n, d) float32 (see :func:`read_bins`)."""
    return read_bins([_feature_path(root, p, file_ending) for p in rel_paths], threads=threads)


def algorithm_name(file_ending: str) -> str:
    """The devkit's algorithm name of a feature file ending: ``'_myalgo.bin'`` -> ``'myalgo'``."""
    name = file_ending.split(".")[0].strip("_")
    if not name:
        raise ValueError(f"file ending {file_ending!r} has no algorithm name (expected e.g. '_myalgo.bin')")
    return name


def stem_key(path: str) -> str:
    """The key that matches list entries and feature files: relative path, '/' separators, no leading './', no
    extension, spaces as underscores (``'Michael Landes/Michael Landes_43667.jpg'`` -> ``'Michael_Landes/Michael_
    Landes_43667'``)."""
    if "\\" in path:
        path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    # posixpath.splitext inlined (a million list entries: 0.7 -> 0.3 s): the last '.' of the last component, unless
    # only dots precede it there
    slash, dot = path.rfind("/"), path.rfind(".")
    if dot > slash and path[slash + 1 : dot].strip("."):
        path = path[:dot]
    return path.replace(" ", "_")


# --- template lists ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeList:
    """The probe list: ``paths[i]`` is an image of identity ``ids[i]``."""

    paths: tuple[str, ...]
    ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.ids):
            raise ValueError(f"ProbeList has {len(self.paths)} paths but {len(self.ids)} ids")

    @property
    def n_identities(self) -> int:
        """Number of distinct identities."""
        return len(set(self.ids))

    @property
    def n_pairs(self) -> int:
        """Ordered same-identity pairs Σ n_c (n_c − 1): the CMC denominator N (153,634 on the official list)."""
        return sum(n * (n - 1) for n in Counter(self.ids).values())

    @property
    def n_pos(self) -> int:
        """Unordered same-identity pairs Σ n_c (n_c − 1) / 2: the ROC positives (76,817 on the official list)."""
        return self.n_pairs // 2


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DevkitFormatError(f"{path}: not valid JSON ({exc})") from exc


def _string_list(path: Path, obj: Any, key: str) -> list[str]:
    if not isinstance(obj, dict) or key not in obj:
        raise DevkitFormatError(f"{path}: key {key!r} is missing")
    values = obj[key]
    if not isinstance(values, list) or not values:
        raise DevkitFormatError(f"{path}: key {key!r} must be a non-empty list")
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise DevkitFormatError(f"{path}: key {key!r} entry {bad} is {values[bad]!r}, expected a non-empty string")
    return values


def read_probe_list(path: Path) -> ProbeList:
    """Read a probe list JSON ``{"path": [...], "id": [...]}`` (non-empty string lists of equal length)."""
    obj = _load_json(path)
    paths, ids = _string_list(path, obj, "path"), _string_list(path, obj, "id")
    if len(paths) != len(ids):
        raise DevkitFormatError(f"{path}: key 'path' has {len(paths)} entries but key 'id' has {len(ids)}")
    return ProbeList(tuple(paths), tuple(ids))


def write_probe_list(path: Path, paths: Sequence[str], ids: Sequence[str]) -> None:
    """Write a probe list in the official shape ``{"path": [...], "id": [...]}``, atomically."""
    if len(paths) != len(ids) or not paths:
        raise ValueError(f"{path}: need equal, non-empty paths and ids, got {len(paths)} and {len(ids)}")
    atomic_write_text(Path(path), json.dumps({"path": list(paths), "id": list(ids)}, indent=4) + "\n")


def _first_duplicate(values: Sequence[str]) -> str | None:
    return next((v for v, count in Counter(values).items() if count > 1), None)


def read_distractor_list(path: Path) -> tuple[str, ...]:
    """Read a distractor list JSON ``{"path": [...]}``; a duplicated path is an error naming it."""
    paths = _string_list(path, _load_json(path), "path")
    dup = _first_duplicate(paths)
    if dup is not None:
        raise DevkitFormatError(f"{path}: key 'path' lists {dup!r} more than once")
    return tuple(paths)


def write_distractor_list(path: Path, paths: Sequence[str]) -> None:
    """Write a distractor list ``{"path": [...]}`` (non-empty, no duplicates), atomically."""
    dup = _first_duplicate(paths)
    if not paths or dup is not None:
        raise ValueError(f"{path}: distractor paths must be non-empty and unique (duplicate: {dup!r})")
    atomic_write_text(Path(path), json.dumps({"path": list(paths)}, indent=4) + "\n")


def parse_list_name(name: str) -> tuple[int, int] | None:
    """``'megaface_features_list.json_1000_1'`` -> ``(1000, 1)`` (any ``<prefix>_features_list.json_<size>_<set>``);
    any other name -> None."""
    match = _LIST_NAME.fullmatch(name)
    return (int(match.group(2)), int(match.group(3))) if match else None


def list_set_name(name: str) -> str:
    """The set name the devkit puts in its result file names, taken from a list's file name as ``run_experiment.py``
    does (the part before the first ``_``; a trailing ``.json`` dropped): ``facescrub_features_list.json`` ->
    ``facescrub``, ``megaface_features_list.json_1000_1`` -> ``megaface``."""
    base = Path(name).name.split("_")[0]
    base = base[: -len(".json")] if base.endswith(".json") else base
    if not base:
        raise ValueError(f"list file name {name!r} gives no set name (expected e.g. 'facescrub_features_list.json')")
    return base


def distractor_list_name(set_name: str, size: int, set_number: int) -> str:
    """``<set_name>_features_list.json_<size>_<set>``, the devkit's distractor list file name."""
    return f"{set_name}_features_list.json_{size}_{set_number}"


def find_distractor_lists(directory: Path) -> dict[tuple[int, int], Path]:
    """The distractor lists in ``directory``: ``{(size, set): file}``, sorted by size then set.  All must belong to
    one distractor set (one :func:`list_set_name`); lists of two sets in one folder are an error naming both."""
    files = [p for p in Path(directory).iterdir() if p.is_file() and parse_list_name(p.name)]
    names = sorted({list_set_name(p.name) for p in files})
    if len(names) > 1:
        raise ValueError(f"{directory}: distractor lists of {len(names)} sets ({', '.join(names)}); keep one set of "
                         f"<name>_features_list.json_<size>_<set> files per folder")  # fmt: skip
    found = {parse_list_name(p.name): p for p in files}
    return {key: found[key] for key in sorted(k for k in found if k is not None)}


# --- noise lists ------------------------------------------------------------------------------------------------------


def read_noise_list(path: Path) -> tuple[str, ...]:
    """Read a noise list: one entry per line; blank lines and ``#`` comments skipped; unique entries in file order."""
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return tuple(dict.fromkeys(line for line in lines if line and not line.startswith("#")))


def noisy_mask(rel_paths: Sequence[str], noise_entries: Sequence[str]) -> np.ndarray:
    """(n,) bool: which of ``rel_paths`` a noise list names. An entry with a '/' matches the whole :func:`stem_key`
    (MegaFace list: ``375/37531198@N00/4174611825_0.jpg``); a bare one matches the file name's stem key only
    (FaceScrub list: ``Aaron_Eckhart_136.png``)."""
    full: set[str] = set()
    bare: set[str] = set()
    for entry in noise_entries:
        key = stem_key(entry)
        (full if "/" in key else bare).add(key)
    keys = (stem_key(p) for p in rel_paths)
    return np.fromiter((k in full or k.rsplit("/", 1)[-1] in bare for k in keys), dtype=bool, count=len(rel_paths))


# --- result JSON ------------------------------------------------------------------------------------------------------


def compress_curve(x: FloatSeq, y: FloatSeq, step: float = 0.01) -> tuple[list[float], list[float]]:
    """The devkit's curve compression: keep the first point, then each point whose y has risen by >= ``step`` since
    the last kept point, and always the last point. A 1e-12 slack absorbs float error (0.03 − 0.02 < 0.01)."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1 or xs.size == 0:
        raise ValueError(f"x and y must be non-empty 1-d and equal in length, got shapes {xs.shape} and {ys.shape}")
    ylist, keep, rise = ys.tolist(), [0], step - 1e-12
    if len(ylist) > 2 and bool(np.all(ys[1:] >= ys[:-1])):
        # a non-decreasing curve (CMC, ROC): fl(y[i] - y[last]) >= rise is monotone in i, so each next point is a
        # bisection away (~100 points of a 1M-rank CMC instead of a 1M-step loop); the same points as the loop
        n = len(ylist) - 1
        while True:
            base, lo, hi = ylist[keep[-1]], keep[-1] + 1, n  # the first i in [lo, n) that rises enough, else n
            while lo < hi:
                mid = (lo + hi) // 2
                if ylist[mid] - base >= rise:
                    hi = mid
                else:
                    lo = mid + 1
            if lo >= n:
                break
            keep.append(lo)
    else:
        for i in range(1, len(ylist) - 1):
            if ylist[i] - ylist[keep[-1]] >= rise:
                keep.append(i)
    if len(ylist) > 1:
        keep.append(len(ylist) - 1)
    return [float(xs[i]) for i in keep], [float(ys[i]) for i in keep]


def devkit_result_name(probe: str, distractor: str, algorithm: str, size: int, set_number: int) -> str:
    """``cmc_<probe>_<distractor>_<alg>_<size>_<set>.json``, e.g. ``cmc_facescrub_megaface_myalgo_1000000_1.json``."""
    for label, value in (("probe", probe), ("distractor", distractor), ("algorithm", algorithm)):
        if not value or "/" in value:
            raise ValueError(f"{label} name {value!r} must be non-empty and contain no '/'")
    if size < 1 or set_number < 1:
        raise ValueError(f"size and set must be >= 1, got {size} and {set_number}")
    return f"cmc_{probe}_{distractor}_{algorithm}_{size}_{set_number}.json"


def _f32(values: FloatSeq, what: str) -> list[float]:
    out = [float(np.float32(v)) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} has a non-finite value")
    return out


def write_devkit_json(
    path: Path,
    cmc_ranks: FloatSeq,
    cmc_rates: FloatSeq,
    roc_fpr: FloatSeq,
    roc_tpr: FloatSeq,
    compress: bool = True,
) -> None:
    """Write a devkit result JSON ``{"cmc": [[ranks], [rates]], "roc": [[fpr], [tpr]]}`` atomically: 0-based integer
    ranks, float32-rounded rates, fpr and tpr; both curves compressed with :func:`compress_curve` unless
    ``compress=False``."""
    curves = {"cmc": (cmc_ranks, cmc_rates), "roc": (roc_fpr, roc_tpr)}
    out: dict[str, list[list[Any]]] = {}
    for key, (x, y) in curves.items():
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"{path}: {key} curve needs equal, non-empty x and y, got {len(x)} and {len(y)}")
        if compress:
            x, y = compress_curve(x, y)
        out[key] = [list(x), _f32(y, f"{key} y")]
    ranks = [int(r) for r in out["cmc"][0]]
    if any(r != v or r < 0 for r, v in zip(ranks, out["cmc"][0], strict=True)):
        raise ValueError(f"{path}: cmc ranks must be non-negative integers (0-based)")
    out["cmc"][0], out["roc"][0] = ranks, _f32(out["roc"][0], "roc fpr")
    atomic_write_text(Path(path), json.dumps(out) + "\n")


def read_devkit_json(path: Path) -> dict[str, Any]:
    """Read a devkit result JSON: ``{"cmc": [ranks (int), rates], "roc": [fpr, tpr]}`` (other keys kept as read)."""
    obj = _load_json(path)
    if not isinstance(obj, dict):
        raise DevkitFormatError(f"{path}: expected a JSON object with keys 'cmc' and 'roc'")
    for key in ("cmc", "roc"):
        curve = obj.get(key)
        if not (isinstance(curve, list) and len(curve) == 2 and all(isinstance(c, list) for c in curve)):
            raise DevkitFormatError(f"{path}: key {key!r} must be a list of two lists")
        if len(curve[0]) != len(curve[1]) or not curve[0]:
            raise DevkitFormatError(f"{path}: key {key!r} lists have lengths {len(curve[0])} and {len(curve[1])}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for c in curve for v in c):
            raise DevkitFormatError(f"{path}: key {key!r} holds a non-number")
    if any(r != int(r) or r < 0 for r in obj["cmc"][0]):
        raise DevkitFormatError(f"{path}: key 'cmc' ranks must be non-negative integers")
    obj["cmc"][0] = [int(r) for r in obj["cmc"][0]]
    return obj


def tar_from_compressed_roc(fpr: FloatSeq, tpr: FloatSeq, far: float, convention: str = "step") -> float:
    """TAR at ``far`` read from a (compressed) ROC, fpr non-decreasing. Label the convention with the number:

    * ``step``: the largest tpr among points with fpr <= far (conservative; 0 when there is none);
    * ``interpolate``: linear in log10(fpr) between the step point and the next point above far (a step point at
      fpr 0, or no point above far, gives the step value);
    * ``nearest``: the tpr of the point nearest in log10(fpr) (points at fpr 0 are skipped; a tie goes to the lower
      fpr; at equal fpr the largest tpr)."""
    if convention not in TAR_CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; valid: {', '.join(TAR_CONVENTIONS)}")
    f, t = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    if f.shape != t.shape or f.ndim != 1 or f.size == 0 or np.any(np.diff(f) < 0):
        raise ValueError("fpr and tpr must be non-empty, equal in length, with fpr non-decreasing")
    if not far > 0:
        raise ValueError(f"far must be > 0, got {far}")
    below = f <= far
    step = float(t[below].max()) if below.any() else 0.0
    if convention == "step":
        return step
    if convention == "interpolate":
        lo = int(np.count_nonzero(below)) - 1
        if lo < 0 or lo == f.size - 1 or f[lo] <= 0 or f[lo] == far:
            return step
        hi = lo + 1
        frac = (math.log10(far) - math.log10(f[lo])) / (math.log10(f[hi]) - math.log10(f[lo]))
        return step + frac * (float(t[hi]) - step)
    positive = f > 0
    if not positive.any():
        return step
    dist = np.abs(np.log10(f[positive]) - math.log10(far))
    nearest_f = f[positive][int(np.argmin(dist))]  # argmin: first minimum, i.e. the lower fpr on a tie
    return float(t[f == nearest_f].max())
