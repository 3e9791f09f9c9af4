"""The per-epoch stream of training batches, and stored images made into model inputs.

Batches are drawn from in-memory tensors in a per-epoch order that depends only on
``(seed, epoch)`` (no ``DataLoader`` workers), which is what makes resuming exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .augment import random_crop_flip
from .config import BATCH_VIEWS, RunConfig
from .datasets import Data
from .runtime import world_and_rank

__all__ = ["prepare", "epoch_batches", "steps_per_epoch"]


def prepare(x: Tensor, data: Data, device: torch.device) -> Tensor:
    """Batch of stored images -> float32 model input on ``device``."""
    x = x.to(device)
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    if data.mean is not None and data.std is not None:
        mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose stream depends only on ``(seed, epoch)``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _batches(
    data: Data, cfg: RunConfig, epoch: int, device: torch.device
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Shuffled training batches ``(x, y, index)`` of one epoch (a lone last sample is dropped).

    Under ``torch.distributed`` every rank draws the same permutation and takes every
    ``world``-th index (as ``DistributedSampler`` with ``drop_last=True``), so each rank holds
    an equal shard and ``batch_size`` is per rank.
    """
    g = _epoch_generator(cfg.seed, epoch)
    order = torch.randperm(data.x_train.shape[0], generator=g)
    world, rank = world_and_rank()
    if world > 1:
        order = order[rank::world][: data.x_train.shape[0] // world]
    n = order.numel()
    padding = 4 if data.image_shape[1] >= 16 else 1
    for start in range(0, n, cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        if idx.numel() < 2:
            break
        x = data.x_train[idx]
        if cfg.method == "batchaug":  # independently augmented copies of every image
            idx = idx.repeat(BATCH_VIEWS)
            x = x.repeat(BATCH_VIEWS, *([1] * (x.dim() - 1)))
        if cfg.augment:
            x = random_crop_flip(x, padding=padding, flip=data.flip, generator=g)
        yield prepare(x, data, device), data.y_train[idx].to(device), idx


def _with_meta_batches(
    batches: Iterator[tuple[Tensor, Tensor, Tensor]],
    data: Data,
    cfg: RunConfig,
    epoch: int,
    device: torch.device,
) -> Iterator[tuple[Tensor, Tensor, Tensor, Optional[tuple[Tensor, Tensor]]]]:
    """Attach the meta batch of ``cfg.meta_source`` to each training batch.

    ``"train"``: ``None`` (the meta loss uses the batch itself). ``"next"``: the next batch
    of the epoch (the last batch gets the first). ``"heldout"``: ``batch_size`` images drawn
    without replacement from the held-out meta split, from a stream that depends only on
    ``(seed, epoch)`` (so resuming is exact).
    """
    if cfg.method != "maxl" or cfg.meta_source == "train":
        for x, y, idx in batches:
            yield x, y, idx, None
        return
    if cfg.meta_source == "heldout":
        assert data.x_meta is not None and data.y_meta is not None
        g = _epoch_generator(cfg.seed + 0x5EED, epoch)
        n_meta = data.x_meta.shape[0]
        for x, y, idx in batches:
            pick = torch.randperm(n_meta, generator=g)[: min(cfg.batch_size, n_meta)]
            meta = (prepare(data.x_meta[pick], data, device), data.y_meta[pick].to(device))
            yield x, y, idx, meta
        return
    first = prev = None
    for batch in batches:
        if prev is not None:
            yield (*prev, (batch[0], batch[1]))
        else:
            first = batch
        prev = batch
    if prev is not None and first is not None:
        yield (*prev, (first[0], first[1]))


def epoch_batches(
    data: Data, cfg: RunConfig, epoch: int, device: torch.device
) -> Iterator[tuple[Tensor, Tensor, Tensor, Optional[tuple[Tensor, Tensor]]]]:
    """The training batches ``(x, y, index, meta_batch)`` of one epoch.

    ``meta_batch`` is the batch of ``cfg.meta_source`` (``None``: the batch itself).
    """
    return _with_meta_batches(_batches(data, cfg, epoch, device), data, cfg, epoch, device)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch of ``n`` images (a lone last sample is dropped)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)
