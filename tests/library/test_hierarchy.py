"""``auxgen/hierarchy.py``: the owner index, the masked softmax and the forms of ``psi``."""

from __future__ import annotations

import pytest
import torch

from auxgen.hierarchy import masked_softmax, normalize_psi, owner_index


def test_masked_softmax_exact_zero_and_extreme_logits():
    psi = [2, 3, 4]
    owner = owner_index(psi)
    assert owner.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    logits = torch.tensor([[1e4, -1e4, 1e4, -1e4, 3.0, 1e4, 0.0, -1e4, 5.0]] * 3)
    logits.requires_grad_(True)
    y = torch.tensor([0, 1, 2])
    t = masked_softmax(logits, y, owner)
    assert torch.isfinite(t).all()
    mask = owner.unsqueeze(0) == y.unsqueeze(1)
    assert (t[~mask] == 0).all()  # exactly zero, not merely small
    torch.testing.assert_close(t.sum(1), torch.ones(3))
    assert t[0, 0] == 1.0 and t[1, 2] == 1.0 and t[2, 5] == 1.0
    (t * torch.randn_like(t)).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~mask] == 0).all()


def test_normalize_psi_forms_and_errors():
    assert normalize_psi(3, num_classes=2) == (3, 3)
    assert normalize_psi(torch.tensor([1, 2])) == (1, 2)
    with pytest.raises(ValueError, match=r"one entry per primary class \(num_classes=3\), got 2"):
        normalize_psi([2, 2], num_classes=3)
    with pytest.raises(ValueError, match=r"psi entries must be positive, got psi\[1\]=0"):
        normalize_psi([2, 0])
    with pytest.raises(TypeError, match=r"psi\[0\] must be an int, got 'a'"):
        normalize_psi(["a"])
    with pytest.raises(ValueError, match="num_classes is required"):
        normalize_psi(4)
