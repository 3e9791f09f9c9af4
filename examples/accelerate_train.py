"""Auxiliary tasks with Hugging Face Accelerate: devices, mixed precision, several processes.

An ordinary Accelerate loop around the labeler's loss form:

* ``accelerator.prepare(labeler, opt, loader, test_loader)``: the labeler is moved to
  ``accelerator.device`` and, with several processes, wrapped in
  ``DistributedDataParallel`` (the labeler names its generator's parameters for DDP to
  ignore); each process gets its own shard of every batch list;
* ``model(x, y)["loss"]`` is the multi-task loss (under ``--mixed-precision bf16`` the
  prepared forward runs under autocast); ``accelerator.backward`` backpropagates it and
  DDP averages the gradients across processes;
* ``accelerator.clip_grad_norm_`` clips them (``--clip-grad``);
* with MAXL (``--task maxl``, the default) ``accelerator.unwrap_model(model).meta_step(opt,
  gen_opt)`` updates the label generator between the backward and ``opt.step()``: it unwraps
  the prepared optimiser itself and averages the meta-gradient across processes. Under
  ``--mixed-precision fp16`` it also gets Accelerate's ``GradScaler`` (``scaler=``);
* the script checks at the end that the parameters of all processes are identical and the
  main process saves the unwrapped labeler's ``state_dict``.

    python examples/accelerate_train.py --data-dir ~/data --download --mixed-precision bf16
    accelerate launch --num_processes 2 examples/accelerate_train.py --data-dir ~/data
    torchrun --nproc-per-node 2 examples/accelerate_train.py --smoke    # also works
    python examples/accelerate_train.py --smoke                          # seconds
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch
import torchvision
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from auxgen import AuxiliaryLabeler, GeneratedLabels, TransformLabels

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10


class SmallCNN(nn.Module):
    """Two Conv-BN-ReLU blocks and a linear classifier ``fc``."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
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


def build_data(args: argparse.Namespace, accelerator: Accelerator) -> tuple[Dataset, Dataset]:
    """CIFAR-10 from ``--data-dir`` (``--smoke``: ``torchvision.datasets.FakeData``)."""
    normalize = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    if args.smoke:
        tf = transforms.Compose(normalize)
        fake = {"image_size": (3, 32, 32), "num_classes": 10, "transform": tf}
        return (
            torchvision.datasets.FakeData(64, **fake, random_offset=0),
            torchvision.datasets.FakeData(40, **fake, random_offset=64),
        )
    augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    with accelerator.main_process_first():  # one process downloads, the others then read
        try:
            train = torchvision.datasets.CIFAR10(
                args.data_dir,
                train=True,
                download=args.download,
                transform=transforms.Compose(augment + normalize),
            )
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise SystemExit(
                f"CIFAR-10 not found under --data-dir {args.data_dir!r} ({e}); pass --download "
                "or --smoke"
            ) from None
    test = torchvision.datasets.CIFAR10(
        args.data_dir, train=False, transform=transforms.Compose(normalize)
    )
    return train, test


def max_divergence(labeler: AuxiliaryLabeler, accelerator: Accelerator) -> float:
    """Largest difference between any process's parameters and the main process's."""
    flat = torch.cat([p.detach().reshape(-1) for p in labeler.parameters()])
    every = accelerator.gather(flat[None])  # (num_processes, num_parameters)
    return float((every - every[:1]).abs().max())


def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    """Primary-task accuracy over the whole test set, every process scoring its shard."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            pred, y = accelerator.gather_for_metrics((model(x).argmax(1), y))  # model(x): logits
            correct += int((pred == y).sum())
            total += y.numel()
    model.train()
    return correct / max(total, 1)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--gen-lr", type=float, default=1e-3)
    p.add_argument("--task", choices=["maxl", "rotation"], default="maxl")
    p.add_argument("--psi", type=int, default=5, help="MAXL's auxiliary classes per class")
    p.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--out", default=None, help="checkpoint path (written by the main process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="fake images, 2 tiny epochs")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.batch_size, args.width = 2, 8, 8
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Train, evaluate, check that the processes agree, save; return the final numbers."""
    args = parse_args(argv)
    # cpu=True on a machine without a GPU lets Accelerate join a multi-process CPU (gloo) group
    cpu = args.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=cpu)
    torch.manual_seed(args.seed)
    train_set, test_set = build_data(args, accelerator)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
    test_loader = DataLoader(test_set, batch_size=2 * args.batch_size)

    tasks = GeneratedLabels(args.psi) if args.task == "maxl" else TransformLabels()
    labeler = AuxiliaryLabeler(SmallCNN(width=args.width), tasks=tasks)
    # Over labeler.parameters(): the model and its auxiliary heads (and the generator, whose
    # gradient only gen_opt applies: meta_step clears it from opt's view).
    opt = torch.optim.SGD(labeler.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    gen_opt = None
    if labeler.generator_parameters():  # a learned task (MAXL)
        gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=args.gen_lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)  # per epoch
    # The labeler too: device placement, autocast, and DDP under several processes.
    model, opt, loader, test_loader = accelerator.prepare(labeler, opt, loader, test_loader)
    accelerator.print(
        f"{accelerator.num_processes} process(es) on {accelerator.device}, mixed precision "
        f"{accelerator.mixed_precision}, global batch {accelerator.num_processes * args.batch_size}"
        f", labeler prepared as {type(model).__name__}"
    )

    result: dict[str, Any] = {}
    for epoch in range(args.epochs):
        model.train()
        sums = torch.zeros(3, device=accelerator.device)  # primary loss, correct, seen
        for x, y in loader:
            opt.zero_grad()
            out = model(x, y)  # loss, primary_loss, aux_loss, task_losses, logits
            accelerator.backward(out["loss"])  # DDP averages the gradients
            if args.clip_grad is not None:  # unscales first under fp16
                accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
            if gen_opt is not None:  # the generator's update, before opt.step()
                accelerator.unwrap_model(model).meta_step(opt, gen_opt, scaler=accelerator.scaler)
            opt.step()
            sums += torch.stack(
                [
                    out["primary_loss"].detach().float() * y.numel(),
                    (out["logits"].argmax(1) == y).sum().float(),
                    torch.tensor(float(y.numel()), device=y.device),
                ]
            )
        sched.step()
        loss, correct, seen = accelerator.reduce(sums, reduction="sum").tolist()
        result = {
            "epoch": epoch + 1,
            "train_loss": loss / seen,
            "train_acc": correct / seen,
            "test_acc": evaluate(model, test_loader, accelerator),
        }
        accelerator.print(
            f"epoch {epoch + 1}: primary loss {result['train_loss']:.4f}, train acc "
            f"{result['train_acc']:.3f}, test acc {result['test_acc']:.3f}"
        )

    labeler = accelerator.unwrap_model(model)
    result["max_divergence"] = max_divergence(labeler, accelerator)
    if result["max_divergence"] != 0.0:
        raise RuntimeError(f"parameters differ across processes by {result['max_divergence']}")
    accelerator.print(f"parameters identical on all {accelerator.num_processes} process(es)")
    if args.out is not None:
        accelerator.save({"labeler": labeler.state_dict(), "args": vars(args)}, args.out)
    accelerator.wait_for_everyone()  # every process reaches the end before the group goes
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
