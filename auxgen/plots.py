"""Moved to :mod:`auxgen.experiments.plots`."""

from .experiments.plots import plot_accuracy, plot_aux_examples, plot_aux_spread

__all__ = ["plot_accuracy", "plot_aux_spread", "plot_aux_examples"]
