"""Tests for auxgen.experiments.baselines: human, random, k-means and noisy auxiliary labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from auxgen.experiments.baselines import (
    check_aux_labels,
    human_aux_labels,
    kmeans_aux_labels,
    noisy_aux_labels,
    random_aux_labels,
)
from auxgen.experiments.hierarchies import CIFAR100_FINE_TO_COARSE, hierarchy_psi
from auxgen.hierarchy import owner_index, psi_offsets


def _in_children(aux: torch.Tensor, y: torch.Tensor, psi) -> bool:
    return bool((owner_index(psi)[aux] == y).all())


# --------------------------------------------------------------------------------------------
# human
# --------------------------------------------------------------------------------------------


def test_human_aux_labels_cifar100():
    psi, fine_to_aux = hierarchy_psi(20, 100)
    fine = torch.randint(0, 100, (500,), generator=torch.Generator().manual_seed(0))
    y = torch.tensor(CIFAR100_FINE_TO_COARSE)[fine]
    aux = human_aux_labels(fine, fine_to_aux, y=y, psi=psi)
    assert aux.dtype == torch.int64 and aux.shape == (500,)
    assert _in_children(aux, y, psi)
    assert aux.tolist() == [fine_to_aux[f] for f in fine.tolist()]
    # tensor table and numpy input give the same result
    aux2 = human_aux_labels(fine.numpy(), torch.tensor(fine_to_aux))
    assert torch.equal(aux, aux2)


def test_human_aux_labels_errors():
    table = [0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"fine labels must lie in \[0, len\(fine_to_aux\)=4\)"):
        human_aux_labels(torch.tensor([0, 4]), table)
    with pytest.raises(TypeError, match="fine must be a 1-D integer tensor"):
        human_aux_labels(torch.tensor([0.0, 1.0]), table)
    with pytest.raises(TypeError, match="fine_to_aux must be a 1-D integer tensor"):
        human_aux_labels(torch.tensor([0, 1]), "0011")
    with pytest.raises(ValueError, match="y and psi must be given together"):
        human_aux_labels(torch.tensor([0, 1]), table, y=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="must be children of their primary class"):
        human_aux_labels(torch.tensor([0, 3]), table, y=torch.tensor([0, 0]), psi=[1, 1])


# --------------------------------------------------------------------------------------------
# random
# --------------------------------------------------------------------------------------------


def test_random_aux_labels_lie_in_children_and_cover_them():
    psi = (3, 1, 5, 2)
    y = torch.arange(4).repeat_interleave(200)
    aux = random_aux_labels(y, psi, seed=0)
    assert aux.dtype == torch.int64 and aux.shape == y.shape
    assert _in_children(aux, y, psi)
    check_aux_labels(aux, y, psi)
    offsets = psi_offsets(psi)
    for i, p in enumerate(psi):
        used = set(aux[y == i].tolist())
        assert used == set(range(offsets[i], offsets[i] + p))
    # roughly uniform within a class
    counts = torch.bincount(aux[y == 2] - offsets[2], minlength=5)
    assert int(counts.min()) > 20


def test_random_aux_labels_reproducible():
    y = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(1))
    a = random_aux_labels(y, 4, seed=7, num_classes=5)
    b = random_aux_labels(y, [4] * 5, seed=7)
    c = random_aux_labels(y, [4] * 5, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert _in_children(a, y, (4,) * 5)
    # numpy / list input
    assert torch.equal(random_aux_labels(y.numpy(), [4] * 5, seed=7), a)
    assert torch.equal(random_aux_labels(y.tolist(), [4] * 5, seed=7), a)


def test_random_aux_labels_errors():
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"y must hold primary classes in \[0, 2\)"):
        random_aux_labels(y, [2, 2])
    with pytest.raises(TypeError, match="y must be a 1-D integer tensor"):
        random_aux_labels(y.float(), [2, 2, 2])
    with pytest.raises(ValueError, match="y must be 1-D"):
        random_aux_labels(y.view(3, 1), [2, 2, 2])
    with pytest.raises(TypeError, match="seed must be an int"):
        random_aux_labels(y, [2, 2, 2], seed=True)
    with pytest.raises(ValueError, match="psi entries must be positive"):
        random_aux_labels(y, [2, 0, 2])
    with pytest.raises(ValueError, match="num_classes is required"):
        random_aux_labels(y, 2)


# --------------------------------------------------------------------------------------------
# noisy
# --------------------------------------------------------------------------------------------


def test_noisy_aux_labels_relabel_exactly_the_chosen_fraction():
    psi = (3, 1, 5, 2)
    y = torch.arange(4).repeat_interleave(250)
    clean = torch.tensor(psi_offsets(psi))[y]  # every sample on its class's first child
    assert torch.equal(noisy_aux_labels(clean, y, psi, 0.0, seed=3), clean)
    for rate in (0.1, 0.5, 0.8):
        aux = noisy_aux_labels(clean, y, psi, rate, seed=3)
        check_aux_labels(aux, y, psi)
        changed = aux != clean
        # at most round(rate * N) relabelled; a redrawn label equals the old one with
        # probability 1/psi[y], so the expected number changed is sum over the chosen of
        # (1 - 1/psi[y]): within 5 standard deviations of a binomial count
        keep = torch.tensor([1 - 1 / p for p in psi], dtype=torch.float64)[y]
        expected = rate * float(keep.sum())
        sd = (rate * float((keep * (1 - keep)).sum())) ** 0.5
        assert int(changed.sum()) <= round(rate * y.numel())
        assert abs(int(changed.sum()) - expected) < 5 * sd + 1
        assert not changed[y == 1].any()  # a class with one child cannot change
    assert torch.equal(noisy_aux_labels(clean, y, psi, 0.8, seed=3), aux)  # reproducible


def test_noisy_aux_labels_at_rate_one_are_uniform_and_reproducible():
    psi = (4, 2)
    y = torch.arange(2).repeat_interleave(2000)
    clean = torch.tensor(psi_offsets(psi))[y]
    aux = noisy_aux_labels(clean, y, psi, 1.0, seed=0)
    for i, p in enumerate(psi):
        counts = torch.bincount(aux[y == i] - psi_offsets(psi)[i], minlength=p).double()
        # each child's share within 5 binomial standard deviations of 1/p
        sd = (2000 * (1 / p) * (1 - 1 / p)) ** 0.5
        assert ((counts - 2000 / p).abs() < 5 * sd).all()
    again = noisy_aux_labels(clean.numpy(), y.numpy(), list(psi), 1.0, seed=0)
    assert torch.equal(again, aux)
    assert not torch.equal(noisy_aux_labels(clean, y, psi, 1.0, seed=1), aux)
    assert torch.equal(noisy_aux_labels(clean, y, 4, 0.3, seed=2, num_classes=2)[y == 1],
                       noisy_aux_labels(clean, y, (4, 4), 0.3, seed=2)[y == 1])  # fmt: skip


def test_noisy_aux_labels_errors():
    y = torch.tensor([0, 0, 1])
    aux = torch.tensor([0, 1, 2])
    for bad in (-0.1, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match=r"rate must be a fraction in \[0, 1\], got"):
            noisy_aux_labels(aux, y, [2, 2], bad)
    with pytest.raises(ValueError, match="must be children of their primary class"):
        noisy_aux_labels(torch.tensor([0, 2, 2]), y, [2, 2], 0.5)
    with pytest.raises(TypeError, match="seed must be an int"):
        noisy_aux_labels(aux, y, [2, 2], 0.5, seed=0.5)
    with pytest.raises(TypeError, match="aux must be a 1-D integer tensor"):
        noisy_aux_labels(aux.float(), y, [2, 2], 0.5)


# --------------------------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------------------------


def _blobs(seed: int = 0):
    """Two primary classes, each made of 3 well-separated sub-clusters in 10-D."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=20.0, size=(6, 10))
    sub = np.repeat(np.arange(6), [30, 25, 20, 40, 15, 10])
    rng.shuffle(sub)
    x = centres[sub] + rng.normal(scale=0.5, size=(sub.size, 10))
    y = torch.from_numpy(sub // 3)
    return torch.from_numpy(x.astype(np.float32)), y, sub


@pytest.mark.parametrize("pca_dim", [None, 4, 64])
def test_kmeans_aux_labels_recovers_clusters(pca_dim):
    x, y, sub = _blobs()
    psi = (3, 3)
    aux = kmeans_aux_labels(x, y, psi, seed=0, pca_dim=pca_dim)
    assert aux.dtype == torch.int64 and aux.shape == y.shape
    assert _in_children(aux, y, psi)
    assert set(aux.tolist()) == set(range(6))  # the full psi range is used
    # the clusters are the true sub-clusters, numbered by decreasing size within each class
    # (sub-cluster sizes are 30, 25, 20 | 40, 15, 10, so the numbering is the identity)
    assert aux.tolist() == sub.tolist()
    assert torch.bincount(aux, minlength=6).tolist() == [30, 25, 20, 40, 15, 10]


def test_kmeans_aux_labels_reproducible_and_uneven_psi():
    x, y, _ = _blobs(seed=1)
    psi = (2, 4)
    a = kmeans_aux_labels(x.numpy(), y, psi, seed=3, pca_dim=None)
    b = kmeans_aux_labels(x.numpy(), y, psi, seed=3, pca_dim=None)
    assert torch.equal(a, b)
    assert _in_children(a, y, psi)
    assert set(a.tolist()) == set(range(6))
    # image-shaped features are flattened
    imgs = x.view(-1, 1, 2, 5)
    assert torch.equal(kmeans_aux_labels(imgs, y, psi, seed=3, pca_dim=None), a)


def test_kmeans_aux_labels_small_classes():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(13, 6)).astype(np.float32))
    # class 0: 2 samples (< psi 5); class 1: 1 sample; class 2: 4 identical samples;
    # class 3: absent; class 4: 6 samples
    y = torch.tensor([0, 0, 1, 2, 2, 2, 2, 4, 4, 4, 4, 4, 4])
    x[3:7] = x[3]
    psi = (5, 3, 3, 2, 2)
    aux = kmeans_aux_labels(x, y, psi, seed=0)
    assert _in_children(aux, y, psi)
    offsets = psi_offsets(psi)
    assert sorted(aux[y == 0].tolist()) == [offsets[0], offsets[0] + 1]
    assert aux[y == 1].tolist() == [offsets[1]]
    assert aux[y == 2].tolist() == [offsets[2]] * 4
    assert set(aux[y == 4].tolist()) == {offsets[4], offsets[4] + 1}


def test_kmeans_aux_labels_errors():
    x, y, _ = _blobs()
    with pytest.raises(ValueError, match=r"features must have shape \(N, D\).*N=140"):
        kmeans_aux_labels(x[:-1], y, (3, 3))
    with pytest.raises(TypeError, match="features must be a torch.Tensor or numpy array"):
        kmeans_aux_labels(x.tolist(), y, (3, 3))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="features must be finite"):
        kmeans_aux_labels(bad, y, (3, 3))
    with pytest.raises(ValueError, match="pca_dim must be a positive int or None, got 0"):
        kmeans_aux_labels(x, y, (3, 3), pca_dim=0)
    with pytest.raises(ValueError, match="n_init must be a positive int"):
        kmeans_aux_labels(x, y, (3, 3), n_init=0)
    with pytest.raises(ValueError, match=r"y must hold primary classes in \[0, 1\)"):
        kmeans_aux_labels(x, y, (3,))


def test_check_aux_labels_errors():
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"aux must lie in \[0, sum\(psi\)=5\)"):
        check_aux_labels(torch.tensor([0, 5]), y, [2, 3])
    with pytest.raises(ValueError, match="aux must have one label per sample"):
        check_aux_labels(torch.tensor([0]), y, [2, 3])
    with pytest.raises(ValueError, match=r"sample 1, y=1, aux=1, expected one of 2..4"):
        check_aux_labels(torch.tensor([0, 1]), y, [2, 3])
