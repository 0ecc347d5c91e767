"""MGMTN's Adaptive-Mask-Learning analogue: train :class:`facesearch.model.mgmtn.MaskNet` on analytic masks.

The paper labels its mask network's training faces with a 98-keypoint annotator; here each training image's own five
landmarks, carried into the crop by the alignment's exact transform
(:func:`facesearch.model.faces.masks.crop_landmarks`), draw its pseudo-label masks
(:func:`facesearch.model.faces.masks.group_masks`), mirrored together with the image for flips.  Binary
cross-entropy per pixel and group, Adam; the file (``OUT/mask_net.safetensors``) records the crop it reads and the
final loss.  A finished file is reused, so a resumed ``attributes train`` does not retrain it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facesearch.model.attributes import AttributeTrainConfig
from facesearch.model.checkpoint import load_checkpoint
from facesearch.model.device import autocast, autocast_dtype, resolve_device
from facesearch.model.faces.datasets import FaceDataset, FaceItem, Sample
from facesearch.model.faces.masks import crop_landmarks, flip_landmarks, group_masks
from facesearch.model.mgmtn import MaskNet, MgmtnConfig, mgmtn_config, save_mask_net
from facesearch.model.network import to_input
from facesearch.model.trainer_data import derive_seed

log = logging.getLogger(__name__)

MASK_NET_FILE = "mask_net.safetensors"
#: Adam's learning rate for the mask network.
MASK_LR = 2e-3


def train_mask_net(cfg: AttributeTrainConfig, samples: list[Sample], out: Path) -> Path:
    """Train a :class:`MaskNet` for ``cfg.mask_iterations`` steps on the ``samples`` that carry landmarks (see the
    module docstring); returns ``out / mask_net.safetensors`` (reused when it exists)."""
    path = Path(out) / MASK_NET_FILE
    if path.is_file():
        load_checkpoint(path)  # verifies the checksum: a damaged file is an error, not a silent retrain
        log.info("reusing the mask network %s", path)
        return path
    usable = [s for s in samples if s.landmarks is not None]
    if len(usable) < 2:
        raise ValueError(f"{cfg.data}: learned masks need training images with landmarks (the CelebA landmark file); "
                         f"{len(usable)} of {len(samples)} have them")  # fmt: skip
    margin = cfg.resolved_crop == "margin"
    trunk = mgmtn_config(cfg.train_config().model_config(0))
    size = tuple(trunk.input_size)
    lms = np.stack([crop_landmarks(np.asarray(s.landmarks), cfg.input_size, margin) for s in usable])
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(device, cfg.precision)
    torch.manual_seed(derive_seed("mask_net", cfg.seed))
    net = MaskNet().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=MASK_LR)
    batch = cfg.batch_size or 32
    gen = torch.Generator().manual_seed(derive_seed("mask_batches", cfg.seed))
    picks = torch.randint(len(usable), (cfg.mask_iterations, batch), generator=gen)
    flips = torch.rand(cfg.mask_iterations, batch, generator=gen) < 0.5
    ds = FaceDataset(usable, size=cfg.input_size, margin=margin, attributes=cfg.attributes)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=picks.tolist(), num_workers=cfg.resolved_workers,
                                         collate_fn=list)  # fmt: skip
    t0, loss_value = time.perf_counter(), float("nan")
    net.train()
    for step, items in enumerate(loader):
        faces = [it for it in items if isinstance(it, FaceItem)]
        if len(faces) < 2:
            continue
        flip = flips[step, : len(faces)].numpy()
        images = np.stack([f.image[:, ::-1] if fl else f.image for f, fl in zip(faces, flip, strict=True)])
        marks = np.stack([flip_landmarks(lms[f.index], size[1]) if fl else lms[f.index]
                          for f, fl in zip(faces, flip, strict=True)])  # fmt: skip
        target = group_masks(marks, size).to(device)  # type: ignore[arg-type]
        x = to_input(torch.from_numpy(np.ascontiguousarray(images)).to(device))
        with autocast(device, dtype):
            logits = net.logits(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if step % 50 == 0:
            log.info("mask network step %d/%d: BCE %.4f", step, cfg.mask_iterations, loss_value)
    seconds = round(time.perf_counter() - t0, 2)
    mcfg = MgmtnConfig(cfg.fusion, "learned", cfg.input_size, margin)
    save_mask_net(path, net.cpu().eval(), trunk, mcfg, {"iterations": cfg.mask_iterations, "final_bce": loss_value,
                                                         "images": len(usable), "seconds": seconds})  # fmt: skip
    log.info("wrote %s (BCE %.4f after %d steps, %.0f s)", path, loss_value, cfg.mask_iterations, seconds)
    return path


__all__ = ["MASK_NET_FILE", "train_mask_net"]
