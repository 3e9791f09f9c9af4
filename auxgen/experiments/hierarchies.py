"""Class hierarchies of the MAXL experiments: CIFAR-100's four levels and coarse groupings.

* The CIFAR-100 4-level hierarchy (3, 10, 20 and 100 classes) of the MAXL paper, and
  :func:`hierarchy_psi`, which turns a (primary level, auxiliary level) pair into the ``psi``
  and the fine-class -> auxiliary-class map used by the human-label baseline, laid out like
  :mod:`auxgen.hierarchy` expects (primary class ``i`` owns the ``psi[i]`` consecutive
  auxiliary classes ``offsets[i] .. offsets[i] + psi[i] - 1``).
* The coarse primary tasks over MNIST and Fashion-MNIST's 10 classes
  (:data:`MNIST_PRIMARY`, :data:`FASHION_PRIMARY`) and :func:`grouping_psi`.

Where the CIFAR-100 hierarchy comes from:

* 100 -> 20: the standard CIFAR-100 superclass table (:data:`CIFAR100_FINE_TO_COARSE`); it
  agrees with the ``coarse_labels`` stored in the official ``train`` and ``test`` files, and
  :func:`auxgen.experiments.cifar.load_cifar100` checks every sample against it.
* 20 -> 10 and 10 -> 3: the grouping of the MAXL paper (Liu, Davison & Johns, NeurIPS 2019,
  Appendix A), copied from the dictionaries ``class_10`` and ``class_3`` in
  ``create_dataset.py`` of the authors' repository https://github.com/lorenmt/maxl.
  The original code defines only indices; the group *names* in
  :data:`CIFAR100_LEVEL_NAMES` for the 10- and 3-class levels are descriptive names chosen
  here from the superclasses each group contains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from auxgen.hierarchy import psi_offsets

__all__ = [
    "CIFAR100_FINE_NAMES",
    "CIFAR100_COARSE_NAMES",
    "CIFAR100_FINE_TO_COARSE",
    "CIFAR100_COARSE_TO_10",
    "CIFAR100_10_TO_3",
    "CIFAR100_LEVELS",
    "CIFAR100_LEVEL_NAMES",
    "CIFAR10_CLASSES",
    "cifar100_hierarchy",
    "cifar100_labels",
    "hierarchy_psi",
    "hierarchy_aux_names",
    "MNIST_PRIMARY",
    "FASHION_CLASSES",
    "FASHION_PRIMARY",
    "FASHION_PRIMARY_NAMES",
    "grouping_psi",
]


# --------------------------------------------------------------------------------------------
# CIFAR-100 hierarchy
# --------------------------------------------------------------------------------------------

#: The 100 CIFAR-100 fine class names, in label order (as in the dataset's ``meta`` file).
CIFAR100_FINE_NAMES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

#: The 20 CIFAR-100 superclass names, in coarse-label order (as in the ``meta`` file).
CIFAR100_COARSE_NAMES: tuple[str, ...] = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)  # fmt: skip

#: Standard CIFAR-100 fine (100) -> superclass (20) table: entry ``f`` is the coarse label of
#: fine class ``f``. Verified against the ``coarse_labels`` of the official train/test files.
CIFAR100_FINE_TO_COARSE: tuple[int, ...] = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)  # fmt: skip

#: MAXL grouping of the 20 superclasses into 10 groups: entry ``c`` is the 10-level label of
#: superclass ``c`` (``class_10`` in lorenmt/maxl ``create_dataset.py``).
CIFAR100_COARSE_TO_10: tuple[int, ...] = (
    1, 2, 5, 6, 5, 6, 6, 3, 0, 7, 8, 0, 1, 3, 4, 0, 2, 5, 9, 9,
)  # fmt: skip

#: MAXL grouping of the 10 groups into 3: entry ``g`` is the 3-level label of 10-level group
#: ``g`` (``class_3`` in lorenmt/maxl ``create_dataset.py``).
CIFAR100_10_TO_3: tuple[int, ...] = (0, 0, 0, 0, 0, 1, 2, 2, 2, 2)

#: The levels of the CIFAR-100 hierarchy, coarsest first.
CIFAR100_LEVELS: tuple[int, ...] = (3, 10, 20, 100)

#: Class names at each level. The 10- and 3-level names are descriptive names chosen here (the
#: MAXL code only defines indices); each lists what the group contains.
CIFAR100_LEVEL_NAMES: dict[int, tuple[str, ...]] = {
    3: ("animals", "plants", "objects_and_scenes"),
    10: (
        "large_animals_and_reptiles",  # large carnivores, large omnivores/herbivores, reptiles
        "aquatic_and_medium_mammals",  # aquatic mammals, medium mammals
        "fish_and_small_mammals",  # fish, small mammals
        "invertebrates",  # insects, non-insect invertebrates
        "people",  # people
        "flowers_fruit_and_trees",  # flowers, fruit and vegetables, trees
        "household_objects",  # food containers, electrical devices, furniture
        "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes",
        "vehicles",  # vehicles 1, vehicles 2
    ),
    20: CIFAR100_COARSE_NAMES,
    100: CIFAR100_FINE_NAMES,
}

#: The 10 CIFAR-10 class names, in label order.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def _check_level(name: str, level: Any) -> int:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
        raise TypeError(
            f"{name} must be an int, one of {CIFAR100_LEVELS}, got {type(level).__name__} {level!r}"
        )
    level = int(level)
    if level not in CIFAR100_LEVELS:
        raise ValueError(
            f"{name} must be one of the CIFAR-100 hierarchy levels {CIFAR100_LEVELS}, got {level}"
        )
    return level


def cifar100_hierarchy() -> dict[int, tuple[int, ...]]:
    """Label of every fine CIFAR-100 class at each level of the MAXL hierarchy.

    Returns:
        A new dict ``{level: labels}`` for ``level`` in ``(3, 10, 20, 100)``, where
        ``labels[f]`` is the label of fine class ``f`` at that level (the 100-level map is
        the identity). The maps nest: ``h[3][f] == CIFAR100_10_TO_3[h[10][f]]`` and
        ``h[10][f] == CIFAR100_COARSE_TO_10[h[20][f]]``.

    Example:
        >>> h = cifar100_hierarchy()
        >>> [h[level][3] for level in (3, 10, 20, 100)]  # "bear"
        [0, 0, 8, 3]
    """
    c20 = CIFAR100_FINE_TO_COARSE
    c10 = tuple(CIFAR100_COARSE_TO_10[c] for c in c20)
    c3 = tuple(CIFAR100_10_TO_3[g] for g in c10)
    return {3: c3, 10: c10, 20: tuple(c20), 100: tuple(range(100))}


def cifar100_labels(fine: Tensor, level: int) -> Tensor:
    """Map fine CIFAR-100 labels to their labels at ``level`` of the hierarchy.

    Args:
        fine: integer tensor of fine labels in ``[0, 100)``, any shape.
        level: one of ``(3, 10, 20, 100)``.

    Returns:
        An int64 tensor of the same shape and device as ``fine``.

    Raises:
        TypeError: if ``fine`` is not an integer tensor or ``level`` not an int.
        ValueError: if ``level`` is not a hierarchy level or a label is out of range.

    Example:
        >>> cifar100_labels(torch.tensor([0, 3, 99]), 20).tolist()
        [4, 8, 13]
    """
    level = _check_level("level", level)
    if not isinstance(fine, Tensor) or fine.is_floating_point() or fine.dtype == torch.bool:
        raise TypeError(
            f"fine must be an integer torch.Tensor of fine CIFAR-100 labels, got "
            f"{type(fine).__name__}{'' if not isinstance(fine, Tensor) else f' ({fine.dtype})'}"
        )
    if fine.numel() and (int(fine.min()) < 0 or int(fine.max()) >= 100):
        raise ValueError(
            f"fine labels must lie in [0, 100), got range [{int(fine.min())}, {int(fine.max())}]"
        )
    table = torch.tensor(cifar100_hierarchy()[level], dtype=torch.int64, device=fine.device)
    return table[fine.long()]


def _children(primary_level: int, aux_level: int) -> list[list[int]]:
    """Sorted aux-level labels under each primary-level class."""
    h = cifar100_hierarchy()
    prim, aux = h[primary_level], h[aux_level]
    children: list[set[int]] = [set() for _ in range(primary_level)]
    for f in range(100):
        children[prim[f]].add(aux[f])
    return [sorted(c) for c in children]


def hierarchy_psi(primary_level: int, aux_level: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``psi`` and the human auxiliary labels for a pair of CIFAR-100 hierarchy levels.

    The auxiliary classes are the ``aux_level`` classes, renumbered into the consecutive
    owner layout of :mod:`auxgen.hierarchy`: the children of primary class ``i`` become
    auxiliary classes ``offsets[i] .. offsets[i] + psi[i] - 1`` (in increasing order of their
    original ``aux_level`` label), with ``offsets = psi_offsets(psi)``.

    Args:
        primary_level: number of primary classes, one of ``(3, 10, 20)``.
        aux_level: number of auxiliary classes, a finer level than ``primary_level``
            (one of ``(10, 20, 100)``).

    Returns:
        ``(psi, fine_to_aux)``: ``psi[i]`` is the number of ``aux_level`` classes under
        primary class ``i`` (``sum(psi) == aux_level``), and ``fine_to_aux[f]`` is the
        auxiliary-class index of fine class ``f`` (a tuple of 100 ints).

    Raises:
        TypeError: if a level is not an int.
        ValueError: if a level is not in ``(3, 10, 20, 100)`` or ``aux_level`` is not finer
            than ``primary_level``.

    Example:
        >>> psi, fine_to_aux = hierarchy_psi(20, 100)
        >>> psi == (5,) * 20
        True
        >>> hierarchy_psi(3, 10)[0]
        (5, 1, 4)
    """
    primary_level = _check_level("primary_level", primary_level)
    aux_level = _check_level("aux_level", aux_level)
    if aux_level <= primary_level:
        raise ValueError(
            f"aux_level must be a finer level (more classes) than primary_level, got "
            f"primary_level={primary_level}, aux_level={aux_level}"
        )
    children = _children(primary_level, aux_level)
    psi = tuple(len(c) for c in children)
    offsets = psi_offsets(psi)
    new_index: dict[int, int] = {}
    for i, kids in enumerate(children):
        for r, a in enumerate(kids):
            new_index[a] = offsets[i] + r
    if sum(psi) != aux_level or len(new_index) != aux_level:  # pragma: no cover - table bug
        raise RuntimeError("CIFAR-100 hierarchy tables are not a proper tree")
    aux = cifar100_hierarchy()[aux_level]
    fine_to_aux = tuple(new_index[aux[f]] for f in range(100))
    return psi, fine_to_aux


def hierarchy_aux_names(primary_level: int, aux_level: int) -> tuple[str, ...]:
    """Names of the auxiliary classes of :func:`hierarchy_psi` in its consecutive layout.

    Example:
        >>> hierarchy_aux_names(20, 100)[:5]  # the children of "aquatic_mammals"
        ('beaver', 'dolphin', 'otter', 'seal', 'whale')
    """
    hierarchy_psi(primary_level, aux_level)  # validates the levels
    names = CIFAR100_LEVEL_NAMES[aux_level]
    return tuple(names[a] for kids in _children(primary_level, aux_level) for a in kids)


# --------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: coarse primary tasks over the 10 classes
# --------------------------------------------------------------------------------------------

#: MNIST primary task: ``digit >= 5`` (entry ``d`` is the primary class of digit ``d``); the
#: human auxiliary task is the digit itself, ``psi = (5, 5)``.
MNIST_PRIMARY: tuple[int, ...] = (0, 0, 0, 0, 0, 1, 1, 1, 1, 1)

#: The 10 Fashion-MNIST class names, in label order.
FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

#: Fashion-MNIST primary task: four garment groups (entry ``c`` is the group of class ``c``).
#: Tops are worn on the upper body (T-shirt/top, pullover, coat, shirt); trousers and dresses
#: are the garments that cover the legs; sandals, sneakers and ankle boots are footwear; bags
#: are the only accessory. Each group is visually coherent (silhouette) while its members are
#: the classes that single-task Fashion-MNIST models confuse most (shirt / T-shirt / pullover /
#: coat), so the 10 classes are a natural finer auxiliary task. ``psi = (4, 2, 3, 1)``.
FASHION_PRIMARY: tuple[int, ...] = (0, 1, 0, 1, 0, 2, 0, 2, 3, 2)
FASHION_PRIMARY_NAMES: tuple[str, ...] = ("tops", "trousers_and_dresses", "footwear", "bags")


def grouping_psi(fine_to_primary: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``psi`` and the fine -> auxiliary-class map of a two-level grouping.

    Primary class ``i`` owns one auxiliary class per fine class in it, in fine-label order,
    laid out as :mod:`auxgen.hierarchy` expects (consecutive blocks).

    Example:
        >>> grouping_psi(FASHION_PRIMARY)
        ((4, 2, 3, 1), (0, 4, 1, 5, 2, 6, 3, 7, 9, 8))
    """
    groups = sorted(set(int(g) for g in fine_to_primary))
    if groups != list(range(len(groups))):
        raise ValueError(f"primary classes must be 0..k-1, got {groups}")
    members = [[f for f, g in enumerate(fine_to_primary) if g == i] for i in groups]
    psi = tuple(len(m) for m in members)
    offsets = psi_offsets(psi)
    table = [0] * len(fine_to_primary)
    for i, m in enumerate(members):
        for j, f in enumerate(m):
            table[f] = offsets[i] + j
    return psi, tuple(table)
