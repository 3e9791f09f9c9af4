r"""A task's loss weight learned by the meta-gradient (Auto-lambda; Liu, Johns & Davison, 2022).

:class:`LearnedWeight` wraps a task whose targets are fixed (transformation labels, human
labels) and learns the weight ``w = exp(s)`` of its loss by the same exact meta-gradient
that trains MAXL's generator: with ``c = w t / R`` the coefficients of the task's per-class
losses in the multi-task loss, ``dL_p(theta+)/ds = sum_rk d_rk c_rk``, ``d`` being the
directional derivative of the losses along the look-ahead (see :mod:`auxgen.meta`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .base import AuxiliaryTask, TaskContext, TaskPlan

__all__ = ["LearnedWeight"]


class LearnedWeight(AuxiliaryTask):
    """Learn the loss weight of ``task`` by the meta-gradient (train it with ``gen_optimizer``).

    Args:
        task: the task whose weight is learned (its own ``weight`` is the initial value,
            which must be positive); its targets must not be learned themselves.

    Attributes:
        task: the wrapped task.
        log_weight: the parameter ``s``; the weight is ``exp(s)``.

    Example:
        >>> import torch, torch.nn as nn
        >>> from auxgen import AuxiliaryLabeler, LearnedWeight, TransformLabels
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> task = LearnedWeight(TransformLabels(form="predict", weight=0.5))
        >>> labeler = AuxiliaryLabeler(model, tasks=task)
        >>> opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1)
        >>> gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=0.1)
        >>> out = labeler.step(torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 0, 1]), opt, gen_opt)
        >>> out["meta_updated"], task.weight != 0.5
        (True, True)
    """

    learned = True

    def __init__(self, task: AuxiliaryTask) -> None:
        if not isinstance(task, AuxiliaryTask):
            raise TypeError(f"task must be an AuxiliaryTask, got {type(task).__name__}")
        if task.learned:
            raise ValueError(
                f"task must have fixed targets, got {type(task).__name__}, whose targets are "
                "learned"
            )
        if task.weight <= 0:
            raise ValueError(f"task's weight must be positive to be learned, got {task.weight}")
        super().__init__(weight=task.weight)
        self.task = task
        self.log_weight = nn.Parameter(torch.tensor(math.log(task.weight)))
        self.name = task.name
        self.takes_aux_target = task.takes_aux_target

    @property  # type: ignore[override]
    def weight(self) -> float:
        """The current weight, ``exp(log_weight)``."""
        s = self._parameters.get("log_weight")
        return float(s.detach().exp()) if s is not None else self._initial_weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._initial_weight = float(value)

    def setup(self, ctx: TaskContext) -> None:
        self.task.setup(ctx)
        self._set_outputs(self.task.groups)
        self.log_weight.data = self.log_weight.data.to(device=ctx.factory.get("device"))

    def plan(self, x: Tensor, y: Tensor, aux_target: Optional[Tensor]) -> TaskPlan:
        return self.task.plan(x, y, aux_target)

    def head_input(self, plan: TaskPlan, h: Tensor, h_views: Optional[Tensor]) -> Tensor:
        return self.task.head_input(plan, h, h_views)

    def targets(
        self, plan: TaskPlan, x: Tensor, y: Tensor, h: Tensor, *, grad: bool = False
    ) -> Tensor:
        return self.task.targets(plan, x, y, h)

    def loss_matrix(self, logits: Tensor, loss: str = "ce", gamma: float = 2.0) -> Tensor:
        return self.task.loss_matrix(logits, loss, gamma)

    def extra_loss(
        self, plan: TaskPlan, z_p: Tensor, z_views: Optional[Tensor], z: Tensor
    ) -> Optional[Tensor]:
        return self.task.extra_loss(plan, z_p, z_views, z)

    def class_count(self) -> Optional[int]:
        return self.task.class_count()

    def meta_parameters(self) -> list[nn.Parameter]:
        return [self.log_weight]

    def meta_surrogate(self, d: Tensor, t: Tensor) -> Tensor:
        coefficient = self.log_weight.exp() / t.shape[0]
        return (d.to(t.dtype) * t).sum() * coefficient.to(t.dtype)

    def extra_repr(self) -> str:
        return f"weight={self.weight:.4g}"
