"""Writes the checkpoints that tests/library/test_checkpoint.py (the labeler's) and
tests/harness/test_runner.py (the run's) load: written by auxgen 0.1.0 as it was before
``AuxiliaryLabeler`` composed auxiliary tasks (state-dict keys ``aux_head.*``,
``generator.*``, ``owner``). Kept to show how the fixtures were made; it runs only against
that version's API (``AuxiliaryLabeler(model, psi, generator=..., entropy_weight=...)``).

    python tests/data/make_v0_fixtures.py   # with auxgen 0.1.0 (commit 86dca15) installed
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from helpers import TinyConvNet  # noqa: E402

from auxgen import AuxiliaryLabeler  # noqa: E402


def _labeler(generator: str) -> AuxiliaryLabeler:
    torch.manual_seed(0)
    return AuxiliaryLabeler(
        TinyConvNet(num_classes=3), psi=[2, 3, 1], generator=generator, entropy_weight=0.3
    )


def main() -> None:
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(3, 6, 3, 8, 8, generator=g)
    y = torch.arange(6) % 3
    for generator in ("head", "copy"):
        lab = _labeler(generator)
        opt = torch.optim.SGD(lab.model_parameters(), lr=0.1, momentum=0.9)
        gen_opt = torch.optim.Adam(lab.generator_parameters(), lr=1e-2)
        for x in xs[:2]:
            lab.step(x, y, opt, gen_opt)
        saved = copy.deepcopy(
            {
                "labeler": lab.state_dict(),
                "optimizer": opt.state_dict(),
                "gen_optimizer": gen_opt.state_dict(),
            }
        )
        out = lab.step(xs[2], y, opt, gen_opt)
        lab.eval()
        saved["after"] = {
            "loss": out["loss"],
            "meta_loss": out["meta_loss"],
            "state": {k: v.clone() for k, v in lab.state_dict().items() if torch.is_tensor(v)},
            "labels": lab.generate_labels(xs[0], y),
        }
        saved["x"], saved["y"] = xs, y
        torch.save(saved, HERE / f"labeler_v0_{generator}.ckpt")


def run_fixture() -> None:
    """An ``auxgen run`` checkpoint after epoch 2 of 3 and the uninterrupted run's results."""
    import json
    import shutil
    import tempfile

    from auxgen.experiments import training
    from auxgen.experiments.config import RunConfig

    save_epoch = training.C.save_epoch

    def save(path, cfg, epoch, *args, **kwargs):
        save_epoch(path, cfg, epoch, *args, **kwargs)
        if epoch == 2:
            shutil.copy(path, HERE / "run_v0_epoch2.ckpt")

    training.C.save_epoch = save
    with tempfile.TemporaryDirectory() as out:
        res = training.train(RUN_CONFIG(RunConfig, out))
    training.C.save_epoch = save_epoch
    keep = {k: res[k] for k in ("final_test_accuracy", "final_test_loss", "history")}
    (HERE / "run_v0_results.json").write_text(json.dumps(keep, indent=1))


def RUN_CONFIG(cls, out):  # noqa: N802 - the same config in tests/harness/test_runner.py
    return cls(
        dataset="digits",
        method="maxl",
        backbone="mlp",
        epochs=3,
        train_subset=20,
        width=16,
        lr=0.1,
        progress=False,
        threads=1,
        deterministic=True,
        out_dir=out,
        seed=0,
    )


if __name__ == "__main__":
    main()
    run_fixture()
