"""Every kind of backbone, in every meta mode: attention (timm ViT, a distilled DeiT, a
``nn.TransformerEncoder`` text model), ``nn.EmbeddingBag`` and ``nn.LSTM`` text models,
convolutional classifiers on feature maps (SqueezeNet), non-tensor outputs (GoogLeNet's
named tuple, a dict).

The exactness oracle (:func:`oracle_meta_loss`) is independent of the library's
meta-gradient code: it recomputes the MAXL meta loss from scratch with first-order autograd
only (multi-task gradient, one SGD step, primary loss after it) and differentiates it by
central finite differences in float64.

The classifier and the primary logits are found by capability (``auxgen/backbone.py``): on
real timm and torchvision backbones, on a custom module with ``classifier=`` and
``feature_dim=``, and in structured outputs (tuple, list, named tuple, dict, dataclass,
features first), verified to be the classifier's output.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import namedtuple
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
import torchvision
from helpers import TinyConvNet, Wrapped, images, maxl_labeler, sgd_opts
from torch import Tensor, nn

from auxgen import AuxiliaryLabeler, GeneratedLabels, TransformLabels
from auxgen.backbone import classifier_out_features, feature_dim_of, primary_logits

NUM_CLASSES, PSI, N = 3, 2, 4
AUX_W, ENT_W, LR = 0.7, 0.3, 0.1


# ----------------------------------------------------------------------------- models
class TextTransformer(nn.Module):
    """Token embedding, a 2-layer ``nn.TransformerEncoder`` (fused attention when dropout
    is 0), mean pooling, linear classifier."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        return self.fc(self.encoder(self.emb(x)).mean(1))


class BagClassifier(nn.Module):
    """``nn.EmbeddingBag`` (mean of the token embeddings) and a linear classifier."""

    def __init__(self, vocab: int = 50, dim: int = 8) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean", padding_idx=0)
        self.fc = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        return self.fc(torch.tanh(self.bag(x)))


class LSTMClassifier(nn.Module):
    """Embedding, one ``nn.LSTM`` layer, classifier on the last hidden state."""

    def __init__(self, vocab: int = 50, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.fc = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        out, _ = self.lstm(self.emb(x))
        return self.fc(out[:, -1])


class DictModel(nn.Module):
    """Returns a dict with ``logits`` and other entries, like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.classifier = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        h = self.body(x)
        return {"hidden_states": h, "logits": self.classifier(h), "extra": None}


def _tokens(dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 50, (N, 6), generator=g)


def _images(dtype, size=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, size, size, generator=g).to(dtype)


#: name -> (constructor, input, meta mode "second_order" picks in float32)
MODELS = {
    "vit": (
        lambda: timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32),
        _images,
        "forward_ad",
    ),
    "deit_distilled": (
        lambda: timm.create_model(
            "deit_tiny_distilled_patch16_224",
            pretrained=False,
            num_classes=3,
            img_size=32,
            depth=2,
        ),
        _images,
        "forward_ad",
    ),
    "text_transformer": (TextTransformer, _tokens, "forward_ad"),
    "embedding_bag": (BagClassifier, _tokens, "forward_ad"),
    "lstm": (LSTMClassifier, _tokens, "forward_ad"),
    "squeezenet": (lambda: torchvision.models.squeezenet1_1(num_classes=3), _images, "forward_ad"),
    "googlenet": (
        lambda: torchvision.models.googlenet(num_classes=3, aux_logits=True, init_weights=True),
        _images,
        "forward_ad",
    ),
    "dict_output": (DictModel, lambda dtype: torch.randn(N, 6, dtype=dtype), "forward_ad"),
}


def _build(name, dtype=torch.float32, **kwargs):
    make, data, expected = MODELS[name]
    torch.manual_seed(0)
    model = make().to(dtype).train()
    lab = maxl_labeler(model, PSI, aux_weight=AUX_W, entropy_weight=ENT_W, **kwargs)
    return lab, data(dtype), torch.arange(N) % NUM_CLASSES, expected


# ------------------------------------------------------------------ both meta modes
@pytest.mark.parametrize("meta", ["second_order", "first_order"])
@pytest.mark.parametrize("name", list(MODELS))
def test_trains_in_both_meta_modes(name, meta):
    lab, x, y, expected = _build(name, meta=meta)
    assert lab.meta_mode_used == ("first_order" if meta == "first_order" else None)
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.01, momentum=0.9)
    gen_opt = torch.optim.SGD(lab.generator_parameters(), lr=1e-3)
    gen_before = [p.detach().clone() for p in lab.generator_parameters()]
    for _ in range(2):
        out = lab.step(x, y, opt, gen_opt)  # any warning fails the test (filterwarnings)
        assert out["meta_updated"]
        assert out["meta_mode"] == (expected if meta == "second_order" else "first_order")
        for key in ("loss", "primary_loss", "aux_loss", "meta_loss"):
            assert torch.isfinite(out[key]), key
        assert out["logits"].shape == (N, NUM_CLASSES)
    assert lab.meta_mode_used == out["meta_mode"]
    moved = [not torch.equal(a, p) for a, p in zip(gen_before, lab.generator_parameters())]
    assert all(moved)
    for p in lab.generator_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    logits = lab(x)  # train mode: the raw output of GoogLeNet/the dict model is not a tensor
    assert isinstance(logits, torch.Tensor) and logits.shape == (N, NUM_CLASSES)


# ----------------------------------------------------------------- exactness oracle
class FreeLogits(nn.Module):
    """A "generator" whose logits for the (fixed) batch are its parameter, so that the
    meta-gradient it receives is the meta-gradient with respect to the label logits."""

    def __init__(self, n: int, num_aux: int, dtype) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.randn(n, num_aux, dtype=dtype))

    def forward(self, x):
        return self.logits


def _masked_softmax(logits, y, owner):
    mask = owner[None, :] == y[:, None]
    z = logits.masked_fill(~mask, float("-inf"))
    return torch.exp(z - torch.logsumexp(z, dim=1, keepdim=True))


def oracle_meta_loss(lab, state, logits, x, y, seed):
    """``L_p(theta+) + ENT_W * sum pbar log pbar`` with ``theta+`` one plain SGD step on
    ``L_p + AUX_W * L_a``; first-order autograd only, on the labeler's own modules."""
    lab.load_state_dict(state)
    t = _masked_softmax(logits, y, lab.owner)
    torch.manual_seed(seed)  # the same dropout masks as the library's step
    z_p, z_a = lab.forward_all(x)
    ell = -F.log_softmax(z_a, dim=1)
    loss = F.cross_entropy(z_p, y) + AUX_W * (t * ell).sum(1).mean()
    params = lab.model_parameters()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(LR * g)
        lp_plus = F.cross_entropy(lab(x), y)
    pbar = t.mean(0)
    return float(lp_plus + ENT_W * (pbar * torch.log(pbar)).sum())


EXACT_CASES = [(name, "second_order") for name in MODELS] + [
    ("vit", "double_backward"),
    ("text_transformer", "double_backward"),
    ("embedding_bag", "double_backward"),
    ("lstm", "double_backward"),
]


@pytest.mark.parametrize(("name", "meta"), EXACT_CASES)
def test_meta_gradient_matches_finite_differences(name, meta):
    dtype = torch.float64
    make, data, _ = MODELS[name]
    torch.manual_seed(0)
    model = make().to(dtype).train()
    gen = FreeLogits(N, NUM_CLASSES * PSI, dtype)
    lab = AuxiliaryLabeler(
        model,
        tasks=GeneratedLabels(PSI, generator=gen, weight=AUX_W, entropy_weight=ENT_W),
        meta=meta,
    )
    x, y = data(dtype), torch.arange(N) % NUM_CLASSES
    oracle = copy.deepcopy(lab)
    state = copy.deepcopy(oracle.state_dict())
    p0 = gen.logits.detach().clone()

    opt = torch.optim.SGD(lab.model_parameters(), lr=LR)
    gen_opt = torch.optim.SGD(lab.generator_parameters(), lr=0.0)
    torch.manual_seed(7)
    out = lab.step(x, y, opt, gen_opt)
    assert out["meta_mode"] in ("forward_ad", "double_backward")
    if meta != "second_order":
        assert out["meta_mode"] == meta
    grad = gen.logits.grad

    eps = 1e-6  # small: ReLU and max-pool kinks of tiny GoogLeNet maps lie within 1e-5
    for k in range(2):
        delta = torch.randn(p0.shape, generator=torch.Generator().manual_seed(k), dtype=dtype)
        plus = oracle_meta_loss(oracle, state, p0 + eps * delta, x, y, seed=7)
        minus = oracle_meta_loss(oracle, state, p0 - eps * delta, x, y, seed=7)
        fd = (plus - minus) / (2 * eps)
        exact = float((grad * delta).sum())
        assert exact == pytest.approx(fd, rel=1e-5, abs=1e-8), (exact, fd)


def test_lstm_exact_modes_agree_in_float32():
    """float32 on CPU: oneDNN's fused LSTM kernel has no forward-AD formula. The default
    runs the LSTM cell by cell under forward AD; forcing the double backward goes through
    oneDNN's kernel. Both are exact, so they agree to float32 rounding."""
    grads = {}
    for meta in ("second_order", "double_backward"):
        torch.manual_seed(0)
        lab = AuxiliaryLabeler(LSTMClassifier(), psi=PSI, meta=meta)
        opt = torch.optim.SGD(lab.model_parameters(), lr=LR)
        gen_opt = torch.optim.SGD(lab.generator_parameters(), lr=0.1)
        x, y = _tokens(torch.float32), torch.arange(N) % NUM_CLASSES
        out = lab.step(x, y, opt, gen_opt)
        grads[out["meta_mode"]] = torch.cat([p.grad.flatten() for p in lab.generator_parameters()])
    assert set(grads) == {"double_backward", "forward_ad"}
    assert torch.backends.mkldnn.enabled  # restored after the cell-by-cell JVP
    a, b = grads["double_backward"], grads["forward_ad"]
    assert float((a - b).norm() / b.norm()) < 1e-4


# ------------------------------------------------------------ pooled feature maps
def test_squeezenet_pools_its_feature_map_with_no_extra_argument():
    model = torchvision.models.squeezenet1_1(num_classes=3)
    lab = AuxiliaryLabeler(model, psi=2)  # num_classes and feature width found by capability
    assert (lab.num_classes, lab.feature_dim, lab.classifier_name) == (3, 512, "classifier")
    x = _images(torch.float32)
    lab.eval()
    z_p, z_a = lab.forward_all(x)
    with torch.no_grad():
        pooled = model.features(x).mean(dim=(2, 3))
    torch.testing.assert_close(z_a, lab.aux_head(pooled))
    torch.testing.assert_close(z_p, model(x))
    torch.testing.assert_close(
        lab.generate_labels(x, torch.arange(N) % 3),
        _masked_softmax(lab.generator(pooled), torch.arange(N) % 3, lab.owner),
    )


def test_feature_width_by_capability_and_override():
    class CosineHead(nn.Module):  # no Linear or convolution inside
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 8))

        def forward(self, h):
            return F.normalize(h, dim=1) @ F.normalize(self.weight, dim=1).T

    head = CosineHead()
    look_alike = CosineHead()
    look_alike.in_features, look_alike.out_features = 8, 3
    assert feature_dim_of(SimpleNamespace(num_features=16), look_alike, None) == 8
    assert classifier_out_features(look_alike) == 3
    model = SimpleNamespace(num_features=16, head_hidden_size=8)
    assert feature_dim_of(model, head, None) == 8  # timm: the width feeding the head
    assert feature_dim_of(SimpleNamespace(num_features=16), head, None) == 16
    assert feature_dim_of(SimpleNamespace(), head, 5) == 5
    conv_head = nn.Sequential(nn.Dropout(), nn.Conv2d(24, 7, 1), nn.ReLU(), nn.Conv2d(7, 4, 1))
    assert feature_dim_of(SimpleNamespace(num_features=99), conv_head, None) == 24
    assert classifier_out_features(conv_head) == 4
    assert classifier_out_features(head) is None
    with pytest.raises(ValueError, match="cannot infer the feature width of classifier CosineHead"):
        feature_dim_of(SimpleNamespace(), head, None)

    sq = torchvision.models.squeezenet1_1(num_classes=3)
    lab = AuxiliaryLabeler(sq, psi=2, feature_dim=100)  # an override is trusted until the step
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    with pytest.raises(ValueError, match="classifier's input has 512 features, expected feature_d"):
        lab.step(_images(torch.float32), torch.arange(N) % 3, opt)


# ------------------------------------------------------------- non-tensor outputs
def test_primary_logits_found_by_capability_and_override():
    z = torch.randn(2, 3)
    nt = torchvision.models.GoogLeNetOutputs(z, None, None)
    assert primary_logits(z) is z
    assert primary_logits(nt) is z
    assert primary_logits({"loss": None, "logits": z}) is z
    assert primary_logits(SimpleNamespace(logits=z, hidden_states=None)) is z
    assert primary_logits((z, torch.zeros(1))) is z
    assert primary_logits([z]) is z
    assert primary_logits({"scores": z}, "scores") is z
    assert primary_logits(SimpleNamespace(scores=z), "scores") is z
    assert primary_logits((None, z), 1) is z
    assert primary_logits({"a": {"b": z}}, lambda o: o["a"]["b"]) is z
    with pytest.raises(TypeError, match=r"the model returned a dict, not a Tensor .* pass output="):
        primary_logits({"scores": z})
    with pytest.raises(TypeError, match="the model returned a str"):
        primary_logits("logits")
    with pytest.raises(TypeError, match="the model returned a tuple"):
        primary_logits((None, z))
    with pytest.raises(ValueError, match=r"output='scores': the model's output \(dict\) has no"):
        primary_logits({"logits": z}, "scores")
    with pytest.raises(ValueError, match=r"output=5: cannot index the model's output \(tuple\)"):
        primary_logits((z,), 5)
    with pytest.raises(TypeError, match="picked a NoneType out of the model's output"):
        primary_logits({"logits": z, "x": None}, "x")


class ScoresModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, NUM_CLASSES)

    def forward(self, x):
        return {"scores": self.fc(x)}


class TwoScoresModel(ScoresModel):
    def forward(self, x):
        z = self.fc(x)
        return {"a": z + 1.0, "b": 2.0 * z}  # both computed from the classifier: ambiguous


def test_structured_output_is_searched_and_output_override_trains():
    x, y = torch.randn(N, 6), torch.arange(N) % NUM_CLASSES
    lab = AuxiliaryLabeler(ScoresModel(), psi=PSI)  # {"scores": logits}: found by the search
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    before = lab.model(x)["scores"].detach()
    out = lab.step(x, y, opt)
    assert lab._locator.path == ("scores",)
    torch.testing.assert_close(out["logits"], before)
    lab = AuxiliaryLabeler(TwoScoresModel(), psi=PSI)
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"cannot tell which part of the model's output \(dict\) "
                       r"is the primary logits: several tensors .* saw \['a'\]: \(4, 3\), "
                       r"\['b'\]: \(4, 3\)\. Pass output="):  # fmt: skip
        lab.step(x, y, opt)
    for output in ("scores", lambda out: out["scores"]):
        torch.manual_seed(0)
        lab = AuxiliaryLabeler(ScoresModel(), psi=PSI, output=output)
        opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
        gen_opt = torch.optim.SGD(lab.generator_parameters(), lr=0.1)
        out = lab.step(x, y, opt, gen_opt)
        assert out["meta_updated"] and torch.isfinite(out["meta_loss"])
        torch.testing.assert_close(lab(x), lab.model(x)["scores"])
    with pytest.raises(TypeError, match=r"output must be None, a key .* got float"):
        AuxiliaryLabeler(ScoresModel(), psi=PSI, output=1.5)


def test_googlenet_training_output_and_copy_generator():
    """Training mode returns GoogLeNetOutputs(logits, aux2, aux1): the logits are used,
    the auxiliary classifiers get no gradient; the copy generator's output too."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(num_classes=3, aux_logits=True, init_weights=True)
    lab = AuxiliaryLabeler(model, tasks=GeneratedLabels(PSI, generator="copy"))
    x, y = _images(torch.float32), torch.arange(N) % NUM_CLASSES
    assert isinstance(model(x), torchvision.models.GoogLeNetOutputs)
    opt = torch.optim.SGD(lab.model_parameters(), lr=LR)
    gen_opt = torch.optim.SGD(lab.generator_parameters(), lr=0.1)
    out = lab.step(x, y, opt, gen_opt)
    assert out["meta_mode"] == "forward_ad"
    assert model.fc.weight.grad is not None and model.aux1.fc2.weight.grad is None
    assert lab.generate_labels(x, y).shape == (N, NUM_CLASSES * PSI)


# ----------------------------------------------------------- real timm and torchvision
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
    opt, gen_opt = sgd_opts(lab, lr=0.01)
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
    opt, gen_opt = sgd_opts(lab, lr=0.01)
    out = lab.step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]), opt, gen_opt)
    assert torch.isfinite(out["meta_loss"])


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
    opt, gen_opt = sgd_opts(lab)
    out = lab.step(torch.randn(4, 6), torch.tensor([0, 1, 0, 1]), opt, gen_opt)
    assert out["meta_updated"]


# ------------------------------------------------ structured outputs, verified logits
BATCH, WIDTH = 6, 5  # the batch of helpers.images() and the feature width of Wrapped
Pair = namedtuple("Pair", ["features", "logits"])


@dataclasses.dataclass
class Out:
    features: Tensor
    logits_: Tensor


PACKS: dict[str, tuple[Callable[[Tensor, Tensor], Any], tuple]] = {
    "tuple": (lambda h, z: (h, z), (1,)),
    "list": (lambda h, z: [h, z], (1,)),
    "namedtuple": (lambda h, z: Pair(h, z), (1,)),
    "dict": (lambda h, z: {"embedding": h, "scores": z}, ("scores",)),
    "dataclass": (lambda h, z: Out(h, z), ("logits_",)),
    "nested": (lambda h, z: (h, {"out": z}), (1, "out")),
}


@pytest.mark.parametrize("kind", list(PACKS))
def test_logits_are_found_in_structured_outputs_features_first(kind: str) -> None:
    pack, path = PACKS[kind]
    torch.manual_seed(0)
    model = Wrapped(pack)
    lab = AuxiliaryLabeler(model, tasks=TransformLabels())
    x, y = images()
    fc_before = model.fc.weight.detach().clone()
    opt = torch.optim.SGD(lab.parameters(), lr=0.5)
    out = lab(x, y)
    assert lab._locator.path == path and lab._locator.verified
    assert out["logits"].shape == (BATCH, NUM_CLASSES)
    out["loss"].backward()
    opt.step()
    assert not torch.equal(model.fc.weight, fc_before)  # the classifier itself trained
    torch.testing.assert_close(lab(x), model.fc(model.body(x)))  # labeler(x) is the logits


def test_first_forward_without_grad_defers_the_check_then_verifies() -> None:
    lab = AuxiliaryLabeler(Wrapped(lambda h, z: (h, z)), tasks=TransformLabels())
    x, y = images()
    with torch.no_grad():
        assert lab(x).shape == (BATCH, NUM_CLASSES)  # located by identity even without a graph
    assert lab._locator.verified


class Detached(nn.Module):
    """Calls its classifier but returns something else of the right width."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, WIDTH), nn.Tanh())
        self.fc = nn.Linear(WIDTH, NUM_CLASSES)
        self.other = nn.Linear(WIDTH, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        self.fc(h)  # computed, never used
        return self.other(h)


class Projected(nn.Module):
    """The last registered Linear is a projection whose output never reaches the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, WIDTH), nn.Tanh())
        self.out = nn.Linear(WIDTH, NUM_CLASSES)
        self.proj = nn.Linear(WIDTH, 16)
        self.last_projection: Tensor = torch.zeros(0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        self.last_projection = self.proj(h)
        return self.out(h)


def test_a_classifier_whose_output_is_not_the_logits_is_refused() -> None:
    x, y = images()
    lab = AuxiliaryLabeler(Detached(), tasks=TransformLabels(), classifier="fc")
    with pytest.raises(ValueError, match=r"the primary logits \(shape \(24, 3\)\) are not computed "
                       r"from the output of 'fc', the module auxgen treats as the classifier .* "
                       r"pass classifier="):  # fmt: skip
        lab(x, y)
    lab = AuxiliaryLabeler(Projected(), tasks=TransformLabels())  # detects 'proj': 16 columns
    assert lab.classifier_name == "proj"
    with pytest.raises(ValueError, match=r"have shape \(24, 3\), expected \(N, 16\) \(num_classes\)"
                       r"; pass output= .* or classifier="):  # fmt: skip
        lab(x, y)
    lab = AuxiliaryLabeler(Projected(), tasks=TransformLabels(), classifier="out")
    assert lab(x, y)["logits"].shape == (BATCH, NUM_CLASSES)  # named explicitly: trains


def test_ambiguous_or_missing_logits_name_output_and_shapes() -> None:
    x, y = images()
    lab = AuxiliaryLabeler(Wrapped(lambda h, z: (z + 1, z * 2)), tasks=TransformLabels())
    with pytest.raises(ValueError, match=r"cannot tell which part .* \(tuple\) .* several tensors"
                       r" .* saw \[0\]: \(24, 3\), \[1\]: \(24, 3\)\. Pass output="):  # fmt: skip
        lab(x, y)
    lab = AuxiliaryLabeler(Wrapped(lambda h, z: (z + 1, z * 2)), tasks=TransformLabels(), output=1)
    assert lab(x, y)["logits"].shape == (BATCH, NUM_CLASSES)  # output= resolves it
