r"""The MAXL meta-gradient, computed without a double backward.

Notation (see ``docs/method.md``): multi-task parameters :math:`\theta`, soft auxiliary
labels :math:`t = \mathrm{masked\_softmax}(g_\phi(x), y)`, per-class auxiliary losses
:math:`\ell_{ik}(\theta)` so that :math:`L_a = \frac1N\sum_{ik} t_{ik}\,\ell_{ik}` and
:math:`G = \nabla_\theta (L_p + w L_a)`, the look-ahead :math:`\theta^+ = U(\theta, G)` of
the user's optimiser, and the meta loss :math:`L_p(\theta^+)`.

Because :math:`L_a` is linear in :math:`t` and :math:`U` is elementwise in :math:`G`
(true of every optimiser in :data:`~auxgen.SUPPORTED_OPTIMIZERS`: SGD with momentum or
Nesterov, Adam, AdamW and amsgrad, RMSprop, Adagrad, NAdam, RAdam, Adamax), the chain rule
collapses to

.. math::

    \frac{\partial L_p(\theta^+)}{\partial t_{ik}}
      = \frac{w}{N}\; \frac{d}{d\varepsilon}\,\ell_{ik}(\theta + \varepsilon u)\Big|_{0},
    \qquad u = \frac{\partial U}{\partial G} \odot \nabla_{\theta^+} L_p(\theta^+),

a single Jacobian-vector product of the auxiliary losses along ``u``. ``u`` costs one
forward/backward at :math:`\theta^+` plus an elementwise vector-Jacobian product through
the optimiser step. Ways to take the JVP:

* ``"forward_ad"``: forward-mode automatic differentiation (exact, one dual forward);
* ``"double_backward"``: the same JVP from two vector-Jacobian products (exact): with a
  dummy cotangent :math:`w`, :math:`g(w) = J^\top w` by a backward that builds its own
  graph, then :math:`J u = \nabla_w \langle g(w), u\rangle` by a second backward;
* ``"first_order"``: a one-sided finite difference that reuses the losses of the forward
  already done at :math:`\theta` (one extra forward, no derivative formulas needed).

``meta="second_order"`` (exact, the default) chooses at its first call, and keeps: forward
AD; where an op has no forward-AD formula, an exact decomposition of it into ops that have
one (``embedding_bag``; the fused oneDNN/cuDNN RNN kernels); else the double backward; and
only where neither exists, ``first_order`` with one warning naming the op. Both exact
modes run attention with the math kernel of ``scaled_dot_product_attention`` (the fused
kernels have neither formula). These PyTorch workarounds (the kernel choices, the op
decompositions, and reading which op's formula is missing from PyTorch's errors) live in
:mod:`auxgen._torch_compat`; this module is the maths.

All modes replay the random number generator of the forward at :math:`\theta`, so dropout
masks agree, and run on copies of the buffers, so BatchNorm statistics do not move.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ._torch_compat import (
    DECOMPOSED_OPS,
    autocast_settings,
    double_backward_error,
    exact_kernels,
    missing_derivative,
)
from ._torch_compat import decomposed_ops as decomposed_ops  # re-exported
from .mirror import lookahead, sgd_jacobian

__all__ = [
    "EXACT_MODES",
    "META_MODES",
    "JVPPlan",
    "RNGState",
    "default_fd_eps",
    "directional_derivative",
    "lookahead_direction",
    "meta_jvp",
    "missing_derivative",
]

#: ``meta=`` values: ``"second_order"`` (exact; the implementation is chosen automatically),
#: ``"first_order"`` (finite difference), or one exact implementation forced.
META_MODES = ("second_order", "first_order", "forward_ad", "double_backward")
#: The exact implementations, in the order ``"second_order"`` tries them.
EXACT_MODES = ("forward_ad", "double_backward")


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
    dtype = base.dtype
    on, low = autocast_settings(base.device.type)
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
    decompose: bool = False,
) -> Tensor:
    """``d/de loss_matrix_at(theta + e * direction)`` at ``e = 0``.

    Args:
        loss_matrix_at: evaluates the ``(N, A)`` per-class auxiliary losses at given
            parameter values.
        thetas: the parameter values (detached).
        direction: the tangent, one tensor per parameter.
        mode: ``"forward_ad"`` (forward-mode AD, exact; ``"second_order"`` is an alias),
            ``"double_backward"`` (two vector-Jacobian products, exact) or
            ``"first_order"`` (one-sided finite difference from ``base``).
        base: the losses at ``thetas`` from the forward already done (``first_order``).
        rng: random state of that forward, replayed so dropout masks match.
        fd_eps: relative step of the finite difference; the step is
            ``fd_eps * ||theta|| / ||direction||``. Defaults to ``sqrt(machine eps)``.
        decompose: replace the ops in :data:`DECOMPOSED_OPS` by exact compositions of ops
            with derivative formulas (exact modes only; see :class:`decomposed_ops`).

    Raises:
        NotImplementedError: in an exact mode, when an op lacks the derivative formula it
            needs (:func:`missing_derivative` names it).
    """
    args = (loss_matrix_at, thetas, direction, mode, base, fd_eps, decompose)
    if rng is None:
        return _directional_derivative(*args)
    resume = RNGState(thetas[0].device)
    rng.restore()
    try:
        return _directional_derivative(*args)
    finally:
        resume.restore()


def _directional_derivative(
    loss_matrix_at: Callable[[list[Tensor]], Tensor],
    thetas: Sequence[Tensor],
    direction: Sequence[Tensor],
    mode: str,
    base: Optional[Tensor],
    fd_eps: Optional[float],
    decompose: bool = False,
) -> Tensor:
    if mode in ("second_order", "forward_ad"):
        with exact_kernels(decompose), torch.no_grad(), fwAD.dual_level():
            duals = [fwAD.make_dual(t, d) for t, d in zip(thetas, direction)]
            out = loss_matrix_at(duals)
            tangent = fwAD.unpack_dual(out).tangent
        if tangent is None:  # the losses do not depend on the parameters
            return torch.zeros_like(out)
        return tangent
    if mode == "double_backward":
        with exact_kernels(decompose):
            return _double_backward_jvp(loss_matrix_at, thetas, direction)
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


# --------------------------------------------------------------------------- exact JVPs
def _double_backward_jvp(
    loss_matrix_at: Callable[[list[Tensor]], Tensor],
    thetas: Sequence[Tensor],
    direction: Sequence[Tensor],
) -> Tensor:
    """``J u`` from two vector-Jacobian products: ``g(w) = J^T w``, then ``d<g(w), u>/dw``."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in thetas]
        out = loss_matrix_at(leaves)
        if not out.requires_grad:  # the losses do not depend on the parameters
            return torch.zeros_like(out)
        w = torch.zeros_like(out, requires_grad=True)
        vjps = torch.autograd.grad(out, leaves, w, create_graph=True, allow_unused=True)
        pairs = [(g, d) for g, d in zip(vjps, direction) if g is not None]
        if not pairs:
            return torch.zeros_like(out).detach()
        try:
            if not all(g.requires_grad for g, _ in pairs):
                raise RuntimeError("a vector-Jacobian product does not require grad")
            (jvp,) = torch.autograd.grad([g for g, _ in pairs], w, [d for _, d in pairs])
        except RuntimeError as exc:  # a backward that autograd cannot differentiate
            raise double_backward_error(out, exc) from exc
    return jvp.detach()


# ------------------------------------------------------------------- mode selection
class JVPPlan:
    """How the meta step takes its JVP: chosen at the first meta step, then kept.

    Attributes:
        meta: the requested mode (a :data:`META_MODES` entry).
        mode: the implementation in use: ``"forward_ad"``, ``"double_backward"`` or
            ``"first_order"``; ``None`` before the first meta step.
        decompose: whether ops of :data:`DECOMPOSED_OPS` are being replaced.
        missing: ``(mode, op)`` pairs that ruled out exact modes.
    """

    def __init__(self, meta: str) -> None:
        if meta not in META_MODES:
            raise ValueError(f"meta must be one of {META_MODES}, got {meta!r}")
        self.meta = meta
        self.mode: Optional[str] = "first_order" if meta == "first_order" else None
        self.decompose = False
        self.missing: list[tuple[str, str]] = []

    def candidates(self) -> tuple[str, ...]:
        """Exact modes still to try, starting with the one in use."""
        if self.mode == "first_order":
            return ()
        modes = EXACT_MODES if self.meta == "second_order" else (self.meta,)
        return modes[modes.index(self.mode) :] if self.mode in modes else modes


def meta_jvp(
    plan: JVPPlan,
    loss_matrix_at: Callable[[list[Tensor]], Tensor],
    thetas: Sequence[Tensor],
    direction: Sequence[Tensor],
    *,
    base: Tensor,
    rng: Optional[RNGState] = None,
    fd_eps: Optional[float] = None,
) -> Tensor:
    """:func:`directional_derivative` the way ``plan`` says, choosing it on the first call.

    Each exact mode is tried in turn (with the op decompositions when an op of
    :data:`DECOMPOSED_OPS` is what is missing); the first that works is kept in
    ``plan.mode``. With ``meta="second_order"`` and no exact mode left, it warns once,
    naming the ops, and uses ``first_order`` from then on; a forced exact mode raises.
    """
    for mode in plan.candidates():
        while True:
            try:
                tangent = directional_derivative(
                    loss_matrix_at,
                    thetas,
                    direction,
                    mode=mode,
                    rng=rng,
                    decompose=plan.decompose,
                )
            except NotImplementedError as exc:
                op = missing_derivative(exc)
                if op is None:
                    raise
                if op in DECOMPOSED_OPS and not plan.decompose:
                    plan.decompose = True
                    continue
                if plan.meta != "second_order":
                    raise NotImplementedError(
                        f"meta={plan.meta!r} needs a derivative of {op} that is not "
                        "implemented; use meta='second_order' to choose an exact mode that "
                        "works (or fall back to first_order) automatically"
                    ) from exc
                plan.missing.append((mode, op))
                break
            plan.mode = mode
            return tangent
    if plan.mode != "first_order":
        plan.mode = "first_order"
        why = "; ".join(f"{m} needs a derivative of {op}" for m, op in plan.missing)
        warnings.warn(
            f"auxgen: no exact meta-gradient for this model ({why}, which PyTorch does not "
            "implement); using meta='first_order' (a finite-difference JVP) from now on",
            UserWarning,
            stacklevel=6,  # user -> labeler.step -> training_step -> _step -> _meta_gradient
        )
    return directional_derivative(
        loss_matrix_at, thetas, direction, mode="first_order", base=base, rng=rng, fd_eps=fd_eps
    )
