"""Safe, self-describing, verified checkpoints in safetensors.

Loading never unpickles: tensors live in a safetensors file and everything else (configs, identity names, optimizer
hyper-parameters, step) is JSON in its string metadata.  Layout of one file:

* tensors ``model.<state_dict key>`` (every model parameter and buffer, contiguous),
  ``optim.<param id>.<state key>`` (optimizer state tensors, e.g. SGD momentum buffers) and
  ``rng.torch`` / ``rng.cuda.<i>`` (generator states as uint8 tensors);
* metadata ``format = "facesearch.checkpoint"`` (the marker), ``format_version``, ``kind`` (``training`` or
  ``weights``), ``step``, ``version`` (package), ``fingerprint`` (:func:`model_fingerprint`), ``provenance`` (the
  record of :func:`facesearch.model.provenance.provenance`: versions, machine, command, time), and the JSON strings
  ``model_config``, ``train_config``, ``identities`` (index -> name), ``attributes``, ``optimizer`` (param groups and
  non-tensor state), ``extra``;
* ``checksum``: SHA-256 over every tensor (name, dtype, shape, bytes, in sorted name order) and the other metadata,
  verified on load, so a flipped byte anywhere in the tensors or metadata is refused.

Files are written atomically (``*.tmp``, fsync, ``os.replace``): a crash mid-write leaves the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from facesearch.model.config import ModelConfig
from facesearch.model.fileio import atomic_write_with
from facesearch.model.provenance import our_version, provenance

log = logging.getLogger(__name__)

FORMAT = "facesearch.checkpoint"
FORMAT_VERSION = 1
_JSON_KEYS = ("model_config", "train_config", "identities", "attributes", "optimizer", "extra")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.  ``model_state`` / ``optimizer_state`` are ready for ``load_state_dict``;
    ``optimizer_state`` and ``rng_state`` are ``None`` / empty in a weights-only file."""

    path: Path
    kind: str
    step: int
    model_config: ModelConfig
    model_state: dict[str, Tensor]
    fingerprint: str
    identities: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    train_config: dict[str, Any] | None = None
    optimizer_state: dict[str, Any] | None = None
    rng_state: dict[str, Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    version: str = "unknown"

    @property
    def meta(self) -> dict[str, Any]:
        """Everything except the tensors, JSON-ready (for logs and manifests)."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "step": self.step,
            "model_config": self.model_config.to_dict(),
            "fingerprint": self.fingerprint,
            "identities": list(self.identities),
            "attributes": list(self.attributes),
            "train_config": self.train_config,
            "extra": self.extra,
            "version": self.version,
        }


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _update_with_tensor(h: Any, name: str, t: Tensor) -> None:
    h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
    h.update(_tensor_bytes(t))


def model_fingerprint(model_cfg: ModelConfig, state_dict: Mapping[str, Tensor]) -> str:
    """SHA-256 (hex) of the model config JSON and every model tensor in sorted-key order.

    Independent of memory format (channels_last) and device; identical for a training checkpoint and its exported
    weights.  The indexer stamps every shard with it, so embeddings can be traced to the exact weights.
    """
    h = hashlib.sha256()
    h.update(json.dumps(model_cfg.to_dict(), sort_keys=True).encode())
    for name in sorted(state_dict):
        _update_with_tensor(h, name, state_dict[name])
    return h.hexdigest()


def _checksum(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        _update_with_tensor(h, name, tensors[name])
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    return h.hexdigest()


def _flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """torch optimizer ``state_dict()`` -> (tensors ``optim.<pid>.<key>``, JSON-able rest)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, Tensor], rest: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for pid, scalars in rest["scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    for name, t in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = t
    return {"state": state, "param_groups": [dict(g) for g in rest["param_groups"]]}


def capture_rng_state() -> dict[str, Tensor]:
    """The global torch CPU generator state and, when CUDA is initialised, every CUDA generator state."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            state[f"cuda.{i}"] = torch.cuda.get_rng_state(i)
    return state


def restore_rng_state(state: Mapping[str, Tensor]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored only where that device exists)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    for name, t in state.items():
        if name.startswith("cuda.") and torch.cuda.is_available():
            i = int(name.split(".")[1])
            if i < torch.cuda.device_count():
                torch.cuda.set_rng_state(t.cpu(), i)


def atomic_write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file via ``<path>.tmp`` + fsync + ``os.replace`` (+ directory fsync)."""
    atomic_write_with(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))


def save_checkpoint(
    path: str | os.PathLike[str],
    model_config: ModelConfig,
    model_state: Mapping[str, Tensor],
    *,
    step: int = 0,
    optimizer_state: Mapping[str, Any] | None = None,
    rng_state: Mapping[str, Tensor] | None = None,
    train_config: Mapping[str, Any] | None = None,
    identities: tuple[str, ...] | list[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write a checkpoint atomically; returns the model fingerprint.

    Without ``optimizer_state`` and ``rng_state`` the file is a weights-only (``kind = "weights"``) checkpoint for
    inference.  ``train_config`` is the resolved training config as a JSON-able mapping.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    fingerprint = model_fingerprint(model_config, state)
    tensors = {f"model.{k}": v for k, v in state.items()}
    optim_rest: dict[str, Any] | None = None
    if optimizer_state is not None:
        optim_tensors, optim_rest = _flatten_optimizer(optimizer_state)
        tensors.update(optim_tensors)
    for name, t in (rng_state or {}).items():
        tensors[f"rng.{name}"] = t.detach().cpu().contiguous()
    training = optimizer_state is not None or bool(rng_state)
    values: dict[str, Any] = {
        "model_config": model_config.to_dict(),
        "train_config": dict(train_config) if train_config is not None else None,
        "identities": list(identities),
        "attributes": list(model_config.attributes),
        "optimizer": optim_rest,
        "extra": dict(extra or {}),
    }
    metadata = {k: json.dumps(v, sort_keys=True) for k, v in values.items()}
    metadata.update(
        format=FORMAT,
        format_version=str(FORMAT_VERSION),
        kind="training" if training else "weights",
        step=str(int(step)),
        version=our_version(),
        fingerprint=fingerprint,
        provenance=json.dumps(provenance(), sort_keys=True),
    )
    metadata["checksum"] = _checksum(tensors, metadata)
    atomic_write_safetensors(path, tensors, metadata)
    log.info("wrote %s checkpoint %s (step %d, fingerprint %s)", metadata["kind"], path, step, fingerprint[:12])
    return fingerprint


def _read_raw(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or a one-line ValueError if it is not one of ours."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise ValueError(f"not a facesearch checkpoint: {path} is a directory")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:  # type: ignore[no-untyped-call]
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(
                    f"not a facesearch checkpoint: {path} is a safetensors file without the {FORMAT!r} format marker "
                    "(foreign weights?)"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except safetensors.SafetensorError as e:
        raise ValueError(f"not a facesearch checkpoint: {path} is not a valid safetensors file ({e})") from e
    return tensors, metadata


def _parse_json(path: Path, metadata: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt facesearch checkpoint {path}: metadata {key!r} is missing or not JSON") from e


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint (never unpickles).  Tensors are moved to ``map_location``.

    Raises ``FileNotFoundError`` for a missing file and a one-line ``ValueError`` for a file that is not a safetensors
    file, a safetensors file without our format marker, a newer format version, or a checksum mismatch (tampered or
    corrupted), each naming the file.
    """
    path = Path(path)
    tensors, metadata = _read_raw(path)
    version = metadata.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise ValueError(f"unsupported facesearch checkpoint format version {version} in {path} (this code reads 1)")
    if metadata.get("checksum") != _checksum(tensors, metadata):
        raise ValueError(f"checkpoint {path} failed its SHA-256 checksum: the file is corrupted or was modified")
    values = {k: _parse_json(path, metadata, k) for k in _JSON_KEYS}
    model_config = ModelConfig.from_dict(values["model_config"])
    device = torch.device(map_location)
    groups: dict[str, dict[str, Tensor]] = {"model": {}, "optim": {}, "rng": {}}
    for name, t in tensors.items():
        prefix, _, rest = name.partition(".")
        if prefix not in groups:
            raise ValueError(f"corrupt facesearch checkpoint {path}: unexpected tensor {name!r}")
        groups[prefix][rest if prefix != "optim" else name] = t if prefix == "rng" else t.to(device)
    optimizer_state = None
    if values["optimizer"] is not None:
        optimizer_state = _unflatten_optimizer(groups["optim"], values["optimizer"])
    return Checkpoint(
        path=path,
        kind=metadata.get("kind", "training"),
        step=int(metadata.get("step", "0")),
        model_config=model_config,
        model_state=groups["model"],
        fingerprint=metadata.get("fingerprint", ""),
        identities=tuple(values["identities"]),
        attributes=tuple(values["attributes"]),
        train_config=values["train_config"],
        optimizer_state=optimizer_state,
        rng_state=groups["rng"],
        extra=values["extra"],
        version=metadata.get("version", "unknown"),
    )


def export_weights(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write a weights-only copy of ``checkpoint`` (no optimizer or RNG state) for inference; same fingerprint."""
    ckpt = load_checkpoint(checkpoint)
    out = Path(out)
    save_checkpoint(
        out,
        ckpt.model_config,
        ckpt.model_state,
        step=ckpt.step,
        train_config=ckpt.train_config,
        identities=ckpt.identities,
        extra=ckpt.extra,
    )
    return out


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "atomic_write_safetensors",
    "capture_rng_state",
    "export_weights",
    "load_checkpoint",
    "model_fingerprint",
    "restore_rng_state",
    "save_checkpoint",
]
