"""Inference: load a checkpoint into an eval-mode :class:`FaceNet` and turn aligned crops into embeddings.

:class:`Embedder` is what the indexer builds once per worker from a checkpoint path.  Embeddings are L2-normalised
here (the one place), always float32, and a crop whose feature is all zero embeds to zero, never NaN.

:func:`iter_embeddings` is the one "embed these images" loop: batches of items in, per batch their embeddings and
attribute probabilities out, items without a crop (a file that failed :func:`facesearch.model.faces.prepare
.prepare_image`) as NaN rows.  The dataset pass (:func:`embed_dataset`: training-time evaluation, attribute labelling
and benchmarks), the indexer's shards, the search engine's image queries and the LFW benchmark all run through it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from facesearch.model.checkpoint import load_checkpoint, model_fingerprint
from facesearch.model.config import ModelConfig
from facesearch.model.device import autocast_dtype, resolve_device
from facesearch.model.faces.datasets import FaceDataset, FaceItem, Failure, SkipReport
from facesearch.model.network import FaceNet, to_input

T = TypeVar("T")
log = logging.getLogger(__name__)


def load_model(
    checkpoint: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[FaceNet, ModelConfig, dict[str, Any]]:
    """A verified checkpoint (training or weights-only) -> (FaceNet in eval mode, channels_last, on ``device``;
    its ModelConfig; metadata: path, step, fingerprint, identities, attributes, train_config, version)."""
    dev = resolve_device(device) if isinstance(device, str) else device
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    model = FaceNet(ckpt.model_config)
    model.load_state_dict(ckpt.model_state)
    model = model.to(dev).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    return model, ckpt.model_config, ckpt.meta


class Embedder:
    """Batched embedding of aligned uint8 crops with a trained :class:`FaceNet`.

    ``source``: a checkpoint path or a FaceNet (put in eval mode on ``device``).  ``precision``: ``fp32 | bf16 |
    auto`` (bf16 autocast where it is faster: :func:`facesearch.model.device.cpu_bf16_autocast_pays`).
    ``flip_average``: also embed the mirrored crop and average (features before normalisation, attribute
    probabilities), a common test-time augmentation for faces.

    ``cuda_graphs``: on a CUDA device, full batches (``batch_size`` crops) replay one captured CUDA graph of the
    network instead of launching its ~150 kernels one by one from Python: the small Fast-Model is launch-bound on a
    large GPU, and in the embedding pipeline the launching thread shares the interpreter lock with the threads that
    receive the decoded crops.  Shorter batches, the CPU, and ``cuda_graphs=False`` run eagerly (the same kernels;
    the GPU tests compare the two).  One Embedder may serve several threads: replays take turns.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | FaceNet,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        batch_size: int = 256,
        flip_average: bool = False,
        cuda_graphs: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cuda_graphs = cuda_graphs
        self._graph: _GraphedBatch | None = None
        self._lock = threading.Lock()
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dtype = autocast_dtype(self.device, precision)
        self.batch_size = batch_size
        self.flip_average = flip_average
        if isinstance(source, torch.nn.Module):  # a FaceNet, or any network returning its Outputs (MGMTN)
            model = source.to(self.device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            self.model: FaceNet = model.eval()
            self.model_config: ModelConfig = source.cfg  # type: ignore[assignment]
            self.meta: dict[str, Any] = {"fingerprint": model_fingerprint(source.cfg, source.state_dict())}
        else:
            self.model, self.model_config, self.meta = load_model(source, self.device)

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def embedding_dim(self) -> int:
        return self.model_config.embedding_dim

    @property
    def attributes(self) -> tuple[str, ...]:
        return self.model_config.attributes

    @property
    def input_size(self) -> tuple[int, int]:
        return self.model_config.input_size

    def _check(self, crops: np.ndarray) -> None:
        h, w = self.input_size
        if not isinstance(crops, np.ndarray) or crops.dtype != np.uint8:
            raise ValueError(f"crops must be a uint8 numpy array (B, {h}, {w}, 3), got {type(crops).__name__} "
                             f"{getattr(crops, 'dtype', '')}")  # fmt: skip
        if crops.ndim != 4 or crops.shape[1:] != (h, w, 3):
            raise ValueError(
                f"crops must have shape (B, {h}, {w}, 3) (the model's {h}x{w} input size), got {crops.shape}"
            )

    def _forward(self, x: torch.Tensor, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                            cache_enabled=cache):  # fmt: skip
            out = self.model(x)
        return out.features.float(), out.attribute_logits.float()

    def _batch(self, images: torch.Tensor, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, h, w, 3) crops on the device -> (normalised features (B, D), logits (B, M)), float32."""
        features, z = self._forward(to_input(images), cache)
        if self.flip_average:
            f2, z2 = self._forward(to_input(images.flip(2)), cache)
            features, z = features + f2, (z + z2) / 2
        return F.normalize(features, dim=1, eps=1e-12), z

    def _graphed(self) -> _GraphedBatch | None:
        """The CUDA graph of a full batch (captured on first use), or ``None`` where none is used (the CPU, graphs
        turned off, or a capture that failed: then eager, with a warning)."""
        if self._graph is None and self.cuda_graphs and self.device.type == "cuda":
            try:
                self._graph = _GraphedBatch(self)
            except RuntimeError as e:  # pragma: no cover - depends on the driver and the network
                log.warning("CUDA graph capture failed (%s); running the network eagerly", " ".join(str(e).split()))
                self.cuda_graphs = False
        return self._graph

    @torch.inference_mode()
    def forward_crops(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, h, w, 3) RGB aligned crops -> (embeddings (B, D) float32 L2-normalised, attribute logits (B, M)
        float32, before the sigmoid).  B may be 0.  With ``flip_average`` the features are summed and the logits
        averaged over the crop and its mirror image.  Raises ``ValueError`` for a wrong dtype or crop size."""
        self._check(crops)
        n, d, m = crops.shape[0], self.embedding_dim, len(self.attributes)
        emb, logits = np.zeros((n, d), np.float32), np.zeros((n, m), np.float32)
        for lo in range(0, n, self.batch_size):
            images = torch.from_numpy(np.ascontiguousarray(crops[lo : lo + self.batch_size]))
            with self._lock:  # threads sharing this Embedder take turns on its device (and its graph's buffers)
                graph = self._graphed() if len(images) == self.batch_size else None
                if graph is not None:
                    emb[lo : lo + len(images)], logits[lo : lo + len(images)] = graph(images)
                    continue
                features, z = self._batch(images.to(self.device))
                emb[lo : lo + len(images)] = features.cpu().numpy()
                logits[lo : lo + len(images)] = z.cpu().numpy()
        return emb, logits

    def embed_crops(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, h, w, 3) RGB aligned crops -> (embeddings (B, D) float32 L2-normalised, attribute
        probabilities (B, M) float32).  B may be 0.  Raises ``ValueError`` for a wrong dtype or crop size.
        With ``flip_average`` the probabilities are the sigmoid of the averaged logits."""
        emb, logits = self.forward_crops(crops)
        return emb, torch.sigmoid(torch.from_numpy(logits)).numpy()

    def attribute_dict(self, probabilities: np.ndarray) -> dict[str, np.ndarray]:
        """(B, M) probabilities -> {attribute name: (B,) float32}."""
        return {name: probabilities[:, i] for i, name in enumerate(self.attributes)}


class _GraphedBatch:
    """One full batch of an :class:`Embedder`'s network (and flip, normalisation), captured as a CUDA graph over
    static buffers: a call copies the crops in, replays, and copies the results out (the caller holds the
    Embedder's lock: the buffers are shared).  Capture follows PyTorch's recipe: warm-up passes on a side stream,
    then the capture (errors only for this thread's calls: other threads may use other models meanwhile), with
    autocast's weight cache off (cached casts would outlive the capture)."""

    def __init__(self, embedder: Embedder) -> None:
        h, w = embedder.input_size
        self.input = torch.zeros((embedder.batch_size, h, w, 3), dtype=torch.uint8, device=embedder.device)
        side = torch.cuda.Stream(embedder.device)
        side.wait_stream(torch.cuda.current_stream(embedder.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):
                embedder._batch(self.input, cache=False)
        torch.cuda.current_stream(embedder.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.features, self.logits = embedder._batch(self.input, cache=False)

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        self.input.copy_(images)
        self.graph.replay()
        return self.features.cpu().numpy(), self.logits.cpu().numpy()


@dataclass(frozen=True)
class EmbeddedBatch(Generic[T]):
    """One batch of :func:`iter_embeddings`: its ``items``; ``embeddings`` (B, D) float32 L2-normalised and attribute
    ``probabilities`` (B, M) float32 in the embedder's attribute order, NaN rows for the items without a crop;
    ``ok`` (B,) bool, the items with one; ``seconds``, the model's wall time on the batch."""

    items: Sequence[T]
    embeddings: np.ndarray
    probabilities: np.ndarray
    ok: np.ndarray
    seconds: float


def iter_embeddings(
    embedder: Embedder, batches: Iterable[Sequence[T]], crop: Callable[[T], np.ndarray | None]
) -> Iterator[EmbeddedBatch[T]]:
    """Embed a stream of batches: for every batch, ``crop(item)`` gives each item's aligned (h, w, 3) uint8 RGB crop
    at ``embedder.input_size`` or ``None`` (no crop: the row is NaN), and the batch's crops go through
    :meth:`Embedder.embed_crops` together (forward passes of at most ``embedder.batch_size``).

    The caller fixes the batches, so rows never depend on scheduling.  Batches are pulled one at a time: memory stays
    bounded by one batch, and a producer (a DataLoader, a prefetching thread) prepares the next while this one runs
    on the model.  Yields one :class:`EmbeddedBatch` per batch, in order."""
    d, m = embedder.embedding_dim, len(embedder.attributes)
    for items in batches:
        crops = [crop(item) for item in items]
        ok = np.array([c is not None for c in crops], dtype=bool)
        emb = np.full((len(items), d), np.nan, dtype=np.float32)
        probs = np.full((len(items), m), np.nan, dtype=np.float32)
        t0 = time.perf_counter()
        if ok.any():
            emb[ok], probs[ok] = embedder.embed_crops(np.stack([c for c in crops if c is not None]))
        yield EmbeddedBatch(items, emb, probs, ok, time.perf_counter() - t0)


def _item_crop(item: FaceItem | Failure) -> np.ndarray | None:
    return item.image if isinstance(item, FaceItem) else None


def embed_dataset(
    embedder: Embedder, dataset: FaceDataset, batch_size: int = 128, num_workers: int = 0
) -> tuple[np.ndarray, np.ndarray, SkipReport]:
    """One pass over ``dataset`` (read and aligned by ``num_workers`` DataLoader workers, ``batch_size`` items a
    batch): embeddings (N, D) float32 (L2-normalised) and attribute probabilities (N, M) float32 in ``embedder``'s
    attribute order.  Rows of files that could not be read or aligned are NaN and are listed in the returned
    report."""
    emb = np.full((len(dataset), embedder.embedding_dim), np.nan, dtype=np.float32)
    probs = np.full((len(dataset), len(embedder.attributes)), np.nan, dtype=np.float32)
    skips = SkipReport(total=len(dataset))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=list
    )
    for out in iter_embeddings(embedder, loader, crop=_item_crop):
        skips.add(item for item in out.items if isinstance(item, Failure))
        idx = np.array([item.index for item in out.items], dtype=np.int64)
        emb[idx], probs[idx] = out.embeddings, out.probabilities
    return emb, probs, skips


__all__ = ["EmbeddedBatch", "Embedder", "embed_dataset", "iter_embeddings", "load_model"]
