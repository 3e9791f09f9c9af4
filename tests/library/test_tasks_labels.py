"""Hierarchical auxiliary labels (``auxgen/tasks/labels.py``): ``GeneratedLabels``' generators
(``copy``, ``head``, a module) and their gradients, labels given at the step (``aux_target``),
and the checks of the label options.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TinyConvNet, batch, mlp, sgd_opts
from torch import nn

from auxgen import AuxiliaryLabeler, GeneratedLabels


@pytest.mark.parametrize("generator", ["copy", "head", "module"])
def test_every_generator_parameter_gets_a_gradient(generator):
    model = TinyConvNet(num_classes=3, width=6)
    gen = (
        nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 9)) if generator == "module" else generator
    )
    lab = AuxiliaryLabeler(model, tasks=GeneratedLabels([2, 3, 4], generator=gen))
    if generator == "copy":
        # an independently initialised copy of the architecture with a sum(psi)-way head
        assert isinstance(lab.generator, TinyConvNet) and lab.generator.head.out_features == 9
        assert not torch.equal(lab.generator.features[0].weight, model.features[0].weight)
    opt, gen_opt = sgd_opts(lab)
    before = [p.clone() for p in lab.generator_parameters()]
    x, y = torch.randn(9, 3, 8, 8), torch.arange(9) % 3
    lab.step(x, y, opt, gen_opt)
    for p, _b in zip(lab.generator_parameters(), before):
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0
    assert any(not torch.equal(p, b) for p, b in zip(lab.generator_parameters(), before))


def test_default_generator_is_the_head():
    lab = AuxiliaryLabeler(TinyConvNet(num_classes=3), psi=[2, 3, 1])
    assert lab.tasks[0].generator_kind == "head"
    assert lab.generator[0].in_features == 4 and lab.generator[-1].out_features == 6


def test_aux_target_disables_meta_and_keeps_generator():
    lab = AuxiliaryLabeler(mlp(), psi=[2, 3, 4])
    opt, gen_opt = sgd_opts(lab)
    gen_before = [p.clone() for p in lab.generator_parameters()]
    x, y = batch()
    aux = lab.owner.new_tensor([0, 2, 5] * 4)
    out = lab.step(x, y, opt, gen_opt, aux_target=aux)
    assert out["meta_loss"] is None and not out["meta_updated"]
    for p, b in zip(lab.generator_parameters(), gen_before):
        assert torch.equal(p, b)
    expected = nn.functional.cross_entropy(lab.aux_head.weight.new_zeros(1, 9) + 0, aux[:1])
    assert expected.isfinite()
    soft = torch.zeros(12, 9)
    soft[torch.arange(12), aux] = 1.0
    out_soft = lab.step(x, y, opt, aux_target=soft)
    assert torch.isfinite(out_soft["aux_loss"])


def test_generator_with_wrong_output_shape():
    lab = AuxiliaryLabeler(mlp(), tasks=GeneratedLabels([2, 3, 4], generator=nn.Linear(6, 5)))
    opt, gen_opt = sgd_opts(lab)
    with pytest.raises(ValueError, match=r"generator must return .* \(12, 9\) logits, got shape"):
        lab.step(*batch(), opt, gen_opt)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "0.5", True])
def test_label_temperature_errors(bad):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="label_temperature must be a positive number"):
        AuxiliaryLabeler(model, tasks=GeneratedLabels(2, label_temperature=bad))


@pytest.mark.parametrize("bad", [-0.1, "1", True, None])
def test_confidence_weight_errors(bad):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="confidence_weight must be a non-negative number"):
        AuxiliaryLabeler(model, tasks=GeneratedLabels(2, confidence_weight=bad))
