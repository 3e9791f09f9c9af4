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
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .backbone import FeatureTap
from .distributed import Ranks
from .losses import Criterion
from .meta import JVPPlan, RNGState, lookahead_direction, meta_jvp
from .mirror import is_mirrored, sgd_stand_in
from .tasks.base import AuxiliaryTask, TaskPlan

__all__ = [
    "Batch", "NonFiniteError", "Pending", "StepParts", "kept_buffers", "meta_gradient",
    "multitask_loss", "training_step",
]  # fmt: skip

logger = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite loss or gradient; nothing was updated."""


@dataclass(frozen=True)
class StepParts:
    """What a step works on, built once by the labeler: the model, its tasks (each with its
    head), how the logits are found, the loss and the options."""

    model: nn.Module
    tap: FeatureTap
    tasks: tuple[AuxiliaryTask, ...]
    logits: Callable[[Any], Tensor]
    criterion: Criterion
    jvp: JVPPlan
    ranks: Ranks
    classifier_name: str
    fd_eps: Optional[float] = None
    nonfinite: str = "raise"
    diagnostics: bool = False


@dataclass(frozen=True)
class Batch:
    """One step's data: the batch, its labels, fixed auxiliary labels and a meta batch."""

    x: Tensor
    y: Tensor
    aux_target: Optional[Tensor] = None
    meta_batch: Optional[tuple[Tensor, Tensor]] = None


@dataclass
class _Row:
    """One active task's part of a forward: its plan, rows of the inputs, losses, targets."""

    task: AuxiliaryTask
    plan: TaskPlan
    view: Optional[slice]
    ell: Optional[Tensor] = None
    target: Optional[Tensor] = None


@dataclass
class Pending:
    """What a meta update needs from the training forward it follows.

    Attributes:
        x: the batch.
        y: its primary labels.
        inputs: the batch and every task's views, as forwarded.
        learned: the learned tasks' parts of the forward (plan, rows of ``inputs``, their
            per-class losses detached, their targets with the graph to the meta-parameters).
        rng: the random state before the forward (dropout masks are replayed).
        autocast: ``(device_type, dtype)`` of the autocast region the forward ran in.
    """

    x: Tensor
    y: Tensor
    inputs: Tensor
    learned: list[_Row]
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
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    gen_optimizer: Optional[torch.optim.Optimizer],
    do_meta: bool,
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
        out = _step(parts, batch, (optimizer, gen_optimizer), params, do_meta)
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


def _plan(parts: StepParts, batch: Batch) -> tuple[list[_Row], Tensor]:
    """The active tasks' plans (tasks of weight 0 are left out once, here), and the inputs:
    the batch and every task's views, to forward together."""
    x, y, chunks, start = batch.x, batch.y, [batch.x], batch.x.shape[0]
    rows = []
    for task in parts.tasks:
        if task.weight <= 0:
            continue
        plan = task.plan(x, y, batch.aux_target if task.takes_aux_target else None)
        view = None
        if plan.views is not None:
            check_views(task, plan.views, x)
            chunks.append(plan.views)
            view = slice(start, start + plan.views.shape[0])
            start += plan.views.shape[0]
        rows.append(_Row(task, plan, view))
    return rows, torch.cat(chunks) if len(chunks) > 1 else x


def multitask_loss(
    parts: StepParts, batch: Batch, *, meta: bool
) -> tuple[dict[str, Any], Optional[Pending]]:
    """The multi-task loss of one batch, and what a meta update after it needs.

    One forward of the model on the batch and every active task's views, the primary loss on
    the batch plus each task's weighted loss ``w_j mean_r sum_k t_rk ell_rk`` (targets
    detached) and any extra terms. A task of weight 0 adds nothing (its head gets a zero
    gradient, so that every parameter takes part, as ``DistributedDataParallel`` expects).

    Args:
        parts: the model, the tasks and the options.
        batch: the (checked) batch.
        meta: make the learned tasks' targets with their graph (a meta update follows).

    Returns:
        ``({"loss", "primary_loss", "aux_loss", "task_losses", "logits"}, pending)``: the
        tensors are attached to the graph; ``pending`` is ``None`` unless ``meta`` and a
        learned task with a positive weight take part.
    """
    x, y, n = batch.x, batch.y, batch.x.shape[0]
    rows, inputs = _plan(parts, batch)
    rng = RNGState(x.device) if meta else None
    out, h_all = parts.tap.run(lambda: parts.model(inputs))
    z_all = parts.logits(out)
    z_p, h = (z_all, h_all) if inputs is x else (z_all[:n], h_all[:n])
    lp = parts.criterion.primary(z_p, y)
    loss, losses = lp, {}
    for row in rows:
        task, view = row.task, row.view
        h_views = h_all[view] if view is not None else None
        head_rows = task.head_input(row.plan, h, h_views)
        z = task.head(head_rows)
        row.ell = task.loss_matrix(z, parts.criterion)
        t = task.step_targets(row.plan, x, y, h, meta and task.learned)
        task.check_rows(head_rows, t)
        fixed = row.plan.targets is not None  # known before the forward: in the head's dtype
        row.target = t.to(device=z.device, dtype=z.dtype) if fixed else t
        la = (row.ell * row.target.detach().to(row.ell.dtype)).sum(1).mean()
        loss = loss + task.weight * la
        losses[task] = la
        extra = task.extra_loss(row.plan, z_p, z_all[view] if view is not None else None, z)
        if extra is not None:
            loss = loss + extra
    zero = lp.new_zeros(())
    for task in parts.tasks:
        if task.weight <= 0:  # a zero gradient for its head, a zero entry in task_losses
            loss = loss + sum((p * 0.0).sum() for p in task.head.parameters())
            losses[task] = zero
    task_losses = {_task_key(parts.tasks, j): losses[t] for j, t in enumerate(parts.tasks)}
    result = {
        "loss": loss,
        "primary_loss": lp,
        "aux_loss": sum(task_losses.values(), zero),
        "task_losses": task_losses,
        # a view of the batch-and-views logits when there are views: cloned (N x C floats),
        # so that wrappers which hook the output (FSDP) and in-place edits by the user are safe
        "logits": z_p if z_p._base is None else z_p.clone(),
    }
    learned = [r for r in rows if meta and r.task.learned]
    for r in learned:
        r.ell = r.ell.detach()  # type: ignore[union-attr]
    pending = Pending(x, y, inputs, learned, rng, _autocast_state(x.device)) if learned else None
    return result, pending


def check_views(task: AuxiliaryTask, views: Any, x: Tensor) -> None:
    """A task's views must be a batch like ``x``: same per-sample shape, dtype and device."""
    name = f"{type(task).__name__} (name {task.name!r})"
    if not isinstance(views, Tensor):
        raise TypeError(f"{name}: plan() views must be a Tensor, got {type(views).__name__}")
    if views.shape[1:] != x.shape[1:] or views.dtype != x.dtype or views.device != x.device:
        raise ValueError(
            f"{name}: plan() views must be batches like x (per-sample shape "
            f"{tuple(x.shape[1:])}, {x.dtype}, {x.device}), got {tuple(views.shape)} "
            f"{views.dtype} {views.device}"
        )


def _autocast_state(device: torch.device) -> Optional[tuple[str, torch.dtype]]:
    kind = device.type
    try:
        if torch.is_autocast_enabled(kind):
            return kind, torch.get_autocast_dtype(kind)
    except (TypeError, RuntimeError):  # a device type without autocast
        return None
    return None


Optimizers = tuple[torch.optim.Optimizer, Optional[torch.optim.Optimizer]]


def _step(
    parts: StepParts, batch: Batch, optimizers: Optimizers, params: list[Tensor], do_meta: bool
) -> dict[str, Any]:
    optimizer, gen_optimizer = optimizers
    losses, pending = multitask_loss(parts, batch, meta=do_meta)
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
        gen_grads, meta_loss = meta_gradient(
            parts, pending, optimizer, params, grads, batch.meta_batch
        )
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
        parts: the model, the tasks and the options.
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
    bases = [r.ell for r in pending.learned]
    base = _flat(bases)  # type: ignore[arg-type]
    if moving:
        u, lp_plus = lookahead_direction(
            optimizer if is_mirrored(optimizer) else sgd_stand_in(optimizer),
            moving,
            [grads[i] for i in idx],  # type: ignore[misc]
            primary_loss_at,
            reduce=parts.ranks.average if parts.ranks.world() > 1 else None,
        )
        dell = meta_jvp(
            parts.jvp, loss_matrix_at, [p.detach() for p in moving], u, base=base,
            rng=pending.rng, fd_eps=parts.fd_eps,
        )  # fmt: skip
    else:  # nothing moves: the labels cannot affect the primary loss
        with torch.no_grad():
            lp_plus = primary_loss_at([])
        dell = torch.zeros_like(base)
    surrogate: Optional[Tensor] = None
    reg_total: Optional[Tensor] = None
    for row, d in zip(pending.learned, _unflat(dell, bases)):  # type: ignore[arg-type]
        term = row.task.meta_surrogate(d.detach(), row.target)  # type: ignore[arg-type]
        reg = row.task.regularizer(row.target)  # type: ignore[arg-type]
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
        return parts.criterion.primary(parts.logits(run_at(values, x_m)), y_m)

    def loss_matrix_at(values: list[Tensor]) -> Tensor:
        inputs = pending.inputs
        _, h_all = parts.tap.run(lambda: run_at(values, inputs))
        h = h_all if inputs is x else h_all[:n]
        mats = []
        for row in pending.learned:
            h_views = h_all[row.view] if row.view is not None else None
            z = row.task.head(row.task.head_input(row.plan, h, h_views))
            mats.append(row.task.loss_matrix(z, parts.criterion))
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
