r"""The MAXL meta-gradient, computed without a double backward.

Notation (see ``docs/method.md``): multi-task parameters :math:`\theta`, soft auxiliary
labels :math:`t = \mathrm{masked\_softmax}(g_\phi(x), y)`, per-class auxiliary losses
:math:`\ell_{ik}(\theta)` so that :math:`L_a = \frac1N\sum_{ik} t_{ik}\,\ell_{ik}` and
:math:`G = \nabla_\theta (L_p + w L_a)`, the look-ahead :math:`\theta^+ = U(\theta, G)` of
the user's optimiser, and the meta loss :math:`L_p(\theta^+)`.

Because :math:`L_a` is linear in :math:`t` and :math:`U` is elementwise in :math:`G`
(true of SGD, momentum, Nesterov, Adam and AdamW), the chain rule collapses to

.. math::

    \frac{\partial L_p(\theta^+)}{\partial t_{ik}}
      = \frac{w}{N}\; \frac{d}{d\varepsilon}\,\ell_{ik}(\theta + \varepsilon u)\Big|_{0},
    \qquad u = \frac{\partial U}{\partial G} \odot \nabla_{\theta^+} L_p(\theta^+),

a single Jacobian-vector product of the auxiliary losses along ``u``. ``u`` costs one
forward/backward at :math:`\theta^+` plus an elementwise vector-Jacobian product through
the optimiser step. Two ways to take the JVP:

* ``"second_order"``: forward-mode automatic differentiation (exact);
* ``"first_order"``: a one-sided finite difference that reuses the losses of the forward
  already done at :math:`\theta` (one extra forward, no double-backward support needed).

Both replay the random number generator of the forward at :math:`\theta`, so dropout
masks agree, and run on copies of the buffers, so BatchNorm statistics do not move.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .mirror import lookahead, sgd_jacobian

__all__ = [
    "META_MODES",
    "RNGState",
    "default_fd_eps",
    "directional_derivative",
    "lookahead_direction",
]

META_MODES = ("second_order", "first_order")


class RNGState:
    """Snapshot of the CPU (and, where used, CUDA) random state, to replay dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = None
        if device.type == "cuda":
            self.cuda = (device, torch.cuda.get_rng_state(device))

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])


def default_fd_eps(base: Tensor) -> float:
    """``sqrt(machine eps)`` of the least precise dtype the forward computes in.

    Under autocast the network runs in bf16/fp16 even when the losses come out in float32,
    so the finite-difference step must be sized for the autocast dtype.
    """
    dtype, dev = base.dtype, base.device.type
    try:
        on, low = torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
    except TypeError:  # torch < 2.4
        on = torch.is_autocast_cpu_enabled() if dev == "cpu" else torch.is_autocast_enabled()
        low = torch.get_autocast_cpu_dtype() if dev == "cpu" else torch.get_autocast_gpu_dtype()
    if on and torch.finfo(low).eps > torch.finfo(dtype).eps:
        dtype = low
    return float(torch.finfo(dtype).eps ** 0.5)


def _grads_or_zeros(loss: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def global_norm(tensors: Sequence[Tensor]) -> float:
    """Euclidean norm of a list of tensors, as if concatenated (float64 accumulation)."""
    norms = torch._foreach_norm(list(tensors)) if tensors else []
    return float(torch.stack([n.double() for n in norms]).norm()) if norms else 0.0


def lookahead_direction(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    primary_loss_at: Callable[[list[Tensor]], Tensor],
    reduce: Optional[Callable[[list[Tensor]], None]] = None,
) -> tuple[list[Tensor], Tensor]:
    """Return ``u = dU/dG * grad L_p(theta_plus)`` and ``L_p(theta_plus)``.

    Args:
        optimizer: the user's optimiser (not modified).
        params: the live parameters that move in the look-ahead and affect the primary
            loss (the backbone and classifier; not the auxiliary head).
        grads: their multi-task gradients ``G`` (already averaged across ranks).
        primary_loss_at: ``theta_plus -> L_p`` evaluated by the real module.
        reduce: in-place average across ranks of the look-ahead gradient, or ``None``.
    """
    slopes = sgd_jacobian(optimizer, params)
    if slopes is not None:  # affine update: the VJP is a per-parameter scaling
        with torch.no_grad():
            theta_plus = lookahead(optimizer, params, [p.detach() for p in params], grads)
        with torch.enable_grad():
            tp = [t.requires_grad_(True) for t in theta_plus]
            lp_plus = primary_loss_at(tp)
            v = _grads_or_zeros(lp_plus, tp)
        if reduce is not None:
            reduce(v)
        return [vi.mul_(s) for vi, s in zip(v, slopes)], lp_plus.detach()
    g_leaf = [g.detach().requires_grad_(True) for g in grads]
    with torch.enable_grad():
        theta_plus = lookahead(optimizer, params, [p.detach() for p in params], g_leaf)
        tp = [t.detach().requires_grad_(True) for t in theta_plus]
        lp_plus = primary_loss_at(tp)
        v = _grads_or_zeros(lp_plus, tp)
        if reduce is not None:
            reduce(v)
        u = torch.autograd.grad(theta_plus, g_leaf, v, allow_unused=True)
    u = [torch.zeros_like(g) if ui is None else ui for g, ui in zip(grads, u)]
    return u, lp_plus.detach()


def directional_derivative(
    loss_matrix_at: Callable[[list[Tensor]], Tensor],
    thetas: Sequence[Tensor],
    direction: Sequence[Tensor],
    *,
    mode: str,
    base: Optional[Tensor] = None,
    rng: Optional[RNGState] = None,
    fd_eps: Optional[float] = None,
) -> Tensor:
    """``d/de loss_matrix_at(theta + e * direction)`` at ``e = 0``.

    Args:
        loss_matrix_at: evaluates the ``(N, A)`` per-class auxiliary losses at given
            parameter values.
        thetas: the parameter values (detached).
        direction: the tangent, one tensor per parameter.
        mode: ``"second_order"`` (forward-mode AD, exact) or ``"first_order"`` (one-sided
            finite difference from ``base``).
        base: the losses at ``thetas`` from the forward already done (``first_order``).
        rng: random state of that forward, replayed so dropout masks match.
        fd_eps: relative step of the finite difference; the step is
            ``fd_eps * ||theta|| / ||direction||``. Defaults to ``sqrt(machine eps)``.
    """
    if rng is None:
        return _directional_derivative(loss_matrix_at, thetas, direction, mode, base, fd_eps)
    resume = RNGState(thetas[0].device)
    rng.restore()
    try:
        return _directional_derivative(loss_matrix_at, thetas, direction, mode, base, fd_eps)
    finally:
        resume.restore()


def _directional_derivative(
    loss_matrix_at: Callable[[list[Tensor]], Tensor],
    thetas: Sequence[Tensor],
    direction: Sequence[Tensor],
    mode: str,
    base: Optional[Tensor],
    fd_eps: Optional[float],
) -> Tensor:
    if mode == "second_order":
        with torch.no_grad(), fwAD.dual_level():
            duals = [fwAD.make_dual(t, d) for t, d in zip(thetas, direction)]
            out = loss_matrix_at(duals)
            tangent = fwAD.unpack_dual(out).tangent
        if tangent is None:  # the losses do not depend on the parameters
            return torch.zeros_like(out)
        return tangent
    if mode == "first_order":
        if base is None:
            raise ValueError("first_order needs the losses of the forward at theta (base=)")
        dnorm = global_norm(direction)
        if dnorm == 0.0:
            return torch.zeros_like(base)
        rel = fd_eps if fd_eps is not None else default_fd_eps(base)
        eps = rel * max(global_norm(thetas), 1.0) / dnorm
        with torch.no_grad():
            shifted = [t + eps * d for t, d in zip(thetas, direction)]
            return (loss_matrix_at(shifted) - base) / eps
    raise ValueError(f"meta must be one of {META_MODES}, got {mode!r}")
