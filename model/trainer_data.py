"""Training data for :mod:`facesearch.model.train`: samples from disk, the identity index, the held-out split, and a
batch order that is a pure function of ``(seed, step)`` so that a resumed run sees exactly the batches it would have
seen.

* Epoch ``e`` visits the training set in the order ``randperm(n, generator seeded by (seed, e))``; step ``s`` is
  batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch`` (the incomplete tail batch is dropped, so every
  step has the same size and the mapping is closed-form).  Resuming at step ``s`` starts the sampler there: the
  consumed part of the epoch is skipped without decoding an image.
* Horizontal flips are a pure function of ``(seed, step, position in batch)``; the sampler yields ``(index, flip)``
  pairs and :class:`FlippableDataset` applies them, so the DataLoader's worker count never changes the data.
* Faces without landmarks are detected once per image, before the steps that use them, into the detection cache
  kept beside the run (:mod:`facesearch.model.faces.detections`, whose names are re-exported here).
* Every listed file is checked with one ``stat`` before training; too few readable files is an error, not a run
  that skips most of its steps.
* With a crop store (:func:`with_crop_store`) the datasets read each aligned crop from a memory-mapped file made
  once by the same datasets, instead of decoding and aligning it at every step; flips still apply per step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from facesearch.model.faces.crop_store import BuildStats, StoredFaceDataset, ensure_crop_store
from facesearch.model.faces.datasets import (
    FILE_REASONS,
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
from facesearch.model.faces.detections import (
    DETECTIONS,
    DetectionCache,
    DetectStats,
    attach_detections,
    detect_file,
    detector_factory,
    detector_identity,
    known_failures,
)

log = logging.getLogger(__name__)

#: ``flat``: a flat image folder named by an identity file (CelebA's ``identity_CelebA.txt`` format).
DATA_FORMATS: tuple[str, ...] = ("casia", "list", "celeba", "flat")


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts`` (e.g. ``("epoch", seed, e)``): distinct parts give unrelated streams."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def read_samples(
    data: Path,
    data_format: str,
    identities: Path | None = None,
    partition: int | None = None,
    *,
    categorical: Sequence[str] = (),
) -> list[Sample]:
    """Samples of a ``casia`` folder, a generic ``list`` CSV, a ``celeba`` root (``identities`` replaces its
    ``identity_CelebA.txt``; ``partition`` 0/1/2 keeps that split only) or a ``flat`` image folder named by the
    identity file ``identities``.

    ``categorical`` names the list CSV's categorical attribute columns (integer classes; see
    :func:`~facesearch.model.faces.samples.read_list`); only the ``list`` format has them.
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; valid: {list(DATA_FORMATS)}")
    if identities is not None and data_format not in ("celeba", "flat"):
        raise ValueError(f"an identity file is read with data format flat or celeba, not {data_format!r}")
    if categorical and data_format != "list":
        raise ValueError(
            f"categorical columns ({list(categorical)}) are read from list CSVs (data format list), not {data_format!r}"
        )
    if data_format == "casia":
        return read_casia(Path(data))
    if data_format == "list":
        if not Path(data).is_file():
            raise FileNotFoundError(f"list CSV {data} does not exist")
        return read_list(Path(data), categorical=categorical)
    if data_format == "celeba":
        return read_celeba(Path(data), partition, identities=identities)
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
    margin: bool = False,
    partition: int | None = None,
) -> TrainingData:
    """Read, label, split and wrap the samples.  Faces without landmarks are detected with YuNet when ``detect``
    and the model file exists (see :func:`attach_detections`); otherwise they become ``no_landmarks`` failures
    (skipped, counted).  ``margin``: the datasets give margin crops around ``input_size`` (see
    :class:`FaceDataset`); ``partition``: a CelebA root's split (see :func:`read_samples`)."""
    if partition is not None and data_format != "celeba":
        raise ValueError(f"a partition selects a CelebA split; data format {data_format!r} has none")
    samples = read_samples(data, data_format, identity_file, partition)
    if labels is not None:
        if not Path(labels).is_file():
            raise FileNotFoundError(f"attribute labels CSV {labels} does not exist")
        samples = attach_labels(samples, read_attribute_labels(Path(labels)))
    identities = tuple(sorted({s.identity for s in samples if s.identity is not None}))
    index = {name: i for i, name in enumerate(identities)}
    train, val = split_holdout(samples, per_identity=holdout_per_identity, seed=seed)
    factory = detector_factory(samples) if detect else None
    rates = positive_rates(train, attributes)
    kwargs = {"size": input_size, "identity_index": index, "attributes": attributes, "detector_factory": factory,
              "margin": margin}  # fmt: skip
    return TrainingData(
        train=FaceDataset(train, **kwargs),  # type: ignore[arg-type]
        val=FaceDataset(val, **kwargs),  # type: ignore[arg-type]
        identities=identities,
        positive_rate=rates,
        has_attribute_labels=bool(torch.isfinite(rates).any()),
    )


def with_crop_store(data: TrainingData, store: Path, workers: int = 0) -> tuple[TrainingData, BuildStats]:
    """``data`` with datasets that read their crops from the crop store at ``store``
    (:mod:`facesearch.model.faces.crop_store`), built from ``data.train`` and ``data.val`` on first use (in
    ``workers`` processes) and reused after.  Attach the detections of every image first: the store holds what the
    datasets make of them.  The crops, failures and so batches are those of ``data``, bit for bit."""
    crops, stats = ensure_crop_store(store, [data.train, data.val], workers)
    train, val = StoredFaceDataset(data.train, crops), StoredFaceDataset(data.val, crops)
    return dataclasses.replace(data, train=train, val=val), stats


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
    """:func:`facesearch.model.faces.datasets.stat_failures` of the training and the held-out set (indices into
    each)."""
    return stat_failures(data.train.samples) + stat_failures(data.val.samples)


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
    "with_crop_store",
]
