"""Moved to :mod:`auxgen.experiments.baselines`."""

from .experiments.baselines import (
    check_aux_labels,
    human_aux_labels,
    kmeans_aux_labels,
    random_aux_labels,
)

__all__ = ["human_aux_labels", "random_aux_labels", "kmeans_aux_labels", "check_aux_labels"]
