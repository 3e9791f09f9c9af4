"""The loss form under the wrappers users run: ``DDP(labeler)(x, y)`` and FSDP2 (gloo, 2 CPUs).

Both ranks run in one pair of spawned processes; each trains on its half of a global batch
and saves its parameters. The parent checks that the ranks agree and that they equal one
process trained on the whole batch (float64, a model without BatchNorm, whose batch
statistics would differ by construction):

* the rotation task with ``DistributedDataParallel(labeler)``: DDP's own bucketed
  all-reduce averages the gradients (auxgen averages nothing on this path);
* MAXL with ``DDP(labeler)`` and ``labeler.meta_step``: the look-ahead on the unwrapped
  module, the meta-gradient averaged across ranks (``entropy_weight=0``: exactly global);
* the rotation task with ``torch.distributed.fsdp.fully_shard`` (FSDP2) on the labeler.
"""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import spawn_ranks
from torch import Tensor, nn

from auxgen import AuxiliaryLabeler, GeneratedLabels, TransformLabels

WORLD, N, STEPS = 2, 8, 2


def _batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(N, 3, 5, 5, generator=g, dtype=torch.float64), torch.arange(N) % 3)
        for _ in range(STEPS)
    ]


def _labeler(task: str, dtype: torch.dtype = torch.float64) -> AuxiliaryLabeler:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    ).to(dtype)  # fmt: skip
    tasks = TransformLabels() if task == "rotation" else GeneratedLabels(2, entropy_weight=0.0)
    return AuxiliaryLabeler(model, tasks=tasks)


def _train(labeler: nn.Module, inner: AuxiliaryLabeler, batches: Any, task: str) -> None:
    opt = torch.optim.SGD(labeler.parameters(), lr=0.1, momentum=0.9)
    gen_opt = torch.optim.Adam(inner.generator_parameters(), lr=1e-2) if task == "maxl" else None
    for x, y in batches:
        opt.zero_grad()
        labeler(x, y)["loss"].backward()
        if gen_opt is not None:
            assert inner.meta_step(opt, gen_opt)["meta_updated"]
        opt.step()


def _params(labeler: nn.Module) -> dict[str, Tensor]:
    out = {}
    for k, p in labeler.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2's DTensor
        out[k] = full.detach().clone()
    return out


def _scenarios(rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    half = [(x[rank * N // 2 : (rank + 1) * N // 2], y[rank * N // 2 :][: N // 2])
            for x, y in _batches()]  # fmt: skip
    res: dict[str, Any] = {}
    for task in ("rotation", "maxl"):
        lab = _labeler(task)
        _train(DDP(lab), lab, half, task)
        res[f"ddp_{task}"] = _params(lab)
    try:
        from torch.distributed.fsdp import fully_shard

        lab = _labeler("rotation")
        fully_shard(lab)
        _train(lab, lab, half, "rotation")
        res["fsdp2_rotation"] = _params(lab)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        res["fsdp2_error"] = f"{type(exc).__name__}: {exc}"
    return res


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
            timeout=datetime.timedelta(seconds=60),
        )  # fmt: skip
        res = _scenarios(rank)
        dist.barrier()
        dist.destroy_process_group()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Spawn the two ranks once; return each rank's results."""
    return spawn_ranks(_worker, tmp_path_factory.mktemp("loss_form_ddp"), WORLD, timeout=180)


def _one_process(task: str) -> dict[str, Tensor]:
    lab = _labeler(task)
    lab._ranks.enabled = False  # no process group here anyway; be explicit
    _train(lab, lab, _batches(), task)
    return _params(lab)


@pytest.mark.parametrize("task", ["rotation", "maxl"])
def test_ddp_wrapped_labeler_equals_one_process_on_the_whole_batch(ranks, task):
    ref = _one_process(task)
    for r in ranks:
        got = r[f"ddp_{task}"]
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)
    for k, v in ranks[0][f"ddp_{task}"].items():
        assert torch.equal(v, ranks[1][f"ddp_{task}"][k]), f"{k} differs across ranks"


def test_fsdp2_fully_sharded_labeler_equals_one_process(ranks):
    assert "fsdp2_error" not in ranks[0], ranks[0].get("fsdp2_error")
    ref = _one_process("rotation")
    for r in ranks:
        for k in ref:
            torch.testing.assert_close(
                r["fsdp2_rotation"][k], ref[k], rtol=1e-10, atol=1e-12, msg=k
            )
