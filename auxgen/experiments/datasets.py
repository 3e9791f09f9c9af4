"""The datasets of the experiments, in memory, with their primary labels and human task.

:func:`load_data` loads the dataset a :class:`~auxgen.experiments.config.RunConfig` names
and takes its training subset and validation / meta splits:

* ``digits``: scikit-learn's bundled 8x8 digits (no download; :func:`load_digits_hierarchy`):
  primary = ``digit >= 5``, human aux = the digit, ``psi = (5, 5)``.
* ``mnist`` / ``fashionmnist``: loaded with ``torchvision.datasets`` (:func:`load_mnist`);
  primary = a coarse grouping of the 10 classes (see :mod:`auxgen.experiments.hierarchies`),
  human aux = the class.
* ``cifar100``: primary = one level of the 4-level hierarchy (20 superclasses by default),
  aux = a finer level (the 100 fine classes by default); ``cifar10``: 10 classes, ``psi``
  chosen freely, no human hierarchy (files read by :mod:`auxgen.experiments.cifar`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .config import CIFAR_HALVES, RunConfig, resolve_task
from .hierarchies import (
    CIFAR10_CLASSES,
    CIFAR100_FINE_NAMES,
    CIFAR100_LEVEL_NAMES,
    FASHION_CLASSES,
    FASHION_PRIMARY,
    FASHION_PRIMARY_NAMES,
    MNIST_PRIMARY,
    cifar100_labels,
)
from .runtime import PathLike, as_root

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "GREY_STATS",
    "Data",
    "HierarchicalData",
    "load_data",
    "load_digits_hierarchy",
    "load_mnist",
]

logger = logging.getLogger(__name__)


#: Per-channel mean / std of the CIFAR-100 training images (pixels scaled to [0, 1]).
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)
#: Per-channel mean / std of the CIFAR-10 training images (pixels scaled to [0, 1]).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

#: Per-dataset ``(mean, std)`` of the training pixels scaled to [0, 1].
GREY_STATS: dict[str, tuple[tuple[float], tuple[float]]] = {
    "MNIST": ((0.1307,), (0.3081,)),
    "FashionMNIST": ((0.2860,), (0.3530,)),
}


@dataclass
class Data:
    """In-memory train/test data of one run.

    Images are ``(N, C, H, W)``: uint8 (CIFAR; scaled to [0, 1] and normalised with
    ``mean``/``std`` per batch) or float32 already standardised (digits).

    Attributes:
        x_train / x_test: images.
        y_train / y_test: primary labels.
        fine_train / fine_test: the finest labels available (digit, CIFAR-100 fine class;
            CIFAR-10: the class), used for the human task and the NMI analysis.
        psi: auxiliary classes per primary class.
        human_aux: maps fine labels to human auxiliary classes (``None``: no human task).
        class_names / fine_names: label names.
        mean / std: per-channel normalisation (``None`` when already standardised).
        flip: whether horizontal flips are a valid augmentation.
        has_hierarchy: whether ``fine`` labels are finer than the primary ones.
        x_val / y_val / fine_val: the validation split (``None`` without one).
        x_meta / y_meta: the held-out meta split (``None`` without one).
    """

    x_train: Tensor
    y_train: Tensor
    fine_train: Tensor
    x_test: Tensor
    y_test: Tensor
    fine_test: Tensor
    psi: tuple[int, ...]
    human_aux: Optional[Tensor]
    class_names: tuple[str, ...]
    fine_names: tuple[str, ...]
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    flip: bool = True
    has_hierarchy: bool = True
    x_val: Optional[Tensor] = None
    y_val: Optional[Tensor] = None
    fine_val: Optional[Tensor] = None
    x_meta: Optional[Tensor] = None
    y_meta: Optional[Tensor] = None

    @property
    def num_classes(self) -> int:
        """Number of primary classes."""
        return len(self.psi)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


def _subset_indices(fine: Tensor, per_class: Union[int, float, None], seed: int) -> Tensor:
    """The first ``per_class`` samples of each fine class in a seeded random order (sorted).

    A float ``per_class`` is a fraction of each class (rounded, at least one sample).
    """
    if per_class is None:
        return torch.arange(fine.numel())
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(fine.numel(), generator=g)
    keep = []
    for c in torch.unique(fine).tolist():
        members = order[fine[order] == c]
        k = per_class if isinstance(per_class, int) else max(1, round(per_class * len(members)))
        keep.append(members[:k])
    return torch.sort(torch.cat(keep)).values


def _carve(fine: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices ``(kept, carved)``: ``fraction`` of each fine class is carved out.

    Stratified and seeded; each class keeps at least one sample and, when ``fraction > 0``
    and the class has two or more samples, gives at least one.
    """
    if fraction <= 0:
        return torch.arange(fine.numel()), torch.zeros(0, dtype=torch.int64)
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(fine.numel(), generator=g)
    kept, carved = [], []
    for c in torch.unique(fine).tolist():
        members = order[fine[order] == c]
        k = min(max(1, round(fraction * len(members))), len(members) - 1)
        carved.append(members[:k])
        kept.append(members[k:])
    return torch.sort(torch.cat(kept)).values, torch.sort(torch.cat(carved)).values


def _digits(cfg: RunConfig, psi: tuple[int, ...], human: Optional[Tensor]) -> Data:
    d = load_digits_hierarchy(seed=cfg.data_seed)
    return Data(
        x_train=d.x_train,
        y_train=d.y_train,
        fine_train=d.fine_train,
        x_test=d.x_test,
        y_test=d.y_test,
        fine_test=d.fine_test,
        psi=psi,
        human_aux=human,
        class_names=d.class_names,
        fine_names=d.aux_class_names,
        flip=False,
    )


def _from_fine(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    to_primary: Callable[[Tensor], Tensor],
    **fields: Any,
) -> Data:
    """A :class:`Data` from ``(images, fine labels)`` splits and the fine -> primary map."""
    (x_tr, f_tr), (x_te, f_te) = train, test
    return Data(
        x_train=x_tr,
        y_train=to_primary(f_tr),
        fine_train=f_tr,
        x_test=x_te,
        y_test=to_primary(f_te),
        fine_test=f_te,
        **fields,
    )


def _cifar100(cfg: RunConfig, psi: tuple[int, ...], human: Optional[Tensor]) -> Data:
    from .cifar import load_cifar100

    primary = len(psi)
    x_tr, f_tr, _ = load_cifar100(cfg.data_dir, train=True, download=cfg.download)
    x_te, f_te, _ = load_cifar100(cfg.data_dir, train=False, download=cfg.download)
    return _from_fine(
        (x_tr, f_tr),
        (x_te, f_te),
        lambda fine: cifar100_labels(fine, primary),
        psi=psi,
        human_aux=human,
        class_names=CIFAR100_LEVEL_NAMES[primary],
        fine_names=CIFAR100_FINE_NAMES,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    )


def _grey(cfg: RunConfig, psi: tuple[int, ...], human: Optional[Tensor]) -> Data:
    """MNIST or Fashion-MNIST with its coarse primary task."""
    mnist = cfg.dataset == "mnist"
    name = "MNIST" if mnist else "FashionMNIST"
    groups = torch.tensor(MNIST_PRIMARY if mnist else FASHION_PRIMARY)
    mean, std = GREY_STATS[name]
    return _from_fine(
        load_mnist(cfg.data_dir, name, train=True, download=cfg.download),
        load_mnist(cfg.data_dir, name, train=False, download=cfg.download),
        lambda fine: groups[fine],
        psi=psi,
        human_aux=human,
        class_names=("0-4", "5-9") if mnist else FASHION_PRIMARY_NAMES,
        fine_names=tuple(str(d) for d in range(10)) if mnist else FASHION_CLASSES,
        mean=mean,
        std=std,
        flip=not mnist,
    )


def _cifar10(cfg: RunConfig, psi: tuple[int, ...], human: Optional[Tensor]) -> Data:
    from .cifar import load_cifar10

    return _from_fine(
        load_cifar10(cfg.data_dir, train=True, download=cfg.download),
        load_cifar10(cfg.data_dir, train=False, download=cfg.download),
        lambda labels: labels,
        psi=psi,
        human_aux=None,
        class_names=CIFAR10_CLASSES,
        fine_names=CIFAR10_CLASSES,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        has_hierarchy=False,
    )


def _cifar_half(cfg: RunConfig, psi: tuple[int, ...], human: Optional[Tensor]) -> Data:
    """Half of CIFAR-100's fine classes as a 50-class task (labels ``fine - first``)."""
    from .cifar import load_cifar100

    first = CIFAR_HALVES[cfg.dataset]

    def half(split: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, fine, _ = split
        keep = (fine >= first) & (fine < first + 50)
        return x[keep], fine[keep] - first

    return _from_fine(
        half(load_cifar100(cfg.data_dir, train=True, download=cfg.download)),
        half(load_cifar100(cfg.data_dir, train=False, download=cfg.download)),
        lambda labels: labels,
        psi=psi,
        human_aux=None,
        class_names=CIFAR100_FINE_NAMES[first : first + 50],
        fine_names=CIFAR100_FINE_NAMES[first : first + 50],
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        has_hierarchy=False,
    )


#: The loader of each dataset name of :data:`auxgen.experiments.config.DATASETS`.
_LOADERS: dict[str, Callable[[RunConfig, tuple[int, ...], Optional[Tensor]], Data]] = {
    "digits": _digits,
    "cifar100": _cifar100,
    "cifar10": _cifar10,
    "cifar50a": _cifar_half,
    "cifar50b": _cifar_half,
    "mnist": _grey,
    "fashionmnist": _grey,
}


def _check_subset(fine: Tensor, cfg: RunConfig) -> None:
    """Refuse a ``train_subset`` count that some fine class of the training set cannot give.

    A count above the smallest fine class would silently give that class fewer images than
    asked for (and a count above the largest, the whole training set). ``smoke`` runs take
    *at most* 4 images per class, so they are not checked.

    Raises:
        ValueError: naming ``train_subset``, the most it can be and the count given.
    """
    per_class = cfg.train_subset
    if not isinstance(per_class, int) or cfg.smoke:
        return
    smallest = int(torch.unique(fine, return_counts=True)[1].min()) if fine.numel() else 0
    if per_class > smallest:
        raise ValueError(
            f"train_subset must be at most {smallest} images per fine class (the smallest fine "
            f"class of the {cfg.dataset} training set has {smallest}), a fraction in (0, 1) or "
            f"the whole training set, got {per_class}"
        )


def _split(data: Data, cfg: RunConfig) -> None:
    """Take the training subset, carve the validation and meta splits, limit the test set.

    Raises:
        ValueError: ``train_subset`` asks for more images per fine class than there are.
    """
    _check_subset(data.fine_train, cfg)
    keep = _subset_indices(data.fine_train, cfg.train_subset, cfg.data_seed)
    if keep.numel() != data.x_train.shape[0]:
        data.x_train, data.y_train = data.x_train[keep], data.y_train[keep]
        data.fine_train = data.fine_train[keep]
    # Validation, then meta split, carved from the training subset (seeded by data_seed, so
    # every method and seed trains on the same images).
    keep, val = _carve(data.fine_train, cfg.val_fraction, cfg.data_seed + 1)
    if val.numel():
        data.x_val, data.y_val, data.fine_val = (
            data.x_train[val],
            data.y_train[val],
            data.fine_train[val],
        )
        data.x_train, data.y_train = data.x_train[keep], data.y_train[keep]
        data.fine_train = data.fine_train[keep]
    heldout = cfg.method == "maxl" and cfg.meta_source == "heldout"
    meta_fraction = cfg.meta_fraction if heldout else 0.0
    keep, held = _carve(data.fine_train, meta_fraction, cfg.data_seed + 2)
    if held.numel():
        data.x_meta, data.y_meta = data.x_train[held], data.y_train[held]
        data.x_train, data.y_train = data.x_train[keep], data.y_train[keep]
        data.fine_train = data.fine_train[keep]
    if cfg.test_limit is not None:
        n = min(cfg.test_limit, data.x_test.shape[0])
        data.x_test, data.y_test, data.fine_test = (
            data.x_test[:n],
            data.y_test[:n],
            data.fine_test[:n],
        )


def load_data(config: RunConfig) -> Data:
    """Load the dataset of ``config`` with its primary labels, ``psi`` and human task.

    Raises:
        FileNotFoundError: CIFAR files are missing (and ``download`` is off).
        ValueError: malformed files, levels / ``psi`` that do not fit the dataset, or a
            ``train_subset`` count above the images of the smallest fine class.
    """
    cfg = config
    psi, table = resolve_task(cfg)
    human = torch.tensor(table, dtype=torch.int64) if table is not None else None
    data = _LOADERS[cfg.dataset](cfg, psi, human)
    _split(data, cfg)
    logger.info(
        "%s: %d train / %d val / %d meta / %d test images, %d primary classes, psi=%s",
        cfg.dataset,
        data.x_train.shape[0],
        0 if data.x_val is None else data.x_val.shape[0],
        0 if data.x_meta is None else data.x_meta.shape[0],
        data.x_test.shape[0],
        data.num_classes,
        list(data.psi) if len(set(data.psi)) > 1 else f"{data.psi[0]} x {len(data.psi)}",
    )
    return data


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


def _check_split_args(test_fraction: Any, seed: Any) -> None:
    """Raise if the arguments of :func:`load_digits_hierarchy` are of the wrong type or range."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(
            f"test_fraction must be a float in (0, 1), got {type(test_fraction).__name__} "
            f"{test_fraction!r}"
        )
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")


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

    _check_split_args(test_fraction, seed)
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
    root = as_root(data_dir)
    try:
        ds = getattr(datasets, name)(root=str(root), train=train, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found. You can use download=True"
        raise FileNotFoundError(
            f"{name} {'train' if train else 'test'} data not found under {root / name}: {e}; "
            f"pass --download or point --data-dir at a folder containing {name}/raw/"
        ) from None
    images = ds.data.to(torch.uint8).unsqueeze(1).contiguous()
    return images, ds.targets.to(torch.int64)
