"""CIFAR-100 and CIFAR-10 files in torchvision's on-disk format."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .datasets import PathLike, as_root
from .hierarchies import CIFAR100_FINE_TO_COARSE

__all__ = ["load_cifar100", "load_cifar10"]

logger = logging.getLogger(__name__)


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
    root = as_root(data_dir)
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
    root = as_root(data_dir)
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
