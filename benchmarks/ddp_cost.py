"""What the rotation task costs under ``DistributedDataParallel``, in one ``torchrun`` job.

Three training steps on the same model and per-rank batch, measured alternately in one
process per rank (so slow changes in machine load cancel), each the median over rounds:

* ``plain_ddp``: ``DDP(model)``, cross-entropy, ``backward``, ``SGD.step()``;
* ``loss_form_ddp``: ``DDP(labeler)(x, y)["loss"].backward()``, ``SGD.step()`` (DDP's own
  bucketed all-reduce, overlapped with the backward);
* ``step``: ``labeler.step(x, y, opt)`` without DDP (auxgen's own all-reduce of one
  flattened copy of the gradients after the backward).

The ratios to ``plain_ddp`` are printed by rank 0 and written with ``--out``. Usage::

    torchrun --nproc-per-node 2 benchmarks/ddp_cost.py --model cnn --out ddp_cost.json
    torchrun --nproc-per-node 2 benchmarks/ddp_cost.py --smoke     # a few seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import build_model  # noqa: E402 - the benchmarks' model zoo

from auxgen import AuxiliaryLabeler, TransformLabels  # noqa: E402


def _steps(model_name: str, batch: int, image: int, classes: int) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(batch, 3, image, image, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)

    def fresh(seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(model_name, classes, image).train()

    plain = DDP(fresh())
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    lab = AuxiliaryLabeler(fresh(), tasks=TransformLabels())
    wrapped = DDP(lab)
    lab_opt = torch.optim.SGD(wrapped.parameters(), lr=0.01, momentum=0.9)
    own = AuxiliaryLabeler(fresh(), tasks=TransformLabels())
    own_opt = torch.optim.SGD(own.model_parameters(), lr=0.01, momentum=0.9)

    def plain_ddp() -> None:
        plain_opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        plain_opt.step()

    def loss_form_ddp() -> None:
        lab_opt.zero_grad(set_to_none=True)
        wrapped(x, y)["loss"].backward()
        lab_opt.step()

    def step() -> None:
        own.step(x, y, own_opt)

    return {"plain_ddp": plain_ddp, "loss_form_ddp": loss_form_ddp, "step": step}


def _time(fn: Callable[[], None], steps: int) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    dist.barrier()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn", help="a model of benchmarks/models.py")
    p.add_argument("--batch", type=int, default=32, help="per-rank batch")
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="steps per measurement")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--out", help="write the results as JSON (rank 0)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 2 rounds")
    a = p.parse_args(argv)
    if a.smoke:
        a.batch, a.image, a.steps, a.rounds = 4, 8, 1, 2
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo")
    steps = _steps(a.model, a.batch, a.image, a.classes)
    for fn in steps.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(a.rounds):
        for name, fn in steps.items():
            times[name].append(_time(fn, a.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": a.model, "world": dist.get_world_size(), "batch_per_rank": a.batch,
        "threads_per_rank": a.threads, "median_s": med,
        "ratio_to_plain_ddp": {k: v / med["plain_ddp"] for k, v in med.items()},
        "torch": torch.__version__, "command": "torchrun --nproc-per-node 2 " + " ".join(sys.argv),
    }  # fmt: skip
    if dist.get_rank() == 0:
        for k, v in med.items():
            print(f"{k:15s} {1000 * v:9.1f} ms  ratio {result['ratio_to_plain_ddp'][k]:.2f}")
        if a.out:
            Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
