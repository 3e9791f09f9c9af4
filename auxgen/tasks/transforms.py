r"""Auxiliary labels from input transformations: no labels beyond the primary ones.

Each image is shown under ``K`` transforms (by default the four rotations by 0, 90, 180 and
270 degrees) and the auxiliary head predicts which transform it sees:

* ``form="predict"``: a ``K``-way head, transformation prediction as an auxiliary loss
  (Gidaris et al., ICLR 2018; Hendrycks et al., NeurIPS 2019);
* ``form="joint"``: a ``C * K``-way head over (class, transform) pairs, self-supervised label
  augmentation (SLA; Lee, Hwang & Shin, ICML 2020). This is auxgen's hierarchy with
  ``psi = K`` children per class: child ``k`` of class ``y`` is "``y`` seen under transform
  ``k``";
* ``form="both"``: both heads at once (one head with two softmax groups).

The primary loss stays on the untransformed batch; the auxiliary head sees the ``K`` views
(``views="all"``, about ``K`` times a plain step) or one random transform per image
(``views="one"``, about twice). :meth:`TransformLabels.aggregated_log_probs` gives SLA's
aggregated prediction (the mean over the views of the joint log-probability of the right
transform), and ``distill=`` trains the primary head towards it (SLA+SD).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import AuxiliaryTask, TaskContext, TaskPlan, TaskWeight, check_weight, widen

__all__ = [
    "FORMS", "VIEWS", "PermuteChannels", "Rotate", "TransformLabels", "TransformSet",
    "colour_permutations", "patch_rotations", "rotations",
]  # fmt: skip

#: ``form=`` values of :class:`TransformLabels`.
FORMS = ("joint", "predict", "both")
#: ``views=`` values of :class:`TransformLabels`.
VIEWS = ("all", "one")

Transform = Optional[Callable[[Tensor], Tensor]]


class Rotate:
    """Rotate images ``(N, C, H, W)`` by ``90 * k`` degrees, whole or a square patch; picklable.

    Args:
        k: quarter turns.
        patch: ``None``: rotate the whole image (square images only); a fraction in
            ``(0, 1]``: rotate a square patch of that fraction of the shorter side, at a
            random position in each image (LoRot; Moon et al., ECCV 2022), so any image
            shape works; ``"auto"``: the whole image when it is square, else a patch of half
            the shorter side (the default transforms of :class:`TransformLabels`).

    Example:
        >>> x = torch.arange(8.0).view(1, 1, 2, 4)  # a non-square image
        >>> y = Rotate(2, patch=1.0)(x)  # a 2x2 patch turned by 180 degrees
        >>> y.shape == x.shape, sorted(y.flatten().tolist()) == sorted(x.flatten().tolist())
        (True, True)
    """

    def __init__(self, k: int, patch: Union[float, str, None] = None) -> None:
        self.k = int(k)
        if patch is not None and patch != "auto":
            if isinstance(patch, bool) or not isinstance(patch, (int, float)) or not 0 < patch <= 1:
                raise ValueError(
                    f"patch must be None, 'auto' or a fraction in (0, 1], got {patch!r}"
                )
            patch = float(patch)
        self.patch = patch
        self.__name__ = f"rot{90 * self.k}" if patch is None else f"patch{90 * self.k}"

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() not in (3, 4) or not x.is_floating_point():
            raise ValueError(
                f"rotations act on image batches (N, C, H, W) or (N, H, W) of floats, got shape "
                f"{tuple(x.shape)} of {x.dtype}; for other inputs (token ids, audio, tabular "
                "rows) pass transforms= that fit them"
            )
        if x.dim() == 3:  # (N, H, W): one channel
            return self(x[:, None])[:, 0]
        h, w = x.shape[-2:]
        patch = self.patch if self.patch != "auto" else (None if h == w else 0.5)
        if patch is None:
            if h != w:
                raise ValueError(
                    f"whole-image rotations need square images, got {h}x{w}; use "
                    "patch_rotations() (a rotated square patch) or the default transforms"
                )
            return torch.rot90(x, self.k, dims=(-2, -1))
        return _rotate_patches(x, self.k, max(1, int(round(float(patch) * min(h, w)))))

    def __repr__(self) -> str:
        return (
            f"Rotate({self.k})" if self.patch is None else f"Rotate({self.k}, patch={self.patch!r})"
        )


def _rotate_patches(x: Tensor, k: int, side: int) -> Tensor:
    """``x`` with a ``side x side`` patch at a random place in each image turned ``k`` times."""
    n, _, h, w = x.shape
    dev = x.device
    top = torch.randint(0, h - side + 1, (n,)).to(dev)
    left = torch.randint(0, w - side + 1, (n,)).to(dev)
    span = torch.arange(side, device=dev)
    rows = (top[:, None] + span)[:, :, None]  # (n, side, 1)
    cols = (left[:, None] + span)[:, None, :]  # (n, 1, side)
    batch = torch.arange(n, device=dev)[:, None, None]
    patch = x[batch, :, rows, cols]  # (n, side, side, C)
    turned = torch.rot90(patch, k, dims=(1, 2))
    out = x.clone()
    out[batch, :, rows, cols] = turned
    return out


def rotations(patch: Union[float, str, None] = None) -> tuple[list[Transform], list[str]]:
    """The four image rotations: ``([None, rot90, rot180, rot270], names)``.

    ``None`` is the identity (the batch itself, not recomputed). Rotations act on the last
    two dimensions of ``(N, C, H, W)`` batches: whole images must be square; with
    ``patch`` (see :class:`Rotate`) a square patch turns instead, so any shape works.

    Args:
        patch: ``None`` (whole square images), ``"auto"`` (whole when square, else a patch
            of half the shorter side: :class:`TransformLabels`'s default) or a fraction.

    Example:
        >>> transforms, names = rotations()
        >>> names
        ['rot0', 'rot90', 'rot180', 'rot270']
        >>> transforms[1](torch.arange(4.0).view(1, 1, 2, 2)).flatten().tolist()
        [1.0, 3.0, 0.0, 2.0]
    """
    return [None, *(Rotate(k, patch) for k in (1, 2, 3))], ["rot0", "rot90", "rot180", "rot270"]


def patch_rotations(size: float = 0.5) -> tuple[list[Transform], list[str]]:
    """Rotations of a random square patch (LoRot; Moon et al., ECCV 2022): any image shape.

    Args:
        size: the patch's side as a fraction of the image's shorter side.

    Example:
        >>> transforms, names = patch_rotations(0.5)
        >>> names, transforms[1](torch.zeros(2, 3, 8, 12)).shape
        (['rot0', 'patch90', 'patch180', 'patch270'], torch.Size([2, 3, 8, 12]))
    """
    return [None, *(Rotate(k, size) for k in (1, 2, 3))], [
        "rot0",
        "patch90",
        "patch180",
        "patch270",
    ]


class PermuteChannels:
    """Reorder the channels of a batch of images ``(N, C, H, W)``; picklable."""

    def __init__(self, order: Sequence[int]) -> None:
        self.order = [int(i) for i in order]
        self.__name__ = "perm" + "".join(map(str, self.order))

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != len(self.order):
            raise ValueError(
                f"{self.__name__}: colour permutations need images (N, {len(self.order)}, H, W) "
                f"with {len(self.order)} channels, got shape {tuple(x.shape)}"
            )
        return x[:, self.order]

    def __repr__(self) -> str:
        return f"PermuteChannels({self.order})"


def colour_permutations() -> tuple[list[Transform], list[str]]:
    """The six orders of an RGB image's channels (SLA's colour permutations), identity first.

    Example:
        >>> transforms, names = colour_permutations()
        >>> names
        ['rgb', 'rbg', 'grb', 'gbr', 'brg', 'bgr']
        >>> transforms[5](torch.arange(3.0).view(1, 3, 1, 1)).flatten().tolist()
        [2.0, 1.0, 0.0]
    """
    import itertools

    orders = list(itertools.permutations(range(3)))
    names = ["".join("rgb"[i] for i in order) for order in orders]
    return [None] + [PermuteChannels(order) for order in orders[1:]], names


class TransformSet:
    """``K`` transforms of a batch, with their names: the views of a transformation task.

    Makes the views (checking what each transform returns, and at its first use that it
    acts within each sample) and orders the head's rows: each transform's rows in turn,
    the identity's being the batch's own features. Shared by :class:`TransformLabels` and
    :class:`~auxgen.GeneratedCellLabels`.

    Args:
        transforms: ``K >= 2`` batch-to-batch callables, ``None`` for the identity; default
            the four rotations (a rotated square patch on non-square images).
        names: a name per transform.

    Example:
        >>> views = TransformSet()
        >>> views.names, views.all_views(torch.zeros(2, 3, 4, 4)).shape
        (['rot0', 'rot90', 'rot180', 'rot270'], torch.Size([6, 3, 4, 4]))
    """

    def __init__(
        self,
        transforms: Optional[Sequence[Transform]] = None,
        names: Optional[Sequence[str]] = None,
    ) -> None:
        if transforms is None:  # whole-image rotations, or a rotated patch on non-square images
            transforms, default_names = rotations(patch="auto")
            names = default_names if names is None else names
        self.transforms, self.names = _check_transforms(transforms, names)
        self.checked: set[int] = set()  # transforms checked to act within each sample

    @property
    def num_transforms(self) -> int:
        """``K``."""
        return len(self.transforms)

    def apply(self, i: int, x: Tensor) -> Tensor:
        """Transform ``i`` of the batch ``x``, checked."""
        fn = self.transforms[i]
        assert fn is not None
        what = f"transforms[{i}] ({self.names[i]!r})"
        if i not in self.checked and x.shape[0] > 1:
            _check_within_samples(fn, x, what)
            self.checked.add(i)
        out = fn(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"{what} must return a Tensor, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(
                f"{what} returned shape {tuple(out.shape)} for a batch of shape "
                f"{tuple(x.shape)}: every transform must keep the batch's shape (rotations "
                "need square images)"
            )
        if out.dtype != x.dtype or out.device != x.device:
            raise ValueError(
                f"{what} returned {out.dtype} on {out.device} for a batch of {x.dtype} on "
                f"{x.device}: every transform must keep the batch's dtype and device"
            )
        return out

    def all_views(self, x: Tensor) -> Optional[Tensor]:
        """The batch under every transform but the identity, in order (``None`` if none)."""
        made = [self.apply(i, x) for i, fn in enumerate(self.transforms) if fn is not None]
        return torch.cat(made) if made else None

    def rows(self, ident: Tensor, h_views: Optional[Tensor]) -> Tensor:
        """The head's rows: each transform's ``n`` rows in order (identity: ``ident``)."""
        n, chunks, at = ident.shape[0], [], 0
        for fn in self.transforms:
            if fn is None:
                chunks.append(ident)
            else:
                assert h_views is not None
                chunks.append(h_views[at : at + n])
                at += n
        return torch.cat(chunks)


@dataclass
class _Rows:
    """A plan's head rows: the primary label of each, and which images of the batch made
    them (``None``: all of them, in order)."""

    labels: Tensor
    subset: Optional[Tensor] = None


class TransformLabels(AuxiliaryTask):
    r"""Auxiliary targets made from ``K`` input transforms (rotations by default).

    Args:
        transforms: ``K >= 2`` batch-to-batch callables (``None`` for the identity), each
            keeping the batch's shape and dtype: flips, colour permutations
            (:func:`colour_permutations`), a text or an audio transform. Default:
            :func:`rotations`.
        names: a name per transform (default: the callables' ``__name__``, ``"identity"``
            for ``None``).
        form: ``"joint"`` (SLA's (class, transform) labels, ``psi = K`` per class),
            ``"predict"`` (a ``K``-way transform-prediction head) or ``"both"``.
        views: ``"all"`` (every image under every transform: ``K`` views) or ``"one"``
            (one transform per image, drawn uniformly at each step: about half the cost).
        weight: weight of the auxiliary loss.
        distill: weight of SLA's self-distillation term: ``KL(softmax(a / T) ||
            softmax(z_p / T)) * T**2`` from the aggregated joint prediction ``a`` of the
            batch (detached) to the primary logits ``z_p`` (needs ``views="all"`` and a
            joint head). ``0`` (default) leaves it out.
        distill_temperature: ``T`` of the distillation term.
        primary_views: also take the primary loss on the transformed views (the mean over
            them, added to the batch's): the transforms become data augmentation of the
            primary task, instead of only an auxiliary task.
        fraction: the share of each batch shown under the transforms: a random subset of
            ``ceil(fraction * N)`` images gets the views (and the auxiliary loss), the
            rest trains on the primary loss alone. A cost knob: with ``views="one"`` and
            ``0.5`` a step costs about 1.5 plain steps instead of 2.

    Attributes:
        num_transforms: ``K``.
        names: the transforms' names.

    Example:
        >>> import torch, torch.nn as nn
        >>> from auxgen import AuxiliaryLabeler, TransformLabels
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.ReLU(),
        ...                       nn.Linear(8, 2))
        >>> labeler = AuxiliaryLabeler(model, tasks=TransformLabels(form="both"))
        >>> labeler.aux_head.out_features  # 2 classes x 4 rotations, then the 4 rotations
        12
        >>> opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1)
        >>> out = labeler.step(torch.randn(5, 3, 4, 4), torch.tensor([0, 1, 1, 0, 1]), opt)
        >>> out["task_losses"]["transform"].item() > 0
        True
    """

    name = "transform"

    def __init__(
        self,
        transforms: Optional[Sequence[Transform]] = None,
        names: Optional[Sequence[str]] = None,
        *,
        form: str = "both",
        views: str = "all",
        weight: Union[float, TaskWeight] = 1.0,
        distill: float = 0.0,
        distill_temperature: float = 1.0,
        primary_views: bool = False,
        fraction: float = 1.0,
    ) -> None:
        super().__init__(weight=weight)
        self.transform_set = TransformSet(transforms, names)
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if views not in VIEWS:
            raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
        self.form, self.views = form, views
        self.distill = check_weight("distill", distill)
        if self.distill and (views != "all" or form == "predict"):
            raise ValueError(
                f"distill needs the aggregated joint prediction: views='all' and form='joint' "
                f"or 'both', got views={views!r}, form={form!r}"
            )
        self.distill_temperature = check_weight("distill_temperature", distill_temperature)
        if self.distill_temperature == 0:
            raise ValueError("distill_temperature must be a positive number, got 0")
        if not isinstance(primary_views, bool):
            raise TypeError(f"primary_views must be a bool, got {type(primary_views).__name__}")
        self.primary_views = primary_views
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise TypeError(f"fraction must be a number in (0, 1], got {fraction!r}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        if self.distill and fraction < 1:
            raise ValueError(f"distill needs every image's views: fraction=1, got {fraction}")
        self.fraction = float(fraction)
        self.num_classes = 0

    @property
    def transforms(self) -> list[Transform]:
        """The ``K`` transforms (``None``: the identity)."""
        return self.transform_set.transforms

    @property
    def names(self) -> list[str]:
        """The transforms' names."""
        return self.transform_set.names

    @property
    def num_transforms(self) -> int:
        """``K``."""
        return self.transform_set.num_transforms

    def all_views(self, x: Tensor) -> Optional[Tensor]:
        """The batch under every transform but the identity, in order (``None`` if none)."""
        return self.transform_set.all_views(x)

    def setup(self, ctx: TaskContext) -> None:
        self.num_classes = ctx.num_classes

    def outputs(self, ctx: TaskContext) -> list[int]:
        k, c = self.num_transforms, ctx.num_classes
        return {"joint": [c * k], "predict": [k], "both": [c * k, k]}[self.form]

    # ---------------------------------------------------------------- the step
    def plan(self, x: Tensor, y: Tensor, aux_target: Optional[Tensor]) -> TaskPlan:
        k_all = self.num_transforms
        subset = None
        if self.fraction < 1:  # a random part of the batch gets the views
            m = max(1, math.ceil(self.fraction * x.shape[0]))
            subset = torch.randperm(x.shape[0])[:m].to(x.device)
            x, y = x[subset], y[subset.to(y.device)]
        n = x.shape[0]
        if self.views == "all":
            ks = torch.arange(k_all, device=y.device).repeat_interleave(n)
            y_rows = y.repeat(k_all)
            views = self.all_views(x)
        else:
            ks = torch.randint(k_all, (n,)).to(y.device)
            y_rows = y
            views = x.clone()
            for i in range(k_all):
                rows = (ks == i).nonzero().flatten().to(x.device)
                if rows.numel() and self.transforms[i] is not None:
                    views[rows] = self.transform_set.apply(i, x[rows])
        targets = self._targets(y_rows, ks)
        return TaskPlan(views=views, targets=targets, info=_Rows(y_rows, subset))

    def _targets(self, y_rows: Tensor, ks: Tensor) -> Tensor:
        k_all = self.num_transforms
        parts = []
        if self.form in ("joint", "both"):
            parts.append(F.one_hot(y_rows * k_all + ks, self.num_classes * k_all))
        if self.form in ("predict", "both"):
            parts.append(F.one_hot(ks, k_all))
        return torch.cat(parts, dim=1).float()

    def head_input(self, plan: TaskPlan, h: Tensor, h_views: Optional[Tensor]) -> Tensor:
        if self.views == "one":
            assert h_views is not None
            return h_views
        subset = plan.info.subset if isinstance(plan.info, _Rows) else None
        ident = h if subset is None else h[subset]  # the identity's rows: the batch's own
        return self.transform_set.rows(ident, h_views)

    def extra_loss(
        self, plan: TaskPlan, z_p: Tensor, z_views: Optional[Tensor], z: Tensor
    ) -> Optional[Tensor]:
        loss: Optional[Tensor] = None
        if self.primary_views and z_views is not None:
            labels = plan.info.labels  # the primary label of every head row
            keep = [i for i, fn in enumerate(self.transforms) if fn is not None]
            per = labels.view(self.num_transforms, -1)
            rows = labels if self.views == "one" else per[keep].flatten()
            loss = F.cross_entropy(widen(z_views), rows)
        if self.distill:
            t = self.distill_temperature
            agg = self._aggregate(z.detach(), z_p.shape[0]) / t
            kl = F.kl_div(
                F.log_softmax(widen(z_p) / t, 1), F.log_softmax(agg, 1), reduction="batchmean",
                log_target=True,
            )  # fmt: skip
            term = self.distill * kl * t**2
            loss = term if loss is None else loss + term
        return loss

    # ---------------------------------------------------------------- inference
    def _aggregate(self, z: Tensor, n: int) -> Tensor:
        """``(n, C)``: mean over the views of the joint log-probability of ``(c, k)``."""
        k_all, c = self.num_transforms, self.num_classes
        joint = F.log_softmax(widen(z[:, : c * k_all]), dim=1).view(k_all, n, c, k_all)
        return torch.stack([joint[i, :, :, i] for i in range(k_all)]).mean(0)

    def aggregated_log_probs(self, features: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """SLA's aggregated prediction ``(N, C)`` of a batch: its argmax is the class.

        Args:
            features: maps a batch to the classifier's input features (the labeler's
                ``features(x)[1]``).
            x: the batch.
        """
        assert self.head is not None, "attach the task to a labeler first"
        if self.form == "predict":
            raise ValueError("aggregated_log_probs needs a joint head (form='joint' or 'both')")
        n = x.shape[0]
        views = [
            x if fn is None else self.transform_set.apply(i, x)
            for i, fn in enumerate(self.transforms)
        ]
        return self._aggregate(self.head(features(torch.cat(views))), n)

    def extra_repr(self) -> str:
        return (
            f"names={self.names}, form={self.form!r}, views={self.views!r}, "
            f"weight={self.weight}, distill={self.distill}, primary_views={self.primary_views}"
        )


def _check_within_samples(fn: Callable[[Tensor], Tensor], x: Tensor, what: str) -> None:
    """A transform must act on each sample on its own: changing sample 0 of the batch may
    change row 0 of the output only. Both calls draw the same random numbers (a forked RNG),
    so random per-sample transforms pass; the global RNG is left as it was."""
    if not (x.is_floating_point() or x.is_complex()):
        changed = x.clone()
        changed[0] = changed[0] + 1  # integer inputs (token ids): another value
    else:
        changed = x.clone()
        changed[0] = changed[0] * 2 + 1
    devices = [x.device] if x.device.type == "cuda" else []
    outs = []
    for batch in (x, changed):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            outs.append(fn(batch))
    a, b = outs
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.shape != b.shape:
        return  # the shape and type checks of the real call give the message
    moved = (a[1:] != b[1:]).flatten(1).any(1).nonzero().flatten() + 1
    if moved.numel():
        raise ValueError(
            f"{what} mixes samples: changing sample 0 of a batch of shape {tuple(x.shape)} "
            f"({x.dtype}) changed output rows {moved[:5].tolist()}; a transform must act on "
            "each sample on its own. For inputs that are not (N, C, H, W) images, pass "
            "transforms= that fit your data"
        )


def _check_transforms(
    transforms: Sequence[Transform], names: Optional[Sequence[str]]
) -> tuple[list[Transform], list[str]]:
    if not isinstance(transforms, Sequence) or isinstance(transforms, (str, bytes)):
        raise TypeError(
            f"transforms must be a sequence of callables (None for the identity), got "
            f"{type(transforms).__name__}"
        )
    if len(transforms) < 2:
        raise ValueError(
            f"transforms must hold at least 2 transforms (K >= 2), got {len(transforms)}"
        )
    for i, fn in enumerate(transforms):
        if fn is not None and not callable(fn):
            raise TypeError(
                f"transforms[{i}] must be a callable batch -> batch or None (the identity), "
                f"got {type(fn).__name__}"
            )
    if names is None:
        names = [
            "identity" if fn is None else getattr(fn, "__name__", f"t{i}")
            for i, fn in enumerate(transforms)
        ]
    names = list(names)
    if len(names) != len(transforms) or not all(isinstance(s, str) for s in names):
        raise ValueError(f"names must be one str per transform ({len(transforms)}), got {names!r}")
    return list(transforms), names
