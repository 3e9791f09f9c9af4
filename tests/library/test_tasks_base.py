"""The auxiliary-task contract (``auxgen/tasks/base.py``, ``auxgen/tasks/__init__.py``).

Writing your own task, as docs/custom_task.md says: subclass ``AuxiliaryTask``, state the
head's ``outputs``, make a ``plan`` (views and targets) and, with views, a ``head_input``.

* a task written that way trains, with the loss hand-computed here, and under a learned
  weight its meta-gradient equals an independent double backward;
* the ordinary mistakes fail at the boundary with a message that names the task: no
  outputs, targets of integers, targets of the wrong width, views without a ``head_input``;
* the task arguments of the labeler say what to pass.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from helpers import Wrapped
from torch import Tensor, nn

from auxgen import AuxiliaryLabeler, AuxiliaryTask, LearnedWeight, TransformLabels
from auxgen.tasks import TaskContext, TaskPlan

N, C = 6, 3


class UpsideDown(AuxiliaryTask):
    """The docs' example: is the image upside down?"""

    name = "upside_down"

    def outputs(self, ctx: TaskContext) -> list[int]:
        return [2]

    def plan(self, x: Tensor, y: Tensor, aux_target: Optional[Tensor]) -> TaskPlan:
        which = torch.arange(2).repeat_interleave(x.shape[0])
        return TaskPlan(views=x.flip(-2), targets=F.one_hot(which, 2).float())

    def head_input(self, plan: TaskPlan, h: Tensor, h_views: Optional[Tensor]) -> Tensor:
        return torch.cat([h, h_views])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 5), nn.Tanh(), nn.Linear(5, C)).double()


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 3, 4, 4, generator=g, dtype=torch.float64), torch.arange(N) % C


def test_a_task_written_as_the_docs_say_trains_with_the_hand_loss() -> None:
    lab = AuxiliaryLabeler(_model(), tasks=UpsideDown(weight=0.5))
    x, y = _batch()
    out = lab(x, y)
    model, head = lab.model, lab.tasks[0].head
    feats = model[:3](torch.cat([x, x.flip(-2)]))  # the classifier's input, by hand
    primary = F.cross_entropy(model[3](feats[:N]), y)
    aux = F.cross_entropy(head(feats), torch.arange(2).repeat_interleave(N))
    torch.testing.assert_close(out["primary_loss"], primary)
    torch.testing.assert_close(out["task_losses"]["upside_down"], aux)
    torch.testing.assert_close(out["loss"], primary + 0.5 * aux)
    assert tuple(head.weight.shape) == (2, 5)  # the task's own head, from outputs()


def test_a_learned_weight_on_your_task_gets_the_exact_meta_gradient() -> None:
    lab = AuxiliaryLabeler(_model(), tasks=UpsideDown(weight=LearnedWeight(0.5)))
    x, y = _batch()
    model, head = lab.model, lab.tasks[0].head
    theta = [*model.parameters()]
    s = torch.tensor(0.5, dtype=torch.float64).log().requires_grad_(True)
    feats = model[:3](torch.cat([x, x.flip(-2)]))
    primary = F.cross_entropy(model[3](feats[:N]), y)
    aux = F.cross_entropy(head(feats), torch.arange(2).repeat_interleave(N))
    grads = torch.autograd.grad(primary + s.exp() * aux, theta, create_graph=True)
    lr = 0.3
    w1, b1, w3, b3 = (p - lr * g for p, g in zip(theta, grads))
    lp_plus = F.cross_entropy(torch.tanh(x.flatten(1) @ w1.T + b1) @ w3.T + b3, y)
    (want,) = torch.autograd.grad(lp_plus, s)
    opt = torch.optim.SGD(lab.model_parameters(), lr=lr)
    opt.zero_grad()
    lab(x, y)["loss"].backward()
    meta = lab.meta_step(opt, torch.optim.SGD(lab.generator_parameters(), lr=1.0))
    torch.testing.assert_close(meta["meta_loss"], lp_plus.detach())
    log_weight = lab.tasks[0].loss_weight.log_weight
    torch.testing.assert_close(log_weight.grad, want.to(log_weight.dtype))


class _Broken(UpsideDown):
    def __init__(self, mistake: str) -> None:
        super().__init__()
        self.mistake = mistake

    def outputs(self, ctx: TaskContext) -> list[int]:
        return {"no_outputs": [], "width": [3]}.get(self.mistake, [2])

    def plan(self, x: Tensor, y: Tensor, aux_target: Optional[Tensor]) -> TaskPlan:
        plan = super().plan(x, y, aux_target)
        if self.mistake == "integers":
            plan.targets = plan.targets.argmax(1)  # class indices, not soft rows
        return plan

    def head_input(self, plan: TaskPlan, h: Tensor, h_views: Optional[Tensor]) -> Tensor:
        if self.mistake == "no_head_input":  # the default: the batch's own rows only
            return h
        return super().head_input(plan, h, h_views)


MISTAKES: dict[str, tuple[type, str]] = {
    "no_outputs": (
        ValueError,
        r"_Broken \(name 'upside_down'\): outputs\(ctx\) must give the head's softmax sizes, "
        r"positive ints such as \[4\], got \[\]",
    ),
    "integers": (
        TypeError,
        r"_Broken \(name 'upside_down'\): targets must be soft rows \(R, 2\) of floats, got "
        r"torch.int64; for class indices use F.one_hot\(labels, 2\).float\(\)",
    ),
    "width": (
        ValueError,
        r"_Broken \(name 'upside_down'\): targets must be \(rows of head_input\(\), "
        r"num_outputs\) = \(12, 3\), got \(12, 2\) \(num_outputs = sum of outputs\(ctx\) = 3\)",
    ),
    "no_head_input": (
        ValueError,
        r"_Broken \(name 'upside_down'\): targets must be \(rows of head_input\(\), "
        r"num_outputs\) = \(6, 2\), got \(12, 2\) \(head_input\(\) gives the batch's own rows "
        r"unless overridden: with views, return the rows the targets describe\)",
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_ordinary_mistakes_fail_at_the_boundary_naming_the_task(mistake: str) -> None:
    error, message = MISTAKES[mistake]
    x, y = _batch()
    with pytest.raises(error, match=message):
        lab = AuxiliaryLabeler(_model(), tasks=_Broken(mistake))
        lab(x, y)


def test_views_must_be_batches_like_x_naming_the_task() -> None:
    class Bad(UpsideDown):
        def plan(self, x: Tensor, y: Tensor, aux_target: Any) -> TaskPlan:
            return TaskPlan(views=x.flatten(1), targets=torch.zeros(2 * x.shape[0], 2))

    with pytest.raises(ValueError, match=r"Bad \(name 'upside_down'\): plan\(\) views must be "
                       r"batches like x \(per-sample shape \(3, 4, 4\)"):  # fmt: skip
        AuxiliaryLabeler(_model(), tasks=Bad())(*_batch())


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
