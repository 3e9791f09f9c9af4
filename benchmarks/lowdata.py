"""Low-data regimes: every method and MAXL variant, seeds in parallel one-thread processes.

Each regime is one ``auxgen run`` sweep (same backbone, budget and images for every method;
settings are compared on the validation split carved from the training subset, and the test
set is evaluated once, at the end of each run). Every (method, seed) runs as its own
one-thread process, ``--jobs`` at a time, each resumable from its checkpoints, so a stopped
session loses at most one epoch per run.
When all seeds are done, one more ``auxgen run`` over all seeds (instant: every run is
already finished) writes the regime's summary, and a copy without the per-run details goes
to ``--summary-dir`` (``docs/results/<regime>.json``) so the tables in ``docs/results.md``
can be regenerated and checked.

Usage::

    python benchmarks/lowdata.py --data-dir ~/data --regimes fmnist5 --jobs 2
    python benchmarks/lowdata.py --data-dir ~/data --regimes all --seeds 0 1 2 --table
    python benchmarks/lowdata.py --merge docs/results/cifar10cnn5_aug.json \\
        runs/summaries/cifar10cnn5_aug.json   # more seeds or methods into a committed summary

The regimes (``REGIMES`` below) use the ``mlp`` backbone at 5% of each class: it fits the
few thousand training images within a few epochs (the over-fitting regime where auxiliary
labels can regularise) and is cheap enough to run every method with several seeds on CPU.
The CIFAR-100 regimes first run ``single`` and ``human`` at each primary level (3, 10, 20)
to choose, on validation accuracy, the level where the human task helps most; that level is
then run with every method (``--methods``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

COMMON = [
    "--backbone", "mlp", "--width", "256", "--train-subset", "5%", "--val-fraction", "0.2",
    "--schedule", "onecycle", "--lr", "0.05", "--batch-size", "64", "--gen-lr", "0.001",
    "--threads", "1", "--no-progress",
]  # fmt: skip
CNN = ["--backbone", "cnn", "--width", "32"]  # later arguments override COMMON's
AUG = ["--augment", "--generator", "head"]  # crop + flip; the head generator for transform-maxl
METHODS = ["single", "human", "random", "kmeans", "maxl-copy"]
VARIANTS = ["maxl-head", "maxl-head-next"]

#: name -> (auxgen run arguments, methods)
REGIMES: dict[str, tuple[list[str], list[str]]] = {
    "fmnist5": (["--dataset", "fashionmnist", "--epochs", "20"], METHODS + VARIANTS),
    "mnist5": (["--dataset", "mnist", "--epochs", "20"], METHODS + VARIANTS),
    "cifar3_5": (
        ["--dataset", "cifar100", "--primary-level", "3", "--epochs", "20"],
        ["single", "human"],
    ),
    # The paper's budget (200 epochs): ten times the generator updates of cifar3_5.
    "cifar3_5_long": (
        ["--dataset", "cifar100", "--primary-level", "3", "--epochs", "200"],
        ["single", "human", "random", "maxl-copy"],
    ),
    "cifar10_5": (
        ["--dataset", "cifar100", "--primary-level", "10", "--epochs", "20"],
        ["single", "human"],
    ),
    "cifar20_5": (
        ["--dataset", "cifar100", "--primary-level", "20", "--epochs", "20"],
        ["single", "human"],
    ),
    # The 10-class level with a small CNN (``cnn``, width 32), where the human task helped in
    # an earlier check; 30 epochs take it close to fitting its 2,000 training images.
    "cifar10cnn5": (
        ["--dataset", "cifar100", "--primary-level", "10", "--epochs", "30", *CNN],
        ["single", "human", "maxl-copy", "maxl-head-next", "random", "maxl-head-heldout", "kmeans"],
    ),
    # AuxiLearn's setting: the 100 fine classes as the primary task, psi = 5, no human task.
    "cifar100fine5": (
        ["--dataset", "cifar100", "--primary-level", "100", "--psi", "5", "--epochs", "20"],
        ["single", "random", "maxl-copy", "maxl-head", "maxl-head-next"],
    ),
    # Labels from input transformations (the four rotations), with the standard crop + flip
    # augmentation, at a budget where single-task has stopped improving on validation (60
    # epochs; see docs/results.md). MAXL on top of the rotation task uses the cheap head
    # generator (transform-maxl); the paper's MAXL alone keeps its copy generator.
    "cifar10cnn5_aug": (
        ["--dataset", "cifar100", "--primary-level", "10", "--epochs", "60", *CNN, *AUG],
        [
            "single",
            "human",
            "transform",
            "transform-predict",
            "random",
            "maxl-copy",
            "transform-one",
            "transform-joint",
            "transform-sd",
            "transform-autol",
            "transform-maxl",
        ],
    ),  # fmt: skip
    # The same without augmentation, at cifar10cnn5's budget (30 epochs fit the images).
    "cifar10cnn5_t": (
        ["--dataset", "cifar100", "--primary-level", "10", "--epochs", "30", *CNN],
        [
            "single",
            "human",
            "transform",
            "transform-predict",
            "transform-joint",
            "transform-one",
            "random",
            "maxl-copy",
            "transform-maxl",
            "transform-cells",
            "transform-autol",
        ],
    ),  # fmt: skip
    # AuxiLearn's setting on the cnn with augmentation.
    "cifar100fine5_aug": (
        [
            "--dataset",
            "cifar100",
            "--primary-level",
            "100",
            "--psi",
            "5",
            "--epochs",
            "60",
            *CNN,
            *AUG,
        ],
        ["single", "transform", "transform-predict"],
    ),  # fmt: skip
    # Rotated digits and clothes (is a rotated 6 a 9?): the mlp regimes of mnist5 / fmnist5.
    "mnist5_t": (
        ["--dataset", "mnist", "--epochs", "20"],
        ["single", "human", "transform", "transform-predict"],
    ),
    "fmnist5_t": (
        ["--dataset", "fashionmnist", "--epochs", "20"],
        ["single", "human", "transform", "transform-predict"],
    ),
}

# Accuracy against compute (docs/results.md, "At equal compute"): the crop + flip regime at
# longer budgets, one regime per budget (the one-cycle schedule depends on the epoch count, so
# a longer run is not the same as a shorter one continued).
for _epochs in (120, 240, 480):
    REGIMES[f"cifar10cnn5_aug_e{_epochs}"] = (
        ["--dataset", "cifar100", "--primary-level", "10", "--epochs", str(_epochs), *CNN, *AUG],
        ["single", "transform", "transform-one"],
    )

# Fine-tuning (docs/results.md, "Fine-tuning a pre-trained backbone"): pre-train on every
# training image of CIFAR-100's fine classes 0-49 (cifar50a, one seed, made once), then
# fine-tune on 5% of the other 50 classes (cifar50b) from those weights (--init), at 30
# epochs and, for single-task, at the rotation task's compute (60 and 120 epochs).
PRETRAINED = "runs/lowdata/pre_{}/single/seed0/checkpoint.pt"
for _net, _backbone in (("cnn", CNN), ("r20", ["--backbone", "cifar_resnet20"])):
    REGIMES[f"pre_{_net}"] = (
        ["--dataset", "cifar50a", "--train-subset", "all", "--val-fraction", "0",
         "--epochs", "30", *_backbone, *AUG],
        ["single"],
    )  # fmt: skip
    _ft = ["--dataset", "cifar50b", *_backbone, *AUG, "--init", PRETRAINED.format(_net)]
    REGIMES[f"ft_{_net}"] = ([*_ft, "--epochs", "30"], ["single", "transform", "transform-onehalf"])
    for _epochs in (60, 120):
        REGIMES[f"ft_{_net}_e{_epochs}"] = ([*_ft, "--epochs", str(_epochs)], ["single"])
# The MNIST / Fashion-MNIST regimes with the small CNN instead of the MLP.
for _name, _dataset in (("mnist5_cnn", "mnist"), ("fmnist5_cnn", "fashionmnist")):
    REGIMES[_name] = (
        ["--dataset", _dataset, "--epochs", "20", *CNN],
        ["single", "transform", "transform-onehalf"],
    )


def _run(args: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "auxgen", "-q", "run", *args]
    return subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT)


#: config fields that name folders of the machine that ran it (not part of the setting)
_LOCAL = ("data_dir", "out_dir")


def strip_summary(result: dict) -> dict:
    """The sweep summary with per-run histories, without per-image analysis or local paths."""
    runs = []
    for r in result["runs"]:
        aux = {
            k: v
            for k, v in r.get("aux", {}).items()
            if k.startswith(("aux_nmi", "aggregated")) or k == "aux_used_test"
        }
        keep = ("label", "config", "history", "final_test_accuracy", "final_val_accuracy")
        keep += ("wall_time_s", "train_time_s", "num_train", "num_val", "num_meta", "psi")
        run = {**{k: r.get(k) for k in keep}, "aux": aux}
        run["config"] = {k: v for k, v in r["config"].items() if k not in _LOCAL}
        runs.append(run)
    out = {k: result[k] for k in ("title", "config", "methods", "seeds", "summary")}
    out["config"] = {k: v for k, v in out["config"].items() if k not in _LOCAL}
    return out | {"runs": runs}


def run_regime(
    name: str, a: argparse.Namespace, *, extra: Sequence[str] = (), tag: Optional[str] = None
) -> dict:
    """Run every seed of one regime (``extra``: more ``auxgen run`` arguments, later ones win).

    The runs go to ``a.out/name`` (``a.out/name/tag`` with a tag). Returns the summary without
    per-image analysis; without a tag it is also written to ``a.summary_dir/name.json``.
    """
    args, methods = REGIMES[name]
    if a.methods:
        methods = a.methods
    out = Path(a.out) / name if tag is None else Path(a.out) / name / tag
    base = [*COMMON, *args, *extra, "--data-dir", a.data_dir, "--out", str(out)]
    t0 = time.perf_counter()
    # One process per (method, seed), in the order of ``methods``: each writes only its own
    # OUT/<method>/seed<k>/, and a stopped sweep has finished the first methods for all seeds.
    pending = [(m, s) for m in methods for s in a.seeds]
    live: list[subprocess.Popen] = []
    while pending or live:
        while pending and len(live) < a.jobs:
            m, s = pending.pop(0)
            cmd = [*base, "--methods", m, "--seeds", str(s)]
            live.append(_run(cmd, out / f"log_{m}_seed{s}.txt"))
        time.sleep(2)
        for p in list(live):
            if p.poll() is not None:
                live.remove(p)
                if p.returncode != 0:
                    raise SystemExit(f"{name}: a run failed (exit {p.returncode}), see {out}")
    base += ["--methods", *methods]
    done = _run([*base, "--seeds", *map(str, a.seeds)], out / "log_summary.txt")
    if done.wait() != 0:
        raise SystemExit(f"{name}: summary failed, see {out}/log_summary.txt")
    result = json.loads((out / "results.json").read_text())
    summary = strip_summary(result)
    summary["regime"] = name
    summary["command"] = "python benchmarks/lowdata.py --regimes " + name
    summary["sweep_wall_time_s"] = time.perf_counter() - t0
    if tag is None:
        Path(a.summary_dir).mkdir(parents=True, exist_ok=True)
        (Path(a.summary_dir) / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
        print((out / "results.md").read_text())
    return summary


#: config fields that may differ between the runs of one regime
_PER_RUN = ("seed", "method", *_LOCAL)


def merge_summaries(*summaries: dict) -> dict:
    """One regime summary from several (e.g. seeds 0-2 from one session, 3-4 from the next).

    Runs are keyed by (method, seed); a later summary's run replaces an earlier one's, so
    merging a merged summary with the same runs again changes nothing. Every run of one method
    must have been made with the same settings (the config without the seed and machine-local
    fields), otherwise the merge is refused: pairing seeds across different settings would be
    wrong. Different methods may differ (e.g. in ``transform``).

    Raises:
        ValueError: if ``summaries`` is empty, names different regimes, their regime settings
            differ, or a run's settings differ from those of the first run of its method.
    """
    if not summaries:
        raise ValueError("merge_summaries: expected at least one summary, got none")
    regimes = {s.get("regime") for s in summaries}
    if len(regimes) != 1:
        raise ValueError(f"merge_summaries: expected one regime, got {sorted(map(str, regimes))}")
    shared = [
        {k: v for k, v in s.get("config", {}).items() if k not in _PER_RUN} for s in summaries
    ]
    for i, c in enumerate(shared[1:], 1):
        diff = sorted(k for k in shared[0].keys() | c.keys() if shared[0].get(k) != c.get(k))
        if diff:
            raise ValueError(
                f"merge_summaries: summary {i} has regime settings {diff} unlike summary 0's; "
                "expected the same regime settings"
            )
    from auxgen.experiments.sweep import summarize

    runs: dict[tuple[str, int], dict] = {}
    refs: dict[str, dict] = {}
    for s in summaries:
        for r in s["runs"]:
            setting = {k: v for k, v in r["config"].items() if k not in _PER_RUN}
            ref = refs.setdefault(r["label"], setting)
            diff = sorted(k for k in ref.keys() | setting.keys() if ref.get(k) != setting.get(k))
            if diff:
                raise ValueError(
                    f"merge_summaries: run {r['label']!r} seed {r['config']['seed']} differs "
                    f"in settings {diff}; expected the same settings for every run of a method"
                )
            runs[(r["label"], r["config"]["seed"])] = r
    order = list(dict.fromkeys(m for s in summaries for m in s["methods"]))
    merged = sorted(runs.values(), key=lambda r: (order.index(r["label"]), r["config"]["seed"]))
    out = dict(summaries[0])
    out["runs"] = merged
    out["methods"] = order
    out["seeds"] = sorted({r["config"]["seed"] for r in merged})
    out["summary"] = summarize(merged)
    # the wall time of the runs kept (a sweep's own wall time would be counted again each
    # time a merged summary is merged with more seeds)
    out.pop("sweep_wall_time_s", None)
    out["runs_wall_time_s"] = sum(r.get("wall_time_s", 0.0) for r in merged)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="the datasets' folder (required unless --merge)")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="merge these summaries of one regime (later runs win) into --summary-dir; no runs",
    )
    p.add_argument("--regimes", nargs="+", default=["all"], help=f"{', '.join(REGIMES)}, all")
    p.add_argument("--methods", nargs="+", default=None, help="override the regime's methods")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="parallel one-thread processes")
    p.add_argument("--out", default="runs/lowdata")
    p.add_argument("--summary-dir", default="docs/results")
    a = p.parse_args(argv)
    if a.merge:
        merged = merge_summaries(*(json.loads(Path(f).read_text()) for f in a.merge))
        Path(a.summary_dir).mkdir(parents=True, exist_ok=True)
        dest = Path(a.summary_dir) / f"{merged['regime']}.json"
        dest.write_text(json.dumps(merged, indent=1) + "\n")
        print(
            f"{dest}: {len(merged['runs'])} runs, methods {merged['methods']}, "
            f"seeds {merged['seeds']}"
        )
        return 0
    if not a.data_dir:
        p.error("--data-dir is required (unless --merge)")
    names = list(REGIMES) if a.regimes == ["all"] else a.regimes
    for n in names:
        if n not in REGIMES:
            p.error(f"unknown regime {n!r}; expected one of {', '.join(REGIMES)}")
    for n in names:
        run_regime(n, a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
