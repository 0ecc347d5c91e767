"""Training data for :mod:`model.train`: samples from disk, the identity index, the held-out split, and a batch
order that is a pure function of ``(seed, step)`` so that a resumed run sees exactly the batches it would have seen.

* Epoch ``e`` visits the training set in the order ``randperm(n, generator seeded by (seed, e))``; step ``s`` is
  batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch`` (the incomplete tail batch is dropped, so every
  step has the same size and the mapping is closed-form).  Resuming at step ``s`` starts the sampler there: the
  consumed part of the epoch is skipped without decoding an image.
* Horizontal flips are a pure function of ``(seed, step, position in batch)``; the sampler yields ``(index, flip)``
  pairs and :class:`FlippableDataset` applies them, so the DataLoader's worker count never changes the data.
* Faces without landmarks are detected once per image, before the steps that use them, into a
  :class:`DetectionCache` kept beside the run (keyed by path, size and mtime), so later epochs, resumed runs and
  other runs sharing the file never detect an image twice.
* Every listed file is checked with one ``stat`` before training; too few readable files is an error, not a run
  that skips most of its steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from model.align import FaceDetector, default_yunet_path
from model.datasets import (
    FILE_REASONS,
    Detected,
    FaceDataset,
    FaceItem,
    Failure,
    Sample,
    collate_faces,
    read_attribute_labels,
    read_casia,
    read_celeba,
    read_identity_file,
    read_list,
    split_holdout,
    stat_failures,
)
from model.fileio import atomic_write_text
from model.images import ImageError, read_image

log = logging.getLogger(__name__)

#: ``flat``: a flat image folder named by an identity file (CelebA's ``identity_CelebA.txt`` format).
DATA_FORMATS: tuple[str, ...] = ("casia", "list", "celeba", "flat")
DETECTIONS = "detections.jsonl"


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts`` (e.g. ``("epoch", seed, e)``): distinct parts give unrelated streams."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def read_samples(data: Path, data_format: str, identities: Path | None = None) -> list[Sample]:
    """Samples of a ``casia`` folder, a generic ``list`` CSV, a ``celeba`` root (``identities`` replaces its
    ``identity_CelebA.txt``) or a ``flat`` image folder named by the identity file ``identities``."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; valid: {list(DATA_FORMATS)}")
    if identities is not None and data_format not in ("celeba", "flat"):
        raise ValueError(f"an identity file is read with data format flat or celeba, not {data_format!r}")
    if data_format == "casia":
        return read_casia(Path(data))
    if data_format == "list":
        if not Path(data).is_file():
            raise FileNotFoundError(f"list CSV {data} does not exist")
        return read_list(Path(data))
    if data_format == "celeba":
        return read_celeba(Path(data), identities=identities)
    if identities is None:
        raise ValueError(
            f"data format flat needs an identity file (--identities FILE: 'file identity' lines) for {data}"
        )
    return read_identity_file(Path(identities), Path(data))


def attach_labels(samples: Sequence[Sample], labels: Mapping[str, Mapping[str, float]]) -> list[Sample]:
    """Give every sample its identity's attribute labels; labels already on a sample (per image) take precedence."""
    out = []
    for s in samples:
        per_identity = labels.get(s.identity) if s.identity is not None else None
        if per_identity:
            s = dataclasses.replace(s, attributes={**per_identity, **(s.attributes or {})})
        out.append(s)
    unused = set(labels) - {s.identity for s in samples}
    if unused:
        log.warning("%d labelled identities have no images (e.g. %s)", len(unused), sorted(unused)[:3])
    return out


def positive_rates(samples: Sequence[Sample], attributes: Sequence[str]) -> torch.Tensor:
    """Per-attribute mean of the known labels: (M,) float32 (NaN for an attribute with no known label)."""
    sums = np.zeros(len(attributes))
    counts = np.zeros(len(attributes))
    for s in samples:
        for j, name in enumerate(attributes):
            value = (s.attributes or {}).get(name)
            if value is not None:
                sums[j] += value
                counts[j] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return torch.from_numpy(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32))


@dataclass(frozen=True)
class TrainingData:
    """The datasets of one run.  ``identities[i]`` is the name of class ``i``; ``positive_rate`` (M,) float32 is the
    training-set positive rate per attribute (NaN: no labels); ``has_attribute_labels`` is False when no sample has
    any known attribute."""

    train: FaceDataset
    val: FaceDataset
    identities: tuple[str, ...]
    positive_rate: torch.Tensor
    has_attribute_labels: bool


def prepare_data(
    data: Path,
    data_format: str,
    labels: Path | None,
    input_size: tuple[int, int],
    attributes: Sequence[str],
    holdout_per_identity: int = 1,
    seed: int = 0,
    detect: bool = True,
    identity_file: Path | None = None,
) -> TrainingData:
    """Read, label, split and wrap the samples.  Faces without landmarks are detected with YuNet when ``detect``
    and the model file exists (see :func:`attach_detections`); otherwise they become ``no_landmarks`` failures
    (skipped, counted)."""
    samples = read_samples(data, data_format, identity_file)
    if labels is not None:
        if not Path(labels).is_file():
            raise FileNotFoundError(f"attribute labels CSV {labels} does not exist")
        samples = attach_labels(samples, read_attribute_labels(Path(labels)))
    identities = tuple(sorted({s.identity for s in samples if s.identity is not None}))
    index = {name: i for i, name in enumerate(identities)}
    train, val = split_holdout(samples, per_identity=holdout_per_identity, seed=seed)
    factory = detector_factory(samples) if detect else None
    rates = positive_rates(train, attributes)
    kwargs = {"size": input_size, "identity_index": index, "attributes": attributes, "detector_factory": factory}
    return TrainingData(
        train=FaceDataset(train, **kwargs),  # type: ignore[arg-type]
        val=FaceDataset(val, **kwargs),  # type: ignore[arg-type]
        identities=identities,
        positive_rate=rates,
        has_attribute_labels=bool(torch.isfinite(rates).any()),
    )


def detector_factory(samples: Sequence[Sample]) -> Callable[[], FaceDetector] | None:
    """``FaceDetector`` (YuNet with its defaults) if some sample lacks landmarks and the model file exists, else None
    (with a warning when detection was needed)."""
    if all(s.landmarks is not None for s in samples):
        return None
    if default_yunet_path().is_file():
        return FaceDetector
    log.warning("some images have no landmarks and no YuNet model is at %s: they will be skipped", default_yunet_path())
    return None


def check_readable(report: Iterable[Failure], total: int, min_readable: float, listed: bool, see: str = "") -> None:
    """Raise ``ValueError`` (one line: how many, why, a few examples) when the unusable files among ``report``
    (:data:`FILE_REASONS`) leave fewer than ``min_readable`` of ``total`` readable.  ``listed``: the up-front check of
    the listed files; otherwise files found unreadable while decoding (``see`` names the file listing them)."""
    bad = {f.path: f for f in report if f.reason in FILE_REASONS}
    if not total or total - len(bad) >= min_readable * total - 1e-9:
        return
    counts = ", ".join(f"{n} {r}" for r, n in sorted(Counter(f.reason for f in bad.values()).items(),
                                                       key=lambda kv: (-kv[1], kv[0])))  # fmt: skip
    examples = ", ".join(sorted(bad)[:3])
    if listed:
        ok = total - len(bad)
        raise ValueError(f"only {ok} of {total} listed images are readable ({100 * ok / total:.1f} %, below "
                         f"min_readable {min_readable}): {counts} (e.g. {examples}); check the data path and its list "
                         f"files, or lower --min-readable")  # fmt: skip
    raise ValueError(f"{len(bad)} of {total} images are unreadable ({counts}), more than min_readable {min_readable} "
                     f"allows (e.g. {examples}){'; see ' + see if see else ''}")  # fmt: skip


def listed_failures(data: TrainingData) -> list[Failure]:
    """:func:`model.datasets.stat_failures` of the training and the held-out set (indices into each)."""
    return stat_failures(data.train.samples) + stat_failures(data.val.samples)


def _detector_settings() -> dict[str, Any]:
    """What cached detections depend on besides the model file: ``FaceDetector``'s default settings (training
    detects with the defaults), so a changed default invalidates the cache."""
    params = inspect.signature(FaceDetector.__init__).parameters
    return {k: repr(p.default) for k, p in params.items() if k not in ("self", "model_path")}


def detector_identity(model_path: Path | None = None) -> dict[str, Any]:
    """The identity of the default detector: model file name and content hash, and its settings."""
    path = default_yunet_path() if model_path is None else Path(model_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return {"model": path.name, "sha256": digest, "settings": _detector_settings()}


#: Failures that are a property of the file's content, so they are cached with its size and mtime; ``missing`` and
#: ``unreadable`` are not (a file may appear, a permission may change).
_CACHED_FAILURES = frozenset(FILE_REASONS - {"missing", "unreadable"} | {"no_face"})


class DetectionCache:
    """Face detections of image files, one JSON line per file after a header naming the detector (JSON lines, written
    atomically).  An entry is used only while the file has the same size and mtime, so a changed image is detected
    again; a file made by another detector (model or settings) is ignored (and replaced on save), and so are rows
    cut short by a kill.  Processes sharing one file never corrupt it (atomic replace); the last to save wins.
    Row: ``path`` (absolute), ``size``, ``mtime_ns``, ``landmarks`` [10] (x1, y1, ... in our order), ``box`` [4],
    ``score`` — or ``reason`` and ``message`` (``no_face`` or a file-content failure) with null landmarks."""

    VERSION = 1

    def __init__(self, path: Path, detector: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.detector = json.loads(json.dumps(dict(detector)))  # as it reads back from the file
        self._rows: dict[str, tuple[int, int, str]] = {}  # abs path -> (size, mtime_ns, JSON line)
        self._load()

    def _load(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []
        except (OSError, UnicodeDecodeError) as e:
            log.warning("cannot read the detection cache %s (%s): detecting again", self.path, e)
            return
        if not lines or _json(lines[0]) != {"version": self.VERSION, "detector": self.detector}:
            if lines:
                log.info("%s was written by another detector or version: detecting again", self.path)
            return
        bad = 0
        for line in lines[1:]:
            row = _json(line)
            try:
                self._rows[row["path"]] = (int(row["size"]), int(row["mtime_ns"]), line)
            except (TypeError, KeyError, ValueError):
                bad += 1
        if bad:
            log.warning("%s: %d damaged rows ignored (those images are detected again)", self.path, bad)

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, path: Path | str) -> Detected | None:
        """What was found in ``path`` if it is cached and the file is unchanged, else None."""
        key = os.path.abspath(path)
        row = self._rows.get(key)
        if row is None:
            return None
        try:
            st = os.stat(key)
        except OSError:
            return None
        if (row[0], row[1]) != (st.st_size, st.st_mtime_ns):
            return None
        return _detected(json.loads(row[2]))

    def put(self, row: Mapping[str, Any]) -> bool:
        """Remember a row of :func:`detect_file` if it is cacheable (the file was there, the outcome depends only on
        its content); returns whether it was kept."""
        if row["size"] is None or (row["reason"] is not None and row["reason"] not in _CACHED_FAILURES):
            return False
        self._rows[row["path"]] = (row["size"], row["mtime_ns"], json.dumps(row))
        return True

    def save(self) -> None:
        header = json.dumps({"version": self.VERSION, "detector": self.detector})
        atomic_write_text(self.path, "".join([header + "\n", *(line + "\n" for _, _, line in self._rows.values())]))


def _json(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _detected(row: Mapping[str, Any]) -> Detected:
    if row["landmarks"] is None:
        return (str(row["reason"]), str(row["message"]))
    return np.asarray(row["landmarks"], dtype=np.float32).reshape(5, 2)


def detect_file(path: str, detector: FaceDetector) -> dict[str, Any]:
    """Detect the best face of the image file ``path`` -> a :class:`DetectionCache` row (size and mtime are taken
    before reading, so a file changed meanwhile is detected again next time)."""
    row: dict[str, Any] = dict.fromkeys(("size", "mtime_ns", "landmarks", "box", "score", "reason", "message"))
    row["path"] = path
    try:
        st = os.stat(path)
        row.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        image = read_image(path)
        found = detector.detect(image)
        if found is None:
            raise ImageError(path, "no_face", f"no face found in the {image.shape[1]}x{image.shape[0]} image")
    except ImageError as e:
        row.update(reason=e.reason, message=str(e))
        return row
    except FileNotFoundError:
        row.update(size=None, reason="missing", message=f"{path}: no such file [missing]")
        return row
    except (OSError, cv2.error) as e:  # one file's decoder or OS error must not stop the pass
        row.update(size=None, reason="unreadable", message=f"{path}: {e} [unreadable]")
        return row
    row.update(landmarks=[float(v) for v in found.landmarks.reshape(-1)], box=[float(v) for v in found.box],
               score=float(found.score))  # fmt: skip
    return row


class _DetectFiles(Dataset[dict[str, Any]]):
    """Runs :func:`detect_file` over ``paths``, one detector per process (DataLoader workers)."""

    def __init__(self, paths: Sequence[str], factory: Callable[[], FaceDetector]) -> None:
        self.paths, self.factory = list(paths), factory
        self._detector: FaceDetector | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_detector": None, "_pid": -1}

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._detector is None or self._pid != os.getpid():
            self._detector, self._pid = self.factory(), os.getpid()
        return detect_file(self.paths[i], self._detector)


@dataclass(frozen=True)
class DetectStats:
    """One detection pass: ``images`` needing detection, ``cached`` found in the cache, ``new`` detected now,
    ``failed`` of those with no usable face or file, ``seconds``."""

    images: int
    cached: int
    new: int
    failed: int
    seconds: float

    def record(self) -> dict[str, Any]:
        rate = self.new / self.seconds if self.seconds > 0 else 0.0
        counts = {"images": self.images, "cached": self.cached, "new": self.new, "failed": self.failed}
        return {**{f"detect_{k}": v for k, v in counts.items()}, "detect_seconds": round(self.seconds, 3),
                "detect_images_per_s": rate}  # fmt: skip


def attach_detections(
    datasets: Sequence[FaceDataset],
    cache: DetectionCache,
    workers: int = 0,
    only: Sequence[Iterable[int] | None] | None = None,
    save_every_s: float = 60.0,
) -> DetectStats:
    """Detect every face of ``datasets`` that has no landmarks and is not in ``cache`` (restricted to the indices
    ``only[i]`` of dataset ``i`` when given), save the cache, and give each dataset its ``detections``.  Detection
    runs in ``workers`` DataLoader processes with the datasets' ``detector_factory``; the cache is saved every
    ``save_every_s`` seconds, so a killed pass keeps most of its work.  Missing files are left to the dataset (they
    fail as ``missing`` when read, and are not cached: they may appear)."""
    t0 = time.perf_counter()
    wanted: dict[str, None] = {}
    for k, ds in enumerate(datasets):
        idx = range(len(ds)) if only is None or only[k] is None else sorted(set(only[k] or ()))
        wanted.update((str(ds.samples[i].path), None) for i in idx if ds.samples[i].landmarks is None)
    found: dict[str, Detected] = {}
    for p in wanted:
        hit = cache.lookup(p)
        if hit is not None:
            found[p] = hit
    todo = [p for p in wanted if p not in found and os.path.exists(p)]
    factory = next((ds.detector_factory for ds in datasets if ds.detector_factory is not None), None)
    failed = 0
    if todo and factory is not None:
        failed = _detect_into(cache, found, todo, factory, workers, save_every_s)
    for ds in datasets:
        ds.detections = {**ds.detections, **{str(s.path): found[str(s.path)] for s in ds.samples if
                                              str(s.path) in found}}  # fmt: skip
    new = len(todo) if factory is not None else 0
    return DetectStats(len(wanted), len(wanted) - len(todo), new, failed, time.perf_counter() - t0)


def _detect_into(
    cache: DetectionCache,
    found: dict[str, Detected],
    todo: Sequence[str],
    factory: Callable[[], FaceDetector],
    workers: int,
    save_every_s: float,
) -> int:
    """Detect ``todo`` into ``cache`` and ``found``; returns how many have no usable face or file."""
    # A private generator: a DataLoader iterator otherwise draws from the global RNG, so a run that detects
    # would get another dropout stream than the same run on a filled cache.
    loader = DataLoader(_DetectFiles([os.path.abspath(p) for p in todo], factory), batch_size=16, num_workers=workers,
                        collate_fn=list, generator=torch.Generator())  # fmt: skip
    done = failed = 0
    saved = time.perf_counter()
    for rows in loader:
        for p, row in zip(todo[done : done + len(rows)], rows, strict=True):
            failed += row["reason"] is not None
            if cache.put(row):
                found[p] = _detected(row)
        done += len(rows)
        if time.perf_counter() - saved > save_every_s:
            cache.save()
            saved = time.perf_counter()
            log.info("detected %d of %d faces (cache %s)", done, len(todo), cache.path)
    cache.save()
    return failed


def known_failures(ds: FaceDataset) -> list[Failure]:
    """The samples of ``ds`` that its ``detections`` already mark as failed (no face, an unusable file)."""
    out = []
    for i, s in enumerate(ds.samples):
        found = ds.detections.get(str(s.path)) if s.landmarks is None else None
        if isinstance(found, tuple):
            out.append(Failure(i, str(s.path), *found))
    return out


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The visiting order of epoch ``epoch``: (n,) int64, a pure function of (n, seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("epoch", seed, epoch)))


def step_flips(seed: int, step: int, batch_size: int) -> torch.Tensor:
    """Horizontal flip decisions of step ``step``: (batch_size,) bool, a pure function of (seed, step)."""
    return torch.rand(batch_size, generator=torch.Generator().manual_seed(derive_seed("flip", seed, step))) < 0.5


class StepBatchSampler(Sampler[list[tuple[int, bool]]]):
    """Batches of ``(dataset index, flip)`` for global steps ``start .. stop - 1`` (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, flip: bool = True) -> None:
        if batch_size < 1 or n < batch_size:
            raise ValueError(f"batch size {batch_size} needs at least that many training images, have {n}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop, self.flip = start, stop, flip
        self.steps_per_epoch = n // batch_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def batch(self, step: int, perm: torch.Tensor | None = None) -> list[tuple[int, bool]]:
        """The batch of global step ``step`` (``perm``: that epoch's permutation, if already computed)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if perm is None:
            perm = epoch_permutation(self.n, self.seed, epoch)
        idx = perm[pos * self.batch_size : (pos + 1) * self.batch_size].tolist()
        flips = step_flips(self.seed, step, self.batch_size).tolist() if self.flip else [False] * self.batch_size
        return list(zip(idx, flips, strict=True))

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        perm_epoch, perm = -1, None
        for step in range(self.start, self.stop):
            epoch = step // self.steps_per_epoch
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, epoch_permutation(self.n, self.seed, epoch)
            yield self.batch(step, perm)


def visited_indices(sampler: StepBatchSampler) -> list[int]:
    """The dataset indices the sampler's steps ``start .. stop - 1`` use, sorted (each once)."""
    spe, bs, seen = sampler.steps_per_epoch, sampler.batch_size, set()
    if sampler.stop <= sampler.start:
        return []
    for epoch in range(sampler.start // spe, (sampler.stop - 1) // spe + 1):
        lo = max(sampler.start - epoch * spe, 0)
        hi = min(sampler.stop - epoch * spe, spe)
        seen.update(epoch_permutation(sampler.n, sampler.seed, epoch)[lo * bs : hi * bs].tolist())
        if len(seen) == sampler.n:
            break
    return sorted(seen)


class FlippableDataset(Dataset["FaceItem | Failure"]):
    """``base[index]`` for a key ``(index, flip)``, mirrored left-right when ``flip`` (attributes are flip-invariant,
    so only the image changes)."""

    def __init__(self, base: FaceDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, bool]) -> FaceItem | Failure:
        index, flip = key
        item = self.base[index]
        if flip and isinstance(item, FaceItem):
            item = dataclasses.replace(item, image=np.ascontiguousarray(item.image[:, ::-1]))
        return item


def _loader_kwargs(workers: int, pin_memory: bool, seed: int) -> dict[str, Any]:
    # A private generator: creating a DataLoader iterator otherwise draws from the global RNG (dropout's stream).
    kwargs: dict[str, Any] = {
        "num_workers": workers,
        "collate_fn": collate_faces,
        "pin_memory": pin_memory,
        "generator": torch.Generator().manual_seed(derive_seed("loader", seed)),
    }
    if workers > 0:
        kwargs["prefetch_factor"] = 4
    return kwargs


def train_loader(dataset: FaceDataset, sampler: StepBatchSampler, workers: int, pin_memory: bool) -> DataLoader:
    """One DataLoader over all remaining steps (one iterator for the whole run, so workers start once)."""
    return DataLoader(
        FlippableDataset(dataset), batch_sampler=sampler, **_loader_kwargs(workers, pin_memory, sampler.seed)
    )  # type: ignore[arg-type]


def val_loader(dataset: FaceDataset, batch_size: int, workers: int, pin_memory: bool, seed: int) -> DataLoader:
    """Sequential batches over the held-out set; workers persist between validations."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        persistent_workers=workers > 0,
        **_loader_kwargs(workers, pin_memory, seed),
    )


__all__ = [
    "DATA_FORMATS",
    "DETECTIONS",
    "DetectStats",
    "DetectionCache",
    "FlippableDataset",
    "StepBatchSampler",
    "TrainingData",
    "attach_detections",
    "attach_labels",
    "check_readable",
    "derive_seed",
    "detect_file",
    "detector_factory",
    "detector_identity",
    "epoch_permutation",
    "known_failures",
    "listed_failures",
    "positive_rates",
    "prepare_data",
    "read_samples",
    "step_flips",
    "train_loader",
    "val_loader",
    "visited_indices",
]
