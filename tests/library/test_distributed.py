"""``AuxiliaryLabeler.step`` across ``torch.distributed`` ranks (gloo, CPU, 2 processes).

All scenarios run in *one* pair of spawned processes (starting processes and importing torch
dominates the cost). Each rank writes its results with ``torch.save`` to ``tmp_path``; the
parent compares them with each other and with single-process references computed here:

* (a) parameters stay identical across ranks over 3 steps when every rank sees other data;
* (b) one step on a batch split over 2 ranks equals a 1-process step on the whole batch;
* (c) the generator's meta-gradient is the exact global one (``entropy_weight=0``), for SGD
  and Adam over two steps, and with ``entropy_weight > 0`` it is the global meta-gradient
  plus the *average of the per-rank* entropy gradients (the documented caveat);
* (d) ``distributed=False`` keeps the ranks independent;
* (e) a non-finite batch on one rank raises (or skips) on every rank, without a hang;
* (f) buffers (BatchNorm running statistics of the model and of the ``copy`` generator) are
  rank 0's on every rank with ``buffers="broadcast"`` (the default), the mean of the
  ranks' own statistics with ``"average"``, and each rank's own with ``"local"``;
* (g) a model with ``nn.SyncBatchNorm`` on the CPU is a clear ``ValueError``.
"""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist
from helpers import spawn_ranks
from torch import Tensor, nn

from auxgen import AuxiliaryLabeler, GeneratedLabels, NonFiniteError
from auxgen.cli import _finish_distributed
from auxgen.hierarchy import masked_log_softmax
from auxgen.losses import neg_entropy

WORLD = 2
PSI = [2, 3, 2]
N_GLOBAL = 16  # split into two halves of 8


# ------------------------------------------------------------------------------ builders
def _global_batch(seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_GLOBAL, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, len(PSI), (N_GLOBAL,), generator=g)
    return x, y


def _half(t: Tensor, rank: int) -> Tensor:
    n = t.shape[0] // WORLD
    return t[rank * n : (rank + 1) * n]


def _exact_labeler(entropy_weight: float, **kwargs: Any) -> AuxiliaryLabeler:
    """A float64 model without BatchNorm and a fixed generator module, seeded identically."""
    torch.manual_seed(123)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, len(PSI))).double()
    gen = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, sum(PSI))).double()
    task = GeneratedLabels(PSI, generator=gen, entropy_weight=entropy_weight)
    return AuxiliaryLabeler(model, tasks=task, **kwargs)


def _bn_labeler(distributed: Optional[bool] = None, **kwargs: Any) -> AuxiliaryLabeler:
    """A BatchNorm + dropout model with a ``copy`` generator, seeded identically."""
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, len(PSI))
    )
    task = GeneratedLabels(PSI, generator="copy")
    return AuxiliaryLabeler(model, tasks=task, distributed=distributed, **kwargs)


def _buffer_run(rank: int, mode: str) -> dict[str, Any]:
    """Three steps on rank-specific data with ``buffers=mode``; buffers and eval logits."""
    lab = _bn_labeler(buffers=mode)
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1, momentum=0.9)
    gen_opt = torch.optim.SGD(lab.generator_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(300 + rank)
    for _ in range(3):
        # ranks see differently scaled data, so their batch statistics really differ
        xb = torch.randn(8, 6, generator=g) * (1 + rank) + rank
        lab.step(xb, torch.randint(0, len(PSI), (8,), generator=g), opt, gen_opt)
    lab.eval()
    with torch.no_grad():
        logits = lab(torch.linspace(-2, 2, 24).reshape(4, 6))
    return {
        "buffers": {k: b.clone() for k, b in lab.named_buffers()},
        "params": _params(lab),
        "logits": logits,
    }


def _params(labeler: AuxiliaryLabeler) -> dict[str, Tensor]:
    return {k: p.detach().clone() for k, p in labeler.named_parameters()}


def _gen_grads(labeler: AuxiliaryLabeler) -> list[Tensor]:
    return [p.grad.detach().clone() for p in labeler.generator_parameters()]  # type: ignore[union-attr]


def _exact_run(
    opt_kind: str, entropy_weight: float, batches: list[tuple[Tensor, Tensor]]
) -> dict[str, Any]:
    """Steps of the exact (no BatchNorm, float64) setup; parameters and meta-gradients."""
    lab = _exact_labeler(entropy_weight)
    if opt_kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(lab.model_parameters(), lr=0.3)
    else:
        opt = torch.optim.Adam(lab.model_parameters(), lr=0.05)
    gen_opt = torch.optim.SGD(lab.generator_parameters(), lr=0.5)
    grads = []
    for x, y in batches:
        out = lab.step(x, y, opt, gen_opt)
        assert out["meta_updated"]
        grads.append(_gen_grads(lab))
    return {"params": _params(lab), "gen_grads": grads}


# -------------------------------------------------------------------------------- worker
def _scenarios(rank: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    x, y = _global_batch()
    x2, y2 = _global_batch(seed=2)

    # (a) BatchNorm + dropout, copy generator, momentum: ranks see different data.
    lab = _bn_labeler()
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1, momentum=0.9)
    gen_opt = torch.optim.Adam(lab.generator_parameters(), lr=1e-2)
    res["a"] = []
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(3):
        xa = torch.randn(8, 6, generator=g)
        ya = torch.randint(0, len(PSI), (8,), generator=g)
        out = lab.step(xa, ya, opt, gen_opt)
        assert out["meta_updated"] and not out["skipped"]
        res["a"].append(_params(lab))
    res["a_buffers"] = {k: b.clone() for k, b in lab.named_buffers()}

    # (a') ranks seeded differently: the first step broadcasts rank 0's state.
    torch.manual_seed(1000 + rank)
    lab = AuxiliaryLabeler(
        nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, len(PSI))).double(), psi=PSI
    )
    res["seeded_before"] = _params(lab)
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1, momentum=0.9)
    lab.step(
        _half(x, rank), _half(y, rank), opt, torch.optim.SGD(lab.generator_parameters(), lr=0.1)
    )
    res["seeded_after"] = _params(lab)

    # (b) plain SGD, fixed generator, each rank holds half the batch.
    lab = _exact_labeler(entropy_weight=0.2)
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.3)
    lab.step(_half(x, rank), _half(y, rank), opt)
    res["b"] = _params(lab)

    # (c) the generator's meta-gradient, two steps, SGD and Adam, with and without entropy.
    halves = [(_half(x, rank), _half(y, rank)), (_half(x2, rank), _half(y2, rank))]
    for opt_kind in ("sgd", "adam"):
        for ent in (0.0, 0.3):
            res[f"c_{opt_kind}_{ent}"] = _exact_run(opt_kind, ent, halves)

    # (d) distributed=False: no averaging, ranks drift apart on different data.
    lab = _bn_labeler(distributed=False)
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1, momentum=0.9)
    gen_opt = torch.optim.SGD(lab.generator_parameters(), lr=1e-2)
    xd = torch.randn(8, 6, generator=torch.Generator().manual_seed(200 + rank))
    lab.step(xd, torch.arange(8) % len(PSI), opt, gen_opt)
    res["d"] = _params(lab)

    # (e) NaN on rank 0 only: the averaged gradient is NaN everywhere, so all ranks agree.
    for policy in ("raise", "skip"):
        lab = _exact_labeler(entropy_weight=0.2, nonfinite=policy)
        opt = torch.optim.SGD(lab.model_parameters(), lr=0.3)
        xe = _half(x, rank).clone()
        if rank == 0:
            xe[0, 0] = float("nan")
        before = _params(lab)
        try:
            out = lab.step(xe, _half(y, rank), opt)
            res[f"e_{policy}"] = ("returned", int(out["skipped"]))
        except NonFiniteError as exc:
            res[f"e_{policy}"] = ("raised", str(exc))
        after = _params(lab)
        res[f"e_{policy}_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
        # the ranks are still in step: a finite step afterwards completes on both
        lab.step(_half(x, rank), _half(y, rank), opt)
        res[f"e_{policy}_after"] = _params(lab)

    # (f) buffers across ranks: broadcast (default), average, local.
    for mode in ("broadcast", "average", "local"):
        res[f"f_{mode}"] = _buffer_run(rank, mode)

    # (g) SyncBatchNorm cannot run on the CPU: a clear error, and nothing changes.
    lab = _bn_labeler()
    lab.model = nn.SyncBatchNorm.convert_sync_batchnorm(lab.model)
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    before = _params(lab)
    try:
        lab.step(_half(x, rank).float(), _half(y, rank), opt)
        res["g"] = "no error"
    except ValueError as exc:
        res["g"] = str(exc)
    res["g_unchanged"] = all(torch.equal(v, _params(lab)[k]) for k, v in before.items())
    return res


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """Entry point of a spawned rank: run every scenario, save the results or the error."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=60),
        )
        try:
            res = _scenarios(rank)
        except BaseException:
            _finish_distributed(wait=False)
            raise
        _finish_distributed()  # both ranks finish before the group is torn down
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Spawn the two ranks once; return each rank's results."""
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp"), WORLD, timeout=120)


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if tol:
            torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), f"{k} differs across ranks"


# --------------------------------------------------------------------------------- tests
def test_ranks_stay_in_sync(ranks: list[dict[str, Any]]) -> None:
    """(a) model, aux head and generator are bit-identical on both ranks after every step."""
    r0, r1 = ranks
    first = r0["a"][0]
    assert any(k.startswith("tasks.0.generator.") for k in first)
    assert any(k.startswith("tasks.0.head.") for k in first)
    for step, (p0, p1) in enumerate(zip(r0["a"], r1["a"])):
        _assert_same(p0, p1)
        if step:  # and training really moved them
            assert not torch.equal(p0["model.0.weight"], r0["a"][step - 1]["model.0.weight"])
            assert not torch.equal(
                p0["tasks.0.generator.0.weight"], r0["a"][step - 1]["tasks.0.generator.0.weight"]
            )
    # buffers="broadcast" (the default): BatchNorm statistics are rank 0's on both ranks.
    _assert_same(r0["a_buffers"], r1["a_buffers"])


def test_first_step_broadcasts_rank0_state(ranks: list[dict[str, Any]]) -> None:
    """Ranks that start from different seeds hold identical parameters after one step."""
    r0, r1 = ranks
    assert not torch.equal(
        r0["seeded_before"]["model.0.weight"], r1["seeded_before"]["model.0.weight"]
    )
    _assert_same(r0["seeded_after"], r1["seeded_after"])


def test_split_batch_equals_full_batch_step(ranks: list[dict[str, Any]]) -> None:
    """(b) two ranks with half a batch each take exactly the 1-process full-batch step."""
    x, y = _global_batch()
    lab = _exact_labeler(entropy_weight=0.2)
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.3)
    start = _params(lab)
    lab.step(x, y, opt)
    ref = _params(lab)
    for r in ranks:
        _assert_same(r["b"], ref, atol=1e-6, rtol=0.0)
        torch.testing.assert_close(
            r["b"]["model.0.weight"], ref["model.0.weight"], atol=1e-12, rtol=0
        )
    assert not torch.equal(ref["model.0.weight"], start["model.0.weight"])
    assert torch.equal(ref["tasks.0.generator.0.weight"], start["tasks.0.generator.0.weight"])


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_meta_gradient_is_global(ranks: list[dict[str, Any]], opt_kind: str) -> None:
    """(c) with entropy_weight=0 the averaged meta-gradient is the full-batch one."""
    full = [_global_batch(), _global_batch(seed=2)]
    ref = _exact_run(opt_kind, 0.0, full)
    for r in ranks:
        got = r[f"c_{opt_kind}_0.0"]
        for step, (g, g_ref) in enumerate(zip(got["gen_grads"], ref["gen_grads"])):
            for a, b in zip(g, g_ref):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=f"step {step}")
        _assert_same(got["params"], ref["params"], atol=1e-6, rtol=0.0)


def _entropy_grads(lab: AuxiliaryLabeler, x: Tensor, y: Tensor) -> list[Tensor]:
    t = masked_log_softmax(lab.generator(x), y, lab.owner).exp()
    return list(torch.autograd.grad(neg_entropy(t), lab.generator_parameters()))


def test_meta_gradient_entropy_is_rank_local(ranks: list[dict[str, Any]]) -> None:
    """(c') with entropy_weight > 0 the entropy term uses each rank's own batch mean.

    The distributed meta-gradient is the global meta-gradient of the loss (entropy_weight=0)
    plus ``entropy_weight`` times the *average of the per-rank* entropy gradients, which
    differs from the gradient of the entropy of the global batch mean.
    """
    ent = 0.3
    x, y = _global_batch()
    ref = _exact_run("sgd", 0.0, [(x, y)])["gen_grads"][0]
    lab = _exact_labeler(ent)
    per_rank = [_entropy_grads(lab, _half(x, r), _half(y, r)) for r in range(WORLD)]
    local = [ref_i + ent * (a + b) / WORLD for ref_i, a, b in zip(ref, *per_rank)]
    global_ = [ref_i + ent * e for ref_i, e in zip(ref, _entropy_grads(lab, x, y))]
    for r in ranks:
        got = r[f"c_sgd_{ent}"]["gen_grads"][0]
        for a, b in zip(got, local):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(local, global_))


def test_distributed_false_keeps_ranks_independent(ranks: list[dict[str, Any]]) -> None:
    """(d) no averaging: ranks that see different data end up with different parameters."""
    r0, r1 = ranks
    for k in ("model.0.weight", "tasks.0.head.weight", "tasks.0.generator.0.weight"):
        assert not torch.allclose(r0["d"][k], r1["d"][k]), k


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_on_one_rank_is_seen_by_all(ranks: list[dict[str, Any]], policy: str) -> None:
    """(e) NaN on rank 0 only: every rank raises (or skips) and nothing changes; no hang."""
    for r in ranks:
        kind, value = r[f"e_{policy}"]
        if policy == "raise":
            assert kind == "raised" and "non-finite multi-task loss or gradient" in value
        else:
            assert (kind, value) == ("returned", 1)
        assert r[f"e_{policy}_unchanged"]
    _assert_same(ranks[0][f"e_{policy}_after"], ranks[1][f"e_{policy}_after"])


def test_buffers_broadcast_is_rank0s(ranks: list[dict[str, Any]]) -> None:
    """(f) default ``buffers="broadcast"``: every rank holds rank 0's own statistics.

    Buffers do not feed back into training-mode steps, so rank 0's buffers with ``"local"``
    are the statistics it computed itself: the independent reference.
    """
    r0, r1 = ranks
    own0, own1 = r0["f_local"]["buffers"], r1["f_local"]["buffers"]
    assert not torch.equal(own0["model.1.running_mean"], own1["model.1.running_mean"])
    assert not torch.equal(
        own0["tasks.0.generator.1.running_var"], own1["tasks.0.generator.1.running_var"]
    )
    for r in ranks:
        _assert_same(r["f_broadcast"]["buffers"], own0)
        _assert_same(r["f_broadcast"]["params"], r0["f_local"]["params"])
    # evaluation (which uses the running statistics) agrees across ranks
    assert torch.equal(r0["f_broadcast"]["logits"], r1["f_broadcast"]["logits"])


def test_buffers_average_is_mean_of_ranks(ranks: list[dict[str, Any]]) -> None:
    """(f) ``buffers="average"``: running statistics are the mean of the ranks' own.

    BatchNorm's running-statistic update is linear (``(1 - m) * running + m * batch``), so
    averaging after every step equals averaging the ranks' ``"local"`` statistics at the end;
    ``num_batches_tracked`` (an integer) is the same on every rank.
    """
    r0, r1 = ranks
    own0, own1 = r0["f_local"]["buffers"], r1["f_local"]["buffers"]
    for r in ranks:
        got = r["f_average"]["buffers"]
        assert got.keys() == own0.keys()
        for k in got:
            if got[k].is_floating_point():
                want = (own0[k] + own1[k]) / 2
                torch.testing.assert_close(got[k], want, atol=1e-6, rtol=1e-6, msg=k)
                if not torch.equal(own0[k], own1[k]):
                    assert not torch.equal(got[k], own0[k]), k
            else:
                assert torch.equal(got[k], own0[k]), k
    _assert_same(r0["f_average"]["buffers"], r1["f_average"]["buffers"])
    for r in ranks:  # running statistics do not enter training-mode steps
        _assert_same(r["f_average"]["params"], r0["f_local"]["params"])
    assert torch.equal(r0["f_average"]["logits"], r1["f_average"]["logits"])


def test_buffers_local_stay_per_rank(ranks: list[dict[str, Any]]) -> None:
    """(f) ``buffers="local"``: parameters agree, running statistics and eval outputs do not."""
    r0, r1 = ranks
    _assert_same(r0["f_local"]["params"], r1["f_local"]["params"])
    assert not torch.equal(
        r0["f_local"]["buffers"]["model.1.running_mean"],
        r1["f_local"]["buffers"]["model.1.running_mean"],
    )
    assert not torch.equal(r0["f_local"]["logits"], r1["f_local"]["logits"])


def test_sync_batchnorm_on_cpu_is_a_clear_error(ranks: list[dict[str, Any]]) -> None:
    """(g) ``nn.SyncBatchNorm`` inside a process group on the CPU: ValueError, nothing moved."""
    for r in ranks:
        assert "'model.1' is an nn.SyncBatchNorm" in r["g"], r["g"]
        assert "only on GPUs" in r["g"]
        assert r["g_unchanged"]


def test_bad_buffers_mode() -> None:
    with pytest.raises(ValueError, match=r"buffers must be one of .*'broadcast'.*got 'sync'"):
        _bn_labeler(buffers="sync")
