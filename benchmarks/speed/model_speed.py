"""Forward and training throughput of the Full and Fast models against this machine's measured matmul peak.

    python -m facesearch.benchmarks.speed.model_speed [--device cpu|cuda] [--models full,fast] [--precisions fp32,bf16]
    [--json out.json]

For each model, batch size (the paper's: 40 Full, 48 Fast) and precision it reports images/s for inference
(``inference_mode``, eval) and for a training step (forward, eq. 2 loss, backward, SGD), the multiply-accumulates per
image, and the achieved FLOP/s (2 x MACs per image forward, 3 x that for a training step: backward ~ 2 x forward) as a
fraction of the GEMM peak measured in the same run with the same precision.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from facesearch.model.config import preset
from facesearch.model.network import FaceNet, count_macs, to_input

PAPER_BATCH = {"full": 40, "fast": 48, "variant": 48}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, min_seconds: float, warmup: int = 2) -> float:
    """Seconds per call: ``warmup`` untimed calls, then repeat until ``min_seconds`` have passed (at least 3 calls)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < min_seconds:
        fn()
        n += 1
    _sync(device)
    return (time.perf_counter() - start) / n


def gemm_peak(device: torch.device, dtype: torch.dtype, n: int, min_seconds: float) -> float:
    """Measured FLOP/s of an n x n x n matrix product in ``dtype`` (the practical matmul roofline)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sec = _time(lambda: torch.mm(a, b), device, min_seconds)
    return 2 * n**3 / sec


def bench_model(
    arch: str, precision: str, device: torch.device, batch: int, min_seconds: float
) -> dict[str, float | int | str]:
    torch.manual_seed(0)
    cfg = preset(arch, num_identities=10575)
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
    t_inf = _time(infer, device, min_seconds)
    model.train()
    t_train = _time(train_step, device, min_seconds)
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="full,fast")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--min-seconds", type=float, default=3.0, help="time each measurement at least this long")
    p.add_argument("--gemm-n", type=int, default=2048)
    p.add_argument("--batch-scale", type=int, default=1, help="multiply the paper's batch sizes (GPU saturation)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    peaks = {
        pr: gemm_peak(device, torch.float32 if pr == "fp32" else torch.bfloat16, args.gemm_n, args.min_seconds)
        for pr in args.precisions.split(",")
    }
    rows = []
    for arch in args.models.split(","):
        for pr in args.precisions.split(","):
            r = bench_model(arch, pr, device, PAPER_BATCH[arch] * args.batch_scale, args.min_seconds)
            r["gemm_peak_flops"] = peaks[pr]
            rows.append(r)
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {threads}")
    print("GEMM peak (measured): " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peaks.items()))
    print()
    print(
        "| model | precision | batch | GMAC/img | infer img/s | infer TFLOP/s (% peak) "
        "| train img/s | train TFLOP/s (% peak) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        pk = float(r["gemm_peak_flops"])
        print(
            f"| {r['model']} | {r['precision']} | {r['batch']} | {int(r['macs_per_image']) / 1e9:.3f} "
            f"| {float(r['infer_images_per_s']):.1f} | {float(r['infer_flops']) / 1e12:.3f} "
            f"({100 * float(r['infer_flops']) / pk:.0f} %) | {float(r['train_images_per_s']):.1f} "
            f"| {float(r['train_flops']) / 1e12:.3f} ({100 * float(r['train_flops']) / pk:.0f} %) |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "threads": threads, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
