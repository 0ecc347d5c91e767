"""Identity-disjoint splits of an identity-labelled data set into training, probe and distractor people, written as
the lists the rest of the project reads, so that a model trained on one part is benchmarked on people it never saw.

    result = write_split(SplitConfig(data=Path("faces.csv"), out=Path("split"), probe_identities=80, seed=0))

``out`` then holds:

* ``train.csv``: the training people's images as a list CSV (``path,identity``, plus the source's landmark and
  attribute columns; paths relative to ``out``), for ``facesearch train --data out/train.csv --format list``;
* ``facescrub_features_list.json``: the probe images, FaceScrub-style (``{"path": [...], "id": [...]}``);
* ``megaface_features_list.json_<size>_1`` for every standard MegaFace size (10, 100, …, 10^6) the distractor images
  fill: prefixes of one seeded order, so each list holds the smaller ones;
* ``landmarks.csv`` (only when the source has landmarks): the probe and distractor images' landmarks, for ``bench
  megaface --probe-landmarks / --distractor-landmarks``;
* ``test_identities.txt``: the probe and distractor people (never in ``train.csv``), one per line, for ``bench
  lfw-pairs --people``;
* ``split.json``: what made it (the request, the source and its SHA-256, the counts, each file's SHA-256, the probe
  and distractor people, provenance), written last.

The two devkit lists' paths are relative to :func:`image_root` (``bench megaface --probe-images ROOT
--distractor-images ROOT``).  Distractors are every image of the distractor people unless
``distractor_images_per_identity`` caps them (1 = one image per person, nearest MegaFace, whose 1M images show 690k
people): all of them by default, because a held-out part of a training set has few people and the sizes it can fill
grow with its images.  Probe people need >= 2 images (a probe needs a mate); their images not chosen as probes are used
nowhere.  Everything is drawn from ``seed`` and depends only on the set of (image, identity) rows, not on their order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.benchmarks import devkit
from facesearch.indexer.shards import file_sha256
from facesearch.model.faces.celeba import read_celeba, read_identity_file
from facesearch.model.faces.samples import LANDMARK_COLUMNS, Sample, read_casia, read_list
from facesearch.model.fileio import atomic_write_text
from facesearch.model.provenance import provenance

log = logging.getLogger(__name__)

#: Layouts a split reads (those of ``facesearch train --format``): a list CSV, a folder per identity, a flat folder
#: named by an identity file, a CelebA root.
SPLIT_FORMATS: tuple[str, ...] = ("list", "casia", "flat", "celeba")
#: MegaFace's distractor sizes (as :data:`facesearch.benchmarks.megaface_lists.DEFAULT_SIZES`).
MEGAFACE_SIZES: tuple[int, ...] = (10, 100, 1000, 10_000, 100_000, 1_000_000)
TRAIN_LIST = "train.csv"
PROBE_LIST = "facescrub_features_list.json"
DISTRACTOR_SET = "megaface"
LANDMARKS = "landmarks.csv"
TEST_IDENTITIES = "test_identities.txt"
RECORD = "split.json"
KIND = "facesearch.split/1"


def read_identity_samples(
    data: Path, data_format: str = "list", root: Path | None = None, identities: Path | None = None
) -> list[Sample]:
    """The images of ``data`` with their identities: a ``list`` CSV (paths relative to ``root``, default the CSV's
    folder), a ``casia`` folder per identity, a ``flat`` folder named by the identity file ``identities`` or a
    ``celeba`` root.  Raises ``ValueError`` for a bad format or combination, no images or an image without identity;
    ``FileNotFoundError`` for a missing list or folder."""
    data = Path(data)
    if data_format not in SPLIT_FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; valid: {list(SPLIT_FORMATS)}")
    if identities is not None and data_format not in ("flat", "celeba"):
        raise ValueError(f"an identity file is read with data format flat or celeba, not {data_format!r}")
    if root is not None and data_format != "list":
        raise ValueError(f"root is the folder a list CSV's paths are relative to; data format {data_format!r} has none")
    if data_format == "list":
        if not data.is_file():
            raise FileNotFoundError(f"list CSV {data} does not exist")
        samples = read_list(data, root)
    elif data_format == "casia":
        samples = read_casia(data)
    elif data_format == "celeba":
        samples = read_celeba(data, identities=identities)
    elif identities is None:
        raise ValueError(f"data format flat needs an identity file ('file identity' lines) naming the images of {data}")
    else:
        samples = read_identity_file(identities, data)
    if not samples:
        raise ValueError(f"{data}: no images listed")
    unlabelled = [s for s in samples if s.identity is None]
    if unlabelled:
        raise ValueError(f"{data}: {len(unlabelled)} of {len(samples)} images have no identity (e.g. "
                         f"{unlabelled[0].path}); identity-disjoint sets need every image labelled")  # fmt: skip
    return samples


def image_root(data: Path, data_format: str = "list", root: Path | None = None) -> Path:
    """The folder the images of ``data`` are named relative to: ``root`` or the list CSV's folder, the CASIA or flat
    folder, a CelebA root's ``img_align_celeba``."""
    if data_format == "list":
        return Path(root) if root is not None else Path(data).parent
    return Path(data) / "img_align_celeba" if data_format == "celeba" else Path(data)


@dataclass(frozen=True)
class SplitConfig:
    """A split of ``data`` (read by :func:`read_identity_samples`) into ``out``.  ``probe_identities`` people with at
    least ``max(2, probe_images_per_identity)`` images give ``probe_images_per_identity`` probes each (None: all their
    images); of the other people, ``distractor_identities`` (None: ``distractor_fraction`` of them, rounded) are
    distractor people, each giving ``distractor_images_per_identity`` images (None: all); the rest train."""

    data: Path
    out: Path
    data_format: str = "list"
    root: Path | None = None
    identities: Path | None = None
    probe_identities: int = 80
    probe_images_per_identity: int | None = None
    distractor_identities: int | None = None
    distractor_fraction: float = 0.2
    distractor_images_per_identity: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("data", "out", "root", "identities"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else Path(value))
        if self.data_format not in SPLIT_FORMATS:
            raise ValueError(f"data_format must be one of {list(SPLIT_FORMATS)}, got {self.data_format!r}")
        if self.probe_identities < 1:
            raise ValueError(f"probe_identities must be >= 1, got {self.probe_identities}")
        for name in ("probe_images_per_identity", "distractor_identities", "distractor_images_per_identity"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (None: see SplitConfig), got {getattr(self, name)}")
        if not 0 < self.distractor_fraction < 1:
            raise ValueError(f"distractor_fraction must be in (0, 1), got {self.distractor_fraction}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Split:
    """The parts of a split.  ``train`` and ``probes`` are sorted by identity then path; ``distractors`` is the seeded
    order whose prefixes are the size lists; the people tuples are sorted; ``unused``: images in no part (probe
    people's images not chosen as probes, distractor images beyond the per-person cap)."""

    train: tuple[Sample, ...]
    probes: tuple[Sample, ...]
    distractors: tuple[Sample, ...]
    train_people: tuple[str, ...]
    probe_people: tuple[str, ...]
    distractor_people: tuple[str, ...]
    unused: int

    @property
    def sizes(self) -> tuple[int, ...]:
        """The standard MegaFace sizes the distractor images fill."""
        return tuple(s for s in MEGAFACE_SIZES if s <= len(self.distractors))

    def counts(self) -> dict[str, int]:
        return {"train_people": len(self.train_people), "train_images": len(self.train),
                "probe_people": len(self.probe_people), "probe_images": len(self.probes),
                "distractor_people": len(self.distractor_people), "distractor_images": len(self.distractors),
                "unused_images": self.unused}  # fmt: skip


def _first_duplicate(values: Sequence[str]) -> str | None:
    return next((v for v, n in Counter(values).items() if n > 1), None)


def _rng(seed: int, purpose: str) -> np.random.Generator:
    """An independent stream per purpose, so changing one count does not reshuffle the other draws."""
    tag = int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:4], "little")
    return np.random.default_rng(np.random.SeedSequence([seed, tag]))


def _pick(items: Sequence[Any], k: int | None, rng: np.random.Generator) -> list[Any]:
    """``k`` of ``items`` drawn without replacement, in their order (all of them when ``k`` is None or too big)."""
    if k is None or k >= len(items):
        return list(items)
    return [items[i] for i in sorted(rng.choice(len(items), k, replace=False).tolist())]


def plan_split(samples: Sequence[Sample], cfg: SplitConfig) -> Split:
    """Draw the people and images of each part (a pure function of the (path, identity) rows and ``cfg``).  Raises
    ``ValueError`` naming the counts when there are too few people or images, or an image listed twice."""
    people: dict[str, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: (str(s.identity), str(s.path))):
        people[str(s.identity)].append(s)
    dup = _first_duplicate([str(s.path) for s in samples])
    if dup is not None:
        raise ValueError(f"{cfg.data}: image {dup} is listed more than once")
    names = sorted(people)
    need = max(2, cfg.probe_images_per_identity or 2)
    eligible = [n for n in names if len(people[n]) >= need]
    if len(eligible) < cfg.probe_identities:
        raise ValueError(f"{cfg.data}: too few people for {cfg.probe_identities} probe identities: {len(eligible)} of "
                         f"its {len(names)} people have >= {need} images (a probe needs a mate); lower "
                         f"probe_identities or probe_images_per_identity")  # fmt: skip
    probe_people = sorted(_pick(eligible, cfg.probe_identities, _rng(cfg.seed, "probe-people")))
    rng = _rng(cfg.seed, "probe-images")
    probes = [s for n in probe_people for s in _pick(people[n], cfg.probe_images_per_identity, rng)]
    taken = set(probe_people)
    rest = [n for n in names if n not in taken]
    wanted = cfg.distractor_identities
    if wanted is None:
        wanted = round(cfg.distractor_fraction * len(rest))
    if wanted < 1 or wanted >= len(rest):
        raise ValueError(f"{cfg.data}: too few people: {len(names)} people, {len(probe_people)} of them probes, leave "
                         f"{len(rest)} for distractors and training, which need >= 1 each; asked for {wanted} "
                         f"distractor people")  # fmt: skip
    distractor_people = sorted(_pick(rest, wanted, _rng(cfg.seed, "distractor-people")))
    rng = _rng(cfg.seed, "distractor-images")
    pool = [s for n in distractor_people for s in _pick(people[n], cfg.distractor_images_per_identity, rng)]
    if len(pool) < MEGAFACE_SIZES[0]:
        raise ValueError(f"{cfg.data}: too few distractor images: the {len(distractor_people)} distractor people give "
                         f"{len(pool)}, MegaFace's smallest size is {MEGAFACE_SIZES[0]}; raise distractor_identities "
                         f"(or distractor_fraction, or distractor_images_per_identity)")  # fmt: skip
    order = _rng(cfg.seed, "distractor-order").permutation(len(pool))
    chosen = set(probe_people) | set(distractor_people)
    train_people = [n for n in names if n not in chosen]
    train = [s for n in train_people for s in people[n]]
    unused = len(samples) - len(train) - len(probes) - len(pool)
    return Split(tuple(train), tuple(probes), tuple(pool[i] for i in order), tuple(train_people), tuple(probe_people),
                 tuple(distractor_people), unused)  # fmt: skip


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(start)).replace(os.sep, "/")


def _list_csv(samples: Sequence[Sample], start: Path, attributes: bool = True) -> str:
    """A list CSV of ``samples`` (paths relative to ``start``): landmarks when any sample has them, then the attribute
    columns the samples carry (first-seen order; empty = unknown)."""
    has_lm = any(s.landmarks is not None for s in samples)
    names = list(dict.fromkeys(a for s in samples for a in (s.attributes or {}))) if attributes else []
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "identity", *(LANDMARK_COLUMNS if has_lm else ()), *names])
    for s in samples:
        lm = [] if not has_lm else [""] * 10 if s.landmarks is None else [str(v) for v in s.landmarks.reshape(-1)]
        values = [f"{s.attributes[a]:g}" if s.attributes and a in s.attributes else "" for a in names]
        writer.writerow([_rel(s.path, start), s.identity, *lm, *values])
    return buf.getvalue()


def _is_split_file(name: str) -> bool:
    return name in (TRAIN_LIST, PROBE_LIST, LANDMARKS, TEST_IDENTITIES) or devkit.parse_list_name(name) is not None


@dataclass(frozen=True)
class SplitResult:
    """``record``: the ``split.json`` document; ``written``: False when ``out`` already held this very split (nothing
    was written)."""

    out: Path
    record: dict[str, Any]
    written: bool


def _existing(out: Path, request: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record of the same split already complete in ``out``; None when there is nothing (or the same split with a
    file missing or changed: rewritten).  Raises ``ValueError`` when ``out`` holds a different split or split files
    of none."""
    if not (out / RECORD).is_file():
        stray = sorted(p.name for p in out.iterdir() if _is_split_file(p.name)) if out.is_dir() else []
        if stray:
            raise ValueError(f"{out} holds {stray[:3]} but no {RECORD}: not a split written here; choose an empty "
                             f"folder")  # fmt: skip
        return None
    try:
        old = json.loads((out / RECORD).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{out / RECORD} is not a split record ({e}); delete it or choose another folder") from None
    previous = old.get("request", {}) if isinstance(old, dict) else {}
    if previous != request:
        keys = sorted(k for k in set(previous) | set(request) if previous.get(k) != request.get(k))
        raise ValueError(f"{out} already holds a different split (it differs in {keys}); choose another folder or "
                         f"delete that one")  # fmt: skip
    files = old.get("files", {})
    if all((out / name).is_file() and file_sha256(out / name) == sha for name, sha in files.items()):
        return dict(old)
    log.warning("%s: the same split with a file missing or changed; writing it again", out)
    return None


def _write_files(plan: Split, cfg: SplitConfig, root: Path) -> list[str]:
    """Write every file of ``plan`` but the record into ``cfg.out``; returns their names."""
    probe_rel = [_rel(s.path, root) for s in plan.probes]
    pool_rel = [_rel(s.path, root) for s in plan.distractors]
    dup = _first_duplicate([devkit.stem_key(p) for p in probe_rel + pool_rel])
    if dup is not None:
        raise ValueError(f"{cfg.data}: two probe/distractor images share the devkit key {dup!r} (the same path without "
                         f"its extension); the devkit cannot tell them apart")  # fmt: skip
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    names = [TRAIN_LIST, PROBE_LIST, TEST_IDENTITIES]
    atomic_write_text(out / TRAIN_LIST, _list_csv(plan.train, out))
    devkit.write_probe_list(out / PROBE_LIST, probe_rel, [str(s.identity) for s in plan.probes])
    for size in plan.sizes:
        names.append(devkit.distractor_list_name(DISTRACTOR_SET, size, 1))
        devkit.write_distractor_list(out / names[-1], pool_rel[:size])
    tested = sorted({*plan.probe_people, *plan.distractor_people})
    atomic_write_text(out / TEST_IDENTITIES, "".join(f"{n}\n" for n in tested))
    marked = [s for s in (*plan.probes, *plan.distractors) if s.landmarks is not None]
    if marked:
        names.append(LANDMARKS)
        atomic_write_text(out / LANDMARKS, _list_csv(marked, out, attributes=False))
    return names


def write_split(cfg: SplitConfig) -> SplitResult:
    """Read, split and write ``cfg.out`` (see the module docstring); a no-op when ``cfg.out`` already holds the same
    split.  Raises ``ValueError`` for too few people or images (see :func:`plan_split`), for a different split already
    in ``cfg.out`` and for two list entries that the devkit would confuse (same path without extension)."""
    samples = read_identity_samples(cfg.data, cfg.data_format, cfg.root, cfg.identities)
    root = image_root(cfg.data, cfg.data_format, cfg.root)
    rows = sorted(f"{_rel(s.path, root)}\t{s.identity}" for s in samples)
    if any(r.startswith("../") for r in rows):
        raise ValueError(f"{cfg.data}: some images lie outside {root} (e.g. {next(r for r in rows if r[:3] == '../')})"
                         f"; give the folder that holds them all as root")  # fmt: skip
    plan = plan_split(samples, cfg)
    request = {"kind": KIND, "samples_sha256": hashlib.sha256("\n".join(rows).encode()).hexdigest(),
               "image_root": os.path.abspath(root), "probe_identities": cfg.probe_identities,
               "probe_images_per_identity": cfg.probe_images_per_identity,
               "distractor_identities": len(plan.distractor_people),
               "distractor_images_per_identity": cfg.distractor_images_per_identity, "seed": cfg.seed}  # fmt: skip
    old = _existing(cfg.out, request)
    if old is not None:
        return SplitResult(cfg.out, old, written=False)
    names = _write_files(plan, cfg, root)
    source_file = cfg.data if cfg.data.is_file() else cfg.identities
    source = {"data": str(cfg.data), "data_format": cfg.data_format, "file": str(source_file or ""),
              "sha256": file_sha256(source_file) if source_file is not None else None,
              "images": len(samples), "people": len({s.identity for s in samples})}  # fmt: skip
    record = {"request": request, "config": cfg.to_dict(), "source": source, "image_root": str(root),
              "counts": plan.counts(), "sizes": list(plan.sizes),
              "files": {name: file_sha256(cfg.out / name) for name in sorted(names)},
              "probe_people": list(plan.probe_people), "distractor_people": list(plan.distractor_people),
              "provenance": provenance()}  # fmt: skip
    atomic_write_text(cfg.out / RECORD, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    log.info("split %s into %s: %s", cfg.data, cfg.out, plan.counts())
    return SplitResult(cfg.out, record, written=True)


__all__ = [
    "DISTRACTOR_SET",
    "KIND",
    "LANDMARKS",
    "MEGAFACE_SIZES",
    "PROBE_LIST",
    "RECORD",
    "SPLIT_FORMATS",
    "TEST_IDENTITIES",
    "TRAIN_LIST",
    "Split",
    "SplitConfig",
    "SplitResult",
    "image_root",
    "plan_split",
    "read_identity_samples",
    "write_split",
]
