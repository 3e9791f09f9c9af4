"""Figures for the runner and the demo (matplotlib, Agg backend, written to files).

* :func:`plot_accuracy`: test accuracy per epoch, mean ± std over seeds, one line per method;
  optionally, next to it, the cosine similarity of the primary and auxiliary gradients.
* :func:`plot_aux_spread`: for each primary class, how its samples spread over its generated
  auxiliary classes, against the true fine labels (a small heat map per primary class).
* :func:`plot_aux_examples`: a grid of example images per generated auxiliary class.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "acc.png")
    >>> plot_accuracy({"single": [[0.5, 0.7], [0.6, 0.8]]}, path)
    >>> os.path.getsize(path) > 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .runtime import PathLike

__all__ = ["plot_accuracy", "plot_aux_spread", "plot_aux_examples"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def _bands(
    ax, curves: Mapping[str, Sequence[Sequence[float]]], scale: float, colors: Mapping[str, str]
) -> None:
    """One line per method: the mean over seeds, with a ± std band."""
    for label, seeds in curves.items():
        n = min((len(s) for s in seeds), default=0)
        if n == 0:
            continue
        vals = scale * np.array([list(s)[:n] for s in seeds], dtype=float)
        mean = vals.mean(0)
        epochs = np.arange(1, n + 1)
        color = colors[label]
        ax.plot(epochs, mean, marker="o" if n <= 20 else None, ms=3, label=label, color=color)
        if vals.shape[0] > 1:
            std = vals.std(0, ddof=1)
            ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.15)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def plot_accuracy(
    curves: Mapping[str, Sequence[Sequence[float]]],
    path: PathLike,
    title: Optional[str] = None,
    *,
    grad_cosine: Optional[Mapping[str, Sequence[Sequence[float]]]] = None,
    ylabel: str = "test accuracy (%)",
) -> None:
    """Accuracy per epoch: the mean over seeds with a ± std band, one line per method.

    Args:
        curves: ``{method: [per-seed list of per-epoch accuracies in [0, 1]]}``; seeds of
            different lengths are cut to the shortest.
        path: the PNG to write.
        title: the figure title.
        ylabel: the accuracy axis label.
        grad_cosine: the same for the per-epoch mean cosine similarity of the primary and
            auxiliary gradients (``auxgen run --diagnostics``), drawn in a second panel to
            the right; ``None`` or empty: accuracy only.
    """
    plt = _pyplot()
    labels = list(dict.fromkeys([*curves, *(grad_cosine or {})]))
    colors = {k: f"C{i % 10}" for i, k in enumerate(labels)}  # same colour in both panels
    if grad_cosine:
        fig, (ax, ax_cos) = plt.subplots(1, 2, figsize=(12, 4.2))
        _bands(ax_cos, grad_cosine, 1.0, colors)
        ax_cos.axhline(0.0, color="black", lw=0.8)
        ax_cos.set_ylabel("gradient cosine (primary, auxiliary)")
        ax_cos.legend(loc="best", fontsize=9)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.2))
    _bands(ax, curves, 100.0, colors)
    ax.set_ylabel(ylabel)
    ax.legend(loc="lower right", fontsize=9)
    if title:
        (fig.suptitle if grad_cosine else ax.set_title)(title, fontsize=10)
    _save(fig, path)


def plot_aux_spread(
    counts: Sequence[Sequence[int]],
    psi: Sequence[int],
    class_names: Sequence[str],
    fine_names: Sequence[str],
    path: PathLike,
    title: Optional[str] = None,
    max_classes: int = 20,
) -> None:
    """Heat maps of generated auxiliary classes against the true fine classes.

    One panel per primary class ``i``: rows are its ``psi[i]`` auxiliary classes, columns the
    fine classes that occur among its samples, cells the number of (test) samples. A
    diagonal-like panel means the generator rediscovered the human hierarchy; one full row
    means it collapsed onto a single auxiliary class.

    Args:
        counts: ``(sum(psi), n_fine)`` counts of samples per (auxiliary, fine) class.
        psi: auxiliary classes per primary class.
        class_names: primary class names.
        fine_names: fine class names.
        path: the PNG to write.
        title: the figure title.
        max_classes: draw at most this many primary classes.
    """
    plt = _pyplot()
    c = np.asarray(counts, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(psi)[:-1]]).astype(int)
    k = min(len(psi), max_classes)
    cols = min(k, 5)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.6 * rows), squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= k:
            ax.axis("off")
            continue
        block = c[offsets[i] : offsets[i] + psi[i]]
        used = np.flatnonzero(block.sum(0) > 0)
        block = block[:, used]
        ax.imshow(block, cmap="Blues", aspect="auto")
        for (r, q), v in np.ndenumerate(block):
            if v:
                color = "white" if v > 0.6 * block.max() else "black"
                ax.text(q, r, str(v), ha="center", va="center", fontsize=7, color=color)
        ax.set_xticks(range(len(used)))
        ax.set_xticklabels([str(fine_names[j])[:10] for j in used], rotation=60, fontsize=7)
        ax.set_yticks(range(psi[i]))
        ax.set_yticklabels([f"aux {offsets[i] + r}" for r in range(psi[i])], fontsize=7)
        ax.set_title(f"primary: {class_names[i]}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _to_display(img: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` image -> array for ``imshow``, scaled to [0, 1] per image."""
    a = img.detach().float().cpu().numpy()
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
    return a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))


def plot_aux_examples(
    images: torch.Tensor,
    examples: Sequence[Sequence[int]],
    psi: Sequence[int],
    class_names: Sequence[str],
    path: PathLike,
    title: Optional[str] = None,
    per_class: int = 8,
    max_aux: int = 25,
) -> None:
    """A grid of example images per generated auxiliary class.

    Args:
        images: ``(N, C, H, W)`` images (any scale; each is min-max scaled for display).
        examples: for each auxiliary class, indices into ``images`` (most typical first).
        psi: auxiliary classes per primary class (labels the rows with their primary class).
        class_names: primary class names.
        path: the PNG to write.
        title: the figure title.
        per_class: images per row.
        max_aux: draw the first ``max_aux`` auxiliary classes only (one row each).
    """
    plt = _pyplot()
    owner = np.repeat(np.arange(len(psi)), psi)
    n_aux = min(len(examples), max_aux)
    fig, axes = plt.subplots(
        n_aux, per_class, figsize=(0.8 * per_class + 1.2, 0.8 * n_aux + 0.6), squeeze=False
    )
    gray = images.shape[1] == 1
    for k in range(n_aux):
        for j in range(per_class):
            ax = axes[k][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(examples[k]):
                ax.imshow(_to_display(images[examples[k][j]]), cmap="gray" if gray else None)
        axes[k][0].set_ylabel(
            f"aux {k}\n({class_names[owner[k]]})" + ("" if examples[k] else "\nunused"),
            fontsize=7,
            rotation=0,
            ha="right",
            va="center",
        )
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)
