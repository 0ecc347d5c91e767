"""End-to-end speed of the synthetic face generator: images/s for 1 and 2 workers (render + encode + atomic write).

    .venv/bin/python -m facesearch.benchmarks.speed.synth_speed [--images 2000] [--workers 1,2] [--repeats 2] [--size
    128]
    facesearch bench speed synth ...   (the same options)

Every run writes a fresh data set with all three layouts in default-like proportions (half CASIA, a quarter CelebA,
a quarter MegaFace probes + distractors) into a temporary directory, and includes planning, pool start-up, list files
and the manifest.  The best of ``--repeats`` runs is reported (the machine is shared; the best run is the least
disturbed one).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facesearch.model.faces.synth import SynthConfig, generate_faces
from facesearch.model.provenance import provenance
from facesearch.model.tables import render_table


@dataclass(frozen=True)
class SynthSpeedConfig:
    """The options of the run (one field per command-line option); ``workers``: comma-separated worker counts."""

    images: int = 2000
    workers: str = "1,2"
    repeats: int = 2
    size: int = 128


def bench_config(out: Path, images: int, size: int, workers: int) -> SynthConfig:
    """A config of about ``images`` images: 1/2 CASIA (10 per identity), 1/4 CelebA, 1/4 MegaFace."""
    casia_ids = max(2, images // 20)
    probes = max(1, images // 40)
    return SynthConfig(
        out=out,
        seed=0,
        identities=casia_ids,
        images_per_identity=10,
        celeba_images=max(1, images // 4),
        probe_identities=probes,
        probe_images_per_identity=5,
        distractors=max(1, images // 4 - 5 * probes),
        size=size,
        workers=workers,
    )


def time_workers(
    images: int = 2000, workers: tuple[int, ...] = (1, 2), repeats: int = 2, size: int = 128
) -> list[dict[str, float]]:
    """Time ``generate_faces`` per worker count: rows of workers, images, seconds, images_per_s, ms_per_image."""
    rows = []
    for w in workers:
        best = None
        for _ in range(repeats):
            tmp = Path(tempfile.mkdtemp(prefix="synth_speed_"))
            try:
                summary = generate_faces(bench_config(tmp / "out", images, size, w))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if best is None or summary.seconds < best.seconds:
                best = summary
        assert best is not None, "repeats must be >= 1"
        summary = best
        n = sum(summary.images.values())
        rows.append(
            {
                "workers": w,
                "images": n,
                "seconds": summary.seconds,
                "images_per_s": n / summary.seconds,
                "ms_per_image": 1e3 * summary.seconds / n,
            }
        )
    return rows


def run(cfg: SynthSpeedConfig) -> dict[str, Any]:
    """The timed rows (:func:`time_workers`) with the 1-minute load average before and after and the provenance."""
    workers = tuple(int(w) for w in cfg.workers.split(","))
    if cfg.repeats < 1 or not workers or min(workers) < 1:
        raise ValueError(f"repeats and worker counts must be >= 1, got repeats={cfg.repeats}, workers={cfg.workers!r}")
    load = os.getloadavg()[0]
    rows = time_workers(cfg.images, workers, cfg.repeats, cfg.size)
    return {"cpus": os.cpu_count(), "arch": platform.machine(), "size": cfg.size, "load_before": load,
            "load_after": os.getloadavg()[0], "rows": rows,
            "provenance": provenance(config=dataclasses.asdict(cfg))}  # fmt: skip


def format_table(rows: list[dict[str, float]]) -> str:
    """A fixed-width text table of :func:`time_workers` rows."""
    cells = [[f"{r['workers']:.0f}", f"{r['images']:.0f}", f"{r['seconds']:.2f}", f"{r['images_per_s']:.0f}",
              f"{r['ms_per_image']:.2f}"] for r in rows]  # fmt: skip
    return render_table(["workers", "images", "seconds", "images/s", "ms/image"], cells, fmt="text", left=0)


def format_report(result: dict[str, Any]) -> str:
    """The machine line and the table of a :func:`run` result."""
    head = (f"synthetic faces, end to end: {result['cpus']} CPUs ({result['arch']}), canvas {result['size']}, "
            f"1-min load average {result['load_before']:.2f} before / {result['load_after']:.2f} after (other work "
            "on a shared machine)")  # fmt: skip
    return head + "\n" + format_table(result["rows"])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="images per run (all three layouts)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--repeats", type=int, default=2, help="runs per worker count; the best is reported")
    ap.add_argument("--size", type=int, default=128, help="CASIA/MegaFace canvas side in pixels")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result = run(SynthSpeedConfig(**vars(build_parser().parse_args(argv))))
    print(format_report(result))
    return result


if __name__ == "__main__":
    main()
