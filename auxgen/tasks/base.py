r"""The auxiliary-task contract: where an auxiliary head's targets come from.

An :class:`AuxiliaryTask` is a small ``nn.Module``. It owns its auxiliary head (an
``nn.Linear(feature_dim, num_outputs)`` on the features that feed the model's classifier,
built when the labeler attaches the task) and its loss weight, and tells the step, at every
training step, three things:

1. :meth:`~AuxiliaryTask.outputs`: once, the sizes of the head's softmax groups (``[K]``
   for one ``K``-way softmax); ``num_outputs`` is their sum;
2. :meth:`~AuxiliaryTask.plan`: before the forward, which extra inputs (*views*, e.g. the
   batch rotated) the model must also see, and the targets if they are known already;
3. :meth:`~AuxiliaryTask.head_input`: after the forward, which rows of features the head
   sees (the batch's own by default; with views, the rows the targets describe), and,
   when the plan had none, :meth:`~AuxiliaryTask.targets`.

Targets are soft rows ``(R, num_outputs)`` (one-hot rows for hard labels), one per row of
the head's input, and the task's loss is ``mean_r sum_k t_rk ell_rk`` with ``ell`` the
per-class losses of the head's logits. An ordinary task implements ``outputs`` and
``plan`` (and ``head_input`` when it has views): see ``examples/custom_task.py`` and
docs/custom_task.md. The step checks what a task returns (views, the head's rows, the
targets' shape and dtype) and names the task when something does not fit.

A *learned* task, whose targets come from parameters trained by the meta-gradient (MAXL's
generator), subclasses :class:`LearnedTask`, which adds the hooks only it needs. A task's
loss weight is a :class:`TaskWeight` (fixed) or a :class:`~auxgen.LearnedWeight` (learned
by the same meta-gradient, Auto-lambda). Keeping the auxiliary loss linear in ``t`` is what
lets the step compute the exact meta-gradient with one Jacobian-vector product (see
:mod:`auxgen.meta`). The step calls tasks; tasks never call the step or the labeler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..backbone import OutputSpec

__all__ = [
    "AuxiliaryTask", "LearnedTask", "TaskContext", "TaskPlan", "TaskWeight", "check_weight",
    "widen",
]  # fmt: skip

#: Per-class losses of logits ``(R, K) -> (R, K)`` (:class:`auxgen.losses.Criterion`).
PerClass = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class TaskContext:
    """What a task learns about the network it is attached to (:meth:`AuxiliaryTask.setup`).

    Attributes:
        model: the user's classifier.
        num_classes: number of primary classes.
        feature_dim: width of the features that feed the classifier (and the heads).
        classifier_name: qualified name of the classifier inside ``model``.
        classifier: the classifier module.
        output: how the primary logits are found in the model's output (see
            :func:`auxgen.backbone.primary_logits`).
        factory: ``dtype`` and ``device`` of the model's parameters (for new layers).
    """

    model: nn.Module
    num_classes: int
    feature_dim: int
    classifier_name: str
    classifier: nn.Module
    output: OutputSpec = None
    factory: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskPlan:
    """One task's part of one step, made before the forward.

    Attributes:
        views: extra inputs the model forwards together with the batch, a batch like ``x``
            (their features are given to :meth:`AuxiliaryTask.head_input`), or ``None``.
        targets: soft targets ``(R, num_outputs)`` already known, or ``None`` to have
            :meth:`AuxiliaryTask.targets` make them after the forward.
        info: anything else the task wants back later in the step.
    """

    views: Optional[Tensor] = None
    targets: Optional[Tensor] = None
    info: Any = None


def widen(z: Tensor) -> Tensor:
    """float32 for half-precision logits (autocast), so losses are computed in float32."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def check_weight(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite non-negative number, else ``ValueError``."""
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


class TaskWeight(nn.Module):
    """A task's loss weight, fixed (see :class:`~auxgen.LearnedWeight` for a learned one).

    Args:
        value: the weight (``0`` turns the task off: no views, no targets).

    Example:
        >>> TaskWeight(0.5).value, TaskWeight(0.5).learned
        (0.5, False)
    """

    learned = False

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self._value = check_weight("weight", value)

    @property
    def value(self) -> float:
        """The weight as a number."""
        return self._value

    def meta_parameters(self) -> list[nn.Parameter]:
        """Parameters the meta-gradient trains (none for a fixed weight)."""
        return []

    def meta_surrogate(self, d: Tensor, t: Tensor) -> Tensor:
        """See :meth:`LearnedTask.meta_surrogate` (only a learned weight has one)."""
        raise TypeError("a fixed weight has no meta-gradient")

    def extra_repr(self) -> str:
        return f"{self.value:.4g}"


class AuxiliaryTask(nn.Module):
    """Base class of auxiliary tasks: override :meth:`outputs` and :meth:`plan` (and
    :meth:`head_input` with views, :meth:`targets` for targets made after the forward).

    Args:
        weight: weight of the task's loss in the multi-task loss: a number, a
            :class:`TaskWeight` or a :class:`~auxgen.LearnedWeight` (``0`` leaves the task
            out: no views, no targets, no gradient to its head).

    Attributes:
        name: short name, used in the step's ``task_losses``.
        head: the task's auxiliary head, ``nn.Linear(feature_dim, num_outputs)`` (built
            when the labeler attaches the task).
        groups: sizes of the head's softmax groups (from :meth:`outputs`).
        loss_weight: the weight object (:attr:`weight` is its value).
        takes_aux_target: whether the task reads ``aux_target`` (given to the step).
    """

    name: str = "task"
    takes_aux_target: bool = False

    def __init__(self, *, weight: Union[float, TaskWeight] = 1.0) -> None:
        super().__init__()
        self.loss_weight = weight if isinstance(weight, TaskWeight) else TaskWeight(weight)
        self.groups: tuple[int, ...] = ()
        self.head: Optional[nn.Linear] = None

    # ---------------------------------------------------------------- the contract
    def outputs(self, ctx: TaskContext) -> Sequence[int]:
        """The sizes of the head's softmax groups, e.g. ``[4]`` for one 4-way softmax."""
        if self.groups:  # a task that set num_outputs / groups in setup()
            return self.groups
        raise NotImplementedError(f"{type(self).__name__} must implement outputs(ctx)")

    def plan(self, x: Tensor, y: Tensor, aux_target: Optional[Tensor]) -> TaskPlan:
        """Extra inputs to forward and targets known before the forward (default: none)."""
        return TaskPlan()

    def head_input(self, plan: TaskPlan, h: Tensor, h_views: Optional[Tensor]) -> Tensor:
        """The head's rows ``(R, feature_dim)``: ``h`` (the batch's features, default) or
        rows made from ``h_views`` (the views' features, in the views' order)."""
        return h

    def targets(self, plan: TaskPlan, x: Tensor, y: Tensor, h: Tensor) -> Tensor:
        """Soft targets ``(R, num_outputs)`` of the head's rows (default: ``plan.targets``)."""
        if plan.targets is None:
            raise ValueError(
                f"{self._who()}: plan() made no targets; return TaskPlan(targets=...) or "
                "override targets()"
            )
        return plan.targets

    # --------------------------------------------------------------- optional hooks
    def setup(self, ctx: TaskContext) -> None:
        """Build what the task needs from the network (called once, before :meth:`outputs`)."""

    def extra_loss(
        self, plan: TaskPlan, z_p: Tensor, z_views: Optional[Tensor], z: Tensor
    ) -> Optional[Tensor]:
        """A loss term beyond ``mean_r sum_k t_rk ell_rk``, already weighted (default none).

        Args:
            plan: this step's plan.
            z_p: the primary logits of the batch.
            z_views: the primary logits of the task's views (``None`` without views).
            z: the task's head logits.
        """
        return None

    def class_count(self) -> Optional[int]:
        """The number of primary classes the task was built for, if it says (``len(psi)``)."""
        return None

    # ---------------------------------------------------------------- the machinery
    @property
    def weight(self) -> float:
        """The task's loss weight (:attr:`loss_weight`'s value)."""
        return self.loss_weight.value

    @property
    def num_outputs(self) -> int:
        """Width of the head: the sum of :attr:`groups`."""
        return sum(self.groups)

    @num_outputs.setter
    def num_outputs(self, value: int) -> None:  # one softmax group of ``value`` outputs
        self.groups = (int(value),) if value else ()

    @property
    def learned(self) -> bool:
        """Whether the meta-gradient trains something of the task (targets or weight)."""
        return bool(self.loss_weight.learned)

    def attach(self, ctx: TaskContext) -> None:
        """Set the task up on a network and build its head (the labeler calls it once)."""
        if self.head is not None:
            raise ValueError(f"{self._who()} is already attached to a labeler")
        self.setup(ctx)
        groups = tuple(self.outputs(ctx))
        if not groups or any(
            isinstance(g, bool) or not isinstance(g, int) or g <= 0 for g in groups
        ):
            raise ValueError(
                f"{self._who()}: outputs(ctx) must give the head's softmax sizes, positive "
                f"ints such as [4], got {list(groups)}"
            )
        self.groups = groups
        self.head = nn.Linear(ctx.feature_dim, self.num_outputs, **ctx.factory)
        self.loss_weight.to(device=ctx.factory.get("device"))

    def loss_matrix(self, logits: Tensor, per_class: PerClass) -> Tensor:
        """Per-class losses ``(R, num_outputs)``: one ``per_class`` per softmax group,
        computed in float32 or wider."""
        z = widen(logits)
        if len(self.groups) <= 1:
            return per_class(z)
        return torch.cat([per_class(p) for p in torch.split(z, list(self.groups), 1)], dim=1)

    def step_targets(self, plan: TaskPlan, x: Tensor, y: Tensor, h: Tensor, grad: bool) -> Tensor:
        """The targets the step uses: the plan's, else :meth:`targets`."""
        return plan.targets if plan.targets is not None else self.targets(plan, x, y, h)

    def meta_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the meta-gradient (a learned weight's, if any)."""
        return self.loss_weight.meta_parameters()

    def meta_surrogate(self, d: Tensor, t: Tensor) -> Tensor:
        """The meta-gradient's surrogate of a learned weight (see :class:`LearnedTask`)."""
        return self.loss_weight.meta_surrogate(d, t)

    def regularizer(self, t: Tensor) -> Optional[Tensor]:
        """Extra terms of the meta objective (none for an ordinary task)."""
        return None

    def check_rows(self, rows: Any, targets: Any) -> None:
        """What the step checks at every step: rows ``(R, feature_dim)`` and float targets
        ``(R, num_outputs)`` (one per row), naming this task when they do not fit."""
        if not isinstance(rows, Tensor) or rows.dim() != 2:
            got = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(
                f"{self._who()}: head_input() must return the head's rows (R, feature_dim), "
                f"got {got}"
            )
        if not isinstance(targets, Tensor):
            raise TypeError(f"{self._who()}: targets must be a Tensor, got {type(targets)}")
        if not targets.is_floating_point():
            raise TypeError(
                f"{self._who()}: targets must be soft rows (R, {self.num_outputs}) of floats, "
                f"got {targets.dtype}; for class indices use F.one_hot(labels, "
                f"{self.num_outputs}).float()"
            )
        want = (rows.shape[0], self.num_outputs)
        if tuple(targets.shape) != want:
            why = (
                " (head_input() gives the batch's own rows unless overridden: with views, "
                "return the rows the targets describe)"
                if targets.dim() == 2 and targets.shape[1] == self.num_outputs
                else f" (num_outputs = sum of outputs(ctx) = {self.num_outputs})"
            )
            raise ValueError(
                f"{self._who()}: targets must be (rows of head_input(), num_outputs) = "
                f"{want}, got {tuple(targets.shape)}{why}"
            )

    def _who(self) -> str:
        return f"{type(self).__name__} (name {self.name!r})"

    def extra_repr(self) -> str:
        return f"weight={self.weight:.4g}, groups={list(self.groups)}"


class LearnedTask(AuxiliaryTask):
    """A task whose targets come from parameters trained by the meta-gradient (MAXL).

    On top of :class:`AuxiliaryTask`: :meth:`targets` builds the graph to the
    meta-parameters when ``grad`` is set, :meth:`meta_parameters` names them,
    :meth:`regularizer` adds terms to their objective, and :meth:`meta_surrogate` turns the
    directional derivative of the losses into their meta-gradient.
    """

    @property
    def learned(self) -> bool:
        return True

    def attach(self, ctx: TaskContext) -> None:
        if self.loss_weight.learned:
            raise ValueError(
                f"{self._who()}: its targets are learned, so its weight cannot be learned too; "
                "give it a fixed weight"
            )
        super().attach(ctx)

    def targets(  # type: ignore[override]
        self, plan: TaskPlan, x: Tensor, y: Tensor, h: Tensor, *, grad: bool = False
    ) -> Tensor:
        """Soft targets of the head's rows, with the graph to :meth:`meta_parameters` when
        ``grad`` (a meta step)."""
        raise NotImplementedError(f"{type(self).__name__} must implement targets()")

    def step_targets(self, plan: TaskPlan, x: Tensor, y: Tensor, h: Tensor, grad: bool) -> Tensor:
        if plan.targets is not None:
            return plan.targets
        return self.targets(plan, x, y, h, grad=grad)

    def meta_parameters(self) -> list[nn.Parameter]:
        """The parameters that make the targets (default: all but the head's)."""
        head = {id(p) for p in self.head.parameters()} if self.head is not None else set()
        return [p for p in self.parameters() if id(p) not in head]

    def meta_surrogate(self, d: Tensor, t: Tensor) -> Tensor:
        """A scalar whose gradient with respect to :meth:`meta_parameters` is the meta-gradient.

        The multi-task loss holds ``sum_rk c_rk ell_rk`` with ``c = weight * t / R``, and
        ``d = dL_p(theta+) / dc`` (the directional derivative of ``ell`` along the
        look-ahead). For targets ``t`` made by the meta-parameters: ``sum(d * weight / R * t)``.
        """
        return ((d * (self.weight / t.shape[0])).to(t.dtype) * t).sum()
