"""The differentiable look-ahead reproduces torch.optim step by step."""

from __future__ import annotations

import pytest
import torch

from auxgen.mirror import lookahead, sgd_jacobian

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd-dampening": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, dampening=0.3),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "sgd-maximize": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, maximize=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adam-groups": lambda p: torch.optim.Adam(
        [{"params": p[:1], "lr": 1e-3}, {"params": p[1:], "lr": 1e-2, "eps": 1e-6}]
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_lookahead_matches_torch_optim(name):
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = OPTIMIZERS[name](params)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in params]
        predicted = lookahead(opt, params, [p.detach() for p in params], grads)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p, q in zip(params, predicted):
            torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-7)


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


def test_adam_lookahead_is_differentiable_at_zero_gradient():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p], lr=0.1)
    g = torch.tensor([0.0, 1.0, -2.0], requires_grad=True)
    out = lookahead(opt, [p], [p.detach()], [g])[0]
    (d,) = torch.autograd.grad(out.sum(), g)
    assert torch.isfinite(d).all()
    # d(theta+)/dg at g = 0 on Adam's first step is -lr * (1 - b1) / ((1 - b1) * eps)... finite,
    # and for g != 0 on the first step the update is -lr * sign(g), whose derivative is ~0.
    assert abs(float(d[1])) < 1e-6 and abs(float(d[2])) < 1e-6


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
