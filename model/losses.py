"""Training objectives: the paper's multi-task loss (eq. 2) and MOON's re-balanced attribute loss.

Everything here runs in float32 whatever the autocast dtype of the forward pass: logits are cast on entry.  Unknown
labels are masked, never imputed: an identity of ``-1`` and an attribute label of ``NaN`` contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from facesearch.model.network import Outputs

ATTRIBUTE_LOSSES: tuple[str, ...] = ("mse", "moon")


def attribute_mse(attribute_logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean squared error between ``sigmoid(attribute_logits)`` and 0/1 ``labels`` over the known labels only.

    ``attribute_logits``: (B, M) any float dtype; ``labels``: (B, M) float32, NaN = unknown; ``weights``: optional
    (B, M) float32 per-label weights.  The mean is over the number of known labels (not the sum of weights), so unit
    weights reproduce the plain MSE.  Returns a float32 scalar (0 when nothing is known).
    """
    if attribute_logits.shape != labels.shape:
        raise ValueError(f"attribute logits {tuple(attribute_logits.shape)} and labels {tuple(labels.shape)} differ")
    known = ~torch.isnan(labels)
    p = torch.sigmoid(attribute_logits.float())
    err = (p - torch.nan_to_num(labels.float(), nan=0.0)) ** 2
    if weights is not None:
        err = err * weights
    # Masked sum over a clamped count: no host sync, and an all-unknown batch gives 0 (still on the graph).
    return torch.where(known, err, torch.zeros_like(err)).sum() / known.sum().clamp_min(1)


def moon_weights(labels: Tensor, source_positive_rate: Tensor, target_positive_rate: float | Tensor = 0.5) -> Tensor:
    """MOON's per-label weights (Rudd, Günther & Boult, ECCV 2016): re-weight positives and negatives of each
    attribute so the *effective* label distribution equals a target distribution.

    For attribute ``i`` with source (training-set) positive rate ``S_i`` and target rate ``T_i``::

        T_i >= S_i (positives are the minority):  w+ = 1,  w- = S_i (1 - T_i) / ((1 - S_i) T_i)
        T_i <  S_i (positives are the majority):  w- = 1,  w+ = T_i (1 - S_i) / (S_i (1 - T_i))

    i.e. the majority side is down-weighted by the odds ratio, so ``w+ S / (w+ S + w- (1 - S)) = T`` exactly, and no
    weight ever exceeds 1 (gradients stay bounded, as in MOON, which drops majority samples with that probability).
    For ``S = 0.2, T = 0.5``: ``w+ = 1``, ``w- = 0.25``, effective positive share 0.5.

    ``labels``: (B, M) 0/1/NaN; ``source_positive_rate``: (M,) in [0, 1]; ``target_positive_rate``: scalar or (M,) in
    (0, 1).  Returns (B, M) float32 weights (NaN labels get weight 1; they are masked by the loss anyway).  An
    attribute with no positives (or no negatives) in the source keeps weight 1 for the class it has.
    """
    s_pos = source_positive_rate.to(device=labels.device, dtype=torch.float32)
    t_pos = torch.as_tensor(target_positive_rate, dtype=torch.float32, device=labels.device).expand_as(s_pos)
    if not bool(((t_pos > 0) & (t_pos < 1)).all()):
        raise ValueError(f"target_positive_rate must be in (0, 1), got {target_positive_rate}")
    s = s_pos.clamp(1e-12, 1 - 1e-12)
    odds = (t_pos * (1 - s)) / (s * (1 - t_pos))  # target odds / source odds of a positive
    w_pos = torch.where(odds >= 1, torch.ones_like(s), odds)
    w_neg = torch.where(odds >= 1, 1 / odds, torch.ones_like(s))
    return torch.where(labels > 0.5, w_pos.expand_as(labels), w_neg.expand_as(labels))


def moon_loss(
    attribute_logits: Tensor,
    labels: Tensor,
    target_positive_rate: float | Tensor = 0.5,
    source_positive_rate: Tensor | None = None,
) -> Tensor:
    """MOON's mixed objective on sigmoid probabilities: ``mean over known labels of w_i(y) * (sigmoid(z) - y)^2``.

    MOON regresses linear outputs to ±1; we keep the paper's sigmoid-probability MSE (so λ1 keeps its meaning) and
    apply MOON's re-weighting from :func:`moon_weights`.  ``source_positive_rate`` (M,) defaults to the positive rate
    of the known labels in this batch; pass the training-set rates for a stable objective.  Float32 scalar.
    """
    if source_positive_rate is None:
        known = ~torch.isnan(labels)
        pos = torch.where(known, labels, torch.zeros_like(labels)).sum(0)
        source_positive_rate = pos / known.sum(0).clamp_min(1)
    weights = moon_weights(labels, source_positive_rate, target_positive_rate)
    return attribute_mse(attribute_logits, labels, weights)


def identity_cross_entropy(identity_logits: Tensor, identities: Tensor) -> Tensor:
    """Softmax cross-entropy over the samples with a known identity (``-1`` = unknown, masked).

    ``identity_logits``: (B, P) any float dtype; ``identities``: (B,) int64.  Float32 scalar (0 when none known).
    """
    known = identities >= 0
    total = F.cross_entropy(identity_logits.float(), identities, ignore_index=-1, reduction="sum")
    return total / known.sum().clamp_min(1)


#: Margin of :func:`similarity_loss` between the L2-normalised features of different people (distances lie in
#: [0, 2]; 1.0 asks them to be at least as far apart as orthogonal vectors).
SIMILARITY_MARGIN = 1.0


def similarity_loss(features: Tensor, identities: Tensor, margin: float = SIMILARITY_MARGIN) -> Tensor:
    """DeepID2's verification signal, as LNets+ANet's identity pretraining uses it (ATTRIBUTE_MODELS.md §1): over
    the pairs of a batch with known identities, ``d²/2`` for two images of one person and ``max(0, margin - d)²/2``
    for two people, ``d`` the distance of the L2-normalised features; the mean over pairs (0 without a pair).  Float32
    whatever the autocast dtype."""
    f = F.normalize(features.float(), dim=1, eps=1e-12)
    known = identities >= 0
    f, ids = f[known], identities[known]
    if f.shape[0] < 2:
        return features.float().sum() * 0.0
    d = torch.cdist(f, f).clamp_min(0)
    same = ids[:, None] == ids[None, :]
    upper = torch.triu(torch.ones_like(same), diagonal=1)
    per_pair = torch.where(same, 0.5 * d**2, 0.5 * (margin - d).clamp_min(0) ** 2)
    return per_pair[upper].mean()


def multitask_loss(
    outputs: Outputs,
    identities: Tensor,
    attributes: Tensor,
    lambda1: float,
    lambda2: float,
    attribute_loss: str = "mse",
    source_positive_rate: Tensor | None = None,
    target_positive_rate: float = 0.5,
    similarity: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The paper's eq. 2: ``λ1 · L_attr + λ2 · L_identity``.

    ``L_attr`` is the MSE between sigmoid attribute scores and 0/1 labels (``attribute_loss="mse"``) or MOON's
    re-weighted MSE (``"moon"``, see :func:`moon_loss`); ``L_identity`` the softmax cross-entropy of the identity
    classifier.  ``identities``: (B,) int64 with -1 unknown; ``attributes``: (B, M) float32 with NaN unknown.  A term
    whose λ is 0 is not computed at all (stage 1 trains identity only).  Returns ``(total, parts)`` where ``parts`` maps
    ``"attribute"`` / ``"identity"`` to the unweighted float32 scalar of each computed term (detached).
    ``similarity`` > 0 adds ``similarity · lambda2 ·`` :func:`similarity_loss` to the identity term (part
    ``"similarity"``).
    """
    if attribute_loss not in ATTRIBUTE_LOSSES:
        raise ValueError(f"unknown attribute_loss {attribute_loss!r}; valid: {list(ATTRIBUTE_LOSSES)}")
    if lambda1 < 0 or lambda2 < 0 or lambda1 == lambda2 == 0:
        raise ValueError(f"lambda1, lambda2 must be >= 0 and not both 0, got {lambda1}, {lambda2}")
    terms: list[Tensor] = []
    parts: dict[str, Tensor] = {}
    if lambda1 > 0:
        if attribute_loss == "moon":
            la = moon_loss(outputs.attribute_logits, attributes, target_positive_rate, source_positive_rate)
        else:
            la = attribute_mse(outputs.attribute_logits, attributes)
        terms.append(lambda1 * la)
        parts["attribute"] = la.detach()
    if lambda2 > 0:
        if outputs.identity_logits is None:
            raise ValueError("lambda2 > 0 needs an identity classifier (the model was built with num_identities=0)")
        li = identity_cross_entropy(outputs.identity_logits, identities)
        terms.append(lambda2 * li)
        parts["identity"] = li.detach()
        if similarity > 0:
            ls = similarity_loss(outputs.features, identities)
            terms.append(similarity * lambda2 * ls)
            parts["similarity"] = ls.detach()
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total, parts


__all__ = [
    "ATTRIBUTE_LOSSES",
    "attribute_mse",
    "identity_cross_entropy",
    "moon_loss",
    "moon_weights",
    "multitask_loss",
    "similarity_loss",
]
