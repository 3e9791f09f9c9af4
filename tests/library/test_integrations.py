"""The frameworks users already run, with the real libraries on the CPU (fake data, seconds).

Each framework's training is compared with the same hand-written loop of the loss form
(``labeler(x, y)["loss"].backward()``, clipping, ``meta_step`` for a learned task,
``opt.step()``) on a copy of the same labeler: the parameters must agree, so the framework
really ran the multi-task loss, clipped what the loop clips and (for MAXL) ran the
meta-update once per optimiser step.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Optional

import pytest
import torch
from helpers import TinyConvNet
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from auxgen import AuxiliaryLabeler, GeneratedLabels, TransformLabels

N, STEPS, CLIP = 8, 3, 0.5


def _data(n: int = N * STEPS, size: int = 6) -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 3)


def _labeler(task: str) -> AuxiliaryLabeler:
    torch.manual_seed(0)
    tasks = TransformLabels() if task == "rotation" else GeneratedLabels(2)
    return AuxiliaryLabeler(TinyConvNet(3, width=4), tasks=tasks)


def _gen_opt(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2)


def _hand_loop(
    labeler: AuxiliaryLabeler,
    batches: list[tuple[Tensor, Tensor]],
    clip: Optional[float],
    clip_first: bool = False,
) -> AuxiliaryLabeler:
    """The reference: the user's own loop around the loss form (``clip_first``: clipping
    before the meta-update, as the Hugging Face ``Trainer`` orders them)."""
    opt = torch.optim.SGD(labeler.parameters(), lr=0.1, momentum=0.9)
    gen_opt = _gen_opt(labeler.generator_parameters()) if labeler.generator_parameters() else None
    for x, y in batches:
        opt.zero_grad()
        labeler(x, y)["loss"].backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        if clip is not None and clip_first:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if gen_opt is not None:
            assert labeler.meta_step(opt, gen_opt)["meta_updated"]
        if clip is not None and not clip_first:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    return labeler


def _assert_same_parameters(a: nn.Module, b: nn.Module, **tol: Any) -> None:
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k].detach(), sb[k].detach(), **(tol or {}), msg=k)


def _moved(a: nn.Module, b: nn.Module) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ----------------------------------------------------------------------------- Lightning
L = pytest.importorskip("lightning")


class LitClassifier(L.LightningModule):
    """A user's module: the only auxgen line is the loss in ``training_step``."""

    def __init__(self, labeler: AuxiliaryLabeler) -> None:
        super().__init__()
        self.labeler = labeler

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        out = self.labeler(x, y)
        self.log("aux_loss", out["aux_loss"])
        return out["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _trainer(tmp_path: Any, **kwargs: Any) -> Any:
    logging.getLogger("lightning").setLevel(logging.ERROR)
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("task", ["rotation", "maxl"])
def test_lightning_automatic_optimisation_with_clipping_equals_hand_loop(task, tmp_path):
    from auxgen.integrations.lightning import MetaStep

    labeler = _labeler(task)
    ref = _hand_loop(copy.deepcopy(labeler), list(DataLoader(_data(), batch_size=N)), CLIP)
    module = LitClassifier(labeler)
    callbacks = [MetaStep(_gen_opt)] if task == "maxl" else []
    trainer = _trainer(tmp_path, gradient_clip_val=CLIP, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers and the like
        trainer.fit(module, DataLoader(_data(), batch_size=N))
    assert trainer.global_step == STEPS
    _assert_same_parameters(labeler, ref, rtol=1e-5, atol=1e-6)
    if task == "maxl":  # the callback's optimiser state is in Lightning's checkpoint
        state = trainer._checkpoint_connector.dump_checkpoint()["callbacks"]
        (saved,) = [v for k, v in state.items() if k.startswith("MetaStep")]
        assert saved["labeler"]["state"][0]["step"] == STEPS


def test_lightning_bf16_mixed_precision_trains_every_part(tmp_path):
    from auxgen.integrations.lightning import MetaStep

    torch.manual_seed(0)
    labeler = AuxiliaryLabeler(
        TinyConvNet(3, width=4), tasks=[TransformLabels(form="predict"), GeneratedLabels(2)]
    )
    before = copy.deepcopy(labeler)
    trainer = _trainer(tmp_path, precision="bf16-mixed", callbacks=[MetaStep()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(LitClassifier(labeler), DataLoader(_data(), batch_size=N))
    for part in ("model", "aux_heads"):
        assert _moved(getattr(labeler, part), getattr(before, part)), part
    assert _moved(labeler.tasks[1], before.tasks[1])  # the generator: by the meta-gradient
    assert all(torch.isfinite(p).all() for p in labeler.parameters())


def test_lightning_callback_without_a_labeler_says_what_to_do(tmp_path):
    from auxgen.integrations.lightning import MetaStep

    class Plain(LitClassifier):
        def __init__(self) -> None:
            super().__init__(_labeler("rotation"))
            self.labeler = nn.Linear(3, 2)  # type: ignore[assignment]

    with pytest.raises(ValueError, match=r"MetaStep found no AuxiliaryLabeler in Plain"):
        _trainer(tmp_path, callbacks=[MetaStep()]).fit(Plain(), DataLoader(_data()))


# ------------------------------------------------------------------ Hugging Face Trainer
def _vit_labeler(task: str) -> AuxiliaryLabeler:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )  # fmt: skip
    tasks = TransformLabels() if task == "rotation" else GeneratedLabels(2)
    return AuxiliaryLabeler(ViTForImageClassification(config), tasks=tasks, output="logits")


@pytest.mark.parametrize("task", ["rotation", "maxl"])
def test_hf_trainer_equals_hand_loop_and_saves_a_pretrained_model(task, tmp_path):
    transformers = pytest.importorskip("transformers")
    from auxgen.integrations.hf import LABELER_FILE, AuxiliaryTrainer

    data = _data(N, size=8)  # one batch of the whole set per step: the sampler's order is moot
    rows = [{"pixel_values": x, "labels": int(y)} for x, y in zip(*data.tensors)]
    labeler = _vit_labeler(task)
    ref = _hand_loop(copy.deepcopy(labeler), [tuple(data.tensors)] * STEPS, CLIP, clip_first=True)
    args = transformers.TrainingArguments(
        str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=N,
        lr_scheduler_type="constant", max_grad_norm=CLIP, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    opt = torch.optim.SGD(labeler.parameters(), lr=0.1, momentum=0.9)
    trainer = AuxiliaryTrainer(
        model=labeler, args=args, train_dataset=rows, optimizers=(opt, None),
        gen_optimizer=_gen_opt,
    )  # fmt: skip
    trainer.train()
    _assert_same_parameters(labeler, ref, rtol=1e-5, atol=1e-6)
    # the deployable model loads with from_pretrained; the labeler's own state beside it
    trainer.save_model(str(tmp_path / "final"))
    loaded = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "final"))
    x = data.tensors[0][:2]
    torch.testing.assert_close(loaded.eval()(x).logits, labeler.eval()(x))
    state = torch.load(tmp_path / "final" / LABELER_FILE, weights_only=False)
    assert (state["gen_optimizer"] is not None) == (task == "maxl")


def test_hf_trainer_refuses_a_bare_model_and_wrong_columns(tmp_path):
    transformers = pytest.importorskip("transformers")
    from auxgen.integrations.hf import AuxiliaryTrainer

    args = transformers.TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match=r"model must be an auxgen.AuxiliaryLabeler"):
        AuxiliaryTrainer(model=nn.Linear(3, 2), args=args)
    trainer = AuxiliaryTrainer(model=_vit_labeler("rotation"), args=args)
    with pytest.raises(ValueError, match=r"expects batches with 'pixel_values' and 'labels'"):
        trainer.compute_loss(trainer.model, {"input_ids": torch.zeros(2, 3)})


# ---------------------------------------------------------------------------- Accelerate
@pytest.mark.parametrize("task", ["rotation", "maxl"])
@pytest.mark.usefixtures("fresh_accelerate_state")  # the next Accelerator starts afresh
def test_accelerate_backward_equals_hand_loop(task):
    accelerate = pytest.importorskip("accelerate")

    labeler = _labeler(task)
    ref = _hand_loop(copy.deepcopy(labeler), list(DataLoader(_data(), batch_size=N)), CLIP)
    accelerator = accelerate.Accelerator(cpu=True)
    opt = torch.optim.SGD(labeler.parameters(), lr=0.1, momentum=0.9)
    gen_opt = _gen_opt(labeler.generator_parameters()) if task == "maxl" else None
    model, opt, loader = accelerator.prepare(labeler, opt, DataLoader(_data(), batch_size=N))
    for x, y in loader:
        opt.zero_grad()
        accelerator.backward(model(x, y)["loss"])
        if gen_opt is not None:  # the prepared optimiser is unwrapped by meta_step
            accelerator.unwrap_model(model).meta_step(opt, gen_opt)
        accelerator.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    _assert_same_parameters(labeler, ref, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------- timm
def test_timm_task_protocol_and_loop():
    from auxgen.integrations.timm import HAS_TIMM_TASK, AuxiliaryTrainingTask

    labeler = _labeler("rotation")
    ref = _hand_loop(copy.deepcopy(labeler), list(DataLoader(_data(), batch_size=N)), None)
    task = AuxiliaryTrainingTask(labeler, verbose=False)
    if HAS_TIMM_TASK:
        from timm.task import TrainingTask

        assert isinstance(task, TrainingTask)
    opt = torch.optim.SGD(task.parameters(), lr=0.1, momentum=0.9)
    for x, y in DataLoader(_data(), batch_size=N):
        opt.zero_grad()
        out = task(x, y)
        assert out["output"].shape == (N, 3) and out["loss"].requires_grad
        out["loss"].backward()
        opt.step()
    _assert_same_parameters(labeler, ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="labeler must be an AuxiliaryLabeler"):
        AuxiliaryTrainingTask(nn.Linear(2, 2))  # type: ignore[arg-type]
