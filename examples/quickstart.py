"""Quickstart: give a torchvision ResNet-18 auxiliary tasks (random data).

The rotation task (labels from the four rotations of each image) and, beside it, MAXL's
generated labels: two auxiliary heads, one step.

python examples/quickstart.py            # 30 steps
python examples/quickstart.py --smoke    # 2 steps, seconds
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
import torchvision

from auxgen import AuxiliaryLabeler, GeneratedLabels, TransformLabels


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="auxgen on a torchvision ResNet-18, random data")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="2 steps on 4 small images")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)  # any classifier with a linear head
    tasks = [TransformLabels(), GeneratedLabels(psi=3)]  # rotations; 3 generated classes each
    labeler = AuxiliaryLabeler(model, tasks=tasks)
    opt = torch.optim.SGD(labeler.model_parameters(), lr=0.05, momentum=0.9)
    gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=1e-3, momentum=0.9)
    n, size = (4, 16) if args.smoke else (16, 32)
    x, y = torch.randn(n, 3, size, size), torch.randint(0, 4, (n,))
    for step in range(2 if args.smoke else args.steps):
        out = labeler.step(x, y, opt, gen_opt)  # multi-task step + MAXL meta step
        losses = ", ".join(f"{k} {float(v):.3f}" for k, v in out["task_losses"].items())
        print(f"step {step}: primary {out['primary_loss']:.3f}, {losses}")
    labeler.eval()
    print("predictions:", labeler(x).argmax(1).tolist())  # labeler(x) == model(x)
    print("4-view predictions:", labeler.aggregated_log_probs(x).argmax(1).tolist())
    print("generated aux classes:", labeler.generate_labels(x, y).argmax(1).tolist())


if __name__ == "__main__":
    main()
