"""Forward and training throughput of the Full and Fast models against this machine's measured matmul peak.

    python -m facesearch.benchmarks.speed.model_speed [--device cpu|cuda] [--models full,fast] [--precisions fp32,bf16]
    [--json out.json]
    facesearch bench speed model ...   (the same options; --width 0.25 --input-size 56x48 --batch 2: a quick check)

For each model, batch size (the paper's: 40 Full, 48 Fast) and precision it reports images/s for inference
(``inference_mode``, eval) and for a training step (forward, eq. 2 loss, backward, SGD), the multiply-accumulates per
image, and the achieved FLOP/s (2 x MACs per image forward, 3 x that for a training step: backward ~ 2 x forward) as a
fraction of the GEMM peak measured in the same run with the same precision.  Every rate is the mean over at least
``--min-seconds`` of ``torch.utils.benchmark`` blocks (:mod:`facesearch.model.measure`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from facesearch.model.config import INPUT_SIZE, preset
from facesearch.model.measure import gemm_flops, seconds_per_call
from facesearch.model.network import FaceNet, count_macs, to_input
from facesearch.model.provenance import provenance
from facesearch.model.tables import render_table

PAPER_BATCH = {"full": 40, "fast": 48, "variant": 48}


@dataclass(frozen=True)
class ModelSpeedConfig:
    """The options of the run (one field per command-line option)."""

    device: str = "cpu"
    models: str = "full,fast"
    precisions: str = "fp32,bf16"
    min_seconds: float = 3.0
    gemm_n: int = 2048
    batch_scale: int = 1
    batch: int | None = None
    width: float = 1.0
    input_size: str = "112x96"
    json: Path | None = None


def bench_model(
    arch: str,
    precision: str,
    device: torch.device,
    batch: int,
    min_seconds: float,
    width: float = 1.0,
    input_size: tuple[int, int] = INPUT_SIZE,
) -> dict[str, float | int | str]:
    """Images/s of inference and of a training step of ``arch`` (the paper's, or ``width`` x its filters at
    ``input_size``) on a random uint8 batch; MACs per image and achieved FLOP/s."""
    torch.manual_seed(0)
    cfg = preset(arch, num_identities=10575, width=width, input_size=input_size)
    model = FaceNet(cfg).to(device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    macs = count_macs(model)
    images = torch.randint(0, 256, (batch, *cfg.input_size, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, cfg.num_identities, (batch,), device=device)
    attrs = torch.randint(0, 2, (batch, len(cfg.attributes)), device=device).float()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def infer() -> None:
        with torch.inference_mode(), amp:
            model(to_input(images))

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def train_step() -> None:
        with amp:
            out = model(to_input(images))
        assert out.identity_logits is not None, "benchmark model has a classifier"
        loss = F.cross_entropy(out.identity_logits.float(), labels)
        loss = loss + 0.1 * F.mse_loss(torch.sigmoid(out.attribute_logits.float()), attrs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.eval()
    t_inf = seconds_per_call(infer, min_seconds, stat="mean", warmup=1)  # + the Timer's own warm-up call
    model.train()
    t_train = seconds_per_call(train_step, min_seconds, stat="mean", warmup=1)
    return {
        "model": arch,
        "precision": precision,
        "batch": batch,
        "macs_per_image": macs,
        "infer_images_per_s": batch / t_inf,
        "train_images_per_s": batch / t_train,
        "infer_flops": 2 * macs * batch / t_inf,
        "train_flops": 6 * macs * batch / t_train,
    }


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"input size must be HEIGHTxWIDTH such as 112x96, got {text!r}") from None
    return h, w


def run(cfg: ModelSpeedConfig) -> dict[str, Any]:
    """Measure the GEMM peak per precision, then every model x precision; writes ``cfg.json`` when set."""
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    precisions = cfg.precisions.split(",")
    peaks = {pr: gemm_flops(cfg.gemm_n, dtype=pr, device=device, min_run_time=cfg.min_seconds, stat="mean")
             for pr in precisions}  # fmt: skip
    rows = []
    for arch in cfg.models.split(","):
        for pr in precisions:
            batch = cfg.batch or PAPER_BATCH[arch] * cfg.batch_scale
            r = bench_model(arch, pr, device, batch, cfg.min_seconds, cfg.width, _size(cfg.input_size))
            r["gemm_peak_flops"] = peaks[pr]
            rows.append(r)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    result = {"device": name, "device_spec": str(device), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "width": cfg.width, "input_size": cfg.input_size,
              "gemm_peak_flops": peaks, "rows": rows,
              "provenance": provenance(config=config)}  # fmt: skip
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=1))
    return result


def format_report(result: dict[str, Any]) -> str:
    """The device line, the measured GEMM peaks and the markdown table of a :func:`run` result."""
    rows = []
    for r in result["rows"]:
        pk = float(r["gemm_peak_flops"])
        rows.append([r["model"], r["precision"], r["batch"], f"{int(r['macs_per_image']) / 1e9:.3f}",
                     f"{float(r['infer_images_per_s']):.1f}",
                     f"{float(r['infer_flops']) / 1e12:.3f} ({100 * float(r['infer_flops']) / pk:.0f} %)",
                     f"{float(r['train_images_per_s']):.1f}",
                     f"{float(r['train_flops']) / 1e12:.3f} ({100 * float(r['train_flops']) / pk:.0f} %)"])  # fmt: skip
    headers = ["model", "precision", "batch", "GMAC/img", "infer img/s", "infer TFLOP/s (% peak)", "train img/s",
               "train TFLOP/s (% peak)"]  # fmt: skip
    peaks = ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in result["gemm_peak_flops"].items())
    shape = (result.get("width", 1.0), result.get("input_size", "112x96"))
    models = "" if shape == (1.0, "112x96") else f"; models at width {shape[0]}, input {shape[1]}"
    return "\n".join([
        f"device: {result['device_spec']} ({result['device']}), torch {result['torch']}, threads {result['threads']}"
        + models,
        f"GEMM peak (measured): {peaks}",
        "",
        render_table(headers, rows, left=2),
    ])  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="full,fast")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--min-seconds", type=float, default=3.0, help="time each measurement at least this long")
    p.add_argument("--gemm-n", type=int, default=2048)
    p.add_argument("--batch-scale", type=int, default=1, help="multiply the paper's batch sizes (GPU saturation)")
    p.add_argument("--batch", type=int, default=None, help="images per batch instead of the paper's x --batch-scale")
    p.add_argument("--width", type=float, default=1.0, help="filter-count multiplier (1.0: the paper's models)")
    p.add_argument("--input-size", default="112x96", help="input HEIGHTxWIDTH (112x96: the paper's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result = run(ModelSpeedConfig(**vars(build_parser().parse_args(argv))))
    print(format_report(result))
    return result


if __name__ == "__main__":
    main()
