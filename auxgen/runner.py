"""Moved to :mod:`auxgen.experiments` (config, datasets, models, training, sweep)."""

from .experiments.checkpoints import CHECKPOINT_NAME, RESULTS_NAME
from .experiments.config import (
    BUILTIN_BACKBONES,
    DATASETS,
    GENERATORS,
    META_MODES,
    META_SOURCES,
    METHODS,
    OPTIMIZERS,
    SCHEDULES,
    RunConfig,
    check_config,
    parse_method,
    parse_variant,
)
from .experiments.datasets import Data, load_data
from .experiments.models import MLP, SmallCNN, build_model, check_backbone
from .experiments.runtime import is_main_process, world_and_rank
from .experiments.sweep import format_table, markdown_table, run_demo, run_sweep, summarize
from .experiments.training import train

__all__ = [
    "METHODS",
    "DATASETS",
    "GENERATORS",
    "OPTIMIZERS",
    "SCHEDULES",
    "META_MODES",
    "META_SOURCES",
    "BUILTIN_BACKBONES",
    "CHECKPOINT_NAME",
    "RESULTS_NAME",
    "RunConfig",
    "Data",
    "SmallCNN",
    "MLP",
    "load_data",
    "check_config",
    "check_backbone",
    "build_model",
    "parse_method",
    "parse_variant",
    "train",
    "run_sweep",
    "run_demo",
    "summarize",
    "format_table",
    "markdown_table",
    "is_main_process",
    "world_and_rank",
]
