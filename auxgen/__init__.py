"""auxgen: auxiliary tasks for any PyTorch classifier, with Meta AuXiliary Learning (MAXL)."""

from .hierarchy import masked_softmax, owner_index
from .labeler import AuxiliaryLabeler
from .mirror import SUPPORTED_OPTIMIZERS
from .step import NonFiniteError
from .tasks import (
    AuxiliaryTask,
    FixedLabels,
    GeneratedCellLabels,
    GeneratedLabels,
    LearnedWeight,
    TransformLabels,
    colour_permutations,
    patch_rotations,
    rotations,
)

__version__ = "0.1.0"

__all__ = [
    "AuxiliaryLabeler",
    "AuxiliaryTask",
    "FixedLabels",
    "GeneratedCellLabels",
    "GeneratedLabels",
    "LearnedWeight",
    "NonFiniteError",
    "SUPPORTED_OPTIMIZERS",
    "TransformLabels",
    "masked_softmax",
    "owner_index",
    "rotations",
    "patch_rotations",
    "colour_permutations",
    "__version__",
]
