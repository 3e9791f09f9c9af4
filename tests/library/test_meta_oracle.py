"""Independent oracle for ``AuxiliaryLabeler.step`` (MAXL, exact second-order meta-gradient).

Everything the library computes is recomputed here from scratch with explicit parameter
tensors: a hand-written functional forward of the model (batch-statistics BatchNorm), a
hand-written masked softmax and losses, hand-written optimiser formulas with their own
state (momentum buffers, Adam moments, step count) and plain autograd double backward.
Consecutive steps are compared so that the optimiser state matters (seven for RAdam, whose
rectified update starts at step 6).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import maxl_labeler
from torch import nn

PSI = [2, 3, 4]
OWNER = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2])
AUX_W, ENT_W, GEN_LR = 0.7, 0.3, 0.05
BN_EPS, BN_MOM = 1e-5, 0.1
B1, B2, ADAM_EPS = 0.9, 0.999, 1e-8
TOL = dict(rtol=1e-6, atol=1e-9)

# name -> (torch optimiser, oracle kind, hyper-parameters, zero the first input feature)
CASES = {
    "adam_amsgrad": (torch.optim.Adam, "adam", dict(lr=1e-2, weight_decay=1e-3, amsgrad=True), 0),
    "rmsprop": (torch.optim.RMSprop, "rmsprop", dict(lr=1e-2, weight_decay=1e-3), 0),
    "rmsprop_centered_momentum": (
        torch.optim.RMSprop,
        "rmsprop",
        dict(lr=1e-2, alpha=0.9, centered=True, momentum=0.9),
        1,
    ),
    "adagrad": (
        torch.optim.Adagrad,
        "adagrad",
        dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.1, weight_decay=1e-3),
        0,
    ),
    "adagrad_zero_grad": (torch.optim.Adagrad, "adagrad", dict(lr=0.1), 1),
    "nadam": (torch.optim.NAdam, "nadam", dict(lr=1e-2, weight_decay=1e-3), 0),
    "nadam_decoupled": (
        torch.optim.NAdam,
        "nadam",
        dict(lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True, momentum_decay=0.05),
        1,
    ),
    "radam": (torch.optim.RAdam, "radam", dict(lr=1e-2, weight_decay=1e-3), 0),
    "radam_decoupled": (
        torch.optim.RAdam,
        "radam",
        dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-2, decoupled_weight_decay=True),
        1,
    ),
    "adamax": (torch.optim.Adamax, "adamax", dict(lr=1e-2, weight_decay=1e-3), 0),
    "adamax_zero_grad": (torch.optim.Adamax, "adamax", dict(lr=1e-2, betas=(0.5, 0.9)), 1),
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


def rmsprop(hp, p, g, st):
    """RMSprop (Hinton), centered (Graves 2013) and with momentum, as torch.optim defines it."""
    lr, alpha, eps, mom = (
        hp["lr"],
        hp.get("alpha", 0.99),
        hp.get("eps", 1e-8),
        hp.get("momentum", 0),
    )
    g = g + hp.get("weight_decay", 0.0) * p
    st = st or {"v": torch.zeros_like(p), "gbar": torch.zeros_like(p), "buf": torch.zeros_like(p)}
    v = alpha * st["v"] + (1 - alpha) * g * g
    gbar = alpha * st["gbar"] + (1 - alpha) * g
    denom = safe_sqrt(v - gbar * gbar if hp.get("centered") else v) + eps
    buf = mom * st["buf"] + g / denom
    return p - lr * (buf if mom > 0 else g / denom), {"v": v, "gbar": gbar, "buf": buf}


def adagrad(hp, p, g, st):
    """Adagrad (Duchi et al. 2011) with torch.optim's lr_decay and initial accumulator."""
    k = 1 if st is None else st["step"] + 1
    g = g + hp.get("weight_decay", 0.0) * p
    s0 = torch.full_like(p, hp.get("initial_accumulator_value", 0.0)) if st is None else st["s"]
    s = s0 + g * g
    clr = hp["lr"] / (1 + (k - 1) * hp.get("lr_decay", 0.0))
    return p - clr * g / (safe_sqrt(s) + hp.get("eps", 1e-10)), {"step": k, "s": s}


def _moments(hp, p, g, st):
    b1, b2 = hp.get("betas", (B1, B2))
    k = 1 if st is None else st["step"] + 1
    m0 = torch.zeros_like(p) if st is None else st["m"]
    v0 = torch.zeros_like(p) if st is None else st["v"]
    return b1, b2, k, b1 * m0 + (1 - b1) * g, b2 * v0 + (1 - b2) * g * g


def _decay(hp, p, g):
    lr, wd = hp["lr"], hp.get("weight_decay", 0.0)
    return (p * (1 - lr * wd), g) if hp.get("decoupled_weight_decay") else (p, g + wd * p)


def nadam(hp, p, g, st):
    """NAdam (Dozat 2016) with the momentum-decay schedule mu_t = b1 (1 - 0.96^(t psi) / 2)."""
    lr, eps, psi = hp["lr"], hp.get("eps", 1e-8), hp.get("momentum_decay", 4e-3)
    p, g = _decay(hp, p, g)
    b1, b2, k, m, v = _moments(hp, p, g, st)
    mu_t = b1 * (1 - 0.5 * 0.96 ** (k * psi))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((k + 1) * psi))
    prod = (1.0 if st is None else st["prod"]) * mu_t
    denom = safe_sqrt(v / (1 - b2**k)) + eps
    new = (
        p
        - lr * (1 - mu_t) / (1 - prod) * g / denom
        - lr * mu_next / (1 - prod * mu_next) * m / denom
    )
    return new, {"step": k, "m": m, "v": v, "prod": prod}


def radam(hp, p, g, st):
    """RAdam (Liu et al. 2020): Adam with the variance rectification once rho_t > 5."""
    lr, eps = hp["lr"], hp.get("eps", 1e-8)
    p, g = _decay(hp, p, g)
    b1, b2, k, m, v = _moments(hp, p, g, st)
    mhat = m / (1 - b1**k)
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * k * b2**k / (1 - b2**k)
    if rho > 5:
        r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
        new = p - lr * mhat * r * math.sqrt(1 - b2**k) / (safe_sqrt(v) + eps)
    else:
        new = p - lr * mhat
    return new, {"step": k, "m": m, "v": v}


def adamax(hp, p, g, st):
    """Adamax (Kingma & Ba 2015, section 7): the infinity-norm variant of Adam."""
    b1, b2 = hp.get("betas", (B1, B2))
    k = 1 if st is None else st["step"] + 1
    g = g + hp.get("weight_decay", 0.0) * p
    m = b1 * (torch.zeros_like(p) if st is None else st["m"]) + (1 - b1) * g
    u0 = torch.zeros_like(p) if st is None else st["u"]
    u = torch.maximum(b2 * u0, g.abs() + hp.get("eps", 1e-8))
    return p - hp["lr"] / (1 - b1**k) * m / u, {"step": k, "m": m, "u": u}


FORMULAS = {"rmsprop": rmsprop, "adagrad": adagrad, "nadam": nadam, "radam": radam}
FORMULAS["adamax"] = adamax


class OracleOpt:
    """torch.optim update formulas written out, with their own state."""

    def __init__(self, kind, hp):
        self.kind, self.hp, self.state = kind, dict(hp), {}

    def update(self, theta, grads, commit):
        lr, wd = self.hp["lr"], self.hp.get("weight_decay", 0.0)
        out = {}
        for n, p in theta.items():
            g, st = grads[n], self.state.get(n)
            if self.kind in FORMULAS:
                out[n], new_st = FORMULAS[self.kind](self.hp, p, g, st)
            elif self.kind == "sgd":
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
                vmax = v
                if self.hp.get("amsgrad"):
                    vmax = torch.maximum(v, torch.zeros_like(p) if st is None else st["vmax"])
                mhat, vhat = m / (1 - B1**k), vmax / (1 - B2**k)
                out[n] = base - lr * mhat / (safe_sqrt(vhat) + ADAM_EPS)
                new_st = {"step": k, "m": m, "v": v, "vmax": vmax}
            if commit:
                self.state[n] = {
                    k_: v_.detach() if torch.is_tensor(v_) else v_ for k_, v_ in new_st.items()
                }
        return out


def oracle_step(theta, phi, bn, opt, x, y, meta=None, temperature=1.0, confidence=0.0):
    """One MAXL step; ``meta=(x_m, y_m)`` measures the meta loss on another batch;
    ``temperature`` divides the generator's logits; ``confidence`` weighs the mean
    per-image label entropy."""
    x_m, y_m = meta if meta is not None else (x, y)
    th = {n: v.detach().clone().requires_grad_(True) for n, v in theta.items()}
    ph = {n: v.detach().clone().requires_grad_(True) for n, v in phi.items()}
    t = masked_softmax(gen_logits(ph, x) / temperature, y)
    h, mean, var = features(th, x)
    zp = F.linear(h, th["3.weight"], th["3.bias"])
    za = F.linear(h, th["aux.weight"], th["aux.bias"])
    lp = primary_ce(zp, y)
    la = -(t * F.log_softmax(za, dim=1)).sum(1).mean()
    lmt = lp + AUX_W * la
    # the paper's gradient-similarity analysis: both losses' gradients on the parameters
    # they share (the backbone: first Linear and BatchNorm), each from its own backward
    shared = [th[n] for n in ("0.weight", "0.bias", "1.weight", "1.bias")]
    grad_cosine = cosine(
        torch.autograd.grad(lp, shared, retain_graph=True),
        torch.autograd.grad(la, shared, retain_graph=True),
    )
    names = list(th)
    grads = torch.autograd.grad(lmt, [th[n] for n in names], create_graph=True)
    G = dict(zip(names, grads))
    plus = opt.update(th, G, commit=False)  # look-ahead with the current optimiser state
    hp, _, _ = features(plus, x_m)
    pbar = t.mean(0)
    # t is exactly 0 outside each image's children: log(t + (t == 0)) keeps 0 log 0 = 0
    per_image_entropy = -(t * torch.log(t + (t == 0).to(t.dtype))).sum(1)
    lmeta = (
        primary_ce(F.linear(hp, plus["3.weight"], plus["3.bias"]), y_m)
        + ENT_W * (pbar * pbar.log()).sum()
        + confidence * per_image_entropy.mean()
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
        grad_cosine=grad_cosine,
    )


# ----------------------------------------------------------------------------- helpers
def build(meta, zero_col, steps=2, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    gen = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 9)).double()
    labeler = maxl_labeler(
        model,
        PSI,
        generator=gen,
        loss="ce",
        aux_weight=AUX_W,
        entropy_weight=ENT_W,
        meta=meta,
        **options,
    )
    batches = []
    for _ in range(steps):
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
def train_once(labeler, x, y, opt, gen_opt, path):
    """One training step: ``labeler.step``, or the loss form in the user's own loop."""
    if path == "step":
        return labeler.step(x, y, opt, gen_opt)
    opt.zero_grad()
    out = labeler(x, y)
    out["loss"].backward()
    meta = labeler.meta_step(opt, gen_opt)
    opt.step()
    return {**out, **meta}


@pytest.mark.parametrize("path", ["step", "loss_form"])
@pytest.mark.parametrize("case", list(CASES))
def test_second_order_step_matches_oracle(case, path):
    opt_cls, kind, hp, zero_col = CASES[case]
    model, gen, labeler, batches = build("second_order", zero_col, 7 if kind == "radam" else 2)
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
        out = train_once(labeler, x, y, opt, gen_opt, path)
        msg = f"{case} step {step} ({path})"
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


# option of AuxiliaryLabeler -> (its value, the oracle_step keyword that models it)
LABEL_OPTIONS = {
    # sharpened labels (logits / T)
    "label_temperature": (0.3, "temperature"),
    # the per-image label entropy term in the generator's objective
    "confidence_weight": (0.5, "confidence"),
}


@pytest.mark.parametrize("option", list(LABEL_OPTIONS))
@pytest.mark.parametrize("case", ["sgd_momentum", "adam"])
def test_label_option_matches_oracle(case, option):
    """Each option: the generated labels, the exact meta-gradient and losses of the oracle's
    objective, which differs from the paper's (T = 1, no confidence term), and the real
    update unchanged."""
    opt_cls, kind, hp, zero_col = CASES[case]
    value, oracle_kw = LABEL_OPTIONS[option]
    model, gen, labeler, batches = build("second_order", zero_col, **{option: value})
    opt = opt_cls(labeler.model_parameters(), **hp)
    gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=GEN_LR)
    oracle = OracleOpt(kind, hp)
    temperature = value if option == "label_temperature" else 1.0
    for step, (x, y) in enumerate(batches):
        theta, bn = lib_theta(model, labeler), lib_bn(model)
        phi = {n: p.detach().clone() for n, p in gen.named_parameters()}
        ref = oracle_step(theta, phi, bn, oracle, x, y, **{oracle_kw: value})
        plain = oracle_step(theta, phi, bn, OracleOpt(kind, hp), x, y)
        want_t = masked_softmax(gen_logits(phi, x) / temperature, y)
        torch.testing.assert_close(labeler.generate_labels(x, y), want_t, **TOL)
        out = labeler.step(x, y, opt, gen_opt)
        msg = f"{case}/{option} step {step}"
        for gi, wi in zip([p.grad for p in gen.parameters()], ref["meta_grad"].values()):
            assert torch.isfinite(gi).all(), msg
            torch.testing.assert_close(gi, wi, **TOL, msg=msg)
        torch.testing.assert_close(out["meta_loss"], ref["losses"]["meta_loss"], **TOL)
        torch.testing.assert_close(out["aux_loss"], ref["losses"]["aux_loss"], **TOL)
        diff = [w - p for w, p in zip(ref["meta_grad"].values(), plain["meta_grad"].values())]
        assert float(torch.cat([d.flatten() for d in diff]).norm()) > 1e-6, msg
        if option == "confidence_weight":  # the entropy penalty only adds to the meta loss
            assert float(ref["losses"]["meta_loss"] - plain["losses"]["meta_loss"]) > 0, msg
        for n, v in lib_theta(model, labeler).items():
            torch.testing.assert_close(v, ref["theta"][n], **TOL, msg=f"{msg}: theta {n}")


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


@pytest.mark.parametrize("case", ["sgd_momentum", "adam"])
def test_grad_cosine_diagnostic_matches_oracle_and_leaves_the_step_unchanged(case):
    opt_cls, kind, hp, zero_col = CASES[case]
    model, gen, labeler, batches = build("second_order", zero_col, 3, diagnostics=True)
    opt = opt_cls(labeler.model_parameters(), **hp)
    gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=GEN_LR)
    oracle = OracleOpt(kind, hp)
    theta, bn = lib_theta(model, labeler), lib_bn(model)
    phi = {n: p.detach().clone() for n, p in gen.named_parameters()}
    cosines = []
    for step, (x, y) in enumerate(batches):
        ref = oracle_step(theta, phi, bn, oracle, x, y)
        out = labeler.step(x, y, opt, gen_opt)
        got = float(out["grad_cosine"])
        assert got == pytest.approx(ref["grad_cosine"], rel=1e-9, abs=1e-12), f"step {step}"
        cosines.append(got)
        for n, p in gen.named_parameters():
            torch.testing.assert_close(p.detach(), ref["phi"][n], **TOL, msg=f"phi {n}")
        for n, v in lib_theta(model, labeler).items():
            torch.testing.assert_close(v, ref["theta"][n], **TOL, msg=f"theta {n}")
        theta, phi, bn = ref["theta"], ref["phi"], ref["bn"]
    assert len(set(cosines)) == 3 and all(-1 <= c <= 1 for c in cosines)


def test_grad_cosine_costs_one_backward_when_enabled_and_none_when_disabled(monkeypatch):
    calls = []
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(1)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    counts = {}
    for diagnostics in (False, True):
        model, gen, labeler, (b1, b2) = build("second_order", 0, diagnostics=diagnostics)
        opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1, momentum=0.9)
        gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=GEN_LR)
        calls.clear()
        out = labeler.step(*b1, opt)  # no meta step: only the multi-task backward
        counts[diagnostics, "plain"] = len(calls)
        assert ("grad_cosine" in out) is diagnostics
        calls.clear()
        labeler.step(*b2, opt, gen_opt)
        counts[diagnostics, "meta"] = len(calls)
    assert counts[False, "plain"] == 1 and counts[True, "plain"] == 2
    assert counts[True, "meta"] == counts[False, "meta"] + 1
