"""Moved to :mod:`auxgen.experiments.plots`."""

from .experiments import plots
from .experiments.plots import *  # noqa: F403

__all__ = plots.__all__
