"""What a user passes to a step is checked with one message naming the argument, the
expectation and the value (``auxgen/checks.py``): the batch, the optimisers and their
parameters, the auxiliary targets, and ``step`` under ``no_grad`` / ``inference_mode``.
"""

from __future__ import annotations

import pytest
import timm
import timm.optim
import torch
from helpers import Wrapped, batch, images, mlp, sgd_opts
from torch import nn

from auxgen import AuxiliaryLabeler, GeneratedLabels


def test_step_input_errors():
    lab = AuxiliaryLabeler(mlp(), psi=[2, 3, 4])
    opt, gen_opt = sgd_opts(lab)
    x, y = batch()
    with pytest.raises(ValueError, match=r"y must lie in \[0, 3\) \(len\(psi\)=3\), got 3"):
        lab.step(x, y + 1, opt, gen_opt)
    with pytest.raises(ValueError, match=r"y must lie in \[0, 3\) \(len\(psi\)=3\), got -1"):
        lab.step(x, y - 1, opt, gen_opt)
    with pytest.raises(
        TypeError,
        match="y must hold integer class indices, got dtype torch.float32",
    ):
        lab.step(x, y.float(), opt, gen_opt)
    with pytest.raises(
        ValueError,
        match=r"same batch size, got x.shape=\(11, 6\) and y.shape=\(12,\)",
    ):
        lab.step(x[:11], y, opt, gen_opt)
    with pytest.raises(TypeError, match="x must be a Tensor, got list"):
        lab.step([1, 2], y, opt, gen_opt)
    foreign = torch.optim.SGD([nn.Parameter(torch.zeros(2))] + lab.model_parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer holds a parameter of shape \(2,\) .* not one"):
        lab.step(x, y, foreign, gen_opt)
    with pytest.raises(ValueError, match="gen_optimizer holds a parameter .*generator_parameters"):
        lab.step(x, y, opt, torch.optim.SGD(lab.model_parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"optimizer must be one of torch.optim.SGD, .* got torch"):
        lab.step(x, y, torch.optim.Adadelta(lab.model_parameters()), gen_opt)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got dict"):
        lab.step(x, y, {}, gen_opt)
    with pytest.raises(TypeError, match=r"Lamb cannot be mirrored exactly: .* not elementwise"):
        lab.step(x, y, timm.optim.Lamb(lab.model_parameters()), gen_opt)
    with pytest.raises(ValueError, match=r"aux_target must name an auxiliary class owned by"):
        lab.step(x, y, opt, aux_target=torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match=r"aux_target must be \(batch,\) class indices or"):
        lab.step(x, y, opt, aux_target=torch.zeros(12, 4))


def test_generator_optimizer_may_be_any_torch_optimizer():
    lab = AuxiliaryLabeler(mlp(), psi=[2, 3, 4])
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    gen_opt = torch.optim.RMSprop(lab.generator_parameters(), lr=1e-3)  # not mirrored
    assert lab.step(*batch(), opt, gen_opt)["meta_updated"]


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_step_without_gradients_says_so(context: str) -> None:
    lab = AuxiliaryLabeler(Wrapped(lambda h, z: z), tasks=GeneratedLabels(2))
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    x, y = images()
    with (
        getattr(torch, context)(),
        pytest.raises(
            RuntimeError,
            match=r"step\(\) trains, so it needs gradients: .* torch.no_grad\(\) or "
            r"torch.inference_mode\(\)",
        ),
    ):
        lab.step(x, y, opt)
