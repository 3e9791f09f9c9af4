"""Lightning: MAXL's meta-update as a callback, under automatic optimisation.

A ``LightningModule`` that holds an :class:`~auxgen.AuxiliaryLabeler` returns
``self.labeler(x, y)["loss"]`` from ``training_step`` and keeps its own
``configure_optimizers`` (over ``self.parameters()``); Lightning does the backward, gradient
clipping (``Trainer(gradient_clip_val=...)``), mixed precision, accumulation and the
optimiser step. A task that needs no look-ahead (:class:`~auxgen.TransformLabels`,
:class:`~auxgen.FixedLabels`) needs nothing else. A learned task
(:class:`~auxgen.GeneratedLabels`, :class:`~auxgen.LearnedWeight`) adds
``callbacks=[MetaStep()]``: before each optimiser step it calls every labeler's
:meth:`~auxgen.AuxiliaryLabeler.meta_step` with the generator's own optimiser, which the
callback owns and checkpoints.

Example:
    >>> import lightning as L, torch
    >>> from auxgen.integrations.lightning import MetaStep
    >>> callback = MetaStep(lambda params: torch.optim.Adam(params, lr=1e-3))
    >>> trainer = L.Trainer(callbacks=[callback], logger=False, enable_progress_bar=False,
    ...                     enable_checkpointing=False, enable_model_summary=False)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, Optional

import lightning as L
import torch
from torch import nn

from ..labeler import AuxiliaryLabeler
from ..loop import ignore_meta_parameters

__all__ = ["MetaStep"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def _paper_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The MAXL paper's generator optimiser: SGD, learning rate 1e-3, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=1e-3, weight_decay=5e-4)


class MetaStep(L.Callback):
    """Run :meth:`~auxgen.AuxiliaryLabeler.meta_step` of every labeler before each optimiser step.

    Lightning calls ``on_before_optimizer_step`` after the backward (and after unscaling the
    gradients under a ``GradScaler``), before clipping and the step: the meta-gradient sees
    the gradients the optimiser is about to use. Under a DDP strategy the callback names the
    generator's parameters for DDP to ignore (only the meta-gradient trains them, and
    ``meta_step`` averages it across ranks).

    Args:
        gen_optimizer: builds the generator's optimiser from its parameters (default: the
            paper's SGD, lr 1e-3, weight decay 5e-4); one optimiser per labeler.
        log: log each labeler's ``meta_loss`` (as ``"<name>/meta_loss"``).

    Attributes:
        gen_optimizers: the generator optimisers by the labeler's name in the module.
    """

    def __init__(self, gen_optimizer: Optional[OptimizerFactory] = None, *, log: bool = True):
        super().__init__()
        self.make_optimizer = gen_optimizer or _paper_optimizer
        self.log_meta_loss = log
        self.labelers: dict[str, AuxiliaryLabeler] = {}
        self.gen_optimizers: dict[str, torch.optim.Optimizer] = {}
        self._restored: Optional[dict[str, Any]] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.labelers = {
            name or "labeler": m
            for name, m in pl_module.named_modules()
            if isinstance(m, AuxiliaryLabeler)
        }
        if not self.labelers:
            raise ValueError(
                f"MetaStep found no AuxiliaryLabeler in {type(pl_module).__name__}; assign one "
                "to an attribute of the LightningModule (self.labeler = AuxiliaryLabeler(...))"
            )
        ignore_meta_parameters(pl_module)  # before the strategy wraps the module in DDP

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, labeler in self.labelers.items():
            params = labeler.generator_parameters()
            if params and name not in self.gen_optimizers:
                self.gen_optimizers[name] = self.make_optimizer(params)
        if self._restored:
            for name, state in self._restored.items():
                self.gen_optimizers[name].load_state_dict(state)
            self._restored = None

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        for name, labeler in self.labelers.items():
            gen_opt = self.gen_optimizers.get(name)
            if gen_opt is None:
                continue
            out = labeler.meta_step(optimizer, gen_opt, scaler=scaler)
            if self.log_meta_loss and out["meta_loss"] is not None:
                pl_module.log(f"{name}/meta_loss", out["meta_loss"], on_step=True)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.gen_optimizers.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
