"""How the exact meta-gradient is taken when ops lack derivative formulas: forward AD,
the op decompositions, the double backward, and the warned first_order fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import auxgen.meta as meta_mod
from auxgen import AuxiliaryLabeler
from auxgen.meta import EXACT_MODES, JVPPlan, decomposed_ops, missing_derivative


class DetachedSquare(torch.autograd.Function):
    """x**2 with no jvp and a backward that autograd cannot differentiate."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return (2 * x * g).detach()


class Square(torch.autograd.Function):
    """x**2 with no jvp but a differentiable backward (double backward works)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class Net(nn.Module):
    def __init__(self, square=None) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.fc = nn.Linear(8, 3)
        self.square = square

    def forward(self, x):
        h = self.body(x)
        h = h * h if self.square is None else self.square.apply(h)
        return self.fc(torch.tanh(h))


def _run(square, meta, steps=1, dtype=torch.float64):
    torch.manual_seed(0)
    lab = AuxiliaryLabeler(Net(square).to(dtype), psi=2, meta=meta)
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1, momentum=0.9)
    gen_opt = torch.optim.SGD(lab.generator_parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 6, generator=g, dtype=dtype), torch.arange(6) % 3
    outs = [lab.step(x, y, opt, gen_opt) for _ in range(steps)]
    grads = torch.cat([p.grad.flatten() for p in lab.generator_parameters()])
    return lab, outs, grads


def test_no_formula_at_all_falls_back_to_first_order_with_one_warning():
    with pytest.warns(UserWarning) as record:
        lab, outs, grads = _run(DetachedSquare, "second_order", steps=3)
    # (torch's own first forward-AD call may emit a FutureWarning while loading its tables)
    ours = [r for r in record if "auxgen" in str(r.message)]
    assert len(ours) == 1  # once, at the first meta step, not every step
    assert ours[0].category is UserWarning and ours[0].filename == __file__  # the step call
    msg = str(ours[0].message)
    assert "forward_ad needs a derivative of custom autograd.Function DetachedSquare" in msg
    assert "double_backward needs a derivative of the backward of DetachedSquare" in msg
    assert "using meta='first_order'" in msg
    assert lab.meta_mode_used == "first_order"
    assert [o["meta_mode"] for o in outs] == ["first_order"] * 3
    # exactly what meta="first_order" computes on the same model
    _, _, expected = _run(DetachedSquare, "first_order", steps=3)
    torch.testing.assert_close(grads, expected, rtol=0, atol=0)


def test_double_backward_is_exact_where_forward_ad_is_missing():
    """A custom Function without jvp: the default picks the double backward, with no
    warning, and matches forward AD through the same maths written with plain ops."""
    lab, outs, grads = _run(Square, "second_order", steps=2)  # a warning would fail here
    assert lab.meta_mode_used == "double_backward"
    assert [o["meta_mode"] for o in outs] == ["double_backward"] * 2
    lab_ref, outs_ref, expected = _run(None, "second_order", steps=2)
    assert lab_ref.meta_mode_used == "forward_ad"
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)
    _, _, forced = _run(None, "double_backward", steps=2)
    torch.testing.assert_close(forced, expected, rtol=1e-10, atol=1e-12)


def test_forced_exact_mode_raises_naming_the_op():
    with pytest.raises(NotImplementedError, match=r"meta='forward_ad' needs a derivative of "):
        _run(Square, "forward_ad")
    msg = r"meta='double_backward' needs a derivative of the backward of DetachedSquare"
    with pytest.raises(NotImplementedError, match=msg):
        _run(DetachedSquare, "double_backward")
    with pytest.raises(ValueError, match=r"meta must be one of .* got 'exact'"):
        AuxiliaryLabeler(Net(), psi=2, meta="exact")


def test_choice_is_made_once_and_cached(monkeypatch):
    calls = []
    real = meta_mod.directional_derivative

    def spy(*args, mode, **kwargs):
        calls.append(mode)
        return real(*args, mode=mode, **kwargs)

    monkeypatch.setattr(meta_mod, "directional_derivative", spy)
    _run(Square, "second_order", steps=3)
    assert calls == ["forward_ad", "double_backward", "double_backward", "double_backward"]
    calls.clear()
    with pytest.warns(UserWarning, match="first_order"):
        _run(DetachedSquare, "second_order", steps=2)
    assert calls == ["forward_ad", "double_backward", "first_order", "first_order"]


def test_jvp_plan_order():
    plan = JVPPlan("second_order")
    assert plan.mode is None and plan.candidates() == EXACT_MODES
    plan.mode = "double_backward"
    assert plan.candidates() == ("double_backward",)
    assert JVPPlan("first_order").candidates() == ()
    assert JVPPlan("forward_ad").candidates() == ("forward_ad",)


def test_missing_derivative_only_claims_formula_errors():
    err = NotImplementedError("the derivative for 'foo' is not implemented.")
    assert missing_derivative(err) == "foo"
    assert missing_derivative(NotImplementedError("something else")) is None
    assert missing_derivative(RuntimeError("Trying to use forward AD with x that does not")) is None


def test_other_errors_are_not_swallowed():
    class Broken(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            return 2 * ctx.saved_tensors[0] * g

        @staticmethod
        def jvp(ctx, t):
            raise ValueError("a bug in a jvp")

    with pytest.raises(ValueError, match="a bug in a jvp"):
        _run(Broken, "second_order")


# ------------------------------------------------------------- embedding_bag
BAG_CASES = [
    dict(mode="sum"),
    dict(mode="mean"),
    dict(mode="max"),
    dict(mode="mean", padding_idx=0),
    dict(mode="max", padding_idx=-7),  # 7 rows: -7 is row 0
    dict(mode="sum", per_sample_weights=True),
    dict(mode="sum", offsets=True),
    dict(mode="mean", offsets=True, padding_idx=2),
    dict(mode="max", offsets=True, include_last_offset=True),
    dict(mode="sum", offsets=True, per_sample_weights=True, include_last_offset=True),
]


def _case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", BAG_CASES, ids=_case_id)
def test_embedding_bag_decomposition_values_and_jvp(case):
    """Same values as F.embedding_bag; its forward-AD tangent J u satisfies the adjoint
    identity <J u, w> = <u, J^T w> with J^T w from F.embedding_bag's own backward."""
    case = dict(case)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 5, generator=g, dtype=torch.float64)
    u = torch.randn(7, 5, generator=g, dtype=torch.float64)
    if case.pop("offsets", False):
        inp = torch.tensor([0, 2, 2, 5, 1, 3, 6, 0, 4])
        # bags [0:2], [2:2] (empty), [2:6], [6:9]; with include_last_offset the last is 9
        last = [9] if case.get("include_last_offset") else []
        kwargs = dict(offsets=torch.tensor([0, 2, 2, 6, *last]))
    else:
        inp = torch.tensor([[0, 2, 2, 5], [1, 3, 6, 0], [0, 0, 0, 0]])
        kwargs = {}
    if case.pop("per_sample_weights", False):
        kwargs["per_sample_weights"] = torch.rand(inp.shape, generator=g, dtype=torch.float64)
    kwargs.update(case)

    ref = F.embedding_bag(inp, weight, **kwargs)
    with decomposed_ops():
        got = F.embedding_bag(inp, weight, **kwargs)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)

    with decomposed_ops(), fwAD.dual_level():
        dual = F.embedding_bag(inp, fwAD.make_dual(weight, u), **kwargs)
        tangent = fwAD.unpack_dual(dual).tangent
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    leaf = weight.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(F.embedding_bag(inp, leaf, **kwargs), leaf, w)
    assert float((tangent * w).sum()) == pytest.approx(float((u * vjp).sum()), rel=1e-12)


def test_decomposition_leaves_other_calls_alone():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with decomposed_ops():
            x = torch.randn(3, 4)
            torch.testing.assert_close(F.relu(x), x.clamp_min(0))
