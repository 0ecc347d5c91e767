"""Render the layer table of ``ARCHITECTURE.md`` from the code (``python -m facesearch.model.architecture``).

A test regenerates the tables and compares them with the document, so the document cannot drift from the network.
"""

from __future__ import annotations

from facesearch.model.config import ModelConfig, preset
from facesearch.model.network import FaceNet, count_macs, count_parameters, stage_table
from facesearch.model.tables import render_table


def markdown_stage_table(cfg: ModelConfig) -> str:
    """One row per trunk stage and head: output shape (C x H x W) and parameters."""
    rows = [
        [i, name, " x ".join(str(s) for s in shape), f"{params:,}"]
        for i, (name, shape, params) in enumerate(stage_table(cfg))
    ]
    return render_table(["#", "stage", "output shape", "parameters"], rows, left=3)


def markdown_summary(num_identities: int = 10575) -> str:
    """Parameters and multiply-accumulates per image for every arch x head configuration at 112x96."""
    rows = []
    for arch in ("full", "fast", "variant"):
        for head in (1, 2, 3):
            model = FaceNet(preset(arch, head=head, num_identities=num_identities))
            rows.append([arch, head, f"{count_parameters(model) / 1e6:.2f} M", f"{count_macs(model) / 1e9:.3f} G"])
    return render_table(["model", "head", "parameters", "MACs / image (conv + FC)"], rows, left=2)


def render() -> str:
    return "\n\n".join(
        [
            "### Full-Model, configuration 1, P = 10,575 (CASIA-WebFace)",
            markdown_stage_table(preset("full", num_identities=10575)),
            "### Fast-Model, configuration 1, P = 10,575",
            markdown_stage_table(preset("fast", num_identities=10575)),
            "### Every model and head configuration",
            markdown_summary(),
        ]
    )


if __name__ == "__main__":
    print(render())
