"""Models for the auxgen benchmarks.

* :func:`vgg16_cifar`: the VGG-16 with BatchNorm used by the MAXL paper for CIFAR (13 3x3
  convolutions with BatchNorm + ReLU, five 2x2 max-pools, then a 512-512-C MLP) on 32x32
  inputs.
* :func:`tiny_cnn`: a two-convolution network for smoke tests (milliseconds per step).
* :func:`vit_tiny_cifar`: timm's ViT-Tiny (12 blocks, width 192, 3 heads) on 32x32 inputs
  with 4x4 patches (64 tokens and a class token), as ViTs are trained on CIFAR.
* :func:`build_model`: ``"vgg16"``, ``"tiny"``, ``"vit_tiny_cifar"``, any torchvision
  classification model (``"resnet18"``) or any timm model (``"resnet10t"``; a timm model
  with a fixed input size, such as ``"test_vit"``, is built for 32x32), freshly initialised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

from torch import Tensor, nn

__all__ = ["VGG16_CFG", "VGGCifar", "vgg16_cifar", "tiny_cnn", "vit_tiny_cifar", "build_model"]

#: Channels of VGG-16's 13 convolutions; ``"M"`` is a 2x2 max-pool.
VGG16_CFG: tuple[Union[int, str], ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip


class VGGCifar(nn.Module):
    """VGG with BatchNorm for 32x32 inputs: ``features`` (conv stack) then ``classifier``.

    Args:
        cfg: channels per 3x3 convolution, ``"M"`` for a 2x2 max-pool; the last stage must
            leave a 1x1 map (five pools on 32x32).
        num_classes: number of output classes.
        in_channels: input channels.
        hidden: width of the two hidden layers of the classifier MLP.
    """

    def __init__(
        self,
        cfg: Sequence[Union[int, str]] = VGG16_CFG,
        num_classes: int = 10,
        in_channels: int = 3,
        hidden: int = 512,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out = int(v)
                layers += [
                    nn.Conv2d(c, out, 3, padding=1),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                ]
                c = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of a ``(N, C, 32, 32)`` batch."""
        return self.classifier(self.features(x).flatten(1))


def vgg16_cifar(num_classes: int = 10) -> VGGCifar:
    """The MAXL paper's CIFAR VGG-16 with BatchNorm (about 15.2M parameters)."""
    return VGGCifar(VGG16_CFG, num_classes)


def tiny_cnn(num_classes: int = 10) -> nn.Sequential:
    """A tiny conv-BN-ReLU network for smoke tests (a few thousand parameters)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def vit_tiny_cifar(num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """timm ``vit_tiny_patch16_224`` re-sized for CIFAR: 4x4 patches of 32x32 images."""
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=num_classes,
        img_size=image_size,
        patch_size=4,
    )


def build_model(name: str, num_classes: int, image_size: int = 32) -> nn.Module:
    """A freshly initialised classifier by name.

    Args:
        name: ``"vgg16"`` (:func:`vgg16_cifar`), ``"tiny"`` (:func:`tiny_cnn`), ``"cnn"``
            (the harness's ``SmallCNN``, width 32),
            ``"vit_tiny_cifar"`` (:func:`vit_tiny_cifar`), a torchvision classification
            model (``"resnet18"``) or a timm model (``"resnet10t"``); torchvision is tried
            first.
        num_classes: number of output classes.
        image_size: input height and width, for timm models that fix it at construction
            (vision transformers).

    Raises:
        ValueError: if neither torchvision nor timm knows ``name``.
    """
    if name == "vgg16":
        return vgg16_cifar(num_classes)
    if name == "tiny":
        return tiny_cnn(num_classes)
    if name in ("cnn", "cifar_resnet18"):  # the harness's small CNN (width 32), ResNet-18
        from auxgen.experiments.models import build_model as harness_model

        return harness_model(name, 3, num_classes, image_size, width=32)
    if name == "vit_tiny_cifar":
        return vit_tiny_cifar(num_classes, image_size)
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    import timm

    if timm.is_model(name):
        try:  # vision transformers fix the input size when they are built
            return timm.create_model(
                name, pretrained=False, num_classes=num_classes, img_size=image_size
            )
        except TypeError:  # convolutional networks take any size and no img_size argument
            return timm.create_model(name, pretrained=False, num_classes=num_classes)
    raise ValueError(
        f"unknown model {name!r}: use 'vgg16', 'tiny', a torchvision classification model or "
        "a timm model name"
    )
