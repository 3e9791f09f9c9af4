"""Fixed auxiliary labels for the baselines of the MAXL paper.

Every function returns ``(N,)`` int64 auxiliary-class indices in the consecutive owner layout
of :mod:`auxgen.hierarchy`: the label of a sample with primary class ``y`` lies among the
children of ``y``, i.e. in ``offsets[y] .. offsets[y] + psi[y] - 1`` with
``offsets = psi_offsets(psi)`` (equivalently ``owner_index(psi)[aux] == y``).

* :func:`human_aux_labels`: a human-defined hierarchy (e.g. CIFAR-100 fine classes under
  their superclass, see :func:`auxgen.experiments.hierarchies.hierarchy_psi`).
* :func:`random_aux_labels`: one uniformly random child per sample, drawn once.
* :func:`kmeans_aux_labels`: k-means clusters of each primary class's samples.
* :func:`noisy_aux_labels`: any of these with a fraction replaced by random children (how
  informative must auxiliary labels be to help?).

:func:`check_aux_labels` validates any labels against ``y`` and ``psi``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from auxgen.hierarchy import normalize_psi, owner_index, psi_offsets

__all__ = [
    "human_aux_labels",
    "random_aux_labels",
    "kmeans_aux_labels",
    "noisy_aux_labels",
    "check_aux_labels",
]

logger = logging.getLogger(__name__)

PsiLike = Union[int, Sequence[int], Tensor]


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor(dtype={value.dtype}, shape={tuple(value.shape)})"
    if isinstance(value, np.ndarray):
        return f"ndarray(dtype={value.dtype}, shape={value.shape})"
    return f"{type(value).__name__} {value!r}"[:120]


def _as_labels(name: str, value: Any) -> Tensor:
    """A 1-D int64 CPU tensor from an integer tensor, array or sequence."""
    if isinstance(value, Tensor):
        t = value.detach()
    elif isinstance(value, (np.ndarray, list, tuple)):
        try:
            t = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(
                f"{name} must be a 1-D integer tensor of labels, got {_describe(value)}"
            ) from e
    else:
        raise TypeError(f"{name} must be a 1-D integer tensor of labels, got {_describe(value)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be a 1-D integer tensor of labels, got {_describe(value)}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one label per sample), got shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.int64)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {_describe(seed)}")
    return int(seed)


def _primary_and_psi(
    y: Any, psi: PsiLike, num_classes: Optional[int]
) -> tuple[Tensor, tuple[int, ...]]:
    y_t = _as_labels("y", y)
    psi_t = normalize_psi(psi, num_classes)
    if y_t.numel() and (int(y_t.min()) < 0 or int(y_t.max()) >= len(psi_t)):
        raise ValueError(
            f"y must hold primary classes in [0, {len(psi_t)}) (psi has {len(psi_t)} entries, "
            f"one per primary class), got range [{int(y_t.min())}, {int(y_t.max())}]"
        )
    return y_t, psi_t


def check_aux_labels(aux: Any, y: Any, psi: PsiLike, num_classes: Optional[int] = None) -> None:
    """Check that every auxiliary label is a child of its sample's primary class.

    Args:
        aux: ``(N,)`` integer auxiliary labels.
        y: ``(N,)`` integer primary labels.
        psi: auxiliary classes per primary class (see :func:`auxgen.hierarchy.normalize_psi`).
        num_classes: number of primary classes, needed only when ``psi`` is a single int.

    Raises:
        TypeError: if ``aux`` or ``y`` is not an integer label tensor.
        ValueError: if the shapes differ, a label is out of range, or an auxiliary label is
            not a child of its primary class.

    Example:
        >>> check_aux_labels(torch.tensor([1, 2]), torch.tensor([0, 1]), [2, 3])
    """
    y_t, psi_t = _primary_and_psi(y, psi, num_classes)
    aux_t = _as_labels("aux", aux)
    if aux_t.shape != y_t.shape:
        raise ValueError(
            f"aux must have one label per sample like y ({y_t.numel()}), got {aux_t.numel()}"
        )
    total = sum(psi_t)
    if aux_t.numel() and (int(aux_t.min()) < 0 or int(aux_t.max()) >= total):
        raise ValueError(
            f"aux must lie in [0, sum(psi)={total}), got range [{int(aux_t.min())}, "
            f"{int(aux_t.max())}]"
        )
    bad = torch.nonzero(owner_index(psi_t)[aux_t] != y_t).flatten()
    if bad.numel():
        i = int(bad[0])
        lo = psi_offsets(psi_t)[int(y_t[i])]
        raise ValueError(
            f"aux labels must be children of their primary class: {bad.numel()} are not "
            f"(first: sample {i}, y={int(y_t[i])}, aux={int(aux_t[i])}, expected one of "
            f"{lo}..{lo + psi_t[int(y_t[i])] - 1})"
        )


def human_aux_labels(
    fine: Any,
    fine_to_aux: Union[Sequence[int], Tensor],
    *,
    y: Optional[Any] = None,
    psi: Optional[PsiLike] = None,
) -> Tensor:
    """Human-defined auxiliary labels: look each fine label up in ``fine_to_aux``.

    Args:
        fine: ``(N,)`` integer fine labels (e.g. the 100 CIFAR-100 classes).
        fine_to_aux: auxiliary-class index of each fine class, e.g. the second output of
            :func:`auxgen.experiments.hierarchies.hierarchy_psi`.
        y: optional ``(N,)`` primary labels; with ``psi``, the result is checked with
            :func:`check_aux_labels`.
        psi: optional auxiliary classes per primary class (used with ``y``).

    Returns:
        ``(N,)`` int64 auxiliary labels, on the device of ``fine`` when it is a tensor.

    Raises:
        TypeError: if ``fine`` or ``fine_to_aux`` is not integer-valued.
        ValueError: if a fine label has no entry in ``fine_to_aux``, only one of ``y`` and
            ``psi`` is given, or the labels are not children of ``y``.

    Example:
        >>> human_aux_labels(torch.tensor([3, 0, 2]), [0, 0, 1, 1]).tolist()
        [1, 0, 1]
    """
    fine_t = _as_labels("fine", fine)
    table = _as_labels("fine_to_aux", fine_to_aux)
    if table.numel() == 0:
        raise ValueError("fine_to_aux must have one entry per fine class, got an empty table")
    if int(table.min()) < 0:
        raise ValueError(f"fine_to_aux entries must be non-negative, got min {int(table.min())}")
    if fine_t.numel() and (int(fine_t.min()) < 0 or int(fine_t.max()) >= table.numel()):
        raise ValueError(
            f"fine labels must lie in [0, len(fine_to_aux)={table.numel()}), got range "
            f"[{int(fine_t.min())}, {int(fine_t.max())}]"
        )
    aux = table[fine_t]
    if (y is None) != (psi is None):
        raise ValueError("y and psi must be given together to check the labels (or neither)")
    if y is not None and psi is not None:
        check_aux_labels(aux, y, psi)
    return aux.to(fine.device) if isinstance(fine, Tensor) else aux


def random_aux_labels(
    y: Any, psi: PsiLike, seed: int = 0, *, num_classes: Optional[int] = None
) -> Tensor:
    """Random auxiliary labels: each sample gets a fixed uniformly random child of its class.

    The labels are drawn once (they do not change during training), uniformly among the
    ``psi[y]`` children of each sample's primary class, with a ``torch.Generator`` seeded by
    ``seed``, so the same inputs and seed give the same labels.

    Args:
        y: ``(N,)`` integer primary labels in ``[0, len(psi))``.
        psi: auxiliary classes per primary class; a single int needs ``num_classes``.
        seed: random seed.
        num_classes: number of primary classes, needed only when ``psi`` is a single int.

    Returns:
        ``(N,)`` int64 auxiliary labels, on the device of ``y`` when it is a tensor.

    Raises:
        TypeError: if ``y`` is not an integer label tensor or ``seed`` is not an int.
        ValueError: if a label in ``y`` has no entry in ``psi``.

    Example:
        >>> aux = random_aux_labels(torch.tensor([0, 1, 1]), [2, 3], seed=0)
        >>> [a in ((0, 1), (2, 3, 4))[c] for a, c in zip(aux.tolist(), [0, 1, 1])]
        [True, True, True]
    """
    seed = _check_seed(seed)
    y_t, psi_t = _primary_and_psi(y, psi, num_classes)
    gen = torch.Generator().manual_seed(seed)
    n_children = torch.tensor(psi_t, dtype=torch.int64)[y_t]
    offsets = torch.tensor(psi_offsets(psi_t), dtype=torch.int64)[y_t]
    u = torch.rand(y_t.shape, generator=gen, dtype=torch.float64)
    pick = torch.minimum((u * n_children).long(), n_children - 1)
    aux = offsets + pick
    return aux.to(y.device) if isinstance(y, Tensor) else aux


def noisy_aux_labels(
    aux: Any,
    y: Any,
    psi: PsiLike,
    rate: float,
    seed: int = 0,
    *,
    num_classes: Optional[int] = None,
) -> Tensor:
    """Auxiliary labels with a fraction ``rate`` of them replaced by random children.

    ``round(rate * N)`` samples, chosen uniformly without replacement, get a fresh label
    drawn uniformly among the ``psi[y]`` children of their primary class (it may equal the
    old one, so about ``rate * (1 - 1 / psi[y])`` of the labels change). The others keep
    theirs. ``rate=0`` returns the labels unchanged and ``rate=1`` gives labels distributed
    as :func:`random_aux_labels`. Interpolating between the human labels and random ones
    measures how much information about the images an auxiliary task must carry to help.

    Args:
        aux: ``(N,)`` integer auxiliary labels, children of ``y`` (checked).
        y: ``(N,)`` integer primary labels in ``[0, len(psi))``.
        psi: auxiliary classes per primary class; a single int needs ``num_classes``.
        rate: fraction of the samples to relabel, in ``[0, 1]``.
        seed: random seed of the choice of samples and of their new labels.
        num_classes: number of primary classes, needed only when ``psi`` is a single int.

    Returns:
        ``(N,)`` int64 auxiliary labels, on the device of ``aux`` when it is a tensor.

    Raises:
        TypeError: if ``aux`` or ``y`` is not an integer label tensor, or ``seed`` is not
            an int.
        ValueError: if ``rate`` is not in ``[0, 1]`` or the labels are not children of
            ``y``.

    Example:
        >>> y = torch.tensor([0, 0, 1, 1])
        >>> aux = torch.tensor([0, 1, 2, 3])
        >>> noisy_aux_labels(aux, y, [2, 2], rate=0.0).tolist()
        [0, 1, 2, 3]
        >>> int((noisy_aux_labels(aux, y, [2, 2], rate=0.5, seed=1) != aux).sum()) <= 2
        True
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be a fraction in [0, 1], got {_describe(rate)}")
    seed = _check_seed(seed)
    check_aux_labels(aux, y, psi, num_classes)
    aux_t = _as_labels("aux", aux).clone()
    y_t, psi_t = _primary_and_psi(y, psi, num_classes)
    n = y_t.numel()
    k = round(rate * n)
    if k:
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n, generator=gen)[:k]
        fresh = random_aux_labels(
            y_t[chosen], psi_t, seed=int(torch.randint(2**31, (1,), generator=gen))
        )
        aux_t[chosen] = fresh
    return aux_t.to(aux.device) if isinstance(aux, Tensor) else aux_t


def _as_features(features: Any, n: int) -> np.ndarray:
    if isinstance(features, Tensor):
        arr = features.detach().cpu().numpy()
    elif isinstance(features, np.ndarray):
        arr = features
    else:
        raise TypeError(
            f"features must be a torch.Tensor or numpy array of shape (N, D), got "
            f"{_describe(features)}"
        )
    if arr.ndim < 2 or arr.shape[0] != n:
        raise ValueError(
            f"features must have shape (N, D) (or (N, ...), flattened) with N={n} rows like y, "
            f"got shape {tuple(arr.shape)}"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"features must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr.reshape(n, -1), dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("features must be finite, got NaN or infinite values")
    return arr


def kmeans_aux_labels(
    features: Any,
    y: Any,
    psi: PsiLike,
    seed: int = 0,
    *,
    pca_dim: Optional[int] = 64,
    n_init: int = 3,
    num_classes: Optional[int] = None,
) -> Tensor:
    """K-means auxiliary labels: cluster the samples of each primary class into ``psi[i]``.

    The features are meant to be the flattened training images, standardised (e.g. per
    channel with the dataset mean and std), as the CLI passes them; any fixed per-sample
    embedding works. With ``pca_dim`` they are first reduced with a PCA fitted on *all*
    samples (``min(pca_dim, N, D)`` components, skipped when that is not fewer than ``D``),
    which keeps k-means on 50000 CIFAR images fast. Then, for each primary class ``i``,
    scikit-learn's ``KMeans(n_clusters=psi[i], n_init=n_init, random_state=seed)`` clusters
    that class's samples; cluster ``j`` becomes auxiliary class ``offsets[i] + j``, with
    clusters numbered by decreasing size (ties: k-means order). A class with fewer distinct
    samples than ``psi[i]`` uses that many clusters (so some children stay unused); a class
    with no samples is skipped.

    Args:
        features: ``(N, D)`` (or ``(N, ...)``, flattened) numeric tensor or numpy array.
        y: ``(N,)`` integer primary labels in ``[0, len(psi))``.
        psi: auxiliary classes per primary class; a single int needs ``num_classes``.
        seed: random seed of the PCA and of k-means.
        pca_dim: number of PCA components, or ``None`` to cluster the raw features.
        n_init: number of k-means restarts per class.
        num_classes: number of primary classes, needed only when ``psi`` is a single int.

    Returns:
        ``(N,)`` int64 auxiliary labels, on the device of ``y`` when it is a tensor.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if shapes do not match, features are not finite, ``pca_dim`` or
            ``n_init`` is not positive, or a label in ``y`` has no entry in ``psi``.

    Example:
        >>> x = torch.tensor([[9.0], [0.0], [5.0], [0.1], [5.1], [0.2]])
        >>> kmeans_aux_labels(x, torch.zeros(6, dtype=torch.long), [3], pca_dim=None).tolist()
        [2, 0, 1, 0, 1, 0]
    """
    seed = _check_seed(seed)
    y_t, psi_t = _primary_and_psi(y, psi, num_classes)
    n = y_t.numel()
    feats = _as_features(features, n)
    if pca_dim is not None and (
        isinstance(pca_dim, bool) or not isinstance(pca_dim, (int, np.integer)) or pca_dim <= 0
    ):
        raise ValueError(f"pca_dim must be a positive int or None, got {pca_dim!r}")
    if isinstance(n_init, bool) or not isinstance(n_init, (int, np.integer)) or n_init <= 0:
        raise ValueError(f"n_init must be a positive int, got {n_init!r}")

    feats = _pca(feats, pca_dim, seed)
    y_np = y_t.numpy()
    offsets = psi_offsets(psi_t)
    aux = np.empty(n, dtype=np.int64)
    for i, k_max in enumerate(psi_t):
        idx = np.flatnonzero(y_np == i)
        if idx.size:
            aux[idx] = offsets[i] + _cluster(feats[idx], i, k_max, int(n_init), seed)
    out = torch.from_numpy(aux)
    return out.to(y.device) if isinstance(y, Tensor) else out


def _pca(feats: np.ndarray, pca_dim: Optional[int], seed: int) -> np.ndarray:
    """``feats`` reduced to ``min(pca_dim, N, D)`` PCA components (unchanged if not fewer)."""
    from sklearn.decomposition import PCA

    n, d_in = feats.shape
    if pca_dim is None or n < 2:
        return feats
    n_components = min(int(pca_dim), n, d_in)
    if n_components < d_in:
        feats = PCA(n_components=n_components, random_state=seed).fit_transform(feats)
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        logger.debug("k-means baseline: PCA %d -> %d dims", d_in, n_components)
    return feats


def _cluster(x_i: np.ndarray, i: int, k_max: int, n_init: int, seed: int) -> np.ndarray:
    """Cluster indices of primary class ``i``'s samples, numbered by decreasing size."""
    from sklearn.cluster import KMeans

    k = min(k_max, len(np.unique(x_i, axis=0)))
    if k < k_max:
        logger.info(
            "k-means baseline: primary class %d has %d distinct samples, using %d of its "
            "%d auxiliary classes",
            i,
            k,
            k,
            k_max,
        )
    if k <= 1:
        return np.zeros(x_i.shape[0], dtype=np.int64)
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
    labels = km.fit_predict(x_i).astype(np.int64)
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return rank[labels]
