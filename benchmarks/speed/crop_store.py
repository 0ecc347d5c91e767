"""Training input speed with and without the crop store, against the model alone: does the data loader keep up?

    python -m facesearch.benchmarks.speed.crop_store [--images 256] [--identities 16] [--image-size 250]
        [--arch fast] [--width 0.25] [--input-size 112x96] [--batch-size 32] [--workers N] [--device cpu|cuda]
        [--precision fp32|bf16] [--json out.json]
    facesearch bench speed crop-store ...   (the same options)

On ``--images`` synthetic faces (:mod:`facesearch.model.faces.synth`, CASIA layout, landmarks from its list, JPEGs of
``--image-size`` pixels like CASIA-WebFace's 250x250) in a temporary folder, it times the training DataLoader
(:func:`facesearch.model.trainer_data.train_loader`: the step sampler, flips, ``--workers`` processes) over two epochs

* decoding and aligning every image (no store), then building the crop store, then reading the store;
* the model alone: training steps (forward, eq. 2 loss, backward, SGD) on one batch already on the device;
* training: the same steps fed by each loader, as :func:`facesearch.model.train.train` runs them.

Loader rates exclude the first batches (worker start-up).  ``bound`` is min(loader, model alone) / model alone, the
fraction of model-alone speed that training reaches when loading overlaps the step (workers run on other cores);
``measured`` is the training rate over the model-alone rate.  The issue's target: >= 80 % with the store.  On a
machine whose CPU also runs the model (``--device cpu``) the loader and the model share the cores, so there the figures
say more about the loader than about the target.  The network is randomly initialised (speed does not depend on the
weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from facesearch.model.device import autocast, autocast_dtype, resolve_device
from facesearch.model.faces.datasets import FaceBatch, collate_faces
from facesearch.model.faces.synth import SynthConfig, generate_faces
from facesearch.model.losses import multitask_loss
from facesearch.model.measure import seconds_per_call
from facesearch.model.network import FaceNet, to_input
from facesearch.model.provenance import provenance
from facesearch.model.tables import render_table
from facesearch.model.train_config import TrainConfig
from facesearch.model.trainer_data import StepBatchSampler, TrainingData, prepare_data, train_loader, with_crop_store


@dataclass(frozen=True)
class CropStoreSpeedConfig:
    """The options of the run (one field per command-line option)."""

    images: int = 256
    identities: int = 16
    image_size: int = 250
    arch: str = "fast"
    width: float = 0.25
    input_size: str = "112x96"
    batch_size: int = 32
    workers: int | None = None
    device: str = "cpu"
    precision: str = "fp32"
    json: Path | None = None


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"input size must be HEIGHTxWIDTH such as 112x96, got {text!r}") from None
    return h, w


def _data(root: Path, cfg: CropStoreSpeedConfig) -> Path:
    per = -(-cfg.images // cfg.identities)
    generate_faces(SynthConfig(out=root, seed=5, identities=cfg.identities, images_per_identity=per,
                               layouts=("casia",), size=cfg.image_size, workers=os.cpu_count() or 1))  # fmt: skip
    return root / "casia"


def _timed(batches: Iterable[FaceBatch], step: Callable[[FaceBatch], None], skip: int,
           sync: Callable[[], None]) -> dict[str, Any]:  # fmt: skip
    """Images/s of ``step`` over ``batches``, from the end of batch ``skip`` on (start-up excluded); ``sync`` waits
    for the device's queued work."""
    n, t0 = 0, time.perf_counter()
    for k, batch in enumerate(batches):
        step(batch)
        if k + 1 == skip:
            sync()
            n, t0 = 0, time.perf_counter()
        elif k + 1 > skip:
            n += int(batch.images.shape[0])
    sync()
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else 0.0}


def _stepper(train: TrainConfig, identities: int, device: torch.device) -> Callable[[FaceBatch], None]:
    """One training step of ``train``'s network (the eq. 2 loss with lambda1 = 0.1, SGD) on a batch."""
    torch.manual_seed(0)
    model = FaceNet(train.model_config(identities)).to(device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    dtype = autocast_dtype(device, train.precision)
    rates = torch.full((len(train.attributes),), 0.5)

    def step(batch: FaceBatch) -> None:
        x = to_input(batch.images.to(device, non_blocking=True))
        with autocast(device, dtype):
            out = model(x)
        loss, _ = multitask_loss(out, batch.identities.to(device, non_blocking=True),
                                 batch.attributes.to(device, non_blocking=True), 0.1, 1.0, "mse", rates)  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _measure(cfg: CropStoreSpeedConfig, work: Path) -> dict[str, Any]:
    casia = _data(work / "synth", cfg)
    train = TrainConfig(data=casia, out=work / "run", arch=cfg.arch, width=cfg.width, input_size=_size(cfg.input_size),
                        batch_size=cfg.batch_size, num_workers=cfg.workers, device=cfg.device,
                        precision=cfg.precision)  # fmt: skip
    device = resolve_device(train.device)
    data = prepare_data(casia, "casia", None, train.input_size, train.attributes, holdout_per_identity=0, detect=False)
    workers, pin = train.resolved_workers, device.type == "cuda"
    steps = max(4, 2 * len(data.train) // cfg.batch_size)
    skip = min(2, steps // 4)

    def loader(d: TrainingData) -> Iterable[FaceBatch]:
        return train_loader(d.train, StepBatchSampler(len(d.train), cfg.batch_size, 0, 0, steps), workers, pin)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    paths: dict[str, dict[str, Any]] = {"loader_decode": _timed(loader(data), lambda b: None, skip, sync)}
    t0 = time.perf_counter()
    stored, stats = with_crop_store(data, work / "crops", workers)
    build = time.perf_counter() - t0
    paths["store_build"] = {"images": stats.rows, "seconds": build, "images_per_s": stats.rows / build}
    paths["loader_store"] = _timed(loader(stored), lambda b: None, skip, sync)
    step = _stepper(train, len(data.identities), device)
    one = collate_faces([stored.train[i] for i in range(cfg.batch_size)])
    batch = dataclasses.replace(one, images=one.images.to(device), identities=one.identities.to(device),
                                attributes=one.attributes.to(device))  # fmt: skip
    alone = seconds_per_call(lambda: step(batch), min_run_time=1.0, stat="mean", warmup=1)
    paths["model_alone"] = {"images": cfg.batch_size, "seconds": alone, "images_per_s": cfg.batch_size / alone}
    paths["train_decode"] = _timed(loader(data), step, skip, sync)
    paths["train_store"] = _timed(loader(stored), step, skip, sync)
    model = paths["model_alone"]["images_per_s"]
    ratios = {kind: {"bound": min(paths[f"loader_{kind}"]["images_per_s"] / model, 1.0),
                     "measured": paths[f"train_{kind}"]["images_per_s"] / model}
              for kind in ("decode", "store")}  # fmt: skip
    config = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if pin else "cpu",
            "cores": os.cpu_count(), "loadavg": os.getloadavg(), "threads": torch.get_num_threads(),
            "model": f"{cfg.arch} w{cfg.width} {cfg.input_size} {cfg.precision}", "images": len(data.train),
            "image_size": cfg.image_size, "batch_size": cfg.batch_size, "workers": workers, "steps": steps,
            "skipped_batches": skip, "paths": paths, "ratios": ratios, "store_failed": stats.failed,
            "provenance": provenance(config=config)}  # fmt: skip


def run(cfg: CropStoreSpeedConfig) -> dict[str, Any]:
    """Every path on the same synthetic images (in a temporary folder, removed after); writes ``cfg.json`` if set."""
    if cfg.images < 2 or cfg.identities < 2 or cfg.images < cfg.identities or cfg.batch_size < 2:
        raise ValueError(f"need images >= identities >= 2 and batch size >= 2, got images {cfg.images}, identities "
                         f"{cfg.identities}, batch size {cfg.batch_size}")  # fmt: skip
    if cfg.images < cfg.batch_size:
        raise ValueError(f"batch size {cfg.batch_size} needs at least that many images, got --images {cfg.images}")
    work = Path(tempfile.mkdtemp(prefix="crop_store_speed_"))
    try:
        result = _measure(cfg, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


_LABELS = {
    "loader_decode": "data loader, decode + align",
    "store_build": "crop store build",
    "loader_store": "data loader, crop store",
    "model_alone": "model alone (training step on one batch)",
    "train_decode": "training, decode + align",
    "train_store": "training, crop store",
}


def format_report(r: dict[str, Any]) -> str:
    """The markdown report of a :func:`run` result: images/s per path and the ratios to the model alone."""
    model = r["paths"]["model_alone"]["images_per_s"]
    rows = [[_LABELS[k], p["images"], f"{p['seconds']:.2f}", f"{p['images_per_s']:.1f}",
             f"{100 * p['images_per_s'] / model:.0f} %" if k != "store_build" else "—"]
            for k, p in r["paths"].items()]  # fmt: skip
    ratios = [[kind, f"{100 * v['bound']:.0f} %", f"{100 * v['measured']:.0f} %"] for kind, v in r["ratios"].items()]
    return "\n".join([
        f"Crop store speed: {r['model']} on {r['device']} ({r['device_name']}), {r['images']} images of "
        f"{r['image_size']} px, batch {r['batch_size']}, {r['workers']} workers, {r['steps']} steps (first "
        f"{r['skipped_batches']} not timed), {r['cores']} cores, load average "
        f"{' / '.join(f'{v:.2f}' for v in r['loadavg'])}",
        "",
        render_table(["path", "images", "seconds", "images/s", "of model alone"], rows),
        "",
        render_table(["input", "bound: min(loader, model) / model", "measured: training / model"], ratios),
    ])  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256, help="synthetic training images")
    ap.add_argument("--identities", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=250, help="side of the synthetic JPEGs in pixels")
    ap.add_argument("--arch", default="fast")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--input-size", default="112x96")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers [default: min(2, CPUs)]")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--json", type=Path, default=None)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result = run(CropStoreSpeedConfig(**vars(build_parser().parse_args(argv))))
    print(format_report(result))
    return result


if __name__ == "__main__":
    main()
