"""Bit-for-bit reproducibility of ``AuxiliaryLabeler.step`` given a seed.

With ``torch.manual_seed`` and ``torch.use_deterministic_algorithms(True)``, two runs of
three steps (BatchNorm, dropout in the model and in the ``copy`` generator, SGD with
momentum, Adam for the generator) must end with identical parameters and buffers. The
meta-gradient replays the dropout masks of the step's forward, so the random stream is
consumed the same way in both runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from helpers import TinyConvNet
from torch import Tensor

from auxgen import AuxiliaryLabeler, GeneratedLabels


@pytest.fixture
def deterministic() -> Iterator[None]:
    """Turn on deterministic algorithms for one test and restore the previous setting."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _run(seed: int, meta: str) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    labeler = AuxiliaryLabeler(
        TinyConvNet(num_classes=3, width=6, dropout=0.3),
        tasks=GeneratedLabels([2, 3, 2], generator="copy"),
        meta=meta,
    )
    opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1, momentum=0.9, nesterov=True)
    gen_opt = torch.optim.Adam(labeler.generator_parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.randn(10, 3, 8, 8)  # drawn from the seeded global stream, like dropout
        y = torch.randint(0, 3, (10,))
        out = labeler.step(x, y, opt, gen_opt)
        assert out["meta_updated"]
    state = {f"param:{k}": p.detach().clone() for k, p in labeler.named_parameters()}
    state.update({f"buffer:{k}": b.clone() for k, b in labeler.named_buffers()})
    return state


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("meta", ["second_order", "first_order"])
def test_same_seed_same_bits(meta: str) -> None:
    assert torch.are_deterministic_algorithms_enabled()
    first, second = _run(0, meta), _run(0, meta)
    assert first.keys() == second.keys()
    for k in first:
        assert torch.equal(first[k], second[k]), f"{k} differs between two seeded runs"
    # not vacuous: another seed (other init, data and dropout masks) gives other parameters
    other = _run(1, meta)
    assert not torch.equal(
        first["param:tasks.0.generator.head.weight"], other["param:tasks.0.generator.head.weight"]
    )
