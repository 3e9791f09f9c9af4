"""``AuxiliaryLabeler``: a classifier, its auxiliary heads and tasks, as one ``nn.Module``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .backbone import (
    FeatureTap,
    LogitsLocator,
    OutputSpec,
    check_output_spec,
    feature_dim_of,
    find_classifier,
    num_classes_of,
)
from .checkpoint import current_name
from .checks import (
    check_batch,
    check_grad_enabled,
    check_meta_batch,
    check_optimizers,
    check_step_options,
)
from .distributed import Ranks, check_sync_batchnorm
from .loop import loop_state, loss_forward, meta_update, trained_head_parameters
from .losses import Criterion
from .meta import JVPPlan
from .step import Batch, NonFiniteError, Pending, StepParts, kept_buffers, training_step
from .tasks import AuxiliaryTask, GeneratedLabels, TaskContext, TransformLabels, as_task_list

__all__ = ["AuxiliaryLabeler", "NonFiniteError"]

Tasks = Union[AuxiliaryTask, Sequence[AuxiliaryTask], None]


class AuxiliaryLabeler(nn.Module):
    r"""Give a classifier auxiliary tasks: ``tasks=`` (or ``psi=`` for MAXL) says which.

    Wraps the user's ``model`` (its own classifier produces the primary logits), gives each
    auxiliary task an auxiliary head ``nn.Linear(feature_dim, task.num_outputs)`` on the
    features that feed that classifier, and trains them together with :meth:`step`: one
    forward of the model, primary + weighted auxiliary losses, one step of the user's
    optimiser; for a learned task (:class:`~auxgen.GeneratedLabels`) also the exact MAXL
    meta-gradient through that step.

    Args:
        model: the classifier to train (timm, torchvision or any ``nn.Module`` whose
            classifier can be found; see ``classifier=``).
        psi: shorthand for ``tasks=GeneratedLabels(psi)`` (MAXL with its defaults):
            auxiliary classes per primary class, one int per class or one int for all.
        tasks: the auxiliary task or tasks (:class:`~auxgen.GeneratedLabels`,
            :class:`~auxgen.FixedLabels`, :class:`~auxgen.TransformLabels` or your own
            :class:`~auxgen.tasks.AuxiliaryTask`); ``[]`` trains the model alone.
        num_classes: number of primary classes, checked against the classifier.
        loss: ``"ce"`` (default; cross-entropy and soft-label cross-entropy) or ``"focal"``
            (the MAXL paper's focal loss, ``gamma=focal_gamma``), for every loss.
        feature_dim: width of the classifier's input, when it cannot be inferred (a feature
            map ``(N, C, H, W)`` is average-pooled globally).
        classifier: the classifier submodule or its qualified name, to override detection.
        output: where the primary logits are when the model does not return a tensor (a
            key, an index or a callable; see :func:`auxgen.backbone.primary_logits`).
        meta: ``"second_order"`` (default: the exact meta-gradient, by forward-mode or
            double-backward JVP, chosen at the first meta step: :attr:`meta_mode_used`),
            ``"first_order"`` (finite-difference JVP), or ``"forward_ad"`` /
            ``"double_backward"`` to force one (see docs/method.md).
        meta_every: update the learned tasks every ``meta_every``-th step (amortised MAXL).
        focal_gamma: focusing parameter of the focal loss.
        fd_eps: relative step of ``first_order``'s finite difference (default
            ``sqrt(machine eps)``).
        nonfinite: ``"raise"`` (default: :class:`NonFiniteError`) or ``"skip"`` (report
            ``skipped=1``) on a non-finite loss or gradient; nothing changes either way.
        distributed: average gradients across ``torch.distributed`` ranks (``None``: when a
            process group of several ranks exists; ``False``: never).
        process_group: the process group to average over (default: the world).
        lookahead: ``"exact"`` (default): the look-ahead mirrors the optimiser exactly
            (:data:`~auxgen.SUPPORTED_OPTIMIZERS`); ``"sgd"``: others are approximated by
            plain SGD at each group's learning rate (the paper's approximation).
        diagnostics: report ``grad_cosine``, the cosine between the primary and auxiliary
            gradients on the shared parameters (one extra backward per step).
        buffers: how buffers agree across ranks after a step: ``"broadcast"`` (default, as
            ``DistributedDataParallel``), ``"average"`` or ``"local"`` (docs/distributed.md).

    Attributes:
        model: the wrapped classifier, unchanged (``labeler(x)`` is ``model(x)``).
        tasks: the auxiliary tasks (an ``nn.ModuleList``).
        aux_heads: one ``nn.Linear(feature_dim, task.num_outputs)`` per task.
        num_classes: number of primary classes.
        feature_dim: width of the classifier's input.
        classifier_name: qualified name of the classifier inside ``model``.

    Example:
        >>> import torch, torch.nn as nn
        >>> from auxgen import AuxiliaryLabeler
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> labeler = AuxiliaryLabeler(model, psi=[2, 3, 2])
        >>> opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1, momentum=0.9)
        >>> gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=1e-3)
        >>> x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
        >>> out = labeler.step(x, y, opt, gen_opt)
        >>> sorted(k for k in out if k.endswith("loss"))
        ['aux_loss', 'loss', 'meta_loss', 'primary_loss']
        >>> labeler.generate_labels(x, y).sum(1).allclose(torch.ones(8))
        True
    """

    # 1: one head and MAXL's generator on the labeler (aux_head.*, generator.*); 2: the heads
    # on the labeler (aux_heads.*) and a LearnedWeight wrapping its task; 3: each task owns
    # its head and its weight (tasks.<i>.head.*, tasks.<i>.loss_weight.*)
    _version = 3

    def __init__(
        self,
        model: nn.Module,
        psi: Union[int, Sequence[int], None] = None,
        *,
        tasks: Tasks = None,
        num_classes: Optional[int] = None,
        loss: str = "ce",
        feature_dim: Optional[int] = None,
        classifier: Union[str, nn.Module, None] = None,
        output: OutputSpec = None,
        meta: str = "second_order",
        meta_every: int = 1,
        focal_gamma: float = 2.0,
        fd_eps: Optional[float] = None,
        nonfinite: str = "raise",
        distributed: Optional[bool] = None,
        process_group: Optional[Any] = None,
        lookahead: str = "exact",
        diagnostics: bool = False,
        buffers: str = "broadcast",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        (self.loss, self.meta, self.lookahead, self.nonfinite, self.meta_every,
         self.diagnostics, self.fd_eps) = check_step_options(
            loss, meta, lookahead, nonfinite, meta_every, diagnostics, fd_eps
        )  # fmt: skip
        self.focal_gamma = float(focal_gamma)
        self._ranks = Ranks(distributed, process_group, buffers)
        self.output = check_output_spec(output)
        task_list = as_task_list(psi, tasks)
        self.classifier_name, cls_module = find_classifier(model, classifier)
        self.num_classes = num_classes_of(
            self.classifier_name, cls_module, num_classes, [t.class_count() for t in task_list]
        )
        self.feature_dim = feature_dim_of(model, cls_module, feature_dim)
        ref = next(model.parameters(), None)
        factory = {"dtype": ref.dtype, "device": ref.device} if ref is not None else {}
        # finds (and at the first forwards checks) the logits: the classifier's output
        self._locator = LogitsLocator(self.output, self.classifier_name, self.num_classes)
        ctx = TaskContext(
            model, self.num_classes, self.feature_dim, self.classifier_name, cls_module,
            self._locator, factory,
        )  # fmt: skip
        for task in task_list:
            task.attach(ctx)  # its setup, its outputs and its head
        self.model = model
        self.tasks = nn.ModuleList(task_list)
        self._tap = FeatureTap(cls_module, self.classifier_name, self.feature_dim, self._locator)
        self._jvp = JVPPlan(meta)
        self._step_parts = StepParts(
            model, self._tap, tuple(task_list), self._locator,
            Criterion(self.loss, self.focal_gamma), self._jvp, self._ranks, self.classifier_name,
            self.fd_eps, self.nonfinite, self.diagnostics,
        )  # fmt: skip
        self._approximated: set[type] = set()
        self._steps = 0
        self._synced = False
        self.__dict__.update(loop_state(task_list))  # the loss form's state (loop.py)
        self._pending: Optional[Pending]

    # ------------------------------------------------------------ the first tasks
    def _first(self, what: str, test: Any) -> Any:
        """The first task for which ``test(task)`` holds, else ``AttributeError``."""
        found = next((task for task in self.tasks if test(task)), None)
        if found is None:
            raise AttributeError(f"the labeler has no {what} task")
        return found

    @property
    def aux_heads(self) -> nn.ModuleList:
        """The tasks' auxiliary heads, in task order (each task owns its head)."""
        return nn.ModuleList(task.head for task in self.tasks)

    @property
    def aux_head(self) -> nn.Linear:
        """The first task's auxiliary head."""
        if len(self.tasks) == 0:
            raise AttributeError("the labeler has no auxiliary task, so no auxiliary head")
        return self.tasks[0].head  # type: ignore[return-value]

    @property
    def generator(self) -> nn.Module:
        """The label-generation network of the first :class:`~auxgen.GeneratedLabels`."""
        return self._first("GeneratedLabels", _is(GeneratedLabels)).generator

    @property
    def owner(self) -> Tensor:
        """``owner`` index of the first task that has a hierarchy of auxiliary classes."""
        return self._first("hierarchical", lambda t: hasattr(t, "owner")).owner

    @property
    def meta_mode_used(self) -> Optional[str]:
        """How the meta-gradient is computed: ``"forward_ad"``, ``"double_backward"``
        (both exact) or ``"first_order"``; ``None`` before the first meta step."""
        return self._jvp.mode

    # --------------------------------------------------------------- parameters
    def model_parameters(self) -> list[nn.Parameter]:
        """Parameters of the multi-task network: the model and the auxiliary heads."""
        return [*self.model.parameters(), *(p for t in self.tasks for p in t.head.parameters())]

    def generator_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the meta-gradient (MAXL's label-generation network)."""
        return [p for task in self.tasks for p in task.meta_parameters()]

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: Tensor, y: Optional[Tensor] = None, *, aux_target: Optional[Tensor] = None
    ) -> Any:
        """Primary logits, or with labels the multi-task loss to ``backward()`` yourself.

        ``labeler(x)`` is the model's primary logits: ``self.model(x)`` when it returns a
        tensor, else the logits found in its output (see ``output=``), so
        ``labeler(x).argmax(1)`` always works.

        ``labeler(x, y)`` forwards the batch and every task's views once (BatchNorm
        statistics move once) and returns the multi-task loss; your loop does the rest
        (``backward``, clipping, a ``GradScaler``, accumulation, the optimiser, the
        scheduler). Being ``forward``, it is synchronised by the wrappers that act on
        ``forward`` (``DistributedDataParallel``, FSDP, Accelerate, Lightning). A learned
        task is then updated by :meth:`meta_step` between ``backward`` and ``opt.step()``.

        Args:
            x: input batch.
            y: ``(batch,)`` primary labels in ``[0, num_classes)``; ``None`` for logits.
            aux_target: fixed auxiliary labels for the tasks that take them
                (:class:`~auxgen.FixedLabels`), as in :meth:`step`.

        Returns:
            Without ``y``, the primary logits. With ``y``, a dict: ``loss`` (scalar: primary
            + weighted auxiliary losses), ``primary_loss``, ``aux_loss`` (the tasks'
            unweighted losses summed), ``task_losses`` (by task name) and ``logits`` (the
            batch's primary logits); all attached to the graph.

        Raises:
            ValueError: if the optimiser stepped the model but not the auxiliary heads (it
                was built from ``model.parameters()``), or the logits are not what they seem.

        Example:
            >>> import torch, torch.nn as nn
            >>> from auxgen import AuxiliaryLabeler, TransformLabels
            >>> model = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 2))
            >>> labeler = AuxiliaryLabeler(model, tasks=TransformLabels())
            >>> opt = torch.optim.SGD(labeler.parameters(), lr=0.1)
            >>> out = labeler(torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 0, 1]))
            >>> out["loss"].backward(); opt.step()
            >>> sorted(out)
            ['aux_loss', 'logits', 'loss', 'primary_loss', 'task_losses']
        """
        if y is None:
            if aux_target is not None:
                raise ValueError("aux_target was given without labels y; call labeler(x, y, ...)")
            if not self._locator.verified:  # the first forwards check what the logits are
                return self.features(x)[0]
            z = self._locator(self.model(x))
            self._locator.check_width(z)
            return z
        return loss_forward(self, x, y, aux_target)

    def meta_step(
        self,
        optimizer: torch.optim.Optimizer,
        gen_optimizer: torch.optim.Optimizer,
        *,
        meta_batch: Optional[tuple[Tensor, Tensor]] = None,
        scaler: Optional[Any] = None,
    ) -> dict[str, Any]:
        """Update the learned tasks by MAXL's meta-gradient, inside your own training loop.

        Call it after ``labeler(x, y)["loss"].backward()`` and before ``optimizer.step()``:
        it reads ``.grad`` (averaged by ``DistributedDataParallel`` when it wraps the
        labeler) and ``optimizer``'s state, looks one differentiable step of ``optimizer``
        ahead on the unwrapped model and steps ``gen_optimizer`` with the exact
        meta-gradient, averaged across ranks. The model, its buffers, ``optimizer`` and
        ``.grad`` are left as they were. A no-op when no learned task took part in the last
        training forward (none, weight 0, or not a ``meta_every``-th step). With gradient
        accumulation it uses the last micro-batch's targets; clipping done before it counts
        as a fixed rescaling of the gradients.

        Args:
            optimizer: the model's optimiser (a ``torch.optim`` optimiser, or a wrapper of
                one with an ``optimizer`` attribute: Accelerate's, Lightning's); one of
                :data:`~auxgen.SUPPORTED_OPTIMIZERS` (any with ``lookahead="sgd"``). It may
                hold every one of :meth:`parameters`: the meta-gradient is not left in the
                generator's ``.grad`` when ``optimizer`` holds it, so it is applied once.
            gen_optimizer: the optimiser over :meth:`generator_parameters`.
            meta_batch: ``(x_m, y_m)``: measure the meta loss on this batch instead.
            scaler: the ``torch.amp.GradScaler`` of an fp16 loop: the gradients are
                unscaled first (``scaler.unscale_(optimizer)``, unless already done) and a
                step whose gradients overflowed is skipped (the scaler skips it too).

        Returns:
            ``meta_loss`` (the primary loss after the look-ahead plus the regularisers;
            ``None`` without an update), ``meta_updated``, ``meta_mode``, ``skipped``.

        Raises:
            RuntimeError: if a learned task exists but no training forward ``labeler(x,
                y)`` came before, or ``optimizer`` holds no gradients (no ``backward``).
            NonFiniteError: on non-finite gradients or meta-gradients with
                ``nonfinite="raise"`` and no ``scaler``.

        Example:
            >>> import torch, torch.nn as nn
            >>> from auxgen import AuxiliaryLabeler
            >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
            >>> labeler = AuxiliaryLabeler(model, psi=2)
            >>> opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1, momentum=0.9)
            >>> gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=1e-3)
            >>> labeler(torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,)))["loss"].backward()
            >>> labeler.meta_step(opt, gen_opt)["meta_updated"]
            True
            >>> opt.step()
        """
        return meta_update(self, optimizer, gen_optimizer, meta_batch, scaler)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **loop_state(list(self.tasks))}  # no pending forward

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Primary logits and the classifier's input features ``(N, feature_dim)``."""
        out, h = self._tap.run(lambda: self.model(x))
        return self._locator(out), h

    def forward_all(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Primary logits and the first task's auxiliary logits, from one forward."""
        z, h = self.features(x)
        return z, self.aux_head(h)

    @torch.no_grad()
    def generate_labels(self, x: Tensor, y: Tensor) -> Tensor:
        """Soft auxiliary labels ``(N, sum(psi))`` of the first
        :class:`~auxgen.GeneratedLabels` task: rows sum to 1 over ``y``'s children.

        Uses the current train/eval mode; buffers (BatchNorm statistics) are left as they
        were.
        """
        task = self._first("GeneratedLabels", _is(GeneratedLabels))
        x, y = self._check_batch(x, y)
        with kept_buffers(self):
            h = self.features(x)[1] if task.needs_features else None
            return task.labels(x, y, h)

    @torch.no_grad()
    def aggregated_log_probs(self, x: Tensor) -> Tensor:
        """SLA's aggregated prediction ``(N, num_classes)`` of the first
        :class:`~auxgen.TransformLabels` task with a joint head: the mean over the
        transformed views of the joint log-probability of each class under the right
        transform. Its argmax is a class; call it in eval mode (a forward of ``K`` views).
        Buffers (BatchNorm statistics) are left as they were, whatever the mode.

        With the whole-image rotations it adds about half a point over the single pass on
        5% of CIFAR-100; with :func:`~auxgen.patch_rotations` (random patches, the default on
        non-square images) it lost about a point there, so predict with ``labeler(x)``
        (docs/results.md, "Any image shape").
        """
        task = self._first("TransformLabels (joint head)", _is(TransformLabels, joint=True))
        with kept_buffers(self):
            return task.aggregated_log_probs(lambda v: self.features(v)[1], x)

    # -------------------------------------------------------------------- step
    def step(
        self,
        x: Tensor,
        y: Tensor,
        optimizer: torch.optim.Optimizer,
        gen_optimizer: Optional[torch.optim.Optimizer] = None,
        *,
        aux_target: Optional[Tensor] = None,
        meta_batch: Optional[tuple[Tensor, Tensor]] = None,
    ) -> dict[str, Any]:
        """One MAXL training step: the multi-task network and the learned tasks (if any).

        One forward of the model on the batch and every task's views (BatchNorm statistics
        move as in one ordinary training forward), the primary loss on the batch plus each
        task's weighted loss, and ``optimizer``'s step; on a meta step (``gen_optimizer``
        given, every ``meta_every``-th step) also the exact meta-gradient of the learned
        tasks through one differentiable step of ``optimizer``, and ``gen_optimizer``'s step.
        ``.grad`` holds this step's gradients afterwards (``None`` after a skipped step).

        Args:
            x: input batch.
            y: ``(batch,)`` primary labels in ``[0, num_classes)``.
            optimizer: an optimiser over :meth:`model_parameters` or a subset of them; one
                of :data:`~auxgen.SUPPORTED_OPTIMIZERS` when a task is learned (any with
                ``lookahead="sgd"``).
            gen_optimizer: optimiser over :meth:`generator_parameters`; ``None`` keeps the
                learned tasks fixed.
            aux_target: fixed auxiliary labels for the tasks that take them
                (:class:`~auxgen.FixedLabels`; :class:`~auxgen.GeneratedLabels` then uses
                them instead of its own and skips the meta step): ``(batch,)`` auxiliary
                class indices or ``(batch, sum(psi))`` soft labels.
            meta_batch: ``(x_m, y_m)``: measure the meta loss (the primary loss after the
                look-ahead) on this batch instead of ``(x, y)`` (the next training batch, or
                a held-out batch as in AuxiLearn).

        Returns:
            ``loss``, ``primary_loss``, ``aux_loss`` (the tasks' unweighted losses summed),
            ``task_losses`` (by task name), ``meta_loss`` (``None`` without a meta update),
            ``logits`` (the batch's, detached), ``meta_updated``, ``meta_mode`` and
            ``skipped``; with ``diagnostics=True`` also ``grad_cosine``.

        Raises:
            NonFiniteError: on a non-finite loss or gradient with ``nonfinite="raise"``.
        """
        check_grad_enabled("step()")
        x, y = self._check_batch(x, y)
        meta_xy = check_meta_batch(meta_batch, x, self.num_classes, self._device(), self._what())
        check_optimizers(
            optimizer, gen_optimizer, self.model_parameters(), self.generator_parameters(),
            self.lookahead, self._approximated, any(t.learned for t in self.tasks),
            required=trained_head_parameters(self),
        )  # fmt: skip
        if aux_target is not None and not any(t.takes_aux_target for t in self.tasks):
            raise ValueError("aux_target was given but no task takes auxiliary labels")
        self._guard.reset()  # the next training forward starts a fresh comparison
        do_meta = (
            gen_optimizer is not None
            and aux_target is None
            and any(t.learned and t.weight > 0 for t in self.tasks)
            and self._steps % self.meta_every == 0
        )
        check_sync_batchnorm(self, x)
        if not self._synced and self._ranks.world() > 1:
            self.broadcast_state()
        batch = Batch(x, y, aux_target, meta_xy)
        out = training_step(
            self._step_parts, self, batch, optimizer, gen_optimizer if do_meta else None, do_meta
        )
        if not out["skipped"]:
            self._steps += 1
            self.sync_buffers()
        return out

    def _parts(self) -> StepParts:
        """What a step needs from the labeler, built once at construction."""
        return self._step_parts

    def _device(self) -> torch.device:
        ref = next(self.parameters(), None)
        return ref.device if ref is not None else torch.device("cpu")

    def _what(self) -> str:
        return "len(psi)" if any(hasattr(t, "owner") for t in self.tasks) else "num_classes"

    def _check_batch(self, x: Any, y: Any) -> tuple[Tensor, Tensor]:
        return check_batch(x, y, self.num_classes, self._device(), self._what())

    # ------------------------------------------------------------- distributed
    def broadcast_state(self, src: Optional[int] = None) -> None:
        """Copy rank ``src``'s parameters and buffers to every rank.

        :meth:`step` calls it once, on the first step taken with world size > 1 (as
        ``DistributedDataParallel`` does at construction); call it again after loading a
        checkpoint on one rank only. A no-op without a process group.

        Args:
            src: global rank to copy from (default: the first rank of ``process_group``).
        """
        if self._ranks.world() == 1:
            return
        self._ranks.broadcast([*self.parameters(), *self.buffers()], src)
        self._synced = True

    def sync_buffers(self) -> None:
        """Make the buffers agree across ranks as ``buffers=`` says (``step`` calls it).

        A no-op without a process group; like :meth:`step`, every rank of the group must
        call it.
        """
        self._ranks.sync_buffers(self.buffers())

    # -------------------------------------------------------------- state dict
    def get_extra_state(self) -> dict[str, int]:
        """Saved in ``state_dict()``: the step counter that schedules ``meta_every``."""
        return {"steps": self._steps}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self._steps = int(state["steps"])

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            renamed = current_name(key[len(prefix) :])
            if renamed is not None:
                state_dict[prefix + renamed] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, loss={self.loss!r}, meta={self.meta!r}, "
            f"meta_every={self.meta_every}"
        )


def _is(kind: type, joint: bool = False) -> Any:
    """A test: the task is a ``kind`` (with a joint head, if ``joint``)."""

    def test(task: AuxiliaryTask) -> bool:
        return isinstance(task, kind) and not (joint and task.form == "predict")

    return test
