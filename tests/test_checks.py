"""Nothing silent: models, outputs and options that used to train on the wrong thing now
either train right or fail with a message that names the argument and the fix.

* the primary logits are located in tuple, namedtuple, dict and dataclass outputs (features
  first included) and verified to be the classifier's output, with ``num_classes`` columns;
* a detected "classifier" whose output never reaches the model's output is refused;
* a task class instead of an instance, a task passed positionally as ``psi``, no task at all,
  ``step`` under ``no_grad`` / ``inference_mode`` get messages that say what to do;
* ``aggregated_log_probs`` leaves BatchNorm statistics alone in either mode.
"""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

from auxgen import AuxiliaryLabeler, GeneratedLabels, TransformLabels

N, C, F = 6, 3, 5
Pair = namedtuple("Pair", ["features", "logits"])


@dataclasses.dataclass
class Out:
    features: Tensor
    logits_: Tensor


class Wrapped(nn.Module):
    """A body, a classifier ``fc``, and an output that puts the features first."""

    def __init__(self, pack: Callable[[Tensor, Tensor], Any]) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, F), nn.Tanh())
        self.fc = nn.Linear(F, C)
        self.pack = pack

    def forward(self, x: Tensor) -> Any:
        h = self.body(x)
        return self.pack(h, self.fc(h))


PACKS: dict[str, tuple[Callable[[Tensor, Tensor], Any], tuple]] = {
    "tuple": (lambda h, z: (h, z), (1,)),
    "list": (lambda h, z: [h, z], (1,)),
    "namedtuple": (lambda h, z: Pair(h, z), (1,)),
    "dict": (lambda h, z: {"embedding": h, "scores": z}, ("scores",)),
    "dataclass": (lambda h, z: Out(h, z), ("logits_",)),
    "nested": (lambda h, z: (h, {"out": z}), (1, "out")),
}


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 3, 4, 4, generator=g), torch.arange(N) % C


@pytest.mark.parametrize("kind", list(PACKS))
def test_logits_are_found_in_structured_outputs_features_first(kind: str) -> None:
    pack, path = PACKS[kind]
    torch.manual_seed(0)
    model = Wrapped(pack)
    lab = AuxiliaryLabeler(model, tasks=TransformLabels())
    x, y = _batch()
    fc_before = model.fc.weight.detach().clone()
    opt = torch.optim.SGD(lab.parameters(), lr=0.5)
    out = lab(x, y)
    assert lab._locator.path == path and lab._locator.verified
    assert out["logits"].shape == (N, C)
    out["loss"].backward()
    opt.step()
    assert not torch.equal(model.fc.weight, fc_before)  # the classifier itself trained
    torch.testing.assert_close(lab(x), model.fc(model.body(x)))  # labeler(x) is the logits


def test_first_forward_without_grad_defers_the_check_then_verifies() -> None:
    lab = AuxiliaryLabeler(Wrapped(lambda h, z: (h, z)), tasks=TransformLabels())
    x, y = _batch()
    with torch.no_grad():
        assert lab(x).shape == (N, C)  # located by identity even without a graph
    assert lab._locator.verified


class Detached(nn.Module):
    """Calls its classifier but returns something else of the right width."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, F), nn.Tanh())
        self.fc = nn.Linear(F, C)
        self.other = nn.Linear(F, C)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        self.fc(h)  # computed, never used
        return self.other(h)


class Projected(nn.Module):
    """The last registered Linear is a projection whose output never reaches the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, F), nn.Tanh())
        self.out = nn.Linear(F, C)
        self.proj = nn.Linear(F, 16)
        self.last_projection: Tensor = torch.zeros(0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        self.last_projection = self.proj(h)
        return self.out(h)


def test_a_classifier_whose_output_is_not_the_logits_is_refused() -> None:
    x, y = _batch()
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
    assert lab(x, y)["logits"].shape == (N, C)  # named explicitly: trains


def test_ambiguous_or_missing_logits_name_output_and_shapes() -> None:
    x, y = _batch()
    lab = AuxiliaryLabeler(Wrapped(lambda h, z: (z + 1, z * 2)), tasks=TransformLabels())
    with pytest.raises(ValueError, match=r"cannot tell which part .* \(tuple\) .* several tensors"
                       r" .* saw \[0\]: \(24, 3\), \[1\]: \(24, 3\)\. Pass output="):  # fmt: skip
        lab(x, y)
    lab = AuxiliaryLabeler(Wrapped(lambda h, z: (z + 1, z * 2)), tasks=TransformLabels(), output=1)
    assert lab(x, y)["logits"].shape == (N, C)  # output= resolves it


def test_task_arguments_say_what_to_pass() -> None:
    model = Wrapped(lambda h, z: z)
    with pytest.raises(TypeError, match=r"tasks= got the class TransformLabels, not a task: call "
                       r"it, tasks=TransformLabels\(\)"):  # fmt: skip
        AuxiliaryLabeler(model, tasks=TransformLabels)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"psi= \(the second positional argument\) got a task, "
                       r"TransformLabels: pass tasks as a keyword"):  # fmt: skip
        AuxiliaryLabeler(model, TransformLabels())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs its auxiliary tasks: pass tasks= .* or psi="):
        AuxiliaryLabeler(model)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_step_without_gradients_says_so(context: str) -> None:
    lab = AuxiliaryLabeler(Wrapped(lambda h, z: z), tasks=GeneratedLabels(2))
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    x, y = _batch()
    with (
        getattr(torch, context)(),
        pytest.raises(
            RuntimeError,
            match=r"step\(\) trains, so it needs gradients: .* torch.no_grad\(\) or "
            r"torch.inference_mode\(\)",
        ),
    ):
        lab.step(x, y, opt)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_aggregated_prediction_keeps_batchnorm_statistics(mode: str) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, C),
    )  # fmt: skip
    lab = AuxiliaryLabeler(model, tasks=TransformLabels()).train(mode == "train")
    before = {k: v.clone() for k, v in lab.state_dict().items() if torch.is_tensor(v)}
    out = lab.aggregated_log_probs(_batch()[0])
    assert out.shape == (N, C)
    for k, v in lab.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, before[k]), k
