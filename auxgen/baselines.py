"""Moved to :mod:`auxgen.experiments.baselines`."""

from .experiments import baselines
from .experiments.baselines import *  # noqa: F403

__all__ = baselines.__all__
