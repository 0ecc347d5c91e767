"""The synthetic face data set: the project's embedded default data, in the real on-disk layouts.

``generate_faces(SynthConfig(out=D))`` renders procedural faces (see :mod:`facesearch.model.faces.synth_render`) and
writes, under D:

- ``casia/<7-digit id>/<NNN>.jpg`` + ``landmarks.csv`` + ``attributes.csv`` (CASIA-WebFace style training set);
- ``celeba/img_align_celeba/000001.jpg`` (178x218, aligned) + the four CelebA list files (attribute set); with
  ``celeba_databases`` (``--celeba-databases``) also ``celeba/databases/a.csv`` and ``b.csv``: two generic list CSVs
  (see :func:`facesearch.model.faces.samples.read_list`) of the train-partition images, split by person into two
  disjoint halves, with different label sets (a: Male, Big_Nose, Pointy_Nose, Narrow_Eyes; b: Male, Chubby,
  Double_Chin, High_Cheekbones and the categorical Hair_Colour), for training one network on several databases whose
  labels differ (MTL-CNN);
- ``megaface/facescrub/<First_Last>/<First_Last>_<k>.png`` probes, ``megaface/megaface/<3>/<id>@N00/<n>_<j>.jpg``
  distractors, the devkit ``templatelists/`` JSON files, landmark CSVs and per-image attribute truth;
- ``synth_manifest.json``: resolved config, package version, counts, attribute base rates, creation time and the
  provenance record (:func:`facesearch.model.provenance.provenance`).

The four populations (CASIA, CelebA, FaceScrub probes, MegaFace distractors) are disjoint people.  Every image's
pixels depend only on (seed, population, identity index, image index), so output is byte-identical for any worker count.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from facesearch.model.config import ATTRIBUTES, from_mapping
from facesearch.model.faces.synth_identity import (
    ATTRIBUTE_BASE_RATES,
    HAIR_COLOURS,
    Identity,
    flickr_paths,
    person_names,
    sample_identity,
)
from facesearch.model.faces.synth_render import CELEBA_SIZE, encode_image, render_face
from facesearch.model.fileio import atomic_write_bytes
from facesearch.model.provenance import provenance

log = logging.getLogger(__name__)

__all__ = ["LAYOUTS", "MANIFEST", "SynthConfig", "SynthSummary", "distractor_sizes", "generate_faces"]

LAYOUTS: tuple[str, ...] = ("casia", "celeba", "megaface")
MANIFEST = "synth_manifest.json"
_POP = {"casia": 1, "celeba": 2, "facescrub": 3, "megaface": 4}  # population codes: disjoint sets of people
_CHUNK = 32  # images per worker task
_LANDMARK_HEADER = "path,identity,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5"
_CELEBA_LANDMARKS = (
    "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
)
_NOT_COMPARED = ("out", "workers")  # config keys that do not change the output bytes


class _Database(NamedTuple):
    """One list-CSV database of ``--celeba-databases``: its 0/1 columns (names in ATTRIBUTES), then categorical ones."""

    binary: tuple[str, ...]
    categorical: tuple[str, ...]  # names in _CATEGORICAL


#: The categorical columns the databases may carry: class names and the identity's class.
_CATEGORICAL: dict[str, tuple[tuple[str, ...], Callable[[Identity], int]]] = {
    "Hair_Colour": (HAIR_COLOURS, lambda idn: idn.hair_colour),
}
#: ``--celeba-databases``: disjoint label sets (only Male shared) on disjoint people; a gets the even-numbered half.
_DATABASES: dict[str, _Database] = {
    "a": _Database(("Male", "Big_Nose", "Pointy_Nose", "Narrow_Eyes"), ()),
    "b": _Database(("Male", "Chubby", "Double_Chin", "High_Cheekbones"), ("Hair_Colour",)),
}


@dataclass(frozen=True)
class SynthConfig:
    """What to generate.  Counts are per layout; ``nuisance`` scales every per-image nuisance (0 = clean renders);
    ``celeba_databases`` adds the two list-CSV databases to the celeba layout (see the module docstring)."""

    out: Path
    seed: int = 0
    identities: int = 50
    images_per_identity: int = 10
    celeba_images: int = 1000
    celeba_images_per_identity: int = 20
    probe_identities: int = 10
    probe_images_per_identity: int = 10
    distractors: int = 1000
    layouts: tuple[str, ...] = LAYOUTS
    size: int = 128
    nuisance: float = 1.0
    workers: int | None = None
    celeba_databases: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        lay = self.layouts.split(",") if isinstance(self.layouts, str) else self.layouts
        object.__setattr__(self, "layouts", tuple(s.strip() for s in lay))
        bad = [s for s in self.layouts if s not in LAYOUTS]
        if bad or not self.layouts or len(set(self.layouts)) != len(self.layouts):
            raise ValueError(f"layouts (--layouts) must be distinct names from {list(LAYOUTS)}, got {list(lay)}")
        minimum = {
            "seed": 0,
            "identities": 2,
            "images_per_identity": 1,
            "celeba_images": 1,
            "celeba_images_per_identity": 1,
            "probe_identities": 1,
            "probe_images_per_identity": 2,
            "distractors": 1,
            "size": 32,
        }
        for name, lo in minimum.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be an integer >= {lo}, got {v!r}")
        if self.size > 512:
            raise ValueError(f"size (--size) must be in [32, 512], got {self.size}")
        if not 0.0 <= self.nuisance <= 2.0:
            raise ValueError(f"nuisance (--nuisance) must be in [0, 2], got {self.nuisance}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ValueError(f"workers (--workers) must be an integer >= 1 or None (all CPUs), got {self.workers!r}")
        if not isinstance(self.celeba_databases, bool):
            raise ValueError(
                f"celeba_databases (--celeba-databases) must be true or false, got {self.celeba_databases!r}"
            )
        if self.celeba_databases and "celeba" not in self.layouts:
            raise ValueError(
                "celeba_databases (--celeba-databases) needs the celeba layout (add celeba to --layouts),"
                f" got layouts {list(self.layouts)}"
            )

    @property
    def images(self) -> dict[str, int]:
        """Number of images each selected layout will hold."""
        n = {
            "casia": self.identities * self.images_per_identity,
            "celeba": self.celeba_images,
            "megaface": self.probe_identities * self.probe_images_per_identity + self.distractors,
        }
        return {k: n[k] for k in self.layouts}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SynthConfig:
        return from_mapping(cls, data)


@dataclass(frozen=True)
class SynthSummary:
    """What ``generate_faces`` wrote: images and identities per layout, wall time, the manifest path."""

    out: Path
    images: dict[str, int]
    identities: dict[str, int]
    seconds: float
    manifest: Path

    @property
    def images_per_second(self) -> float:
        return sum(self.images.values()) / max(self.seconds, 1e-9)


class _Job(NamedTuple):
    path: str  # relative to the output root; the suffix picks the encoder
    pop: int
    ident: int
    image: int
    width: int
    height: int
    aligned: bool


@dataclass
class _Plan:
    jobs: list[_Job]
    identities: int
    write: Callable[[Path, np.ndarray, np.ndarray], dict[str, float]]  # (out, landmarks, labels) -> observed rates
    manifest: dict[str, Any] = field(default_factory=dict)  # extra entries for the finished manifest


# ---------------------------------------------------------------------------------------------------------- writing
def _write_text(path: Path, lines: list[str]) -> None:
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def _landmark_rows(paths: list[str], ids: list[str], lm: np.ndarray) -> list[str]:
    """The generic list file: ``path,identity,x1,y1,...,x5,y5`` (paths relative to the CSV's folder)."""
    flat = np.asarray(lm, dtype=np.float64).reshape(len(paths), 10)
    return [_LANDMARK_HEADER] + [
        f"{p},{i}," + ",".join(f"{v:.2f}" for v in xy) for p, i, xy in zip(paths, ids, flat, strict=True)
    ]


def _attribute_rows(key: str, names: list[str], labels: np.ndarray) -> list[str]:
    return [",".join([key, *ATTRIBUTES])] + [
        f"{n}," + ",".join(str(int(v)) for v in r) for n, r in zip(names, labels, strict=True)
    ]


def _rates(labels: np.ndarray) -> dict[str, float]:
    return {
        a: round(float(v), 4)
        for a, v in zip(ATTRIBUTES, np.asarray(labels, dtype=np.float64).mean(axis=0), strict=True)
    }


# ---------------------------------------------------------------------------------------------------------- layouts
def _plan_casia(cfg: SynthConfig) -> _Plan:
    n, m, s = cfg.identities, cfg.images_per_identity, cfg.size
    jobs = [
        _Job(f"casia/{i + 1:07d}/{j + 1:03d}.jpg", _POP["casia"], i, j, s, s, False) for i in range(n) for j in range(m)
    ]

    def write(out: Path, lm: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        ids = [j.path.split("/")[1] for j in jobs]
        _write_text(out / "casia/landmarks.csv", _landmark_rows([j.path[6:] for j in jobs], ids, lm))
        _write_text(out / "casia/attributes.csv", _attribute_rows("identity", ids[::m], labels[::m]))
        return _rates(labels[::m])

    return _Plan(jobs, n, write)


def _celeba_order(cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per file (in file order): identity index, image index within the identity, partition 0/1/2.

    Partitions are ~80/10/10 by identity (contiguous file ranges, like CelebA); under 3 identities, by image.
    """
    n, per = cfg.celeba_images, cfg.celeba_images_per_identity
    n_ids = -(-n // per)
    ident = np.arange(n) // per
    image = np.arange(n) % per
    hold = max(1, round(0.1 * n_ids)) if n_ids >= 3 else 0
    split = np.searchsorted([n_ids - 2 * hold, n_ids - hold], ident, side="right")
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _POP["celeba"], 0xC0]))
    order = np.lexsort((rng.random(n), split))
    if n_ids < 3:
        split = np.searchsorted([int(0.8 * n), int(0.9 * n)], np.arange(n), side="right")
    else:
        split = split[order]
    return ident[order], image[order], split


def _database_members(ident: np.ndarray, split: np.ndarray) -> dict[str, np.ndarray]:
    """File positions (in file order) of databases a and b: the train-partition (0) images, whose people alternate
    between them by sorted identity index (even positions -> a, odd -> b), so the two share no person."""
    train = np.unique(ident[split == 0])
    if len(train) < 2:
        raise ValueError(
            f"celeba_databases (--celeba-databases) needs at least 2 train-partition people to split, got {len(train)};"
            " raise --celeba-images or lower --celeba-images-per-identity"
        )
    half = np.searchsorted(train, ident) % 2
    return {name: np.flatnonzero((split == 0) & (half == k)) for k, name in enumerate(_DATABASES)}


def _database_rows(
    seed: int, db: _Database, names: list[str], ident: np.ndarray, xy: np.ndarray, labels: np.ndarray, rows: np.ndarray
) -> list[str]:
    """A generic list CSV of the images at ``rows``: path (relative to ``celeba/databases``), identity (as in
    identity_CelebA.txt), the integer landmarks of list_landmarks_align_celeba.txt and the database's columns."""
    cols = [ATTRIBUTES.index(a) for a in db.binary]
    people = np.unique(ident[rows])
    classes = {  # per person, not per image: one identity draw each
        int(i): [str(_CATEGORICAL[c][1](sample_identity(seed, _POP["celeba"], int(i)))) for c in db.categorical]
        for i in people
    }
    out = [",".join([_LANDMARK_HEADER, *db.binary, *db.categorical])]
    for r in rows:
        cells = [f"../img_align_celeba/{names[r]}", str(ident[r] + 1), *map(str, xy[r])]
        out.append(",".join([*cells, *(str(int(labels[r, c])) for c in cols), *classes[int(ident[r])]]))
    return out


def _plan_celeba(cfg: SynthConfig) -> _Plan:
    ident, image, split = _celeba_order(cfg)
    members = _database_members(ident, split) if cfg.celeba_databases else {}
    w, h = CELEBA_SIZE
    names = [f"{k + 1:06d}.jpg" for k in range(len(ident))]
    jobs = [
        _Job(f"celeba/img_align_celeba/{f}", _POP["celeba"], int(i), int(j), w, h, True)
        for f, i, j in zip(names, ident, image, strict=True)
    ]

    def write(out: Path, lm: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        d, n = out / "celeba", len(names)
        pm = np.where(labels > 0, 1, -1)
        _write_text(
            d / "list_attr_celeba.txt",
            [str(n), " ".join(ATTRIBUTES)]
            + [f + "".join(f" {v:2d}" for v in r) for f, r in zip(names, pm, strict=True)],
        )
        xy = np.rint(lm.reshape(n, 10)).astype(np.int64)
        _write_text(
            d / "list_landmarks_align_celeba.txt",
            [str(n), _CELEBA_LANDMARKS] + [f + " " + " ".join(map(str, r)) for f, r in zip(names, xy, strict=True)],
        )
        _write_text(d / "list_eval_partition.txt", [f"{f} {p}" for f, p in zip(names, split, strict=True)])
        _write_text(d / "identity_CelebA.txt", [f"{f} {i + 1}" for f, i in zip(names, ident, strict=True)])
        for name, rows in members.items():
            _write_text(
                d / f"databases/{name}.csv", _database_rows(cfg.seed, _DATABASES[name], names, ident, xy, labels, rows)
            )
        first = np.unique(ident, return_index=True)[1]
        return _rates(labels[first])

    databases = {
        name: {
            "file": f"celeba/databases/{name}.csv",
            "images": len(rows),
            "people": len(np.unique(ident[rows])),
            "attributes": [*_DATABASES[name].binary, *_DATABASES[name].categorical],
            "categorical": {c: list(_CATEGORICAL[c][0]) for c in _DATABASES[name].categorical},
        }
        for name, rows in members.items()
    }
    return _Plan(jobs, int(ident.max()) + 1, write, {"celeba_databases": databases} if databases else {})


def distractor_sizes(n: int) -> list[int]:
    """List sizes for ``n`` distractors: 10, 100, ... up to ``n``, plus ``n`` itself when it is not a power of ten."""
    sizes = [10**e for e in range(1, 19) if 10**e <= n]
    return sizes if sizes and sizes[-1] == n else [*sizes, n]


def _distractor_lists(seed: int, paths: list[str]) -> dict[int, list[str]]:
    """One independent seeded random sample per size; none is a prefix of another (redrawn if it happens)."""
    lists: dict[int, list[str]] = {}
    for size in distractor_sizes(len(paths)):
        for attempt in range(100):
            rng = np.random.default_rng(np.random.SeedSequence([seed, _POP["megaface"], 0x115, size, attempt]))
            pick = [paths[i] for i in rng.choice(len(paths), size=size, replace=False)]
            if all(pick[: len(b)] != b and b[: len(pick)] != pick for b in lists.values()):
                break
        lists[size] = pick
    return lists


def _plan_megaface(cfg: SynthConfig) -> _Plan:
    p, k, s = cfg.probe_identities, cfg.probe_images_per_identity, cfg.size
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _POP["megaface"], 0x4E]))
    names = person_names(rng, p)
    nums = np.sort((rng.choice(900_000, size=p * k, replace=False) + 100_000).reshape(p, k), axis=1)
    probes = [f"{nm}/{nm}_{nums[i, j]}.png" for i, nm in enumerate(names) for j in range(k)]
    dis = flickr_paths(rng, cfg.distractors)
    jobs = [
        _Job(f"megaface/facescrub/{q}", _POP["facescrub"], i // k, i % k, s, s, False) for i, q in enumerate(probes)
    ]
    jobs += [_Job(f"megaface/megaface/{q}", _POP["megaface"], i, 0, s, s, False) for i, q in enumerate(dis)]

    def write(out: Path, lm: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        d, npr = out / "megaface", len(probes)
        ids = [q.split("/")[0] for q in probes]
        tl = {"facescrub_features_list.json": {"path": probes, "id": ids}}
        tl |= {f"megaface_features_list.json_{n}_1": {"path": v} for n, v in _distractor_lists(cfg.seed, dis).items()}
        for name, obj in tl.items():
            _write_text(d / "templatelists" / name, [json.dumps(obj)])
        rel = [j.path[len("megaface/") :] for j in jobs]
        _write_text(d / "facescrub_landmarks.csv", _landmark_rows(rel[:npr], ids, lm[:npr]))
        _write_text(d / "megaface_landmarks.csv", _landmark_rows(rel[npr:], [q.split("/")[1] for q in dis], lm[npr:]))
        _write_text(d / "attributes.csv", _attribute_rows("path", rel, labels))
        return _rates(np.concatenate([labels[:npr:k], labels[npr:]]))  # one row per person

    return _Plan(jobs, p + len(dis), write)


_PLANNERS: dict[str, Callable[[SynthConfig], _Plan]] = {
    "casia": _plan_casia,
    "celeba": _plan_celeba,
    "megaface": _plan_megaface,
}


# -------------------------------------------------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=256)
def _identity(seed: int, pop: int, ident: int) -> Identity:
    return sample_identity(seed, pop, ident)


def _render_chunk(out: str, seed: int, strength: float, jobs: list[_Job]) -> tuple[np.ndarray, np.ndarray]:
    """Render, encode and atomically write ``jobs``; return landmarks ``(n, 5, 2) float32`` and labels ``(n, 7) uint8``.

    Runs in worker processes.  Image files are not fsynced: ``os.replace`` already guarantees a killed run leaves no
    partial image, and an fsync per small image would cost more than rendering it.
    """
    lm = np.empty((len(jobs), 5, 2), np.float32)
    labels = np.empty((len(jobs), len(ATTRIBUTES)), np.uint8)
    made: set[str] = set()
    for n, job in enumerate(jobs):
        idn = _identity(seed, job.pop, job.ident)
        rng = np.random.default_rng(np.random.SeedSequence([seed, job.pop, job.ident, job.image, 0x1A]))
        img, lm[n] = render_face(idn, rng, job.width, job.height, job.aligned, strength)
        labels[n] = idn.labels
        path = Path(out) / job.path
        if path.parent.as_posix() not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent.as_posix())
        atomic_write_bytes(path, encode_image(img, path.suffix, rng, strength), fsync=False)
    return lm, labels


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; OpenCV threads would only oversubscribe


def _run_chunks(cfg: SynthConfig, workers: int, jobs: list[_Job]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(offset, landmarks, labels)`` per chunk of ``jobs`` (in completion order) with a bounded task window."""
    starts = list(range(0, len(jobs), _CHUNK))
    args = (str(cfg.out.resolve()), cfg.seed, cfg.nuisance)  # absolute: workers need not share our cwd
    if min(workers, len(starts)) <= 1:  # in-process: no pool for a single worker or a single chunk
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # images are small: OpenCV's own threads cost more than they save
        try:
            for a in starts:
                yield (a, *_render_chunk(*args, jobs[a : a + _CHUNK]))
        finally:
            cv2.setNumThreads(threads)
        return
    # Never plain fork: a parent that has used OpenCV's thread pool can leave a lock held in the child (deadlock).
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(
            ["facesearch.model.faces.synth"]
        )  # import numpy/cv2 once in the server, not once per worker
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as ex:
        pending: dict[Future[tuple[np.ndarray, np.ndarray]], int] = {}
        for a in starts:
            pending[ex.submit(_render_chunk, *args, jobs[a : a + _CHUNK])] = a
            while len(pending) >= 4 * workers or (a == starts[-1] and pending):
                fut = next(iter(pending))  # oldest first: keeps memory bounded, order does not matter to callers
                yield (pending.pop(fut), *fut.result())


# ------------------------------------------------------------------------------------------------------------ entry
def _check_out(cfg: SynthConfig) -> None:
    """Refuse a non-empty ``out`` unless it holds a synth manifest made with the same config.

    A key missing from an older manifest counts as that field's default: fields added later (``celeba_databases``)
    default to what older versions did, so their output is still recognised as made by the same config.
    """
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    man = out / MANIFEST
    if not man.is_file():
        raise ValueError(f"--out {out} is not empty and holds no {MANIFEST}; refusing to write into it (use a new dir)")
    new, default = cfg.to_dict(), SynthConfig(out=out).to_dict()
    try:
        old = {**default, **json.loads(man.read_text())["config"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{man}: unreadable synth manifest ({e}); refusing to overwrite {out}") from e
    diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if k not in _NOT_COMPARED and old.get(k) != v]
    if diff:
        raise ValueError(
            f"--out {out} already holds synthetic faces made with a different config ({'; '.join(diff)});"
            " use a new --out or delete it first"
        )


def _write_manifest(cfg: SynthConfig, plans: dict[str, _Plan], extra: dict[str, Any]) -> Path:
    record = provenance()
    man = {
        "kind": "facesearch.synth",
        "version": record["facesearch"],
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "images": cfg.images,
        "identities": {k: p.identities for k, p in plans.items()},
        "attributes": list(ATTRIBUTES),
        "attribute_base_rates": ATTRIBUTE_BASE_RATES,
        "landmarks": "image-left eye, image-right eye, nose tip, image-left mouth corner, image-right mouth corner",
        "created": record["created"],
        "provenance": record,
        **extra,
    }
    path = cfg.out / MANIFEST
    atomic_write_bytes(path, (json.dumps(man, indent=2) + "\n").encode())
    return path


def generate_faces(cfg: SynthConfig, progress: Callable[[int], object] | None = None) -> SynthSummary:
    """Render and write every selected layout under ``cfg.out``; ``progress(n)`` is called as ``n`` images finish.

    Raises ``ValueError`` when ``cfg.out`` is not empty and was not made by the same config.
    """
    t0 = time.perf_counter()
    _check_out(cfg)
    cfg = dataclasses.replace(cfg, workers=cfg.workers or os.cpu_count() or 1)
    assert cfg.workers is not None, "workers resolved above"
    plans = {name: _PLANNERS[name](cfg) for name in cfg.layouts}
    cfg.out.mkdir(parents=True, exist_ok=True)
    _write_manifest(cfg, plans, {"complete": False})
    jobs = [j for p in plans.values() for j in p.jobs]
    lm = np.empty((len(jobs), 5, 2), np.float32)
    labels = np.empty((len(jobs), len(ATTRIBUTES)), np.uint8)
    for a, chunk_lm, chunk_labels in _run_chunks(cfg, cfg.workers, jobs):
        lm[a : a + len(chunk_lm)], labels[a : a + len(chunk_lm)] = chunk_lm, chunk_labels
        if progress is not None:
            progress(len(chunk_lm))
    rates, a = {}, 0
    for name, plan in plans.items():
        rates[name] = plan.write(cfg.out, lm[a : a + len(plan.jobs)], labels[a : a + len(plan.jobs)])
        a += len(plan.jobs)
    seconds = time.perf_counter() - t0
    extra = {"complete": True, "attribute_rates": rates, "seconds": round(seconds, 3)}
    path = _write_manifest(cfg, plans, extra | {k: v for p in plans.values() for k, v in p.manifest.items()})
    log.info("wrote %d images to %s in %.1f s", len(jobs), cfg.out, seconds)
    return SynthSummary(cfg.out, cfg.images, {k: p.identities for k, p in plans.items()}, seconds, path)
