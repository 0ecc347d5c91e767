"""The manifest of a shard directory: what the shards are (model fingerprint, d, dtype, attribute names), one
:class:`ShardEntry` per shard (rows, SHA-256, id range), whether the set is complete, and the config and versions
that made it.

Attribute provenance (``attribute_source``): where the shards' attribute columns came from, either the identity
network's own attribute head, ``{"source": "model", "fingerprint": <the checkpoint's>}``, or an attribute predictor
(``facesearch embed --attributes-from``), ``{"source": "predictor", "key", "fingerprint", "path", "input",
"calibration"}`` (:func:`predictor_source`).  A manifest from before the record (or of synthetic features) has none:
:attr:`Manifest.attribute_provenance` reads it as the model's own head.

Names: ``_manifest.json`` (:data:`MANIFEST`), so that Parquet dataset readers, which skip names starting with ``_``
or ``.``, read the directory of ``part-*.parquet`` files as is.  Directories written before hold ``manifest.json``
(:data:`LEGACY_MANIFEST`); they stay readable, resumable and appendable.  Every reader goes through
:func:`manifest_path`, which prefers ``_manifest.json`` and falls back to the legacy name.  An old directory migrates
on the first :func:`write_manifest` (a resumed or extended job) or an explicit :func:`migrate_manifest`: the new
name is written atomically first and only then the legacy file is removed, so a crash in between leaves both, and
``_manifest.json``, the newer, wins.  (Software from before the rename does not see a migrated directory's manifest.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from facesearch.model.fileio import atomic_write_bytes, atomic_write_text, fsync_dir

MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"  # the first name: Parquet dataset readers tried to read it as a data file
KIND = "facesearch.shards"
FORMAT_VERSION = 1
DTYPES: tuple[str, ...] = ("float16", "float32")
#: ``attribute_source["source"]`` values: the identity network's own attribute head, an attribute predictor, or
#: the synthetic feature generator (probabilities drawn from a known law, :mod:`facesearch.indexer.synth_features`).
ATTRIBUTE_SOURCES: tuple[str, ...] = ("model", "predictor", "synthetic")


def model_source(fingerprint: str) -> dict[str, Any]:
    """The attribute provenance of columns filled by the identity network's own head (model ``fingerprint``)."""
    return {"source": "model", "fingerprint": fingerprint}


def validation_statistics(validation: Mapping[str, Any] | None) -> dict[str, Any]:
    """Per attribute, what a predictor's validation report says about its calibrated probabilities (balanced
    accuracy at 0.5, known positives / negatives, ECE, reliability table, histograms of the probabilities of
    positives and negatives), with the split and image count; ``{}`` without a report."""
    if not validation or "attributes" not in validation:
        return {}
    balanced = validation.get("balanced_accuracy") or {}
    keep = ("n_pos", "n_neg", "ece", "reliability", "histogram")
    return {
        "split": validation.get("split"),
        "images": validation.get("images"),
        "attributes": {name: {"balanced_accuracy": balanced.get(name), **{k: v[k] for k in keep if k in v}}
                       for name, v in validation["attributes"].items()},
    }  # fmt: skip


def predictor_source(description: Mapping[str, Any]) -> dict[str, Any]:
    """The attribute provenance of columns filled by an attribute predictor, from its
    :meth:`facesearch.model.predictors.base.AttributePredictor.describe`: key, fingerprint, path (absolute), input
    crop, calibration method and its validation statistics (:func:`validation_statistics`: what a confidence-aware
    filter predicts its cost from; they travel with the shards into the index)."""
    path = description.get("path")
    out = {
        "source": "predictor",
        "key": str(description["key"]),
        "fingerprint": str(description["fingerprint"]),
        "path": None if path is None else str(Path(path).absolute()),
        "input": dict(description.get("input") or {}),
        "calibration": description.get("calibration"),
    }
    stats = validation_statistics(description.get("validation"))
    if stats:
        out["validation"] = stats
    return out


def same_attribute_source(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two attribute provenance records describe the same filler (kind and fingerprint; not the path)."""
    return (a.get("source"), a.get("fingerprint")) == (b.get("source"), b.get("fingerprint"))


def describe_attribute_source(record: Mapping[str, Any]) -> str:
    """One phrase naming where attribute columns came from, e.g. ``the moon predictor 3f2a... (/w/moon.safetensors)``
    or ``the model's own attribute head (model 9c1e...)``."""
    fp = str(record.get("fingerprint") or "?")[:16]
    if record.get("source") == "predictor":
        where = f" ({record['path']})" if record.get("path") else ""
        return f"the {record.get('key', '?')} predictor {fp}{where}"
    if record.get("source") == "synthetic":
        return f"the synthetic feature generator ({fp})"
    return f"the model's own attribute head (model {fp})"


@dataclass(frozen=True)
class ShardEntry:
    """One shard in the manifest: file name, row counts, SHA-256 of the file, the half-open id range [lo, hi) and
    the file's size in bytes (``None`` in manifests written before sizes were recorded; not compared: entries with
    the same SHA-256 describe the same file)."""

    file: str
    rows: int
    ok_rows: int
    sha256: str
    id_lo: int
    id_hi: int
    size: int | None = field(default=None, compare=False)  # follows from the file, as sha256 does

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["size"] is None:
            del data["size"]
        return data


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Manifest:
    """``_manifest.json`` of a shard directory.  ``shards`` are sorted by file name; ``planned_shards`` is how many the
    job will write (``complete`` once all are present).  ``source``: input description (root, list file, format,
    count); ``config``: the resolved embed config; ``versions``: software versions; ``provenance``: the record of the
    job that created the directory (:func:`facesearch.model.provenance.provenance`; empty before it); ``id_offset``:
    what the embed job added to every row id (ids = input position + ``id_offset``; 0 when absent: manifests from
    before it);
    ``columns``: the optional columns (:data:`facesearch.indexer.shards.OPTIONAL_COLUMNS`) every shard of the directory
    holds (``()`` when absent: manifests from before them; written only when not empty); ``attribute_source``: where
    the attribute columns came from (module docstring; ``{}`` when absent: read through
    :attr:`attribute_provenance`; written only when not empty)."""

    fingerprint: str
    d: int
    dtype: str
    attributes: tuple[str, ...]
    model_config: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    shards: tuple[ShardEntry, ...] = ()
    planned_shards: int = 0
    complete: bool = False
    normalized: bool = True
    id_offset: int = 0
    columns: tuple[str, ...] = ()
    attribute_source: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"embedding dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if isinstance(self.id_offset, bool) or not isinstance(self.id_offset, int):
            raise ValueError(f"id_offset must be an integer, got {self.id_offset!r}")
        object.__setattr__(self, "attributes", tuple(self.attributes))
        if isinstance(self.columns, str) or not all(isinstance(c, str) for c in self.columns):
            raise ValueError(f"columns must be a list of column names, got {self.columns!r}")
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"columns must be distinct, got {list(self.columns)}")
        object.__setattr__(self, "columns", tuple(self.columns))
        src = self.attribute_source
        if not isinstance(src, dict) or (src and (src.get("source") not in ATTRIBUTE_SOURCES
                                                  or not isinstance(src.get("fingerprint"), str))):  # fmt: skip
            raise ValueError(f"attribute_source must be {{'source': one of {list(ATTRIBUTE_SOURCES)}, "
                             f"'fingerprint': ..., ...}}, got {src!r}")  # fmt: skip
        object.__setattr__(self, "shards", tuple(sorted(self.shards, key=lambda e: e.file)))

    @property
    def totals(self) -> dict[str, int]:
        rows = sum(e.rows for e in self.shards)
        ok = sum(e.ok_rows for e in self.shards)
        return {"shards": len(self.shards), "rows": rows, "ok_rows": ok, "failed_rows": rows - ok}

    @property
    def attribute_provenance(self) -> dict[str, Any]:
        """Where the attribute columns came from: the recorded ``attribute_source``, else (a manifest from before
        the record, or of synthetic features) the model's own head, :func:`model_source` of ``fingerprint``."""
        return dict(self.attribute_source) if self.attribute_source else model_source(self.fingerprint)

    def entry(self, file: str) -> ShardEntry | None:
        return next((e for e in self.shards if e.file == file), None)

    def with_entry(self, entry: ShardEntry) -> Manifest:
        """A copy with ``entry`` added (replacing one of the same file)."""
        others = tuple(e for e in self.shards if e.file != entry.file)
        return dataclasses.replace(self, shards=(*others, entry))

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = {"kind": KIND, "format_version": FORMAT_VERSION}
        data.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        data.update(attributes=list(self.attributes), shards=[e.to_dict() for e in self.shards], totals=self.totals)
        if self.columns:
            data["columns"] = list(self.columns)
        else:
            del data["columns"]  # the manifest of a directory without optional columns reads as before them
        if not self.attribute_source:
            del data["attribute_source"]
        return json.loads(json.dumps(data))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["shards"] = tuple(ShardEntry(**e) for e in data.get("shards", ()))
        return cls(**values)


def manifest_path(directory: Path) -> Path | None:
    """The manifest file of a shard directory: ``_manifest.json``, else a legacy ``manifest.json``, else ``None``.
    The one place that knows the names: every reader of the manifest goes through it."""
    for name in (MANIFEST, LEGACY_MANIFEST):
        path = Path(directory) / name
        if path.is_file():
            return path
    return None


def is_shard_directory(directory: Path) -> bool:
    """True when ``directory`` holds a shard manifest (either name; its content is not checked)."""
    return manifest_path(directory) is not None


def _read_manifest_bytes(directory: Path) -> tuple[Path, bytes]:
    """(path, content) of the manifest; a migration between finding the legacy file and reading it is retried."""
    for _ in range(2):
        path = manifest_path(directory)
        if path is None:
            break
        try:
            return path, path.read_bytes()
        except FileNotFoundError:
            continue  # the legacy file was migrated after we found it: look again
        except OSError as e:
            raise ValueError(f"corrupt shard manifest {path}: {e}") from e
    raise ValueError(f"{Path(directory) / MANIFEST} not found: {directory} is not a shard directory "
                     "(run facesearch embed first)")  # fmt: skip


def manifest_sha256(directory: Path) -> str:
    """SHA-256 (hex) of the manifest file's bytes (whichever name it has), to trace an artifact to the shard set."""
    return hashlib.sha256(_read_manifest_bytes(directory)[1]).hexdigest()


def read_manifest(directory: Path) -> Manifest:
    """The manifest of a shard directory (see :func:`manifest_path`) -> :class:`Manifest`; a one-line ``ValueError``
    naming the file when it is missing, not JSON, of another kind or format version, or malformed."""
    path, raw = _read_manifest_bytes(directory)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt shard manifest {path}: {e}") from e
    if not isinstance(data, dict) or data.get("kind") != KIND:
        kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a shard manifest (kind {kind!r}, expected {KIND!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported shard format version {data.get('format_version')!r} (reads 1)")
    try:
        return Manifest.from_dict(data)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"corrupt shard manifest {path}: {e}") from e


def _drop_legacy(directory: Path) -> None:
    """Remove a legacy ``manifest.json`` once ``_manifest.json`` is safely on disk."""
    legacy = Path(directory) / LEGACY_MANIFEST
    if legacy.is_file():
        fsync_dir(Path(directory))  # the new name's rename is durable before the old file goes
        legacy.unlink(missing_ok=True)
        fsync_dir(Path(directory))


def write_manifest(directory: Path, manifest: Manifest) -> Manifest:
    """Write ``manifest`` atomically to ``directory/_manifest.json`` with ``updated`` set to now (then remove a
    legacy ``manifest.json``: a resumed old directory migrates); returns it."""
    manifest = manifest.replace(updated=_now())
    atomic_write_text(Path(directory) / MANIFEST, json.dumps(manifest.to_dict(), indent=2) + "\n")
    _drop_legacy(directory)
    return manifest


def migrate_manifest(directory: Path) -> Path:
    """Rename a legacy ``manifest.json`` to ``_manifest.json`` (byte for byte, atomically: the new file is complete
    before the old one goes), making an old directory a readable Parquet dataset; returns the manifest's path.
    Nothing to do when it is already migrated; ``ValueError`` when the directory has no valid manifest."""
    read_manifest(directory)  # refuse to migrate what is not a shard manifest
    path, raw = _read_manifest_bytes(directory)
    if path.name == LEGACY_MANIFEST:
        atomic_write_bytes(Path(directory) / MANIFEST, raw)
        _drop_legacy(directory)
    return Path(directory) / MANIFEST


__all__ = [
    "ATTRIBUTE_SOURCES",
    "DTYPES",
    "FORMAT_VERSION",
    "KIND",
    "LEGACY_MANIFEST",
    "MANIFEST",
    "Manifest",
    "ShardEntry",
    "describe_attribute_source",
    "is_shard_directory",
    "manifest_path",
    "manifest_sha256",
    "migrate_manifest",
    "model_source",
    "predictor_source",
    "read_manifest",
    "same_attribute_source",
    "validation_statistics",
    "write_manifest",
]
