"""MAXL in PyTorch Lightning: a ``LightningModule`` with manual optimisation.

``AuxiliaryLabeler.step`` computes the gradients and steps both optimisers itself (the
multi-task update, then the generator's meta-gradient update), so the module turns
Lightning's automatic optimisation off and its ``training_step`` calls ``step`` with the
``torch.optim`` optimisers inside Lightning's ``LightningOptimizer`` wrappers
(``opt.optimizer``). Lightning still does the rest: device placement, the loops,
validation, logging, checkpoints (the labeler is a sub-module, so its state, including the
generator, is in Lightning's checkpoint) and mixed precision (``--precision bf16-mixed``:
the training step runs under autocast; use bfloat16, since the step has no gradient scaler).

Two things differ from an automatically optimised module:

* Lightning counts optimiser steps (``trainer.global_step``, used by ``max_steps``, logging
  and ``ModelCheckpoint``) inside ``LightningOptimizer.step``, which the labeler bypasses;
  ``training_step`` calls the wrapper's ``_on_before_step`` / ``_on_after_step`` hooks
  around ``labeler.step`` so that every training step counts once. Schedulers are stepped
  by hand (here once per epoch in ``on_train_epoch_end``), as manual optimisation requires;
* the example runs on one device. ``step`` averages gradients across processes itself
  when a ``torch.distributed`` process group exists, so a multi-device run must not wrap the
  module in ``DistributedDataParallel`` (see ``examples/accelerate_train.py`` and
  ``examples/ddp_cifar.py`` for multi-process training).

    pip install "auxgen[lightning]"
    python examples/lightning_module.py --data-dir ~/data --download --max-epochs 5
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

from auxgen import AuxiliaryLabeler


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


class MAXLModule(L.LightningModule):
    """Any classifier trained with MAXL auxiliary labels under a Lightning ``Trainer``.

    Args:
        model: the classifier (its last ``nn.Linear`` or timm/torchvision head is found).
        psi: auxiliary classes per primary class.
        lr: learning rate of the multi-task SGD optimiser (cosine-annealed per epoch).
        gen_lr: learning rate of the generator's optimiser.
        max_epochs: length of the cosine schedule.
    """

    def __init__(
        self, model: nn.Module, *, psi: int = 5, lr: float = 0.05, gen_lr: float = 1e-3,
        max_epochs: int = 10,
    ) -> None:  # fmt: skip
        super().__init__()
        self.automatic_optimization = False  # labeler.step computes gradients and steps
        self.save_hyperparameters(ignore=["model"])
        self.labeler = AuxiliaryLabeler(model, psi=psi)

    def forward(self, x: Tensor) -> Tensor:
        return self.labeler(x)  # == model(x)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(
            self.labeler.model_parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4
        )
        gen_opt = torch.optim.SGD(
            self.labeler.generator_parameters(), lr=self.hparams.gen_lr, weight_decay=5e-4
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.max_epochs)
        return [opt, gen_opt], [sched]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        opt, gen_opt = self.optimizers()
        # Lightning counts optimiser steps (trainer.global_step, which max_steps, logging and
        # ModelCheckpoint rely on) in these two hooks of LightningOptimizer.step; the labeler
        # steps the optimisers itself, so call them around it: one count per training step.
        opt._on_before_step()
        # Unwrap Lightning's LightningOptimizer: the step mirrors the torch.optim optimiser.
        out = self.labeler.step(x, y, opt.optimizer, gen_opt.optimizer)
        opt._on_after_step()
        acc = (out["logits"].argmax(1) == y).float().mean()
        self.log_dict(
            {"train/primary_loss": out["primary_loss"], "train/aux_loss": out["aux_loss"],
             "train/acc": acc},
            prog_bar=True, on_step=True, on_epoch=True, batch_size=y.numel(),
        )  # fmt: skip
        if out["meta_loss"] is not None:
            self.log("train/meta_loss", out["meta_loss"], on_epoch=True, batch_size=y.numel())

    def on_train_epoch_end(self) -> None:
        self.lr_schedulers().step()  # manual optimisation: schedulers are stepped by hand

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
    p.add_argument("--psi", type=int, default=5, help="auxiliary classes per digit")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--gen-lr", type=float, default=1e-3)
    p.add_argument("--precision", default="32-true", help='Lightning precision, e.g. "bf16-mixed"')
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
    module = MAXLModule(
        SmallCNN(), psi=args.psi, lr=args.lr, gen_lr=args.gen_lr, max_epochs=args.max_epochs
    )
    smoke = {"fast_dev_run": 2, "logger": False, "enable_checkpointing": False}
    trainer = L.Trainer(
        max_epochs=args.max_epochs,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        enable_model_summary=not args.smoke,
        **(smoke if args.smoke else {}),
    )
    trainer.fit(module, **loaders)
    return trainer


if __name__ == "__main__":
    main()
