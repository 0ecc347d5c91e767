"""Where MegaFace features come from: probe sets and distractor streams, from our shard directories or from devkit
``.bin`` feature trees, matched to the devkit template lists by stem (protocol §1), cleaned with the noise lists
(§5), with attribute filter codes (§6).

A distractor set is a *selection* of rows streamed in blocks (:class:`DistractorSource`): memory is bounded by the
block size whatever the list size, and ``take`` re-reads a few rows by stream position (to resolve a TAR threshold
exactly).  When a user has no list for a size, :func:`draw_selection` samples one with a recorded seed, independently
per (size, set) — never a prefix of a larger list — from the candidate rows :func:`probe_overlap` leaves: no probe
image and no other image of a probe identity (MegaFace's distractors are other people).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facesearch.benchmarks import devkit
from facesearch.benchmarks.megaface_exact import canonical_normalize
from facesearch.benchmarks.megaface_store import BLOCK_ROWS, STORE_LIMIT_BYTES, Arena, DecodedShards, shard_attributes
from facesearch.engine.filter_cost import MODES, AttributeStats, FilterCost, choose_margins, predicted_cost
from facesearch.indexer import shards

#: Distractor rows per streamed block: one Parquet row group of our shards.  The first block is decoded before any
#: scoring can start (0.13 s at 16,384 rows against 1.3 s at 65,536), and smaller buffers decode faster here (300k
#: rows: 2.3 against 3.7 s on one thread).
_BLOCK = BLOCK_ROWS
#: The harness's filter modes: the two that exclude (:data:`facesearch.engine.filter_cost.MODES`) and soft scoring.
FILTER_MODES: tuple[str, ...] = (*MODES, "soft")


@dataclass(frozen=True)
class AttributeFilter:
    """Which distractors a probe is compared with, by the attributes both were predicted to have
    (:mod:`facesearch.engine.filter_cost`):

    - ``hard``: (probability > ``threshold``) must be equal on both sides, for every attribute;
    - ``confident``: a distractor is excluded only when, for some attribute, one side is confidently positive
      (p > 1 - m) and the other confidently negative (p < m); the margins ``m`` are ``margins`` (one per attribute,
      or one for all) or chosen by :meth:`resolved` from the attribute columns' validation statistics so the
      predicted fraction of true mates lost is at most ``max_mate_loss``.

    - ``soft``: nothing is excluded; every pair is scored ``(1 - w) cos + w * agreement`` (``weight`` w), agreement =
      the mean over the attributes of ``cos(pi (p - q) / 2)`` (1 when the two probabilities are equal, 0 when they
      are opposite certainties) — exactly, over every distractor, as the cosine of the attribute-augmented features
      of :mod:`facesearch.benchmarks.megaface_soft`.

    :meth:`codes` gives every row two bit sets in one int64: bit ``i`` of the low word = attribute ``i`` decided
    positive, of the high word = decided negative; :func:`facesearch.benchmarks.megaface.compatible` says which pairs
    are compared."""

    attributes: tuple[str, ...]
    threshold: float = 0.5
    mode: str = "hard"
    margins: tuple[float, ...] | None = None
    max_mate_loss: float | None = None
    weight: float | None = None

    def __post_init__(self) -> None:
        if not self.attributes or len(self.attributes) > 31:
            raise ValueError(f"an attribute filter needs 1 to 31 attributes, got {len(self.attributes)}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"filter threshold must be in (0, 1), got {self.threshold}")
        if self.mode not in FILTER_MODES:
            raise ValueError(f"filter mode must be one of {list(FILTER_MODES)}, got {self.mode!r}")
        if self.margins is not None:
            object.__setattr__(self, "margins", tuple(float(m) for m in self.margins))
            if len(self.margins) == 1:
                object.__setattr__(self, "margins", self.margins * len(self.attributes))
            if len(self.margins) != len(self.attributes) or not all(0 <= m <= 0.5 for m in self.margins):
                raise ValueError(f"filter margins: one in [0, 0.5] per attribute (or one for all), got "
                                 f"{list(self.margins)} for {list(self.attributes)}")  # fmt: skip
        if self.max_mate_loss is not None and not 0 <= self.max_mate_loss < 1:
            raise ValueError(f"max_mate_loss must be in [0, 1), got {self.max_mate_loss}")
        if self.mode != "confident" and (self.margins is not None or self.max_mate_loss is not None):
            raise ValueError("margins and max_mate_loss belong to the confident filter mode (--filter-mode confident)")
        if (self.mode == "soft") != (self.weight is not None):
            raise ValueError("the soft filter mode needs a weight (--soft-weight), and only it takes one")
        if self.weight is not None and not 0 < self.weight <= 1:
            raise ValueError(f"soft weight must be in (0, 1], got {self.weight}")
        if self.mode == "confident" and self.margins is None and self.max_mate_loss is None:
            raise ValueError("the confident filter needs margins or a max_mate_loss to choose them from")

    @property
    def excludes(self) -> bool:
        """Whether the mode excludes distractors (hard, confident) rather than re-scoring them (soft)."""
        return self.mode != "soft"

    @property
    def description(self) -> str:
        if self.mode == "hard":
            return " & ".join(self.attributes) + " agree"
        if self.mode == "soft":
            return f"soft: {' & '.join(self.attributes)} agreement, weight {self.weight:g}"
        target = "" if self.max_mate_loss is None else f"mate loss <= {self.max_mate_loss:g}"
        if self.margins is None:
            return " & ".join(self.attributes) + f" not confidently opposed ({target})"
        ms = ", ".join(f"{a} {m:.2f}" for a, m in zip(self.attributes, self.margins, strict=True))
        return f"not confidently opposed (margins {ms}{'; ' + target if target else ''})"

    def values(self) -> dict[str, float]:
        """Per attribute, the threshold (hard) or the margin (confident; after :meth:`resolved`)."""
        if self.mode == "hard":
            return dict.fromkeys(self.attributes, self.threshold)
        if self.mode == "soft":
            raise ValueError("the soft filter mode has no thresholds or margins")
        if self.margins is None:
            raise ValueError("the confident filter's margins are chosen from the validation statistics first")
        return dict(zip(self.attributes, self.margins, strict=True))

    def resolved(self, stats: Mapping[str, AttributeStats] | None) -> AttributeFilter:
        """This filter with its margins chosen from ``stats`` for ``max_mate_loss`` (itself when nothing is to
        choose)."""
        if self.mode != "confident" or self.margins is not None:
            return self
        if stats is None:
            raise ValueError("--max-mate-loss needs the attribute columns' validation statistics")
        chosen = choose_margins({a: stats[a] for a in self.attributes}, float(self.max_mate_loss or 0))
        return dataclasses.replace(self, margins=tuple(chosen[a] for a in self.attributes))

    def predicted(self, stats: Mapping[str, AttributeStats]) -> FilterCost:
        """The predicted cost (mates lost, distractors removed) of this (resolved) filter (none for soft)."""
        if self.mode == "soft":
            return FilterCost(0.0, 0.0, {a: (0.0, 0.0) for a in self.attributes})
        return predicted_cost({a: stats[a] for a in self.attributes}, self.mode, self.values())

    def codes(self, probs: dict[str, np.ndarray], what: str) -> np.ndarray:
        missing = [a for a in self.attributes if a not in probs]
        if missing:
            raise ValueError(f"{what}: no predicted attribute(s) {missing} (have {sorted(probs)})")
        values = self.values()
        n = len(probs[self.attributes[0]])
        pos, neg = np.zeros(n, np.int64), np.zeros(n, np.int64)
        for i, a in enumerate(self.attributes):
            p = np.asarray(probs[a], np.float64)
            if np.isnan(p).any():
                raise ValueError(f"{what}: attribute {a} is missing for {int(np.isnan(p).sum())} row(s)")
            if self.mode == "hard":
                is_pos, is_neg = p > values[a], p <= values[a]
            else:
                is_pos, is_neg = p > 1 - values[a], p < values[a]
            pos |= is_pos.astype(np.int64) << i
            neg |= is_neg.astype(np.int64) << i
        return pos | (neg << 32)

    def to_dict(self) -> dict[str, Any]:
        return {"attributes": list(self.attributes), "mode": self.mode, "threshold": self.threshold,
                "margins": None if self.margins is None else list(self.margins), "max_mate_loss": self.max_mate_loss,
                "weight": self.weight, "description": self.description}  # fmt: skip


@dataclass(frozen=True)
class Probes:
    """Probe features in list order: ``keys`` (stem keys), ``identity``, raw ``xq`` (nq, d), attribute probabilities."""

    keys: tuple[str, ...]
    identity: tuple[str, ...]
    xq: np.ndarray
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def cleaned(self, noise_entries: Sequence[str]) -> tuple[Probes, int]:
        """Noisy probes replaced by their identity's normalised mean clean feature (protocol §5)."""
        noisy = devkit.noisy_mask(list(self.keys), noise_entries)
        xq = canonical_normalize(self.xq).astype(np.float32)
        ident = np.asarray(self.identity, dtype=object)
        for c in np.unique(ident[noisy]):
            members = ident == c
            clean = members & ~noisy
            if not clean.any():
                raise ValueError(f"cleaning: every probe of identity {c!r} is on the noise list")
            mean = canonical_normalize(xq[clean].mean(axis=0, keepdims=True))[0]
            xq[members & noisy] = mean.astype(np.float32)
        return Probes(self.keys, self.identity, xq, self.attributes, self.provenance), int(noisy.sum())


def _match(keys: Sequence[str], wanted: Sequence[str], what: str) -> np.ndarray:
    """Positions in ``keys`` of each ``wanted`` stem key; missing ones are one error naming a few."""
    index = {k: i for i, k in enumerate(keys)}
    pos = np.array([index.get(devkit.stem_key(w), -1) for w in wanted], np.int64)
    if (pos < 0).any():
        miss = [w for w, p in zip(wanted, pos, strict=True) if p < 0]
        raise ValueError(f"{what}: {len(miss)} of {len(wanted)} list entries have no feature (first: {miss[:5]})")
    return pos


def probes_from_shards(directory: Path, probe_list: Path | None = None) -> Probes:
    """Probes from a shard directory; with a devkit probe list, its order and identities (matched by stem)."""
    manifest = shards.read_manifest(directory)
    block = shards.read_all(directory, columns=["path", "identity", *manifest.attributes])
    keys = [devkit.stem_key(p) for p in block.meta.column("path").to_pylist()]
    attrs = shard_attributes(block.meta, manifest.attributes)
    prov = {"source": "shards", "directory": str(directory), "fingerprint": manifest.fingerprint}
    if probe_list is None:
        ident = block.meta.column("identity").to_pylist()
        if any(i is None for i in ident):
            raise ValueError(f"{directory}: probe rows need an identity (or give the devkit probe list)")
        return Probes(tuple(keys), tuple(ident), block.xb, attrs, prov)
    plist = devkit.read_probe_list(probe_list)
    pos = _match(keys, plist.paths, f"{directory} vs probe list {probe_list}")
    attrs = {a: v[pos] for a, v in attrs.items()}
    prov["probe_list"] = str(probe_list)
    return Probes(tuple(keys[i] for i in pos), plist.ids, block.xb[pos], attrs, prov)


def probes_from_devkit(root: Path, probe_list: Path, file_ending: str) -> Probes:
    """Probes from a devkit feature tree ``<root>/<list path><file_ending>``."""
    plist = devkit.read_probe_list(probe_list)
    xq = devkit.read_feature_tree(root, plist.paths, file_ending)
    prov = {"source": "devkit", "root": str(root), "probe_list": str(probe_list), "file_ending": file_ending}
    return Probes(tuple(devkit.stem_key(p) for p in plist.paths), plist.ids, xq, {}, prov)


class DistractorSource:
    """A selection of distractor rows streamed in blocks: ``(xb, attribute probabilities)``."""

    n: int
    attributes: tuple[str, ...] = ()
    provenance: dict[str, Any]

    def blocks(self) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        raise NotImplementedError

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Raw features of the rows at stream positions ``idx`` (sorted, unique)."""
        raise NotImplementedError

    def decoding(self) -> bool:
        """Whether streaming the blocks still decodes them (work beside the scoring), not only reads memory."""
        return True


class ShardDistractors(DistractorSource):
    """The rows ``ids`` (sorted) of a shard directory; read from ``store`` (the directory's rows decoded once for the
    run) when one is given that holds the ``attributes``, else decoded from the shards as they stream."""

    def __init__(
        self, directory: Path, ids: np.ndarray, attributes: Sequence[str] = (), store: DecodedShards | None = None
    ) -> None:
        self.directory, self.ids, self.n = Path(directory), np.sort(np.asarray(ids, np.int64)), len(ids)
        self.attributes = tuple(attributes)
        manifest = shards.read_manifest(self.directory)
        self.stored_dtype = manifest.dtype
        self.provenance = {"source": "shards", "directory": str(directory), "fingerprint": manifest.fingerprint,
                           "selection_sha256": hashlib.sha256(self.ids.tobytes()).hexdigest()}  # fmt: skip
        self.store = store if store is not None and set(self.attributes) <= set(store.attributes) else None
        if self.store is not None:
            at = np.minimum(np.searchsorted(self.store.ids, self.ids), max(len(self.store.ids) - 1, 0))
            found = self.store.ids[at] == self.ids if len(self.store.ids) else np.zeros(self.n, bool)
            if not found.all():
                raise ValueError(f"{self.directory}: {int((~found).sum())} selected distractor rows are missing or "
                                 f"failed (first id: {int(self.ids[~found][0])})")  # fmt: skip
            self.at = at

    @property
    def resident(self) -> bool:
        """Whether the rows stream from memory (the store) rather than from the shards."""
        return self.store is not None

    def decoding(self) -> bool:
        return self.store is None or not self.store.done

    def blocks(self) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        if self.store is not None:
            yield from self._stored_blocks(self.store)
            return
        # Stream in the stored dtype (float16 stays float16: the evaluator converts it on all cores).
        dtype = np.float16 if self.stored_dtype == "float16" else np.float32
        wanted, seen = self.ids, 0
        # One decoding thread: the harness scores beside it on the other cores (megaface_run._evaluate).
        blocks = shards.iter_shards(self.directory, _BLOCK, columns=list(self.attributes), dtype=dtype, threads=False)
        for block in blocks:
            pos = np.searchsorted(wanted, block.ids)
            hit = (pos < len(wanted)) & (wanted[np.minimum(pos, len(wanted) - 1)] == block.ids)
            if hit.all():  # the whole block is selected (e.g. the 1M list): no copy
                xb, meta = block.xb, block.meta
            elif hit.any():
                sel = np.flatnonzero(hit)
                xb, meta = block.xb[sel], block.meta.take(sel)
            else:
                continue
            seen += len(xb)
            yield xb, shard_attributes(meta, self.attributes)
        if seen != self.n:
            raise ValueError(f"{self.directory}: {self.n - seen} selected distractor rows are missing or failed")

    def _stored_blocks(self, store: DecodedShards) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Blocks of the selection from the store: views where the selected rows are contiguous, else gathered."""
        for a in range(0, self.n, _BLOCK):
            at = self.at[a : a + _BLOCK]
            lo, hi = int(at[0]), int(at[-1]) + 1
            store.wait(hi)
            pick: slice | np.ndarray = slice(lo, hi) if hi - lo == len(at) else at
            xb, attrs = store.rows[pick], {name: store.attrs[name][pick] for name in self.attributes}
            for view in (xb, *attrs.values()):
                view.flags.writeable = False  # views of the store, shared by every size and variant
            yield xb, attrs

    def take(self, idx: np.ndarray) -> np.ndarray:
        if self.store is not None:
            at = self.at[idx]
            self.store.wait(int(at.max()) + 1 if len(at) else 0)
            return self.store.rows[at]
        dtype = np.float16 if self.stored_dtype == "float16" else np.float32
        return shards.take_rows(self.directory, self.ids[idx], dtype=dtype)


class DevkitDistractors(DistractorSource):
    """Distractor features from a devkit ``.bin`` tree, in list order."""

    def __init__(self, root: Path, rel_paths: Sequence[str], file_ending: str) -> None:
        self.root, self.paths, self.file_ending, self.n = Path(root), list(rel_paths), file_ending, len(rel_paths)
        self.provenance = {"source": "devkit", "root": str(root), "file_ending": file_ending}

    def blocks(self) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        for s in range(0, self.n, _BLOCK):
            yield devkit.read_feature_tree(self.root, self.paths[s : s + _BLOCK], self.file_ending), {}

    def take(self, idx: np.ndarray) -> np.ndarray:
        return devkit.read_feature_tree(self.root, [self.paths[i] for i in idx], self.file_ending)


class CachedDistractors(DistractorSource):
    """Keeps the streamed blocks (in their stored precision) while they fit ``limit_bytes``, so :meth:`take` is an
    in-memory gather instead of a second read of the source (2 GB at 1M x 1024 float16), and a second pass over the
    blocks (a run repeated without its guessed threshold) reads memory; beyond the limit it asks the source.  A
    source already in memory (``resident``: a :class:`ShardDistractors` reading the run's decoded store) is passed
    through.

    The rows are copied into one array whose pages are mapped in bulk, a block ahead of each copy
    (``MADV_POPULATE_WRITE``, Linux >= 5.14): on a VM, faulting 2 GB in one 4 KiB page at a time cost ~4 s of kernel
    time against ~0.5 s in bulk."""

    def __init__(self, source: DistractorSource, limit_bytes: int = STORE_LIMIT_BYTES) -> None:
        self.source, self.limit = source, limit_bytes
        self.n, self.attributes, self.provenance = source.n, source.attributes, source.provenance
        self.rows: np.ndarray | None = None
        self._caching = False  # blocks() is copying the blocks it streams
        self.attrs: list[tuple[int, int, dict[str, np.ndarray]]] | None = None  # complete: (start, stop, attrs)

    def decoding(self) -> bool:
        return self.rows is None and self.source.decoding()

    def blocks(self) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        if getattr(self.source, "resident", False):  # already in memory (a run's decoded store): no second copy
            yield from self.source.blocks()
            return
        if self.rows is not None and self.attrs is not None:  # a complete copy: replay it
            for a, b, attrs in self.attrs:
                yield self.rows[a:b], attrs
            return
        rows, arena, parts, pos = None, None, [], 0
        self._caching = True
        for xb, attrs in self.source.blocks():
            if pos == 0 and self.n * xb.shape[1] * xb.itemsize <= self.limit:
                arena = Arena(self.n * xb.shape[1] * xb.itemsize)
                rows = arena.array((self.n, xb.shape[1]), xb.dtype)
            if (
                arena is not None
                and rows is not None
                and rows.dtype == xb.dtype
                and rows.shape[1] == xb.shape[1]
                and pos + len(xb) <= self.n
            ):
                arena.populate(pos * xb.shape[1] * xb.itemsize, len(xb) * xb.shape[1] * xb.itemsize)
                rows[pos : pos + len(xb)] = xb
                xb = rows[pos : pos + len(xb)]
                parts.append((pos, pos + len(xb), attrs))
            else:
                rows, self._caching = None, False
            pos += len(xb)
            yield xb, attrs
        if rows is not None and pos == self.n:
            self.rows, self.attrs = rows, parts
        self._caching = False

    @property
    def caching(self) -> bool:
        """Whether :meth:`blocks` is keeping the blocks it streams (so reading ahead costs no extra memory)."""
        return self._caching

    def take(self, idx: np.ndarray) -> np.ndarray:
        if self.rows is None:
            return self.source.take(idx)
        return self.rows[idx]


def shard_rows(directory: Path) -> tuple[np.ndarray, list[str], list[str | None]]:
    """(ids, relative paths, identities) of the ok rows of a shard directory, reading only those columns (not the
    embeddings); an identity is ``None`` where the row has none."""
    manifest = shards.read_manifest(directory)
    ids, keys, idents = [], [], []
    for entry in manifest.shards:
        t = pq.read_table(directory / entry.file, columns=["id", "path", "identity", "status"])
        ok = pc.equal(t.column("status"), "ok")
        if not pc.all(ok).as_py():
            t = t.filter(ok)
        ids.append(t.column("id").to_numpy())
        keys += t.column("path").to_pylist()
        idents += t.column("identity").to_pylist()
    return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), keys, idents


def shard_paths(directory: Path) -> tuple[np.ndarray, list[str]]:
    """(ids, relative paths) of the ok rows of a shard directory (see :func:`shard_rows`)."""
    ids, keys, _ = shard_rows(directory)
    return ids, keys


def list_positions(keys: Sequence[str], rel_paths: Sequence[str], what: str) -> np.ndarray:
    """Positions in ``keys`` (stem keys) of the list entries ``rel_paths``; a missing entry is an error."""
    return _match(keys, rel_paths, what)


def select_listed(ids: np.ndarray, keys: Sequence[str], rel_paths: Sequence[str], what: str) -> np.ndarray:
    """Row ids of the list entries ``rel_paths`` (matched by stem key)."""
    return ids[_match(keys, rel_paths, what)]


def _identity_key(identity: str) -> str:
    return str(identity).replace(" ", "_")


@dataclass(frozen=True)
class ProbeOverlap:
    """Which distractor rows break the MegaFace rule that distractors are other people: ``image`` (n,) bool, the row
    is a probe image (its stem key, the devkit's relative path, equals a probe's); ``identity`` (n,) bool, the row is
    another image of a probe identity (not counted in ``image``)."""

    image: np.ndarray
    identity: np.ndarray

    def examples(self, keys: Sequence[str], which: str, k: int = 3) -> list[str]:
        """Up to ``k`` stem keys of the ``which`` (``image`` / ``identity``) rows."""
        return [keys[i] for i in np.flatnonzero(getattr(self, which))[:k].tolist()]


def probe_overlap(probes: Probes, keys: Sequence[str], identities: Sequence[str | None] | None = None) -> ProbeOverlap:
    """The rows (stem ``keys``, optional ``identities``) that are probe images or other images of probe identities.

    A row's identity is its ``identities`` entry; where that is absent or ``None``, the parent folder of its path
    (the convention of ``facesearch embed`` for image folders and of the FaceScrub layout ``Name/Name_123.png``).
    Identities compare with spaces equal to underscores, as stem keys do."""
    probe_keys = set(probes.keys)
    probe_ids = {_identity_key(i) for i in probes.identity}
    n = len(keys)
    image = np.fromiter((k in probe_keys for k in keys), dtype=bool, count=n)
    given = identities if identities is not None else [None] * n
    # a row's identity: its own (spaces as underscores), else its parent folder (split("/")[-2]), else none
    ident = (_identity_key(v) if v is not None else (k.rsplit("/", 2)[-2] if "/" in k else None)
             for k, v in zip(keys, given, strict=True))  # fmt: skip
    same = np.fromiter((i in probe_ids for i in ident), dtype=bool, count=n)
    return ProbeOverlap(image, same & ~image)


def draw_selection(n_rows: int, size: int, seed: int, set_number: int) -> np.ndarray:
    """``size`` of ``n_rows`` row positions, drawn without replacement from a seed fixed by (seed, size, set)."""
    if size > n_rows:
        raise ValueError(f"cannot draw {size:,} distractors from {n_rows:,} available rows")
    rng = np.random.default_rng(np.random.SeedSequence([seed, size, set_number, 0x3E6A]))
    return np.sort(rng.choice(n_rows, size=size, replace=False))


def selection_record(rel_paths: Sequence[str]) -> dict[str, Any]:
    """A compact, checkable record of a distractor list: count and SHA-256 of its JSON."""
    blob = json.dumps(list(rel_paths)).encode()
    return {"count": len(rel_paths), "sha256": hashlib.sha256(blob).hexdigest()}


__all__ = [
    "AttributeFilter",
    "CachedDistractors",
    "DevkitDistractors",
    "DistractorSource",
    "ProbeOverlap",
    "Probes",
    "ShardDistractors",
    "draw_selection",
    "list_positions",
    "probe_overlap",
    "probes_from_devkit",
    "probes_from_shards",
    "select_listed",
    "selection_record",
    "shard_paths",
    "shard_rows",
]
