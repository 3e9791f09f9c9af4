r"""Hierarchical auxiliary labels: primary class ``i`` owns ``psi[i]`` auxiliary classes.

* :class:`GeneratedLabels`: MAXL (Liu, Davison & Johns, 2019). A label-generation network
  invents the labels, a masked softmax over each image's class's children, and is trained
  by the meta-gradient plus an entropy regulariser that keeps them from collapsing.
* :class:`FixedLabels`: labels given at each step (``step(..., aux_target=...)``): the
  human, random and k-means baselines.

Both share the hierarchy (``psi``, the ``owner`` buffer) and the check of ``aux_target``;
:class:`GeneratedLabels` also accepts ``aux_target`` for a step, which then uses those
labels and leaves the generator alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..backbone import OutputSpec, primary_logits, replace_module
from ..hierarchy import masked_log_softmax, normalize_psi, owner_index
from ..losses import mean_entropy, neg_entropy
from .base import AuxiliaryTask, LearnedTask, TaskContext, TaskPlan, TaskWeight, check_weight

__all__ = ["GENERATORS", "FixedLabels", "GeneratedLabels"]

#: Built-in generators of :class:`GeneratedLabels`.
GENERATORS = ("copy", "head")

PsiSpec = Union[int, Sequence[int], Tensor]


def _check_psi(psi: PsiSpec) -> PsiSpec:
    if isinstance(psi, int) and not isinstance(psi, bool):
        if psi <= 0:
            raise ValueError(f"psi must be a positive int or a sequence of them, got {psi}")
        return psi
    return normalize_psi(psi)


def _reinitialise(module: nn.Module) -> None:
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
        reset_stats = getattr(m, "reset_running_stats", None)
        if callable(reset_stats):
            reset_stats()


class _Hierarchy(AuxiliaryTask):
    """``psi``, the ``owner`` buffer and the check of ``aux_target``."""

    takes_aux_target = True

    def __init__(self, psi: PsiSpec, *, weight: Union[float, TaskWeight] = 1.0) -> None:
        super().__init__(weight=weight)
        self._psi_spec = _check_psi(psi)
        self.psi: tuple[int, ...] = ()
        self.num_aux = 0

    def class_count(self) -> Optional[int]:
        return None if isinstance(self._psi_spec, int) else len(self._psi_spec)  # type: ignore[arg-type]

    def setup(self, ctx: TaskContext) -> None:
        self.psi = normalize_psi(self._psi_spec, ctx.num_classes)
        self.num_aux = sum(self.psi)
        self.register_buffer("owner", owner_index(self.psi, device=ctx.factory.get("device")))

    def outputs(self, ctx: TaskContext) -> list[int]:
        return [self.num_aux]

    def fixed_targets(self, aux_target: Tensor, y: Tensor) -> Tensor:
        """``aux_target`` (indices or soft labels) as ``(batch, sum(psi))`` soft labels.

        Indices become float32 one-hot rows; soft labels keep their dtype (the step casts
        targets to the head's dtype).
        """
        if not isinstance(aux_target, Tensor):
            raise TypeError(f"aux_target must be a Tensor, got {type(aux_target).__name__}")
        n = y.shape[0]
        if aux_target.dim() == 1 and not aux_target.dtype.is_floating_point:
            if aux_target.shape[0] != n:
                raise ValueError(
                    f"aux_target must have one entry per sample ({n}), got {aux_target.shape[0]}"
                )
            aux = aux_target.to(device=y.device, dtype=torch.long)
            if int(aux.min()) < 0 or int(aux.max()) >= self.num_aux:
                raise ValueError(
                    f"aux_target indices must lie in [0, sum(psi)={self.num_aux}), got "
                    f"[{int(aux.min())}, {int(aux.max())}]"
                )
            if not bool((self.owner[aux] == y).all()):
                raise ValueError(
                    "aux_target must name an auxiliary class owned by each sample's primary "
                    "class (owner[aux_target] == y)"
                )
            return torch.nn.functional.one_hot(aux, self.num_aux).float()
        if aux_target.shape != (n, self.num_aux):
            raise ValueError(
                f"aux_target must be (batch,) class indices or (batch, sum(psi)) = "
                f"({n}, {self.num_aux}) soft labels, got shape {tuple(aux_target.shape)}"
            )
        return aux_target.to(device=y.device)

    def plan(self, x: Tensor, y: Tensor, aux_target: Optional[Tensor]) -> TaskPlan:
        if aux_target is None:
            return TaskPlan()
        return TaskPlan(targets=self.fixed_targets(aux_target, y))


class FixedLabels(_Hierarchy):
    """Auxiliary labels given at every step: ``labeler.step(x, y, opt, aux_target=labels)``.

    ``aux_target`` is ``(batch,)`` auxiliary class indices (each owned by the sample's
    primary class) or ``(batch, sum(psi))`` soft labels. Use it for human-defined labels
    (CIFAR-100's fine classes under its coarse ones), random or clustered labels.

    Args:
        psi: auxiliary classes per primary class: one int per class, or one int for all.
        weight: weight of the auxiliary loss.

    Example:
        >>> import torch, torch.nn as nn
        >>> from auxgen import AuxiliaryLabeler, FixedLabels
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> labeler = AuxiliaryLabeler(model, tasks=FixedLabels([2, 3]))
        >>> opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1)
        >>> x, y = torch.randn(4, 4), torch.tensor([0, 1, 0, 1])
        >>> out = labeler.step(x, y, opt, aux_target=torch.tensor([1, 4, 0, 2]))
        >>> out["meta_updated"]
        False
    """

    name = "fixed"

    def plan(self, x: Tensor, y: Tensor, aux_target: Optional[Tensor]) -> TaskPlan:
        if aux_target is None:
            raise ValueError(
                "FixedLabels needs the auxiliary labels of every batch: pass "
                "step(..., aux_target=labels)"
            )
        return super().plan(x, y, aux_target)

    def extra_repr(self) -> str:
        return f"psi={list(self.psi)}, weight={self.weight}"


class GeneratedLabels(_Hierarchy, LearnedTask):
    r"""MAXL's generated auxiliary labels, trained by the meta-gradient.

    A label-generation network maps each image to logits over the ``sum(psi)`` auxiliary
    classes; the labels are the softmax over the children of the image's primary class,
    ``masked_softmax(logits / T, y)``. The step trains the network by the exact
    meta-gradient of the primary loss after one look-ahead step of the user's optimiser,
    plus ``entropy_weight`` times ``sum_k pbar_k log pbar_k`` (``pbar`` the batch-mean label),
    which keeps the labels from collapsing onto one child.

    Args:
        psi: auxiliary classes per primary class: one int per class, or one int for all.
        generator: ``"head"`` (default; a small MLP on the model's detached features:
            cheap, and as accurate as ``"copy"`` in our measurements, see
            ``docs/results.md``), ``"copy"`` (a freshly initialised copy of the model's
            architecture with a ``sum(psi)``-way head, as in the paper) or an ``nn.Module``
            mapping ``x`` to ``(N, sum(psi))`` logits.
        entropy_weight: weight of the anti-collapse term ``sum_k pbar_k log pbar_k``.
        confidence_weight: weight of the mean per-image label entropy, added to the
            generator's objective (``0``, the paper's, leaves it out). The paper's
            regulariser spreads the *batch-mean* label and is satisfied by labels that are
            uniform over each class's children for every image, which carry no information;
            with ``confidence_weight = entropy_weight`` the regulariser is minus the mutual
            information between image and label, which asks for a confident, balanced
            partition of each class. In the low-data regimes of docs/results.md it made the
            labels confident without making them informative or the classifier better.
        label_temperature: the labels are ``masked_softmax(logits / T)``; ``T < 1`` sharpens
            them. A freshly initialised generator has small logits, so at ``T = 1`` (the
            paper's) its labels start close to uniform over each class's children and can
            stay there when the meta-gradient is small (see docs/results.md).
        weight: weight of the auxiliary loss in the multi-task loss.

    Attributes:
        generator: the label-generation network (built when the task is attached).
        generator_kind: ``"head"``, ``"copy"`` or ``"module"``.

    Example:
        >>> import torch, torch.nn as nn
        >>> from auxgen import AuxiliaryLabeler, GeneratedLabels
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> task = GeneratedLabels(3, generator="head", entropy_weight=0.4)
        >>> labeler = AuxiliaryLabeler(model, tasks=task)
        >>> labeler.generator is task.generator, task.num_aux
        (True, 6)
    """

    name = "maxl"

    def __init__(
        self,
        psi: PsiSpec,
        *,
        generator: Union[str, nn.Module] = "head",
        entropy_weight: float = 0.2,
        confidence_weight: float = 0.0,
        label_temperature: float = 1.0,
        weight: Union[float, TaskWeight] = 1.0,
    ) -> None:
        super().__init__(psi, weight=weight)
        if isinstance(generator, str):
            if generator not in GENERATORS:
                raise ValueError(
                    f"generator must be one of {GENERATORS} or an nn.Module, got {generator!r}"
                )
        elif not isinstance(generator, nn.Module):
            raise TypeError(
                f"generator must be one of {GENERATORS} or an nn.Module, got "
                f"{type(generator).__name__}"
            )
        self.entropy_weight = check_weight("entropy_weight", entropy_weight)
        self.confidence_weight = check_weight("confidence_weight", confidence_weight)
        if (
            not isinstance(label_temperature, (int, float))
            or isinstance(label_temperature, bool)
            or not math.isfinite(label_temperature)
            or label_temperature <= 0
        ):
            raise ValueError(
                f"label_temperature must be a positive number, got {label_temperature!r}"
            )
        self.label_temperature = float(label_temperature)
        self.generator_kind = generator if isinstance(generator, str) else "module"
        # not registered as a submodule until setup() builds the generator
        object.__setattr__(self, "_generator_spec", generator)
        self.output: OutputSpec = None

    @property
    def needs_features(self) -> bool:
        """Whether the generator reads the model's features (the ``"head"`` generator)."""
        return self.generator_kind == "head"

    def setup(self, ctx: TaskContext) -> None:
        super().setup(ctx)
        spec = self._generator_spec
        object.__setattr__(self, "_generator_spec", None)
        self.output = ctx.output
        if spec == "copy":
            if not isinstance(ctx.classifier, nn.Linear):
                raise ValueError(
                    f"generator='copy' replaces the classifier '{ctx.classifier_name}' by an "
                    f"nn.Linear, but it is a {type(ctx.classifier).__name__}; pass "
                    "generator='head' or a label-generation module"
                )
            gen = copy.deepcopy(ctx.model)
            for hooks in (m._forward_hooks for m in gen.modules()):
                hooks.clear()
            _reinitialise(gen)
            head = nn.Linear(ctx.feature_dim, self.num_aux, **ctx.factory)
            replace_module(gen, ctx.classifier_name, head)
        elif spec == "head":
            hidden = max(ctx.feature_dim, self.num_aux)
            gen = nn.Sequential(
                nn.Linear(ctx.feature_dim, hidden, **ctx.factory),
                nn.ReLU(),
                nn.Linear(hidden, self.num_aux, **ctx.factory),
            )
        else:
            assert isinstance(spec, nn.Module), "GeneratedLabels can be attached only once"
            gen = spec
        self.generator = gen
        shared = {id(p) for p in gen.parameters()} & {id(p) for p in ctx.model.parameters()}
        if shared:
            raise ValueError(
                f"generator shares {len(shared)} parameter(s) with the model; the generator must "
                "be a separate network (use generator='head' to build on the model's features)"
            )

    def logits(self, x: Tensor, h: Optional[Tensor]) -> Tensor:
        """The generator's logits ``(N, sum(psi))``, divided by the temperature.

        Args:
            x: the batch.
            h: its features (needed by the ``"head"`` generator only; see
                :attr:`needs_features`).
        """
        if self.generator_kind == "head":
            if h is None:
                raise ValueError("the 'head' generator needs the batch's features (h)")
            logits = self.generator(h.detach())
        elif self.generator_kind == "copy":  # the model's architecture: its kind of output
            logits = primary_logits(self.generator(x), self.output)
        else:
            logits = primary_logits(self.generator(x))
        if logits.dim() != 2 or logits.shape != (x.shape[0], self.num_aux):
            raise ValueError(
                f"the generator must return (batch, sum(psi)) = ({x.shape[0]}, {self.num_aux}) "
                f"logits, got shape {tuple(logits.shape)}"
            )
        return logits if self.label_temperature == 1.0 else logits / self.label_temperature

    def targets(
        self, plan: TaskPlan, x: Tensor, y: Tensor, h: Tensor, *, grad: bool = False
    ) -> Tensor:
        if plan.targets is not None:
            return plan.targets
        with torch.set_grad_enabled(grad):
            return self.labels(x, y, h)

    def labels(self, x: Tensor, y: Tensor, h: Optional[Tensor]) -> Tensor:
        """The generated labels ``(N, sum(psi))`` of a batch: rows sum to 1 over ``y``'s
        children. ``h`` is the batch's features (needed by the ``"head"`` generator only)."""
        return masked_log_softmax(self.logits(x, h), y, self.owner).exp()

    def meta_parameters(self) -> list[nn.Parameter]:
        return list(self.generator.parameters())

    def regularizer(self, t: Tensor) -> Optional[Tensor]:
        reg = self.entropy_weight * neg_entropy(t)
        if self.confidence_weight:
            reg = reg + self.confidence_weight * mean_entropy(t)
        return reg

    def extra_repr(self) -> str:
        return (
            f"psi={list(self.psi)}, generator={self.generator_kind!r}, weight={self.weight}, "
            f"entropy_weight={self.entropy_weight}, confidence_weight={self.confidence_weight}, "
            f"label_temperature={self.label_temperature}"
        )
