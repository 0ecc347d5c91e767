"""Batch embedding without Dask: the config, planning (which image goes in which shard) and the per-shard function.

:func:`plan_inputs` (the input list: :mod:`facesearch.indexer.inputs`) and :func:`plan_shards` are pure and
deterministic;
:func:`embed_partition` turns one shard's items into a shard table with an :class:`model.Embedder` and (optionally) a
YuNet detector built by the caller, once per worker: each image through the one face path
(:func:`facesearch.model.faces.prepare.prepare_image`), each batch through the one embedding loop
(:func:`facesearch.model.inference.iter_embeddings`).  Every failure is a row (null embedding, ``status`` reason,
``error`` message): nothing is dropped.  An ``ok`` row whose JPEG was decoded past damaged data keeps its embedding
and carries the decoder's warning in ``error``.

Row ids: the image's position in the planned input list, or with ``keep_face="all"`` (one row per detected face)
``image_index * FACE_STRIDE + face_index`` (:func:`row_id`), faces numbered largest first from 0; an image without a
face keeps one failed row with face index 0.  Ids are so unique, deterministic and independent of other shards.

Attribute columns: the identity network's own attribute-head probabilities, or with ``attributes_from`` those of an
attribute predictor (:func:`facesearch.model.predictors.load_predictor`, built once per worker like the Embedder) on
its own crop of the same face: the prepare step keeps the decoded image just long enough to align the predictor's crop
from it (:func:`predictor_crops`: :func:`~facesearch.model.faces.prepare.prepare_image` on the pixels, with the same
landmarks, at the predictor's :class:`~facesearch.model.predictors.base.InputSpec`), so no image is decoded twice.
The embedding is unchanged.

Optional columns (:func:`optional_columns`): every row gets ``pose_score``
(:func:`facesearch.model.faces.align.pose_score` of its landmarks; null for a failed row, which has none), and with
``keep_face="all"`` ``face``, the face index of its id (the other modes keep one face per image, whose number among the
detected faces is not known).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from facesearch.indexer.inputs import CELEBA_IMAGES, INPUT_FORMATS, InputItem, list_inputs, walk_images
from facesearch.indexer.prepare_pool import PrepareSpec, auto_processes, make_preparer, predictor_crops
from facesearch.indexer.shards import DTYPES, table_from_arrays
from facesearch.model.config import from_mapping
from facesearch.model.device import PRECISIONS
from facesearch.model.faces.detect import KEEP_FACE, DetectOptions, FaceDetector, pose_score
from facesearch.model.faces.prepare import Face, FaceFailure, PreparedImage
from facesearch.model.inference import Embedder, iter_embeddings
from facesearch.model.measure import stage
from facesearch.model.predictors import AttributePredictor, load_predictor

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("read", "decode", "align", "wait", "infer", "write")
#: EmbedConfig fields that do not change a shard's content (resume may change them freely).
EXECUTION_FIELDS: tuple[str, ...] = ("out", "workers", "threads_per_worker", "decode_processes", "scheduler")
#: EmbedConfig fields that only matter for images located by YuNet (not for listed or sidecar landmarks).
DETECTION_FIELDS: tuple[str, ...] = ("detector_pad", "detector_model", "det_threshold", "det_size", "keep_face")
#: With ``keep_face="all"`` a row's id is ``image_index * FACE_STRIDE + face_index``: decimal, so id 12003 reads as
#: image 12, face 3.  Faces past the 1000th of one image (YuNet finds far fewer) are dropped, smallest first.
FACE_STRIDE = 1000


@dataclass(frozen=True)
class EmbedConfig:
    """Everything ``facesearch embed`` needs.  ``input``: an image directory tree (``format="images"``; identity = the
    parent folder, or the label an ``identities`` file gives the image), a generic list CSV (``list``:
    ``path,identity,x1..y5``, paths relative to ``root`` or the CSV's folder), a MegaFace / FaceScrub devkit JSON
    (``devkit``: ``{"path": [...], "id": [...]}``, paths relative to ``root``) or a CelebA root (``celeba``:
    ``img_align_celeba/`` named by its lists; ``identities`` replaces its ``identity_CelebA.txt``).  Landmarks come
    from the list (CelebA: ``list_landmarks_align_celeba.txt``), a ``landmarks`` CSV (generic list format, matched by
    path), ``sidecars`` (``<image>.json`` holding 5 (x, y) points, or ``{"landmarks": ...}``), else YuNet detection on
    a ``detector_pad``-padded image, downscaled to at most ``det_size`` pixels, keeping faces scored >=
    ``det_threshold`` and of those ``keep_face`` (``largest``, ``center``, ``score`` or ``all``: see
    :class:`facesearch.model.faces.align.DetectOptions` and the module's note on ids).  ``attributes_from``: an
    attribute predictor file (or checkpoint) whose probabilities fill the attribute columns instead of the identity
    network's own head (``None``)."""

    input: Path
    checkpoint: Path
    out: Path
    format: str = "images"
    root: Path | None = None
    landmarks: Path | None = None
    identities: Path | None = None
    sidecars: bool = False
    detector_pad: int = 0
    detector_model: Path | None = None
    det_threshold: float = 0.6
    det_size: int = 640
    keep_face: str = "largest"
    shard_rows: int = 50_000
    batch_size: int = 128
    dtype: str = "float16"
    flip_average: bool = False
    device: str = "auto"
    precision: str = "auto"
    attributes_from: Path | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    decode_processes: int | None = None
    scheduler: str | None = None

    def __post_init__(self) -> None:
        paths = ("input", "checkpoint", "out", "root", "landmarks", "identities", "detector_model", "attributes_from")
        for name in paths:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        choices = {"format": INPUT_FORMATS, "dtype": DTYPES, "precision": PRECISIONS, "keep_face": KEEP_FACE}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {list(valid)}, got {getattr(self, name)!r}")
        for name in ("shard_rows", "batch_size", "threads_per_worker"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decode_processes is not None and self.decode_processes < 0:
            raise ValueError(f"decode_processes must be >= 0 (0: decode on the worker's threads), got "
                             f"{self.decode_processes}")  # fmt: skip
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.detector_pad < 0:
            raise ValueError(f"detector_pad must be >= 0, got {self.detector_pad}")
        if not 0.0 < self.det_threshold <= 1.0:
            raise ValueError(f"det_threshold must be in (0, 1], got {self.det_threshold}")
        if self.det_size < 32:
            raise ValueError(f"det_size must be >= 32 (pixels), got {self.det_size}")
        if self.format == "devkit" and self.root is None:
            raise ValueError("a devkit JSON input needs root (the image folder its paths are relative to)")
        if self.identities is not None and self.format not in ("images", "celeba"):
            raise ValueError(f"an identities file names the images of a folder or a CelebA root, not of a "
                             f"{self.format} input (whose identities are in it)")  # fmt: skip
        if self.format == "celeba" and self.root is not None:
            raise ValueError(f"a CelebA root's images are in its {CELEBA_IMAGES}/ folder: root does not apply")

    @property
    def image_root(self) -> Path:
        """The folder the rows' ``path`` column is relative to."""
        if self.root is not None:
            return self.root
        if self.format == "celeba":
            return self.input / CELEBA_IMAGES
        return self.input if self.format == "images" else self.input.parent

    @property
    def detect_options(self) -> DetectOptions:
        """The YuNet options of this config."""
        return DetectOptions(self.det_threshold, self.det_size, self.keep_face, self.detector_pad)

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    def content_dict(self) -> dict[str, Any]:
        """The fields that determine the shards' rows (compared on resume)."""
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}

    def replace(self, **changes: Any) -> EmbedConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmbedConfig:
        return from_mapping(cls, data)


def plan_inputs(cfg: EmbedConfig) -> list[InputItem]:
    """The ordered input list of ``cfg`` (``id`` = position; see :func:`facesearch.indexer.inputs.list_inputs`)."""
    return list_inputs(cfg.format, cfg.input, cfg.image_root, cfg.landmarks, cfg.identities)


def row_id(image_id: int, face: int, keep_face: str) -> int:
    """The shard row id of face ``face`` (0-based, largest first) of input ``image_id``: the image id itself, or
    ``image_id * FACE_STRIDE + face`` when ``keep_face == "all"``."""
    if keep_face != "all":
        return image_id
    if not 0 <= face < FACE_STRIDE:
        raise ValueError(f"face index must be in [0, {FACE_STRIDE}), got {face}")
    return image_id * FACE_STRIDE + face


def optional_columns(keep_face: str) -> tuple[str, ...]:
    """The optional shard columns (:data:`facesearch.indexer.shards.OPTIONAL_COLUMNS`) a new output of ``keep_face``
    holds:
    ``pose_score``, and ``face`` with ``"all"`` (one row per face)."""
    return ("face", "pose_score") if keep_face == "all" else ("pose_score",)


def shard_id_range(images: range, keep_face: str) -> tuple[int, int]:
    """The half-open range [lo, hi) of row ids a shard of the input ids ``images`` may hold."""
    scale = FACE_STRIDE if keep_face == "all" else 1
    return images.start * scale, images.stop * scale


def plan_shards(n_items: int, shard_rows: int) -> list[range]:
    """Consecutive id ranges of at most ``shard_rows`` covering ``0..n_items-1`` (one empty range when n is 0)."""
    if n_items < 0 or shard_rows < 1:
        raise ValueError(f"need n_items >= 0 and shard_rows >= 1, got {n_items}, {shard_rows}")
    if n_items == 0:
        return [range(0, 0)]
    return [range(lo, min(lo + shard_rows, n_items)) for lo in range(0, n_items, shard_rows)]


@dataclass
class _Row:
    """One output row after embedding: what the table keeps of a face (no crop: a shard's crops would otherwise all
    stay in memory until it is written)."""

    landmarks: np.ndarray | None
    score: float
    status: str
    error: str | None


def _rows(image: PreparedImage) -> list[_Row]:
    """The output rows of one prepared image: one per face, best first, or its one failure.  A JPEG decoded past
    damaged data keeps its rows, with the decoder's warning in ``error`` (see :func:`_with_warnings`)."""
    rows = []
    for face in image.faces:
        score = float("nan") if face.score is None else face.score
        if isinstance(face, FaceFailure):
            rows.append(_Row(None, score, face.reason, face.message))
        else:
            rows.append(_Row(face.landmarks.reshape(10), score, "ok", None))
    return _with_warnings(rows, image.name, list(image.warnings))


def _with_warnings(faces: list[_Row], rel: str, warnings: list[str]) -> list[_Row]:
    """Note the decoder's warnings in every row of the image: an ``ok`` row keeps its embedding (libjpeg decodes
    damaged data with the blocks after the damage wrong, and buggy encoders' harmless extra bytes warn alike; the
    MegaFace lists count such images too), and its ``error`` says what the decoder saw."""
    if not warnings:
        return faces
    note = f"decoded despite damaged data ({'; '.join(warnings)}): part of the image may be wrong"
    for p in faces:
        p.error = f"{rel}: {note}" if p.error is None else f"{p.error}; {note}"
    return faces


def embed_partition(
    items: Sequence[InputItem],
    embedder: Embedder,
    detector: FaceDetector | None,
    cfg: EmbedConfig,
    timings: dict[str, float] | None = None,
    columns: Sequence[str] | None = None,
    predictor: AttributePredictor | None = None,
) -> pa.Table:
    """Embed one shard's ``items`` -> a shard table: one row per item in item order, or with ``keep_face="all"`` one
    row per face (ids from :func:`row_id`; an image without a usable face keeps one failed row).  ``columns``: the
    optional columns to write (``None``: those of a new output, :func:`optional_columns`; a resumed directory's own,
    so that all its shards have one schema).  ``predictor``: fills the attribute columns (named by its attributes)
    with its probabilities on its own crop of each face (:func:`predictor_crops`); ``None``: the embedder's own
    attribute head.

    Batches of ``cfg.batch_size`` consecutive items (fixed per shard, so the rows never depend on scheduling) are
    read, decoded and aligned in the background while the previous batch is inferred: on ``cfg.threads_per_worker``
    threads, or in ``cfg.decode_processes`` processes (``None``: one per core but one on a GPU worker, none on the
    CPU; :mod:`facesearch.indexer.prepare_pool`).  ``timings`` receives per-stage seconds (``read``, ``decode``,
    ``align``, ``infer``; the prefetch stages overlap ``infer``; the predictor's crops count in ``align``, its forward
    passes in ``infer``; ``wait``: the time inference waited for prepared images, the prefetch's shortfall)."""
    timings = {} if timings is None else timings
    embs: list[np.ndarray] = []
    attrs: list[np.ndarray] = []
    rows: list[list[_Row]] = []
    chunks = [items[lo : lo + cfg.batch_size] for lo in range(0, len(items), cfg.batch_size)]
    spec = PrepareSpec(size=embedder.input_size, sidecars=cfg.sidecars,
                       predictor_spec=None if predictor is None else predictor.input_spec,
                       detect_options=None if detector is None else cfg.detect_options,
                       detector_model=cfg.detector_model)  # fmt: skip
    processes = cfg.decode_processes
    if processes is None:
        processes = auto_processes(embedder.device.type, gpus=max(1, torch.cuda.device_count()))
    preparer = make_preparer(spec, processes, cfg.threads_per_worker, detector)

    def prepared_faces() -> Iterator[list[tuple[Face, np.ndarray | None]]]:
        """Each chunk's faces (each with the predictor's crop, if any), the next chunks read, decoded and aligned in
        the background meanwhile."""
        for images in preparer.chunks(chunks, timings):
            rows.extend(_rows(image) for image, _ in images)
            yield [pair for image, attr_crops in images for pair in zip(image.faces, attr_crops, strict=True)]

    try:
        for out in iter_embeddings(embedder, prepared_faces(), crop=lambda pair: pair[0].crop):
            embs.append(out.embeddings)
            if out.ok.any():
                timings["infer"] = timings.get("infer", 0.0) + out.seconds
            if predictor is None:
                attrs.append(out.probabilities)
            else:
                with stage(timings, "infer"):
                    attrs.append(_predict(predictor, [attr_crop for _, attr_crop in out.items]))
    finally:
        preparer.close()
    columns = optional_columns(cfg.keep_face) if columns is None else tuple(columns)
    names = embedder.attributes if predictor is None else predictor.attributes
    return _to_table(items, rows, embs, attrs, embedder.embedding_dim, tuple(names), cfg, columns)


def _predict(predictor: AttributePredictor, crops: Sequence[np.ndarray | None]) -> np.ndarray:
    """(N, M) probabilities of the faces that have a crop; NaN rows (stored as nulls) for the others."""
    probs = np.full((len(crops), len(predictor.attributes)), np.nan, np.float32)
    ok = [i for i, c in enumerate(crops) if c is not None]
    if ok:
        probs[ok] = predictor.predict_crops(np.stack([crops[i] for i in ok]))  # type: ignore[misc]
    return probs


def _to_table(items: Sequence[InputItem], prepared: list[list[_Row]], embs: list[np.ndarray],
              attrs: list[np.ndarray], d: int, attribute_names: tuple[str, ...], cfg: EmbedConfig,
              columns: tuple[str, ...]) -> pa.Table:  # fmt: skip
    """The shard table; failed rows' embeddings (NaN here) are stored as nulls."""
    m = len(attribute_names)
    owners = [(it, face) for it, faces in zip(items, prepared, strict=True) for face in range(len(faces))]
    rows = [p for faces in prepared for p in faces]
    lm = np.full((len(rows), 10), np.nan, np.float32)
    for j, p in enumerate(rows):
        if p.landmarks is not None:
            lm[j] = p.landmarks
    attr = np.concatenate(attrs) if attrs else np.zeros((0, m), np.float32)
    optional = {"face": np.array([face for _, face in owners], np.int32), "pose_score": pose_score(lm)}
    unknown = sorted(set(columns) - set(optional))
    if unknown:
        raise ValueError(f"unknown optional column(s) {unknown}; valid: {list(optional)}")
    return table_from_arrays(
        ids=np.array([row_id(it.id, face, cfg.keep_face) for it, face in owners], dtype=np.int64),
        paths=[it.rel for it, _ in owners],
        identities=[it.identity for it, _ in owners],
        embeddings=np.concatenate(embs) if embs else np.zeros((0, d), np.float32),
        attributes={name: attr[:, k] for k, name in enumerate(attribute_names)},
        det_score=np.array([p.score for p in rows], dtype=np.float32),
        landmarks=lm,
        status=[p.status for p in rows],
        error=[p.error for p in rows],
        dtype=cfg.dtype,
        extra={name: optional[name] for name in columns},
    )


def build_detector(cfg: EmbedConfig) -> FaceDetector:
    """The YuNet detector of ``cfg`` (one per worker: not thread-safe, not picklable)."""
    return FaceDetector.from_options(cfg.detect_options, cfg.detector_model)


def build_embedder(cfg: EmbedConfig, device: str | None = None) -> Embedder:
    """The Embedder of ``cfg`` (on ``device``, default ``cfg.device``)."""
    return Embedder(cfg.checkpoint, device or cfg.device, cfg.precision, cfg.batch_size, cfg.flip_average)


def build_predictor(cfg: EmbedConfig, device: str | None = None) -> AttributePredictor:
    """The attribute predictor of ``cfg.attributes_from`` (on ``device``, default ``cfg.device``; one per worker).
    ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing or not a predictor or checkpoint."""
    if cfg.attributes_from is None:
        raise ValueError("the config names no attribute predictor (attributes_from)")
    path = cfg.attributes_from
    try:
        return load_predictor(path, device or cfg.device, cfg.precision, cfg.batch_size)
    except FileNotFoundError:
        raise FileNotFoundError(f"attribute predictor {path} not found (--attributes-from)") from None
    except (ValueError, KeyError, TypeError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"--attributes-from {path} is not an attribute predictor or checkpoint: {detail}") from e


ProgressFn = Callable[[Mapping[str, Any]], object]

__all__ = [
    "DETECTION_FIELDS",
    "EXECUTION_FIELDS",
    "FACE_STRIDE",
    "INPUT_FORMATS",
    "STAGES",
    "EmbedConfig",
    "InputItem",
    "ProgressFn",
    "build_detector",
    "build_embedder",
    "build_predictor",
    "embed_partition",
    "optional_columns",
    "plan_inputs",
    "plan_shards",
    "predictor_crops",
    "row_id",
    "shard_id_range",
    "stage",
    "walk_images",
]
