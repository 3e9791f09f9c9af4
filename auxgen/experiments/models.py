"""Backbones of the experiments: the built-in small CNN and MLP, or a timm / torchvision model.

:func:`build_model` creates an untrained classifier with a ``num_classes``-way head;
:func:`check_backbone` checks a name without building anything.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import BUILTIN_BACKBONES

__all__ = [
    "SmallCNN", "MLP", "cifar_resnet18", "cifar_resnet20", "check_backbone", "build_model",
    "load_backbone",
]  # fmt: skip

logger = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """A small VGG-style CNN: stages of (conv3x3-BN-ReLU) x ``convs``, max-pooling between.

    Ends with global average pooling and a linear classifier ``fc`` (the primary head that
    :class:`~auxgen.AuxiliaryLabeler` finds). :func:`build_model` uses two stages
    (``width, 2*width``) for 8x8 images (4 conv + 1 linear layer) and three
    (``width, 2*width, 4*width``) for 32x32 images (6 conv + 1 linear layer).

    Args:
        in_channels: input channels.
        num_classes: number of primary classes.
        widths: output channels of each stage.
        convs: convolutions per stage.

    Example:
        >>> import torch
        >>> net = SmallCNN(3, 20, widths=(8, 16, 32))
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 20])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int] = (32, 64, 128),
        convs: int = 2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            for _ in range(convs):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)]
                layers.append(nn.ReLU(inplace=True))
                c = w
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class MLP(nn.Module):
    """A two-hidden-layer perceptron on flattened images: (Linear-BN-ReLU) x 2, then ``fc``.

    Over-parameterised for small image datasets (``width=512`` on 28x28 images: 0.67M
    parameters), so it fits a few thousand training images perfectly within a few epochs:
    the over-fitting regime where an auxiliary task can act as a regulariser. Cheap enough
    to run every method with several seeds on a CPU.

    Example:
        >>> import torch
        >>> MLP(784, 4, width=32)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 4])
    """

    def __init__(self, in_features: int, num_classes: int, width: int = 512) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, width, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            nn.Linear(width, width, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def cifar_resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with a CIFAR stem: a 3x3, stride-1 first convolution, no
    max-pool (32x32 inputs keep their resolution into the first stage).

    Example:
        >>> net = cifar_resnet18(3, 100)
        >>> net.conv1, type(net.maxpool).__name__
        (Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False), 'Identity')
    """
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


class _Block(nn.Module):
    """A CIFAR ResNet's basic block (two 3x3 conv-BN, identity or 1x1 shortcut)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (ResNet-20: 3 stages of 3 blocks, 16-32-64 channels).

    Small (0.27M parameters, about 41 MFLOPs a 32x32 image) and a real residual network:
    the ResNet of the CPU's fine-tuning runs. Global pooling and a linear classifier ``fc``.

    Example:
        >>> net = CifarResNet(3, 10)
        >>> net(torch.zeros(2, 3, 32, 32)).shape, sum(p.numel() for p in net.parameters())
        (torch.Size([2, 10]), 272474)
    """

    def __init__(self, in_channels: int, num_classes: int, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(True)
        )
        layers: list[nn.Module] = []
        c = 16
        for i, w in enumerate((16, 32, 64)):
            for j in range(blocks):
                layers.append(_Block(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def cifar_resnet20(in_channels: int, num_classes: int) -> nn.Module:
    """ResNet-20 for CIFAR (:class:`CifarResNet` with 3 blocks a stage)."""
    return CifarResNet(in_channels, num_classes, blocks=3)


def load_backbone(model: nn.Module, path: str) -> int:
    """Start ``model`` from the weights of a checkpoint, all but its classifier.

    Args:
        model: the freshly built backbone.
        path: an ``auxgen run`` checkpoint (its labeler's ``model.*`` tensors are used) or
            a plain ``state_dict``.

    Returns:
        the number of tensors loaded (every one whose name and shape fit, except the
        classifier's, which stays as initialised).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no tensor of it fits the backbone.
    """
    from ..backbone import find_classifier

    if not Path(path).is_file():
        raise FileNotFoundError(f"init={path!r}: no such checkpoint file")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "labeler" in state:
        state = {k[6:]: v for k, v in state["labeler"].items() if k.startswith("model.")}
    head, _ = find_classifier(model)
    own = model.state_dict()
    usable = {
        k: v
        for k, v in state.items()
        if k in own and not k.startswith(head + ".") and getattr(v, "shape", None) == own[k].shape
    }
    if not usable:
        raise ValueError(f"init={path!r}: none of its tensors fits the backbone")
    model.load_state_dict(usable, strict=False)
    fresh = sorted(k for k in own if k not in usable)
    logger.info("init: %d tensors from %s; freshly initialised: %s", len(usable), path, fresh)
    return len(usable)


def _backbone_source(name: str) -> tuple[str, str]:
    """``(source, model_name)`` with source in cnn / timm / torchvision; raises if unknown."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone must be a non-empty name, got {name!r}")
    if name in BUILTIN_BACKBONES:
        return name, name
    prefix, sep, rest = name.partition(":")
    if sep and prefix == "timm":
        import timm

        if not timm.is_model(rest):
            raise ValueError(f"unknown timm model {rest!r} (see timm.list_models())")
        return "timm", rest
    if sep and prefix in ("torchvision", "tv"):
        import torchvision

        if rest not in torchvision.models.list_models():
            raise ValueError(
                f"unknown torchvision model {rest!r} (see torchvision.models.list_models())"
            )
        return "torchvision", rest
    import timm

    if timm.is_model(name):
        return "timm", name
    import torchvision

    if name in torchvision.models.list_models():
        return "torchvision", name
    raise ValueError(
        f"unknown backbone {name!r}: expected 'cnn', a timm model name (e.g. 'resnet18', "
        "'timm:NAME') or a torchvision one ('torchvision:NAME')"
    )


def check_backbone(name: str) -> str:
    """Check that ``name`` is a known backbone; return its source (cnn, timm, torchvision).

    Raises:
        ValueError: if the name is unknown.
    """
    return _backbone_source(name)[0]


def build_model(
    name: str, in_channels: int, num_classes: int, image_size: int, width: int = 32
) -> nn.Module:
    """Create an untrained classifier with a ``num_classes``-way head.

    Args:
        name: ``"cnn"``, a timm model name (or ``"timm:NAME"``) or ``"torchvision:NAME"`` (a
            bare name is looked up in timm first, then torchvision).
        in_channels: input channels (torchvision models need 3).
        num_classes: number of primary classes.
        image_size: input height/width (picks the depth of ``cnn``).
        width: base width of ``cnn``.

    Raises:
        ValueError: unknown name, or a torchvision model with ``in_channels != 3``.

    Example:
        >>> build_model("cnn", 1, 2, image_size=8, width=8).fc
        Linear(in_features=16, out_features=2, bias=True)
    """
    source, model_name = _backbone_source(name)
    if source == "mlp":
        return MLP(in_channels * image_size * image_size, num_classes, width=width)
    if source == "cnn":
        widths = (width, 2 * width) if image_size <= 16 else (width, 2 * width, 4 * width)
        return SmallCNN(in_channels, num_classes, widths=widths)
    if source == "cifar_resnet18":
        return cifar_resnet18(in_channels, num_classes)
    if source == "cifar_resnet20":
        return cifar_resnet20(in_channels, num_classes)
    if source == "timm":
        import timm

        return timm.create_model(
            model_name, pretrained=False, num_classes=num_classes, in_chans=in_channels
        )
    import torchvision

    if in_channels != 3:
        raise ValueError(
            f"torchvision model {model_name!r} needs 3-channel images, the dataset has "
            f"{in_channels}; use 'cnn' or a timm model (timm adapts in_chans)"
        )
    return torchvision.models.get_model(model_name, weights=None, num_classes=num_classes)
