"""The ``auxgen`` command line: ``auxgen demo`` and ``auxgen run``.

Examples::

    auxgen demo                      # offline digits demo, 1 to 2 min on two CPU cores
    auxgen demo --smoke --out /tmp/demo
    auxgen run --dataset cifar100 --data-dir ~/data --methods single human maxl-copy \\
        --seeds 0 1 --train-subset 50 --epochs 20 --out runs/cifar100
    python -m auxgen run --dataset digits --method maxl --generator head --epochs 5

Bad input (a missing or malformed ``--data-dir``, an unknown backbone, ``--psi`` or levels
that do not fit the dataset, an option value out of range such as ``--train-subset 0`` or a
count above the images of the smallest class, ...) ends with a one-line
``auxgen: error: ...`` on stderr and exit status 2; a checkpoint that cannot be written (a
full disk) ends with one line naming the file and the cause, and exit status 1. Progress
bars (tqdm) and log lines go to stderr; the results table goes to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .checkpoint import CheckpointWriteError
from .step import NonFiniteError

if TYPE_CHECKING:
    from .experiments.config import RunConfig

from .cli_parser import build_parser

__all__ = ["main", "build_parser"]

logger = logging.getLogger("auxgen")


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
            return int({"demo": _cmd_demo, "run": _cmd_run}[args.command](args))
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
