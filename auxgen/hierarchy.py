"""Auxiliary-class hierarchies: ``psi``, the owner index and the masked softmax.

Primary class ``i`` owns ``psi[i]`` *consecutive* auxiliary classes, so the auxiliary
classes of primary class ``i`` are ``range(offsets[i], offsets[i] + psi[i])`` with
``offsets = cumsum([0] + psi[:-1])``. ``owner[k]`` is the primary class that owns
auxiliary class ``k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "normalize_psi",
    "owner_index",
    "psi_offsets",
    "children_mask",
    "masked_log_softmax",
    "masked_softmax",
]


def normalize_psi(
    psi: Union[int, Sequence[int], Tensor], num_classes: Optional[int] = None
) -> tuple[int, ...]:
    """Validate ``psi`` and return it as a tuple of positive ints.

    Args:
        psi: auxiliary classes per primary class: a sequence with one entry per primary
            class, or a single int used for every class (then ``num_classes`` is required).
        num_classes: number of primary classes; when given, ``len(psi)`` must match it.

    Returns:
        ``psi`` as a tuple of ints.

    Raises:
        TypeError: if ``psi`` is not an int or a sequence of ints.
        ValueError: if an entry is not positive or the length does not match ``num_classes``.

    Example:
        >>> normalize_psi(5, num_classes=3)
        (5, 5, 5)
        >>> normalize_psi([2, 3, 4])
        (2, 3, 4)
    """
    if isinstance(psi, Tensor):
        psi = psi.tolist()
    if isinstance(psi, bool):
        raise TypeError(f"psi must be an int or a sequence of ints, got {psi!r}")
    if isinstance(psi, int):
        if num_classes is None:
            raise ValueError(
                f"psi={psi} is a single int, so num_classes is required to expand it "
                "(pass num_classes= or a list with one entry per primary class)"
            )
        psi = [psi] * int(num_classes)
    if not isinstance(psi, Sequence) or isinstance(psi, (str, bytes)):
        raise TypeError(f"psi must be an int or a sequence of ints, got {type(psi).__name__}")
    out = []
    for i, p in enumerate(psi):
        if isinstance(p, bool) or not isinstance(p, int):
            if isinstance(p, float) and p.is_integer():
                p = int(p)
            else:
                raise TypeError(f"psi[{i}] must be an int, got {p!r}")
        if p <= 0:
            raise ValueError(f"psi entries must be positive, got psi[{i}]={p}")
        out.append(int(p))
    if not out:
        raise ValueError("psi must have at least one entry, got an empty sequence")
    if num_classes is not None and len(out) != num_classes:
        raise ValueError(
            f"psi must have one entry per primary class (num_classes={num_classes}), got {len(out)}"
        )
    return tuple(out)


def psi_offsets(psi: Sequence[int]) -> tuple[int, ...]:
    """First auxiliary class of each primary class.

    Example:
        >>> psi_offsets([2, 3, 4])
        (0, 2, 5)
    """
    offsets, total = [], 0
    for p in psi:
        offsets.append(total)
        total += p
    return tuple(offsets)


def owner_index(psi: Sequence[int], device: Optional[torch.device] = None) -> Tensor:
    """Primary class that owns each auxiliary class, shape ``(sum(psi),)``.

    Example:
        >>> owner_index([2, 3]).tolist()
        [0, 0, 1, 1, 1]
    """
    return torch.repeat_interleave(
        torch.arange(len(psi), device=device), torch.tensor(list(psi), device=device)
    )


def children_mask(y: Tensor, owner: Tensor) -> Tensor:
    """Boolean mask ``(N, sum(psi))``: ``True`` where auxiliary class ``k`` is a child of ``y``."""
    return owner.unsqueeze(0) == y.unsqueeze(1)


def masked_log_softmax(logits: Tensor, y: Tensor, owner: Tensor) -> Tensor:
    """Log-softmax over the auxiliary classes owned by each sample's primary class.

    Entries outside ``y``'s children are ``-inf`` (their probability is exactly zero and
    they receive no gradient); the children are normalised in log space, so logits of any
    finite magnitude stay finite.

    Args:
        logits: ``(N, sum(psi))`` generator logits.
        y: ``(N,)`` primary labels.
        owner: ``(sum(psi),)`` owner index from :func:`owner_index`.

    Returns:
        ``(N, sum(psi))`` log-probabilities.
    """
    mask = children_mask(y, owner)
    return torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=1)


def masked_softmax(logits: Tensor, y: Tensor, owner: Tensor) -> Tensor:
    """Softmax restricted to the children of ``y``; exactly zero elsewhere.

    Example:
        >>> owner = owner_index([2, 3])
        >>> t = masked_softmax(torch.zeros(2, 5), torch.tensor([0, 1]), owner)
        >>> t.tolist()[0]
        [0.5, 0.5, 0.0, 0.0, 0.0]
        >>> [round(v, 4) for v in t.tolist()[1]]
        [0.0, 0.0, 0.3333, 0.3333, 0.3333]
    """
    return masked_log_softmax(logits, y, owner).exp()
