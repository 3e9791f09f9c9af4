"""A differentiable mirror of a live ``torch.optim`` optimiser.

MAXL's meta-gradient needs the multi-task network's *next* parameters,
``theta_plus = step(theta, G, state)``, as a differentiable function of the gradient ``G``.
:func:`lookahead` computes that step exactly as ``torch.optim`` would (same learning rate,
momentum, dampening, Nesterov, weight decay, betas, eps, ``maximize``, per-group options,
and the optimiser's **current** state: momentum buffers, moments, accumulators, step
counts), without touching the optimiser. Mirrored: ``SGD``, ``Adam`` (incl. ``amsgrad``),
``AdamW``, ``RMSprop`` (incl. ``centered`` and ``momentum``), ``Adagrad`` (incl.
``lr_decay`` and ``initial_accumulator_value``), ``NAdam`` (incl. its momentum-decay
schedule and ``decoupled_weight_decay``), ``RAdam`` (incl. the variance rectification and
``decoupled_weight_decay``) and ``Adamax``.

Where the look-ahead comes from:

* ``Adamax``: torchopt's functional ``scale_by_adamax``, fed the optimiser's moments and
  step count. It matches ``torch.optim.Adamax`` to rounding (same max-norm update; its
  bias correction is a Python float), and has no square root.
* everything else is written out here, following ``torch.optim``'s single-tensor update
  operation by operation, because torchopt's transforms do not match it to the working
  dtype's precision or are not differentiable where ``torch.optim``'s update is:
  ``scale_by_adam`` computes ``pow(beta, count)`` with an int64 ``count`` in the default
  (float32) dtype, a 5e-6 relative error in float64, and has no ``amsgrad``;
  ``scale_by_rms`` / ``scale_by_stddev`` (RMSprop) and ``scale_by_radam`` take a plain
  ``sqrt`` of the second moment, whose derivative is infinite where it is exactly zero
  (a gradient entry that has always been zero), which turns the meta-gradient into NaN;
  ``scale_by_rss`` (Adagrad) replaces the update by 0 where the accumulator is 0, which
  changes its derivative there (``torch.optim``'s is ``1/eps``) and has no ``lr_decay``;
  there is no NAdam transform; torchopt's ``trace`` (SGD momentum) keeps a hidden
  "first call" flag in a closure and cannot start from an existing momentum buffer.

Bias corrections, NAdam's momentum schedule and RAdam's rectification are computed in
Python floats from the step count, as ``torch.optim`` does, so the look-ahead agrees with
``torch.optim``'s real step to the working dtype's precision (about ``1e-15`` relative in
float64). Square roots of second moments get a tiny ``eps_root`` (the dtype's smallest
normal number) inside, so that the look-ahead stays differentiable where a gradient is
exactly zero; this leaves the value unchanged to the dtype's precision.

Every supported update is elementwise in ``G``; :mod:`auxgen.meta` relies on that.
Optimisers whose update is not (layer-wise trust ratios as in LAMB and LARS, factored or
matrix preconditioners as in Adafactor, Shampoo or Muon) are refused. With
``lookahead="sgd"`` (:func:`check_optimizer`, :func:`sgd_stand_in`) any optimiser that
is not mirrored is approximated by plain SGD at its groups' current learning rates, the
paper's own approximation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torchopt.transform.scale_by_adamax import ScaleByAdamaxState, scale_by_adamax

__all__ = [
    "LOOKAHEADS",
    "SUPPORTED_OPTIMIZERS",
    "check_optimizer",
    "is_mirrored",
    "lookahead",
    "sgd_jacobian",
    "sgd_stand_in",
]

LOOKAHEADS = ("exact", "sgd")

# Optimisers (by class name: timm, torch and others) whose update is not elementwise in the
# gradient: a per-layer trust ratio or norm (LAMB, LARS, NovoGrad, AdamP/SGDP's projection),
# a factored, matrix or curvature preconditioner (Adafactor, Shampoo, Muon, Adahessian,
# L-BFGS).
NON_ELEMENTWISE = frozenset(
    {
        "Lamb",
        "LAMB",
        "Lars",
        "LARS",
        "NvNovoGrad",
        "NovoGrad",
        "AdamP",
        "SGDP",
        "Adafactor",
        "AdafactorBigVision",
        "Shampoo",
        "Muon",
        "Adahessian",
        "LBFGS",
    }
)

#: One mirrored step of a parameter: ``(optimizer, group, state, theta, g) -> theta_plus``.
_Update = Callable[[torch.optim.Optimizer, dict, dict, Tensor, Tensor], Tensor]


def _name(optimizer: Any) -> str:
    return f"{type(optimizer).__module__}.{type(optimizer).__name__}"


def is_mirrored(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`lookahead` mirrors ``optimizer`` exactly.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> is_mirrored(torch.optim.RMSprop([w])), is_mirrored(torch.optim.LBFGS([w]))
        (True, False)
    """
    return _update_of(optimizer) is not None


def _unsupported(optimizer: torch.optim.Optimizer, argname: str) -> TypeError:
    supported = ", ".join("torch.optim." + c.__name__ for c in SUPPORTED_OPTIMIZERS)
    name = type(optimizer).__name__
    if name in NON_ELEMENTWISE:
        return TypeError(
            f"{argname} {_name(optimizer)} cannot be mirrored exactly: its update is not "
            "elementwise in the gradient (a layer-wise trust ratio, norm or matrix "
            "preconditioner), which the exact meta-gradient relies on. Train the multi-task "
            f"network with an elementwise optimiser ({supported}), or pass "
            'AuxiliaryLabeler(..., lookahead="sgd") to approximate its look-ahead by plain '
            "SGD at each group's learning rate (the MAXL paper's approximation)"
        )
    return TypeError(
        f"{argname} must be one of {supported} to be mirrored exactly, got {_name(optimizer)}; "
        'pass AuxiliaryLabeler(..., lookahead="sgd") to approximate its look-ahead by plain '
        "SGD at each group's learning rate (the MAXL paper's approximation)"
    )


def check_optimizer(
    optimizer: Any,
    allowed: Iterable[Tensor],
    *,
    argname: str,
    owner: str,
    mirrored: bool,
    lookahead: str = "exact",
) -> None:
    """Check that ``optimizer`` is supported and only holds parameters from ``allowed``.

    Args:
        optimizer: the optimiser to check.
        allowed: parameters the optimiser may hold.
        argname: argument name used in error messages (``"optimizer"``).
        owner: what ``allowed`` is, for error messages (``"model_parameters()"``).
        mirrored: whether :func:`lookahead` must mirror it (then only the supported
            optimisers are accepted, unless ``lookahead="sgd"``; any ``torch.optim``
            optimiser otherwise).
        lookahead: ``"exact"`` (only mirrored optimisers) or ``"sgd"`` (any other
            optimiser is approximated by :func:`sgd_stand_in`).

    Raises:
        TypeError: if it is not a ``torch.optim`` optimiser, or must be mirrored and is
            not supported.
        ValueError: if it holds a foreign parameter, or ``lookahead`` is unknown.
    """
    if lookahead not in LOOKAHEADS:
        raise ValueError(f"lookahead must be one of {LOOKAHEADS}, got {lookahead!r}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"{argname} must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if mirrored and lookahead == "exact" and not is_mirrored(optimizer):
        raise _unsupported(optimizer, argname)
    allowed_ids = {id(p) for p in allowed}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in allowed_ids:
                raise ValueError(
                    f"{argname} holds a parameter of shape {tuple(p.shape)} (param_groups[{gi}]) "
                    f"that is not one of the labeler's {owner}; build it from "
                    f"labeler.{owner}"
                )


def sgd_stand_in(optimizer: torch.optim.Optimizer) -> torch.optim.SGD:
    """Plain SGD over ``optimizer``'s parameters at each group's current learning rate.

    The MAXL paper's look-ahead approximation, for optimisers :func:`lookahead` does not
    mirror: no momentum, no weight decay, no state; a group's ``maximize`` is kept.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> sgd = sgd_stand_in(torch.optim.LBFGS([w], lr=0.5))
        >>> sgd.param_groups[0]["lr"], sgd.param_groups[0]["momentum"]
        (0.5, 0)
    """
    groups = [
        {"params": g["params"], "lr": _f(g["lr"]), "maximize": bool(g.get("maximize", False))}
        for g in optimizer.param_groups
    ]
    return torch.optim.SGD(groups, lr=groups[0]["lr"] if groups else 0.0, foreach=False)


def _groups_by_param(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    """``id(param) -> its param group``."""
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def _f(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _scalar_dtype() -> torch.dtype:
    # the dtype torch.optim keeps its CPU step counters and NAdam's mu_product in
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` with a finite derivative at ``v = 0`` (the value is unchanged)."""
    return (v + torch.finfo(v.dtype).tiny).sqrt()


def _state(st: dict, key: str, theta: Tensor) -> Tensor:
    """A state tensor, or the zeros ``torch.optim`` starts it from."""
    t = st.get(key)
    return torch.zeros_like(theta) if t is None else t


def _sgd(opt: torch.optim.Optimizer, group: dict, st: dict, theta: Tensor, g: Tensor) -> Tensor:
    lr, mom = _f(group["lr"]), _f(group["momentum"])
    damp, wd = _f(group["dampening"]), _f(group["weight_decay"])
    d = g + wd * theta if wd != 0 else g
    if mom != 0:
        buf = st.get("momentum_buffer")
        buf = d if buf is None else buf * mom + (1.0 - damp) * d
        d = d + mom * buf if group["nesterov"] else buf
    return theta - lr * d


def _adam_like(group: dict, st: dict, theta: Tensor, g: Tensor, decoupled: bool) -> Tensor:
    lr, wd, eps = _f(group["lr"]), _f(group["weight_decay"]), _f(group["eps"])
    b1, b2 = (_f(b) for b in group["betas"])
    step = _f(st["step"]) + 1 if "step" in st else 1.0
    if wd != 0:
        if decoupled:
            theta = theta * (1.0 - lr * wd)
        else:
            g = g + wd * theta
    m = torch.lerp(_state(st, "exp_avg", theta), g, 1.0 - b1)
    v = _state(st, "exp_avg_sq", theta) * b2 + (1.0 - b2) * (g * g)
    if group.get("amsgrad", False) and "max_exp_avg_sq" in st:
        v = torch.maximum(st["max_exp_avg_sq"], v)
    bc1, bc2 = 1.0 - b1**step, 1.0 - b2**step
    denom = _sqrt(v) / bc2**0.5 + eps
    return theta - (lr / bc1) * (m / denom)


def _adam(opt: torch.optim.Optimizer, group: dict, st: dict, theta: Tensor, g: Tensor) -> Tensor:
    decoupled = bool(group.get("decoupled_weight_decay", False))
    return _adam_like(group, st, theta, g, decoupled)


def _adamw(opt: torch.optim.Optimizer, group: dict, st: dict, theta: Tensor, g: Tensor) -> Tensor:
    return _adam_like(group, st, theta, g, True)


def _rmsprop(opt: torch.optim.Optimizer, group: dict, st: dict, theta: Tensor, g: Tensor) -> Tensor:
    lr, alpha, eps = _f(group["lr"]), _f(group["alpha"]), _f(group["eps"])
    wd, mom = _f(group["weight_decay"]), _f(group["momentum"])
    if wd != 0:
        g = g + wd * theta
    sq = _state(st, "square_avg", theta) * alpha + (1.0 - alpha) * (g * g)
    if group["centered"]:
        ga = torch.lerp(_state(st, "grad_avg", theta), g, 1.0 - alpha)
        avg = _sqrt(sq - ga * ga) + eps
    else:
        avg = _sqrt(sq) + eps
    d = g / avg
    if mom > 0:
        buf = st.get("momentum_buffer")
        d = d if buf is None else buf * mom + d
    return theta - lr * d


def _adagrad(opt: torch.optim.Optimizer, group: dict, st: dict, theta: Tensor, g: Tensor) -> Tensor:
    lr, wd, eps = _f(group["lr"]), _f(group["weight_decay"]), _f(group["eps"])
    init = _f(opt.defaults.get("initial_accumulator_value", 0.0))
    step = _f(st["step"]) + 1 if "step" in st else 1.0
    if wd != 0:
        g = g + wd * theta
    clr = lr / (1 + (step - 1) * _f(group["lr_decay"]))
    total = st["sum"] + g * g if "sum" in st else init + g * g
    return theta - clr * (g / (_sqrt(total) + eps))


def _nadam_radam_decay(
    group: dict, theta: Tensor, g: Tensor, lr: float, wd: float
) -> tuple[Tensor, Tensor]:
    """NAdam's and RAdam's weight decay: decoupled (shrink ``theta``) or L2 (add to ``g``)."""
    if wd != 0:
        if group.get("decoupled_weight_decay", False):
            theta = theta * (1.0 - lr * wd)
        else:
            g = g + wd * theta
    return theta, g


def _nadam(opt: torch.optim.Optimizer, group: dict, st: dict, theta: Tensor, g: Tensor) -> Tensor:
    lr, wd, eps = _f(group["lr"]), _f(group["weight_decay"]), _f(group["eps"])
    b1, b2 = (_f(b) for b in group["betas"])
    decay = _f(group["momentum_decay"])
    step = _f(st["step"]) + 1 if "step" in st else 1.0
    theta, g = _nadam_radam_decay(group, theta, g, lr, wd)
    mu = b1 * (1.0 - 0.5 * (0.96 ** (step * decay)))
    mu_next = b1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * decay)))
    # torch.optim keeps mu_product as a tensor: multiply in its dtype, as it does
    prev = st.get("mu_product")
    prev = torch.tensor(1.0, dtype=_scalar_dtype()) if prev is None else prev
    mu_product = _f(prev * mu)
    m = torch.lerp(_state(st, "exp_avg", theta), g, 1.0 - b1)
    v = _state(st, "exp_avg_sq", theta) * b2 + (1.0 - b2) * (g * g)
    denom = _sqrt(v / (1.0 - b2**step)) + eps
    c_g = -lr * (1.0 - mu) / (1.0 - mu_product)
    c_m = -lr * mu_next / (1.0 - mu_product * mu_next)
    return theta + c_g * (g / denom) + c_m * (m / denom)


def _radam(opt: torch.optim.Optimizer, group: dict, st: dict, theta: Tensor, g: Tensor) -> Tensor:
    lr, wd, eps = _f(group["lr"]), _f(group["weight_decay"]), _f(group["eps"])
    b1, b2 = (_f(b) for b in group["betas"])
    step = _f(st["step"]) + 1 if "step" in st else 1.0
    theta, g = _nadam_radam_decay(group, theta, g, lr, wd)
    m = torch.lerp(_state(st, "exp_avg", theta), g, 1.0 - b1)
    bc1, bc2 = 1.0 - b1**step, 1.0 - b2**step
    m_hat = m / bc1
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * step * (b2**step) / bc2
    if rho_t <= 5.0:  # the variance is not tractable yet: SGD with momentum
        return theta - m_hat * lr
    v = _state(st, "exp_avg_sq", theta) * b2 + (1.0 - b2) * (g * g)
    rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
    adaptive = bc2**0.5 / (_sqrt(v) + eps)
    return theta - m_hat * lr * adaptive * rect


def _adamax(opt: torch.optim.Optimizer, group: dict, st: dict, theta: Tensor, g: Tensor) -> Tensor:
    lr, wd, eps = _f(group["lr"]), _f(group["weight_decay"]), _f(group["eps"])
    b1, b2 = (_f(b) for b in group["betas"])
    step = int(_f(st["step"])) + 1 if "step" in st else 1
    if wd != 0:
        g = g + wd * theta
    zero = torch.zeros_like(theta)
    state = ScaleByAdamaxState(mu=(st.get("exp_avg", zero),), nu=(st.get("exp_inf", zero),), t=step)
    tx = scale_by_adamax.impl(b1=b1, b2=b2, eps=eps)  # type: ignore[attr-defined]
    (u,), _ = tx.update((g,), state, inplace=False)
    return theta - lr * u


#: The mirrored optimisers, each with its update. An optimiser takes the update of the first
#: of its classes (``type(optimizer).__mro__``) found here, so a subclass gets its most
#: specific base's: an ``AdamW`` (a subclass of ``Adam`` in recent torch) gets ``_adamw``.
_UPDATES: dict[type[torch.optim.Optimizer], _Update] = {
    torch.optim.SGD: _sgd,
    torch.optim.Adam: _adam,
    torch.optim.AdamW: _adamw,
    torch.optim.RMSprop: _rmsprop,
    torch.optim.Adagrad: _adagrad,
    torch.optim.NAdam: _nadam,
    torch.optim.RAdam: _radam,
    torch.optim.Adamax: _adamax,
}

SUPPORTED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = tuple(_UPDATES)
"""The optimisers that ``lookahead`` mirrors exactly, with their subclasses: ``torch.optim``'s
``SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adagrad``, ``NAdam``, ``RAdam`` and ``Adamax``."""


def _update_of(optimizer: torch.optim.Optimizer) -> Optional[_Update]:
    """The update of ``optimizer``'s most specific mirrored class, or ``None``."""
    for cls in type(optimizer).__mro__:
        update = _UPDATES.get(cls)
        if update is not None:
            return update
    return None


def lookahead(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    thetas: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
) -> list[Tensor]:
    """One differentiable step of ``optimizer``, without changing the optimiser.

    Args:
        optimizer: a supported ``torch.optim`` optimiser holding ``params``
            (:data:`SUPPORTED_OPTIMIZERS`; see :func:`sgd_stand_in` for others).
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
    update = _update_of(optimizer)
    if update is None:
        raise _unsupported(optimizer, "optimizer")
    where = _groups_by_param(optimizer)
    out: list[Tensor] = list(thetas)
    for i, (p, th, g) in enumerate(zip(params, thetas, grads)):
        if g is None:
            continue
        group, st = where[id(p)], optimizer.state.get(p, {})
        if group.get("maximize", False):
            g = -g
        out[i] = update(optimizer, group, st, th, g)
    return out


def sgd_jacobian(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
) -> Optional[list[float]]:
    """``d theta_plus / d G`` of an SGD step, one scalar per parameter; ``None`` otherwise.

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
    if _update_of(optimizer) is not _sgd:
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
