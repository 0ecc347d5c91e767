"""Render the layer table of ``ARCHITECTURE.md`` from the code (``python -m facesearch.model.architecture``).

A test regenerates the tables and compares them with the document, so the document cannot drift from the network.
"""

from __future__ import annotations

from facesearch.model.config import ModelConfig, preset
from facesearch.model.network import FaceNet, count_macs, count_parameters, stage_table


def markdown_stage_table(cfg: ModelConfig) -> str:
    """One row per trunk stage and head: output shape (C x H x W) and parameters."""
    lines = ["| # | stage | output shape | parameters |", "|---|---|---|---|"]
    for i, (name, shape, params) in enumerate(stage_table(cfg)):
        lines.append(f"| {i} | {name} | {' x '.join(str(s) for s in shape)} | {params:,} |")
    return "\n".join(lines)


def markdown_summary(num_identities: int = 10575) -> str:
    """Parameters and multiply-accumulates per image for every arch x head configuration at 112x96."""
    lines = ["| model | head | parameters | MACs / image (conv + FC) |", "|---|---|---|---|"]
    for arch in ("full", "fast", "variant"):
        for head in (1, 2, 3):
            model = FaceNet(preset(arch, head=head, num_identities=num_identities))
            lines.append(
                f"| {arch} | {head} | {count_parameters(model) / 1e6:.2f} M | {count_macs(model) / 1e9:.3f} G |"
            )
    return "\n".join(lines)


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
