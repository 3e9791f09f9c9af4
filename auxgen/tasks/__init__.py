"""Auxiliary tasks: where an auxiliary head's targets come from (see :mod:`.base`).

* :class:`GeneratedLabels`: MAXL's generated labels, trained by the meta-gradient;
* :class:`FixedLabels`: labels given at each step (human, random, k-means);
* :class:`TransformLabels`: labels from input transformations (rotations by default):
  transform prediction and SLA's joint (class, transform) labels;
* :class:`LearnedWeight`: a task's loss weight learned by the meta-gradient (Auto-lambda);
* :class:`AuxiliaryTask`: the protocol, to write your own.
"""

from .base import AuxiliaryTask, TaskContext, TaskPlan
from .labels import GENERATORS, FixedLabels, GeneratedLabels
from .transforms import Rotate, TransformLabels, rotations
from .weighting import LearnedWeight

__all__ = [
    "GENERATORS",
    "AuxiliaryTask",
    "FixedLabels",
    "GeneratedLabels",
    "TaskContext",
    "TaskPlan",
    "LearnedWeight",
    "Rotate",
    "TransformLabels",
    "rotations",
]
