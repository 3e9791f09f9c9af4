"""Auxiliary tasks in PyTorch Lightning, with automatic optimisation.

The ``LightningModule`` holds an ``AuxiliaryLabeler`` around its classifier; its
``training_step`` returns ``self.labeler(x, y)["loss"]`` (the primary loss plus the weighted
auxiliary losses) and ``configure_optimizers`` builds one optimiser over
``self.parameters()`` with a per-epoch cosine schedule. Lightning does everything else:
the backward, gradient clipping (``--gradient-clip-val``), mixed precision
(``--precision bf16-mixed``), the optimiser and scheduler steps, devices, the loops,
validation, logging and checkpoints (the labeler is a sub-module, so its auxiliary heads and
generator are in Lightning's checkpoint).

The auxiliary task is chosen with ``--task``: ``rotation`` (the default: labels from the four
rotations of each image, ``TransformLabels``) needs nothing more. ``maxl`` (MAXL's generated
labels, ``GeneratedLabels(--psi)``) is a learned task: the ``Trainer`` gets the
``auxgen.integrations.lightning.MetaStep`` callback, which runs ``labeler.meta_step`` with the
generator's own optimiser (SGD at ``--gen-lr``) before every optimiser step and logs
``labeler/meta_loss``.

    pip install "auxgen[lightning]"
    python examples/lightning_module.py --data-dir ~/data --download --max-epochs 5
    python examples/lightning_module.py --task maxl --data-dir ~/data --precision bf16-mixed
    python examples/lightning_module.py --smoke      # fake images, Trainer(fast_dev_run=2)
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import lightning as L
import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from auxgen import AuxiliaryLabeler, GeneratedLabels, TransformLabels
from auxgen.integrations.lightning import MetaStep


class SmallCNN(nn.Module):
    """Two Conv-BN-ReLU blocks and a linear classifier ``fc`` for 1-channel images."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class AuxiliaryModule(L.LightningModule):
    """Any classifier trained with an auxiliary task under a Lightning ``Trainer``.

    Args:
        model: the classifier (its last ``nn.Linear`` or timm/torchvision head is found).
        task: ``"rotation"`` (``TransformLabels``) or ``"maxl"`` (``GeneratedLabels``; the
            ``Trainer`` then needs the ``MetaStep`` callback).
        psi: MAXL's auxiliary classes per primary class.
        lr: learning rate of the SGD optimiser (cosine-annealed per epoch).
        max_epochs: length of the cosine schedule.
    """

    def __init__(
        self, model: nn.Module, *, task: str = "rotation", psi: int = 5, lr: float = 0.05,
        max_epochs: int = 10,
    ) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        tasks = TransformLabels() if task == "rotation" else GeneratedLabels(psi)
        self.labeler = AuxiliaryLabeler(model, tasks=tasks)

    def forward(self, x: Tensor) -> Tensor:
        return self.labeler(x)  # == model(x)

    def configure_optimizers(self) -> Any:
        # Over self.parameters(): the model, the auxiliary heads and (for MAXL) the generator,
        # whose gradient only MetaStep's own optimiser applies.
        opt = torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.max_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out = self.labeler(x, y)  # loss, primary_loss, aux_loss, task_losses, logits
        acc = (out["logits"].argmax(1) == y).float().mean()
        every = {"on_step": True, "on_epoch": True, "batch_size": y.numel()}
        self.log("train/loss", out["loss"], prog_bar=True, **every)
        logs = {"train/primary_loss": out["primary_loss"], "train/aux_loss": out["aux_loss"],
                "train/acc": acc}  # fmt: skip
        self.log_dict(logs, **every)
        return out["loss"]  # Lightning runs backward, clipping, MetaStep and the step

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        acc = (self(x).argmax(1) == y).float().mean()
        self.log("val/acc", acc, prog_bar=True, batch_size=y.numel())


def build_data(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    """MNIST from ``--data-dir`` (``--smoke``: ``torchvision.datasets.FakeData``)."""
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    if args.smoke:
        fake = {"image_size": (1, 28, 28), "num_classes": 10, "transform": tf}
        return (
            torchvision.datasets.FakeData(32, **fake, random_offset=0),
            torchvision.datasets.FakeData(32, **fake, random_offset=32),
        )
    try:
        train = torchvision.datasets.MNIST(
            args.data_dir, train=True, download=args.download, transform=tf
        )
    except RuntimeError as e:  # torchvision: "Dataset not found"
        raise SystemExit(
            f"MNIST not found under --data-dir {args.data_dir!r} ({e}); pass --download or --smoke"
        ) from None
    return train, torchvision.datasets.MNIST(args.data_dir, train=False, transform=tf)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data", help="root folder of torchvision's MNIST")
    p.add_argument("--download", action="store_true", help="download MNIST if missing")
    p.add_argument("--max-epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--task", choices=["rotation", "maxl"], default="rotation")
    p.add_argument("--psi", type=int, default=5, help="MAXL's auxiliary classes per digit")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--gen-lr", type=float, default=1e-3, help="MAXL generator's learning rate")
    p.add_argument("--precision", default="32-true", help='Lightning precision, e.g. "bf16-mixed"')
    p.add_argument("--gradient-clip-val", type=float, default=None, help="clip the gradient norm")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="fake images, Trainer(fast_dev_run=2)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.workers, args.accelerator = 8, 0, "cpu"
    return args


def main(argv: Optional[list[str]] = None) -> L.Trainer:
    """Fit the module and return the ``Trainer`` (its ``callback_metrics`` hold the logs)."""
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    train_set, val_set = build_data(args)
    loaders = {
        "train_dataloaders": DataLoader(
            train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
            num_workers=args.workers,
        ),
        "val_dataloaders": DataLoader(
            val_set, batch_size=2 * args.batch_size, num_workers=args.workers
        ),
    }  # fmt: skip
    module = AuxiliaryModule(
        SmallCNN(), task=args.task, psi=args.psi, lr=args.lr, max_epochs=args.max_epochs
    )
    callbacks = []
    if args.task == "maxl":  # a learned task: the generator's update before each step
        callbacks.append(
            MetaStep(lambda params: torch.optim.SGD(params, lr=args.gen_lr, weight_decay=5e-4))
        )
    smoke = {"fast_dev_run": 2, "logger": False, "enable_checkpointing": False}
    trainer = L.Trainer(
        max_epochs=args.max_epochs,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        gradient_clip_val=args.gradient_clip_val,
        callbacks=callbacks,
        enable_model_summary=not args.smoke,
        **(smoke if args.smoke else {}),
    )
    trainer.fit(module, **loaders)
    return trainer


if __name__ == "__main__":
    main()
