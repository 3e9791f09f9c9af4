"""Hugging Face ``transformers``: a ``Trainer`` that trains an :class:`~auxgen.AuxiliaryLabeler`.

Pass the labeler as the ``Trainer``'s model: :class:`AuxiliaryTrainer` overrides
``compute_loss`` (the multi-task loss of ``labeler(inputs[input_name], inputs["labels"])``),
keeps the batch's input and label columns, runs MAXL's meta-update of a learned task before
each optimiser step (after the ``Trainer``'s gradient clipping) and saves the deployable
model with ``save_pretrained`` beside the labeler's own state (``auxgen_labeler.pt``, which
``resume_from_checkpoint`` reads back). Everything else is the ``Trainer``'s: its optimiser
and schedule, accumulation, mixed precision, logging and Accelerate's distributed training.

Example:
    >>> import torch
    >>> from transformers import TrainingArguments, ViTConfig, ViTForImageClassification
    >>> from auxgen import AuxiliaryLabeler, TransformLabels
    >>> from auxgen.integrations.hf import AuxiliaryTrainer
    >>> config = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1,
    ...                    num_attention_heads=2, intermediate_size=32, num_labels=3)
    >>> labeler = AuxiliaryLabeler(ViTForImageClassification(config), tasks=TransformLabels(),
    ...                            output="logits")
    >>> data = [{"pixel_values": torch.randn(3, 8, 8), "labels": i % 3} for i in range(6)]
    >>> args = TrainingArguments("out", max_steps=1, per_device_train_batch_size=6,
    ...                          report_to=[], use_cpu=True, save_strategy="no")
    >>> trainer = AuxiliaryTrainer(model=labeler, args=args, train_dataset=data)
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
import transformers
from torch import nn

from ..labeler import AuxiliaryLabeler

__all__ = ["AuxiliaryTrainer", "LABELER_FILE"]

#: the labeler's own state (heads, generator, step counter and the generator's optimiser)
LABELER_FILE = "auxgen_labeler.pt"


class _MetaStep(transformers.TrainerCallback):
    """Calls the labeler's ``meta_step`` in ``on_pre_optimizer_step``."""

    def __init__(self, trainer: AuxiliaryTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._meta_step(kwargs["optimizer"])


class AuxiliaryTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` for a model wrapped in an :class:`~auxgen.AuxiliaryLabeler`.

    Args:
        *args: the ``Trainer``'s arguments; ``model`` must be an
            :class:`~auxgen.AuxiliaryLabeler` (wrap an HF model with ``output="logits"``).
        input_name: the batch's input column (``"pixel_values"``, or ``"input_ids"`` for
            a text model whose transforms act on token ids).
        gen_optimizer: builds the generator's optimiser from its parameters (learned tasks
            only; default: the MAXL paper's SGD, lr 1e-3, weight decay 5e-4).
        **kwargs: the ``Trainer``'s keyword arguments.

    Raises:
        TypeError: if ``model`` is not an :class:`~auxgen.AuxiliaryLabeler`.
    """

    def __init__(
        self,
        *args: Any,
        input_name: str = "pixel_values",
        gen_optimizer: Optional[Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, AuxiliaryLabeler):
            raise TypeError(
                f"model must be an auxgen.AuxiliaryLabeler, got {type(self.model).__name__}; "
                "wrap your model: AuxiliaryLabeler(model, tasks=..., output='logits')"
            )
        self.input_name = input_name
        if self.args.label_names is None:  # the labeler's forward names no label argument
            self.label_names = ["labels"]
        self.make_gen_optimizer = gen_optimizer or (
            lambda params: torch.optim.SGD(params, lr=1e-3, weight_decay=5e-4)
        )
        self.gen_optimizer: Optional[torch.optim.Optimizer] = None
        if self.labeler.generator_parameters():
            self.add_callback(_MetaStep(self))

    @property
    def labeler(self) -> AuxiliaryLabeler:
        """The labeler, unwrapped from any distributed wrapper."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = [self.input_name, "label", "labels", "label_ids"]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The multi-task loss of ``model(inputs[input_name], inputs["labels"])``."""
        if self.input_name not in inputs or "labels" not in inputs:
            raise ValueError(
                f"AuxiliaryTrainer expects batches with {self.input_name!r} and 'labels', "
                f"got {sorted(inputs)}; set input_name= to your input column"
            )
        out = model(inputs[self.input_name], inputs["labels"])
        return (out["loss"], {"logits": out["logits"]}) if return_outputs else out["loss"]

    def _meta_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.gen_optimizer is None:
            self.gen_optimizer = self.make_gen_optimizer(self.labeler.generator_parameters())
        out = self.labeler.meta_step(optimizer, self.gen_optimizer, scaler=self.accelerator.scaler)
        if out["meta_loss"] is not None:
            self._last_meta_loss = float(out["meta_loss"])

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.labeler.model
        if isinstance(model, transformers.PreTrainedModel):
            model.save_pretrained(output_dir)  # the deployable model, as from_pretrained reads
        else:
            torch.save(model.state_dict(), os.path.join(output_dir, "pytorch_model.bin"))
        gen = self.gen_optimizer.state_dict() if self.gen_optimizer is not None else None
        torch.save(
            {"labeler": self.labeler.state_dict(), "gen_optimizer": gen},
            os.path.join(output_dir, LABELER_FILE),
        )
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        path = os.path.join(resume_from_checkpoint, LABELER_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"resume_from_checkpoint: expected {LABELER_FILE} in {resume_from_checkpoint}"
            )
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.labeler.load_state_dict(state["labeler"])
        if state["gen_optimizer"] is not None:
            self.gen_optimizer = self.make_gen_optimizer(self.labeler.generator_parameters())
            self.gen_optimizer.load_state_dict(state["gen_optimizer"])

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
