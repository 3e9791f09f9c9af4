"""``benchmarks/meta_signal.py``: the label gradient of MAXL's meta loss and its statistics.

The label gradient is checked against central finite differences of the meta loss it
computes, and against the library's own meta-gradient (itself checked against a hand-written
oracle in ``test_meta_oracle.py``): pushed through the generator, it must give the
generator gradient that ``AuxiliaryLabeler.step`` applies.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, mlp

from auxgen import AuxiliaryLabeler, GeneratedLabels
from auxgen.hierarchy import masked_log_softmax

sys.path.insert(0, str(ROOT / "benchmarks"))
from meta_signal import (  # noqa: E402
    fork_table,
    label_gradient,
    signal_stats,
    signal_table,
    summarize,
)

PSI = (2, 3, 2)


def _labeler(seed: int = 0) -> AuxiliaryLabeler:
    torch.manual_seed(seed)
    lab = AuxiliaryLabeler(
        mlp(6, 8, 3, bn=True), tasks=GeneratedLabels(PSI, generator="head", entropy_weight=0.0)
    )
    return lab.double()


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.arange(n) % 3


def _soft_labels(y: torch.Tensor, owner: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(y.numel(), owner.numel(), generator=g, dtype=torch.float64)
    return masked_log_softmax(logits, y, owner).exp()


def _warm(lab: AuxiliaryLabeler, opt: torch.optim.Optimizer) -> None:
    """One real step, so that SGD has momentum buffers (part of the look-ahead)."""
    x, y = _batch(9, 99)
    lab.step(x, y, opt, None, aux_target=_soft_labels(y, lab.owner, 98))


def test_label_gradient_matches_finite_differences() -> None:
    lab = _labeler()
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.3, momentum=0.9, weight_decay=1e-2)
    _warm(lab, opt)
    x, y = _batch(6, 1)
    x_m, y_m = _batch(5, 2)
    t = _soft_labels(y, lab.owner, 3)
    g, meta, z_a = label_gradient(lab, opt, x, y, t, x_m, y_m)
    assert g.shape == t.shape == z_a.shape and g.dtype == torch.float64
    eps = 1e-6
    fd = torch.zeros_like(t)
    for i in range(t.shape[0]):
        for k in range(t.shape[1]):
            d = torch.zeros_like(t)
            d[i, k] = eps
            up = label_gradient(lab, opt, x, y, t + d, x_m, y_m)[1]
            down = label_gradient(lab, opt, x, y, t - d, x_m, y_m)[1]
            fd[i, k] = (up - down) / (2 * eps)
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-9)
    assert float(g.abs().max()) > 1e-4  # the labels do move the meta loss
    # the meta loss is the primary loss on the meta batch after the step, not before it
    with torch.no_grad():
        lab.train()
        before = F.cross_entropy(lab(x_m), y_m)
    assert abs(float(meta) - float(before)) > 1e-4


def test_label_gradient_is_the_library_meta_gradient() -> None:
    """Pushed through the generator, ``g`` is the gradient ``step`` gives the generator."""
    lab = _labeler(1)
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
    _warm(lab, opt)
    gen_opt = torch.optim.SGD(lab.generator_parameters(), lr=0.1)
    for seed in range(3):
        x, y = _batch(8, 10 + seed)
        buffers = {k: b.clone() for k, b in lab.named_buffers()}
        t = masked_log_softmax(lab.tasks[0].logits(x, lab.features(x)[1]), y, lab.owner).exp()
        with torch.no_grad():  # undo that forward's BatchNorm update
            for k, b in lab.named_buffers():
                b.copy_(buffers[k])
        g, _, _ = label_gradient(lab, opt, x, y, t, x, y)
        want = torch.autograd.grad(t, lab.generator_parameters(), grad_outputs=g)
        lab.step(x, y, opt, gen_opt)
        for p, w in zip(lab.generator_parameters(), want):
            torch.testing.assert_close(p.grad, w, rtol=1e-7, atol=1e-12)


def test_label_gradient_leaves_parameters_buffers_and_state_alone() -> None:
    lab = _labeler(2)
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1, momentum=0.9)
    _warm(lab, opt)
    before = {k: v.clone() for k, v in lab.state_dict().items() if torch.is_tensor(v)}
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in lab.model_parameters()]
    x, y = _batch(6, 4)
    label_gradient(lab, opt, x, y, _soft_labels(y, lab.owner, 5), x, y)
    after = {k: v for k, v in lab.state_dict().items() if torch.is_tensor(v)}
    assert after.keys() == before.keys() and any("running_mean" in k for k in after)
    for k, v in after.items():
        assert torch.equal(v, before[k]), k
    for p, b in zip(lab.model_parameters(), bufs):
        assert torch.equal(opt.state[p]["momentum_buffer"], b)


def test_label_gradient_refuses_other_optimisers() -> None:
    lab = _labeler()
    x, y = _batch(6, 4)
    t = _soft_labels(y, lab.owner, 5)
    with pytest.raises(TypeError, match="optimizer must be torch.optim.SGD, got Adam"):
        label_gradient(lab, torch.optim.Adam(lab.model_parameters()), x, y, t, x, y)
    nesterov = torch.optim.SGD(lab.model_parameters(), lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="Nesterov"):
        label_gradient(lab, nesterov, x, y, t, x, y)


def test_signal_stats_agreement_and_cosines() -> None:
    owner = torch.tensor([0, 0, 1, 1, 1])  # psi = (2, 3)
    y = torch.tensor([0, 1, 1, 0])
    fine = torch.tensor([1, 2, 4, 0])
    centre = (owner[None, :] == y[:, None]).double()
    centre = centre / centre.sum(1, keepdim=True)
    human = F.one_hot(fine, 5).double() - centre
    gen = torch.Generator().manual_seed(0)
    # -g along the human direction (plus a constant per row, which the tangent removes)
    st = signal_stats(-human + 7.0, y, fine, owner, gen)
    assert st["agree"] == 4 and st["n"] == 4
    assert st["chance"] == pytest.approx(1 / 2 + 1 / 3 + 1 / 3 + 1 / 2)
    assert st["cos_human"] == pytest.approx(1.0)
    # the opposite direction: the fine child is the least favoured
    st = signal_stats(human, y, fine, owner, gen)
    assert st["agree"] == 0 and st["cos_human"] == pytest.approx(-1.0)
    # entries outside the children never count, however small
    g = (-human).clone()
    g[0, 4] = -100.0
    assert signal_stats(g, y, fine, owner, gen)["agree"] == 4
    # the head's prediction among the children: rows 0, 1, 3 predict the fine child
    logits = torch.zeros(4, 5, dtype=torch.float64)
    logits[0, 1] = logits[1, 2] = logits[2, 3] = logits[3, 0] = 1.0
    logits[3, 2] = 50.0  # not a child of class 0: ignored
    st = signal_stats(-human, y, fine, owner, gen, logits)
    assert st["head_fine"] == 3 and st["agree_head"] == 3
    assert "agree_head" not in signal_stats(-human, y, fine, owner, gen)


def _probe(epoch: int, agree: float, cos: float) -> dict:
    src = {"agree": agree, "chance": 0.1, "cos_human": cos, "cos_random": 0.0,
           "agree_head": 0.5, "head_fine": 0.2}  # fmt: skip
    return {"epoch": epoch, "same": src, "next": src, "val": src}


def test_summary_table_and_fork_table() -> None:
    records = [
        {"method": "maxl-copy", "seed": s, "final_test_accuracy": 0.5 + s / 100,
         "probes": [_probe(0, 0.1 + s / 100, 0.01 * s)],
         "forks": [{"epoch": 1, "steps": [1, 10],
                    "human": {"val_loss": [2.0, 1.5 - s / 10]},
                    "uniform": {"val_loss": [2.0, 1.6]},
                    "random": {"val_loss": [2.0, 1.7]}}]}
        for s in (0, 1)
    ]  # fmt: skip
    summary = summarize(records)
    row = summary["maxl-copy"]["probes"][0]
    assert summary["maxl-copy"]["seeds"] == [0, 1]
    assert row["same_agree"] == pytest.approx(0.105)
    assert row["same_agree_std"] == pytest.approx(0.01 / 2**0.5)
    lines = signal_table(summary).splitlines()
    assert len(lines) == 2 + 3  # header, rule, one row per meta source
    assert lines[2].startswith("| maxl-copy | 0 | same | 10.5 ± 0.7 | 50.0 ± 0.0 | 10.0 | ")
    assert lines[2].endswith("| +0.005 ± 0.007 | +0.000 ± 0.000 |")
    forks = fork_table(records).splitlines()
    # human − uniform after 10 steps: -0.1 and -0.2 -> -0.15 ± 0.0707
    assert forks[2] == "| 1 | human − uniform | +0.0000 ± 0.0000 | -0.1500 ± 0.0707 |"
    assert forks[3] == "| 1 | random − uniform | +0.0000 ± 0.0000 | +0.1000 ± 0.0000 |"
    assert fork_table([{**records[0], "forks": []}]) == ""


def test_regime_config_is_what_lowdata_runs() -> None:
    from meta_signal import regime_config

    cfg = regime_config("cifar10cnn5", "maxl-copy-next", 3, "somewhere")
    assert (cfg.dataset, cfg.primary_level, cfg.backbone, cfg.width) == ("cifar100", 10, "cnn", 32)
    assert (cfg.method, cfg.generator, cfg.meta_source) == ("maxl", "copy", "next")
    assert (cfg.epochs, cfg.lr, cfg.schedule, cfg.batch_size) == (30, 0.05, "onecycle", 64)
    assert (cfg.train_subset, cfg.val_fraction, cfg.seed) == (0.05, 0.2, 3)
    assert cfg.data_dir == "somewhere" and cfg.out_dir is None and not cfg.checkpoint
    human = regime_config("mnist5", "human", 0, "d")
    assert (human.dataset, human.method, human.backbone) == ("mnist", "human", "mlp")
    # `--psi 5` is the int 5, as `auxgen run` passes it, not the list [5]
    assert regime_config("cifar100fine5", "maxl-copy", 0, "d").psi == 5
