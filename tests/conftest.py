import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons: reset them afterwards."""
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(True)
