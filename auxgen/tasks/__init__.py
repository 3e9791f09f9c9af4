"""Auxiliary tasks: where an auxiliary head's targets come from (see :mod:`.base`).

* :class:`GeneratedLabels`: MAXL's generated labels, trained by the meta-gradient;
* :class:`FixedLabels`: labels given at each step (human, random, k-means);
* :class:`AuxiliaryTask`: the protocol, to write your own.
"""

from .base import AuxiliaryTask, TaskContext, TaskPlan
from .labels import GENERATORS, FixedLabels, GeneratedLabels

__all__ = [
    "GENERATORS",
    "AuxiliaryTask",
    "FixedLabels",
    "GeneratedLabels",
    "TaskContext",
    "TaskPlan",
]
