"""One training step (``auxgen/step.py``, through ``AuxiliaryLabeler.step``): what it does to
the parameters, the buffers and the optimisers.

* BatchNorm statistics move as in one ordinary training forward; a task of weight 0 is
  single-task training; an optimiser over a subset of the parameters leaves the rest alone.
* Mixed precision: the step runs inside ``torch.autocast("cpu", dtype=torch.bfloat16)``:
  convolutions and linear layers compute in bfloat16, the parameters, their gradients, the
  optimiser state and the BatchNorm statistics stay float32. Both meta-gradient modes must
  give finite losses, finite updates of every parameter and a meta-gradient close to the
  float32 one.
* Bit-for-bit reproducibility given a seed: with ``torch.manual_seed`` and
  ``torch.use_deterministic_algorithms(True)``, two runs of three steps (BatchNorm, dropout in
  the model and in the ``copy`` generator, SGD with momentum, Adam for the generator) must end
  with identical parameters and buffers. The meta-gradient replays the dropout masks of the
  step's forward, so the random stream is consumed the same way in both runs.
* The non-finite policy: raise or skip, and change nothing. A step with a non-finite loss or
  gradient must leave every parameter, every buffer (BatchNorm running statistics of the
  model and of a ``copy`` generator) and the state of both optimisers (momentum buffers, Adam
  moments and step counts) exactly as it was. ``.grad`` is released at the start of every
  step (as ``zero_grad(set_to_none=True)`` does) and stays ``None`` after a step that was not
  taken. With ``nonfinite="skip"`` the next finite step must be the step that would have been
  taken had the bad batch never been seen.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any, Optional

import pytest
import torch
from helpers import TinyConvNet, batch, mlp, sgd_opts
from torch import Tensor, nn

from auxgen import AuxiliaryLabeler, GeneratedLabels, NonFiniteError


@pytest.mark.parametrize("meta", ["second_order", "first_order"])
def test_batchnorm_stats_equal_one_ordinary_forward(meta):
    model = TinyConvNet(num_classes=3)
    lab = AuxiliaryLabeler(model, tasks=GeneratedLabels([2, 2, 2], generator="copy"), meta=meta)
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 3
    reference(x)  # one ordinary training forward at the pre-step parameters
    opt, gen_opt = sgd_opts(lab)
    out = lab.step(x, y, opt, gen_opt)
    assert out["meta_updated"]
    for (name, b), (_, rb) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(b, rb, rtol=0, atol=0, msg=name)


def test_aux_weight_zero_is_single_task_training():
    class Counting(nn.Module):
        calls = 0

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 9)

        def forward(self, x):
            Counting.calls += 1
            return self.lin(x)

    model = mlp(bn=False)
    reference = copy.deepcopy(model)
    lab = AuxiliaryLabeler(
        model, tasks=GeneratedLabels([2, 3, 4], weight=0.0, generator=Counting())
    )
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = batch()
    out = lab.step(x, y, opt, torch.optim.SGD(lab.generator_parameters(), lr=0.1))
    nn.functional.cross_entropy(reference(x), y).backward()
    ref_opt.step()
    assert Counting.calls == 0 and not out["meta_updated"] and float(out["aux_loss"]) == 0.0
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_optimizer_over_a_subset_keeps_the_rest_fixed():
    model = mlp()
    lab = AuxiliaryLabeler(model, psi=[2, 3, 4])
    frozen = model[0].weight.clone()
    opt = torch.optim.Adam(list(model[3].parameters()) + list(lab.aux_head.parameters()), lr=1e-2)
    gen_opt = torch.optim.SGD(lab.generator_parameters(), lr=1e-2)
    out = lab.step(*batch(), opt, gen_opt)
    assert out["meta_updated"] and torch.equal(model[0].weight, frozen)


def test_nonfinite_loss_raises_and_changes_nothing():
    lab = AuxiliaryLabeler(mlp(), psi=[2, 3, 4])
    opt, gen_opt = sgd_opts(lab)
    x, y = batch()
    lab.step(x, y, opt, gen_opt)
    state = copy.deepcopy(lab.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite multi-task loss or gradient"):
        lab.step(x, y, opt, gen_opt)
    assert lab.state_dict()["_extra_state"] == state["_extra_state"]
    for k, v in lab.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, state[k]), k
    for a, b in zip(opt.state_dict()["state"].values(), opt_state["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


# ------------------------------------------------------------------ bfloat16 autocast
META = ["second_order", "first_order"]


def _setup(
    meta: str, generator: str
) -> tuple[AuxiliaryLabeler, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    labeler = AuxiliaryLabeler(
        TinyConvNet(num_classes=3, width=8),
        tasks=GeneratedLabels(2, generator=generator),
        meta=meta,
    )
    opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1, momentum=0.9)
    gen_opt = torch.optim.Adam(labeler.generator_parameters(), lr=1e-3)
    return labeler, opt, gen_opt


def _amp_batch(n: int = 16) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3


def _gen_grad(labeler: AuxiliaryLabeler) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in labeler.generator_parameters()])  # type: ignore[union-attr]


@pytest.mark.parametrize("generator", ["copy", "head"])
@pytest.mark.parametrize("meta", META)
def test_bf16_autocast_step(meta: str, generator: str) -> None:
    labeler, opt, gen_opt = _setup(meta, generator)
    x, y = _amp_batch()
    before = {k: p.detach().clone() for k, p in labeler.named_parameters()}
    for _ in range(2):  # the second step also exercises the momentum / Adam state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = labeler.step(x, y, opt, gen_opt)
        assert out["meta_updated"] and out["skipped"] == 0
        for key in ("loss", "primary_loss", "aux_loss", "meta_loss"):
            assert torch.isfinite(out[key]).all(), key
        assert out["logits"].dtype == torch.bfloat16  # autocast really was on
        g = _gen_grad(labeler)
        assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0

    for k, p in labeler.named_parameters():
        assert p.dtype == torch.float32, k
        assert torch.isfinite(p).all(), k
        assert not torch.equal(p, before[k]), f"{k} was not updated"
    for k, b in labeler.named_buffers():
        if b.is_floating_point():
            assert b.dtype == torch.float32 and torch.isfinite(b).all(), k
    for state in (*opt.state.values(), *gen_opt.state.values()):
        for v in state.values():
            if isinstance(v, Tensor) and v.is_floating_point() and v.dim() > 0:
                assert v.dtype == torch.float32 and torch.isfinite(v).all()


@pytest.mark.parametrize(("meta", "min_cos"), [("second_order", 0.999), ("first_order", 0.95)])
def test_bf16_meta_gradient_close_to_float32(meta: str, min_cos: float) -> None:
    """The bfloat16 meta-gradient points where the float32 exact one does."""
    x, y = _amp_batch(32)
    grads = {}
    for amp in (False, True):
        labeler, opt, gen_opt = _setup(meta, "copy")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            labeler.step(x, y, opt, gen_opt)
        grads[amp] = _gen_grad(labeler)
    labeler, opt, gen_opt = _setup("second_order", "copy")
    labeler.step(x, y, opt, gen_opt)
    exact = _gen_grad(labeler)
    cos = torch.nn.functional.cosine_similarity(grads[True], exact, dim=0)
    assert cos > min_cos, f"cosine {float(cos):.5f} between bf16 {meta} and float32 exact"
    assert torch.nn.functional.cosine_similarity(grads[False], exact, dim=0) > 0.9999


@pytest.mark.parametrize("views", ["all", "one"])
def test_bf16_autocast_transformation_task_beside_maxl(views: str) -> None:
    """Rotation labels and MAXL at once under autocast: finite float32 losses and updates,
    and the losses close to the float32 step's."""
    from auxgen import TransformLabels

    x, y = _amp_batch()
    outs = {}
    for amp in (False, True):
        torch.manual_seed(0)
        tasks = [TransformLabels(views=views), GeneratedLabels(2)]
        labeler = AuxiliaryLabeler(TinyConvNet(num_classes=3, width=8), tasks=tasks)
        opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1, momentum=0.9)
        gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=1e-2)
        torch.manual_seed(1)  # the same rotations drawn with views="one"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            outs[amp] = labeler.step(x, y, opt, gen_opt)
        assert outs[amp]["meta_updated"]
        assert all(
            p.dtype == torch.float32 and torch.isfinite(p).all() for p in labeler.parameters()
        )
    for key in ("loss", "primary_loss", "meta_loss"):
        assert outs[True][key].dtype == torch.float32
        torch.testing.assert_close(outs[True][key], outs[False][key], rtol=0.03, atol=0.03)


# ------------------------------------------------------------------------ determinism
@pytest.fixture
def deterministic() -> Iterator[None]:
    """Turn on deterministic algorithms for one test and restore the previous setting."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _run(seed: int, meta: str) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    labeler = AuxiliaryLabeler(
        TinyConvNet(num_classes=3, width=6, dropout=0.3),
        tasks=GeneratedLabels([2, 3, 2], generator="copy"),
        meta=meta,
    )
    opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1, momentum=0.9, nesterov=True)
    gen_opt = torch.optim.Adam(labeler.generator_parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.randn(10, 3, 8, 8)  # drawn from the seeded global stream, like dropout
        y = torch.randint(0, 3, (10,))
        out = labeler.step(x, y, opt, gen_opt)
        assert out["meta_updated"]
    state = {f"param:{k}": p.detach().clone() for k, p in labeler.named_parameters()}
    state.update({f"buffer:{k}": b.clone() for k, b in labeler.named_buffers()})
    return state


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("meta", ["second_order", "first_order"])
def test_same_seed_same_bits(meta: str) -> None:
    assert torch.are_deterministic_algorithms_enabled()
    first, second = _run(0, meta), _run(0, meta)
    assert first.keys() == second.keys()
    for k in first:
        assert torch.equal(first[k], second[k]), f"{k} differs between two seeded runs"
    # not vacuous: another seed (other init, data and dropout masks) gives other parameters
    other = _run(1, meta)
    assert not torch.equal(
        first["param:tasks.0.generator.head.weight"], other["param:tasks.0.generator.head.weight"]
    )


# ------------------------------------------------------------------ non-finite policy
NAN_MULTITASK = r"non-finite multi-task loss or gradient .*no parameter, buffer or optimiser"
NAN_META = r"non-finite meta loss or meta-gradient .*no parameter, buffer or optimiser"


class _NaNGrad(torch.autograd.Function):
    """Identity whose backward returns NaN: a finite forward with a non-finite gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return torch.full_like(grad, float("nan"))


class PoisonedGenerator(nn.Module):
    """A small generator whose meta-gradient is NaN while ``poisoned`` is set."""

    def __init__(self, num_aux: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_aux))
        self.poisoned = False

    def forward(self, x: Tensor) -> Tensor:
        z = self.net(x)
        return _NaNGrad.apply(z) if self.poisoned else z


def _make(
    opt_kind: str,
    *,
    nonfinite: str = "raise",
    generator: Any = "copy",
    meta: str = "second_order",
    meta_every: int = 1,
) -> tuple[AuxiliaryLabeler, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    if generator == "poisoned":
        generator = PoisonedGenerator(6)
    labeler = AuxiliaryLabeler(
        TinyConvNet(num_classes=3, width=4),
        tasks=GeneratedLabels(2, generator=generator),
        meta=meta,
        nonfinite=nonfinite,
        meta_every=meta_every,
    )
    if opt_kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            labeler.model_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4
        )
    else:
        opt = torch.optim.Adam(labeler.model_parameters(), lr=1e-2)
    gen_opt = torch.optim.Adam(labeler.generator_parameters(), lr=1e-2)
    return labeler, opt, gen_opt


def _batch(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 3, 8, 8, generator=g), torch.arange(12) % 3


def _snapshot(
    labeler: AuxiliaryLabeler,
    opt: torch.optim.Optimizer,
    gen_opt: torch.optim.Optimizer,
    *,
    released: bool = False,
) -> dict[str, Any]:
    """State to compare; ``released`` records ``.grad`` as the step must leave it: None."""
    return {
        "params": {k: p.detach().clone() for k, p in labeler.named_parameters()},
        "grads": {
            k: None if (released or p.grad is None) else p.grad.clone()
            for k, p in labeler.named_parameters()
        },
        "buffers": {k: b.clone() for k, b in labeler.named_buffers()},
        "opt": copy.deepcopy(opt.state_dict()),
        "gen_opt": copy.deepcopy(gen_opt.state_dict()),
    }


def _assert_equal(a: Any, b: Any, where: str = "") -> None:
    """Recursive bit-exact comparison of nested dicts / lists of tensors and numbers."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_floating_point():  # NaN where the poisoned generator weight holds one
            nan = torch.isnan(a)
            assert torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan]), where
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_equal(u, v, f"{where}[{i}]")
    else:
        assert a == b, where


def _warm_up(
    labeler: AuxiliaryLabeler, opt: torch.optim.Optimizer, gen_opt: torch.optim.Optimizer
) -> None:
    """One finite step so that momentum buffers, Adam moments and .grad all exist."""
    out = labeler.step(*_batch(1), opt, gen_opt)
    assert out["meta_updated"]
    assert opt.state and gen_opt.state


def _poison(labeler: AuxiliaryLabeler, where: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Return a bad batch; for ``generator_*`` poison the generator and return its weight."""
    x, y = _batch(2)
    if where == "input_nan":
        x[3, 1, 2, 2] = float("nan")
    elif where == "input_inf":
        x[0, 0, 0, 0] = float("inf")
    elif where == "generator_weight":
        w = labeler.generator.head.weight  # type: ignore[union-attr]
        saved = w.detach().clone()
        with torch.no_grad():
            w[0, 0] = float("nan")
        return x, y, saved
    elif where == "meta_gradient":
        labeler.generator.poisoned = True  # type: ignore[union-attr,assignment]
    return x, y, None


def _heal(labeler: AuxiliaryLabeler, where: str, saved: Optional[Tensor]) -> None:
    if where == "generator_weight":
        with torch.no_grad():
            labeler.generator.head.weight.copy_(saved)  # type: ignore[union-attr,operator]
    elif where == "meta_gradient":
        labeler.generator.poisoned = False  # type: ignore[union-attr,assignment]


CASES = [
    pytest.param("input_nan", "copy", NAN_MULTITASK, id="input_nan"),
    pytest.param("input_inf", "copy", NAN_MULTITASK, id="input_inf"),
    # NaN labels make the auxiliary loss NaN: caught at the multi-task check.
    pytest.param("generator_weight", "copy", NAN_MULTITASK, id="generator_weight"),
    # finite labels and losses, NaN meta-gradient: caught at the meta check.
    pytest.param("meta_gradient", "poisoned", NAN_META, id="meta_gradient"),
]


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize(("where", "generator", "match"), CASES)
def test_raise_changes_nothing(opt_kind: str, where: str, generator: str, match: str) -> None:
    labeler, opt, gen_opt = _make(opt_kind, generator=generator)
    _warm_up(labeler, opt, gen_opt)
    x, y, saved = _poison(labeler, where)
    before = _snapshot(labeler, opt, gen_opt, released=True)
    with pytest.raises(NonFiniteError, match=match):
        labeler.step(x, y, opt, gen_opt)
    _assert_equal(_snapshot(labeler, opt, gen_opt), before)
    assert issubclass(NonFiniteError, FloatingPointError)


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize(("where", "generator", "match"), CASES)
def test_skip_changes_nothing_and_training_resumes(
    opt_kind: str, where: str, generator: str, match: str, caplog: pytest.LogCaptureFixture
) -> None:
    labeler, opt, gen_opt = _make(opt_kind, nonfinite="skip", generator=generator)
    twin, twin_opt, twin_gen_opt = _make(opt_kind, nonfinite="skip", generator=generator)
    _warm_up(labeler, opt, gen_opt)
    _warm_up(twin, twin_opt, twin_gen_opt)

    x, y, saved = _poison(labeler, where)
    before = _snapshot(labeler, opt, gen_opt, released=True)
    with caplog.at_level(logging.WARNING, logger="auxgen.labeler"):
        out = labeler.step(x, y, opt, gen_opt)
    assert out["skipped"] == 1 and out["meta_updated"] is False
    assert "skipping a step with a non-finite" in caplog.text
    _assert_equal(_snapshot(labeler, opt, gen_opt), before)

    # The next finite step is exactly the one the twin (which never saw the bad batch) takes.
    _heal(labeler, where, saved)
    for lab, o, go in ((labeler, opt, gen_opt), (twin, twin_opt, twin_gen_opt)):
        torch.manual_seed(5)
        out = lab.step(*_batch(3), o, go)
        assert out["skipped"] == 0 and out["meta_updated"]
    _assert_equal(_snapshot(labeler, opt, gen_opt), _snapshot(twin, twin_opt, twin_gen_opt))


@pytest.mark.parametrize("meta", ["second_order", "first_order"])
def test_nonfinite_meta_gradient_both_modes(meta: str) -> None:
    """Both meta modes route a NaN meta-gradient through the policy."""
    labeler, opt, gen_opt = _make("sgd", generator="poisoned", meta=meta)
    _warm_up(labeler, opt, gen_opt)
    x, y, _ = _poison(labeler, "meta_gradient")
    before = _snapshot(labeler, opt, gen_opt, released=True)
    with pytest.raises(NonFiniteError, match=NAN_META):
        labeler.step(x, y, opt, gen_opt)
    _assert_equal(_snapshot(labeler, opt, gen_opt), before)


def test_skip_does_not_count_towards_meta_every() -> None:
    """A skipped step is not a step: the ``meta_every`` schedule resumes where it was."""
    labeler, opt, gen_opt = _make("sgd", nonfinite="skip", meta_every=2)
    flags = []
    for i in range(4):
        x, y = _batch(10 + i)
        if i == 1:
            x[0, 0, 0, 0] = float("nan")
        out = labeler.step(x, y, opt, gen_opt)
        flags.append((out["skipped"], out["meta_updated"]))
    assert flags == [(0, True), (1, False), (0, False), (0, True)]
