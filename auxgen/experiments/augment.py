"""Training-time augmentation and a tensor-backed image dataset.

:func:`random_crop_flip` is the standard CIFAR augmentation (4-pixel padded random crop and
horizontal flip) written in plain torch ops, and :class:`TensorImageDataset` serves images
held in memory as tensors, with optional normalisation and that augmentation.

Why not ``torchvision.transforms``: they transform one image at a time, and draw from
torch's global RNG. The training loop augments a whole in-memory batch at once; one gather
over the batch (on the batch's device) is several times faster than a Python loop of per-image
transforms, and an explicit ``generator`` keeps the draws a function of ``(seed, epoch)``,
which is what makes resuming exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["random_crop_flip", "TensorImageDataset"]


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
        >>> from auxgen.experiments.datasets import CIFAR100_MEAN, CIFAR100_STD
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
