"""Auxiliary tasks for a Hugging Face ``transformers`` model, trained by the ``Trainer``.

A ``ViTForImageClassification`` built from a small ``ViTConfig`` (random initialisation, no
download) is wrapped in ``AuxiliaryLabeler(model, tasks=..., output="logits")``: the
labeler finds the ViT's ``classifier`` and reads the primary logits from the model's output
(``output="logits"``). ``auxgen.integrations.hf.AuxiliaryTrainer`` is a
``transformers.Trainer`` whose loss is the labeler's multi-task loss
(``labeler(batch["pixel_values"], batch["labels"])["loss"]``); everything else is the
``Trainer``'s: its AdamW optimiser and learning-rate schedule, gradient clipping
(``max_grad_norm``), mixed precision (``--bf16``), logging, evaluation and saving.

The auxiliary task is chosen with ``--task``: ``rotation`` (the default: labels from the four
rotations of each image, ``TransformLabels``) or ``maxl`` (MAXL's generated labels,
``GeneratedLabels(--psi)``), for which the trainer runs ``labeler.meta_step`` before every
optimiser step (after the ``Trainer``'s gradient clipping) with the generator's own SGD
optimiser (``gen_optimizer=``, at ``--gen-lr``).

At the end ``trainer.save_model(--output-dir)`` writes the plain ViT with
``save_pretrained`` (``ViTForImageClassification.from_pretrained`` reads it back, without
auxgen) and the labeler's own state (auxiliary heads, generator) in ``auxgen_labeler.pt``.

    pip install "auxgen[transformers]"
    python examples/hf_trainer.py --data-dir ~/data --download --epochs 5 --output-dir vit_run
    python examples/hf_trainer.py --task maxl --data-dir ~/data --bf16 --output-dir vit_maxl
    python examples/hf_trainer.py --smoke --output-dir /tmp/vit_smoke   # random tensors, seconds
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Optional

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset
from torchvision import transforms
from transformers import EvalPrediction, TrainingArguments, ViTConfig, ViTForImageClassification

from auxgen import AuxiliaryLabeler, GeneratedLabels, TransformLabels
from auxgen.integrations.hf import AuxiliaryTrainer

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10
CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class Rows(Dataset):
    """A torchvision ``(image, label)`` dataset as the rows a ``Trainer`` collates:
    ``{"pixel_values": (3, H, W) tensor, "labels": int}``."""

    def __init__(self, images: Dataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        x, y = self.images[i]
        return {"pixel_values": x, "labels": int(y)}


def build_data(args: argparse.Namespace) -> tuple[Any, Any]:
    """CIFAR-10 from ``--data-dir`` as rows (``--smoke``: random tensors)."""
    if args.smoke:
        g = torch.Generator().manual_seed(args.seed)
        size = args.image_size

        def rows(n: int) -> list[dict[str, Any]]:
            x = torch.randn(n, 3, size, size, generator=g)
            y = torch.randint(0, len(CLASSES), (n,), generator=g)
            return [{"pixel_values": xi, "labels": int(yi)} for xi, yi in zip(x, y)]

        return rows(16), rows(8)
    normalize = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    try:
        train = torchvision.datasets.CIFAR10(
            args.data_dir,
            train=True,
            download=args.download,
            transform=transforms.Compose(augment + normalize),
        )
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise SystemExit(
            f"CIFAR-10 not found under --data-dir {args.data_dir!r} ({e}); pass --download "
            "or --smoke"
        ) from None
    test = torchvision.datasets.CIFAR10(
        args.data_dir, train=False, transform=transforms.Compose(normalize)
    )
    return Rows(train), Rows(test)


def build_labeler(args: argparse.Namespace) -> AuxiliaryLabeler:
    """A small ViT from its config (no download), wrapped in the labeler."""
    config = ViTConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_channels=3,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden_size,
        num_labels=len(CLASSES),
        id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)},
    )
    model = ViTForImageClassification(config)
    tasks = GeneratedLabels(args.psi) if args.task == "maxl" else TransformLabels()
    # The model returns an ImageClassifierOutput: the primary logits are its "logits".
    return AuxiliaryLabeler(model, tasks=tasks, output="logits")


def accuracy(pred: EvalPrediction) -> dict[str, float]:
    """Primary-task accuracy from the evaluation's logits and labels."""
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    return {"accuracy": float((np.argmax(logits, axis=1) == pred.label_ids).mean())}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    p.add_argument("--output-dir", default="hf_vit_run", help="the Trainer's output folder")
    p.add_argument("--task", choices=["rotation", "maxl"], default="rotation")
    p.add_argument("--psi", type=int, default=5, help="MAXL's auxiliary classes per class")
    p.add_argument("--epochs", type=float, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="per device")
    p.add_argument("--lr", type=float, default=5e-4, help="the Trainer's AdamW learning rate")
    p.add_argument("--gen-lr", type=float, default=1e-3, help="MAXL generator's learning rate")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="random tensors, a tiny ViT, 2 epochs")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.batch_size, args.workers = 2, 8, 0
        args.image_size, args.patch_size, args.hidden_size, args.layers, args.heads = (
            16, 4, 16, 1, 2,
        )  # fmt: skip
    return args


def main(argv: Optional[list[str]] = None) -> AuxiliaryTrainer:
    """Train, evaluate and save; return the ``AuxiliaryTrainer`` (its ``state`` holds the logs)."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train_set, test_set = build_data(args)
    labeler = build_labeler(args)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size,
        learning_rate=args.lr,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        warmup_steps=int(0.1 * args.epochs * math.ceil(len(train_set) / args.batch_size)),
        max_grad_norm=args.max_grad_norm,
        bf16=args.bf16,
        eval_strategy="epoch",
        logging_strategy="epoch",
        save_strategy="no" if args.smoke else "epoch",
        dataloader_num_workers=args.workers,
        use_cpu=args.cpu or not torch.cuda.is_available(),
        report_to=[],
        disable_tqdm=args.smoke,
        seed=args.seed,
    )
    trainer = AuxiliaryTrainer(
        model=labeler,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=test_set,
        compute_metrics=accuracy,
        input_name="pixel_values",
        gen_optimizer=lambda params: torch.optim.SGD(params, lr=args.gen_lr, weight_decay=5e-4),
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(f"test accuracy {metrics['eval_accuracy']:.3f}, loss {metrics['eval_loss']:.4f}")
    trainer.save_model(args.output_dir)  # config.json + weights, and auxgen_labeler.pt
    return trainer


if __name__ == "__main__":
    main()
