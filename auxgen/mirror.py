"""A differentiable mirror of a live ``torch.optim`` optimiser.

MAXL's meta-gradient needs the multi-task network's *next* parameters,
``theta_plus = step(theta, G, state)``, as a differentiable function of the gradient ``G``.
:func:`lookahead` computes that step exactly as ``torch.optim`` would (same learning rate,
momentum, dampening, Nesterov, weight decay, betas, eps, and the optimiser's **current**
state: momentum buffers, Adam moments and step counts), without touching the optimiser.

Adam and AdamW use torchopt's functional ``scale_by_adam`` transform, fed the optimiser's
own moments and step counts, with a tiny ``eps_root`` inside the square root so that the
look-ahead stays differentiable where a gradient is exactly zero (``d sqrt(v)/dv`` is
infinite at ``v = 0``; ``eps_root`` keeps it finite and leaves the value unchanged to the
dtype's precision). SGD is written out directly: torchopt's ``trace`` keeps a hidden
"first call" flag in a closure and so cannot start from an existing momentum buffer.

Every supported update is elementwise in ``G``; :mod:`auxgen.meta` relies on that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torchopt.transform.scale_by_adam import ScaleByAdamState, scale_by_adam

__all__ = ["SUPPORTED_OPTIMIZERS", "check_optimizer", "lookahead", "sgd_jacobian"]

SUPPORTED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
)


def _kind(optimizer: torch.optim.Optimizer) -> str:
    # AdamW subclasses Adam in recent torch: test it first.
    if isinstance(optimizer, torch.optim.AdamW):
        return "adamw"
    if isinstance(optimizer, torch.optim.Adam):
        return "adam"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    raise TypeError(
        "optimizer must be one of "
        f"{', '.join('torch.optim.' + c.__name__ for c in SUPPORTED_OPTIMIZERS)}, "
        f"got {type(optimizer).__module__}.{type(optimizer).__name__}"
    )


def check_optimizer(
    optimizer: Any, allowed: Iterable[Tensor], *, argname: str, owner: str, mirrored: bool
) -> None:
    """Check that ``optimizer`` is supported and only holds parameters from ``allowed``.

    Args:
        optimizer: the optimiser to check.
        allowed: parameters the optimiser may hold.
        argname: argument name used in error messages (``"optimizer"``).
        owner: what ``allowed`` is, for error messages (``"model_parameters()"``).
        mirrored: whether :func:`lookahead` must mirror it (then only the supported
            optimisers and options are accepted; any ``torch.optim`` optimiser otherwise).

    Raises:
        TypeError: if it is not a supported ``torch.optim`` optimiser.
        ValueError: if it holds a foreign parameter or an unsupported option.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"{argname} must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    kind = _kind(optimizer) if mirrored else None
    allowed_ids = {id(p) for p in allowed}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in allowed_ids:
                raise ValueError(
                    f"{argname} holds a parameter of shape {tuple(p.shape)} (param_groups[{gi}]) "
                    f"that is not one of the labeler's {owner}; build it from "
                    f"labeler.{owner}"
                )
        if kind in ("adam", "adamw") and group.get("amsgrad", False):
            raise ValueError(f"{argname}: Adam(amsgrad=True) is not supported, got amsgrad=True")


def _groups_by_param(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    """``id(param) -> its param group``."""
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def _f(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _sgd(group: dict, state: dict, p: Tensor, theta: Tensor, g: Tensor) -> Tensor:
    lr, mom = _f(group["lr"]), _f(group["momentum"])
    damp, wd = _f(group["dampening"]), _f(group["weight_decay"])
    d = g + wd * theta if wd != 0 else g
    if mom != 0:
        buf = state.get(p, {}).get("momentum_buffer")
        buf = d if buf is None else buf * mom + (1.0 - damp) * d
        d = d + mom * buf if group["nesterov"] else buf
    return theta - lr * d


def _adam(
    group: dict,
    state: dict,
    params: Sequence[Tensor],
    thetas: Sequence[Tensor],
    grads: Sequence[Tensor],
    decoupled: bool,
) -> list[Tensor]:
    lr, wd, eps = _f(group["lr"]), _f(group["weight_decay"]), _f(group["eps"])
    b1, b2 = (_f(b) for b in group["betas"])
    mus, nus, counts = [], [], []
    gs = []
    for p, th, g in zip(params, thetas, grads):
        st = state.get(p, {})
        if wd != 0 and not decoupled:
            g = g + wd * th
        gs.append(g)
        mus.append(st["exp_avg"] if "exp_avg" in st else torch.zeros_like(th))
        nus.append(st["exp_avg_sq"] if "exp_avg_sq" in st else torch.zeros_like(th))
        step = int(_f(st["step"])) if "step" in st else 0
        counts.append(torch.tensor(step, dtype=torch.int64, device=th.device))
    eps_root = torch.finfo(thetas[0].dtype).tiny
    tx = scale_by_adam.impl(b1=b1, b2=b2, eps=eps, eps_root=eps_root)  # type: ignore[attr-defined]
    updates, _ = tx.update(
        tuple(gs),
        ScaleByAdamState(mu=tuple(mus), nu=tuple(nus), count=tuple(counts)),
        inplace=False,
    )
    out = []
    for th, u in zip(thetas, updates):
        if decoupled and wd != 0:
            th = th * (1.0 - lr * wd)
        out.append(th - lr * u)
    return out


def lookahead(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    thetas: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
) -> list[Tensor]:
    """One differentiable step of ``optimizer``, without changing the optimiser.

    Args:
        optimizer: a supported ``torch.optim`` optimiser holding ``params``.
        params: the live parameters (used to find each one's group and state).
        thetas: their values to step from (usually ``p.detach()``); the result is
            differentiable with respect to them and to ``grads``.
        grads: the gradients; ``None`` means no gradient (the parameter does not move,
            as in ``torch.optim``).

    Returns:
        The stepped values, one per parameter.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=0.5)
        >>> lookahead(opt, [w], [w.detach()], [torch.tensor([1.0, -1.0])])[0].tolist()
        [0.5, 1.5]
    """
    kind = _kind(optimizer)
    where = _groups_by_param(optimizer)
    out: list[Optional[Tensor]] = list(thetas)
    adam_batches: dict[int, list[tuple[int, Tensor]]] = {}
    for i, (p, th, g) in enumerate(zip(params, thetas, grads)):
        if g is None:
            continue
        group = where[id(p)]
        if group.get("maximize", False):
            g = -g
        if kind == "sgd":
            out[i] = _sgd(group, optimizer.state, p, th, g)
        else:
            adam_batches.setdefault(id(group), []).append((i, g))
    for batch in adam_batches.values():
        idx = [i for i, _ in batch]
        group = where[id(params[idx[0]])]
        decoupled = kind == "adamw" or bool(group.get("decoupled_weight_decay", False))
        new = _adam(
            group,
            optimizer.state,
            [params[i] for i in idx],
            [thetas[i] for i in idx],
            [g for _, g in batch],
            decoupled,
        )
        for i, t in zip(idx, new):
            out[i] = t
    return out  # type: ignore[return-value]


def sgd_jacobian(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
) -> Optional[list[float]]:
    """``d theta_plus / d G`` of an SGD step, one scalar per parameter; ``None`` for Adam.

    SGD's update is affine in the gradient with a per-group slope, so the vector-Jacobian
    product through the look-ahead is a scaling and needs no autograd graph:
    ``-lr`` without momentum; ``-lr * c`` with momentum, where ``c = 1`` on the first step
    (the buffer starts as the gradient) and ``1 - dampening`` afterwards; Nesterov adds
    ``momentum * c``. ``maximize`` flips the sign.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> sgd_jacobian(torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True), [w])
        [-0.19]
    """
    if _kind(optimizer) != "sgd":
        return None
    where = _groups_by_param(optimizer)
    out = []
    for p in params:
        group = where[id(p)]
        lr, mom, damp = _f(group["lr"]), _f(group["momentum"]), _f(group["dampening"])
        slope = 1.0
        if mom != 0:
            has_buf = optimizer.state.get(p, {}).get("momentum_buffer") is not None
            c = (1.0 - damp) if has_buf else 1.0
            slope = 1.0 + mom * c if group["nesterov"] else c
        out.append(-lr * slope * (-1.0 if group.get("maximize", False) else 1.0))
    return out
