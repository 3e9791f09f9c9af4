"""Auxiliary tasks: where an auxiliary head's targets come from (see :mod:`.base`).

* :class:`GeneratedLabels`: MAXL's generated labels, trained by the meta-gradient;
* :class:`FixedLabels`: labels given at each step (human, random, k-means);
* :class:`TransformLabels`: labels from input transformations (rotations by default):
  transform prediction and SLA's joint (class, transform) labels;
* :class:`GeneratedCellLabels`: MAXL's generated labels inside SLA's (class, transform)
  cells;
* :class:`LearnedWeight`: a task's loss weight learned by the meta-gradient (Auto-lambda);
* :class:`AuxiliaryTask`: the contract, to write your own (:class:`LearnedTask` for targets
  trained by the meta-gradient; :class:`TaskWeight` a task's loss weight).
"""

from typing import Any

from .base import AuxiliaryTask, LearnedTask, TaskContext, TaskPlan, TaskWeight
from .cells import GeneratedCellLabels
from .labels import GENERATORS, FixedLabels, GeneratedLabels
from .transforms import (
    PermuteChannels,
    Rotate,
    TransformLabels,
    TransformSet,
    colour_permutations,
    patch_rotations,
    rotations,
)
from .weighting import LearnedWeight

__all__ = [
    "as_task_list",
    "GENERATORS",
    "AuxiliaryTask",
    "LearnedTask",
    "TaskWeight",
    "TransformSet",
    "FixedLabels",
    "GeneratedCellLabels",
    "GeneratedLabels",
    "TaskContext",
    "TaskPlan",
    "LearnedWeight",
    "PermuteChannels",
    "Rotate",
    "colour_permutations",
    "patch_rotations",
    "TransformLabels",
    "rotations",
]


def as_task_list(psi: Any, tasks: Any) -> list[AuxiliaryTask]:
    """The labeler's tasks from its ``psi=`` (shorthand for ``GeneratedLabels(psi)``) or
    ``tasks=`` (one task or a sequence of them), checked."""
    for name, value in (("psi", psi), ("tasks", tasks)):
        found = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(t, type) and issubclass(t, AuxiliaryTask) for t in found):
            cls = next(t for t in found if isinstance(t, type)).__name__
            raise TypeError(
                f"{name}= got the class {cls}, not a task: call it, tasks={cls}() (or with its "
                "options)"
            )
        if name == "psi" and any(isinstance(t, AuxiliaryTask) for t in found):
            raise TypeError(
                f"psi= (the second positional argument) got a task, "
                f"{type(next(t for t in found if isinstance(t, AuxiliaryTask))).__name__}: "
                "pass tasks as a keyword, AuxiliaryLabeler(model, tasks=...)"
            )
    if tasks is None:
        if psi is None:
            raise ValueError(
                "AuxiliaryLabeler needs its auxiliary tasks: pass tasks= (e.g. "
                "tasks=TransformLabels() for the rotation task) or psi= (shorthand for MAXL's "
                "tasks=GeneratedLabels(psi))"
            )
        return [GeneratedLabels(psi)]
    if psi is not None:
        raise ValueError(
            "pass psi= or tasks=, not both: psi= is shorthand for tasks=GeneratedLabels(psi)"
        )
    task_list = [tasks] if isinstance(tasks, AuxiliaryTask) else list(tasks)
    for i, task in enumerate(task_list):
        if not isinstance(task, AuxiliaryTask):
            raise TypeError(f"tasks[{i}] must be an AuxiliaryTask, got {type(task).__name__}")
        if task.head is not None:
            raise ValueError(f"tasks[{i}] ({type(task).__name__}) is already attached")
    return task_list
