r"""The auxiliary-task protocol: where an auxiliary head's targets come from.

An :class:`AuxiliaryTask` is a small ``nn.Module`` that the labeler attaches to the user's
network. The labeler gives each task an auxiliary head (``nn.Linear(feature_dim,
task.num_outputs)`` on the features that feed the model's classifier) and, at every step,
asks the task four things:

1. :meth:`~AuxiliaryTask.plan`: before the forward, which extra inputs (*views*, e.g. the
   batch rotated) the model must also see, and any targets already known (fixed labels);
2. :meth:`~AuxiliaryTask.head_input`: after the forward, which rows of features its head
   sees (by default the batch's own);
3. :meth:`~AuxiliaryTask.targets`: the soft targets ``t`` of those rows, ``(R,
   num_outputs)``, generated now if they were not fixed by the plan;
4. :meth:`~AuxiliaryTask.loss_matrix`: the per-class losses ``ell`` of the head's logits,
   so that the task's loss is ``mean_r sum_k t_rk ell_rk``.

Keeping the auxiliary loss linear in ``t`` is what lets the step compute the exact MAXL
meta-gradient of a *learned* task (one whose :meth:`~AuxiliaryTask.meta_parameters` make
its targets, such as MAXL's generator) with one Jacobian-vector product: the derivative of
the primary loss after the look-ahead with respect to ``t_rk`` is ``w / R`` times the
directional derivative of ``ell_rk`` along the look-ahead direction (see
:mod:`auxgen.meta`). The step calls tasks; tasks never call the step or the labeler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..backbone import OutputSpec
from ..losses import per_class_loss

__all__ = ["AuxiliaryTask", "TaskContext", "TaskPlan", "check_weight", "widen"]


@dataclass(frozen=True)
class TaskContext:
    """What a task learns about the network it is attached to (:meth:`AuxiliaryTask.setup`).

    Attributes:
        model: the user's classifier.
        num_classes: number of primary classes.
        feature_dim: width of the features that feed the classifier (and the heads).
        classifier_name: qualified name of the classifier inside ``model``.
        classifier: the classifier module.
        output: how the primary logits are found in the model's output (the labeler's
            ``output=``; see :func:`auxgen.backbone.primary_logits`).
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
        views: extra inputs the model forwards together with the batch (their features are
            given to :meth:`AuxiliaryTask.head_input`), or ``None``.
        targets: targets already known, ``(R, num_outputs)``, or ``None`` to have
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


class AuxiliaryTask(nn.Module):
    """Base class of auxiliary tasks (see the module docstring for the protocol).

    Subclasses set :attr:`num_outputs` in :meth:`setup` and override :meth:`plan` and/or
    :meth:`targets`; the defaults describe a task whose head reads the batch's own features
    and whose targets are fixed by the plan.

    Args:
        weight: weight of the task's loss in the multi-task loss (``0`` leaves the task out:
            its targets are not computed and its head gets no gradient signal).

    Attributes:
        name: short name, used in :meth:`~auxgen.AuxiliaryLabeler.step`'s ``task_losses``.
        num_outputs: width of the task's auxiliary head (set by :meth:`setup`).
        groups: sizes of the softmax groups of the head's outputs (default: one group).
        takes_aux_target: whether the task reads ``step(aux_target=...)``.
        learned: whether its targets are trained by the meta-gradient.
    """

    name: str = "task"
    takes_aux_target: bool = False
    learned: bool = False

    def __init__(self, *, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = check_weight("weight", weight)
        self.num_outputs = 0
        self.groups: tuple[int, ...] = ()

    # ------------------------------------------------------------------ protocol
    def setup(self, ctx: TaskContext) -> None:
        """Attach to a network: build parameters, set :attr:`num_outputs`. Called once."""
        raise NotImplementedError(f"{type(self).__name__} must implement setup()")

    def plan(self, x: Tensor, y: Tensor, aux_target: Optional[Tensor]) -> TaskPlan:
        """Extra inputs to forward and targets known before the forward (default: none)."""
        return TaskPlan()

    def head_input(self, plan: TaskPlan, h: Tensor, h_views: Optional[Tensor]) -> Tensor:
        """The features the head sees: ``h`` (the batch's), or rows made from ``h_views``."""
        return h

    def targets(
        self, plan: TaskPlan, x: Tensor, y: Tensor, h: Tensor, *, grad: bool = False
    ) -> Tensor:
        """Soft targets ``(R, num_outputs)`` of the head's rows (default: ``plan.targets``).

        Args:
            plan: this step's plan.
            x: the batch.
            y: its primary labels.
            h: the batch's features from the step's forward.
            grad: build the graph to :meth:`meta_parameters` (a meta step).
        """
        if plan.targets is None:
            raise RuntimeError(f"{type(self).__name__}.plan() made no targets")
        return plan.targets

    def loss_matrix(self, logits: Tensor, loss: str = "ce", gamma: float = 2.0) -> Tensor:
        """Per-class losses ``(R, num_outputs)``: the loss if the target were each output.

        Computed in float32 or wider; one softmax per entry of :attr:`groups`.
        """
        z = widen(logits)
        if len(self.groups) <= 1:
            return per_class_loss(z, loss, gamma)
        parts = torch.split(z, list(self.groups), dim=1)
        return torch.cat([per_class_loss(p, loss, gamma) for p in parts], dim=1)

    def class_count(self) -> Optional[int]:
        """The number of primary classes the task was built for, if it says (``len(psi)``)."""
        return None

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

    def regularizer(self, t: Tensor) -> Optional[Tensor]:
        """Extra terms of the meta objective of a learned task's targets (default none)."""
        return None

    def meta_surrogate(self, d: Tensor, t: Tensor) -> Tensor:
        """A scalar whose gradient with respect to :meth:`meta_parameters` is the meta-gradient.

        The multi-task loss holds ``sum_rk c_rk ell_rk`` with ``c = weight * t / R``, and
        ``d = dL_p(theta+) / dc`` (the directional derivative of ``ell`` along the
        look-ahead). Default: ``sum(d * weight / R * t)``, for targets ``t`` that depend on
        the meta-parameters (MAXL); a task whose weight is learned overrides it.
        """
        return ((d * (self.weight / t.shape[0])).to(t.dtype) * t).sum()

    def meta_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the meta-gradient (default: all of a learned task's)."""
        return list(self.parameters()) if self.learned else []

    # ------------------------------------------------------------------- helpers
    def _set_outputs(self, groups: Sequence[int]) -> None:
        self.groups = tuple(int(g) for g in groups)
        self.num_outputs = sum(self.groups)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, num_outputs={self.num_outputs}"
