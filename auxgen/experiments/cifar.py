"""CIFAR-100 and CIFAR-10 through ``torchvision.datasets``, reading re-packed copies too.

:class:`CIFAR100Dataset` and :class:`CIFAR10Dataset` are torchvision's ``CIFAR100`` and
``CIFAR10`` (same on-disk layout, file list, ``download=True`` and ``__getitem__`` with
transforms) with two differences:

* A file whose md5 differs from the official release's is read, with a
  :class:`ChecksumWarning`, instead of failing as "Dataset not found or corrupted": copies
  re-packed by other tools hold the same arrays in different pickles.
* The pickles are read by a validating reader (:func:`_read_batch` and the checks below):
  torchvision's ``__init__`` unpickles them unchecked (a malformed file fails with a bare
  ``KeyError`` or reshape error, label counts and ranges are not checked) and drops
  CIFAR-100's ``coarse_labels``, which are checked here against
  :data:`~auxgen.experiments.hierarchies.CIFAR100_FINE_TO_COARSE`. A malformed file is a
  ``ValueError`` that names the file and what is wrong.

:func:`load_cifar100` and :func:`load_cifar10` return a split as tensors.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from .hierarchies import CIFAR10_CLASSES, CIFAR100_FINE_NAMES, CIFAR100_FINE_TO_COARSE
from .runtime import PathLike, as_root

__all__ = [
    "ChecksumWarning",
    "CIFAR100Dataset",
    "CIFAR10Dataset",
    "load_cifar100",
    "load_cifar10",
    "write_fake_cifar100",
]

logger = logging.getLogger(__name__)


class ChecksumWarning(UserWarning):
    """A CIFAR file's md5 differs from the official release's; it is read anyway."""


class _LenientFiles:
    """Locating, downloading and checking the split's files, shared by both datasets."""

    root: str
    base_folder: str
    train: bool
    train_list: list[list[str]]
    test_list: list[list[str]]
    download: Callable[[], None]
    #: "CIFAR-100" or "CIFAR-10", for messages.
    pretty: str = ""
    class_names: tuple[str, ...] = ()
    images: np.ndarray
    data: np.ndarray
    targets: list[int]
    classes: list[str]
    class_to_idx: dict[str, int]
    _mismatched: list[Path]

    def __init__(
        self,
        root: PathLike,
        train: bool = True,
        transform: Optional[Callable[..., Any]] = None,
        target_transform: Optional[Callable[..., Any]] = None,
        download: bool = False,
    ) -> None:
        # Not torchvision's CIFAR10.__init__, which unpickles the files unchecked; everything
        # else of the dataset (layout, download, __getitem__) is torchvision's.
        datasets.VisionDataset.__init__(
            self, str(root), transform=transform, target_transform=target_transform
        )
        self.train = train
        paths = self._locate(download)
        self.images, labels = self._read(paths)
        self.data = self.images.transpose(0, 2, 3, 1)  # torchvision's HWC layout (a view)
        self.targets = labels.tolist()
        self._load_meta()
        self._warn_mismatches()
        split = "train" if train else "test"
        logger.debug("loaded %d %s %s images from %s", len(labels), self.pretty, split, paths)

    def _read(self, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)`` of the split's files, validated."""
        raise NotImplementedError

    def _load_meta(self) -> None:
        """Class names from :mod:`auxgen.experiments.hierarchies` (no meta file needed)."""
        self.classes = list(self.class_names)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    def _split_files(self) -> list[tuple[Path, str]]:
        files = self.train_list if self.train else self.test_list
        return [(Path(self.root) / self.base_folder / name, md5) for name, md5 in files]

    def _check_integrity(self) -> bool:
        """Whether the split's files exist (torchvision's hook, also used by ``download``).

        torchvision also requires their md5 to match the official release's; here a
        mismatch is only noted, and warned about once the files have been read.
        """
        files = self._split_files()
        if not all(path.is_file() for path, _ in files):
            return False
        self._mismatched = [path for path, md5 in files if not check_integrity(str(path), md5)]
        return True

    def _locate(self, download: bool) -> list[Path]:
        """The split's files, fetched by torchvision first when asked and missing.

        Raises:
            FileNotFoundError: a file is missing (and ``download`` is off).
        """
        split = "train" if self.train else "test"
        present = self._check_integrity()
        if download and not present:
            logger.info("downloading %s to %s with torchvision", self.pretty, self.root)
            self.download()
            present = self._check_integrity()
        if not present:
            missing = next(path for path, _ in self._split_files() if not path.is_file())
            raise FileNotFoundError(
                f"{self.pretty} {split} data not found: expected {missing}; pass --download "
                f"or point --data-dir at a folder containing {self.base_folder}/"
            )
        return [path for path, _ in self._split_files()]

    def _warn_mismatches(self) -> None:
        for path in self._mismatched:
            warnings.warn(
                f"{path}: md5 differs from the official {self.pretty} release; read anyway",
                ChecksumWarning,
                stacklevel=3,
            )


class CIFAR100Dataset(_LenientFiles, datasets.CIFAR100):
    """torchvision's ``CIFAR100``, reading re-packed copies and checking the files' contents.

    Items are ``(PIL image, fine label)`` as in torchvision. A file whose md5 differs from the
    official release's is read with a :class:`ChecksumWarning` (see the module docstring).

    Args:
        root: folder that contains (or will contain) ``cifar-100-python/``.
        train: the training split (50000 images) if True, else the test split (10000).
        transform: applied to each PIL image.
        target_transform: applied to each label.
        download: fetch the dataset with torchvision if the split's file is missing.

    Attributes:
        images: ``(N, 3, 32, 32)`` uint8 images (``data`` is their ``(N, 32, 32, 3)`` view).
        fine_labels: ``(N,)`` int64 fine labels (``targets`` as a list).
        coarse_labels: ``(N,)`` int64 superclass labels, checked against
            :data:`~auxgen.experiments.hierarchies.CIFAR100_FINE_TO_COARSE`.

    Raises:
        FileNotFoundError: the split is missing and ``download`` is False.
        ValueError: a file is malformed.
    """

    pretty = "CIFAR-100"
    class_names = CIFAR100_FINE_NAMES

    def _read(self, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        (path,) = paths
        batch = _read_batch(path)
        images = _images(batch, path)
        n = images.shape[0]
        self.fine_labels = _labels(batch, "fine_labels", n, 100, path)
        self.coarse_labels = _labels(batch, "coarse_labels", n, 20, path)
        _check_coarse(self.fine_labels, self.coarse_labels, path)
        return images, self.fine_labels


class CIFAR10Dataset(_LenientFiles, datasets.CIFAR10):
    """torchvision's ``CIFAR10``, reading re-packed copies and checking the files' contents.

    As :class:`CIFAR100Dataset`, for ``cifar-10-batches-py/`` (five training batches or
    ``test_batch``); ``labels`` holds the ``(N,)`` int64 labels.
    """

    pretty = "CIFAR-10"
    class_names = CIFAR10_CLASSES

    def _read(self, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        all_images, all_labels = [], []
        for path in paths:
            batch = _read_batch(path)
            images = _images(batch, path)
            all_images.append(images)
            all_labels.append(_labels(batch, "labels", images.shape[0], 10, path))
        self.labels = np.concatenate(all_labels)
        return np.concatenate(all_images), self.labels


# The validating reader (see the module docstring for why torchvision's is not used).


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


def _check_coarse(fine: np.ndarray, coarse: np.ndarray, path: Path) -> None:
    expected = np.asarray(CIFAR100_FINE_TO_COARSE, dtype=np.int64)[fine]
    bad = np.flatnonzero(coarse != expected)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{path}: 'coarse_labels' disagree with CIFAR100_FINE_TO_COARSE for {bad.size} "
            f"samples (first: sample {i}, fine {fine[i]}, coarse {coarse[i]}, "
            f"expected {expected[i]})"
        )


def load_cifar100(
    data_dir: PathLike, train: bool, download: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Load a CIFAR-100 split with :class:`CIFAR100Dataset` (torchvision's on-disk format).

    Reads ``<data_dir>/cifar-100-python/{train,test}`` (pickled dicts with ``data``,
    ``fine_labels`` and ``coarse_labels``); a file whose md5 differs from the official
    release's is read with a :class:`ChecksumWarning`. The coarse labels are checked against
    :data:`~auxgen.experiments.hierarchies.CIFAR100_FINE_TO_COARSE`.

    Args:
        data_dir: folder that contains (or will contain) ``cifar-100-python/``.
        train: load the training split (50000 images) if True, else the test split (10000).
        download: if the file is missing, fetch the dataset with torchvision first.

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
    ds = CIFAR100Dataset(as_root(data_dir), train=train, download=download)
    return (
        torch.from_numpy(ds.images),
        torch.from_numpy(ds.fine_labels),
        torch.from_numpy(ds.coarse_labels),
    )


def load_cifar10(data_dir: PathLike, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
    """Load a CIFAR-10 split with :class:`CIFAR10Dataset` (torchvision's on-disk format).

    Reads ``<data_dir>/cifar-10-batches-py/data_batch_1 .. data_batch_5`` (train) or
    ``test_batch`` (test); a file whose md5 differs from the official release's is read
    with a :class:`ChecksumWarning`.

    Args:
        data_dir: folder that contains (or will contain) ``cifar-10-batches-py/``.
        train: load the training split (50000 images) if True, else the test split (10000).
        download: if a file is missing, fetch the dataset with torchvision first.

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
    ds = CIFAR10Dataset(as_root(data_dir), train=train, download=download)
    return torch.from_numpy(ds.images), torch.from_numpy(ds.labels)


def write_fake_cifar100(
    root: PathLike, n_train: int = 400, n_test: int = 100, shuffle: bool = False
) -> Path:
    """Write a tiny dataset in CIFAR-100's on-disk format: random pixels, valid labels.

    Fine labels are ``0..99`` in turn (in a random order with ``shuffle``) with their true
    superclasses, so every reader check passes; for smoke runs and tests without the data.

    Returns:
        ``root``, which now holds ``cifar-100-python/{train,test}``.

    Example:
        >>> import tempfile
        >>> root = write_fake_cifar100(tempfile.mkdtemp(), n_train=100, n_test=100)
        >>> sorted(p.name for p in (root / "cifar-100-python").iterdir())
        ['test', 'train']
    """
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % 100
        fine = rng.permutation(fine) if shuffle else fine
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": fine.tolist(),
            "coarse_labels": [CIFAR100_FINE_TO_COARSE[f] for f in fine],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return Path(root)
