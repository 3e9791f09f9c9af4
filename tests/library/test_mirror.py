"""The differentiable look-ahead reproduces torch.optim step by step."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm.optim
import torch
from torch import optim

from auxgen.mirror import (
    SUPPORTED_OPTIMIZERS,
    check_optimizer,
    is_mirrored,
    lookahead,
    sgd_jacobian,
    sgd_stand_in,
)

OPTIMIZERS = {
    "sgd": lambda p: optim.SGD(p, lr=0.1),
    "sgd-momentum-wd": lambda p: optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd-dampening": lambda p: optim.SGD(p, lr=0.1, momentum=0.8, dampening=0.3),
    "sgd-nesterov": lambda p: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "sgd-maximize": lambda p: optim.SGD(p, lr=0.1, momentum=0.5, maximize=True),
    "adam": lambda p: optim.Adam(p, lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-2),
    "adam-amsgrad": lambda p: optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "adam-decoupled": lambda p: optim.Adam(
        p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True
    ),
    "adamw": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw-maximize": lambda p: optim.AdamW(p, lr=1e-2, maximize=True),
    "adam-groups": lambda p: optim.Adam(
        [{"params": p[:1], "lr": 1e-3}, {"params": p[1:], "lr": 1e-2, "eps": 1e-6}]
    ),
    "rmsprop": lambda p: optim.RMSprop(p, lr=1e-2, weight_decay=1e-2),
    "rmsprop-centered": lambda p: optim.RMSprop(p, lr=1e-2, alpha=0.9, centered=True),
    "rmsprop-momentum": lambda p: optim.RMSprop(p, lr=1e-2, momentum=0.9, maximize=True),
    "rmsprop-centered-momentum": lambda p: optim.RMSprop(p, lr=1e-2, centered=True, momentum=0.5),
    "adagrad": lambda p: optim.Adagrad(p, lr=0.1),
    "adagrad-decay-init-wd": lambda p: optim.Adagrad(
        p, lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1, weight_decay=1e-2
    ),
    "nadam": lambda p: optim.NAdam(p, lr=1e-2, weight_decay=1e-2),
    "nadam-decoupled": lambda p: optim.NAdam(
        p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, momentum_decay=0.1
    ),
    # default betas: steps 1-5 are unrectified, 6+ rectified
    "radam": lambda p: optim.RAdam(p, lr=1e-2, weight_decay=1e-2),
    "radam-decoupled": lambda p: optim.RAdam(
        p, lr=1e-2, betas=(0.9, 0.8), weight_decay=0.1, decoupled_weight_decay=True
    ),
    "adamax": lambda p: optim.Adamax(p, lr=1e-2, weight_decay=1e-2),
    "adamax-groups": lambda p: optim.Adamax(
        [{"params": p[:1], "lr": 1e-3, "betas": (0.5, 0.9)}, {"params": p[1:], "eps": 1e-3}]
    ),
}
STEPS = 8  # RAdam switches to its rectified update at step 6 (betas (0.9, 0.999)) / 7 (0.8)
# float64: the look-ahead is torch.optim's own arithmetic; float32: fused multiply-adds in
# torch's kernels round differently (centered RMSprop subtracts two close moments).
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def _params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=dtype)),
        torch.nn.Parameter(torch.randn(3, generator=g, dtype=dtype)),
    ]


def test_every_supported_optimizer_is_tested():
    tested = {type(make(_params())) for make in OPTIMIZERS.values()}
    assert tested == set(SUPPORTED_OPTIMIZERS)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_lookahead_matches_torch_optim(name, dtype):
    params = _params(dtype)
    opt = OPTIMIZERS[name](params)
    for _ in range(STEPS):
        grads = [torch.randn_like(p) for p in params]
        predicted = lookahead(opt, params, [p.detach() for p in params], grads)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p, q in zip(params, predicted):
            torch.testing.assert_close(q, p.detach(), **TOL[dtype])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_lookahead_derivative_matches_finite_differences_of_torch_optim(name):
    """d theta+/dG of the look-ahead vs central differences of the real torch.optim step."""
    params = _params()
    opt = OPTIMIZERS[name](params)
    for _ in range(6):  # build up state (RAdam: into its rectified regime)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    grads = [torch.randn_like(p, requires_grad=True) for p in params]
    direction = [torch.randn_like(p) for p in params]
    out = lookahead(opt, params, [p.detach() for p in params], grads)
    # elementwise update: the vector-Jacobian product along `direction` is also the JVP
    jvp = torch.autograd.grad(out, grads, direction)
    h = 1e-6

    def real_step(sign):
        twin = copy.deepcopy(opt)
        for p, g, d in zip([q for gr in twin.param_groups for q in gr["params"]], grads, direction):
            p.grad = g.detach() + sign * h * d
        twin.step()
        return [q.detach() for gr in twin.param_groups for q in gr["params"]]

    fd = [(a - b) / (2 * h) for a, b in zip(real_step(1), real_step(-1))]
    for j, f in zip(jvp, fd):
        torch.testing.assert_close(j, f, rtol=1e-6, atol=1e-8)


def test_lookahead_leaves_optimizer_untouched_and_skips_missing_grads():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    snapshot = {k: v.clone() for k, v in opt.state[p].items()}
    value = p.detach().clone()
    out = lookahead(opt, [p], [p.detach()], [torch.randn(3)])
    assert not torch.equal(out[0], value)
    for k, v in opt.state[p].items():
        assert torch.equal(v, snapshot[k])
    assert torch.equal(p, value)
    assert lookahead(opt, [p], [p.detach()], [None])[0] is not None


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_lookahead_is_differentiable_at_zero_gradient(name):
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = OPTIMIZERS[name]([p, torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))])
    for _ in range(2):  # the first entry's gradient is exactly zero on every step
        p.grad = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
        opt.step()
    g = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64, requires_grad=True)
    out = lookahead(opt, [p], [p.detach()], [g])[0]
    (d,) = torch.autograd.grad(out.sum(), g)
    assert torch.isfinite(d).all(), d


@pytest.mark.parametrize("name", [n for n in sorted(OPTIMIZERS) if n.startswith("sgd")])
def test_sgd_jacobian_matches_autograd(name):
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = OPTIMIZERS[name](params)
    for _ in range(2):  # before and after the momentum buffer exists
        grads = [torch.randn_like(p, requires_grad=True) for p in params]
        out = lookahead(opt, params, [p.detach() for p in params], grads)
        v = [torch.randn_like(p) for p in params]
        expected = torch.autograd.grad(out, grads, v)
        for s, vi, e in zip(sgd_jacobian(opt, params), v, expected):
            torch.testing.assert_close(s * vi, e)
        for p, g in zip(params, grads):
            p.grad = g.detach()
        opt.step()
    assert sgd_jacobian(torch.optim.Adam(params), params) is None
    assert sgd_jacobian(torch.optim.RMSprop(params), params) is None


def test_unsupported_optimizers_are_refused_with_a_way_forward():
    params = _params()
    for opt in (torch.optim.Adadelta(params), torch.optim.Rprop(params)):
        assert not is_mirrored(opt)
        with pytest.raises(TypeError, match=r"one of torch.optim.SGD, .* lookahead=\"sgd\""):
            check_optimizer(opt, params, argname="optimizer", owner="p", mirrored=True)
        with pytest.raises(TypeError, match="to be mirrored exactly"):
            lookahead(opt, params, [p.detach() for p in params], [None, None])
        # opted in: accepted, and not checked at all when it need not be mirrored
        check_optimizer(opt, params, argname="optimizer", owner="p", mirrored=True, lookahead="sgd")
        check_optimizer(opt, params, argname="optimizer", owner="p", mirrored=False)
    for opt in (timm.optim.Lamb(params), timm.optim.Lars(params), torch.optim.LBFGS(params)):
        assert not is_mirrored(opt)
        with pytest.raises(TypeError, match=r"not elementwise in the gradient.* lookahead=\"sgd\""):
            check_optimizer(opt, params, argname="optimizer", owner="p", mirrored=True)
    with pytest.raises(ValueError, match=r"lookahead must be one of \('exact', 'sgd'\), got 'x'"):
        check_optimizer(
            optim.SGD(params), params, argname="optimizer", owner="p", mirrored=True, lookahead="x"
        )


def test_sgd_stand_in_is_plain_sgd_at_the_groups_current_lr():
    params = _params()
    opt = timm.optim.Lamb(
        [{"params": params[:1], "lr": 0.5}, {"params": params[1:], "lr": torch.tensor(0.25)}],
        weight_decay=0.1,
    )
    opt.param_groups[0]["lr"] = 0.3  # a scheduler moved it
    sgd = sgd_stand_in(opt)
    grads = [torch.randn_like(p) for p in params]
    out = lookahead(sgd, params, [p.detach() for p in params], grads)
    for p, g, lr, o in zip(params, grads, (0.3, 0.25), out):
        torch.testing.assert_close(o, p.detach() - lr * g, rtol=0, atol=0)
    assert sgd_jacobian(sgd, params) == [-0.3, -0.25]


def _labeler(**options):
    from helpers import maxl_labeler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return maxl_labeler(model, [2, 3, 4], **options)


def test_labeler_refuses_unmirrored_optimizer_unless_lookahead_sgd():
    x, y = torch.randn(12, 6), torch.arange(12) % 3
    lab = _labeler()
    gen_opt = optim.SGD(lab.generator_parameters(), lr=1e-2)
    with pytest.raises(
        TypeError,
        match=r"mirrored exactly, got torch.optim.adadelta.Adadelta; pass .*lookahead=\"sgd\"",
    ):
        lab.step(x, y, optim.Adadelta(lab.model_parameters()), gen_opt)
    with pytest.raises(
        ValueError, match=r"lookahead must be one of \('exact', 'sgd'\), got 'adam'"
    ):
        _labeler(lookahead="adam")
    with pytest.raises(TypeError, match="diagnostics must be a bool, got int"):
        _labeler(diagnostics=1)


def test_lookahead_sgd_uses_plain_sgd_at_the_current_lr_and_warns_once():
    """The meta-gradient with Lamb under lookahead='sgd' is the one a plain SGD step gives."""
    x, y = torch.randn(12, 6), torch.arange(12) % 3
    approx, plain = _labeler(lookahead="sgd"), _labeler()
    lamb = timm.optim.Lamb(approx.model_parameters(), lr=0.05, weight_decay=0.1)
    sgd = optim.SGD(plain.model_parameters(), lr=0.05)
    gen_a = optim.SGD(approx.generator_parameters(), lr=1e-2)
    gen_p = optim.SGD(plain.generator_parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match=r"Lamb is not mirrored exactly: .* plain SGD"):
        out = approx.step(x, y, lamb, gen_a)
    assert out["meta_updated"]
    plain.step(x, y, sgd, gen_p)
    for a, b in zip(approx.generator_parameters(), plain.generator_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8)
    # the real step is Lamb's own, not SGD's
    assert not torch.allclose(approx.model_parameters()[0], plain.model_parameters()[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        approx.step(x, y, lamb, gen_a)  # warned once only
    # mirrored optimisers stay exact under lookahead="sgd": no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        approx.step(x, y, optim.NAdam(approx.model_parameters()), gen_a)


def test_a_subclass_takes_its_most_specific_bases_update():
    """AdamW subclasses Adam: an AdamW (or a user's subclass of it) keeps AdamW's decoupled
    weight decay, and a subclass of SGD keeps SGD's affine Jacobian."""
    order = (optim.SGD, optim.Adam, optim.AdamW, optim.RMSprop, optim.Adagrad, optim.NAdam)
    assert order + (optim.RAdam, optim.Adamax) == SUPPORTED_OPTIMIZERS  # the public order

    class MyAdamW(optim.AdamW):
        pass

    class MySGD(optim.SGD):
        pass

    params = _params()
    opt = MyAdamW(params, lr=1e-2, weight_decay=0.5)
    assert is_mirrored(opt) and sgd_jacobian(opt, params) is None
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        predicted = lookahead(opt, params, [p.detach() for p in params], grads)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p, q in zip(params, predicted):
            torch.testing.assert_close(q, p.detach(), **TOL[torch.float64])
    sgd = MySGD(params, lr=0.1, momentum=0.9)
    assert sgd_jacobian(sgd, params) == sgd_jacobian(
        optim.SGD(params, lr=0.1, momentum=0.9), params
    )
