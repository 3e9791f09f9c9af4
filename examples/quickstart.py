"""Quickstart: give a torchvision ResNet-18 auxiliary tasks (random data).

Part 1, the rotation task (labels from the four rotations of each image) in a plain loop:
``labeler(x, y)`` returns the multi-task loss and the loop does its own ``backward`` and
``opt.step()``. Part 2, MAXL's generated labels: the same loop plus ``labeler.meta_step``
between ``backward`` and ``opt.step()``, which trains the label generator.

python examples/quickstart.py            # 30 steps of each
python examples/quickstart.py --smoke    # 2 steps of each, seconds
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
    steps = 2 if args.smoke else args.steps
    torch.manual_seed(0)
    n, size = (4, 16) if args.smoke else (16, 32)
    x, y = torch.randn(n, 3, size, size), torch.randint(0, 4, (n,))

    # 1. The rotation task: labeler(x, y)["loss"] is the loss of your own loop.
    model = torchvision.models.resnet18(num_classes=4)  # any classifier with a linear head
    labeler = AuxiliaryLabeler(model, tasks=TransformLabels())
    opt = torch.optim.SGD(labeler.parameters(), lr=0.05, momentum=0.9)  # includes the heads
    for step in range(steps):
        opt.zero_grad()
        out = labeler(x, y)  # loss, primary_loss, aux_loss, task_losses, logits
        out["loss"].backward()
        opt.step()
        print(f"rotation step {step}: primary {out['primary_loss']:.3f}, aux {out['aux_loss']:.3f}")
    labeler.eval()
    print("predictions:", labeler(x).argmax(1).tolist())  # labeler(x) == model(x)
    print("4-view predictions:", labeler.aggregated_log_probs(x).argmax(1).tolist())

    # 2. MAXL: a learned task adds meta_step (the generator's update) before opt.step().
    model = torchvision.models.resnet18(num_classes=4)
    labeler = AuxiliaryLabeler(model, tasks=GeneratedLabels(psi=3))  # 3 aux classes per class
    opt = torch.optim.SGD(labeler.parameters(), lr=0.05, momentum=0.9)
    gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=1e-3, weight_decay=5e-4)
    for step in range(steps):
        opt.zero_grad()
        out = labeler(x, y)
        out["loss"].backward()
        meta = labeler.meta_step(opt, gen_opt)  # reads .grad; leaves the model as it was
        opt.step()
        print(
            f"step {step}: primary {out['primary_loss']:.3f}, aux {out['aux_loss']:.3f}, "
            f"meta {meta['meta_loss']:.3f}"
        )
    labeler.eval()
    print("generated aux classes:", labeler.generate_labels(x, y).argmax(1).tolist())


if __name__ == "__main__":
    main()
