"""Prepare what ``benchmarks/gpu_evidence.py`` needs on a machine with no network and no data.

The GPU machine sees only the working tree (64 MiB at most). This writes, into an ignored
folder (default ``gpu_payload/``):

* ``data/cifar-100-python/{train,test}``: the exact images the runs use, in CIFAR-100's
  on-disk format: the training subset (``--train-subset`` of each fine class, seeded by
  ``--data-seed``, in the order the harness keeps it, so that ``train_subset=None`` on the
  payload gives the same training and validation split as ``train_subset=0.05`` on the full
  dataset, which is checked here) and the whole test set, uint8;
* ``wheels/``: torchopt and its dependency optree for the GPU machine's Python
  (``--python-version``, ``--platform``), from the package index (``--wheels``), installed
  there with ``pip install --no-index --find-links``.

Usage::

    python benchmarks/gpu_data.py --data-dir ~/data --out gpu_payload --wheels
    du -sh gpu_payload    # under ~45 MiB
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["write_payload", "check_payload", "download_wheels", "main"]

#: What the GPU machine's Python lacks (torch, torchvision, timm, scikit-learn are there).
WHEELS = ("torchopt==0.7.3", "optree", "graphviz")
MiB = 2.0**20


def _config(data_dir: str, train_subset: Any, data_seed: int, level: int):
    from auxgen.experiments.config import RunConfig

    return RunConfig(
        dataset="cifar100", primary_level=level, psi=5 if level == 100 else None,
        data_dir=data_dir, val_fraction=0.2,
        train_subset=train_subset, data_seed=data_seed,
        method="single", progress=False,
    )  # fmt: skip


def write_payload(
    data_dir: str, out: Path, *, train_subset: float = 0.05, data_seed: int = 0
) -> dict[str, Any]:
    """Write the training subset and the test set in CIFAR-100's format under ``out/data``.

    Returns:
        ``{"train": n_train, "test": n_test, "bytes": size of the data files}``.
    """
    from auxgen.experiments.cifar import ChecksumWarning, load_cifar100
    from auxgen.experiments.datasets import _subset_indices

    folder = out / "data" / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, train in (("train", True), ("test", False)):
        with warnings.catch_warnings():  # a re-packed copy's md5 differs from the release's
            warnings.simplefilter("ignore", ChecksumWarning)
            images, fine, coarse = load_cifar100(data_dir, train=train)
        if train:  # the harness's subset of the full set, in its order
            keep = _subset_indices(fine, train_subset, data_seed)
            images, fine, coarse = images[keep], fine[keep], coarse[keep]
        batch = {
            "data": images.reshape(len(fine), -1).numpy().astype(np.uint8),
            "fine_labels": fine.tolist(),
            "coarse_labels": coarse.tolist(),
        }
        with open(folder / split, "wb") as f:
            pickle.dump(batch, f, protocol=4)
        sizes[split] = len(fine)
    sizes["bytes"] = sum(p.stat().st_size for p in folder.iterdir())
    return sizes


def check_payload(
    data_dir: str, out: Path, *, train_subset: float = 0.05, data_seed: int = 0
) -> None:
    """The payload gives the harness exactly the images and splits of the full dataset.

    Raises:
        AssertionError: naming the tensor that differs.
    """
    from auxgen.experiments.datasets import load_data

    with warnings.catch_warnings():  # the payload's md5 differs from the release's: expected
        warnings.simplefilter("ignore")
        for level in (100, 10):
            full = load_data(_config(data_dir, train_subset, data_seed, level))
            mine = load_data(_config(str(out / "data"), None, data_seed, level))
            for name in ("x_train", "y_train", "fine_train", "x_val", "y_val", "x_test", "y_test"):
                a, b = getattr(full, name), getattr(mine, name)
                assert a is not None and b is not None and torch.equal(a, b), (level, name)


def download_wheels(out: Path, python_version: str, platform: str) -> list[str]:
    """``pip download`` the wheels of :data:`WHEELS` for the GPU machine into ``out/wheels``."""
    dest = out / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps"]
    cmd += ["--python-version", python_version, "--platform", platform, "-d", str(dest)]
    subprocess.run([*cmd, *WHEELS], check=True)
    return sorted(p.name for p in dest.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="folder holding cifar-100-python/")
    p.add_argument("--out", default="gpu_payload", help="an ignored folder of the working tree")
    p.add_argument("--train-subset", type=float, default=0.05)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--wheels", action="store_true", help="also download torchopt and optree")
    p.add_argument("--python-version", default="3.12")
    p.add_argument("--platform", default="manylinux2014_x86_64")
    a = p.parse_args(argv)
    out = Path(a.out)
    sizes = write_payload(a.data_dir, out, train_subset=a.train_subset, data_seed=a.data_seed)
    check_payload(a.data_dir, out, train_subset=a.train_subset, data_seed=a.data_seed)
    print(f"data: {sizes['train']} train + {sizes['test']} test images, checked against the "
          f"full dataset, {sizes['bytes'] / MiB:.1f} MiB")  # fmt: skip
    if a.wheels:
        print("wheels:", ", ".join(download_wheels(out, a.python_version, a.platform)))
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {total / MiB:.1f} MiB in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
