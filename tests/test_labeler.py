"""Behaviour of AuxiliaryLabeler: wiring, buffers, generators, backbones and bad input."""

from __future__ import annotations

import copy

import pytest
import timm
import timm.optim
import torch
import torchvision
from helpers import TinyConvNet, batch, mlp
from torch import nn

import auxgen
from auxgen import AuxiliaryLabeler, GeneratedLabels, NonFiniteError
from auxgen.hierarchy import masked_softmax, normalize_psi, owner_index
from auxgen.losses import per_class_loss


def _opts(lab, lr=0.1):
    opt = torch.optim.SGD(lab.model_parameters(), lr=lr, momentum=0.9)
    gen_opt = torch.optim.SGD(lab.generator_parameters(), lr=1e-2)
    return opt, gen_opt


def test_public_api_imports():
    for name in auxgen.__all__:
        assert hasattr(auxgen, name), name
    assert {torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop, torch.optim.Adamax} <= set(
        auxgen.SUPPORTED_OPTIMIZERS
    )


# ---------------------------------------------------------------- hierarchy
def test_masked_softmax_exact_zero_and_extreme_logits():
    psi = [2, 3, 4]
    owner = owner_index(psi)
    assert owner.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    logits = torch.tensor([[1e4, -1e4, 1e4, -1e4, 3.0, 1e4, 0.0, -1e4, 5.0]] * 3)
    logits.requires_grad_(True)
    y = torch.tensor([0, 1, 2])
    t = masked_softmax(logits, y, owner)
    assert torch.isfinite(t).all()
    mask = owner.unsqueeze(0) == y.unsqueeze(1)
    assert (t[~mask] == 0).all()  # exactly zero, not merely small
    torch.testing.assert_close(t.sum(1), torch.ones(3))
    assert t[0, 0] == 1.0 and t[1, 2] == 1.0 and t[2, 5] == 1.0
    (t * torch.randn_like(t)).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~mask] == 0).all()


def test_normalize_psi_forms_and_errors():
    assert normalize_psi(3, num_classes=2) == (3, 3)
    assert normalize_psi(torch.tensor([1, 2])) == (1, 2)
    with pytest.raises(ValueError, match=r"one entry per primary class \(num_classes=3\), got 2"):
        normalize_psi([2, 2], num_classes=3)
    with pytest.raises(ValueError, match=r"psi entries must be positive, got psi\[1\]=0"):
        normalize_psi([2, 0])
    with pytest.raises(TypeError, match=r"psi\[0\] must be an int, got 'a'"):
        normalize_psi(["a"])
    with pytest.raises(ValueError, match="num_classes is required"):
        normalize_psi(4)


def test_focal_per_class_loss_formula():
    z = torch.randn(5, 4)
    p = z.softmax(1)
    expected = -((1 - p) ** 2) * p.log()
    torch.testing.assert_close(per_class_loss(z, "focal", 2.0), expected)
    torch.testing.assert_close(per_class_loss(z, "ce"), -z.log_softmax(1))


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


@pytest.mark.parametrize("meta", ["second_order", "first_order"])
def test_batchnorm_stats_equal_one_ordinary_forward(meta):
    model = TinyConvNet(num_classes=3)
    lab = AuxiliaryLabeler(model, tasks=GeneratedLabels([2, 2, 2], generator="copy"), meta=meta)
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 3
    reference(x)  # one ordinary training forward at the pre-step parameters
    opt, gen_opt = _opts(lab)
    out = lab.step(x, y, opt, gen_opt)
    assert out["meta_updated"]
    for (name, b), (_, rb) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(b, rb, rtol=0, atol=0, msg=name)


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
    opt, gen_opt = _opts(lab)
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


@pytest.mark.parametrize("generator", ["copy", "head"])
def test_state_dict_round_trip(generator):
    torch.manual_seed(1)
    lab = AuxiliaryLabeler(
        TinyConvNet(num_classes=3), tasks=GeneratedLabels([2, 3, 1], generator=generator)
    )
    opt, gen_opt = _opts(lab)
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
    opt, gen_opt = _opts(lab)
    x, y = batch()
    for _ in range(2):
        lab.step(x, y, opt, gen_opt)
    other = AuxiliaryLabeler(
        mlp(), tasks=GeneratedLabels([2, 3, 4], generator=mlp(6, 7, 9, bn=False)), meta_every=3
    )
    other.load_state_dict(lab.state_dict())
    opt2, gen_opt2 = _opts(other)
    assert [other.step(x, y, opt2, gen_opt2)["meta_updated"] for _ in range(2)] == [False, True]


def test_aux_target_disables_meta_and_keeps_generator():
    lab = AuxiliaryLabeler(mlp(), psi=[2, 3, 4])
    opt, gen_opt = _opts(lab)
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


def test_aux_weight_zero_is_single_task_training():
    class Counting(nn.Module):
        calls = 0

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 9)

        def forward(self, x):
            Counting.calls += 1
            return self.lin(x)

    model = mlp(bn=False)
    reference = copy.deepcopy(model)
    lab = AuxiliaryLabeler(
        model, tasks=GeneratedLabels([2, 3, 4], weight=0.0, generator=Counting())
    )
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = batch()
    out = lab.step(x, y, opt, torch.optim.SGD(lab.generator_parameters(), lr=0.1))
    nn.functional.cross_entropy(reference(x), y).backward()
    ref_opt.step()
    assert Counting.calls == 0 and not out["meta_updated"] and float(out["aux_loss"]) == 0.0
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_meta_every_updates_generator_on_schedule():
    lab = AuxiliaryLabeler(
        mlp(), tasks=GeneratedLabels([2, 3, 4], generator=mlp(6, 7, 9, bn=False)), meta_every=2
    )
    opt, gen_opt = _opts(lab)
    x, y = batch()
    updated = [lab.step(x, y, opt, gen_opt)["meta_updated"] for _ in range(5)]
    assert updated == [True, False, True, False, True]


def test_optimizer_over_a_subset_keeps_the_rest_fixed():
    model = mlp()
    lab = AuxiliaryLabeler(model, psi=[2, 3, 4])
    frozen = model[0].weight.clone()
    opt = torch.optim.Adam(list(model[3].parameters()) + list(lab.aux_head.parameters()), lr=1e-2)
    gen_opt = torch.optim.SGD(lab.generator_parameters(), lr=1e-2)
    out = lab.step(*batch(), opt, gen_opt)
    assert out["meta_updated"] and torch.equal(model[0].weight, frozen)


def test_focal_loss_step_is_finite():
    lab = AuxiliaryLabeler(mlp(), psi=[2, 3, 4], loss="focal", meta="first_order")
    opt, gen_opt = _opts(lab)
    out = lab.step(*batch(), opt, gen_opt)
    assert all(torch.isfinite(out[k]) for k in ("loss", "primary_loss", "aux_loss", "meta_loss"))


def test_nonfinite_loss_raises_and_changes_nothing():
    lab = AuxiliaryLabeler(mlp(), psi=[2, 3, 4])
    opt, gen_opt = _opts(lab)
    x, y = batch()
    lab.step(x, y, opt, gen_opt)
    state = copy.deepcopy(lab.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite multi-task loss or gradient"):
        lab.step(x, y, opt, gen_opt)
    assert lab.state_dict()["_extra_state"] == state["_extra_state"]
    for k, v in lab.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, state[k]), k
    for a, b in zip(opt.state_dict()["state"].values(), opt_state["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


# ---------------------------------------------------------------- backbones
@pytest.mark.parametrize(
    "factory",
    [
        lambda: timm.create_model("test_resnet", pretrained=False, num_classes=4),
        lambda: timm.create_model("resnet10t", pretrained=False, num_classes=4),
        lambda: torchvision.models.resnet18(num_classes=4),
        lambda: torchvision.models.mobilenet_v3_small(num_classes=4),
        lambda: TinyConvNet(num_classes=4),
    ],
    ids=["timm-test_resnet", "timm-resnet10t", "tv-resnet18", "tv-mobilenet_v3_small", "custom"],
)
def test_one_step_on_real_backbones(factory):
    model = factory()
    lab = AuxiliaryLabeler(model, tasks=GeneratedLabels([2, 1, 3, 2], generator="head"))
    opt, gen_opt = _opts(lab, lr=0.01)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    before = [p.clone() for p in lab.model_parameters()]
    out = lab.step(x, y, opt, gen_opt)
    assert out["meta_updated"]
    assert all(torch.isfinite(out[k]) for k in ("loss", "primary_loss", "aux_loss", "meta_loss"))
    assert out["logits"].shape == (4, 4)
    assert any(not torch.equal(p, b) for p, b in zip(lab.model_parameters(), before))
    assert all(torch.isfinite(p.grad).all() for p in lab.generator_parameters())


def test_copy_generator_on_torchvision_resnet():
    model = torchvision.models.resnet18(num_classes=2)
    lab = AuxiliaryLabeler(model, tasks=GeneratedLabels([3, 2], generator="copy"))
    assert lab.classifier_name == "fc" and lab.generator.fc.out_features == 5
    assert lab.feature_dim == 512
    opt, gen_opt = _opts(lab, lr=0.01)
    out = lab.step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]), opt, gen_opt)
    assert torch.isfinite(out["meta_loss"])


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


def test_explicit_classifier_and_feature_dim_on_a_custom_module():
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(6, 5)
            self.out = nn.Bilinear(5, 5, 2)

        def forward(self, x):
            h = torch.tanh(self.body(x))
            return self.out(h, h)

    with pytest.raises(ValueError, match="cannot infer the feature width .* pass feature_dim="):
        AuxiliaryLabeler(Custom(), psi=[2, 2], classifier="out")
    with pytest.raises(ValueError, match="generator='copy' replaces the classifier 'out'"):
        AuxiliaryLabeler(
            Custom(),
            tasks=GeneratedLabels([2, 2], generator="copy"),
            classifier="out",
            feature_dim=5,
        )
    lab = AuxiliaryLabeler(
        Custom(), tasks=GeneratedLabels([2, 2], generator="head"), classifier="out", feature_dim=5
    )
    opt, gen_opt = _opts(lab)
    out = lab.step(torch.randn(4, 6), torch.tensor([0, 1, 0, 1]), opt, gen_opt)
    assert out["meta_updated"]


def test_step_input_errors():
    lab = AuxiliaryLabeler(mlp(), psi=[2, 3, 4])
    opt, gen_opt = _opts(lab)
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


def test_generator_with_wrong_output_shape():
    lab = AuxiliaryLabeler(mlp(), tasks=GeneratedLabels([2, 3, 4], generator=nn.Linear(6, 5)))
    opt, gen_opt = _opts(lab)
    with pytest.raises(ValueError, match=r"generator must return .* \(12, 9\) logits, got shape"):
        lab.step(*batch(), opt, gen_opt)


def test_generator_optimizer_may_be_any_torch_optimizer():
    lab = AuxiliaryLabeler(mlp(), psi=[2, 3, 4])
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    gen_opt = torch.optim.RMSprop(lab.generator_parameters(), lr=1e-3)  # not mirrored
    assert lab.step(*batch(), opt, gen_opt)["meta_updated"]
