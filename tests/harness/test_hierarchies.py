"""The CIFAR-100 hierarchy of the experiments (``auxgen/experiments/hierarchies.py``)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from auxgen.experiments import hierarchies
from auxgen.experiments.hierarchies import (
    CIFAR100_10_TO_3,
    CIFAR100_COARSE_TO_10,
    CIFAR100_FINE_TO_COARSE,
    CIFAR100_LEVEL_NAMES,
    CIFAR100_LEVELS,
    cifar100_hierarchy,
    cifar100_labels,
    hierarchy_aux_names,
    hierarchy_psi,
)
from auxgen.hierarchy import owner_index, psi_offsets

LEVEL_PAIRS = [(p, a) for p, a in itertools.combinations(CIFAR100_LEVELS, 2)]


def test_fine_to_coarse_table_is_the_standard_one():
    table = CIFAR100_FINE_TO_COARSE
    assert len(table) == 100
    assert sorted(set(table)) == list(range(20))
    assert np.bincount(table).tolist() == [5] * 20
    # spot checks from the official class list
    names = hierarchies.CIFAR100_FINE_NAMES
    coarse = hierarchies.CIFAR100_COARSE_NAMES
    assert coarse[table[names.index("beaver")]] == "aquatic_mammals"
    assert coarse[table[names.index("mushroom")]] == "fruit_and_vegetables"
    assert coarse[table[names.index("bear")]] == "large_carnivores"
    assert coarse[table[names.index("worm")]] == "non-insect_invertebrates"
    assert coarse[table[names.index("tractor")]] == "vehicles_2"


def test_maxl_groupings_match_the_original_repository():
    # class_10 and class_3 of lorenmt/maxl create_dataset.py
    class_10 = {0: 1, 1: 2, 2: 5, 3: 6, 4: 5, 5: 6, 6: 6, 7: 3, 8: 0, 9: 7,
                10: 8, 11: 0, 12: 1, 13: 3, 14: 4, 15: 0, 16: 2, 17: 5, 18: 9, 19: 9}  # fmt: skip
    class_3 = {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 2, 7: 2, 8: 2, 9: 2}
    assert tuple(class_10[c] for c in range(20)) == CIFAR100_COARSE_TO_10
    assert tuple(class_3[g] for g in range(10)) == CIFAR100_10_TO_3


def test_hierarchy_is_a_proper_tree():
    h = cifar100_hierarchy()
    assert sorted(h) == [3, 10, 20, 100]
    assert h[100] == tuple(range(100))
    for level, labels in h.items():
        assert len(labels) == 100
        # every node at every level is non-empty
        assert sorted(set(labels)) == list(range(level))
        assert len(CIFAR100_LEVEL_NAMES[level]) == level
    # the maps compose 100 -> 20 -> 10 -> 3
    for f in range(100):
        assert h[20][f] == CIFAR100_FINE_TO_COARSE[f]
        assert h[10][f] == CIFAR100_COARSE_TO_10[h[20][f]]
        assert h[3][f] == CIFAR100_10_TO_3[h[10][f]]
    # each node at a finer level has exactly one parent at every coarser level
    for coarse_level, fine_level in LEVEL_PAIRS:
        parents: dict[int, set[int]] = {}
        for f in range(100):
            parents.setdefault(h[fine_level][f], set()).add(h[coarse_level][f])
        assert len(parents) == fine_level
        assert all(len(p) == 1 for p in parents.values())


def test_hierarchy_returns_fresh_dicts():
    h = cifar100_hierarchy()
    h[3] = ()
    assert len(cifar100_hierarchy()[3]) == 100


def test_hierarchy_psi_20_100():
    psi, fine_to_aux = hierarchy_psi(20, 100)
    assert psi == (5,) * 20
    assert sorted(fine_to_aux) == list(range(100))  # a bijection
    owner = owner_index(psi)
    for f in range(100):
        assert int(owner[fine_to_aux[f]]) == CIFAR100_FINE_TO_COARSE[f]
    # children keep the order of the fine labels: aquatic mammals are 4, 30, 55, 72, 95
    assert [fine_to_aux[f] for f in (4, 30, 55, 72, 95)] == [0, 1, 2, 3, 4]
    names = hierarchy_aux_names(20, 100)
    assert names[:5] == ("beaver", "dolphin", "otter", "seal", "whale")


@pytest.mark.parametrize(("primary", "aux"), LEVEL_PAIRS)
def test_hierarchy_psi_all_pairs(primary, aux):
    h = cifar100_hierarchy()
    psi, fine_to_aux = hierarchy_psi(primary, aux)
    assert len(psi) == primary and sum(psi) == aux
    assert all(p >= 1 for p in psi)
    assert len(fine_to_aux) == 100
    assert sorted(set(fine_to_aux)) == list(range(aux))
    owner = owner_index(psi)
    offsets = psi_offsets(psi)
    for f in range(100):
        i = h[primary][f]
        assert int(owner[fine_to_aux[f]]) == i
        assert offsets[i] <= fine_to_aux[f] < offsets[i] + psi[i]
    # two fine classes share an auxiliary class iff they share the aux-level label
    for f, g in itertools.combinations(range(100), 2):
        assert (fine_to_aux[f] == fine_to_aux[g]) == (h[aux][f] == h[aux][g])
    names = hierarchy_aux_names(primary, aux)
    assert sorted(names) == sorted(CIFAR100_LEVEL_NAMES[aux])
    for f in range(100):
        assert names[fine_to_aux[f]] == CIFAR100_LEVEL_NAMES[aux][h[aux][f]]


def test_hierarchy_psi_known_values():
    assert hierarchy_psi(3, 10)[0] == (5, 1, 4)
    assert hierarchy_psi(3, 20)[0] == (10, 3, 7)
    assert hierarchy_psi(3, 100)[0] == (50, 15, 35)
    assert hierarchy_psi(10, 20)[0] == (3, 2, 2, 2, 1, 3, 3, 1, 1, 2)
    assert sum(hierarchy_psi(10, 100)[0]) == 100


def test_hierarchy_psi_errors():
    with pytest.raises(ValueError, match="aux_level must be a finer level"):
        hierarchy_psi(20, 20)
    with pytest.raises(ValueError, match="aux_level must be a finer level"):
        hierarchy_psi(100, 20)
    with pytest.raises(ValueError, match=r"primary_level must be one of .*got 7"):
        hierarchy_psi(7, 100)
    with pytest.raises(TypeError, match="aux_level must be an int"):
        hierarchy_psi(3, "10")


def test_cifar100_labels():
    fine = torch.tensor([[0, 3], [99, 55]])
    assert cifar100_labels(fine, 20).tolist() == [[4, 8], [13, 0]]
    assert cifar100_labels(fine, 3).tolist() == [[1, 0], [0, 0]]
    assert cifar100_labels(fine, 100).tolist() == fine.tolist()
    with pytest.raises(ValueError, match=r"fine labels must lie in \[0, 100\)"):
        cifar100_labels(torch.tensor([100]), 20)
    with pytest.raises(TypeError, match="fine must be an integer torch.Tensor"):
        cifar100_labels(torch.tensor([1.0]), 20)
    with pytest.raises(ValueError, match="level must be one of"):
        cifar100_labels(fine, 5)
