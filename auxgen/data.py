"""Moved to :mod:`auxgen.experiments` (hierarchies, datasets, cifar, augment)."""

from .experiments import augment, cifar, datasets, hierarchies
from .experiments.augment import *  # noqa: F403
from .experiments.cifar import *  # noqa: F403
from .experiments.datasets import *  # noqa: F403
from .experiments.hierarchies import *  # noqa: F403

__all__ = [*hierarchies.__all__, *datasets.__all__, *cifar.__all__, *augment.__all__]
