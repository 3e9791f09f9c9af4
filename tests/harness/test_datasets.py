"""The digits dataset and its hierarchy (``auxgen/experiments/datasets.py``)."""

from __future__ import annotations

import pytest
import torch

from auxgen.experiments.datasets import load_digits_hierarchy
from auxgen.hierarchy import owner_index


def test_digits_hierarchy():
    d = load_digits_hierarchy(test_fraction=0.3, seed=0)
    n_train, n_test = d.x_train.shape[0], d.x_test.shape[0]
    assert n_train + n_test == 1797
    assert abs(n_test - 0.3 * 1797) <= 1
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_train.dtype == torch.float32
    assert d.x_test.shape[1:] == (1, 8, 8) and d.x_test.dtype == torch.float32
    for t in (d.y_train, d.y_test, d.aux_train, d.aux_test, d.fine_train, d.fine_test):
        assert t.dtype == torch.int64
    assert d.psi == (5, 5) and d.num_classes == 2 and d.num_aux_classes == 10
    assert d.class_names == ("0-4", "5-9")
    assert d.aux_class_names == tuple("0123456789")
    # standardised with the training statistics
    assert abs(float(d.x_train.mean())) < 1e-4
    assert abs(float(d.x_train.std()) - 1.0) < 1e-3
    # aux is the digit, and a child of its primary class
    assert torch.equal(d.aux_train, d.fine_train) and torch.equal(d.aux_test, d.fine_test)
    assert torch.equal(d.y_train, (d.fine_train >= 5).long())
    owner = owner_index(d.psi)
    assert torch.equal(owner[d.aux_train], d.y_train)
    assert torch.equal(owner[d.aux_test], d.y_test)
    # balanced primary classes, every digit present, stratified split
    for y in (d.y_train, d.y_test):
        assert 0.45 < float(y.float().mean()) < 0.55
    train_frac = torch.bincount(d.fine_train, minlength=10) / n_train
    test_frac = torch.bincount(d.fine_test, minlength=10) / n_test
    assert (train_frac > 0.08).all()
    assert torch.allclose(train_frac, test_frac, atol=0.01)


def test_digits_hierarchy_is_deterministic():
    a = load_digits_hierarchy(test_fraction=0.25, seed=3)
    b = load_digits_hierarchy(test_fraction=0.25, seed=3)
    c = load_digits_hierarchy(test_fraction=0.25, seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.fine_test, c.fine_test)


def test_digits_hierarchy_errors():
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1.5"):
        load_digits_hierarchy(test_fraction=1.5)
    with pytest.raises(TypeError, match="test_fraction must be a float"):
        load_digits_hierarchy(test_fraction="0.3")
    with pytest.raises(TypeError, match="seed must be an int"):
        load_digits_hierarchy(seed=1.5)
