"""The ``auxgen`` command line's parser: options, their checks and their help.

Every option value is checked as it is parsed (a one-line ``auxgen: error: ...`` and exit
status 2 for what the command cannot mean) and ``--help`` shows each option's real default.
The commands themselves are in :mod:`auxgen.cli`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any, NoReturn, Optional, Union

__all__ = ["build_parser"]


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (plus exit status 2).

    Every error starts with ``auxgen: error:``, a subcommand's too; the hint names the
    subcommand's help (``see auxgen run --help``).
    """

    def error(self, message: str) -> NoReturn:
        root = self.prog.split()[0]
        self.exit(2, f"{root}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends each option's actual default to its help: ``(default: X)``.

    The default shown is the parser's own (read from :class:`RunConfig` or :func:`run_demo`,
    never repeated by hand), so ``--help`` cannot drift from the code. Options whose default
    is ``None`` (computed later, e.g. per dataset) or that take no value say what happens
    without them in their own help text.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "%(default)" in text
            or default is None
            or default is argparse.SUPPRESS
            or (action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction))
        ):
            return text
        shown = _render_default(default).replace("%", "%%")  # help strings are %-formatted
        return f"{text} (default: {shown})".lstrip()


def _render_default(value: Any) -> str:
    """A default as it is typed on the command line: ``0 1`` for ``[0, 1]``, ``on`` / ``off``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def _int_at_least(low: int, expected: str) -> Callable[[str], int]:
    """The type of an integer of at least ``low``; ``expected`` says so in the error."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = low - 1
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
#: a seed: ``0`` or more (``random.seed(-1)`` would silently be ``random.seed(1)``)
_non_negative_int = _int_at_least(0, "a non-negative integer")
_batch_size = _int_at_least(2, "an integer of at least 2 (BatchNorm needs 2 samples a batch)")


#: Words that ask for the whole training set instead of a subset.
_ALL = ("all", "none")


def _subset(text: str) -> Optional[int]:
    """``auxgen demo --train-subset``: a positive count of images per digit, or ``all``."""
    if text.strip().lower() in _ALL:
        return None
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive number of training images per digit, or 'all', got {text!r}"
        )
    return v


def _subset_or_fraction(text: str) -> Union[int, float, None]:
    """``25`` (images per fine class), ``5%`` or ``0.05`` (a fraction of each), or ``all``."""
    t = text.strip()
    if t.lower() in _ALL:
        return None
    if t.endswith("%") or "." in t:
        try:
            v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
        except ValueError:
            v = math.nan
        if not 0.0 < v < 1.0:
            raise argparse.ArgumentTypeError(
                f"expected a fraction of each fine class in (0, 1) such as 0.05 or 5% ('all' "
                f"for the whole training set), got {text!r}"
            )
        return v
    try:
        n = int(t)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive number of training images per fine class, a fraction in "
            f"(0, 1) such as 0.05 or 5%, or 'all', got {text!r}"
        )
    return n


def _fraction_upto(high: float) -> Callable[[str], float]:
    """The type of a fraction in ``[0, high]`` (the range :meth:`RunConfig.validate` allows)."""

    return _float_where(lambda v: 0.0 <= v <= high, f"a fraction in [0, {high:g}]")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _float_where(test: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """The type of a number for which ``test`` holds; ``expected`` says which in the error."""

    def parse(text: str) -> float:
        v = _float(text)
        if not test(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v

    return parse


_momentum = _float_where(lambda v: 0.0 <= v < 1.0, "a momentum in [0, 1)")
_positive_float = _float_where(lambda v: v > 0 and math.isfinite(v), "a positive number")
_non_negative_float = _float_where(lambda v: v >= 0 and math.isfinite(v), "a non-negative number")


def _add_common(p: argparse.ArgumentParser, threads_default: str) -> None:
    # Also accepted after the subcommand; SUPPRESS keeps the top-level value otherwise.
    p.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings only"
    )
    p.add_argument(
        "--threads", type=_positive_int, default=None, help=f"torch threads{threads_default}"
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``auxgen`` command."""
    parser = _Parser(
        prog="auxgen",
        formatter_class=_HelpFormatter,
        description="Train classifiers with an auxiliary task and compare the ways of getting "
        "its labels: from transformations of the input (which of the four rotations an image "
        "was given, alone or joint with its class), generated by Meta AuXiliary Learning "
        "(MAXL: a label-generation network trained by the meta-gradient), or fixed (a human "
        "hierarchy, random or k-means labels), against single-task training. 'auxgen demo' "
        "compares the methods offline on scikit-learn's bundled digits; 'auxgen run' runs the "
        "experiment harness (methods x seeds, same backbone and budget) on CIFAR-100, "
        "CIFAR-10, MNIST, Fashion-MNIST or the digits.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = parser.add_subparsers(dest="command", metavar="{demo,run}")
    sub.required = True
    _add_demo(sub)
    _add_run(sub)
    return parser


def _add_demo(sub: Any) -> None:
    from .experiments.sweep import DEMO_EPOCHS, DEMO_METHODS, DEMO_SEEDS, DEMO_TRAIN_SUBSET

    demo = sub.add_parser(
        "demo",
        formatter_class=_HelpFormatter,
        help="compare the methods offline on scikit-learn's digits",
        description="Train single-task, human, random, k-means, MAXL and the rotation tasks on "
        f"{DEMO_TRAIN_SUBSET} images per digit of scikit-learn's digits (primary task: digit "
        ">= 5, psi = (5, 5), human auxiliary task: the digit) with the same small CNN and "
        "budget; print and save a results table, accuracy curves and pictures of what MAXL "
        "learned.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--seeds", type=_positive_int, default=DEMO_SEEDS, help="number of seeds")
    demo.add_argument("--epochs", type=_positive_int, default=DEMO_EPOCHS, help="epochs per run")
    demo.add_argument(
        "--train-subset",
        type=_subset,
        default=DEMO_TRAIN_SUBSET,
        help="training images per digit, or 'all'",
    )
    demo.add_argument("--methods", nargs="+", default=list(DEMO_METHODS), help="methods to compare")
    demo.add_argument("--smoke", action="store_true", help="finish in seconds (tiny budget)")
    _add_common(demo, "")
    demo.set_defaults(command="demo", threads=1)


def _add_run(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        formatter_class=_HelpFormatter,
        help="train methods x seeds on CIFAR-100, CIFAR-10, MNIST, Fashion-MNIST or digits",
        description="Train one or more methods with one or more seeds on the same backbone "
        "and budget. Each run writes OUT/<method>/seed<k>/results.json and a checkpoint "
        "(resumed automatically); OUT gets results.json, results.md and accuracy.png.",
    )
    _add_task_options(run.add_argument_group("task"))
    _add_data_options(run.add_argument_group("data"))
    _add_model_options(run.add_argument_group("model and optimisation"))
    _add_maxl_options(run.add_argument_group("MAXL"))
    _add_execution_options(run.add_argument_group("execution"))
    _add_common(run, " (default: torch's)")
    run.set_defaults(command="run")


# The defaults of ``auxgen run`` are those of RunConfig (read from the class, not repeated);
# _HelpFormatter shows them.


def _add_task_options(g: Any) -> None:
    from .experiments.config import DATASETS, GENERATORS, METHODS, TRANSFORM_VARIANTS

    named = ", ".join([*METHODS, *(f"maxl-{gen}" for gen in GENERATORS)])
    g.add_argument("--dataset", choices=DATASETS, required=True, help="the dataset")
    g.add_argument(
        "--method",
        "--methods",
        dest="methods",
        nargs="+",
        default=["maxl"],
        help=f"{named}, maxl-<generator>-<meta source> such as maxl-head-next, or "
        f"transform-<variant> with a variant of {', '.join(TRANSFORM_VARIANTS)} (several allowed)",
    )
    g.add_argument(
        "--seeds",
        "--seed",
        dest="seeds",
        type=_non_negative_int,
        nargs="+",
        default=[0],
        help="seeds of the initialisation, batch order, augmentation and random labels",
    )
    g.add_argument(
        "--primary-level",
        type=int,
        default=None,
        help="CIFAR-100 primary level: 3, 10, 20 or 100 (fine) (default: 20; other datasets: "
        "their only primary task)",
    )
    g.add_argument(
        "--aux-level",
        type=int,
        default=None,
        help="CIFAR-100 level of the human auxiliary task (default: 100)",
    )
    g.add_argument(
        "--psi",
        type=_positive_int,
        nargs="+",
        default=None,
        help="aux classes per primary class, one value or one per class (default: the "
        "hierarchy's; 5 per class for CIFAR-10 and CIFAR-100's fine classes)",
    )


def _add_data_options(g: Any) -> None:
    from .experiments.config import RunConfig as D

    g.add_argument(
        "--data-dir",
        default=D.data_dir,
        help="folder with cifar-100-python/, cifar-10-batches-py/, MNIST/ or FashionMNIST/",
    )
    g.add_argument("--download", action="store_true", help="download the dataset if missing")
    g.add_argument(
        "--train-subset",
        type=_subset_or_fraction,
        default=D.train_subset,
        help="training images per fine class, a fraction of each (5%% or 0.05), or 'all' "
        "(default: all, the whole training set)",
    )
    g.add_argument(
        "--val-fraction",
        type=_fraction_upto(0.9),
        default=D.val_fraction,
        help="fraction of the training subset carved out for validation (per-epoch curves "
        "and the choice of settings use it; the test set is then evaluated once, at the end)",
    )
    g.add_argument(
        "--test-limit",
        type=_positive_int,
        default=D.test_limit,
        help="use only the first N test images (default: all)",
    )
    g.add_argument(
        "--eval-subset",
        type=_positive_int,
        default=D.eval_subset,
        help="test images for the per-epoch curve; final accuracy uses all (default: all)",
    )
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=D.augment,
        help="random crop (+ horizontal flip where valid) of the training batches",
    )
    g.add_argument(
        "--data-seed",
        type=_non_negative_int,
        default=D.data_seed,
        help="seed of the training subset and the splits",
    )


def _add_model_options(g: Any) -> None:
    from .experiments.config import OPTIMIZERS, SCHEDULES
    from .experiments.config import RunConfig as D

    g.add_argument(
        "--backbone", default=D.backbone, help="cnn, mlp, a timm or torchvision:NAME model"
    )
    g.add_argument("--width", type=_positive_int, default=D.width, help="width of the cnn backbone")
    g.add_argument(
        "--init",
        default=D.init,
        metavar="CHECKPOINT",
        help="start the backbone from this run checkpoint or state_dict, all but its "
        "classifier (default: untrained)",
    )
    g.add_argument("--epochs", type=_positive_int, default=D.epochs, help="epochs per run")
    g.add_argument("--batch-size", type=_batch_size, default=D.batch_size, help="batch size")
    g.add_argument("--lr", type=_positive_float, default=D.lr, help="(peak) learning rate")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=D.optimizer, help="optimiser")
    g.add_argument("--momentum", type=_momentum, default=D.momentum, help="SGD momentum")
    g.add_argument(
        "--weight-decay", type=_non_negative_float, default=D.weight_decay, help="weight decay"
    )
    g.add_argument(
        "--schedule", choices=SCHEDULES, default=D.schedule, help="learning-rate schedule"
    )
    g.add_argument(
        "--aux-weight",
        type=_non_negative_float,
        default=D.aux_weight,
        help="weight of the auxiliary loss",
    )
    g.add_argument(
        "--aux-label-noise",
        type=_fraction_upto(1.0),
        default=D.aux_label_noise,
        help="human/kmeans: fraction of the training images given a random child of their "
        "class instead of their label",
    )


def _add_maxl_options(g: Any) -> None:
    from .experiments.config import GENERATORS, META_MODES, META_SOURCES, OPTIMIZERS
    from .experiments.config import RunConfig as D

    g.add_argument(
        "--generator", choices=GENERATORS, default=D.generator, help="generator of plain maxl"
    )
    g.add_argument(
        "--gen-lr", type=_positive_float, default=D.gen_lr, help="the generator's learning rate"
    )
    g.add_argument(
        "--gen-optimizer",
        choices=("same", *OPTIMIZERS),
        default=D.gen_optimizer,
        help="the generator's optimiser (same: the kind of --optimizer, as in the paper)",
    )
    g.add_argument(
        "--gen-weight-decay",
        type=_non_negative_float,
        default=D.gen_weight_decay,
        help="the generator's weight decay",
    )
    g.add_argument(
        "--meta",
        choices=META_MODES,
        default=D.meta,
        help="exact meta-gradient, or first-order (finite differences)",
    )
    g.add_argument(
        "--meta-every",
        type=_positive_int,
        default=D.meta_every,
        help="update the generator every k steps",
    )
    g.add_argument(
        "--meta-source",
        choices=META_SOURCES,
        default=D.meta_source,
        help="meta loss on the batch just trained on (train, the paper), the next batch, "
        "or a held-out meta split (heldout)",
    )
    g.add_argument(
        "--meta-fraction",
        type=_fraction_upto(0.9),
        default=D.meta_fraction,
        help="fraction of the training images held out for --meta-source heldout",
    )
    _add_label_options(g)


def _add_label_options(g: Any) -> None:
    """The generated labels' regularisers and temperature, and the diagnostics."""
    from .experiments.config import RunConfig as D

    g.add_argument(
        "--entropy-weight",
        type=_non_negative_float,
        default=D.entropy_weight,
        help="weight of MAXL's anti-collapse term (entropy of the batch-mean label)",
    )
    g.add_argument(
        "--confidence-weight",
        type=_non_negative_float,
        default=D.confidence_weight,
        help="weight of the per-image label entropy (minimised); equal to --entropy-weight, "
        "the regulariser is the image-label mutual information (0: the paper's)",
    )
    g.add_argument(
        "--label-temperature",
        type=_positive_float,
        default=D.label_temperature,
        help="temperature of the generated labels; < 1 sharpens them",
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
    g.add_argument(
        "--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)"
    )
    r = g.add_mutually_exclusive_group()
    r.add_argument(
        "--resume",
        dest="resume",
        action="store_const",
        const=True,
        default=None,
        help="require a checkpoint to resume (default: resume when one exists)",
    )
    r.add_argument(
        "--no-resume",
        dest="resume",
        action="store_const",
        const=False,
        help="start afresh, overwriting any checkpoint",
    )
    g.add_argument(
        "--no-checkpoint", dest="checkpoint", action="store_false", help="write no checkpoints"
    )
    g.add_argument(
        "--dist-timeout",
        type=_positive_float,
        default=600.0,
        help="under torchrun: seconds a rank waits for the others before failing",
    )
    g.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long run: 1 epoch, at most 4 images per fine class, 256 test images",
    )
