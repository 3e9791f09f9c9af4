r"""MAXL's generated labels inside SLA's (class, transform) cells.

SLA's joint labels give class ``y`` seen under transform ``k`` its own auxiliary class,
the cell ``(y, k)``. :class:`GeneratedCellLabels` splits every cell further into
``psi[y]`` sub-labels invented by MAXL's label-generation network: the head sees each image
under the ``K`` transforms, and the target of image ``i`` under transform ``k`` is the
image's generated label (a softmax over its class's ``psi[y]`` children, as in
:class:`~auxgen.GeneratedLabels`) placed in cell ``(y_i, k)``. Summed over the sub-labels
it is SLA's joint label; the meta-gradient decides how each cell is split. The head has
``K * sum(psi)`` outputs, in blocks of ``sum(psi)`` per transform.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .base import TaskContext, TaskPlan, TaskWeight
from .labels import GeneratedLabels, PsiSpec
from .transforms import Transform, TransformSet

__all__ = ["GeneratedCellLabels"]


class GeneratedCellLabels(GeneratedLabels):
    r"""Generated sub-labels within each (class, transform) cell, trained by the meta-gradient.

    Args:
        psi: sub-labels per primary class (in every one of its ``K`` cells): one int per
            class, or one int for all.
        transforms: ``K >= 2`` batch-to-batch callables (``None`` for the identity), as in
            :class:`~auxgen.TransformLabels`; default the four rotations.
        names: a name per transform.
        generator: as in :class:`~auxgen.GeneratedLabels`. It labels the untransformed
            image; the label is carried into the image's cell under each transform.
        entropy_weight: weight of the anti-collapse term (see
            :class:`~auxgen.GeneratedLabels`).
        confidence_weight: weight of the mean per-image label entropy.
        label_temperature: temperature of the generated labels.
        weight: weight of the task's loss (the mean over the ``K`` views).

    Attributes:
        num_transforms: ``K``.
        names: the transforms' names.

    Example:
        >>> import torch, torch.nn as nn
        >>> from auxgen import AuxiliaryLabeler, GeneratedCellLabels, TransformLabels
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> cells = GeneratedCellLabels(3)  # 2 classes x 4 rotations x 3 sub-labels
        >>> labeler = AuxiliaryLabeler(model, tasks=[TransformLabels(form="predict"), cells])
        >>> labeler.aux_heads[1].out_features
        24
        >>> x, y = torch.randn(5, 3, 4, 4), torch.tensor([0, 1, 1, 0, 1])
        >>> labeler.generate_labels(x, y).shape  # one label per image, over sum(psi)
        torch.Size([5, 6])
        >>> opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1)
        >>> gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=0.1)
        >>> labeler.step(x, y, opt, gen_opt)["meta_updated"]
        True
    """

    name = "maxl-cells"

    def __init__(
        self,
        psi: PsiSpec,
        transforms: Optional[Sequence[Transform]] = None,
        names: Optional[Sequence[str]] = None,
        *,
        generator: Union[str, nn.Module] = "head",
        entropy_weight: float = 0.2,
        confidence_weight: float = 0.0,
        label_temperature: float = 1.0,
        weight: Union[float, TaskWeight] = 1.0,
    ) -> None:
        super().__init__(
            psi,
            generator=generator,
            entropy_weight=entropy_weight,
            confidence_weight=confidence_weight,
            label_temperature=label_temperature,
            weight=weight,
        )
        self.transform_set = TransformSet(transforms, names)  # makes and checks the K views
        self.num_transforms = self.transform_set.num_transforms
        self.names = self.transform_set.names

    def outputs(self, ctx: TaskContext) -> list[int]:
        return [self.num_transforms * self.num_aux]

    def into_cells(self, labels: Tensor) -> Tensor:
        """Per-image labels ``(N, sum(psi))`` as the head's targets ``(K * N, K * sum(psi))``.

        Row ``k * N + i`` (image ``i`` under transform ``k``) holds image ``i``'s label in
        block ``k``; the other blocks are zero. Differentiable.
        """
        k = self.num_transforms
        eye = torch.eye(k, dtype=labels.dtype, device=labels.device)
        cells = eye[:, None, :, None] * labels[None, :, None, :]
        return cells.reshape(k * labels.shape[0], k * labels.shape[1])

    def plan(self, x: Tensor, y: Tensor, aux_target: Optional[Tensor]) -> TaskPlan:
        views = self.transform_set.all_views(x)
        if aux_target is None:
            return TaskPlan(views=views)
        return TaskPlan(views=views, targets=self.into_cells(self.fixed_targets(aux_target, y)))

    def head_input(self, plan: TaskPlan, h: Tensor, h_views: Optional[Tensor]) -> Tensor:
        return self.transform_set.rows(h, h_views)

    def targets(
        self, plan: TaskPlan, x: Tensor, y: Tensor, h: Tensor, *, grad: bool = False
    ) -> Tensor:
        if plan.targets is not None:
            return plan.targets
        with torch.set_grad_enabled(grad):
            return self.into_cells(self.labels(x, y, h))

    def regularizer(self, t: Tensor) -> Optional[Tensor]:
        """MAXL's regulariser of the per-image labels (block 0 of the first view's rows)."""
        k, n = self.num_transforms, t.shape[0] // self.num_transforms
        return super().regularizer(t.view(k, n, k, self.num_aux)[0, :, 0])

    def extra_repr(self) -> str:
        return f"names={self.names}, " + super().extra_repr()
