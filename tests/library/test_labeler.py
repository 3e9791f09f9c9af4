"""Behaviour of AuxiliaryLabeler: the public names, wiring, the forward, generated labels,
state dicts, the ``meta_every`` schedule, constructor errors and the aggregated prediction.
"""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import TinyConvNet, batch, images, mlp, sgd_opts
from torch import nn

import auxgen
from auxgen import AuxiliaryLabeler, GeneratedLabels, TransformLabels

N, C = 6, 3


def test_public_api_imports():
    for name in auxgen.__all__:
        assert hasattr(auxgen, name), name
    assert {torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop, torch.optim.Adamax} <= set(
        auxgen.SUPPORTED_OPTIMIZERS
    )


# ------------------------------------------------------------------- wiring
def test_forward_is_model_forward_and_features_feed_aux_head():
    model = TinyConvNet(num_classes=3).eval()
    lab = AuxiliaryLabeler(model, psi=[2, 3, 1])
    x = torch.randn(5, 3, 8, 8)
    assert torch.equal(lab(x), model(x))
    assert lab.model is model
    assert lab.aux_head.in_features == 4 and lab.aux_head.out_features == 6
    z_p, z_a = lab.forward_all(x)
    torch.testing.assert_close(z_a, lab.aux_head(model.features(x)))
    assert lab.classifier_name == "head"


def test_users_own_forward_is_not_captured():
    model = TinyConvNet(num_classes=3)
    lab = AuxiliaryLabeler(model, psi=[2, 3, 1])
    model(torch.randn(2, 3, 8, 8))  # e.g. the user's evaluation outside the labeler
    assert lab._tap.features is None  # no features (nor their graph) kept alive


def test_generate_labels_rows_and_buffers_untouched():
    model = TinyConvNet(num_classes=3)
    lab = AuxiliaryLabeler(model, tasks=GeneratedLabels([2, 3, 1], generator="head"))
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    before = {k: v.clone() for k, v in lab.state_dict().items() if torch.is_tensor(v)}
    t = lab.generate_labels(x, y)
    assert t.shape == (6, 6)
    torch.testing.assert_close(t.sum(1), torch.ones(6))
    mask = lab.owner.unsqueeze(0) == y.unsqueeze(1)
    assert (t[~mask] == 0).all() and (t[mask] > 0).all()
    for k, v in before.items():
        assert torch.equal(lab.state_dict()[k], v), k


@pytest.mark.parametrize("generator", ["copy", "head"])
def test_state_dict_round_trip(generator):
    torch.manual_seed(1)
    lab = AuxiliaryLabeler(
        TinyConvNet(num_classes=3), tasks=GeneratedLabels([2, 3, 1], generator=generator)
    )
    opt, gen_opt = sgd_opts(lab)
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6) % 3
    lab.step(x, y, opt, gen_opt)
    torch.manual_seed(2)
    other = AuxiliaryLabeler(
        TinyConvNet(num_classes=3), tasks=GeneratedLabels([2, 3, 1], generator=generator)
    )
    other.load_state_dict(lab.state_dict())
    lab.eval()
    other.eval()
    assert torch.equal(other(x), lab(x))
    assert torch.equal(other.generate_labels(x, y), lab.generate_labels(x, y))
    assert torch.equal(other.forward_all(x)[1], lab.forward_all(x)[1])


def test_state_dict_carries_the_meta_every_schedule():
    lab = AuxiliaryLabeler(
        mlp(), tasks=GeneratedLabels([2, 3, 4], generator=mlp(6, 7, 9, bn=False)), meta_every=3
    )
    opt, gen_opt = sgd_opts(lab)
    x, y = batch()
    for _ in range(2):
        lab.step(x, y, opt, gen_opt)
    other = AuxiliaryLabeler(
        mlp(), tasks=GeneratedLabels([2, 3, 4], generator=mlp(6, 7, 9, bn=False)), meta_every=3
    )
    other.load_state_dict(lab.state_dict())
    opt2, gen_opt2 = sgd_opts(other)
    assert [other.step(x, y, opt2, gen_opt2)["meta_updated"] for _ in range(2)] == [False, True]


def test_meta_every_updates_generator_on_schedule():
    lab = AuxiliaryLabeler(
        mlp(), tasks=GeneratedLabels([2, 3, 4], generator=mlp(6, 7, 9, bn=False)), meta_every=2
    )
    opt, gen_opt = sgd_opts(lab)
    x, y = batch()
    updated = [lab.step(x, y, opt, gen_opt)["meta_updated"] for _ in range(5)]
    assert updated == [True, False, True, False, True]


# -------------------------------------------------------------- bad input
class NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"one entry per primary class \(num_classes=3\), got 2"):
        AuxiliaryLabeler(mlp(), psi=[2, 2])
    with pytest.raises(ValueError, match=r"psi entries must be positive, got psi\[1\]=-1"):
        AuxiliaryLabeler(mlp(), psi=[2, -1, 2])
    with pytest.raises(ValueError, match=r"num_classes=4 does not match the classifier"):
        AuxiliaryLabeler(mlp(), psi=2, num_classes=4)
    with pytest.raises(ValueError, match=r"generator must be one of \('copy', 'head'\)"):
        AuxiliaryLabeler(mlp(), tasks=GeneratedLabels(2, generator="big"))
    with pytest.raises(TypeError, match="generator must be one of .* got int"):
        AuxiliaryLabeler(mlp(), tasks=GeneratedLabels(2, generator=3))
    with pytest.raises(ValueError, match=r"loss must be one of \('ce', 'focal'\), got 'mse'"):
        AuxiliaryLabeler(mlp(), psi=2, loss="mse")
    with pytest.raises(ValueError, match="meta must be one of .* got 'third'"):
        AuxiliaryLabeler(mlp(), psi=2, meta="third")
    with pytest.raises(ValueError, match="meta_every must be a positive int, got 0"):
        AuxiliaryLabeler(mlp(), psi=2, meta_every=0)
    with pytest.raises(ValueError, match="entropy_weight must be a non-negative number, got -1"):
        AuxiliaryLabeler(mlp(), tasks=GeneratedLabels(2, entropy_weight=-1))
    with pytest.raises(ValueError, match="could not find the classifier of NoLinear"):
        AuxiliaryLabeler(NoLinear(), psi=[1, 1])
    with pytest.raises(ValueError, match="classifier='nope' is not a submodule"):
        AuxiliaryLabeler(mlp(), psi=2, classifier="nope")
    with pytest.raises(ValueError, match="feature_dim=5 does not match the classifier's"):
        AuxiliaryLabeler(mlp(), psi=2, feature_dim=5)
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        AuxiliaryLabeler("resnet", psi=2)
    with pytest.raises(ValueError, match="get_classifier\\(\\) is nn.Identity"):
        AuxiliaryLabeler(timm.create_model("test_resnet", num_classes=0), psi=[1])
    model = mlp()
    with pytest.raises(ValueError, match="generator shares 2 parameter"):
        AuxiliaryLabeler(
            model, tasks=GeneratedLabels(2, generator=nn.Sequential(model[0], nn.Linear(8, 6)))
        )


# ---------------------------------------------------------------- aggregated prediction
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_aggregated_prediction_keeps_batchnorm_statistics(mode: str) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, C),
    )  # fmt: skip
    lab = AuxiliaryLabeler(model, tasks=TransformLabels()).train(mode == "train")
    before = {k: v.clone() for k, v in lab.state_dict().items() if torch.is_tensor(v)}
    out = lab.aggregated_log_probs(images()[0])
    assert out.shape == (N, C)
    for k, v in lab.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, before[k]), k
