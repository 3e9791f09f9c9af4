"""Small models that honour the real contracts, shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """Conv-BN-ReLU-pool feature extractor plus a named ``head`` classifier."""

    def __init__(self, num_classes: int = 3, width: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def mlp(num_in: int = 6, hidden: int = 8, num_classes: int = 3, bn: bool = True) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(num_in, hidden)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.Tanh(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def batch(n: int = 12, num_classes: int = 3, shape: tuple[int, ...] = (6,), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.arange(n) % num_classes
    return x, y


#: Options of the MAXL task (``GeneratedLabels``) rather than of the labeler.
MAXL_OPTIONS = ("generator", "entropy_weight", "confidence_weight", "label_temperature")


def maxl_labeler(model: nn.Module, psi, *, aux_weight: float = 1.0, **options):
    """``AuxiliaryLabeler`` with one ``GeneratedLabels(psi)`` task; the MAXL options in
    ``options`` go to the task, the others to the labeler."""
    from auxgen import AuxiliaryLabeler, GeneratedLabels

    task = {k: options.pop(k) for k in MAXL_OPTIONS if k in options}
    return AuxiliaryLabeler(model, tasks=GeneratedLabels(psi, weight=aux_weight, **task), **options)


def torchrun_cmd(nproc: int, log_dir, *, standalone: bool = True) -> list[str]:
    """``torchrun`` with each worker's stdout and stderr in its own file under ``log_dir``
    (read them with :func:`rank_logs`): lines of different ranks can never interleave."""
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    return cmd + (["--standalone"] if standalone else []) + ["--log-dir", str(log_dir), "-r", "3"]


def rank_logs(log_dir) -> dict[tuple[int, int], str]:
    """``{(attempt, local rank): stdout + stderr}`` of the workers of a :func:`torchrun_cmd` job."""
    from pathlib import Path

    logs: dict[tuple[int, int], str] = {}
    for err in sorted(Path(log_dir).glob("*/attempt_*/*/stderr.log")):
        attempt, rank = int(err.parent.parent.name.split("_")[1]), int(err.parent.name)
        out = err.with_name("stdout.log")
        logs[(attempt, rank)] = (out.read_text() if out.exists() else "") + err.read_text()
    return logs


def fake_cifar100(root, n_train: int = 400, n_test: int = 100, shuffle: bool = False):
    """A tiny dataset in CIFAR-100's on-disk format (random pixels, valid labels): fine
    labels ``0..99`` in turn (in a random order with ``shuffle``); returns ``root``."""
    from auxgen.experiments.cifar import write_fake_cifar100

    write_fake_cifar100(root, n_train, n_test, shuffle)
    return root


def spawn_ranks(worker, tmp, world: int = 2, timeout: float = 180.0) -> list:
    """Run ``worker(rank, init_file, out_dir)`` in ``world`` spawned processes; return each
    rank's ``torch.load(out_dir / f"rank{rank}.pt")``. A rank that hangs is killed, and the
    ranks' tracebacks (``rank*.err``, written by the worker) make the assertion message."""
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=worker, args=(r, str(tmp / "init"), str(tmp)), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    errors = "\n".join(f.read_text() for f in sorted(tmp.glob("rank*.err")))
    assert not hung, f"ranks {[procs.index(p) for p in hung]} hung\n{errors}"
    assert all(p.exitcode == 0 for p in procs), (
        f"exit codes {[p.exitcode for p in procs]}\n{errors}"
    )
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
