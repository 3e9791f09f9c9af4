"""Loss terms of MAXL: primary, auxiliary (soft labels) and the entropy regulariser.

The auxiliary loss is written as ``mean_i sum_k t_ik * ell_ik(z_a)`` where ``ell`` is a
per-class loss matrix that does not depend on the labels ``t``. Keeping it linear in ``t``
is what lets :mod:`auxgen.meta` compute the exact meta-gradient with one Jacobian-vector
product instead of a double backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES", "Criterion", "per_class_loss", "primary_loss", "neg_entropy", "mean_entropy",
]  # fmt: skip

LOSSES = ("ce", "focal")


def per_class_loss(logits: Tensor, kind: str = "ce", gamma: float = 2.0) -> Tensor:
    """Loss of predicting each class, ``(N, C)``: the loss if the target were one-hot at ``k``.

    ``ce``: ``-log softmax(z)_k``; ``focal``: ``-(1 - p_k)**gamma * log p_k`` (Lin et al.,
    the form the MAXL paper uses), computed from ``log_softmax`` so it stays finite.
    """
    logp = torch.log_softmax(logits, dim=1)
    if kind == "ce":
        return -logp
    if kind == "focal":
        return -((1.0 - logp.exp()).pow(gamma)) * logp
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def primary_loss(logits: Tensor, y: Tensor, kind: str = "ce", gamma: float = 2.0) -> Tensor:
    """Mean primary loss over the batch (hard labels ``y``)."""
    if kind == "ce":
        return F.cross_entropy(logits, y)
    return per_class_loss(logits, kind, gamma).gather(1, y.unsqueeze(1)).mean()


@dataclass(frozen=True)
class Criterion:
    """The labeler's loss, chosen once: called on logits ``(R, K)`` it gives the per-class
    losses ``(R, K)`` a task's loss is made of; :meth:`primary` is the primary loss.

    Example:
        >>> criterion = Criterion("ce")
        >>> z = torch.zeros(2, 4)
        >>> criterion(z).shape, round(float(criterion.primary(z, torch.tensor([0, 1]))), 4)
        (torch.Size([2, 4]), 1.3863)
    """

    kind: str = "ce"
    gamma: float = 2.0

    def __call__(self, logits: Tensor) -> Tensor:
        return per_class_loss(logits, self.kind, self.gamma)

    def primary(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean primary loss of the batch (hard labels ``y``)."""
        return primary_loss(logits, y, self.kind, self.gamma)


def neg_entropy(t: Tensor) -> Tensor:
    """``sum_k pbar_k log pbar_k`` with ``pbar = t.mean(0)``; minimising it spreads the labels.

    Classes with ``pbar_k = 0`` contribute zero (``0 log 0 = 0``) with a finite gradient.
    """
    pbar = t.mean(0)
    return (pbar * torch.log(pbar.clamp_min(torch.finfo(pbar.dtype).tiny))).sum()


def mean_entropy(t: Tensor) -> Tensor:
    """``mean_n -sum_k t_nk log t_nk``: how uncertain the labels are, image by image.

    Minimising it makes each image's label confident; together with :func:`neg_entropy` (with
    equal weights) it is minus the mutual information between the image and its label.
    Entries with ``t_nk = 0`` (other classes' children) contribute zero with a finite gradient.
    """
    logt = torch.log(t.clamp_min(torch.finfo(t.dtype).tiny))
    return -(t * logt).sum(1).mean()
