"""``AuxiliaryLabeler``: MAXL for any classifier, as one ``nn.Module``."""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from .backbone import (
    OutputSpec,
    check_output_spec,
    classifier_out_features,
    feature_dim_of,
    find_classifier,
    primary_logits,
    replace_module,
)
from .hierarchy import masked_log_softmax, normalize_psi, owner_index
from .losses import LOSSES, mean_entropy, neg_entropy, per_class_loss, primary_loss
from .meta import META_MODES, JVPPlan, RNGState, lookahead_direction, meta_jvp
from .mirror import LOOKAHEADS, check_optimizer, is_mirrored, sgd_stand_in

__all__ = ["AuxiliaryLabeler", "NonFiniteError"]

logger = logging.getLogger(__name__)

GENERATORS = ("copy", "head")
NONFINITE = ("raise", "skip")
BUFFER_MODES = ("broadcast", "average", "local")


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite loss or gradient; nothing was updated."""


def _reinitialise(module: nn.Module) -> None:
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
        reset_stats = getattr(m, "reset_running_stats", None)
        if callable(reset_stats):
            reset_stats()


def _widen(z: Tensor) -> Tensor:
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _all_finite(tensors: Sequence[Optional[Tensor]]) -> bool:
    present = [t.detach() for t in tensors if t is not None]
    if not present:
        return True
    # The L2 norm is fast and finite only if every entry is; it can also overflow, so a
    # non-finite L2 norm is confirmed with the max-norm (NaN/inf exactly when an entry is).
    if bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(present)])).all()):
        return True
    peaks = torch._foreach_norm(present, ord=float("inf"))
    return bool(torch.isfinite(torch.stack([p.float() for p in peaks])).all())


class AuxiliaryLabeler(nn.Module):
    r"""Give a classifier a self-supervised auxiliary task with Meta AuXiliary Learning.

    Wraps the user's ``model`` (its own classifier produces the primary logits) and adds an
    auxiliary head on the features that feed that classifier, plus a label-generation
    network that invents ``sum(psi)`` auxiliary classes (primary class ``i`` owns ``psi[i]``
    of them). :meth:`step` trains the multi-task network on primary + auxiliary loss and the
    generator by the exact MAXL meta-gradient through one step of the user's own optimiser.

    Args:
        model: the classifier to train (timm, torchvision or any ``nn.Module`` whose
            classifier can be found; see ``classifier=``).
        psi: auxiliary classes per primary class: one int per class, or one int for all
            (then ``num_classes`` is taken from the classifier or ``num_classes=``).
        num_classes: number of primary classes, checked against the classifier.
        generator: ``"head"`` (default; a small MLP on the model's detached features:
            cheap, and as accurate as ``"copy"`` in our measurements, see
            ``docs/results.md``), ``"copy"`` (a freshly initialised copy of ``model``'s
            architecture with a ``sum(psi)``-way head, as in the paper) or an ``nn.Module``
            mapping ``x`` to ``(N, sum(psi))`` logits.
        loss: ``"ce"`` (default; cross-entropy and soft-label cross-entropy) or ``"focal"``
            (the paper's focal loss, ``gamma=focal_gamma``).
        aux_weight: weight of the auxiliary loss in the multi-task loss.
        entropy_weight: weight of the anti-collapse term ``sum_k pbar_k log pbar_k``.
        confidence_weight: weight of the mean per-image label entropy, added to the
            generator's objective (``0``, the paper's, leaves it out). The paper's
            regulariser spreads the *batch-mean* label and is satisfied by labels that are
            uniform over each class's children for every image, which carry no information;
            with ``confidence_weight = entropy_weight`` the regulariser is minus the mutual
            information between image and label, which asks for a confident, balanced
            partition of each class. In the low-data regimes of docs/results.md it made the
            labels confident without making them informative or the classifier better.
        label_temperature: the generated labels are ``masked_softmax(logits / T)``; ``T < 1``
            sharpens them. A freshly initialised generator has small logits, so at ``T = 1``
            (the paper's) its labels start close to uniform over each class's children and
            can stay there when the meta-gradient is small (see docs/results.md).
        feature_dim: width (channels) of the classifier's input, when it cannot be inferred
            (from the first ``Linear``/convolution in the classifier, or timm's
            ``head_hidden_size`` / ``num_features``). When the classifier's input is a
            feature map ``(N, C, H, W)`` (a convolutional classifier such as SqueezeNet's),
            the auxiliary head and the ``"head"`` generator see it globally average-pooled.
        classifier: the classifier submodule or its qualified name, to override detection.
        output: how to find the primary logits when the model does not return a tensor.
            ``None`` (default): a ``logits`` attribute or key (Hugging Face
            ``ModelOutput``, a dict), else the first element of a tuple (torchvision
            GoogLeNet/Inception's named tuples in training mode); the rest is ignored. A str
            picks that key or attribute, an int that element, a callable maps the output to
            the logits.
        meta: ``"second_order"`` (default: the exact meta-gradient; forward-mode JVP, or
            a double-backward JVP where an op has no forward-AD formula, chosen at the first
            meta step and reported by :attr:`meta_mode_used`; only where neither formula
            exists, ``"first_order"`` with a warning), ``"first_order"`` (finite-difference
            JVP; needs no derivative formulas), or ``"forward_ad"`` /
            ``"double_backward"`` to force one exact implementation.
        meta_every: update the generator every ``meta_every``-th step (amortised MAXL);
            steps in between cost one generator forward.
        focal_gamma: focusing parameter of the focal loss.
        fd_eps: relative step of ``first_order``'s finite difference (default
            ``sqrt(machine eps)``).
        nonfinite: ``"raise"`` (default) raises :class:`NonFiniteError` when a loss or
            gradient is not finite; ``"skip"`` skips the step and reports ``skipped=1``.
            Either way no parameter, buffer or optimiser state changes.
        distributed: average gradients across ``torch.distributed`` ranks in
            :meth:`step` (``None``: whenever a process group with world size > 1 is
            initialised; ``False``: never).
        process_group: the process group to average over (default: the world).
        lookahead: ``"exact"`` (default): the meta-gradient's look-ahead mirrors the
            optimiser exactly (:data:`~auxgen.SUPPORTED_OPTIMIZERS`; any other raises
            ``TypeError``); ``"sgd"``: optimisers that are not mirrored are approximated
            by plain SGD at each group's current learning rate (the paper's
            approximation), with a one-time warning.
        diagnostics: report in :meth:`step`'s output ``grad_cosine``, the cosine
            similarity between the primary-loss and the auxiliary-loss gradients on the
            shared parameters (the model's, less its classifier), at the cost of one extra
            backward of the primary loss per step; nothing is computed when ``False``.
        buffers: how buffers (BatchNorm running statistics, ...) of the model, auxiliary head
            and generator agree across ranks after each step: ``"broadcast"`` (default)
            copies the group's first rank's buffers to every rank, as
            ``DistributedDataParallel(broadcast_buffers=True)`` does; ``"average"`` sets
            floating-point buffers to their mean over the ranks (others are broadcast);
            ``"local"`` leaves each rank with its own. A model holding
            ``nn.SyncBatchNorm`` must run on GPUs: on the CPU, :meth:`step` raises
            ``ValueError`` inside a process group.

    Attributes:
        model: the wrapped classifier, unchanged (``labeler(x)`` is ``model(x)``).
        aux_head: ``nn.Linear(feature_dim, sum(psi))`` on the classifier's input features.
        generator: the label-generation network.
        psi: auxiliary classes per primary class (a tuple).
        num_classes: number of primary classes, ``len(psi)``.
        num_aux: number of auxiliary classes, ``sum(psi)``.
        owner: buffer ``(sum(psi),)``: the primary class owning each auxiliary class.
        feature_dim: width of the classifier's input.
        classifier_name: qualified name of the classifier inside ``model``.
        generator_kind: ``"head"``, ``"copy"`` or ``"module"`` (a module passed in).
        output: how the primary logits are found in the model's output (``output=``).

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

    def __init__(
        self,
        model: nn.Module,
        psi: Union[int, Sequence[int]],
        *,
        num_classes: Optional[int] = None,
        generator: Union[str, nn.Module] = "head",
        loss: str = "ce",
        aux_weight: float = 1.0,
        entropy_weight: float = 0.2,
        confidence_weight: float = 0.0,
        label_temperature: float = 1.0,
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
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if meta not in META_MODES:
            raise ValueError(f"meta must be one of {META_MODES}, got {meta!r}")
        if lookahead not in LOOKAHEADS:
            raise ValueError(f"lookahead must be one of {LOOKAHEADS}, got {lookahead!r}")
        if not isinstance(diagnostics, bool):
            raise TypeError(f"diagnostics must be a bool, got {type(diagnostics).__name__}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if buffers not in BUFFER_MODES:
            raise ValueError(f"buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        if isinstance(meta_every, bool) or not isinstance(meta_every, int) or meta_every < 1:
            raise ValueError(f"meta_every must be a positive int, got {meta_every!r}")
        for name, val in (
            ("aux_weight", aux_weight),
            ("entropy_weight", entropy_weight),
            ("confidence_weight", confidence_weight),
        ):
            if not isinstance(val, (int, float)) or isinstance(val, bool) or val < 0:
                raise ValueError(f"{name} must be a non-negative number, got {val!r}")
        if (
            not isinstance(label_temperature, (int, float))
            or isinstance(label_temperature, bool)
            or not math.isfinite(label_temperature)
            or label_temperature <= 0
        ):
            raise ValueError(
                f"label_temperature must be a positive number, got {label_temperature!r}"
            )
        if fd_eps is not None and not (isinstance(fd_eps, float) and fd_eps > 0):
            raise ValueError(f"fd_eps must be a positive float or None, got {fd_eps!r}")

        self.output = check_output_spec(output)
        cls_name, cls_module = find_classifier(model, classifier)
        out_features = classifier_out_features(cls_module)
        if num_classes is None:
            num_classes = out_features
            if num_classes is None and not isinstance(psi, int):
                num_classes = len(psi)  # type: ignore[arg-type]
        elif out_features is not None and out_features != num_classes:
            raise ValueError(
                f"num_classes={num_classes} does not match the classifier "
                f"'{cls_name}' ({out_features} outputs)"
            )
        self.psi: tuple[int, ...] = normalize_psi(psi, num_classes)
        if out_features is not None and len(self.psi) != out_features:
            raise ValueError(
                f"psi must have one entry per primary class (the classifier '{cls_name}' has "
                f"{out_features} outputs), got {len(self.psi)}"
            )
        self.num_classes = len(self.psi)
        self.num_aux = sum(self.psi)
        dim = feature_dim_of(model, cls_module, feature_dim)
        ref = next(model.parameters(), None)
        factory = {"dtype": ref.dtype, "device": ref.device} if ref is not None else {}

        self.loss = loss
        self.focal_gamma = float(focal_gamma)
        self.aux_weight = float(aux_weight)
        self.entropy_weight = float(entropy_weight)
        self.confidence_weight = float(confidence_weight)
        self.label_temperature = float(label_temperature)
        self.meta = meta
        self.meta_every = meta_every
        self.fd_eps = fd_eps
        self.nonfinite = nonfinite
        self.distributed = distributed
        self.process_group = process_group
        self.lookahead = lookahead
        self.diagnostics = diagnostics
        self._approximated: set[type] = set()
        self.buffer_sync = buffers
        self.classifier_name = cls_name
        self.feature_dim = dim

        if isinstance(generator, str):
            if generator not in GENERATORS:
                raise ValueError(
                    f"generator must be one of {GENERATORS} or an nn.Module, got {generator!r}"
                )
            self.generator_kind = generator
            if generator == "copy":
                if not isinstance(cls_module, nn.Linear):
                    raise ValueError(
                        f"generator='copy' replaces the classifier '{cls_name}' by an nn.Linear, "
                        f"but it is a {type(cls_module).__name__}; pass generator='head' or a "
                        "label-generation module"
                    )
                gen = copy.deepcopy(model)
                for hooks in (m._forward_hooks for m in gen.modules()):
                    hooks.clear()
                _reinitialise(gen)
                replace_module(gen, cls_name, nn.Linear(dim, self.num_aux, **factory))
            else:
                hidden = max(dim, self.num_aux)
                gen = nn.Sequential(
                    nn.Linear(dim, hidden, **factory),
                    nn.ReLU(),
                    nn.Linear(hidden, self.num_aux, **factory),
                )
        elif isinstance(generator, nn.Module):
            self.generator_kind = "module"
            gen = generator
        else:
            raise TypeError(
                f"generator must be one of {GENERATORS} or an nn.Module, got "
                f"{type(generator).__name__}"
            )

        self.model = model
        self.aux_head = nn.Linear(dim, self.num_aux, **factory)
        self.generator = gen
        self.register_buffer("owner", owner_index(self.psi, device=factory.get("device")))
        shared = {id(p) for p in self.generator.parameters()} & {
            id(p) for p in self.model_parameters()
        }
        if shared:
            raise ValueError(
                f"generator shares {len(shared)} parameter(s) with the model; the generator must "
                "be a separate network (use generator='head' to build on the model's features)"
            )
        self._features: Optional[Tensor] = None
        self._listening = False
        self._hook = cls_module.register_forward_hook(self._capture)
        self._steps = 0
        self._synced = False
        self._jvp = JVPPlan(meta)

    # ------------------------------------------------------------------ wiring
    def _capture(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        # Only while the labeler runs the model itself: a user's own model(x) call must not
        # leave its features (and their autograd graph) referenced here.
        if self._listening:
            self._features = inputs[0]

    def _features_of(self, run: Any) -> tuple[Any, Tensor]:
        """Run ``run()`` (a forward of the model) and return its output and the features."""
        self._listening, self._features = True, None
        try:
            out = run()
        finally:
            self._listening = False
        return out, self._take_features()

    def _take_features(self) -> Tensor:
        h = self._features
        self._features = None
        if h is None:
            raise RuntimeError(
                f"the classifier '{self.classifier_name}' was not called during the model's "
                "forward; pass classifier= naming the module that produces the primary logits"
            )
        if h.dim() > 2:
            if h.shape[1] == self.feature_dim:  # a (N, C, *spatial) feature map: global pool
                h = h.mean(dim=tuple(range(2, h.dim())))
            else:
                h = h.flatten(1)
        if h.shape[1] != self.feature_dim:
            raise ValueError(
                f"the classifier's input has {h.shape[1]} features, expected feature_dim="
                f"{self.feature_dim}"
            )
        return h

    @property
    def meta_mode_used(self) -> Optional[str]:
        """How the meta-gradient is computed: ``"forward_ad"``, ``"double_backward"``
        (both exact) or ``"first_order"``; ``None`` before the first meta step."""
        return self._jvp.mode

    def model_parameters(self) -> list[nn.Parameter]:
        """Parameters of the multi-task network: the model and the auxiliary head."""
        return list(self.model.parameters()) + list(self.aux_head.parameters())

    def generator_parameters(self) -> list[nn.Parameter]:
        """Parameters of the label-generation network."""
        return list(self.generator.parameters())

    def _logits(self, out: Any) -> Tensor:
        return primary_logits(out, self.output)

    def forward(self, x: Tensor) -> Tensor:
        """Primary logits: ``self.model(x)`` when it returns a tensor, else the logits found
        in its output (see ``output=``), so ``labeler(x).argmax(1)`` always works."""
        return self._logits(self.model(x))

    def forward_all(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Primary and auxiliary logits from one forward of the model."""
        out, h = self._features_of(lambda: self.model(x))
        return self._logits(out), self.aux_head(h)

    def _generator_logits(self, x: Tensor, h: Optional[Tensor]) -> Tensor:
        if self.generator_kind == "head":
            if h is None:
                _, h = self._features_of(lambda: self.model(x))
            logits = self.generator(h.detach())
        elif self.generator_kind == "copy":  # the model's architecture: its kind of output
            logits = self._logits(self.generator(x))
        else:
            logits = primary_logits(self.generator(x))
        if logits.dim() != 2 or logits.shape != (x.shape[0], self.num_aux):
            raise ValueError(
                f"the generator must return (batch, sum(psi)) = ({x.shape[0]}, {self.num_aux}) "
                f"logits, got shape {tuple(logits.shape)}"
            )
        return logits if self.label_temperature == 1.0 else logits / self.label_temperature

    @torch.no_grad()
    def generate_labels(self, x: Tensor, y: Tensor) -> Tensor:
        """Soft auxiliary labels ``(N, sum(psi))``: rows sum to 1 over ``y``'s children.

        Uses the current train/eval mode; buffers (BatchNorm statistics) are left as they
        were.
        """
        x, y = self._check_batch(x, y)
        saved = self._snapshot_buffers()
        try:
            return masked_log_softmax(self._generator_logits(x, None), y, self.owner).exp()
        finally:
            self._restore_buffers(saved)

    # -------------------------------------------------------------- validation
    def _check_batch(self, x: Any, y: Any) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a Tensor of class indices, got {type(y).__name__}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise TypeError(f"y must hold integer class indices, got dtype {y.dtype}")
        if y.dim() != 1:
            raise ValueError(f"y must be 1-D (batch,), got shape {tuple(y.shape)}")
        if x.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x and y must have the same batch size, got x.shape={tuple(x.shape)} and "
                f"y.shape={tuple(y.shape)}"
            )
        if y.numel() == 0:
            raise ValueError("the batch is empty (y has 0 elements)")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= self.num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"y must lie in [0, {self.num_classes}) (len(psi)={self.num_classes}), got {bad}"
            )
        return x, y.to(device=self.owner.device, dtype=torch.long)

    def _check_meta_batch(self, meta_batch: Any, x: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        if meta_batch is None:
            return None
        if not isinstance(meta_batch, (tuple, list)) or len(meta_batch) != 2:
            raise TypeError(
                "meta_batch must be a pair (x_m, y_m) of tensors, got "
                f"{type(meta_batch).__name__}"
                + (f" of length {len(meta_batch)}" if isinstance(meta_batch, (tuple, list)) else "")
            )
        try:
            x_m, y_m = self._check_batch(*meta_batch)
        except (TypeError, ValueError) as e:
            raise type(e)(f"meta_batch: {e}") from None
        if x_m.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"meta_batch: x_m must have the per-sample shape of x {tuple(x.shape[1:])}, "
                f"got {tuple(x_m.shape[1:])}"
            )
        return x_m, y_m

    def _check_aux_target(self, aux_target: Tensor, y: Tensor, ref: Tensor) -> Tensor:
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
            return torch.nn.functional.one_hot(aux, self.num_aux).to(ref.dtype)
        if aux_target.shape != (n, self.num_aux):
            raise ValueError(
                f"aux_target must be (batch,) class indices or (batch, sum(psi)) = "
                f"({n}, {self.num_aux}) soft labels, got shape {tuple(aux_target.shape)}"
            )
        return aux_target.to(device=ref.device, dtype=ref.dtype)

    # ----------------------------------------------------------------- buffers
    def _snapshot_buffers(self) -> list[tuple[Tensor, Tensor]]:
        return [(b, b.clone()) for b in self.buffers()]

    @staticmethod
    def _restore_buffers(saved: list[tuple[Tensor, Tensor]]) -> None:
        with torch.no_grad():
            for b, c in saved:
                b.copy_(c)

    def _model_buffers(self) -> dict[str, Tensor]:
        return {k: b.clone() for k, b in self.model.named_buffers()}

    def get_extra_state(self) -> dict[str, int]:
        """Saved in ``state_dict()``: the step counter that schedules ``meta_every``."""
        return {"steps": self._steps}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self._steps = int(state["steps"])

    # ------------------------------------------------------------- distributed
    def _world(self) -> int:
        if self.distributed is False or not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def broadcast_state(self, src: Optional[int] = None) -> None:
        """Copy rank ``src``'s parameters and buffers to every rank.

        :meth:`step` calls it once, on the first step taken with world size > 1 (as
        ``DistributedDataParallel`` does at construction); call it again after loading a
        checkpoint on one rank only. A no-op without a process group.

        Args:
            src: global rank to copy from (default: the first rank of ``process_group``,
                rank 0 for the world).
        """
        if self._world() == 1:
            return
        src = self._group_src() if src is None else src
        with torch.no_grad():
            for t in [*self.parameters(), *self.buffers()]:
                dist.broadcast(t.data, src=src, group=self.process_group)
        self._synced = True

    def _group_src(self) -> int:
        """Global rank of the process group's first member (the source of broadcasts)."""
        if self.process_group is None:
            return 0
        return dist.get_global_rank(self.process_group, 0)

    def sync_buffers(self) -> None:
        """Make the buffers agree across ranks as ``buffers=`` says (``step`` calls it).

        ``"broadcast"``: every rank receives the buffers of the process group's first rank;
        ``"average"``: floating-point buffers become their mean over the ranks and the others
        (such as BatchNorm's ``num_batches_tracked``) are broadcast; ``"local"``: nothing.
        One collective per buffer dtype. A no-op without a process group; like :meth:`step`,
        every rank of the group must call it.
        """
        if self.buffer_sync == "local" or self._world() == 1:
            return
        by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for b in self.buffers():
            by_dtype.setdefault((b.dtype, b.device), []).append(b)
        with torch.no_grad():
            for (dtype, _), bufs in by_dtype.items():
                flat = torch.cat([b.reshape(-1) for b in bufs])
                if self.buffer_sync == "average" and dtype.is_floating_point:
                    dist.all_reduce(flat, group=self.process_group)
                    flat /= self._world()
                else:
                    dist.broadcast(flat, src=self._group_src(), group=self.process_group)
                offset = 0
                for b in bufs:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()

    def _check_sync_batchnorm(self, x: Tensor) -> None:
        """``nn.SyncBatchNorm`` needs GPUs inside a process group: say so before a step."""
        if x.device.type != "cpu" or not (dist.is_available() and dist.is_initialized()):
            return
        for name, m in self.named_modules():
            if isinstance(m, nn.SyncBatchNorm):
                raise ValueError(
                    f"'{name}' is an nn.SyncBatchNorm, which PyTorch runs only on GPUs, but the "
                    "batch is on the CPU; use nn.BatchNorm layers on the CPU (buffers="
                    "'broadcast' or 'average' keeps their running statistics equal across ranks)"
                )

    def _average(self, tensors: list[Tensor]) -> None:
        """In-place mean across ranks (one flattened all-reduce)."""
        world = self._world()
        if world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.process_group)
        flat /= world
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

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
        """One MAXL training step: update the multi-task network and the generator.

        Computes the soft labels, the multi-task loss and its gradient ``G`` (one forward
        and backward of the model), the meta-gradient of the generator through one
        differentiable step of ``optimizer`` (when ``gen_optimizer`` is given and this is a
        meta step), then steps ``optimizer`` on ``G`` and ``gen_optimizer`` on the
        meta-gradient. The model's BatchNorm statistics move exactly as in one ordinary
        training forward. The previous ``.grad`` of the stepped parameters is released at
        the start (it would be replaced anyway); after the step ``.grad`` holds this step's
        gradients, and after a skipped or failed step it is ``None``.

        Args:
            x: input batch.
            y: ``(batch,)`` primary labels in ``[0, len(psi))``.
            optimizer: one of :data:`~auxgen.SUPPORTED_OPTIMIZERS` (any optimiser with
                ``lookahead="sgd"``) over :meth:`model_parameters` (or a subset: the others
                stay fixed).
            gen_optimizer: optimiser over :meth:`generator_parameters`; ``None`` keeps
                the generator fixed.
            aux_target: fixed auxiliary labels instead of generated ones (human, random,
                K-means baselines): ``(batch,)`` auxiliary class indices or
                ``(batch, sum(psi))`` soft labels. Disables the meta step.
            meta_batch: ``(x_m, y_m)``, a batch on which the meta loss (the primary loss
                after the look-ahead step) is measured instead of ``(x, y)``: the next
                training batch, or a batch of a held-out meta split (as in AuxiLearn). The
                look-ahead step itself is still taken on ``(x, y)``, so the generator is
                rewarded for labels whose update *generalises* to data the step did not
                see. ``None`` (default): the paper's meta loss on the same batch.

        Returns:
            A dict with ``loss``, ``primary_loss``, ``aux_loss`` (detached tensors),
            ``meta_loss`` (tensor, or ``None`` when the generator was not updated),
            ``logits`` (detached primary logits of the batch), ``meta_updated`` (bool),
            ``meta_mode`` (:attr:`meta_mode_used`, or ``None`` without a meta step) and
            ``skipped`` (1 when a non-finite step was skipped, else 0); with
            ``diagnostics=True`` also ``grad_cosine`` (see ``diagnostics``).

        Raises:
            NonFiniteError: on a non-finite loss or gradient with ``nonfinite="raise"``.
        """
        x, y = self._check_batch(x, y)
        meta_xy = self._check_meta_batch(meta_batch, x)
        check_optimizer(
            optimizer,
            self.model_parameters(),
            argname="optimizer",
            owner="model_parameters()",
            mirrored=True,
            lookahead=self.lookahead,
        )
        if not is_mirrored(optimizer) and type(optimizer) not in self._approximated:
            self._approximated.add(type(optimizer))
            warnings.warn(
                f"{type(optimizer).__name__} is not mirrored exactly: the meta-gradient's "
                "look-ahead is plain SGD at each group's current learning rate "
                '(lookahead="sgd", the MAXL paper\'s approximation)',
                UserWarning,
                stacklevel=2,
            )
        if gen_optimizer is not None:
            check_optimizer(
                gen_optimizer,
                self.generator_parameters(),
                argname="gen_optimizer",
                owner="generator_parameters()",
                mirrored=False,
            )
        do_meta = (
            gen_optimizer is not None
            and aux_target is None
            and self.aux_weight > 0
            and self._steps % self.meta_every == 0
        )
        self._check_sync_batchnorm(x)
        if not self._synced and self._world() > 1:
            self.broadcast_state()
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        # Release the previous gradients now (they are replaced below), as
        # zero_grad(set_to_none=True) would: they would otherwise sit in memory all step.
        for p in params:
            p.grad = None
        if do_meta:
            for p in self.generator_parameters():
                p.grad = None
        saved = self._snapshot_buffers()
        try:
            out = self._step(x, y, optimizer, gen_optimizer, aux_target, params, do_meta, meta_xy)
        except BaseException:
            self._restore_buffers(saved)
            raise
        if out["skipped"]:
            self._restore_buffers(saved)
        else:
            self._steps += 1
            self.sync_buffers()
        return out

    def _step(
        self,
        x: Tensor,
        y: Tensor,
        optimizer: torch.optim.Optimizer,
        gen_optimizer: Optional[torch.optim.Optimizer],
        aux_target: Optional[Tensor],
        params: list[Tensor],
        do_meta: bool,
        meta_xy: Optional[tuple[Tensor, Tensor]] = None,
    ) -> dict[str, Any]:
        n = x.shape[0]
        rng = RNGState(x.device) if do_meta else None
        out, h = self._features_of(lambda: self.model(x))
        z_p = self._logits(out)
        z_a = self.aux_head(h)
        gen_params = self.generator_parameters()

        if aux_target is not None:
            t = self._check_aux_target(aux_target, y, z_a)
        elif self.aux_weight == 0:  # single-task training: the labels are not used
            t = z_a.new_zeros(z_a.shape).float()
        else:
            with torch.set_grad_enabled(do_meta):
                t = masked_log_softmax(self._generator_logits(x, h), y, self.owner).exp()
        # float32 (or wider) loss matrix: under autocast z_a may be bf16/fp16
        ell = per_class_loss(_widen(z_a), self.loss, self.focal_gamma)
        lp = primary_loss(z_p, y, self.loss, self.focal_gamma)
        la = (ell * t.detach().to(ell.dtype)).sum(1).mean()
        loss = lp + self.aux_weight * la
        shared, g_p = self._primary_grads(lp, params) if self.diagnostics else ([], [])
        grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        present = [i for i, g in enumerate(grads) if g is not None]
        self._average([grads[i] for i in present])  # type: ignore[misc]
        result: dict[str, Any] = {
            "loss": loss.detach(),
            "primary_loss": lp.detach(),
            "aux_loss": la.detach(),
            "meta_loss": None,
            "logits": z_p.detach(),
            "meta_updated": False,
            "meta_mode": None,
            "skipped": 0,
        }
        if self.diagnostics:
            result["grad_cosine"] = self._grad_cosine(shared, g_p, grads)
        if not _all_finite([loss, *grads]):
            return self._nonfinite(result, "multi-task loss or gradient")

        gen_grads: Optional[list[Optional[Tensor]]] = None
        if do_meta:
            gen_grads, meta_loss = self._meta_gradient(
                x,
                y,
                optimizer,
                params,
                grads,
                present,
                ell.detach(),
                t,
                n,
                rng,
                gen_params,
                meta_xy,
            )
            result["meta_loss"] = meta_loss
            result["meta_mode"] = self.meta_mode_used
            if not _all_finite([meta_loss, *gen_grads]):
                return self._nonfinite(result, "meta loss or meta-gradient")

        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        if gen_grads is not None and gen_optimizer is not None:
            for p, g in zip(gen_params, gen_grads):
                p.grad = g
            gen_optimizer.step()
            result["meta_updated"] = True
        return result

    def _meta_gradient(
        self,
        x: Tensor,
        y: Tensor,
        optimizer: torch.optim.Optimizer,
        params: list[Tensor],
        grads: list[Optional[Tensor]],
        present: list[int],
        ell: Tensor,
        t: Tensor,
        n: int,
        rng: Optional[RNGState],
        gen_params: list[nn.Parameter],
        meta_xy: Optional[tuple[Tensor, Tensor]] = None,
    ) -> tuple[list[Optional[Tensor]], Tensor]:
        names = {id(p): k for k, p in self.model.named_parameters()}
        idx = [i for i in present if id(params[i]) in names]
        moving = [params[i] for i in idx]
        keys = [names[id(p)] for p in moving]

        x_m, y_m = meta_xy if meta_xy is not None else (x, y)

        def run_at(values: list[Tensor], inputs: Tensor = x) -> Tensor:
            state = {**dict(zip(keys, values)), **self._model_buffers()}
            return self._logits(functional_call(self.model, state, (inputs,)))

        def primary_loss_at(values: list[Tensor]) -> Tensor:
            return primary_loss(run_at(values, x_m), y_m, self.loss, self.focal_gamma)

        def loss_matrix_at(values: list[Tensor]) -> Tensor:
            _, h = self._features_of(lambda: run_at(values))
            return per_class_loss(_widen(self.aux_head(h)), self.loss, self.focal_gamma)

        if moving:
            u, lp_plus = lookahead_direction(
                optimizer if is_mirrored(optimizer) else sgd_stand_in(optimizer),
                moving,
                [grads[i] for i in idx],  # type: ignore[misc]
                primary_loss_at,
                reduce=self._average if self._world() > 1 else None,
            )
            dell = meta_jvp(
                self._jvp,
                loss_matrix_at,
                [p.detach() for p in moving],
                u,
                base=ell,
                rng=rng,
                fd_eps=self.fd_eps,
            )
        else:  # nothing moves: the labels cannot affect the primary loss
            with torch.no_grad():
                lp_plus = primary_loss_at([])
            dell = torch.zeros_like(ell)
        g_t = dell.detach() * (self.aux_weight / n)
        reg = self.entropy_weight * neg_entropy(t)
        if self.confidence_weight:
            reg = reg + self.confidence_weight * mean_entropy(t)
        surrogate = (g_t.to(t.dtype) * t).sum() + reg
        gen_grads = list(torch.autograd.grad(surrogate, gen_params, allow_unused=True))
        self._average([g for g in gen_grads if g is not None])
        return gen_grads, (lp_plus + reg.detach()).detach()

    def _primary_grads(self, lp: Tensor, params: list[Tensor]) -> tuple[list[int], list[Tensor]]:
        """Indices in ``params`` of the shared parameters and ``grad L_p`` on them."""
        classifier = self.model.get_submodule(self.classifier_name)
        shared_ids = {id(p) for p in self.model.parameters()} - {
            id(p) for p in classifier.parameters()
        }
        idx = [i for i, p in enumerate(params) if id(p) in shared_ids]
        if not idx:
            return [], []
        g_p = torch.autograd.grad(
            lp, [params[i] for i in idx], retain_graph=True, allow_unused=True
        )
        keep = [k for k, g in enumerate(g_p) if g is not None]
        out = [g_p[k] for k in keep]
        self._average(out)  # type: ignore[arg-type]
        return [idx[k] for k in keep], out  # type: ignore[misc]

    def _grad_cosine(
        self, shared: list[int], g_p: list[Tensor], grads: list[Optional[Tensor]]
    ) -> Optional[Tensor]:
        """Cosine of ``grad L_p`` and ``grad L_a = (G - grad L_p) / w`` on shared parameters."""
        if self.aux_weight == 0 or not shared:
            return None
        dev = g_p[0].device
        acc = torch.float32 if dev.type == "mps" else torch.float64  # MPS has no float64
        dot = norm_p = norm_a = torch.zeros((), dtype=acc, device=dev)
        for i, gp in zip(shared, g_p):
            gp = gp.detach().to(acc).flatten()
            ga = (grads[i].detach().to(acc).flatten() - gp) / self.aux_weight  # type: ignore[union-attr]
            dot = dot + gp @ ga
            norm_p = norm_p + gp @ gp
            norm_a = norm_a + ga @ ga
        return dot / (norm_p * norm_a).sqrt()

    def _nonfinite(self, result: dict[str, Any], what: str) -> dict[str, Any]:
        if self.nonfinite == "raise":
            raise NonFiniteError(
                f"non-finite {what} (loss={float(result['loss']):.4g}); no parameter, buffer or "
                "optimiser state was changed. Pass nonfinite='skip' to skip such steps"
            )
        logger.warning("skipping a step with a non-finite %s", what)
        result["skipped"] = 1
        return result

    def extra_repr(self) -> str:
        return (
            f"psi={list(self.psi)}, generator={self.generator_kind!r}, loss={self.loss!r}, "
            f"meta={self.meta!r}, meta_every={self.meta_every}, aux_weight={self.aux_weight}, "
            f"entropy_weight={self.entropy_weight}, confidence_weight={self.confidence_weight}, "
            f"label_temperature={self.label_temperature}"
        )
