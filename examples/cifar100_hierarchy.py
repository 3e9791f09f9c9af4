"""CIFAR-100 with the MAXL hierarchy: primary = 20 superclasses, psi = 5 (100 fine classes).

A thin wrapper over :func:`auxgen.experiments.sweep.run_sweep` (the same as ``auxgen run --dataset
cifar100``) whose defaults are the regime of ``docs/results.md``: 20 training images per fine
class, no augmentation, 25 epochs of one-cycle SGD, every method with the same small CNN
(width 16).

    mkdir -p ~/data && tar -xJf cifar-100-python.tar.xz -C ~/data
    python examples/cifar100_hierarchy.py --data-dir ~/data --out runs/cifar100
    python examples/cifar100_hierarchy.py --smoke   # seconds; random images without data
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

from auxgen.experiments.cifar import ChecksumWarning, write_fake_cifar100
from auxgen.experiments.config import RunConfig
from auxgen.experiments.sweep import format_table, run_sweep

METHODS = ["single", "human", "random", "kmeans", "maxl-copy", "maxl-head"]


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data-dir", default=os.path.expanduser("~/data"), help="folder with cifar-100-python/"
    )
    p.add_argument("--out", default="runs/cifar100_hierarchy")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--primary-level", type=int, default=20, choices=(3, 10, 20))
    p.add_argument("--train-subset", type=int, default=20, help="images per fine class")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="a seconds-long run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    data_dir = args.data_dir
    if args.smoke and not (Path(data_dir) / "cifar-100-python" / "train").is_file():
        data_dir = str(write_fake_cifar100(tempfile.mkdtemp(prefix="fake_cifar100_")))
        logging.info("no CIFAR-100 under --data-dir: the smoke run uses random images")
    base = RunConfig(
        dataset="cifar100",
        data_dir=data_dir,
        primary_level=args.primary_level,
        aux_level=100,
        train_subset=args.train_subset,
        epochs=args.epochs,
        width=args.width,
        batch_size=64,
        lr=0.1,
        schedule="onecycle",
        gen_lr=0.01,
        eval_subset=500,
        threads=args.threads,
        smoke=args.smoke,
    )
    with warnings.catch_warnings():
        if data_dir != args.data_dir:  # random files: their md5 is not the release's, of course
            warnings.simplefilter("ignore", ChecksumWarning)
        result = run_sweep(base, args.methods, args.seeds, args.out, title="CIFAR-100 hierarchy")
    print(format_table(result["summary"]))


if __name__ == "__main__":
    main()
