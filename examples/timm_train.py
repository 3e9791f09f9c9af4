"""auxgen in a timm training recipe: timm model, optimiser factory, scheduler, AMP, resume.

The pieces of timm's own ``train.py`` loop around the labeler as a timm training task
(``auxgen.integrations.timm.AuxiliaryTrainingTask``): ``task(x, y)`` returns the multi-task
``"loss"`` and the ``"output"`` logits, and the loop does the rest. The auxiliary task is
chosen with ``--task``: ``rotations`` (labels from the four rotations of each image,
``TransformLabels``), ``maxl`` (MAXL's generated labels, ``GeneratedLabels``) or
``rotations+maxl`` (both at once); a learned task (MAXL) adds ``task.meta_step`` between the
backward and the optimiser step.

* ``timm.create_model`` (``pretrained=False``; any timm classifier works, the labeler finds
  its head through ``get_classifier()``);
* ``timm.optim.create_optimizer_v2`` over the model and the auxiliary heads, with timm's
  weight-decay grouping (no decay on biases and norms). MAXL's look-ahead mirrors
  ``torch.optim`` SGD, Adam and AdamW, which is what ``sgd``, ``momentum``, ``nesterov``,
  ``adam`` and ``adamw`` create;
* ``timm.scheduler.create_scheduler_v2`` (cosine with warm-up by default), stepped with
  ``step_update`` after every update and ``step`` after every epoch, as timm does; the
  look-ahead reads the learning rate the scheduler has just set;
* a ``DataLoader`` over a torchvision dataset read from ``--data-dir``
  (``--dataset fashion_mnist``, ``mnist`` or ``cifar10``; ``--download`` fetches it);
* mixed precision with ``--amp``: ``torch.autocast`` around the task's forward, in bfloat16
  by default (CPU and CUDA); ``--amp-dtype float16`` adds a ``torch.amp.GradScaler``, which
  ``meta_step`` receives as ``scaler=`` (it unscales the gradients first and skips an
  overflowed step, as the scaler does);
* gradient clipping with ``--clip-grad`` (timm's ``dispatch_clip_grad``: ``--clip-mode``
  ``norm``, ``value`` or ``agc``), after unscaling and before the meta-update;
* a checkpoint after every epoch (labeler, both optimisers, scheduler, gradient scaler, RNG
  state), written atomically; ``--resume`` continues exactly where it stopped.

    python examples/timm_train.py --data-dir ~/data --download --epochs 10 --amp
    python examples/timm_train.py --data-dir ~/data --checkpoint run.pt --resume
    python examples/timm_train.py --smoke          # fake images, no data on disk, seconds
"""

from __future__ import annotations

import argparse
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import timm
import torch
import torchvision
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import dispatch_clip_grad
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from auxgen import AuxiliaryLabeler, GeneratedLabels, TransformLabels
from auxgen.integrations.timm import AuxiliaryTrainingTask

logger = logging.getLogger("timm_train")

# torchvision class, channels, image size, mean, std
DATASETS: dict[str, tuple[Any, int, int, tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": (torchvision.datasets.FashionMNIST, 1, 28, (0.2860,), (0.3530,)),
    "mnist": (torchvision.datasets.MNIST, 1, 28, (0.1307,), (0.3081,)),
    "cifar10": (
        torchvision.datasets.CIFAR10,
        3,
        32,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
}
MIRRORED_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")


def build_data(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """``(train, test, in_chans)``; ``--smoke`` uses ``torchvision.datasets.FakeData``."""
    cls, chans, size, mean, std = DATASETS[args.dataset]
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if args.smoke:
        fake = {"image_size": (chans, size, size), "num_classes": 10}
        tf = transforms.Compose(normalize)
        train = torchvision.datasets.FakeData(32, **fake, transform=tf, random_offset=0)
        test = torchvision.datasets.FakeData(16, **fake, transform=tf, random_offset=32)
        return train, test, chans
    augment = [transforms.RandomCrop(size, padding=size // 8)]
    if args.dataset == "cifar10":
        augment.append(transforms.RandomHorizontalFlip())
    try:
        train = cls(
            args.data_dir,
            train=True,
            download=args.download,
            transform=transforms.Compose(augment + normalize),
        )
        test = cls(args.data_dir, train=False, transform=transforms.Compose(normalize))
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise SystemExit(
            f"{cls.__name__} not found under --data-dir {args.data_dir!r} ({e}); pass "
            "--download to fetch it, or --smoke to run on fake images"
        ) from None
    return train, test, chans


def build(
    args: argparse.Namespace, in_chans: int, updates_per_epoch: int, device: torch.device
) -> tuple[AuxiliaryLabeler, torch.optim.Optimizer, Optional[torch.optim.Optimizer], Any]:
    """The labeler around a timm model, its optimisers and timm's scheduler."""
    model = timm.create_model(args.model, pretrained=False, num_classes=10, in_chans=in_chans)
    tasks: list = []
    if "rotations" in args.task:
        tasks.append(TransformLabels(views=args.views))
    if "maxl" in args.task:
        tasks.append(GeneratedLabels(args.psi))
    labeler = AuxiliaryLabeler(model, tasks=tasks, meta=args.meta).to(device)
    # The main optimiser holds the model and the auxiliary heads (labeler.model_parameters());
    # a ModuleDict over the two lets timm apply its weight-decay grouping to both.
    multi_task = nn.ModuleDict({"model": labeler.model, "aux_heads": labeler.aux_heads})
    opt = create_optimizer_v2(
        multi_task, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=0.9
    )
    # The generator's optimiser (stepped by meta_step) is not looked ahead through: any works.
    gen_opt = None
    if labeler.generator_parameters():
        gen_opt = create_optimizer_v2(
            labeler.generator_parameters(), opt="momentum", lr=args.gen_lr, weight_decay=5e-4
        )
    scheduler, _ = create_scheduler_v2(
        opt,
        sched=args.sched,
        num_epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        min_lr=args.lr * 1e-2,
        updates_per_epoch=updates_per_epoch,
    )
    return labeler, opt, gen_opt, scheduler


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash leaves the previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def evaluate(labeler: AuxiliaryLabeler, loader: DataLoader, args: argparse.Namespace) -> float:
    """Primary-task accuracy."""
    device = next(labeler.parameters()).device
    labeler.eval()
    correct = total = 0
    with torch.no_grad(), autocast(args, device):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += int((labeler(x).argmax(1) == y).sum())
            total += y.numel()
    return correct / max(total, 1)


def autocast(args: argparse.Namespace, device: torch.device) -> Any:
    """Autocast in ``--amp-dtype`` with ``--amp``, else a no-op context."""
    if not args.amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, args.amp_dtype))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data", help="root folder of the torchvision dataset")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="fashion_mnist")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--model", default="resnet10t", help="any timm classifier")
    p.add_argument("--task", choices=["rotations", "maxl", "rotations+maxl"], default="rotations")
    p.add_argument("--views", choices=["all", "one"], default="all", help="rotations per image")
    p.add_argument("--psi", type=int, default=5, help="MAXL's auxiliary classes per class")
    p.add_argument("--opt", choices=MIRRORED_OPTIMIZERS, default="momentum")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--gen-lr", type=float, default=1e-3)
    p.add_argument("--sched", default="cosine", help="a timm scheduler name")
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--meta", choices=["second_order", "first_order"], default="second_order")
    p.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    p.add_argument(
        "--amp-dtype", choices=["bfloat16", "float16"], default="bfloat16",
        help="autocast dtype; float16 adds a GradScaler",
    )  # fmt: skip
    p.add_argument("--clip-grad", type=float, default=None, help="clip gradients at this value")
    p.add_argument("--clip-mode", choices=["norm", "value", "agc"], default="norm")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint", default=None, help="checkpoint file, written every epoch")
    p.add_argument(
        "--resume", action="store_true", help="continue from --checkpoint when it exists"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="fake images, a tiny model, seconds")
    args = p.parse_args(argv)
    if args.resume and args.checkpoint is None:
        p.error("--resume needs --checkpoint")
    if args.smoke:
        args.model, args.batch_size, args.workers = "test_resnet", 16, 0
        args.epochs = min(args.epochs, 2)
    return args


def train_one_step(
    task: AuxiliaryTrainingTask,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    gen_opt: Optional[torch.optim.Optimizer],
    scaler: Optional[torch.amp.GradScaler],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One update: forward (under autocast), backward, clipping, MAXL's meta step, step."""
    opt.zero_grad(set_to_none=True)
    with autocast(args, x.device):
        out = task(x, y)  # {"loss", "output", "primary_loss", "aux_loss", "task_losses"}
    if scaler is not None:
        scaler.scale(out["loss"]).backward()
        scaler.unscale_(opt)  # clipping and the meta-gradient see the true gradients
    else:
        out["loss"].backward()
    if args.clip_grad is not None:
        dispatch_clip_grad(task.labeler.model_parameters(), args.clip_grad, mode=args.clip_mode)
    if gen_opt is not None:  # a learned task: update the generator before opt.step()
        task.meta_step(opt, gen_opt, scaler=scaler)
    if scaler is not None:
        scaler.step(opt)  # skipped when the gradients overflowed
        scaler.update()
    else:
        opt.step()
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Train (or resume), evaluate every epoch, checkpoint; return the last epoch's numbers."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    train_set, test_set, in_chans = build_data(args)
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        generator=torch.Generator(),  # reseeded every epoch, so a resumed run sees the same order
        pin_memory=device.type == "cuda",
    )
    test_loader = DataLoader(test_set, batch_size=2 * args.batch_size, num_workers=args.workers)
    labeler, opt, gen_opt, scheduler = build(args, in_chans, len(loader), device)
    task = AuxiliaryTrainingTask(labeler, device=device, verbose=False)
    # float16 needs loss scaling; bfloat16 has float32's range and needs none
    fp16 = args.amp and args.amp_dtype == "float16"
    scaler = torch.amp.GradScaler(device.type) if fp16 else None

    start_epoch = 0
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if args.resume and ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        labeler.load_state_dict(state["labeler"])
        opt.load_state_dict(state["optimizer"])
        if gen_opt is not None:
            gen_opt.load_state_dict(state["gen_optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())
        start_epoch = state["epoch"]
        scheduler.step(start_epoch)  # timm's train.py: set the lr for the resumed epoch
        logger.info("resumed from %s at epoch %d", ckpt, start_epoch)

    result: dict[str, Any] = {}
    for epoch in range(start_epoch, args.epochs):
        loader.generator.manual_seed(args.seed + epoch)  # type: ignore[union-attr]
        task.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for i, (x, y) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = train_one_step(task, x, y, opt, gen_opt, scaler, args)
            scheduler.step_update(num_updates=epoch * len(loader) + i + 1)
            loss_sum += float(out["primary_loss"]) * y.numel()
            correct += int((out["output"].argmax(1) == y).sum())
            seen += y.numel()
        scheduler.step(epoch + 1)
        result = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_acc": evaluate(labeler, test_loader, args),
            "lr": opt.param_groups[0]["lr"],
        }
        logger.info(
            "epoch %d: primary loss %.4f, train acc %.3f, test acc %.3f, lr %.2e",
            epoch + 1, result["train_loss"], result["train_acc"], result["test_acc"],
            result["lr"],
        )  # fmt: skip
        if ckpt is not None:
            save_checkpoint(
                ckpt,
                {
                    "labeler": labeler.state_dict(),
                    "optimizer": opt.state_dict(),
                    "gen_optimizer": gen_opt.state_dict() if gen_opt is not None else None,
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": torch.get_rng_state(),
                    "epoch": epoch + 1,
                    "args": vars(args),
                },
            )
    return result


if __name__ == "__main__":
    main()
