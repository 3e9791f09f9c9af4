"""Datasets and class hierarchies for the MAXL experiments (used by the CLI and examples).

Three pieces live here:

* **Hierarchies.** The CIFAR-100 4-level hierarchy (3, 10, 20 and 100 classes) of the MAXL
  paper, and :func:`hierarchy_psi`, which turns a (primary level, auxiliary level) pair into
  the ``psi`` and the fine-class -> auxiliary-class map used by the human-label baseline, laid
  out like :mod:`auxgen.hierarchy` expects (primary class ``i`` owns the ``psi[i]`` consecutive
  auxiliary classes ``offsets[i] .. offsets[i] + psi[i] - 1``).
* **Loaders.** :func:`load_cifar100` and :func:`load_cifar10` read torchvision's on-disk
  pickle format directly (no md5 integrity check, so re-packed copies load too), and
  :func:`load_digits_hierarchy` builds a tiny 2-class problem with a 10-class human hierarchy
  from scikit-learn's bundled digits (no download).
* **Training dataset.** :class:`TensorImageDataset`, a tensor-backed dataset with optional
  normalisation and the standard CIFAR augmentation (4-pixel padded random crop and
  horizontal flip) written in plain torch ops, see :func:`random_crop_flip`.

Where the CIFAR-100 hierarchy comes from:

* 100 -> 20: the standard CIFAR-100 superclass table (:data:`CIFAR100_FINE_TO_COARSE`); it
  agrees with the ``coarse_labels`` stored in the official ``train`` and ``test`` files, and
  :func:`load_cifar100` checks every sample against it.
* 20 -> 10 and 10 -> 3: the grouping of the MAXL paper (Liu, Davison & Johns, NeurIPS 2019,
  Appendix A), copied from the dictionaries ``class_10`` and ``class_3`` in
  ``create_dataset.py`` of the authors' repository https://github.com/lorenmt/maxl.
  The original code defines only indices; the group *names* in
  :data:`CIFAR100_LEVEL_NAMES` for the 10- and 3-class levels are descriptive names chosen
  here from the superclasses each group contains.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

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
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "HierarchicalData",
    "load_digits_hierarchy",
    "cifar100_hierarchy",
    "cifar100_labels",
    "hierarchy_psi",
    "hierarchy_aux_names",
    "load_cifar100",
    "load_cifar10",
    "MNIST_PRIMARY",
    "FASHION_CLASSES",
    "FASHION_PRIMARY",
    "FASHION_PRIMARY_NAMES",
    "GREY_STATS",
    "grouping_psi",
    "load_mnist",
    "random_crop_flip",
    "TensorImageDataset",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

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

#: Per-channel mean / std of the CIFAR-100 training images (pixels scaled to [0, 1]).
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)
#: Per-channel mean / std of the CIFAR-10 training images (pixels scaled to [0, 1]).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)


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
# scikit-learn digits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HierarchicalData:
    """An in-memory dataset with primary labels and human auxiliary labels.

    Attributes:
        x_train: ``(N, C, H, W)`` float32 training inputs.
        y_train: ``(N,)`` int64 primary labels.
        aux_train: ``(N,)`` int64 human auxiliary labels in the consecutive owner layout
            (``owner_index(psi)[aux_train] == y_train``).
        x_test: test inputs.
        y_test: test primary labels.
        aux_test: test human auxiliary labels.
        psi: auxiliary classes per primary class.
        num_classes: number of primary classes, ``len(psi)``.
        class_names: name of each primary class.
        aux_class_names: name of each auxiliary class.
        fine_train: ``(N,)`` int64 original fine labels of the training samples.
        fine_test: original fine labels of the test samples.
    """

    x_train: Tensor
    y_train: Tensor
    aux_train: Tensor
    x_test: Tensor
    y_test: Tensor
    aux_test: Tensor
    psi: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...]
    aux_class_names: tuple[str, ...]
    fine_train: Tensor
    fine_test: Tensor

    @property
    def num_aux_classes(self) -> int:
        """Total number of auxiliary classes, ``sum(psi)``."""
        return sum(self.psi)


def load_digits_hierarchy(test_fraction: float = 0.3, seed: int = 0) -> HierarchicalData:
    """scikit-learn's 8x8 digits as a 2-class problem with the digit as human auxiliary label.

    The primary task is ``digit >= 5`` (classes ``"0-4"`` and ``"5-9"``) with ``psi = (5, 5)``:
    primary class 0 owns auxiliary classes 0..4 (digits 0..4) and primary class 1 owns 5..9
    (digits 5..9), so the human auxiliary label is the digit itself. Pixels are scaled to
    ``[0, 1]`` and then standardised with the scalar mean and std of the training pixels.
    The split is stratified by digit and deterministic given ``seed``. Uses the copy bundled
    with scikit-learn (no download).

    Args:
        test_fraction: fraction of the 1797 samples held out for testing, in ``(0, 1)``.
        seed: random seed of the split.

    Returns:
        A :class:`HierarchicalData` with ``(N, 1, 8, 8)`` float32 inputs.

    Raises:
        TypeError: if ``test_fraction`` is not a number or ``seed`` not an int.
        ValueError: if ``test_fraction`` is not in ``(0, 1)``.

    Example:
        >>> d = load_digits_hierarchy()
        >>> d.x_train.shape[1:], d.psi, d.class_names
        (torch.Size([1, 8, 8]), (5, 5), ('0-4', '5-9'))
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(
            f"test_fraction must be a float in (0, 1), got {type(test_fraction).__name__} "
            f"{test_fraction!r}"
        )
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")

    digits = load_digits()
    x = np.asarray(digits.images, dtype=np.float32) / 16.0  # values 0..16 -> [0, 1]
    digit = np.asarray(digits.target, dtype=np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(digit)),
        test_size=float(test_fraction),
        random_state=int(seed),
        stratify=digit,
    )
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    mean = float(x[idx_train].mean())
    std = float(x[idx_train].std())
    x = (x - mean) / std

    def split(idx: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        xs = torch.from_numpy(np.ascontiguousarray(x[idx])).unsqueeze(1)
        fine = torch.from_numpy(digit[idx].copy())
        return xs, (fine >= 5).long(), fine

    x_train, y_train, fine_train = split(idx_train)
    x_test, y_test, fine_test = split(idx_test)
    logger.debug(
        "digits hierarchy: %d train / %d test samples, pixel mean %.4f std %.4f",
        len(idx_train),
        len(idx_test),
        mean,
        std,
    )
    return HierarchicalData(
        x_train=x_train,
        y_train=y_train,
        aux_train=fine_train.clone(),
        x_test=x_test,
        y_test=y_test,
        aux_test=fine_test.clone(),
        psi=(5, 5),
        num_classes=2,
        class_names=("0-4", "5-9"),
        aux_class_names=tuple(str(d) for d in range(10)),
        fine_train=fine_train,
        fine_test=fine_test,
    )


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

#: Per-dataset ``(mean, std)`` of the training pixels scaled to [0, 1].
GREY_STATS: dict[str, tuple[tuple[float], tuple[float]]] = {
    "MNIST": ((0.1307,), (0.3081,)),
    "FashionMNIST": ((0.2860,), (0.3530,)),
}


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


def load_mnist(
    data_dir: PathLike, name: str, train: bool, download: bool = False
) -> tuple[Tensor, Tensor]:
    """Load MNIST or Fashion-MNIST with ``torchvision.datasets`` (its on-disk layout).

    Args:
        data_dir: folder that contains (or will contain) ``MNIST/raw`` or
            ``FashionMNIST/raw`` (the uncompressed IDX files).
        name: ``"MNIST"`` or ``"FashionMNIST"``.
        train: the 60000 training images if True, else the 10000 test images.
        download: fetch the dataset with torchvision if it is missing.

    Returns:
        ``(images, labels)``: ``(N, 1, 28, 28)`` uint8 and ``(N,)`` int64.

    Raises:
        FileNotFoundError: if the files are missing and ``download`` is False.
    """
    from torchvision import datasets

    if name not in GREY_STATS:
        raise ValueError(f"name must be one of {tuple(GREY_STATS)}, got {name!r}")
    root = _as_root(data_dir)
    try:
        ds = getattr(datasets, name)(root=str(root), train=train, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found. You can use download=True"
        raise FileNotFoundError(
            f"{name} {'train' if train else 'test'} data not found under {root / name}: {e}; "
            f"pass --download or point --data-dir at a folder containing {name}/raw/"
        ) from None
    images = ds.data.to(torch.uint8).unsqueeze(1).contiguous()
    return images, ds.targets.to(torch.int64)


# --------------------------------------------------------------------------------------------
# CIFAR loaders (torchvision's on-disk pickle format, no md5 check)
# --------------------------------------------------------------------------------------------


def _as_root(data_dir: Any) -> Path:
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(
            f"data_dir must be a str or os.PathLike folder path, got {type(data_dir).__name__}"
        )
    return Path(data_dir).expanduser()


def _read_batch(path: Path) -> dict[str, Any]:
    """Unpickle one CIFAR batch file into a dict with str keys.

    Note: like torchvision, this uses :mod:`pickle`; only load files you trust.
    """
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except (
        pickle.UnpicklingError,
        EOFError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
        TypeError,
        ValueError,
        UnicodeDecodeError,
    ) as e:
        raise ValueError(
            f"{path} is not a valid CIFAR pickle file ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path} is not a valid CIFAR pickle file: expected a dict, got {type(obj).__name__}"
        )
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _get(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise ValueError(
            f"{path} is not a valid CIFAR pickle file: missing key {key!r} "
            f"(found keys {sorted(map(str, batch))})"
        )
    return batch[key]


def _images(batch: dict[str, Any], path: Path) -> np.ndarray:
    """``(N, 3, 32, 32)`` uint8 images from the ``data`` entry (rows of 3072 CHW bytes)."""
    raw = _get(batch, "data", path)
    try:
        data = np.asarray(raw)
    except (TypeError, ValueError) as e:  # pragma: no cover - ragged objects
        raise ValueError(f"{path}: 'data' is not an array ({e})") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: 'data' must have shape (N, 3072) (3x32x32 images in CHW order), "
            f"got {data.shape}"
        )
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or (
            data.size and (data.min() < 0 or data.max() > 255)
        ):
            raise ValueError(f"{path}: 'data' must hold uint8 pixels, got dtype {data.dtype}")
        data = data.astype(np.uint8)
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32))


def _labels(batch: dict[str, Any], key: str, n: int, num_classes: int, path: Path) -> np.ndarray:
    raw = _get(batch, key, path)
    try:
        labels = np.asarray(raw)
    except (TypeError, ValueError) as e:  # pragma: no cover - ragged objects
        raise ValueError(f"{path}: {key!r} is not a list of ints ({e})") from e
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(
            f"{path}: {key!r} must be a flat list with one label per image ({n}), "
            f"got shape {labels.shape}"
        )
    if n and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: {key!r} must hold integer labels, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{path}: {key!r} must lie in [0, {num_classes}), got range "
            f"[{labels.min()}, {labels.max()}]"
        )
    return labels


def _ensure_files(
    root: Path, folder: str, files: Sequence[str], dataset: str, train: bool, download: bool
) -> list[Path]:
    paths = [root / folder / name for name in files]
    if download and not all(p.is_file() for p in paths):
        from torchvision import datasets

        logger.info("downloading %s to %s with torchvision", dataset, root)
        getattr(datasets, dataset)(root=str(root), train=train, download=True)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        pretty = {"CIFAR100": "CIFAR-100", "CIFAR10": "CIFAR-10"}[dataset]
        raise FileNotFoundError(
            f"{pretty} {'train' if train else 'test'} data not found: expected {missing[0]}; "
            f"pass --download or point --data-dir at a folder containing {folder}/"
        )
    return paths


def load_cifar100(
    data_dir: PathLike, train: bool, download: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Load a CIFAR-100 split from torchvision's on-disk format.

    Reads ``<data_dir>/cifar-100-python/{train,test}`` (pickled dicts with ``data``,
    ``fine_labels`` and ``coarse_labels``) directly, without torchvision's md5 check, so
    re-packed copies of the dataset load as well. The coarse labels are checked against
    :data:`CIFAR100_FINE_TO_COARSE`.

    Args:
        data_dir: folder that contains (or will contain) ``cifar-100-python/``.
        train: load the training split (50000 images) if True, else the test split (10000).
        download: if the file is missing, fetch the dataset with
            ``torchvision.datasets.CIFAR100(root=data_dir, download=True)`` first.

    Returns:
        ``(images, fine_labels, coarse_labels)``: ``(N, 3, 32, 32)`` uint8 images and two
        ``(N,)`` int64 label tensors.

    Raises:
        FileNotFoundError: if the split is missing and ``download`` is False.
        ValueError: if a file is malformed.

    Example:
        >>> images, fine, coarse = load_cifar100("data", train=False)  # doctest: +SKIP
        >>> images.shape, images.dtype  # doctest: +SKIP
        (torch.Size([10000, 3, 32, 32]), torch.uint8)
    """
    root = _as_root(data_dir)
    (path,) = _ensure_files(
        root, "cifar-100-python", ["train" if train else "test"], "CIFAR100", train, download
    )
    batch = _read_batch(path)
    images = _images(batch, path)
    n = images.shape[0]
    fine = _labels(batch, "fine_labels", n, 100, path)
    coarse = _labels(batch, "coarse_labels", n, 20, path)
    expected = np.asarray(CIFAR100_FINE_TO_COARSE, dtype=np.int64)[fine]
    bad = np.flatnonzero(coarse != expected)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{path}: 'coarse_labels' disagree with CIFAR100_FINE_TO_COARSE for {bad.size} "
            f"samples (first: sample {i}, fine {fine[i]}, coarse {coarse[i]}, "
            f"expected {expected[i]})"
        )
    logger.debug("loaded %d CIFAR-100 %s images from %s", n, "train" if train else "test", path)
    return torch.from_numpy(images), torch.from_numpy(fine), torch.from_numpy(coarse)


def load_cifar10(data_dir: PathLike, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
    """Load a CIFAR-10 split from torchvision's on-disk format.

    Reads ``<data_dir>/cifar-10-batches-py/data_batch_1 .. data_batch_5`` (train) or
    ``test_batch`` (test) directly, without torchvision's md5 check.

    Args:
        data_dir: folder that contains (or will contain) ``cifar-10-batches-py/``.
        train: load the training split (50000 images) if True, else the test split (10000).
        download: if a file is missing, fetch the dataset with
            ``torchvision.datasets.CIFAR10(root=data_dir, download=True)`` first.

    Returns:
        ``(images, labels)``: ``(N, 3, 32, 32)`` uint8 images and ``(N,)`` int64 labels.

    Raises:
        FileNotFoundError: if the split is missing and ``download`` is False.
        ValueError: if a file is malformed.

    Example:
        >>> images, labels = load_cifar10("data", train=True)  # doctest: +SKIP
        >>> images.shape  # doctest: +SKIP
        torch.Size([50000, 3, 32, 32])
    """
    root = _as_root(data_dir)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    paths = _ensure_files(root, "cifar-10-batches-py", names, "CIFAR10", train, download)
    all_images, all_labels = [], []
    for path in paths:
        batch = _read_batch(path)
        images = _images(batch, path)
        all_images.append(images)
        all_labels.append(_labels(batch, "labels", images.shape[0], 10, path))
    images = np.concatenate(all_images)
    labels = np.concatenate(all_labels)
    logger.debug("loaded %d CIFAR-10 %s images", len(labels), "train" if train else "test")
    return torch.from_numpy(images), torch.from_numpy(labels)


# --------------------------------------------------------------------------------------------
# Tensor-backed training dataset
# --------------------------------------------------------------------------------------------


def random_crop_flip(
    x: Tensor, padding: int = 4, flip: bool = True, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Random crop from a zero-padded image plus a random horizontal flip.

    The standard CIFAR augmentation (``RandomCrop(size, padding)`` + ``RandomHorizontalFlip``)
    in plain torch ops. Padding is with zeros, i.e. black pixels when applied before
    normalisation (as torchvision does). A batch gets an independent crop and flip per image.

    Args:
        x: one image ``(C, H, W)`` or a batch ``(B, C, H, W)``, any dtype and device.
        padding: pixels of zero padding on each side; the crop offset is uniform in
            ``[0, 2 * padding]`` along each axis. ``0`` disables cropping.
        flip: flip each image horizontally with probability 1/2.
        generator: CPU ``torch.Generator`` for the random draws; ``None`` uses torch's global
            RNG (seeded per worker by ``DataLoader``).

    Returns:
        A tensor of the same shape, dtype and device as ``x``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> random_crop_flip(torch.ones(3, 32, 32), padding=4, generator=g).shape
        torch.Size([3, 32, 32])
    """
    if not isinstance(x, Tensor) or x.dim() not in (3, 4):
        raise ValueError(
            "x must be an image tensor of shape (C, H, W) or (B, C, H, W), got "
            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    single = x.dim() == 3
    batch = x.unsqueeze(0) if single else x
    b, _, h, w = batch.shape
    if padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator)
        padded = F.pad(batch, (padding, padding, padding, padding))
        if b == 1:
            oy, ox = int(offsets[0, 0]), int(offsets[1, 0])
            batch = padded[:, :, oy : oy + h, ox : ox + w]
        else:
            offsets = offsets.to(batch.device)
            rows = offsets[0, :, None] + torch.arange(h, device=batch.device)  # (B, H)
            cols = offsets[1, :, None] + torch.arange(w, device=batch.device)  # (B, W)
            bidx = torch.arange(b, device=batch.device)[:, None, None]
            # advanced indices separated by a slice -> result is (B, H, W, C)
            batch = padded[bidx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        do_flip = torch.randint(0, 2, (b,), generator=generator).bool()
        if b == 1:
            if bool(do_flip[0]):
                batch = batch.flip(-1)
        else:
            mask = do_flip.to(batch.device)[:, None, None, None]
            batch = torch.where(mask, batch.flip(-1), batch)
    batch = batch.contiguous()
    return batch[0] if single else batch


def _label_tensor(name: str, value: Any, n: Optional[int]) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer labels, got {type(value)}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if value.dim() != 1:
        raise ValueError(
            f"{name} must be 1-D (one label per image), got shape {tuple(value.shape)}"
        )
    if n is not None and value.shape[0] != n:
        raise ValueError(f"{name} must have one label per image ({n}), got {value.shape[0]}")
    return value.long()


class TensorImageDataset(Dataset):
    """Images and labels held in memory as tensors, with optional normalisation and augmentation.

    Each item is ``(x, y, aux, index)``: the float32 image ``(C, H, W)``, its primary label,
    its auxiliary label (``-1`` when no ``aux`` labels were given) and its index in the
    dataset (handy to look up per-sample state, e.g. generated labels).

    Images are kept in their given dtype (uint8 keeps CIFAR-100 at 150 MB) and converted per
    item: uint8 pixels are scaled to ``[0, 1]``, float images are used as they are. Augmentation
    (when ``augment``) runs before normalisation: :func:`random_crop_flip` with ``padding``.

    Randomness: with a ``generator`` the augmentation is reproducible given the generator's
    seed and the order of access (single-process loading). With ``generator=None`` it uses
    torch's global RNG, so it is reproducible given ``torch.manual_seed`` and, with
    ``DataLoader(num_workers > 0)``, each worker draws its own stream (prefer ``None`` there:
    a generator would be copied into every worker and repeat the same draws).

    Args:
        images: ``(N, C, H, W)`` uint8 or floating tensor.
        y: ``(N,)`` integer primary labels.
        aux: optional ``(N,)`` integer auxiliary labels.
        mean: optional per-channel mean (length ``C``), applied after scaling to ``[0, 1]``.
        std: optional per-channel std (length ``C``); required together with ``mean``.
        augment: apply a random padded crop and horizontal flip to each item.
        padding: crop padding used when ``augment`` is set.
        generator: optional CPU ``torch.Generator`` driving the augmentation.

    Example:
        >>> ds = TensorImageDataset(
        ...     torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]),
        ...     mean=CIFAR100_MEAN, std=CIFAR100_STD, augment=True)
        >>> x, y, aux, index = ds[1]
        >>> x.shape, int(y), int(aux), index
        (torch.Size([3, 32, 32]), 1, -1, 1)
    """

    def __init__(
        self,
        images: Tensor,
        y: Tensor,
        aux: Optional[Tensor] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        augment: bool = False,
        padding: int = 4,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"images must be uint8 or floating point, got dtype {images.dtype}")
        n, c = images.shape[0], images.shape[1]
        self.images = images
        self.y = _label_tensor("y", y, n)
        self.aux = None if aux is None else _label_tensor("aux", aux, n)
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together (or both left as None)")
        self.mean: Optional[Tensor] = None
        self.std: Optional[Tensor] = None
        if mean is not None and std is not None:
            m = torch.as_tensor(mean, dtype=torch.float32).flatten()
            s = torch.as_tensor(std, dtype=torch.float32).flatten()
            if m.numel() != c or s.numel() != c:
                raise ValueError(
                    f"mean and std must have one entry per channel ({c}), got "
                    f"{m.numel()} and {s.numel()}"
                )
            if not bool((s > 0).all()):
                raise ValueError(f"std entries must be positive, got {s.tolist()}")
            self.mean, self.std = m.view(c, 1, 1), s.view(c, 1, 1)
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative int, got {padding!r}")
        self.augment = bool(augment)
        self.padding = padding
        self.generator = generator
        self._no_aux = torch.tensor(-1, dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, int]:
        x = self.images[index]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.augment:
            x = random_crop_flip(x, padding=self.padding, generator=self.generator)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        aux = self._no_aux if self.aux is None else self.aux[index]
        return x, self.y[index], aux, int(index)
