"""Small models that honour the real contracts, shared by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The repository's root folder, and the folder of the tests' data files.
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


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


def sgd_opts(lab, lr: float = 0.1):
    """SGD with momentum over the labeler's model parameters, SGD over its generator's."""
    opt = torch.optim.SGD(lab.model_parameters(), lr=lr, momentum=0.9)
    gen_opt = torch.optim.SGD(lab.generator_parameters(), lr=1e-2)
    return opt, gen_opt


def images(n: int = 6, num_classes: int = 3, seed: int = 0):
    """:func:`batch` of ``n`` random 3x4x4 images (the input of :class:`Wrapped`)."""
    return batch(n, num_classes, (3, 4, 4), seed)


class Wrapped(nn.Module):
    """A body, a classifier ``fc``, and an output that puts the features first."""

    def __init__(self, pack: Callable[[Tensor, Tensor], Any]) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.Tanh())
        self.fc = nn.Linear(5, 3)
        self.pack = pack

    def forward(self, x: Tensor) -> Any:
        h = self.body(x)
        return self.pack(h, self.fc(h))


def temporaries(folder) -> list[str]:
    """Names of the checkpoint writer's temporary files left anywhere under ``folder``."""
    from auxgen.checkpoint import TEMP_PREFIX

    return [p.name for p in Path(folder).rglob(f"{TEMP_PREFIX}*")]


# ------------------------------------------------ a rotation task written out by hand
#: Batch size, primary classes and transforms (the four rotations) of the hand-written task.
ROT_N, ROT_C, ROT_K = 6, 3, 4


def rot_model(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(3 * 4 * 4, 5)]
    if bn:
        layers.append(nn.BatchNorm1d(5))
    layers += [nn.Tanh(), nn.Linear(5, ROT_C)]
    return nn.Sequential(*layers).double()


def rot_batch(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROT_N, 3, 4, 4, generator=g, dtype=torch.float64)
    return x, torch.arange(ROT_N) % ROT_C


def rot(x: Tensor, k: int) -> Tensor:
    return torch.rot90(x, k, dims=(2, 3))


def rot_hand_loss(params: dict, x, y, views, ks, form, weight):
    """The multi-task loss written out: primary CE on x, joint and/or rotation CE on views."""
    h_views = torch.tanh(views.flatten(1) @ params["1.weight"].T + params["1.bias"])
    h = torch.tanh(x.flatten(1) @ params["1.weight"].T + params["1.bias"])
    z_p = h @ params["3.weight"].T + params["3.bias"]
    a = h_views @ params["head.weight"].T + params["head.bias"]
    primary = F.cross_entropy(z_p, y)
    y_rows = y.repeat(len(views) // len(y)) if len(views) != len(y) else y
    aux = 0.0
    if form in ("joint", "both"):
        aux = aux + F.cross_entropy(a[:, : ROT_C * ROT_K], y_rows * ROT_K + ks)
    if form in ("predict", "both"):
        aux = aux + F.cross_entropy(a[:, -ROT_K:], ks)
    return primary + weight * aux, primary, aux


def rot_params(lab) -> dict:
    p = {k: v.detach().clone().requires_grad_(True) for k, v in lab.model.named_parameters()}
    p["head.weight"] = lab.aux_head.weight.detach().clone().requires_grad_(True)
    p["head.bias"] = lab.aux_head.bias.detach().clone().requires_grad_(True)
    return p
