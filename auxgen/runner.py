"""Moved to :mod:`auxgen.experiments` (config, datasets, models, training, sweep)."""

from .experiments import config, datasets, models, sweep, training
from .experiments.checkpoints import CHECKPOINT_NAME, RESULTS_NAME
from .experiments.config import *  # noqa: F403
from .experiments.datasets import *  # noqa: F403
from .experiments.models import *  # noqa: F403
from .experiments.runtime import is_main_process, world_and_rank
from .experiments.sweep import *  # noqa: F403
from .experiments.training import *  # noqa: F403

__all__ = [
    *config.__all__,
    *datasets.__all__,
    *models.__all__,
    *training.__all__,
    *sweep.__all__,
    "CHECKPOINT_NAME",
    "RESULTS_NAME",
    "is_main_process",
    "world_and_rank",
]
