"""The non-finite policy of ``AuxiliaryLabeler.step``: raise or skip, and change nothing.

A step with a non-finite loss or gradient must leave every parameter, every buffer
(BatchNorm running statistics of the model and of a ``copy`` generator) and the state of both
optimisers (momentum buffers, Adam moments and step counts) exactly as it was. ``.grad`` is
released at the start of every step (as ``zero_grad(set_to_none=True)`` does) and stays
``None`` after a step that was not taken. With ``nonfinite="skip"`` the next finite step
must be the step that would have been taken had the bad batch never been seen.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import pytest
import torch
from helpers import TinyConvNet
from torch import Tensor, nn

from auxgen import AuxiliaryLabeler, GeneratedLabels, NonFiniteError

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
