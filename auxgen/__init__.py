"""auxgen: Meta AuXiliary Learning (MAXL) for any PyTorch classifier."""

from .hierarchy import masked_softmax, owner_index
from .labeler import AuxiliaryLabeler, NonFiniteError
from .mirror import SUPPORTED_OPTIMIZERS

__version__ = "0.1.0"

__all__ = [
    "AuxiliaryLabeler",
    "NonFiniteError",
    "SUPPORTED_OPTIMIZERS",
    "masked_softmax",
    "owner_index",
    "__version__",
]
