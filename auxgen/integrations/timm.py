"""timm: the labeler as a training task in the shape of ``timm.task``.

timm's training tasks (``timm/task/``) are modules whose ``task(input, target)`` returns a
dict with the ``"loss"`` to backward and the ``"output"`` logits; the training loop does the
rest. :class:`AuxiliaryTrainingTask` is that for an :class:`~auxgen.AuxiliaryLabeler`: a
subclass of ``timm.task.TrainingTask`` when the installed timm has it (timm >= 1.0.20), else
a plain module of the same shape.

Example:
    >>> import timm, torch
    >>> from auxgen import AuxiliaryLabeler, TransformLabels
    >>> from auxgen.integrations.timm import AuxiliaryTrainingTask
    >>> model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    >>> task = AuxiliaryTrainingTask(AuxiliaryLabeler(model, tasks=TransformLabels()))
    >>> out = task(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    >>> out["loss"].backward()
    >>> sorted(out)
    ['aux_loss', 'loss', 'output', 'primary_loss', 'task_losses']
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..labeler import AuxiliaryLabeler

try:  # timm >= 1.0.20
    from timm.task import TrainingTask as _Base

    HAS_TIMM_TASK = True
except ImportError:  # an older timm: the same shape on a plain module
    _Base = nn.Module  # type: ignore[assignment,misc]
    HAS_TIMM_TASK = False

__all__ = ["AuxiliaryTrainingTask", "HAS_TIMM_TASK"]


class AuxiliaryTrainingTask(_Base):  # type: ignore[misc,valid-type]
    """``task(input, target)`` -> ``{"loss", "output", "primary_loss", "aux_loss", ...}``.

    Args:
        labeler: the labeler (its model, heads and tasks are the trainable module).
        device: device of the task's own tensors (timm's ``TrainingTask`` argument).
        dtype: their dtype.
        verbose: timm's info logging.

    Attributes:
        trainable_module: the labeler, or the ``DistributedDataParallel`` that wraps it
            after :meth:`prepare_distributed`.
    """

    def __init__(
        self,
        labeler: AuxiliaryLabeler,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
    ) -> None:
        if not isinstance(labeler, AuxiliaryLabeler):
            raise TypeError(f"labeler must be an AuxiliaryLabeler, got {type(labeler).__name__}")
        if HAS_TIMM_TASK:
            super().__init__(device=device, dtype=dtype, verbose=verbose)
        else:
            super().__init__()
        self.trainable_module = labeler

    @property
    def labeler(self) -> AuxiliaryLabeler:
        """The labeler, unwrapped from ``DistributedDataParallel``."""
        return getattr(self.trainable_module, "module", self.trainable_module)

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs: Any) -> Any:
        """Wrap the labeler in ``DistributedDataParallel`` (its forward computes the loss)."""
        from torch.nn.parallel import DistributedDataParallel

        self.trainable_module = DistributedDataParallel(
            self.trainable_module, device_ids=device_ids, **ddp_kwargs
        )
        return self

    def forward(self, input: Tensor, target: Tensor) -> dict[str, Any]:  # noqa: A002 - timm's name
        out = self.trainable_module(input, target)
        return {
            "loss": out["loss"],
            "output": out["logits"],
            "primary_loss": out["primary_loss"].detach(),
            "aux_loss": out["aux_loss"].detach(),
            "task_losses": {k: v.detach() for k, v in out["task_losses"].items()},
        }

    def meta_step(self, optimizer: Any, gen_optimizer: Any, **kwargs: Any) -> dict[str, Any]:
        """The labeler's :meth:`~auxgen.AuxiliaryLabeler.meta_step` (between backward and step)."""
        return self.labeler.meta_step(optimizer, gen_optimizer, **kwargs)
