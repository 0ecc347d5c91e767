"""Synthetic face features at scale: identity-clustered unit vectors written as a shard directory (``shards.py``).

Each identity ``i`` has a random unit centre ``c_i`` in R^d and a latent 0/1 per attribute; a row of identity ``i``
is ``normalise(c_i + spread * g / sqrt(d))`` with ``g ~ N(0, I_d)`` (so ``spread = 1`` puts a row at about 45 degrees
from its centre), and its attribute probabilities are ``sigmoid(+-2.5 + N(0, 1))`` around the identity's latent.

Centres and latents depend only on ``(seed, identity index, d)``, so a **probe set** written with the same seed and
``dim`` (``probes_per_identity > 0``) holds new samples of the gallery's identities: their mates are in the gallery.
The fingerprint (``synthetic:<seed>:<hash of the space parameters>``) is shared by both, so an index built from the
gallery accepts the probes' shards. Identity ``i`` is named ``<identity_prefix>_<i:07d>`` (gallery rows at
``synth/<name>/<k>.jpg``, probes at ``synth/<name>/probe_<k>.jpg``): probes of the gallery's people keep its prefix,
while a set of *other* people (MegaFace probes beside synthetic distractors of another seed) takes its own, so the two
never share an identity name. Generation is vectorised numpy, block by block: memory is bounded by ``_BLOCK`` rows
whatever ``rows`` is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.indexer import shards
from facesearch.model.config import ATTRIBUTES
from facesearch.model.provenance import provenance, versions

PROBE_ID_OFFSET = 1 << 40  # probe ids never collide with gallery ids (gallery ids are 0 .. rows-1)
_BLOCK = 16384  # rows generated at a time
_CHUNK = 1024  # identities per centre chunk (centres are drawn per chunk, so any row range is cheap to generate)
_LOGIT = 2.5
_LATENT_RATE = 0.4  # share of identities with each attribute
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # one path component
# Fields added after directories were written: a manifest without one was made with this value.
_ADDED_FIELDS: dict[str, Any] = {"identity_prefix": "synth"}
# A plausible 5-point landmark template (112x96 crop): eyes, nose tip, mouth corners.
_LANDMARKS = np.array([30.3, 51.7, 65.5, 51.5, 48.0, 71.7, 33.5, 92.4, 62.7, 92.2], dtype=np.float32)


@dataclass(frozen=True)
class SynthFeaturesConfig:
    """What to generate. ``probes_per_identity > 0`` writes a probe set (that many rows for each of the first
    ``probe_identities`` identities, default all) instead of a gallery of ``rows`` rows. ``identity_prefix``: the
    identity names are ``<identity_prefix>_<index:07d>`` (letters, digits, ``.``, ``-``, ``_``)."""

    out: Path
    rows: int = 1_000_000
    dim: int = 1024
    identities: int = 10_000
    spread: float = 0.8
    dtype: str = "float16"
    shard_rows: int = 100_000
    seed: int = 0
    probes_per_identity: int = 0
    probe_identities: int | None = None
    identity_prefix: str = "synth"

    def __post_init__(self) -> None:
        for name in ("rows", "dim", "identities", "shard_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.spread >= 0 or not np.isfinite(self.spread) or self.probes_per_identity < 0:
            raise ValueError(f"spread and probes_per_identity must be >= 0, got {self.spread}, "
                             f"{self.probes_per_identity}")  # fmt: skip
        if self.dtype not in shards.DTYPES:
            raise ValueError(f"dtype must be one of {list(shards.DTYPES)}, got {self.dtype!r}")
        if self.probe_identities is not None and not 1 <= self.probe_identities <= self.identities:
            raise ValueError(f"probe_identities must be in 1..{self.identities}, got {self.probe_identities}")
        if not _PREFIX.fullmatch(self.identity_prefix):
            raise ValueError(f"identity_prefix must be letters, digits, '.', '-' or '_' (it names a folder), got "
                             f"{self.identity_prefix!r}")  # fmt: skip

    @property
    def is_probes(self) -> bool:
        return self.probes_per_identity > 0

    @property
    def total_rows(self) -> int:
        if self.is_probes:
            return (self.probe_identities or self.identities) * self.probes_per_identity
        return self.rows

    @property
    def fingerprint(self) -> str:
        """Names the embedding space (centres and latents): equal for a gallery and its probes."""
        space = json.dumps({"generator": "synth_features/v1", "seed": self.seed, "dim": self.dim})
        return f"synthetic:{self.seed}:{hashlib.sha256(space.encode()).hexdigest()[:16]}"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        return data


@dataclass(frozen=True)
class SynthFeaturesSummary:
    out: Path
    rows: int
    shards: int
    seconds: float
    fingerprint: str

    @property
    def rows_per_second(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


def _identity_chunk(seed: int, chunk: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres (CHUNK, d) float32 unit rows and latents (CHUNK, n_attr) bool of identities chunk*CHUNK ..."""
    rng = np.random.default_rng([seed, 0, chunk])
    c = rng.standard_normal((_CHUNK, d), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return c, rng.random((_CHUNK, len(ATTRIBUTES))) < _LATENT_RATE


def _identity_of_rows(cfg: SynthFeaturesConfig, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers (n,) int64 -> identity index and the row's number within its identity."""
    if cfg.is_probes:
        return r // cfg.probes_per_identity, r % cfg.probes_per_identity
    ident = (r * cfg.identities) // cfg.rows
    first = (ident * cfg.rows + cfg.identities - 1) // cfg.identities
    return ident, r - first


def _block(cfg: SynthFeaturesConfig, lo: int, hi: int, cache: dict[int, Any]) -> Any:
    """Rows [lo, hi) as a shard table."""
    r = np.arange(lo, hi, dtype=np.int64)
    ident, num = _identity_of_rows(cfg, r)
    rng = np.random.default_rng([cfg.seed, 2 if cfg.is_probes else 1, lo])
    chunks = ident // _CHUNK
    centres = np.empty((len(r), cfg.dim), np.float32)
    latent = np.empty((len(r), len(ATTRIBUTES)), bool)
    for ch in np.unique(chunks):
        if int(ch) not in cache:
            cache.clear()  # rows are ordered by identity: one or two chunks are live at a time
            cache[int(ch)] = _identity_chunk(cfg.seed, int(ch), cfg.dim)
        c, lat = cache[int(ch)]
        sel = chunks == ch
        centres[sel], latent[sel] = c[ident[sel] % _CHUNK], lat[ident[sel] % _CHUNK]
    x = rng.standard_normal((len(r), cfg.dim), dtype=np.float32)
    x *= np.float32(cfg.spread / np.sqrt(cfg.dim))
    x += centres
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    logits = np.where(latent, _LOGIT, -_LOGIT) + rng.standard_normal(latent.shape)
    probs = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    names = [f"{cfg.identity_prefix}_{i:07d}" for i in ident.tolist()]
    stem = "probe_" if cfg.is_probes else ""
    paths = [f"synth/{n}/{stem}{k}.jpg" for n, k in zip(names, num.tolist(), strict=True)]
    offset = PROBE_ID_OFFSET if cfg.is_probes else 0
    n = len(r)
    return shards.table_from_arrays(
        ids=r + offset,
        paths=paths,
        identities=names,
        embeddings=x,
        attributes={a: probs[:, j] for j, a in enumerate(ATTRIBUTES)},
        det_score=np.ones(n, np.float32),
        landmarks=np.broadcast_to(_LANDMARKS, (n, 10)),
        status=["ok"] * n,
        error=[None] * n,
        dtype=cfg.dtype,
    )


def attribute_statistics(bins: int = 100, n: int = 100_000) -> dict[str, Any]:
    """The validation statistics of the generator's attribute columns, exact rather than sampled: a latent positive
    (rate 0.4) reads ``sigmoid(2.5 + z)``, a negative ``sigmoid(-2.5 + z)``, ``z ~ N(0, 1)``, so a histogram bin
    [a, b) holds ``Φ(logit b ∓ 2.5) - Φ(logit a ∓ 2.5)`` of each class (expected counts of ``n`` faces)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    with np.errstate(divide="ignore"):
        logit = np.log(edges) - np.log1p(-edges)
    cdf = np.vectorize(lambda v: 0.5 * math.erfc(-v / math.sqrt(2.0)))
    n_pos, n_neg = round(_LATENT_RATE * n), n - round(_LATENT_RATE * n)
    pos = np.diff(cdf(logit - _LOGIT)) * n_pos
    neg = np.diff(cdf(logit + _LOGIT)) * n_neg
    balanced = 0.5 * math.erfc(-_LOGIT / math.sqrt(2.0))  # P(z > -2.5): a positive read above 0.5, and vice versa
    hist = {"bins": bins, "positive": pos.round(3).tolist(), "negative": neg.round(3).tolist()}
    per = {"balanced_accuracy": balanced, "n_pos": n_pos, "n_neg": n_neg, "histogram": hist}
    return {"split": "generator law", "images": n, "attributes": dict.fromkeys(ATTRIBUTES, per)}


def _manifest(cfg: SynthFeaturesConfig, entries: tuple[shards.ShardEntry, ...], planned: int) -> shards.Manifest:
    return shards.Manifest(
        fingerprint=cfg.fingerprint,
        d=cfg.dim,
        dtype=cfg.dtype,
        attributes=ATTRIBUTES,
        attribute_source={"source": "synthetic", "fingerprint": cfg.fingerprint, "validation": attribute_statistics()},
        source={"synthetic": "features", "role": "probes" if cfg.is_probes else "gallery"},
        config=cfg.to_dict(),
        versions=versions(),
        provenance=provenance(),
        shards=entries,
        planned_shards=planned,
        complete=len(entries) == planned,
    )


def write_synth_features(cfg: SynthFeaturesConfig) -> SynthFeaturesSummary:
    """Write the shard directory ``cfg.out`` (new or empty; a complete one from the same config is left as is)."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    planned = -(-cfg.total_rows // cfg.shard_rows)
    if shards.is_shard_directory(out):
        old = shards.read_manifest(out)
        if old.complete and {**_ADDED_FIELDS, **old.config} == cfg.to_dict():
            shards.migrate_manifest(out)  # a directory from before ``_manifest.json``: readable by Parquet tools now
            return SynthFeaturesSummary(out, cfg.total_rows, planned, 0.0, cfg.fingerprint)
        raise ValueError(f"{out} already holds a different shard set; choose a new --out")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose a new or empty --out")
    out.mkdir(parents=True, exist_ok=True)
    shards.write_manifest(out, _manifest(cfg, (), planned))
    entries: list[shards.ShardEntry] = []
    cache: dict[int, Any] = {}
    import pyarrow as pa

    for s in range(planned):
        lo, hi = s * cfg.shard_rows, min((s + 1) * cfg.shard_rows, cfg.total_rows)
        parts = [_block(cfg, b, min(b + _BLOCK, hi), cache) for b in range(lo, hi, _BLOCK)]
        offset = PROBE_ID_OFFSET if cfg.is_probes else 0
        entry = shards.write_shard(out / shards.shard_name(s), pa.concat_tables(parts), (lo + offset, hi + offset))
        entries.append(entry)
    shards.write_manifest(out, _manifest(cfg, tuple(entries), planned))
    return SynthFeaturesSummary(out, cfg.total_rows, planned, time.perf_counter() - t0, cfg.fingerprint)


__all__ = ["PROBE_ID_OFFSET", "SynthFeaturesConfig", "SynthFeaturesSummary", "write_synth_features"]
