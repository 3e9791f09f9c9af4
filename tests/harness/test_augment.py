"""Augmentation and ``TensorImageDataset`` (``auxgen/experiments/augment.py``)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from auxgen.experiments import datasets
from auxgen.experiments.augment import TensorImageDataset, random_crop_flip


def _windows(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop (and its flip) of the zero-padded image."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out += [crop, crop.flip(-1)]
    return out


def test_random_crop_flip_single_and_batch():
    g = torch.Generator().manual_seed(0)
    batch = torch.rand(6, 3, 8, 8, generator=g)
    out = random_crop_flip(batch, padding=2, generator=torch.Generator().manual_seed(1))
    assert out.shape == batch.shape and out.dtype == batch.dtype
    for b in range(6):
        assert any(torch.equal(out[b], w) for w in _windows(batch[b], 2))
    single = random_crop_flip(batch[0], padding=2, generator=torch.Generator().manual_seed(1))
    assert single.shape == (3, 8, 8)
    assert any(torch.equal(single, w) for w in _windows(batch[0], 2))
    # crops differ across the batch (independent draws), and the result is reproducible
    out2 = random_crop_flip(batch, padding=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, out2)
    # flip only
    flipped = random_crop_flip(batch, padding=0, generator=torch.Generator().manual_seed(2))
    for b in range(6):
        assert torch.equal(flipped[b], batch[b]) or torch.equal(flipped[b], batch[b].flip(-1))
    # uint8 works and pads with zeros
    ones = torch.ones(3, 32, 32, dtype=torch.uint8)
    crop = random_crop_flip(ones, padding=4, generator=torch.Generator().manual_seed(0))
    assert crop.dtype == torch.uint8 and int(crop.sum()) >= 3 * 28 * 28
    with pytest.raises(ValueError, match="x must be an image tensor"):
        random_crop_flip(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="padding must be a non-negative int"):
        random_crop_flip(batch, padding=-1)


def test_tensor_image_dataset_items_and_normalisation():
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 1, 0])
    aux = torch.tensor([1, 3, 5, 4, 0])
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ds = TensorImageDataset(images, y, aux, mean=mean, std=std)
    assert len(ds) == 5
    x, yi, ai, idx = ds[2]
    assert x.dtype == torch.float32 and x.shape == (3, 4, 4)
    expected = (images[2].float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(
        std
    ).view(3, 1, 1)
    assert torch.allclose(x, expected)
    assert int(yi) == 2 and int(ai) == 5 and idx == 2
    # float images are used as they are; no aux -> -1
    ds = TensorImageDataset(images.float(), y)
    x, _, ai, _ = ds[0]
    assert torch.equal(x, images[0].float()) and int(ai) == -1
    loader = DataLoader(ds, batch_size=4, shuffle=False)
    xb, yb, ab, ib = next(iter(loader))
    assert xb.shape == (4, 3, 4, 4) and yb.dtype == torch.int64
    assert ab.tolist() == [-1] * 4 and ib.tolist() == [0, 1, 2, 3]


def test_tensor_image_dataset_augmentation_is_reproducible():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.long)

    def run(seed: int) -> torch.Tensor:
        ds = TensorImageDataset(
            images,
            y,
            mean=datasets.CIFAR100_MEAN,
            std=datasets.CIFAR100_STD,
            augment=True,
            generator=torch.Generator().manual_seed(seed),
        )
        return torch.stack([ds[i][0] for i in range(4) for _ in range(3)])

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (12, 3, 32, 32)
    # global-seed path
    ds = TensorImageDataset(images, y, augment=True)
    torch.manual_seed(5)
    first = ds[0][0]
    torch.manual_seed(5)
    assert torch.equal(first, ds[0][0])
    assert any(torch.equal(first, w) for w in _windows(images[0].float() / 255, 4))


def test_tensor_image_dataset_errors():
    images = torch.zeros(3, 1, 4, 4)
    y = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"images must have shape \(N, C, H, W\)"):
        TensorImageDataset(images[0], y)
    with pytest.raises(TypeError, match="images must be uint8 or floating"):
        TensorImageDataset(images.long(), y)
    with pytest.raises(ValueError, match=r"y must have one label per image \(3\), got 2"):
        TensorImageDataset(images, y[:2])
    with pytest.raises(TypeError, match="aux must be an integer tensor"):
        TensorImageDataset(images, y, aux=torch.zeros(3))
    with pytest.raises(ValueError, match="mean and std must be given together"):
        TensorImageDataset(images, y, mean=(0.5,))
    with pytest.raises(ValueError, match=r"one entry per channel \(1\)"):
        TensorImageDataset(images, y, mean=(0.5, 0.5), std=(1.0, 1.0))
    with pytest.raises(ValueError, match="std entries must be positive"):
        TensorImageDataset(images, y, mean=(0.5,), std=(0.0,))
