"""The loss form: ``labeler(x, y)`` returns the multi-task loss and the user's loop does the rest.

* every task that needs no look-ahead: one step of ``labeler(x, y)["loss"].backward()`` +
  ``opt.step()`` leaves the same parameters and buffers as ``labeler.step`` (float64);
* MAXL in the user's loop: ``meta_step`` between ``backward`` and ``opt.step()`` gives the
  same meta-gradient and parameters as ``step`` (the oracles of ``step`` are in
  ``test_meta_oracle.py``, which also checks ``meta_step`` against its hand-written oracle);
* an independent oracle: a hand-written rotation task around a plain model (views, heads and
  losses written out here), under fp16 autocast with a ``GradScaler``, gradient clipping and
  gradient accumulation;
* an optimiser that leaves the auxiliary heads out is refused, never silently;
* nothing is left on the user's model: a whole ``torch.save(model)`` loads where auxgen is
  not installed, and wrapping twice stacks nothing.

The loss form under the wrappers users run: ``DDP(labeler)(x, y)`` and FSDP2 (gloo, 2 CPUs).

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

import copy
import datetime
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import TinyConvNet, spawn_ranks
from torch import Tensor, nn

from auxgen import (
    AuxiliaryLabeler,
    FixedLabels,
    GeneratedCellLabels,
    GeneratedLabels,
    LearnedWeight,
    NonFiniteError,
    TransformLabels,
)

TOL = dict(rtol=1e-9, atol=1e-12)


def _net(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return TinyConvNet(num_classes=3, width=4, dropout=dropout).double()


def _batches(
    steps: int = 3, n: int = 6, size: int = 5, seed: int = 1
) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, size, size, generator=g, dtype=torch.float64), torch.arange(n) % 3)
        for _ in range(steps)
    ]


def _state(labeler: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in labeler.state_dict().items() if torch.is_tensor(v)}


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor], **tol: Any) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **(tol or TOL), msg=f"state {k} differs")


#: name -> (tasks factory, needs aux_target)
NO_LOOKAHEAD: dict[str, tuple[Callable[[], Any], bool]] = {
    "rotation_both": (lambda: TransformLabels(), False),
    "rotation_joint": (lambda: TransformLabels(form="joint"), False),
    "rotation_predict_one_view": (lambda: TransformLabels(form="predict", views="one"), False),
    "rotation_self_distillation": (lambda: TransformLabels(form="joint", distill=1.0), False),
    "rotation_primary_views": (lambda: TransformLabels(primary_views=True, weight=0.5), False),
    "fixed_labels": (lambda: FixedLabels(2, weight=0.7), True),
    "weight_zero": (lambda: TransformLabels(weight=0.0), False),
    "several": (lambda: [TransformLabels(form="predict"), FixedLabels(2, weight=0.3)], True),
}


@pytest.mark.parametrize("case", list(NO_LOOKAHEAD))
def test_loss_form_step_equals_labeler_step(case: str) -> None:
    make, needs_aux = NO_LOOKAHEAD[case]
    a = AuxiliaryLabeler(_net(dropout=0.2), tasks=make())
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD(a.model_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for i, (x, y) in enumerate(_batches()):
        aux = (y * 2 + i % 2) if needs_aux else None
        torch.manual_seed(10 + i)  # the same dropout masks and random views on both paths
        out_a = a.step(x, y, opt_a, aux_target=aux)
        torch.manual_seed(10 + i)
        opt_b.zero_grad()
        out_b = b(x, y, aux_target=aux)
        out_b["loss"].backward()
        opt_b.step()
        for key in ("loss", "primary_loss", "aux_loss"):
            torch.testing.assert_close(out_b[key].detach(), out_a[key], **TOL)
        assert out_b["task_losses"].keys() == out_a["task_losses"].keys()
        torch.testing.assert_close(out_b["logits"].detach(), out_a["logits"], **TOL)
        _assert_same(_state(a), _state(b))  # parameters and BatchNorm statistics


def test_loss_form_returns_graph_tensors_and_eval_mode_changes_nothing() -> None:
    labeler = AuxiliaryLabeler(_net(), tasks=[TransformLabels(), FixedLabels(2, weight=0.5)])
    ((x, y),) = _batches(1)
    aux = y * 2
    out = labeler(x, y, aux_target=aux)
    assert sorted(out) == ["aux_loss", "logits", "loss", "primary_loss", "task_losses"]
    assert out["loss"].requires_grad and out["logits"].requires_grad
    assert out["logits"].shape == (6, 3) and out["logits"]._base is None  # not a view
    total = out["primary_loss"] + sum(t.weight * out["task_losses"][t.name] for t in labeler.tasks)
    torch.testing.assert_close(out["loss"], total, **TOL)
    torch.testing.assert_close(out["aux_loss"], sum(out["task_losses"].values()), **TOL)
    # eval mode: the primary logits are the model's own, and no BatchNorm statistic moves
    labeler.eval()
    before = _state(labeler)
    with torch.no_grad():
        out = labeler(x, y, aux_target=aux)
    torch.testing.assert_close(out["logits"], labeler.model(x), **TOL)
    _assert_same(before, _state(labeler))
    assert labeler(x).shape == (6, 3)  # without labels: the logits


def test_loss_form_input_errors() -> None:
    labeler = AuxiliaryLabeler(_net(), tasks=TransformLabels())
    ((x, y),) = _batches(1)
    with pytest.raises(ValueError, match="aux_target was given but no task takes"):
        labeler(x, y, aux_target=y)
    with pytest.raises(ValueError, match="aux_target was given without labels y"):
        labeler(x, aux_target=y)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        labeler(x, y + 3)


# -------------------------------------------------------------------------- MAXL
#: name -> (tasks factory, optimiser factory)
LEARNED: dict[str, tuple[Callable[[], Any], Callable[..., torch.optim.Optimizer]]] = {
    "maxl_head_adam": (
        lambda: GeneratedLabels(2, entropy_weight=0.2),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    ),
    "maxl_copy_sgd": (
        lambda: GeneratedLabels([2, 3, 2], generator="copy"),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    ),
    "learned_weight_rmsprop": (
        lambda: LearnedWeight(TransformLabels(form="predict")),
        lambda p: torch.optim.RMSprop(p, lr=1e-2),
    ),
    "rotation_and_maxl_cells": (
        lambda: [TransformLabels(form="predict"), GeneratedCellLabels(2)],
        lambda p: torch.optim.AdamW(p, lr=1e-2),
    ),
}


def _loss_form_meta(labeler: AuxiliaryLabeler, x: Tensor, y: Tensor, opt: Any, gen_opt: Any,
                    **kw: Any) -> dict[str, Any]:  # fmt: skip
    opt.zero_grad()
    out = labeler(x, y)
    out["loss"].backward()
    meta = labeler.meta_step(opt, gen_opt, **kw)
    opt.step()
    return {**out, **meta}


@pytest.mark.parametrize("case", list(LEARNED))
@pytest.mark.parametrize("whole", [False, True], ids=["model_parameters", "parameters"])
def test_meta_step_equals_labeler_step(case: str, whole: bool) -> None:
    make, make_opt = LEARNED[case]
    a = AuxiliaryLabeler(_net(dropout=0.2), tasks=make(), meta_every=2)
    b = copy.deepcopy(a)
    opt_a = make_opt(a.model_parameters())
    # an optimiser over every parameter (Lightning's configure_optimizers over self): the
    # meta-gradient must still be applied once, by gen_opt only
    opt_b = make_opt(b.parameters() if whole else b.model_parameters())
    gen_a = torch.optim.SGD(a.generator_parameters(), lr=0.5)
    gen_b = torch.optim.SGD(b.generator_parameters(), lr=0.5)
    updates = []
    for i, (x, y) in enumerate(_batches(4)):
        torch.manual_seed(10 + i)
        out_a = a.step(x, y, opt_a, gen_a)
        torch.manual_seed(10 + i)
        out_b = _loss_form_meta(b, x, y, opt_b, gen_b)
        assert out_b["meta_updated"] == out_a["meta_updated"]
        updates.append(out_b["meta_updated"])
        if out_a["meta_updated"]:
            torch.testing.assert_close(out_b["meta_loss"], out_a["meta_loss"], **TOL)
            assert out_b["meta_mode"] == out_a["meta_mode"]
        _assert_same(_state(a), _state(b), rtol=1e-8, atol=1e-11)
    assert updates == [True, False, True, False]  # meta_every=2 counts training forwards


def test_meta_step_with_meta_batch_equals_step() -> None:
    a = AuxiliaryLabeler(_net(), tasks=GeneratedLabels(2))
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD(a.model_parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.model_parameters(), lr=0.1, momentum=0.9)
    gen_a = torch.optim.Adam(a.generator_parameters(), lr=1e-2)
    gen_b = torch.optim.Adam(b.generator_parameters(), lr=1e-2)
    batches = _batches(4)
    for (x, y), meta in zip(batches[:2], batches[2:]):
        out_a = a.step(x, y, opt_a, gen_a, meta_batch=meta)
        out_b = _loss_form_meta(b, x, y, opt_b, gen_b, meta_batch=meta)
        torch.testing.assert_close(out_b["meta_loss"], out_a["meta_loss"], **TOL)
        _assert_same(_state(a), _state(b))


def test_meta_step_leaves_model_optimizer_and_grads_unchanged() -> None:
    labeler = AuxiliaryLabeler(_net(), tasks=GeneratedLabels(2))
    opt = torch.optim.Adam(labeler.model_parameters(), lr=1e-2)
    gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=0.1)
    for x, y in _batches(2):
        opt.zero_grad()
        labeler(x, y)["loss"].backward()
        before = _state(labeler.model)
        grads = [p.grad.clone() for p in labeler.model_parameters()]
        moments = [(k, v.clone()) for s in opt.state.values() for k, v in s.items()]
        gen_before = [p.detach().clone() for p in labeler.generator_parameters()]
        assert labeler.meta_step(opt, gen_opt)["meta_updated"]
        _assert_same(before, _state(labeler.model))
        for g, p in zip(grads, labeler.model_parameters()):
            assert torch.equal(g, p.grad)
        now = [(k, v) for s in opt.state.values() for k, v in s.items()]
        assert [k for k, _ in now] == [k for k, _ in moments]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(moments, now))
        assert any(
            not torch.equal(a, p) for a, p in zip(gen_before, labeler.generator_parameters())
        )
        opt.step()


def test_meta_step_errors_and_no_ops() -> None:
    labeler = AuxiliaryLabeler(_net(), tasks=GeneratedLabels(2))
    opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1)
    gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=0.1)
    ((x, y),) = _batches(1)
    with pytest.raises(RuntimeError, match=r"needs a training forward first"):
        labeler.meta_step(opt, gen_opt)
    labeler(x, y)
    with pytest.raises(RuntimeError, match=r"found no gradients .* call\s+loss.backward\(\)"):
        labeler.meta_step(opt, gen_opt)
    labeler(x, y)["loss"].backward()
    with pytest.raises(TypeError, match="LBFGS"):
        labeler.meta_step(torch.optim.LBFGS(labeler.model_parameters()), gen_opt)
    with pytest.raises(ValueError, match="gen_optimizer holds a parameter"):
        labeler.meta_step(opt, torch.optim.SGD(labeler.model_parameters(), lr=0.1))
    # eval-mode and no-grad forwards are not training forwards
    labeler.eval()
    labeler(x, y)
    labeler.train()
    with torch.no_grad():
        labeler(x, y)
    assert labeler.meta_step(opt, gen_opt)["meta_updated"]  # the training forward's update
    # no learned task: a no-op, so a framework's hook may call it on every step
    plain = AuxiliaryLabeler(_net(), tasks=TransformLabels())
    popt = torch.optim.SGD(plain.parameters(), lr=0.1)
    plain(x, y)["loss"].backward()
    out = plain.meta_step(popt, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    assert out == {"meta_loss": None, "meta_updated": False, "meta_mode": None, "skipped": 0}


def test_meta_step_nonfinite_gradients_raise_or_skip_and_change_nothing() -> None:
    for policy in ("raise", "skip"):
        labeler = AuxiliaryLabeler(_net(), tasks=GeneratedLabels(2), nonfinite=policy)
        opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1)
        gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=0.1)
        ((x, y),) = _batches(1)
        labeler(x, y)["loss"].backward()
        next(iter(labeler.model_parameters())).grad[0] = float("inf")
        before = [p.detach().clone() for p in labeler.generator_parameters()]
        if policy == "raise":
            with pytest.raises(NonFiniteError, match="non-finite gradient in meta_step"):
                labeler.meta_step(opt, gen_opt)
        else:
            assert labeler.meta_step(opt, gen_opt)["skipped"] == 1
        assert all(torch.equal(a, p) for a, p in zip(before, labeler.generator_parameters()))


# ------------------------------------------------------ an independent hand-written oracle
class _Oracle:
    """The rotation task (form "both", every view) written out around a plain model."""

    def __init__(self, model: TinyConvNet, head: nn.Linear, weight: float) -> None:
        self.model, self.head, self.weight = model, head, weight

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        n, k, c = x.shape[0], 4, 3
        inputs = torch.cat([torch.rot90(x, i, dims=(2, 3)) for i in range(k)])
        h = self.model.features(inputs)
        primary = F.cross_entropy(self.model.head(h[:n]).float(), y)
        z = self.head(h).float()
        ks = torch.arange(k).repeat_interleave(n)
        joint = F.cross_entropy(z[:, : c * k], y.repeat(k) * k + ks)
        predict = F.cross_entropy(z[:, c * k :], ks)
        return primary + self.weight * (joint + predict)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters()) + list(self.head.parameters())


def _pair(weight: float = 0.7) -> tuple[AuxiliaryLabeler, _Oracle]:
    torch.manual_seed(0)
    labeler = AuxiliaryLabeler(TinyConvNet(3, width=4), tasks=TransformLabels(weight=weight))
    twin = copy.deepcopy(labeler)
    return labeler, _Oracle(twin.model, twin.aux_heads[0], weight)  # type: ignore[arg-type]


def _float_batches(steps: int, n: int = 8) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 3, 6, 6, generator=g), torch.arange(n) % 3) for _ in range(steps)]


def _compare(labeler: AuxiliaryLabeler, oracle: _Oracle, **tol: Any) -> None:
    for p, q in zip(labeler.model_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **tol)
    for b, c in zip(labeler.model.buffers(), oracle.model.buffers()):
        torch.testing.assert_close(b, c, **tol)


def test_oracle_agrees_with_loss_form_clipping_and_accumulation() -> None:
    labeler, oracle = _pair()
    opt = torch.optim.SGD(labeler.parameters(), lr=0.2, momentum=0.9)
    ref = torch.optim.SGD(oracle.parameters(), lr=0.2, momentum=0.9)
    micro = 3  # gradient accumulation over 3 micro-batches, then clipping to norm 0.1
    batches = _float_batches(6)
    for start in range(0, len(batches), micro):
        opt.zero_grad()
        ref.zero_grad()
        for x, y in batches[start : start + micro]:
            (labeler(x, y)["loss"] / micro).backward()
            (oracle.loss(x, y) / micro).backward()
        norm = torch.nn.utils.clip_grad_norm_(labeler.parameters(), 0.1)
        ref_norm = torch.nn.utils.clip_grad_norm_(oracle.parameters(), 0.1)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-6)
        assert float(norm) > 0.1  # clipping really acted
        opt.step()
        ref.step()
        _compare(labeler, oracle, rtol=1e-5, atol=1e-6)


def test_oracle_agrees_with_loss_form_under_fp16_autocast_and_grad_scaler() -> None:
    labeler, oracle = _pair()
    opt = torch.optim.SGD(labeler.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(oracle.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in _float_batches(3):
        for o in (opt, ref):
            o.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = labeler(x, y)
            ref_loss = oracle.loss(x, y)
        assert out["logits"].dtype == torch.float16  # autocast really was on
        scaler.scale(out["loss"]).backward()
        ref_scaler.scale(ref_loss).backward()
        scaler.unscale_(opt)
        ref_scaler.unscale_(ref)
        torch.nn.utils.clip_grad_norm_(labeler.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(oracle.parameters(), 1.0)
        for s, o in ((scaler, opt), (ref_scaler, ref)):
            s.step(o)
            s.update()
        torch.testing.assert_close(out["loss"].float(), ref_loss.float(), rtol=2e-3, atol=2e-3)
        _compare(labeler, oracle, rtol=2e-3, atol=2e-4)
    assert scaler.get_scale() == ref_scaler.get_scale()


def test_meta_step_with_grad_scaler_unscales_and_skips_overflow() -> None:
    torch.manual_seed(0)
    labeler = AuxiliaryLabeler(TinyConvNet(3, width=4), tasks=GeneratedLabels(2))
    twin = copy.deepcopy(labeler)
    opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1)
    gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    ((x, y),) = _float_batches(1)
    scaler.scale(labeler(x, y)["loss"]).backward()
    out = labeler.meta_step(opt, gen_opt, scaler=scaler)  # unscales the gradients first
    scaler.step(opt)
    scaler.update()
    # the same step without a scaler: equal meta-gradient
    t_opt = torch.optim.SGD(twin.model_parameters(), lr=0.1)
    t_gen = torch.optim.SGD(twin.generator_parameters(), lr=0.1)
    twin(x, y)["loss"].backward()
    ref = twin.meta_step(t_opt, t_gen)
    torch.testing.assert_close(out["meta_loss"], ref["meta_loss"], rtol=1e-5, atol=1e-6)
    for p, q in zip(labeler.generator_parameters(), twin.generator_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # an overflowing step is skipped, as the scaler skips the optimiser step
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt.zero_grad()
    scaler.scale(labeler(x, y)["loss"] * float("inf")).backward()
    before = [p.detach().clone() for p in labeler.generator_parameters()]
    assert labeler.meta_step(opt, gen_opt, scaler=scaler)["skipped"] == 1
    assert all(torch.equal(a, p) for a, p in zip(before, labeler.generator_parameters()))


# ------------------------------------------------------------- no silent untrained head
def test_optimizer_without_the_heads_is_refused() -> None:
    ((x, y),) = _batches(1)
    labeler = AuxiliaryLabeler(_net(), tasks=TransformLabels())
    opt = torch.optim.SGD(labeler.model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"does not hold .* auxiliary heads .* model.parameters"):
        labeler.step(x, y, opt)
    # the loss form cannot see the optimiser: the first forward after its step refuses it
    labeler(x, y)["loss"].backward()
    opt.step()
    before = _state(labeler)
    with pytest.raises(ValueError, match=r"updated the model but not the auxiliary heads"):
        labeler(x, y)
    _assert_same(before, _state(labeler))  # refused before anything moved
    # accumulation (no step between forwards), a right optimiser and frozen heads all pass
    labeler = AuxiliaryLabeler(_net(), tasks=TransformLabels())
    for _ in range(2):
        labeler(x, y)["loss"].backward()
    opt = torch.optim.SGD(labeler.parameters(), lr=0.1)
    for _ in range(3):
        labeler(x, y)["loss"].backward()
        opt.step()
    labeler.aux_heads.requires_grad_(False)
    opt = torch.optim.SGD(labeler.model.parameters(), lr=0.1)
    for _ in range(3):
        labeler(x, y)["loss"].backward()
        opt.step()


# ------------------------------------------------------------ nothing left on the model
def test_nothing_is_left_on_the_users_model(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 2))
    hooks = lambda: sum(  # noqa: E731
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()
    )
    first = AuxiliaryLabeler(model, tasks=TransformLabels())
    second = AuxiliaryLabeler(model, tasks=TransformLabels(form="predict"))
    opt = torch.optim.SGD([*first.parameters(), *second.aux_heads.parameters()], lr=0.1)
    x, y = torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 0, 1])
    for lab in (first, second, first):
        lab(x, y)["loss"].backward()
        assert hooks() == 0
    opt.step()
    assert set(model.state_dict()) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    torch.save(model, tmp_path / "model.pt")
    torch.save((x, model(x).detach()), tmp_path / "io.pt")
    code = (  # a fresh process in which auxgen cannot be imported
        "import sys; sys.modules['auxgen'] = None\n"
        "import torch\n"
        "m = torch.load(sys.argv[1] + '/model.pt', weights_only=False)\n"
        "x, want = torch.load(sys.argv[1] + '/io.pt')\n"
        "assert torch.equal(m(x), want)\n"
        "print('loaded', type(m).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "loaded Sequential" in done.stdout


# ------------------------------------------- DDP and FSDP2 around the labeler (2 ranks)
WORLD, N, STEPS = 2, 8, 2


def _rank_batches() -> list[tuple[Tensor, Tensor]]:
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
            for x, y in _rank_batches()]  # fmt: skip
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
    _train(lab, lab, _rank_batches(), task)
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
