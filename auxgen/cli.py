"""The ``auxgen`` command line: ``auxgen demo`` and ``auxgen run``.

Examples::

    auxgen demo                      # offline digits demo, ~2 min on 2 shared CPU cores
    auxgen demo --smoke --out /tmp/demo
    auxgen run --dataset cifar100 --data-dir ~/data --methods single human maxl-copy \\
        --seeds 0 1 --train-subset 50 --epochs 20 --out runs/cifar100
    python -m auxgen run --dataset digits --method maxl --generator head --epochs 5

Bad input (a missing or malformed ``--data-dir``, an unknown backbone, ``--psi`` or levels
that do not fit the dataset, ...) ends with a one-line ``auxgen: error: ...`` on stderr and
exit status 2; a checkpoint that cannot be written (a full disk) ends with one line naming the
file and the cause, and exit status 1. Progress bars (tqdm) and log lines go to stderr; the
results table goes to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional, Union

from .checkpoint import CheckpointWriteError
from .step import NonFiniteError

if TYPE_CHECKING:
    from .experiments.config import RunConfig

__all__ = ["main", "build_parser"]

logger = logging.getLogger("auxgen")


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (plus exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _subset(text: str) -> Optional[int]:
    if text.lower() in ("all", "none", "0"):
        return None
    return _positive_int(text)


def _subset_or_fraction(text: str) -> Union[int, float, None]:
    """``25`` (images per fine class), ``5%`` or ``0.05`` (a fraction of each), or ``all``."""
    t = text.strip()
    if t.endswith("%") or "." in t:
        try:
            v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a count, a percentage such as 5% or a fraction such as 0.05, got "
                f"{text!r}"
            ) from None
        if not 0.0 < v < 1.0:
            raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
        return v
    return _subset(t)


def _fraction(text: str) -> float:
    v = _float(text)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return v


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _positive_float(text: str) -> float:
    v = _float(text)
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _add_common(p: argparse.ArgumentParser) -> None:
    # Also accepted after the subcommand; SUPPRESS keeps the top-level value otherwise.
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads")
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``auxgen`` command."""
    parser = _Parser(
        prog="auxgen",
        description="Meta AuXiliary Learning (MAXL): train classifiers with generated "
        "auxiliary labels and compare them with single-task and fixed auxiliary tasks.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = parser.add_subparsers(dest="command", metavar="{demo,run}")
    sub.required = True
    _add_demo(sub)
    _add_run(sub)
    return parser


def _add_demo(sub: Any) -> None:
    from .experiments.sweep import DEMO_METHODS

    demo = sub.add_parser(
        "demo",
        help="offline demo on scikit-learn digits (primary: digit >= 5; aux: the digit)",
        description="Train single-task, human, random, k-means, MAXL and the rotation tasks "
        "on 10 images per digit of scikit-learn's digits (primary task: digit >= 5, psi = "
        "(5, 5), human auxiliary task: the digit) with the same small CNN and budget; print "
        "and save a results table, accuracy curves and pictures of what MAXL learned.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--seeds", type=_positive_int, default=3, help="number of seeds (3)")
    demo.add_argument("--epochs", type=_positive_int, default=30, help="epochs per run (30)")
    demo.add_argument(
        "--train-subset",
        type=_subset,
        default=10,
        help="training images per digit, or 'all' (default: 10)",
    )
    demo.add_argument(
        "--methods",
        nargs="+",
        default=list(DEMO_METHODS),
        help=f"methods to compare (default: {' '.join(DEMO_METHODS)})",
    )
    demo.add_argument("--smoke", action="store_true", help="finish in seconds (tiny budget)")
    _add_common(demo)
    demo.set_defaults(func=_cmd_demo, threads=1)


def _add_run(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="train methods x seeds on a dataset",
        description="Train one or more methods with one or more seeds on the same backbone "
        "and budget. Each run writes OUT/<method>/seed<k>/results.json and a checkpoint "
        "(resumed automatically); OUT gets results.json, results.md and accuracy.png.",
    )
    _add_task_options(run.add_argument_group("task"))
    _add_data_options(run.add_argument_group("data"))
    _add_model_options(run.add_argument_group("model and optimisation"))
    _add_maxl_options(run.add_argument_group("MAXL"))
    _add_execution_options(run.add_argument_group("execution"))
    _add_common(run)
    run.set_defaults(func=_cmd_run)


# The defaults of ``auxgen run`` are those of RunConfig (read from the class, not repeated).


def _add_task_options(g: Any) -> None:
    from .experiments.config import DATASETS, GENERATORS, METHODS, TRANSFORM_VARIANTS

    named = ", ".join([*METHODS, *(f"maxl-{gen}" for gen in GENERATORS)])
    g.add_argument("--dataset", choices=DATASETS, required=True)
    g.add_argument(
        "--method",
        "--methods",
        dest="methods",
        nargs="+",
        default=["maxl"],
        help=f"{named}, maxl-<generator>-<meta source> such as maxl-head-next, or "
        f"transform-<variant> with a variant of {', '.join(TRANSFORM_VARIANTS)} (several allowed)",
    )
    g.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=[0])
    g.add_argument(
        "--primary-level",
        type=int,
        default=None,
        help="CIFAR-100 primary level: 3, 10, 20 or 100 (fine)",
    )
    g.add_argument("--aux-level", type=int, default=None, help="CIFAR-100 aux level (100)")
    g.add_argument("--psi", type=int, nargs="+", default=None, help="aux classes per class")


def _add_data_options(g: Any) -> None:
    from .experiments.config import RunConfig as D

    g.add_argument("--data-dir", default=None, help="folder with cifar-100-python/ etc.")
    g.add_argument("--download", action="store_true", help="download CIFAR if missing")
    g.add_argument(
        "--train-subset",
        type=_subset_or_fraction,
        default=D.train_subset,
        help="training images per fine class (25), or a fraction of each (5%% or 0.05)",
    )
    g.add_argument(
        "--val-fraction",
        type=_fraction,
        default=D.val_fraction,
        help="fraction of the training subset carved out for validation (per-epoch curves "
        "and the choice of settings use it; the test set is then evaluated once, at the end)",
    )
    g.add_argument("--test-limit", type=_positive_int, default=D.test_limit)
    g.add_argument(
        "--eval-subset",
        type=_positive_int,
        default=D.eval_subset,
        help="test images for the per-epoch curve (final accuracy uses all)",
    )
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=D.augment)
    g.add_argument("--data-seed", type=int, default=D.data_seed, help="seed of the training subset")


def _add_model_options(g: Any) -> None:
    from .experiments.config import OPTIMIZERS, SCHEDULES
    from .experiments.config import RunConfig as D

    g.add_argument(
        "--backbone", default=D.backbone, help="cnn, mlp, a timm or torchvision:NAME model"
    )
    g.add_argument("--width", type=_positive_int, default=D.width, help="width of the cnn backbone")
    g.add_argument("--epochs", type=_positive_int, default=D.epochs)
    g.add_argument("--batch-size", type=_positive_int, default=D.batch_size)
    g.add_argument("--lr", type=_float, default=D.lr)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=D.optimizer)
    g.add_argument("--momentum", type=_float, default=D.momentum)
    g.add_argument("--weight-decay", type=_float, default=D.weight_decay)
    g.add_argument("--schedule", choices=SCHEDULES, default=D.schedule)
    g.add_argument("--aux-weight", type=_float, default=D.aux_weight)
    g.add_argument(
        "--aux-label-noise",
        type=_float,
        default=D.aux_label_noise,
        help="human/kmeans: fraction of the training images given a random child of their "
        "class instead of their label (0)",
    )


def _add_maxl_options(g: Any) -> None:
    from .experiments.config import GENERATORS, META_MODES, META_SOURCES, OPTIMIZERS
    from .experiments.config import RunConfig as D

    g.add_argument("--generator", choices=GENERATORS, default=D.generator)
    g.add_argument("--gen-lr", type=_float, default=D.gen_lr)
    g.add_argument(
        "--gen-optimizer",
        choices=("same", *OPTIMIZERS),
        default=D.gen_optimizer,
        help="the generator's optimiser (same: the kind of --optimizer, as in the paper)",
    )
    g.add_argument("--gen-weight-decay", type=_float, default=D.gen_weight_decay)
    g.add_argument("--meta", choices=META_MODES, default=D.meta)
    g.add_argument("--meta-every", type=_positive_int, default=D.meta_every)
    g.add_argument(
        "--meta-source",
        choices=META_SOURCES,
        default=D.meta_source,
        help="meta loss on the batch just trained on (train, the paper), the next batch, "
        "or a held-out meta split (heldout)",
    )
    g.add_argument(
        "--meta-fraction",
        type=_fraction,
        default=D.meta_fraction,
        help=f"fraction of the training images held out for --meta-source heldout "
        f"({D.meta_fraction})",
    )
    g.add_argument("--entropy-weight", type=_float, default=D.entropy_weight)
    g.add_argument(
        "--confidence-weight",
        type=_float,
        default=D.confidence_weight,
        help="weight of the per-image label entropy (minimised); equal to --entropy-weight, "
        "the regulariser is the image-label mutual information (0: the paper's)",
    )
    g.add_argument(
        "--label-temperature",
        type=_positive_float,
        default=D.label_temperature,
        help="temperature of the generated labels; < 1 sharpens them (1)",
    )
    g.add_argument(
        "--diagnostics",
        action="store_true",
        help="record the cosine of the primary and auxiliary gradients per epoch",
    )


def _add_execution_options(g: Any) -> None:
    from .experiments.config import RunConfig as D

    g.add_argument("--out", default=None, help="output folder (default: runs/<dataset>)")
    g.add_argument("--device", default=D.device, help="cpu, cuda, cuda:N or auto")
    g.add_argument("--deterministic", action="store_true")
    r = g.add_mutually_exclusive_group()
    r.add_argument(
        "--resume",
        dest="resume",
        action="store_const",
        const=True,
        default=None,
        help="require a checkpoint to resume (default: resume when one exists)",
    )
    r.add_argument("--no-resume", dest="resume", action="store_const", const=False)
    g.add_argument("--no-checkpoint", dest="checkpoint", action="store_false")
    g.add_argument(
        "--dist-timeout",
        type=_positive_float,
        default=600.0,
        help="under torchrun: seconds a rank waits for the others before failing (600)",
    )
    g.add_argument("--smoke", action="store_true", help="a seconds-long run")


def _check_data_dir(path: str, download: bool) -> None:
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"--data-dir {path} is not a directory")
    if not p.exists() and not download:
        raise FileNotFoundError(f"--data-dir {path} does not exist (pass --download to fetch)")


def _report(result: dict[str, Any], out: Optional[str]) -> None:
    from .experiments.sweep import format_table

    print(format_table(result["summary"]))
    if out is not None:
        names = ["results.json", "results.md", "accuracy.png"]
        names += sorted(p.name for p in Path(out).glob("*_aux_*.png"))
        files = ", ".join(n for n in names if (Path(out) / n).is_file())
        print(f"\nwrote {files} to {out}")


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    from .experiments.config import parse_method
    from .experiments.sweep import run_demo

    for m in args.methods:
        parse_method(m)
    t0 = time.perf_counter()
    result = run_demo(
        out_dir=args.out,
        seeds=args.seeds,
        smoke=args.smoke,
        epochs=args.epochs,
        train_subset=args.train_subset,
        methods=args.methods,
        threads=args.threads,
        progress=args.progress,
    )
    _report(result, args.out)
    maxl = [r for r in result["runs"] if r["config"]["method"] == "maxl"]
    if maxl and "aux_nmi_test" in maxl[0]["aux"]:
        nmis = ", ".join(f"{r['aux']['aux_nmi_test']:.3f}" for r in maxl)
        rand = [r["aux"]["aux_nmi_train"] for r in result["runs"] if r["label"] == "random"]
        ref = f" (random labels: {sum(rand) / len(rand):.3f})" if rand else ""
        print(f"MAXL: NMI of generated aux classes with the true digits (test set): {nmis}{ref}")
    print(f"demo finished in {time.perf_counter() - t0:.1f}s")
    return 0


def run_config(args: argparse.Namespace) -> RunConfig:
    """The shared :class:`RunConfig` of parsed ``auxgen run`` arguments.

    Every option named after a ``RunConfig`` field is that field; ``--psi`` with one value
    is that int, and ``--data-dir`` defaults to ``data``. ``--methods`` and ``--seeds`` are
    applied per run (see :meth:`RunConfig.with_method`).

    Example:
        >>> args = build_parser().parse_args(["run", "--dataset", "cifar100", "--psi", "5"])
        >>> run_config(args).psi, run_config(args).data_dir
        (5, 'data')
    """
    from .experiments.config import RunConfig

    psi = None if args.psi is None else (args.psi[0] if len(args.psi) == 1 else tuple(args.psi))
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields}
    options.update(psi=psi, data_dir=args.data_dir if args.data_dir is not None else "data")
    return RunConfig(**options)


def _cmd_run(args: argparse.Namespace) -> int:
    from .experiments.config import check_config, parse_variant
    from .experiments.models import check_backbone
    from .experiments.sweep import run_sweep

    check_backbone(args.backbone)
    base = run_config(args)
    if args.dataset != "digits":
        _check_data_dir(base.data_dir, args.download)
    for m in args.methods:
        check_config(dataclasses.replace(base, method=parse_variant(m)[0]))
    out = args.out if args.out is not None else f"runs/{args.dataset}"
    _init_distributed(args.dist_timeout)
    try:
        result = run_sweep(base, args.methods, args.seeds, out, title=f"auxgen run: {args.dataset}")
        from .experiments.runtime import is_main_process

        if is_main_process():
            _report(result, out)
    except BaseException:
        _finish_distributed(wait=False)
        raise
    _finish_distributed()
    return 0


def _init_distributed(timeout_s: float = 600.0) -> None:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1), if any.

    ``AuxiliaryLabeler.step`` then averages gradients across ranks, the runner shards every
    epoch across them and rank 0 writes the outputs.

    The process group's keys live under a prefix unique to the ``torchrun`` attempt
    (``TORCHELASTIC_RUN_ID`` and ``TORCHELASTIC_RESTART_COUNT``). torchrun's c10d rendezvous
    serves every attempt from one key-value store, and ``init_process_group`` publishes each
    rank's gloo address there under fixed names; after a restart, a worker that read its
    peer's entry before the peer had overwritten it dialled the dead attempt's port
    ("Gloo connectFullMesh failed ... Connection refused") or waited on stale barrier
    counters. Collectives time out after ``timeout_s`` seconds, so a rank whose peer stops
    answering raises instead of waiting forever (and torchrun restarts the group).
    """
    import datetime
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    store = dist.PrefixStore(f"auxgen/{run_id}/attempt{attempt}", store)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    logger.debug("%s process group: rank %d of %d, attempt %s", backend, rank, world, attempt)


def _finish_distributed(wait: bool = True) -> None:
    """Wait for every rank, then tear the process group down (no-op without one).

    With ``wait`` false (on an error) the ranks skip the final barrier and wait at most 10 s
    for each other through the rendezvous store before tearing down.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        # Gloo: a rank that destroys its connections while a peer is still finishing the last
        # collective can make the peer abort ("terminate called without an active
        # exception"). Meeting once more through the store (not a gloo connection) leaves
        # every rank past its last collective first. On an error the peers may be gone: wait
        # for them a few seconds at most (all ranks raise a shared checkpoint failure together).
        deadline = time.monotonic() + (float("inf") if wait else 10.0)
        try:
            store = dist.distributed_c10d._get_default_store()
            store.add("auxgen/finished", 1)
            while store.add("auxgen/finished", 0) < dist.get_world_size():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        except RuntimeError:  # the store is gone too: nothing left to wait for
            if wait:
                raise
        dist.destroy_process_group()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``auxgen`` command line; return the exit status.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on bad input (one-line message on stderr), 1 when training diverges
        or a checkpoint cannot be written (one line naming the file and the cause), 130 on
        Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from .experiments.runtime import missing_extras

    missing = missing_extras()
    if missing:
        print(
            f"auxgen: error: the command line needs the 'experiments' extra ({', '.join(missing)}"
            " missing): pip install 'auxgen[experiments]'",
            file=sys.stderr,
        )
        return 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("auxgen").setLevel(level)
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():
            return int(args.func(args))
    except CheckpointWriteError as e:
        print(f"auxgen: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"auxgen: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"auxgen: training diverged: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("auxgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
