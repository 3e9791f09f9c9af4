"""Data-parallel MAXL on CIFAR-100 with ``torchrun`` and ``DistributedDataParallel``.

Run on one machine with two processes (CPU: gloo backend; one GPU per process: nccl)::

    torchrun --nproc-per-node 2 examples/ddp_cifar.py --data-dir data        # real CIFAR-100
    torchrun --nproc-per-node 2 examples/ddp_cifar.py --smoke                 # random tensors

and on several machines (run the same command on every node)::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
        --rdzv-endpoint node0.example.org:29500 --rdzv-id maxl-cifar \\
        examples/ddp_cifar.py --data-dir /shared/data

Without ``torchrun`` (``python examples/ddp_cifar.py --smoke``) it trains in one process.

The task is the MAXL paper's CIFAR-100 setting: the 20 superclasses are the primary task and
the generator invents ``--psi`` (default 5) auxiliary classes per superclass.

How the data-parallel training works:

* Every process builds the same model and ``AuxiliaryLabeler`` and wraps the labeler in
  ``DistributedDataParallel``, which copies rank 0's parameters and buffers to every rank at
  construction. The labeler names its generator's parameters for DDP to ignore: only
  ``meta_step`` trains them.
* Each step is the loss form: ``ddp(x, y)["loss"].backward()`` (DDP averages the multi-task
  gradient across ranks), then ``labeler.meta_step(opt, gen_opt)`` on the unwrapped labeler
  (the look-ahead from the averaged gradient; the generator's meta-gradient is averaged
  across ranks), then ``opt.step()``. Every rank applies the same updates, so the parameters
  stay identical (the script checks this at the end).
* A ``DistributedSampler`` gives each rank its own shard of every epoch; ``set_epoch`` makes
  the shuffle differ between epochs. ``--batch-size`` is per rank, so the global batch is
  ``world_size * batch_size``. ``drop_last=True`` keeps every local batch the same size (the
  average of per-rank means is the global mean only then) and every rank runs the same
  number of steps, since each runs collective operations.
* BatchNorm running statistics: DDP broadcasts rank 0's buffers before each training
  forward. Evaluation also runs through the DDP wrapper, whose first forward after training
  does the same, so every rank evaluates and saves rank 0's statistics (the script checks
  that the buffers agree too).
* ``--nonfinite skip``: when ``meta_step`` reports non-finite gradients (the same on every
  rank after DDP's averaging) the script skips that optimiser step on every rank.
* Evaluation is sharded over the ranks and the correct counts are summed; only rank 0
  logs and writes the checkpoint.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import time
from contextlib import nullcontext
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from auxgen import AuxiliaryLabeler, GeneratedLabels

logger = logging.getLogger("ddp_cifar")


class SmallCNN(nn.Module):
    """Three Conv-BN-ReLU blocks and a linear classifier ``fc`` (found by ``AuxiliaryLabeler``)."""

    def __init__(self, num_classes: int = 20, width: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]

        self.features = nn.Sequential(
            *block(3, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


# ------------------------------------------------------------------------------ process group
def setup() -> tuple[int, int, int, torch.device]:
    """Join torchrun's process group (if any); return rank, world, local rank, device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        extra: dict[str, Any] = {}
        if (
            device.type == "cuda"
            and "device_id" in inspect.signature(dist.init_process_group).parameters
        ):
            extra["device_id"] = device  # binds NCCL to this rank's GPU (torch >= 2.3)
        # Join through a store prefix unique to this torchrun attempt: after a restart
        # (--max-restarts), workers must not read the dead attempt's addresses from the
        # rendezvous store (see docs/distributed.md, "A rank dies").
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"ddp_cifar/attempt{attempt}", store)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, **extra)
    return rank, world, local_rank, device


def teardown() -> None:
    """Wait for every rank, then destroy the process group.

    After the last gloo collective, a rank that tears its connections down while a peer is
    still finishing that collective can make the peer abort ("terminate called without an
    active exception", about 1 run in 6 here). So the ranks also meet through the rendezvous
    store, which is not a gloo connection, before any of them destroys the group.
    """
    dist.barrier()
    store = dist.distributed_c10d._get_default_store()
    store.add("finished", 1)
    while store.add("finished", 0) < dist.get_world_size():
        time.sleep(0.01)
    dist.destroy_process_group()


def is_dist() -> bool:
    """True when a process group is running."""
    return dist.is_available() and dist.is_initialized()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_dist():
        dist.all_reduce(t)
    return t.tolist()


def max_divergence(tensors: list[Tensor], device: torch.device) -> float:
    """Largest absolute difference between any rank's ``tensors`` and rank 0's."""
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    if not is_dist():
        return 0.0
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


# ------------------------------------------------------------------------------------- data
def load_data(args: argparse.Namespace, rank: int, local_rank: int) -> tuple[Dataset, Dataset]:
    """``(train, test)`` datasets whose items start with ``(image, superclass)``."""
    if args.smoke:
        g = torch.Generator().manual_seed(args.seed)  # same tensors on every rank
        n_train = 2 * args.batch_size * max(1, int(os.environ.get("WORLD_SIZE", "1")))
        x = torch.randn(n_train + 32, 3, 32, 32, generator=g)
        y = torch.randint(0, 20, (n_train + 32,), generator=g)
        return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])
    if args.data_dir is None:
        raise SystemExit("--data-dir is required (or pass --smoke to train on random tensors)")
    from auxgen.experiments.augment import TensorImageDataset
    from auxgen.experiments.cifar import load_cifar100
    from auxgen.experiments.datasets import CIFAR100_MEAN, CIFAR100_STD

    if args.download and local_rank != 0 and is_dist():
        dist.barrier()  # local rank 0 downloads first
    train_x, _, train_coarse = load_cifar100(args.data_dir, train=True, download=args.download)
    if args.download and local_rank == 0 and is_dist():
        dist.barrier()
    test_x, _, test_coarse = load_cifar100(args.data_dir, train=False)
    norm = {"mean": CIFAR100_MEAN, "std": CIFAR100_STD}
    train = TensorImageDataset(train_x, train_coarse, augment=True, **norm)
    test = TensorImageDataset(test_x, test_coarse, **norm)
    return train, test


# ------------------------------------------------------------------------------------ train
@torch.no_grad()
def evaluate(
    model: nn.Module, test: Dataset, args: argparse.Namespace, device: torch.device
) -> float:
    """Primary-task accuracy over the whole test set, each rank scoring every world-th sample.

    ``model`` is the DDP-wrapped labeler: ``model(x)`` is the primary logits, and DDP's first
    forward after training broadcasts rank 0's BatchNorm statistics.
    """
    rank = dist.get_rank() if is_dist() else 0
    world = dist.get_world_size() if is_dist() else 1
    shard = Subset(test, range(rank, len(test), world))  # type: ignore[arg-type]
    loader = DataLoader(shard, batch_size=2 * args.batch_size, num_workers=args.workers)
    model.eval()
    correct = total = 0
    for batch in loader:
        x, y = batch[0].to(device), batch[1].to(device)
        with autocast(args, device):
            correct += int((model(x).argmax(1) == y).sum())
        total += y.numel()
    model.train()
    correct, total = all_sum([correct, total], device)
    return correct / max(total, 1.0)


def autocast(args: argparse.Namespace, device: torch.device) -> Any:
    """bfloat16 autocast with ``--amp`` (no GradScaler needed), else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()


def train(args: argparse.Namespace) -> None:
    """Build everything, train, evaluate, check that the ranks agree and save."""
    rank, world, local_rank, device = setup()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(asctime)s %(message)s",
    )
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(
            max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        )
    torch.manual_seed(args.seed)

    train_set, test_set = load_data(args, rank, local_rank)
    sampler = DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True
    )
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )

    model = SmallCNN(num_classes=20, width=args.width).to(device)
    labeler = AuxiliaryLabeler(
        model,
        tasks=GeneratedLabels(args.psi, generator=args.generator),
        meta=args.meta,
        fd_eps=args.fd_eps,
        nonfinite=args.nonfinite,
    ).to(device)
    # DDP copies rank 0's parameters and buffers to every rank here, averages the gradients
    # in backward and ignores the generator's parameters (the labeler names them). Without
    # torchrun (no process group) the labeler trains on its own.
    ddp: nn.Module = labeler
    if is_dist():
        ddp = DistributedDataParallel(
            labeler, device_ids=[device] if device.type == "cuda" else None
        )
    opt = torch.optim.SGD(
        labeler.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )
    gen_opt = torch.optim.SGD(
        labeler.generator_parameters(), lr=args.gen_lr, weight_decay=args.weight_decay
    )
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=50, gamma=0.5) for o in (opt, gen_opt)]
    logger.info(
        "world %d, device %s, %d train / %d test samples, global batch %d, %d steps per epoch",
        world, device, len(train_set), len(test_set), world * args.batch_size, len(loader),  # type: ignore[arg-type]
    )  # fmt: skip

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a different shuffle (and shard assignment) every epoch
        ddp.train()
        sums = [0.0] * 5  # loss, primary, meta, correct, seen
        skipped = 0
        start = time.perf_counter()
        for batch in loader:
            x = batch[0].to(device, non_blocking=True)
            y = batch[1].to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with autocast(args, device):
                out = ddp(x, y)  # loss, primary_loss, aux_loss, task_losses, logits
            out["loss"].backward()  # DDP all-reduces the gradients
            meta = labeler.meta_step(opt, gen_opt)  # on the unwrapped labeler, before the step
            if meta["skipped"]:  # non-finite gradients (nonfinite="skip"): no update anywhere
                skipped += 1
                continue
            opt.step()
            meta_loss = meta["meta_loss"]
            sums[0] += float(out["loss"].detach()) * y.numel()
            sums[1] += float(out["primary_loss"].detach()) * y.numel()
            sums[2] += (float(meta_loss) if meta_loss is not None else 0.0) * y.numel()
            sums[3] += float((out["logits"].argmax(1) == y).sum())
            sums[4] += y.numel()
        for s in scheds:
            s.step()
        loss, primary, meta_loss, correct, seen = all_sum(sums, device)
        seen = max(seen, 1.0)
        test_acc = evaluate(ddp, test_set, args, device)
        logger.info(
            "epoch %d: loss %.4f primary %.4f meta %.4f train acc %.4f test acc %.4f "
            "skipped %d (%.1fs)",
            epoch, loss / seen, primary / seen, meta_loss / seen, correct / seen, test_acc,
            skipped, time.perf_counter() - start,
        )  # fmt: skip

    div = max_divergence(list(labeler.parameters()), device)
    if div != 0.0:
        raise RuntimeError(f"parameters diverged across ranks (max difference {div:.3g})")
    logger.info("parameters in sync across %d ranks (max difference %.1g)", world, div)
    buffers = [b for b in labeler.buffers() if b.is_floating_point()]
    div = max_divergence(buffers, device)
    if div != 0.0:
        raise RuntimeError(f"BatchNorm statistics differ across ranks (max difference {div:.3g})")
    if rank == 0 and args.out is not None:
        torch.save({"labeler": labeler.state_dict(), "args": vars(args)}, args.out)
        logger.info("saved %s", args.out)
    if is_dist():
        teardown()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="folder holding cifar-100-python/")
    p.add_argument("--download", action="store_true", help="download CIFAR-100 if missing")
    p.add_argument("--smoke", action="store_true", help="random tensors, 2 tiny epochs")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=100, help="per rank")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--gen-lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--psi", type=int, default=5, help="auxiliary classes per superclass")
    p.add_argument("--width", type=int, default=32, help="channels of the first conv block")
    p.add_argument("--generator", choices=["copy", "head"], default="copy")
    p.add_argument("--meta", choices=["second_order", "first_order"], default="second_order")
    p.add_argument("--fd-eps", type=float, default=None, help="first_order's relative step")
    p.add_argument("--nonfinite", choices=["raise", "skip"], default="raise")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="checkpoint path (written by rank 0)")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.batch_size, args.width, args.workers = 2, 8, 8, 0
    return args


if __name__ == "__main__":
    train(parse_args())
