r"""One training step: the multi-task update and the meta-gradient of the learned tasks.

Two functions do the work, and both training paths share them:

* :func:`multitask_loss`: the multi-task loss of a batch (what ``labeler(x, y)`` returns, for
  the user's own ``backward``), and what a later meta update needs from that forward
  (:class:`Pending`);
* :func:`meta_gradient`: the learned tasks' meta-gradient from the gradients and the
  optimiser's current state (what ``labeler.meta_step`` runs between the user's ``backward``
  and ``optimizer.step()``).

:func:`training_step` is what :meth:`auxgen.AuxiliaryLabeler.step` runs once it has checked
its inputs. In order:

1. each task's :meth:`~auxgen.tasks.AuxiliaryTask.plan` (extra views to forward, targets
   known in advance);
2. one forward of the model on the batch and every view (one BatchNorm update), the
   primary loss on the batch's rows, each task's head on its rows, its targets and its
   loss ``mean_r sum_k t_rk ell_rk``;
3. the gradient ``G`` of ``L_p + sum_j w_j L_j``, averaged over the ranks;
4. on a meta step, the learned tasks' meta-gradient through one differentiable step of the
   user's optimiser (:mod:`auxgen.meta`, :mod:`auxgen.mirror`);
5. the optimiser steps, unless a loss or gradient is not finite.

Buffers are snapshotted first and restored when the step fails or is skipped, so nothing is
half-changed when an error escapes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .backbone import FeatureTap, OutputSpec, primary_logits
from .distributed import Ranks
from .losses import primary_loss
from .meta import JVPPlan, RNGState, lookahead_direction, meta_jvp
from .mirror import is_mirrored, sgd_stand_in
from .tasks.base import AuxiliaryTask, TaskPlan

__all__ = [
    "NonFiniteError", "Pending", "StepParts", "kept_buffers", "meta_gradient", "multitask_loss",
    "training_step",
]  # fmt: skip

logger = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite loss or gradient; nothing was updated."""


@dataclass
class StepParts:
    """What a step works on: the model, the tasks with their heads, and the options."""

    model: nn.Module
    tap: FeatureTap
    tasks: Sequence[AuxiliaryTask]
    heads: Sequence[nn.Module]
    output: OutputSpec
    loss: str
    focal_gamma: float
    jvp: JVPPlan
    ranks: Ranks
    classifier_name: str
    fd_eps: Optional[float] = None
    nonfinite: str = "raise"
    diagnostics: bool = False


@dataclass
class _Forward:
    """The forward of one step: inputs, primary logits and each task's rows and losses."""

    inputs: Tensor
    n: int
    z_p: Tensor
    plans: list[TaskPlan]
    views: list[Optional[slice]]
    ells: list[Tensor] = field(default_factory=list)
    targets: list[Tensor] = field(default_factory=list)
    extras: list[Tensor] = field(default_factory=list)
    learned: list[int] = field(default_factory=list)


@dataclass
class Pending:
    """What a meta update needs from the training forward it follows.

    Attributes:
        x: the batch.
        y: its primary labels.
        inputs: the batch and every task's views, as forwarded.
        plans: each task's plan.
        views: each task's rows of ``inputs`` (``None`` without views).
        learned: indices of the learned tasks.
        bases: their per-class losses at the current parameters (detached).
        targets: their targets, with the graph to their meta-parameters.
        rng: the random state before the forward (dropout masks are replayed).
        autocast: ``(device_type, dtype)`` of the autocast region the forward ran in.
    """

    x: Tensor
    y: Tensor
    inputs: Tensor
    plans: list[TaskPlan]
    views: list[Optional[slice]]
    learned: list[int]
    bases: list[Tensor]
    targets: list[Tensor]
    rng: Optional[RNGState]
    autocast: Optional[tuple[str, torch.dtype]] = None


def all_finite(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether every entry of every tensor is finite (``None`` entries are skipped)."""
    present = [t.detach() for t in tensors if t is not None]
    if not present:
        return True
    # The L2 norm is fast and finite only if every entry is; it can also overflow, so a
    # non-finite L2 norm is confirmed with the max-norm (NaN/inf exactly when an entry is).
    if bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(present)])).all()):
        return True
    peaks = torch._foreach_norm(present, ord=float("inf"))
    return bool(torch.isfinite(torch.stack([p.float() for p in peaks])).all())


def training_step(
    parts: StepParts,
    owner: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    gen_optimizer: Optional[torch.optim.Optimizer],
    *,
    aux_target: Optional[Tensor] = None,
    meta_batch: Optional[tuple[Tensor, Tensor]] = None,
    do_meta: bool = False,
) -> dict[str, Any]:
    """One step on checked inputs; ``owner``'s buffers are restored if it fails or is skipped.

    Returns:
        The dict described in :meth:`auxgen.AuxiliaryLabeler.step`.
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    gen_params = [p for t in parts.tasks for p in t.meta_parameters()]
    # Release the previous gradients now (they are replaced below), as
    # zero_grad(set_to_none=True) would: they would otherwise sit in memory all step.
    for p in params + (gen_params if do_meta else []):
        p.grad = None
    saved = [(b, b.clone()) for b in owner.buffers()]
    try:
        out = _step(parts, x, y, optimizer, gen_optimizer, aux_target, params, do_meta, meta_batch)
    except BaseException:
        _restore(saved)
        raise
    if out["skipped"]:
        _restore(saved)
    return out


@contextlib.contextmanager
def kept_buffers(module: nn.Module) -> Iterator[None]:
    """Restore ``module``'s buffers (BatchNorm statistics) on leaving, however it is left."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        _restore(saved)


def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for b, c in saved:
            b.copy_(c)


def _forward(
    parts: StepParts, x: Tensor, y: Tensor, aux_target: Optional[Tensor], do_meta: bool
) -> tuple[_Forward, Optional[RNGState]]:
    """Plans, one forward of the batch and the views, each task's losses and targets."""
    n = x.shape[0]
    plans = [
        task.plan(x, y, aux_target if task.takes_aux_target else None)
        if task.weight > 0
        else TaskPlan()
        for task in parts.tasks
    ]
    chunks, views, start = [x], [], n
    for task, plan in zip(parts.tasks, plans):
        if plan.views is None:
            views.append(None)
            continue
        check_views(task, plan.views, x)
        chunks.append(plan.views)
        views.append(slice(start, start + plan.views.shape[0]))
        start += plan.views.shape[0]
    inputs = torch.cat(chunks) if len(chunks) > 1 else x
    rng = RNGState(x.device) if do_meta else None
    out, h_all = parts.tap.run(lambda: parts.model(inputs))
    z_all = primary_logits(out, parts.output)
    z_p, h = (z_all, h_all) if inputs is x else (z_all[:n], h_all[:n])
    fwd = _Forward(inputs, n, z_p, plans, views)
    for j, (task, plan, head) in enumerate(zip(parts.tasks, plans, parts.heads)):
        h_views = h_all[views[j]] if views[j] is not None else None
        z = head(task.head_input(plan, h, h_views) if task.weight > 0 else h)
        ell = task.loss_matrix(z, parts.loss, parts.focal_gamma)
        if task.weight > 0:
            z_views = z_all[views[j]] if views[j] is not None else None
            extra = task.extra_loss(plan, z_p, z_views, z)
            if extra is not None:
                fwd.extras.append(extra)
        if task.weight == 0:  # the task is off: its targets are not computed
            t = z.new_zeros(z.shape).float()
        elif plan.targets is not None:
            t = plan.targets.to(device=z.device, dtype=z.dtype)
        else:
            t = task.targets(plan, x, y, h, grad=do_meta and task.learned)
        if do_meta and task.learned and task.weight > 0:
            fwd.learned.append(j)
        fwd.ells.append(ell)
        fwd.targets.append(t)
    return fwd, rng


def check_views(task: AuxiliaryTask, views: Any, x: Tensor) -> None:
    """A task's views must be a batch like ``x``: same per-sample shape, dtype and device."""
    name = type(task).__name__
    if not isinstance(views, Tensor):
        raise TypeError(f"{name}.plan() views must be a Tensor, got {type(views).__name__}")
    if views.shape[1:] != x.shape[1:] or views.dtype != x.dtype or views.device != x.device:
        raise ValueError(
            f"{name}.plan() views must be batches like x (per-sample shape "
            f"{tuple(x.shape[1:])}, {x.dtype}, {x.device}), got {tuple(views.shape)} "
            f"{views.dtype} {views.device}"
        )


def multitask_loss(
    parts: StepParts,
    x: Tensor,
    y: Tensor,
    aux_target: Optional[Tensor],
    *,
    meta: bool,
) -> tuple[dict[str, Any], Optional[Pending]]:
    """The multi-task loss of one batch, and what a meta update after it needs.

    One forward of the model on the batch and every task's views, the primary loss on the
    batch plus each task's weighted loss ``w_j mean_r sum_k t_rk ell_rk`` (targets
    detached) and any extra terms.

    Args:
        parts: the model, the tasks, their heads and the options.
        x: the (checked) batch.
        y: its primary labels.
        aux_target: fixed auxiliary labels for the tasks that take them.
        meta: make the learned tasks' targets with their graph (a meta update follows).

    Returns:
        ``({"loss", "primary_loss", "aux_loss", "task_losses", "logits"}, pending)``: the
        tensors are attached to the graph; ``pending`` is ``None`` unless ``meta`` and a
        learned task with a positive weight take part.
    """
    fwd, rng = _forward(parts, x, y, aux_target, meta)
    lp = primary_loss(fwd.z_p, y, parts.loss, parts.focal_gamma)
    loss, task_losses = lp, []
    for task, ell, t in zip(parts.tasks, fwd.ells, fwd.targets):
        la = (ell * t.detach().to(ell.dtype)).sum(1).mean()
        loss = loss + task.weight * la
        task_losses.append(la)
    for extra in fwd.extras:
        loss = loss + extra
    aux = sum(task_losses[1:], task_losses[0]) if task_losses else lp.new_zeros(())
    result = {
        "loss": loss,
        "primary_loss": lp,
        "aux_loss": aux,
        "task_losses": {_task_key(parts.tasks, j): la for j, la in enumerate(task_losses)},
        # a view of the batch-and-views logits when there are views: cloned (N x C floats),
        # so that wrappers which hook the output (FSDP) and in-place edits by the user are safe
        "logits": fwd.z_p if fwd.z_p._base is None else fwd.z_p.clone(),
    }
    pending = None
    if fwd.learned:
        pending = Pending(
            x, y, fwd.inputs, fwd.plans, fwd.views, fwd.learned,
            [fwd.ells[j].detach() for j in fwd.learned], [fwd.targets[j] for j in fwd.learned],
            rng, _autocast_state(x.device),
        )  # fmt: skip
    return result, pending


def _autocast_state(device: torch.device) -> Optional[tuple[str, torch.dtype]]:
    kind = device.type
    try:
        if torch.is_autocast_enabled(kind):
            return kind, torch.get_autocast_dtype(kind)
    except (TypeError, RuntimeError):  # a device type without autocast
        return None
    return None


def _step(
    parts: StepParts,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    gen_optimizer: Optional[torch.optim.Optimizer],
    aux_target: Optional[Tensor],
    params: list[Tensor],
    do_meta: bool,
    meta_xy: Optional[tuple[Tensor, Tensor]],
) -> dict[str, Any]:
    losses, pending = multitask_loss(parts, x, y, aux_target, meta=do_meta)
    loss, lp = losses["loss"], losses["primary_loss"]
    shared, g_p = _primary_grads(parts, lp, params) if parts.diagnostics else ([], [])
    grads = list(torch.autograd.grad(loss, params, allow_unused=True))
    present = [i for i, g in enumerate(grads) if g is not None]
    parts.ranks.average([grads[i] for i in present])  # type: ignore[misc]
    result = _result(losses)
    if parts.diagnostics:
        result["grad_cosine"] = _grad_cosine(parts, shared, g_p, grads)
    if not all_finite([loss, *grads]):
        return _nonfinite(parts, result, "multi-task loss or gradient")

    gen_grads: Optional[list[Optional[Tensor]]] = None
    gen_params = [p for t in parts.tasks for p in t.meta_parameters()]
    if pending is not None:
        gen_grads, meta_loss = meta_gradient(parts, pending, optimizer, params, grads, meta_xy)
        result["meta_loss"] = meta_loss
        result["meta_mode"] = parts.jvp.mode
        if not all_finite([meta_loss, *gen_grads]):
            return _nonfinite(parts, result, "meta loss or meta-gradient")

    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    if gen_grads is not None and gen_optimizer is not None:
        for p, g in zip(gen_params, gen_grads):
            p.grad = g
        gen_optimizer.step()
        result["meta_updated"] = True
    return result


def _result(losses: dict[str, Any]) -> dict[str, Any]:
    """:func:`multitask_loss`'s results detached, with the step's other entries."""
    return {
        "loss": losses["loss"].detach(),
        "primary_loss": losses["primary_loss"].detach(),
        "aux_loss": losses["aux_loss"].detach(),
        "task_losses": {k: la.detach() for k, la in losses["task_losses"].items()},
        "meta_loss": None,
        "logits": losses["logits"].detach(),
        "meta_updated": False,
        "meta_mode": None,
        "skipped": 0,
    }


def _task_key(tasks: Sequence[AuxiliaryTask], j: int) -> str:
    """The task's name, with its index when several tasks share it."""
    name = tasks[j].name
    return name if sum(t.name == name for t in tasks) == 1 else f"{name}{j}"


def meta_gradient(
    parts: StepParts,
    pending: Pending,
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    grads: Sequence[Optional[Tensor]],
    meta_xy: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[list[Optional[Tensor]], Tensor]:
    """The learned tasks' meta-gradient (see :mod:`auxgen.meta`) and the meta loss.

    Args:
        parts: the model, the tasks, their heads and the options.
        pending: what the training forward left for the meta update.
        optimizer: the user's optimiser, in its state before this step (not modified).
        params: the parameters it holds.
        grads: their multi-task gradients ``G`` (``None`` where there is none), already
            averaged across ranks.
        meta_xy: the batch to measure the meta loss on (default: the forward's).

    Returns:
        The gradients of the meta-parameters of every task (in task order; ``None`` for
        those the meta objective does not reach), averaged across ranks, and the meta loss.
    """
    gen_params = [p for t in parts.tasks for p in t.meta_parameters()]
    names = {id(p): k for k, p in parts.model.named_parameters()}
    idx = [i for i, g in enumerate(grads) if g is not None and id(params[i]) in names]
    moving = [params[i] for i in idx]
    primary_loss_at, loss_matrix_at = _evaluators(
        parts, pending, [names[id(p)] for p in moving], meta_xy
    )
    base = _flat(pending.bases)
    if moving:
        u, lp_plus = lookahead_direction(
            optimizer if is_mirrored(optimizer) else sgd_stand_in(optimizer),
            moving,
            [grads[i] for i in idx],  # type: ignore[misc]
            primary_loss_at,
            reduce=parts.ranks.average if parts.ranks.world() > 1 else None,
        )
        dell = meta_jvp(
            parts.jvp,
            loss_matrix_at,
            [p.detach() for p in moving],
            u,
            base=base,
            rng=pending.rng,
            fd_eps=parts.fd_eps,
        )
    else:  # nothing moves: the labels cannot affect the primary loss
        with torch.no_grad():
            lp_plus = primary_loss_at([])
        dell = torch.zeros_like(base)
    surrogate: Optional[Tensor] = None
    reg_total: Optional[Tensor] = None
    for j, t, d in zip(pending.learned, pending.targets, _unflat(dell, pending.bases)):
        task = parts.tasks[j]
        term = task.meta_surrogate(d.detach(), t)
        reg = task.regularizer(t)
        if reg is not None:
            term = term + reg
            reg_total = reg if reg_total is None else reg_total + reg
        surrogate = term if surrogate is None else surrogate + term
    assert surrogate is not None
    gen_grads = list(torch.autograd.grad(surrogate, gen_params, allow_unused=True))
    parts.ranks.average([g for g in gen_grads if g is not None])
    meta_loss = lp_plus if reg_total is None else lp_plus + reg_total.detach()
    return gen_grads, meta_loss.detach()


def _evaluators(
    parts: StepParts,
    pending: Pending,
    keys: list[str],
    meta_xy: Optional[tuple[Tensor, Tensor]],
) -> tuple[Callable[[list[Tensor]], Tensor], Callable[[list[Tensor]], Tensor]]:
    """``theta -> L_p`` on the meta batch and ``theta -> ell`` of the learned tasks."""
    x, n = pending.x, pending.x.shape[0]
    x_m, y_m = meta_xy if meta_xy is not None else (x, pending.y)

    def run_at(values: list[Tensor], inputs: Tensor) -> Any:
        buffers = {k: b.clone() for k, b in parts.model.named_buffers()}
        return functional_call(parts.model, {**dict(zip(keys, values)), **buffers}, (inputs,))

    def primary_loss_at(values: list[Tensor]) -> Tensor:
        z = primary_logits(run_at(values, x_m), parts.output)
        return primary_loss(z, y_m, parts.loss, parts.focal_gamma)

    def loss_matrix_at(values: list[Tensor]) -> Tensor:
        inputs = pending.inputs
        _, h_all = parts.tap.run(lambda: run_at(values, inputs))
        h = h_all if inputs is x else h_all[:n]
        mats = []
        for j in pending.learned:
            task, view = parts.tasks[j], pending.views[j]
            rows = task.head_input(pending.plans[j], h, h_all[view] if view is not None else None)
            mats.append(task.loss_matrix(parts.heads[j](rows), parts.loss, parts.focal_gamma))
        return _flat(mats)

    return primary_loss_at, loss_matrix_at


def _flat(mats: list[Tensor]) -> Tensor:
    return mats[0] if len(mats) == 1 else torch.cat([m.reshape(-1) for m in mats])


def _unflat(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    if len(like) == 1:
        return [flat]
    return [c.view_as(m) for c, m in zip(torch.split(flat, [m.numel() for m in like]), like)]


def _primary_grads(
    parts: StepParts, lp: Tensor, params: list[Tensor]
) -> tuple[list[int], list[Tensor]]:
    """Indices in ``params`` of the shared parameters and ``grad L_p`` on them."""
    classifier = parts.model.get_submodule(parts.classifier_name)
    shared_ids = {id(p) for p in parts.model.parameters()} - {
        id(p) for p in classifier.parameters()
    }
    idx = [i for i, p in enumerate(params) if id(p) in shared_ids]
    if not idx:
        return [], []
    g_p = torch.autograd.grad(lp, [params[i] for i in idx], retain_graph=True, allow_unused=True)
    keep = [k for k, g in enumerate(g_p) if g is not None]
    out = [g_p[k] for k in keep]
    parts.ranks.average(out)  # type: ignore[arg-type]
    return [idx[k] for k in keep], out  # type: ignore[misc]


def _grad_cosine(
    parts: StepParts, shared: list[int], g_p: list[Tensor], grads: list[Optional[Tensor]]
) -> Optional[Tensor]:
    """Cosine of ``grad L_p`` and the auxiliary gradient ``(G - grad L_p) / sum_j w_j``."""
    weight = sum(t.weight for t in parts.tasks)
    if weight == 0 or not shared:
        return None
    dev = g_p[0].device
    acc = torch.float32 if dev.type == "mps" else torch.float64  # MPS has no float64
    dot = norm_p = norm_a = torch.zeros((), dtype=acc, device=dev)
    for i, gp in zip(shared, g_p):
        gp = gp.detach().to(acc).flatten()
        ga = (grads[i].detach().to(acc).flatten() - gp) / weight  # type: ignore[union-attr]
        dot = dot + gp @ ga
        norm_p = norm_p + gp @ gp
        norm_a = norm_a + ga @ ga
    return dot / (norm_p * norm_a).sqrt()


def _nonfinite(parts: StepParts, result: dict[str, Any], what: str) -> dict[str, Any]:
    if parts.nonfinite == "raise":
        raise NonFiniteError(
            f"non-finite {what} (loss={float(result['loss']):.4g}); no parameter, buffer or "
            "optimiser state was changed. Pass nonfinite='skip' to skip such steps"
        )
    logger.warning("skipping a step with a non-finite %s", what)
    result["skipped"] = 1
    return result
