r"""A task's loss weight learned by the meta-gradient (Auto-lambda; Liu, Johns & Davison, 2022).

:class:`LearnedWeight` is a task's :class:`~auxgen.tasks.TaskWeight` whose value
``w = exp(s)`` is learned by the same exact meta-gradient that trains MAXL's generator: with
``c = w t / R`` the coefficients of the task's per-class losses in the multi-task loss,
``dL_p(theta+)/ds = sum_rk d_rk c_rk``, ``d`` being the directional derivative of the
losses along the look-ahead (see :mod:`auxgen.meta`). It is held by the task
(``TransformLabels(weight=LearnedWeight(1.0))``); ``LearnedWeight(task)`` gives the task
such a weight, starting from its own.
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch
from torch import Tensor, nn

from .base import AuxiliaryTask, TaskWeight

__all__ = ["LearnedWeight"]


class LearnedWeight(TaskWeight):
    """A loss weight learned by the meta-gradient (train it with the generator's optimiser).

    Args:
        value: the initial weight (positive); or a task with fixed targets, which then gets
            a learned weight starting from its own (and is returned).

    Attributes:
        log_weight: the parameter ``s``; the weight is ``exp(s)``.

    Example:
        >>> import torch, torch.nn as nn
        >>> from auxgen import AuxiliaryLabeler, LearnedWeight, TransformLabels
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> task = TransformLabels(form="predict", weight=LearnedWeight(0.5))
        >>> labeler = AuxiliaryLabeler(model, tasks=task)
        >>> opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1)
        >>> gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=0.1)
        >>> out = labeler.step(torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 0, 1]), opt, gen_opt)
        >>> out["meta_updated"], task.weight != 0.5
        (True, True)
    """

    learned = True

    def __new__(cls, value: Union[float, AuxiliaryTask] = 1.0) -> Any:
        if isinstance(value, AuxiliaryTask):  # LearnedWeight(task): that task, weight learned
            task = value
            if task.learned:
                raise ValueError(
                    f"task must have fixed targets, got {type(task).__name__}, whose targets "
                    "are learned"
                )
            if task.weight <= 0:
                raise ValueError(f"task's weight must be positive to be learned, got {task.weight}")
            task.loss_weight = LearnedWeight(task.weight)
            return task
        return super().__new__(cls)

    def __init__(self, value: float = 1.0) -> None:
        super().__init__(value)
        if self._value <= 0:
            raise ValueError(f"a learned weight must start positive, got {value!r}")
        self.log_weight = nn.Parameter(torch.tensor(math.log(self._value)))

    @property
    def value(self) -> float:
        """The current weight, ``exp(log_weight)``."""
        return float(self.log_weight.detach().exp())

    def meta_parameters(self) -> list[nn.Parameter]:
        return [self.log_weight]

    def meta_surrogate(self, d: Tensor, t: Tensor) -> Tensor:
        coefficient = self.log_weight.exp() / t.shape[0]
        return (d.to(t.dtype) * t).sum() * coefficient.to(t.dtype)
