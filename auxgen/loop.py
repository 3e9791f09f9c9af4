"""The labeler inside the user's own training loop: what the loss form and ``meta_step`` need.

:meth:`auxgen.AuxiliaryLabeler.forward` with labels returns the multi-task loss, which the
user backwards, clips, scales and steps as any loss; a learned task is then updated by
:meth:`auxgen.AuxiliaryLabeler.meta_step` between that ``backward`` and ``optimizer.step()``.
This module holds the parts of that path that are not the step's maths:

* :func:`loss_forward`: ``labeler(x, y)``'s body;
* :func:`meta_update`: ``meta_step``'s body (checks, the gradient scaler, non-finite
  gradients, the generator's update);
* :class:`HeadGuard`: refuses an optimiser that steps the model but not the auxiliary heads
  (built from ``model.parameters()``), which would otherwise leave them untrained silently;
* :func:`unwrap_optimizer`: the ``torch.optim`` optimiser inside a framework's wrapper;
* :func:`ddp_ignored`: the parameters ``DistributedDataParallel`` must not wait for.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from .checks import check_meta_batch, check_optimizers
from .distributed import check_sync_batchnorm
from .step import Batch, NonFiniteError, all_finite, meta_gradient, multitask_loss

if TYPE_CHECKING:
    from .labeler import AuxiliaryLabeler

__all__ = [
    "HeadGuard", "ddp_ignored", "ignore_meta_parameters", "loop_state", "loss_forward",
    "meta_update",
    "trained_head_parameters", "unwrap_optimizer",
]  # fmt: skip

logger = logging.getLogger(__name__)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim`` optimiser inside a framework's wrapper (Accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``); others as they are.

    Example:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> unwrap_optimizer(opt) is opt
        True
    """
    for _ in range(4):  # Accelerate's wrapper is itself an Optimizer subclass: look inside
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def _unscale(scaler: Any, optimizer: Any) -> None:
    """``scaler.unscale_(optimizer)`` unless it was already called since the last update."""
    try:
        scaler.unscale_(unwrap_optimizer(optimizer))
    except RuntimeError as exc:
        if "already been called" not in str(exc):
            raise


def ddp_ignored(tasks: Sequence[nn.Module]) -> list[str]:
    """Names, relative to the labeler, of the parameters only the meta-gradient trains.

    ``DistributedDataParallel`` reads them from ``_ddp_params_and_buffers_to_ignore``: the
    multi-task loss never reaches them, so it must not wait for their gradients, and
    ``meta_step`` averages their meta-gradient across ranks itself.
    """
    return [
        f"tasks.{i}.{name}"
        for i, task in enumerate(tasks)
        for name, p in task.named_parameters()
        if any(p is q for q in task.meta_parameters())  # type: ignore[operator]
    ]


def ignore_meta_parameters(root: nn.Module) -> list[str]:
    """Tell ``DistributedDataParallel(root)`` not to wait for the meta-parameters inside it.

    A labeler wrapped in DDP directly needs nothing (it names them itself); call this on
    your own module that holds a labeler (a ``LightningModule``: the Lightning callback
    does it for you) before wrapping it.

    Returns:
        the names added to ``root._ddp_params_and_buffers_to_ignore``.

    Example:
        >>> from auxgen import AuxiliaryLabeler
        >>> outer = nn.Module()
        >>> outer.labeler = AuxiliaryLabeler(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), psi=2)
        >>> ignore_meta_parameters(outer)[:1]
        ['labeler.tasks.0.generator.0.weight']
    """
    from .labeler import AuxiliaryLabeler

    names = [
        f"{prefix}.{name}" if prefix else name
        for prefix, module in root.named_modules()
        if isinstance(module, AuxiliaryLabeler)
        for name in module._ddp_params_and_buffers_to_ignore
    ]
    known = list(getattr(root, "_ddp_params_and_buffers_to_ignore", []))
    root._ddp_params_and_buffers_to_ignore = known + [n for n in names if n not in known]
    return names


class HeadGuard:
    """Refuse an optimiser that steps the model but not the auxiliary heads.

    At each training forward it compares the parameters' in-place version counters with
    those at the previous one: an optimiser step bumps the counter of every parameter it
    holds, so "the model moved and the heads did not" means the heads are not in the
    optimiser. Gradient accumulation (no step between forwards), frozen heads and a skipped
    ``GradScaler`` step (nothing moves) pass.

    Example:
        >>> body, head = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> guard = HeadGuard()
        >>> guard.check(list(body.parameters()), list(head.parameters()))
        >>> with torch.no_grad():
        ...     _ = body.weight.add_(1.0)
        >>> guard.check(list(body.parameters()), list(head.parameters()))
        Traceback (most recent call last):
        ...
        ValueError: optimizer updated the model but not the auxiliary heads ...
    """

    def __init__(self) -> None:
        self.versions: Optional[tuple[list[int], list[int]]] = None

    def reset(self) -> None:
        """Forget the last forward's counters (after a step taken by ``labeler.step``)."""
        self.versions = None

    def check(self, body: Sequence[Tensor], heads: Sequence[Tensor]) -> None:
        """Compare with the last call's counters; raise ``ValueError`` if only the body moved."""
        try:
            now = ([p._version for p in body], [p._version for p in heads])
        except (AttributeError, RuntimeError):  # tensor subclasses without a version counter
            return
        before, self.versions = self.versions, now
        if before is None or [len(v) for v in before] != [len(v) for v in now]:
            return
        body_moved = any(a != b for a, b in zip(before[0], now[0]))
        heads_moved = any(a != b for a, b in zip(before[1], now[1]))
        if body_moved and heads and not heads_moved:
            self.versions = None
            raise ValueError(
                "optimizer updated the model but not the auxiliary heads since the last "
                "training forward, so the auxiliary tasks would stay untrained: build the "
                "optimizer over labeler.parameters() (or labeler.model_parameters()), not "
                "model.parameters()"
            )


def trained_head_parameters(labeler: AuxiliaryLabeler) -> list[nn.Parameter]:
    """The auxiliary heads' trainable parameters of the tasks that are on (weight > 0)."""
    return [
        p
        for task in labeler.tasks
        if task.weight > 0
        for p in task.head.parameters()
        if p.requires_grad
    ]


def loss_forward(
    labeler: AuxiliaryLabeler, x: Tensor, y: Tensor, aux_target: Optional[Tensor]
) -> dict[str, Any]:
    """The body of ``labeler(x, y)`` (see :meth:`auxgen.AuxiliaryLabeler.forward`).

    A training forward (train mode, gradients enabled) also checks that the last optimiser
    step moved the heads, counts the step for ``meta_every`` and keeps what
    :func:`meta_update` needs; an evaluation forward changes nothing.
    """
    x, y = labeler._check_batch(x, y)
    if aux_target is not None and not any(t.takes_aux_target for t in labeler.tasks):
        raise ValueError("aux_target was given but no task takes auxiliary labels")
    training = labeler.training and torch.is_grad_enabled()
    if training:
        body = [p for p in labeler.model.parameters() if p.requires_grad]
        labeler._guard.check(body, trained_head_parameters(labeler))
        check_sync_batchnorm(labeler, x)
    meta = (
        training
        and aux_target is None
        and any(t.learned and t.weight > 0 for t in labeler.tasks)
        and labeler._steps % labeler.meta_every == 0
    )
    result, pending = multitask_loss(labeler._parts(), Batch(x, y, aux_target), meta=meta)
    if training:
        labeler._steps += 1
        labeler._pending, labeler._forwarded = pending, True
    return result


def loop_state(tasks: Sequence[nn.Module]) -> dict[str, Any]:
    """The labeler's loss-form state, fresh: no pending forward, a new :class:`HeadGuard`,
    and the names ``DistributedDataParallel`` must not wait for (:func:`ddp_ignored`)."""
    return {
        "_pending": None,  # what meta_step() needs from the last training forward
        "_forwarded": False,  # a training forward since the last meta_step()
        "_guard": HeadGuard(),  # refuses an optimiser without the auxiliary heads
        "_ddp_params_and_buffers_to_ignore": ddp_ignored(tasks),
    }


def _result() -> dict[str, Any]:
    return {"meta_loss": None, "meta_updated": False, "meta_mode": None, "skipped": 0}


def meta_update(
    labeler: AuxiliaryLabeler,
    optimizer: Any,
    gen_optimizer: Any,
    meta_batch: Optional[tuple[Tensor, Tensor]],
    scaler: Optional[Any],
) -> dict[str, Any]:
    """The body of :meth:`auxgen.AuxiliaryLabeler.meta_step` (see there)."""
    result = _result()
    if any(t.learned for t in labeler.tasks) and not labeler._forwarded:
        raise RuntimeError(
            "meta_step() needs a training forward first: call labeler(x, y) in train mode "
            "with gradients enabled, then loss.backward(), then meta_step()"
        )
    pending = labeler._pending
    if pending is None:  # no learned task took part in the last training forward
        labeler._forwarded = False
        return result
    opt = unwrap_optimizer(optimizer)
    check_optimizers(
        opt, unwrap_optimizer(gen_optimizer), list(labeler.parameters()),
        labeler.generator_parameters(), labeler.lookahead, labeler._approximated, True,
        owner="parameters()",
    )  # fmt: skip
    meta_xy = check_meta_batch(
        meta_batch, pending.x, labeler.num_classes, labeler._device(), labeler._what()
    )
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    if all(p.grad is None for p in params):
        raise RuntimeError(
            "meta_step() found no gradients in optimizer's parameters: call "
            "loss.backward() on labeler(x, y)['loss'] before meta_step()"
        )
    labeler._pending, labeler._forwarded = None, False  # checked: this forward is used up
    if scaler is not None and scaler.is_enabled():
        _unscale(scaler, optimizer)
    grads = [p.grad for p in params]
    if not all_finite(grads):
        return _nonfinite(labeler, result, "gradient", scaler)
    region = (
        torch.autocast(pending.autocast[0], dtype=pending.autocast[1])
        if pending.autocast is not None
        else contextlib.nullcontext()
    )
    with region:
        gen_grads, meta_loss = meta_gradient(labeler._parts(), pending, opt, params, grads, meta_xy)
    result["meta_loss"], result["meta_mode"] = meta_loss, labeler.meta_mode_used
    if not all_finite([meta_loss, *gen_grads]):
        return _nonfinite(labeler, result, "meta loss or meta-gradient", scaler)
    gen_params = labeler.generator_parameters()
    for p, g in zip(gen_params, gen_grads):
        p.grad = g
    unwrap_optimizer(gen_optimizer).step()
    held = {id(p) for p in params}
    for p in gen_params:  # ``optimizer`` would apply the meta-gradient a second time
        if id(p) in held:
            p.grad = None
    result["meta_updated"] = True
    return result


def _nonfinite(
    labeler: AuxiliaryLabeler, result: dict[str, Any], what: str, scaler: Any
) -> dict[str, Any]:
    if scaler is None and labeler.nonfinite == "raise":
        raise NonFiniteError(
            f"non-finite {what} in meta_step(); the generator was not updated. Pass "
            "nonfinite='skip' to skip such updates (or scaler= with a GradScaler)"
        )
    logger.warning("meta_step(): skipping a meta update with a non-finite %s", what)
    result["skipped"] = 1
    return result
