"""A task's loss weight learned by the meta-gradient (``LearnedWeight``,
``auxgen/tasks/weighting.py``): its gradient equals an independent double backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ROT_K, ROT_N, rot, rot_batch, rot_hand_loss, rot_model, rot_params

from auxgen import AuxiliaryLabeler, LearnedWeight, TransformLabels

N, K = ROT_N, ROT_K  # the hand-written rotation task's sizes (helpers.py)


def test_learned_weight_meta_gradient_equals_double_backward() -> None:
    task = LearnedWeight(TransformLabels(form="both", weight=0.5))
    lab = AuxiliaryLabeler(rot_model(), tasks=task).double()
    x, y = rot_batch(3)
    p = rot_params(lab)
    s = torch.tensor(0.5, dtype=torch.float64).log().requires_grad_(True)
    views = torch.cat([rot(x, k) for k in range(K)])
    ks = torch.arange(K).repeat_interleave(N)
    _, primary, aux = rot_hand_loss(p, x, y, views, ks, "both", 1.0)
    theta = [p["1.weight"], p["1.bias"], p["3.weight"], p["3.bias"]]
    grads = torch.autograd.grad(primary + s.exp() * aux, theta, create_graph=True)
    lr = 0.3
    w1, b1, w3, b3 = (q - lr * g for q, g in zip(theta, grads))
    lp_plus = F.cross_entropy(torch.tanh(x.flatten(1) @ w1.T + b1) @ w3.T + b3, y)
    (want,) = torch.autograd.grad(lp_plus, s)
    opt = torch.optim.SGD(lab.model_parameters(), lr=lr)
    out = lab.step(x, y, opt, torch.optim.SGD(lab.generator_parameters(), lr=1.0))
    assert out["meta_updated"]
    torch.testing.assert_close(out["meta_loss"], lp_plus.detach())
    s_learned = task.loss_weight.log_weight
    torch.testing.assert_close(s_learned.grad, want.to(s_learned.dtype))
    assert task.weight == pytest.approx(float((s - want).exp().detach()))
