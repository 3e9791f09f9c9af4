"""``GeneratedCellLabels``: targets, losses and the meta-gradient against a hand computation
(an independent double backward); fixed labels, checkpoints and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auxgen import AuxiliaryLabeler, GeneratedCellLabels, TransformLabels
from auxgen.hierarchy import masked_softmax
from auxgen.losses import neg_entropy

N, C, K, PSI = 6, 3, 4, 2
A = C * PSI  # sum(psi)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 5), nn.Tanh(), nn.Linear(5, C)).double()


def _generator() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, A)).double()


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 3, 4, 4, generator=g, dtype=torch.float64), torch.arange(N) % C


def _views(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(K)])


def _hand_cells(labels: torch.Tensor) -> torch.Tensor:
    """Targets written out with a loop: image i under rotation k -> block k of row k*N+i."""
    rows = []
    for k in range(K):
        for i in range(N):
            row = torch.zeros(K * A, dtype=labels.dtype)
            row[k * A : (k + 1) * A] = labels[i]
            rows.append(row)
    return torch.stack(rows)


def test_targets_and_loss_equal_a_hand_computation() -> None:
    gen = _generator()
    task = GeneratedCellLabels([PSI] * C, generator=gen, weight=0.7)
    lab = AuxiliaryLabeler(_model(), tasks=task).double()
    assert lab.aux_head.out_features == K * A == task.num_outputs
    x, y = _batch()
    labels = masked_softmax(gen(x), y, task.owner).detach()
    torch.testing.assert_close(lab.generate_labels(x, y), labels)
    want_t = _hand_cells(labels)
    plan = task.plan(x, y, None)
    torch.testing.assert_close(plan.views, _views(x)[N:])  # the identity view is the batch
    torch.testing.assert_close(task.targets(plan, x, y, None), want_t)
    # the cell of each row: class y_i under rotation k owns columns k*A + [y_i*PSI, +PSI)
    cell = want_t.view(K * N, K, C, PSI).sum(3).flatten(1).argmax(1)
    ks = torch.arange(K).repeat_interleave(N)
    assert torch.equal(cell, ks * C + y.repeat(K))

    p = {k: v.detach().clone() for k, v in lab.model.named_parameters()}
    head = lab.aux_head
    h_views = torch.tanh(_views(x).flatten(1) @ p["1.weight"].T + p["1.bias"])
    z_p = torch.tanh(x.flatten(1) @ p["1.weight"].T + p["1.bias"]) @ p["3.weight"].T + p["3.bias"]
    ell = -F.log_softmax(h_views @ head.weight.detach().T + head.bias.detach(), 1)
    aux = (want_t * ell).sum(1).mean()
    primary = F.cross_entropy(z_p, y)
    out = lab.step(x, y, torch.optim.SGD(lab.model_parameters(), lr=0.1))  # no gen_optimizer
    torch.testing.assert_close(out["task_losses"]["maxl-cells"], aux)
    torch.testing.assert_close(out["loss"], primary + 0.7 * aux)
    assert not out["meta_updated"]


def test_meta_gradient_beside_rotation_prediction_equals_double_backward() -> None:
    gen = _generator()
    cells = GeneratedCellLabels([PSI] * C, generator=gen, entropy_weight=0.3, weight=0.8)
    predict = TransformLabels(form="predict", weight=0.6)
    lab = AuxiliaryLabeler(_model(), tasks=[predict, cells]).double()
    x, y = _batch(2)
    theta = [q.detach().clone().requires_grad_(True) for q in lab.model.parameters()]
    w1, b1, w3, b3 = theta
    heads = [(m.weight.detach(), m.bias.detach()) for m in lab.aux_heads]
    phi = [q.detach().clone().requires_grad_(True) for q in gen.parameters()]
    labels = masked_softmax(x.flatten(1) @ phi[0].T + phi[1], y, cells.owner)
    t = _hand_cells(labels)

    def hidden(inputs: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.tanh(inputs.flatten(1) @ w.T + b)

    h_views = hidden(_views(x), w1, b1)
    primary = F.cross_entropy(hidden(x, w1, b1) @ w3.T + b3, y)
    ks = torch.arange(K).repeat_interleave(N)
    rot = F.cross_entropy(h_views @ heads[0][0].T + heads[0][1], ks)
    ell = -F.log_softmax(h_views @ heads[1][0].T + heads[1][1], 1)
    loss = primary + 0.6 * rot + 0.8 * (t * ell).sum(1).mean()
    grads = torch.autograd.grad(loss, theta, create_graph=True)
    lr = 0.2
    w1p, b1p, w3p, b3p = (q - lr * g for q, g in zip(theta, grads))
    lp_plus = F.cross_entropy(hidden(x, w1p, b1p) @ w3p.T + b3p, y)
    meta = lp_plus + 0.3 * neg_entropy(labels)
    want = torch.autograd.grad(meta, phi)
    assert lab.generator_parameters() == list(gen.parameters())
    opt = torch.optim.SGD(lab.model_parameters(), lr=lr)
    out = lab.step(x, y, opt, torch.optim.SGD(lab.generator_parameters(), lr=1.0))
    assert out["meta_updated"] and set(out["task_losses"]) == {"transform", "maxl-cells"}
    torch.testing.assert_close(out["meta_loss"], meta.detach())
    for got, exp in zip(gen.parameters(), want):
        torch.testing.assert_close(got.grad, exp)


def test_fixed_labels_fill_the_cells_and_leave_the_generator_alone() -> None:
    gen = _generator()
    task = GeneratedCellLabels([PSI] * C, generator=gen)
    lab = AuxiliaryLabeler(_model(), tasks=task).double()
    x, y = _batch(1)
    aux = y * PSI + torch.tensor([0, 1, 1, 0, 0, 1])
    plan = task.plan(x, y, aux)
    torch.testing.assert_close(plan.targets, _hand_cells(F.one_hot(aux, A).float()))
    before = [q.detach().clone() for q in gen.parameters()]
    gen_opt = torch.optim.SGD(lab.generator_parameters(), lr=1.0)
    out = lab.step(x, y, torch.optim.SGD(lab.model_parameters(), lr=0.1), gen_opt, aux_target=aux)
    assert not out["meta_updated"]
    assert all(torch.equal(a, b) for a, b in zip(before, gen.parameters()))
    with pytest.raises(ValueError, match=r"owned by each sample's primary class"):
        task.plan(x, y, (aux + PSI) % A)


def test_head_generator_state_dict_round_trip() -> None:
    def build(seed: int) -> AuxiliaryLabeler:
        torch.manual_seed(seed)
        task = GeneratedCellLabels(PSI, names=["a", "b"], transforms=[None, torch.neg])
        return AuxiliaryLabeler(_model(), tasks=task).double()

    lab = build(0)
    assert lab.aux_head.out_features == 2 * A and lab.tasks[0].names == ["a", "b"]
    x, y = _batch()
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    out = lab.step(x, y, opt, torch.optim.SGD(lab.generator_parameters(), lr=0.1))
    assert out["meta_updated"]
    state = lab.state_dict()
    assert {"tasks.0.owner", "tasks.0.generator.0.weight", "tasks.0.head.weight"} <= set(state)
    other = build(1)
    other.load_state_dict(state)
    torch.testing.assert_close(other.generate_labels(x, y), lab.generate_labels(x, y))


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"at least 2 transforms \(K >= 2\), got 1"):
        GeneratedCellLabels(2, [None])
    with pytest.raises(ValueError, match="psi must be a positive int"):
        GeneratedCellLabels(0)
    with pytest.raises(ValueError, match="generator must be one of"):
        GeneratedCellLabels(2, generator="mlp")

    def transpose(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(-2, -1)

    lab = AuxiliaryLabeler(
        nn.Sequential(nn.Flatten(), nn.Linear(72, 5), nn.Tanh(), nn.Linear(5, C)),
        tasks=GeneratedCellLabels(PSI, [None, transpose]),
    )
    with pytest.raises(ValueError, match=r"transforms\[1\] \('transpose'\) returned shape"):
        lab.step(torch.randn(N, 3, 4, 6), torch.arange(N) % C,
                 torch.optim.SGD(lab.model_parameters(), lr=0.1))  # fmt: skip
    # the default rotations turn a square patch of a non-square image: it trains
    lab = AuxiliaryLabeler(
        nn.Sequential(nn.Flatten(), nn.Linear(72, 5), nn.Tanh(), nn.Linear(5, C)),
        tasks=GeneratedCellLabels(PSI),
    )
    out = lab.step(torch.randn(N, 3, 4, 6), torch.arange(N) % C,
                   torch.optim.SGD(lab.model_parameters(), lr=0.1))  # fmt: skip
    assert torch.isfinite(out["loss"])
