"""Your own auxiliary task in twenty lines: two tasks written from scratch.

* ``UpsideDown``: is the image upside down? The batch and its vertical flip are forwarded
  together, and the auxiliary head predicts which is which (an image task: a cousin of
  rotation prediction that needs no square images).
* ``MaskedToken``: which token was masked? One position of each token sequence is replaced
  by a mask token, and the head predicts the original token from the masked sequence's
  features (a text task for any classifier of token ids).

Each task says three things: the size of its head's softmax (``outputs``), what to forward
beside the batch and the targets (``plan``), and which rows of features the head sees
(``head_input``). The labeler gives it a head, trains it in the loss it returns and checks
what the task returns (see docs/custom_task.md). The script trains a small classifier with
each task on synthetic data, and the text task once more with its loss weight learned by
the meta-gradient (``weight=LearnedWeight(1.0)``, Auto-lambda).

    python examples/custom_task.py            # a few seconds
    python examples/custom_task.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auxgen import AuxiliaryLabeler, AuxiliaryTask, LearnedWeight
from auxgen.tasks import TaskContext, TaskPlan


class UpsideDown(AuxiliaryTask):
    """Predict whether an image is upside down (flipped vertically)."""

    name = "upside_down"

    def outputs(self, ctx: TaskContext) -> list[int]:
        return [2]  # one 2-way softmax: upright, upside down

    def plan(self, x: Tensor, y: Tensor, aux_target: Optional[Tensor]) -> TaskPlan:
        flipped = x.flip(-2)  # the views: the batch upside down
        which = torch.arange(2, device=y.device).repeat_interleave(x.shape[0])
        return TaskPlan(views=flipped, targets=F.one_hot(which, 2).float())

    def head_input(self, plan: TaskPlan, h: Tensor, h_views: Optional[Tensor]) -> Tensor:
        return torch.cat([h, h_views])  # rows in the targets' order: upright, then flipped


class MaskedToken(AuxiliaryTask):
    """Predict the token that was masked, from the masked sequence (token ids ``(N, L)``)."""

    name = "masked_token"

    def __init__(self, vocab_size: int, mask_id: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.vocab_size, self.mask_id = vocab_size, mask_id

    def outputs(self, ctx: TaskContext) -> list[int]:
        return [self.vocab_size]

    def plan(self, x: Tensor, y: Tensor, aux_target: Optional[Tensor]) -> TaskPlan:
        where = torch.randint(x.shape[1], (x.shape[0], 1), device=x.device)
        masked = x.scatter(1, where, self.mask_id)  # one position of each sequence masked
        original = x.gather(1, where).squeeze(1)
        return TaskPlan(views=masked, targets=F.one_hot(original, self.vocab_size).float())

    def head_input(self, plan: TaskPlan, h: Tensor, h_views: Optional[Tensor]) -> Tensor:
        return h_views  # the masked sequences' features


# ------------------------------------------------------------------ models and data
class SmallCNN(nn.Module):
    """Two conv blocks, global pooling and a linear classifier ``fc``."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class BagOfTokens(nn.Module):
    """Token embeddings, mean pooling and a linear classifier ``fc``."""

    def __init__(self, vocab_size: int, num_classes: int, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc(self.embed(tokens).mean(1))


def image_data(n: int, classes: int, size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Class-coloured noise: a class is a colour tint on the top half of the image."""
    y = torch.randint(classes, (n,), generator=g)
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    x[:, :, : size // 2] += F.one_hot(y % 3, 3).float()[:, :, None, None]
    return x, y


def token_data(n: int, classes: int, vocab: int, length: int, g: torch.Generator):
    """Token sequences in which each class has its own frequent keywords."""
    y = torch.randint(classes, (n,), generator=g)
    tokens = torch.randint(1, vocab, (n, length), generator=g)
    keywords = 1 + y[:, None] * 3 + torch.randint(3, (n, length // 3), generator=g)
    tokens[:, : length // 3] = keywords
    return tokens, y


def train(
    labeler: AuxiliaryLabeler, x: Tensor, y: Tensor, steps: int, batch: int
) -> dict[str, float]:
    """The user's own loop: the loss form, and ``meta_step`` for a learned weight."""
    opt = torch.optim.SGD(labeler.parameters(), lr=0.1, momentum=0.9)
    learned = labeler.generator_parameters()
    gen_opt = torch.optim.Adam(learned, lr=0.01) if learned else None
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(x.shape[0], (batch,), generator=g)
        opt.zero_grad()
        out = labeler(x[idx], y[idx])
        out["loss"].backward()
        if gen_opt is not None:
            labeler.meta_step(opt, gen_opt)
        opt.step()
    labeler.eval()
    with torch.no_grad():
        acc = float((labeler(x).argmax(1) == y).float().mean())
    labeler.train()
    task = labeler.tasks[0]
    return {"train_acc": acc, "aux_loss": float(out["aux_loss"].detach()), "weight": task.weight}


def main(argv: Optional[list[str]] = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--smoke", action="store_true", help="a few steps")
    args = p.parse_args(argv)
    steps = 6 if args.smoke else args.steps
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    results = {}
    x, y = image_data(256, 4, 16, g)
    image = AuxiliaryLabeler(SmallCNN(4), tasks=UpsideDown())
    results["upside_down"] = train(image, x, y, steps, 32)
    vocab, mask = 40, 0
    tokens, labels = token_data(256, 4, vocab, 12, g)
    text = AuxiliaryLabeler(BagOfTokens(vocab, 4), tasks=MaskedToken(vocab, mask))
    results["masked_token"] = train(text, tokens, labels, steps, 32)
    learned = MaskedToken(vocab, mask, weight=LearnedWeight(1.0))
    text = AuxiliaryLabeler(BagOfTokens(vocab, 4), tasks=learned)
    results["masked_token_learned_weight"] = train(text, tokens, labels, steps, 32)
    for name, r in results.items():
        print(f"{name:28s} train acc {r['train_acc']:.3f}  aux loss {r['aux_loss']:.3f}  "
              f"weight {r['weight']:.4f}")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
