"""Checks of what a user passes to a step: one message naming the argument, the expectation
and the value, instead of a deep stack trace or silent garbage."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from .mirror import check_optimizer, is_mirrored

__all__ = [
    "check_batch",
    "check_grad_enabled",
    "check_step_options",
    "check_meta_batch",
    "check_choice",
    "check_optimizers",
    "check_positive_int",
]


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError`` naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is a positive int (not a bool), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


#: ``nonfinite=`` values of the labeler.
NONFINITE = ("raise", "skip")


def check_step_options(
    loss: Any,
    meta: Any,
    lookahead: Any,
    nonfinite: Any,
    meta_every: Any,
    diagnostics: Any,
    fd_eps: Any,
) -> tuple[str, str, str, str, int, bool, Optional[float]]:
    """The labeler's step options, checked once, at construction (names as its arguments)."""
    from .losses import LOSSES
    from .meta import META_MODES
    from .mirror import LOOKAHEADS

    choices = [
        check_choice(name, value, allowed)
        for name, value, allowed in (
            ("loss", loss, LOSSES),
            ("meta", meta, META_MODES),
            ("lookahead", lookahead, LOOKAHEADS),
            ("nonfinite", nonfinite, NONFINITE),
        )
    ]
    if not isinstance(diagnostics, bool):
        raise TypeError(f"diagnostics must be a bool, got {type(diagnostics).__name__}")
    if fd_eps is not None and not (isinstance(fd_eps, float) and fd_eps > 0):
        raise ValueError(f"fd_eps must be a positive float or None, got {fd_eps!r}")
    every = check_positive_int("meta_every", meta_every)
    return (*choices, every, diagnostics, fd_eps)  # type: ignore[return-value]


def check_grad_enabled(what: str) -> None:
    """A training call needs autograd: refuse ``torch.no_grad()`` / ``inference_mode()``."""
    if not torch.is_grad_enabled():
        raise RuntimeError(
            f"{what} trains, so it needs gradients: it was called under torch.no_grad() or "
            "torch.inference_mode(); call it outside them (to evaluate, use labeler(x), or "
            "labeler(x, y) in eval mode)"
        )


def check_batch(
    x: Any, y: Any, num_classes: int, device: torch.device, what: str = "len(psi)"
) -> tuple[Tensor, Tensor]:
    """A batch ``(x, y)``: tensors with one integer label in ``[0, num_classes)`` per sample.

    Args:
        x: the inputs (any shape with the batch first).
        y: the primary labels.
        num_classes: number of primary classes.
        device: where the labels are moved (the labeler's device).
        what: how the message names where ``num_classes`` comes from.

    Returns:
        ``x`` and ``y`` as ``long`` on ``device``.

    Example:
        >>> x, y = check_batch(torch.zeros(2, 3), torch.tensor([0, 2]), 3, torch.device("cpu"))
        >>> y.dtype
        torch.int64
        >>> check_batch(torch.zeros(2, 3), torch.tensor([0, 3]), 3, torch.device("cpu"))
        Traceback (most recent call last):
        ...
        ValueError: y must lie in [0, 3) (len(psi)=3), got 3
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a Tensor of class indices, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class indices, got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"y must be 1-D (batch,), got shape {tuple(y.shape)}")
    if x.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same batch size, got x.shape={tuple(x.shape)} and "
            f"y.shape={tuple(y.shape)}"
        )
    if y.numel() == 0:
        raise ValueError("the batch is empty (y has 0 elements)")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"y must lie in [0, {num_classes}) ({what}={num_classes}), got {bad}")
    return x, y.to(device=device, dtype=torch.long)


def check_meta_batch(
    meta_batch: Any, x: Tensor, num_classes: int, device: torch.device, what: str = "len(psi)"
) -> Optional[tuple[Tensor, Tensor]]:
    """``meta_batch``: ``None`` or a pair ``(x_m, y_m)`` checked like a batch, shaped like ``x``."""
    if meta_batch is None:
        return None
    if not isinstance(meta_batch, (tuple, list)) or len(meta_batch) != 2:
        raise TypeError(
            "meta_batch must be a pair (x_m, y_m) of tensors, got "
            f"{type(meta_batch).__name__}"
            + (f" of length {len(meta_batch)}" if isinstance(meta_batch, (tuple, list)) else "")
        )
    try:
        x_m, y_m = check_batch(*meta_batch, num_classes, device, what)
    except (TypeError, ValueError) as e:
        raise type(e)(f"meta_batch: {e}") from None
    if x_m.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"meta_batch: x_m must have the per-sample shape of x {tuple(x.shape[1:])}, "
            f"got {tuple(x_m.shape[1:])}"
        )
    return x_m, y_m


def check_optimizers(
    optimizer: Any,
    gen_optimizer: Any,
    model_parameters: Sequence[Tensor],
    generator_parameters: Sequence[Tensor],
    lookahead: str,
    warned: set[type],
    meta: bool = True,
    *,
    required: Sequence[Tensor] = (),
    owner: str = "model_parameters()",
) -> None:
    """The step's optimisers: supported (see :func:`auxgen.mirror.check_optimizer`) and over
    the right parameters; warns once per optimiser type approximated by ``lookahead="sgd"``
    (the types already warned about are in ``warned``). Without a learned task (``meta``
    False) nothing is looked ahead through, and any ``torch.optim`` optimiser is fine.
    ``optimizer`` must hold every parameter in ``required`` (the auxiliary heads), else they
    would silently stay untrained; ``owner`` names ``model_parameters`` in messages."""
    check_optimizer(
        optimizer, model_parameters, argname="optimizer", owner=owner,
        mirrored=meta, lookahead=lookahead,
    )  # fmt: skip
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [p for p in required if id(p) not in held]
    if missing:
        raise ValueError(
            f"optimizer does not hold {len(missing)} parameter(s) of the auxiliary heads "
            "(labeler.aux_heads), so the auxiliary tasks would stay untrained; build it over "
            "labeler.model_parameters() (or labeler.parameters() for the loss form), not "
            "model.parameters()"
        )
    if meta and not is_mirrored(optimizer) and type(optimizer) not in warned:
        warned.add(type(optimizer))
        warnings.warn(
            f"{type(optimizer).__name__} is not mirrored exactly: the meta-gradient's "
            "look-ahead is plain SGD at each group's current learning rate "
            '(lookahead="sgd", the MAXL paper\'s approximation)',
            UserWarning,
            stacklevel=3,  # the user's labeler.step(...) call
        )
    if gen_optimizer is not None:
        check_optimizer(
            gen_optimizer, generator_parameters, argname="gen_optimizer",
            owner="generator_parameters()", mirrored=False,
        )  # fmt: skip
