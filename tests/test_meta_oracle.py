"""Independent oracle for ``AuxiliaryLabeler.step`` (MAXL, exact second-order meta-gradient).

Everything the library computes is recomputed here from scratch with explicit parameter
tensors: a hand-written functional forward of the model (batch-statistics BatchNorm), a
hand-written masked softmax and losses, hand-written optimiser formulas with their own
state (momentum buffers, Adam moments, step count) and plain autograd double backward.
Two consecutive steps are compared so that the optimiser state matters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auxgen import AuxiliaryLabeler

PSI = [2, 3, 4]
OWNER = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2])
AUX_W, ENT_W, GEN_LR = 0.7, 0.3, 0.05
BN_EPS, BN_MOM = 1e-5, 0.1
B1, B2, ADAM_EPS = 0.9, 0.999, 1e-8
TOL = dict(rtol=1e-6, atol=1e-9)

# name -> (torch optimiser, oracle kind, hyper-parameters, zero the first input feature)
CASES = {
    "sgd_momentum": (torch.optim.SGD, "sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-3), 0),
    "sgd_nesterov": (
        torch.optim.SGD,
        "sgd",
        dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
        0,
    ),
    "adam": (torch.optim.Adam, "adam", dict(lr=1e-2, weight_decay=1e-3), 0),
    "adamw": (torch.optim.AdamW, "adamw", dict(lr=1e-2, weight_decay=1e-2), 0),
    # No weight decay and an all-zero input feature: the gradient of the first Linear's
    # weight column for that feature is exactly 0.0 (a sum of products with 0), so Adam's
    # second moment is exactly 0 there and a naive sqrt has an infinite derivative.
    "adam_zero_grad": (torch.optim.Adam, "adam", dict(lr=1e-2, weight_decay=0.0), 1),
}


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ----------------------------------------------------------------------------- oracle
def features(p, x):
    """Input of the last Linear, plus the BatchNorm batch mean and biased variance."""
    a = F.linear(x, p["0.weight"], p["0.bias"])
    mean, var = a.mean(0), ((a - a.mean(0)) ** 2).mean(0)
    a = (a - mean) / torch.sqrt(var + BN_EPS) * p["1.weight"] + p["1.bias"]
    return torch.tanh(a), mean, var


def gen_logits(q, x):
    return F.linear(torch.tanh(F.linear(x, q["0.weight"], q["0.bias"])), q["2.weight"], q["2.bias"])


def masked_softmax(logits, y):
    mask = OWNER[None, :] == y[:, None]
    z = logits.masked_fill(~mask, float("-inf"))
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def primary_ce(z, y):
    return -F.log_softmax(z, dim=1).gather(1, y[:, None]).mean()


def safe_sqrt(v):
    # Where a gradient entry is exactly 0.0 (and was so on every step) v is exactly 0 and
    # d sqrt(v)/dv = inf; autograd then multiplies it with the exactly-zero upstream
    # gradient (m = 0) and produces NaN that spreads into the meta-gradient. The true
    # derivative of the update there is finite, so use sqrt(v) where v > 0 and route the
    # gradient through a dummy 1 where v == 0 (same forward value, zero gradient).
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), 0.0 * v)


class OracleOpt:
    """torch.optim update formulas written out, with their own state."""

    def __init__(self, kind, hp):
        self.kind, self.hp, self.state = kind, dict(hp), {}

    def update(self, theta, grads, commit):
        lr, wd = self.hp["lr"], self.hp.get("weight_decay", 0.0)
        out = {}
        for n, p in theta.items():
            g, st = grads[n], self.state.get(n)
            if self.kind == "sgd":
                mom, damp = self.hp.get("momentum", 0.0), self.hp.get("dampening", 0.0)
                d = g + wd * p
                buf = d if st is None else mom * st["buf"] + (1 - damp) * d
                out[n] = p - lr * (d + mom * buf if self.hp.get("nesterov") else buf)
                new_st = {"buf": buf}
            else:
                k = 1 if st is None else st["step"] + 1
                m0 = torch.zeros_like(p) if st is None else st["m"]
                v0 = torch.zeros_like(p) if st is None else st["v"]
                if self.kind == "adam":
                    g, base = g + wd * p, p
                else:
                    base = p * (1 - lr * wd)
                m = B1 * m0 + (1 - B1) * g
                v = B2 * v0 + (1 - B2) * g * g
                mhat, vhat = m / (1 - B1**k), v / (1 - B2**k)
                out[n] = base - lr * mhat / (safe_sqrt(vhat) + ADAM_EPS)
                new_st = {"step": k, "m": m, "v": v}
            if commit:
                self.state[n] = {
                    k_: v_.detach() if torch.is_tensor(v_) else v_ for k_, v_ in new_st.items()
                }
        return out


def oracle_step(theta, phi, bn, opt, x, y, meta=None):
    """One MAXL step; ``meta=(x_m, y_m)`` measures the meta loss on another batch."""
    x_m, y_m = meta if meta is not None else (x, y)
    th = {n: v.detach().clone().requires_grad_(True) for n, v in theta.items()}
    ph = {n: v.detach().clone().requires_grad_(True) for n, v in phi.items()}
    t = masked_softmax(gen_logits(ph, x), y)
    h, mean, var = features(th, x)
    zp = F.linear(h, th["3.weight"], th["3.bias"])
    za = F.linear(h, th["aux.weight"], th["aux.bias"])
    lp = primary_ce(zp, y)
    la = -(t * F.log_softmax(za, dim=1)).sum(1).mean()
    lmt = lp + AUX_W * la
    names = list(th)
    grads = torch.autograd.grad(lmt, [th[n] for n in names], create_graph=True)
    G = dict(zip(names, grads))
    plus = opt.update(th, G, commit=False)  # look-ahead with the current optimiser state
    hp, _, _ = features(plus, x_m)
    pbar = t.mean(0)
    lmeta = (
        primary_ce(F.linear(hp, plus["3.weight"], plus["3.bias"]), y_m)
        + ENT_W * (pbar * pbar.log()).sum()
    )
    meta_grad = dict(zip(ph, torch.autograd.grad(lmeta, list(ph.values()))))
    theta_new = opt.update(
        {n: v.detach() for n, v in th.items()}, {n: g.detach() for n, g in G.items()}, True
    )
    phi_new = {n: ph[n].detach() - GEN_LR * meta_grad[n] for n in ph}
    N = x.shape[0]
    bn_new = {
        "running_mean": (1 - BN_MOM) * bn["running_mean"] + BN_MOM * mean.detach(),
        "running_var": (1 - BN_MOM) * bn["running_var"] + BN_MOM * var.detach() * N / (N - 1),
        "num_batches_tracked": bn["num_batches_tracked"] + 1,
    }
    losses = {"loss": lmt, "primary_loss": lp, "aux_loss": la, "meta_loss": lmeta}
    losses = {k: v.detach() for k, v in losses.items()}
    return dict(
        theta=theta_new,
        phi=phi_new,
        bn=bn_new,
        meta_grad=meta_grad,
        G=G,
        losses=losses,
        logits=zp.detach(),
    )


# ----------------------------------------------------------------------------- helpers
def build(meta, zero_col):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    gen = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 9)).double()
    labeler = AuxiliaryLabeler(
        model,
        psi=PSI,
        generator=gen,
        loss="ce",
        aux_weight=AUX_W,
        entropy_weight=ENT_W,
        meta=meta,
    )
    batches = []
    for _ in range(2):
        x = torch.randn(12, 6) * 1.5
        x[:, 0] *= 1 - zero_col
        batches.append((x, torch.arange(12)[torch.randperm(12)] % 3))
    return model, gen, labeler, batches


def lib_theta(model, labeler):
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    theta.update({f"aux.{n}": p.detach().clone() for n, p in labeler.aux_head.named_parameters()})
    return theta


def lib_bn(model):
    return {n: b.detach().clone() for n, b in model[1].named_buffers()}


def check_wiring(model, gen, labeler):
    assert labeler.generator is gen
    assert tuple(labeler.aux_head.weight.shape) == (9, 8)
    want = {id(p) for p in model.parameters()} | {id(p) for p in labeler.aux_head.parameters()}
    assert {id(p) for p in labeler.model_parameters()} == want
    assert {id(p) for p in labeler.generator_parameters()} == {id(p) for p in gen.parameters()}


def cosine(a, b):
    a = torch.cat([v.flatten() for v in a])
    b = torch.cat([v.flatten() for v in b])
    return float(a @ b / (a.norm() * b.norm()))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", list(CASES))
def test_second_order_step_matches_oracle(case):
    opt_cls, kind, hp, zero_col = CASES[case]
    model, gen, labeler, batches = build("second_order", zero_col)
    check_wiring(model, gen, labeler)
    opt = opt_cls(labeler.model_parameters(), **hp)
    gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=GEN_LR)
    oracle = OracleOpt(kind, hp)
    theta, bn = lib_theta(model, labeler), lib_bn(model)
    phi = {n: p.detach().clone() for n, p in gen.named_parameters()}
    for step, (x, y) in enumerate(batches):
        ref = oracle_step(theta, phi, bn, oracle, x, y)
        if zero_col:  # the case really exercises exactly-zero gradient entries
            assert (ref["G"]["0.weight"][:, 0] == 0).all()
        out = labeler.step(x, y, opt, gen_opt)
        msg = f"{case} step {step}"
        for n, p in gen.named_parameters():
            assert p.grad is not None, f"{msg}: no grad for generator {n}"
            assert torch.isfinite(p.grad).all(), f"{msg}: non-finite grad for generator {n}"
            assert p.grad.abs().sum() > 0, f"{msg}: zero grad for generator {n}"
            torch.testing.assert_close(p.grad, ref["meta_grad"][n], **TOL, msg=f"{msg}: dphi {n}")
            torch.testing.assert_close(p.detach(), ref["phi"][n], **TOL, msg=f"{msg}: phi {n}")
        for n, v in lib_theta(model, labeler).items():
            torch.testing.assert_close(v, ref["theta"][n], **TOL, msg=f"{msg}: theta {n}")
        for n, v in lib_bn(model).items():
            torch.testing.assert_close(v, ref["bn"][n], **TOL, msg=f"{msg}: BN {n}")
        for k, v in ref["losses"].items():
            got = torch.as_tensor(out[k]).detach().to(v.dtype)
            torch.testing.assert_close(got, v, **TOL, msg=f"{msg}: {k}")
        torch.testing.assert_close(out["logits"].detach(), ref["logits"], **TOL)
        theta, phi, bn = ref["theta"], ref["phi"], ref["bn"]


def test_first_order_approximates_exact_meta_gradient():
    opt_cls, kind, hp, zero_col = CASES["sgd_momentum"]
    model, gen, labeler, batches = build("first_order", zero_col)
    opt = opt_cls(labeler.model_parameters(), **hp)
    gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=GEN_LR)
    oracle = OracleOpt(kind, hp)
    for step, (x, y) in enumerate(batches):
        # re-sync with the library: its phi follows the approximate gradient
        theta, bn = lib_theta(model, labeler), lib_bn(model)
        phi = {n: p.detach().clone() for n, p in gen.named_parameters()}
        ref = oracle_step(theta, phi, bn, oracle, x, y)
        labeler.step(x, y, opt, gen_opt)
        got = [p.grad for _, p in gen.named_parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in got)
        cos = cosine(got, list(ref["meta_grad"].values()))
        assert cos > 0.99, f"step {step}: cosine(first_order, exact) = {cos:.6f}"
        # the real update does not depend on the meta-gradient mode
        for n, v in lib_theta(model, labeler).items():
            torch.testing.assert_close(v, ref["theta"][n], **TOL, msg=f"step {step}: theta {n}")


@pytest.mark.parametrize("case", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("meta", ["second_order", "first_order"])
def test_meta_batch_matches_oracle(case, meta):
    """The meta loss on another batch (of another size): exact, and the real update unchanged."""
    opt_cls, kind, hp, zero_col = CASES[case]
    model, gen, labeler, batches = build(meta, zero_col)
    opt = opt_cls(labeler.model_parameters(), **hp)
    gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=GEN_LR)
    oracle = OracleOpt(kind, hp)
    g = torch.Generator().manual_seed(5)
    for step, (x, y) in enumerate(batches):
        x_m, y_m = torch.randn(7, 6, generator=g), torch.randint(0, 3, (7,), generator=g)
        theta, bn = lib_theta(model, labeler), lib_bn(model)
        phi = {n: p.detach().clone() for n, p in gen.named_parameters()}
        ref = oracle_step(theta, phi, bn, oracle, x, y, meta=(x_m, y_m))
        same = oracle_step(theta, phi, bn, OracleOpt(kind, hp), x, y)
        bn_before = lib_bn(model)
        out = labeler.step(x, y, opt, gen_opt, meta_batch=(x_m, y_m))
        msg = f"{case}/{meta} step {step}"
        got = [p.grad for _, p in gen.named_parameters()]
        want = list(ref["meta_grad"].values())
        if meta == "second_order":
            for gi, wi in zip(got, want):
                torch.testing.assert_close(gi, wi, **TOL, msg=msg)
            torch.testing.assert_close(out["meta_loss"], ref["losses"]["meta_loss"], **TOL)
        else:
            assert cosine(got, want) > 0.99, msg
        # a genuinely different objective from the paper's same-batch one
        diff = [w - s for w, s in zip(want, same["meta_grad"].values())]
        assert float(torch.cat([d.flatten() for d in diff]).norm()) > 1e-6, msg
        for n, v in lib_theta(model, labeler).items():
            torch.testing.assert_close(v, ref["theta"][n], **TOL, msg=f"{msg}: theta {n}")
        # BatchNorm statistics move once, on the training batch only
        for n, v in lib_bn(model).items():
            torch.testing.assert_close(v, ref["bn"][n], **TOL, msg=f"{msg}: BN {n}")
        assert not torch.equal(lib_bn(model)["running_mean"], bn_before["running_mean"])


def test_meta_batch_errors():
    _, _, labeler, batches = build("second_order", 0)
    opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1)
    gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=GEN_LR)
    x, y = batches[0]
    with pytest.raises(TypeError, match="meta_batch must be a pair"):
        labeler.step(x, y, opt, gen_opt, meta_batch=x)
    with pytest.raises(ValueError, match="meta_batch: y must lie in"):
        labeler.step(x, y, opt, gen_opt, meta_batch=(x, y + 5))
    with pytest.raises(ValueError, match="meta_batch: x_m must have the per-sample shape"):
        labeler.step(x, y, opt, gen_opt, meta_batch=(x[:, :4], y))
    with pytest.raises(ValueError, match="meta_batch: x and y must have the same batch size"):
        labeler.step(x, y, opt, gen_opt, meta_batch=(x, y[:3]))
