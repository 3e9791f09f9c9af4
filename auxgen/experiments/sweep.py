"""Sweeps of methods x seeds, their summaries (tables, ``results.json``) and the digits demo.

:func:`run_sweep` trains several methods over several seeds with the same backbone and
budget and writes a summary (``results.json``, ``results.md`` and ``accuracy.png``);
:func:`summarize`, :func:`format_table` and :func:`markdown_table` turn runs into tables;
:func:`run_demo` is the offline scikit-learn digits demo.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .checkpoints import RESULTS_NAME
from .config import RunConfig, check_config
from .datasets import load_data
from .models import check_backbone
from .runtime import PathLike, is_main_process, write_json
from .training import train

__all__ = ["run_sweep", "run_demo", "summarize", "format_table", "markdown_table"]


#: The methods ``auxgen demo`` compares by default.
DEMO_METHODS: tuple[str, ...] = (
    "single", "human", "random", "kmeans", "maxl", "transform", "transform-joint",
)  # fmt: skip
#: The demo's default budget: seeds, epochs per run and training images per digit (the
#: defaults of :func:`run_demo` and of ``auxgen demo``).
DEMO_SEEDS = 3
DEMO_EPOCHS = 30
DEMO_TRAIN_SUBSET = 10


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-method statistics over seeds, in first-seen order.

    Standard deviations are sample standard deviations (``ddof=1``; 0 for one seed).

    Returns:
        One dict per method: ``label``, ``seeds``, ``accuracy_mean``, ``accuracy_std``,
        ``accuracies``, ``wall_time_mean_s``, ``train_time_mean_s``,
        ``epoch_time_mean_s`` and, where available, ``aux_nmi_test_mean`` /
        ``aux_nmi_train_mean``.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r["label"], []).append(r)
    rows = []
    for label, rs in groups.items():
        accs = np.array([r["final_test_accuracy"] for r in rs], dtype=float)
        vals = np.array([r.get("final_val_accuracy") or np.nan for r in rs], dtype=float)
        row: dict[str, Any] = {
            "label": label,
            "seeds": [r["config"]["seed"] for r in rs],
            "accuracies": accs.tolist(),
            "accuracy_mean": float(accs.mean()),
            "accuracy_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
            "val_accuracies": None if np.isnan(vals).any() else vals.tolist(),
            "val_accuracy_mean": None if np.isnan(vals).any() else float(vals.mean()),
            "val_accuracy_std": None
            if np.isnan(vals).any()
            else (float(vals.std(ddof=1)) if len(vals) > 1 else 0.0),
            "wall_time_mean_s": float(np.mean([r["wall_time_s"] for r in rs])),
            "train_time_mean_s": float(np.mean([r["train_time_s"] for r in rs])),
            "epoch_time_mean_s": float(
                np.mean([h["epoch_time_s"] for r in rs for h in r["history"]] or [0.0])
            ),
        }
        for key in ("aux_nmi_test", "aux_nmi_train"):
            vals = [r["aux"][key] for r in rs if key in r.get("aux", {})]
            if vals:
                row[f"{key}_mean"] = float(np.mean(vals))
        rows.append(row)
    return rows


def _nmi_cell(row: dict[str, Any]) -> str:
    if "aux_nmi_test_mean" in row:
        return f"{row['aux_nmi_test_mean']:.3f} (test), {row['aux_nmi_train_mean']:.3f} (train)"
    if "aux_nmi_train_mean" in row:
        return f"{row['aux_nmi_train_mean']:.3f} (train)"
    return "-"


def _val_cell(row: dict[str, Any]) -> str:
    if row.get("val_accuracy_mean") is None:
        return "-"
    return f"{100 * row['val_accuracy_mean']:.2f} ± {100 * row['val_accuracy_std']:.2f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`summarize` rows (for the terminal)."""
    head = (
        "method",
        "val accuracy (%)",
        "test accuracy (%)",
        "seeds",
        "wall s/run",
        "train s/epoch",
        "aux NMI",
    )
    body = [
        (
            r["label"],
            _val_cell(r),
            f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}",
            str(len(r["seeds"])),
            f"{r['wall_time_mean_s']:.1f}",
            f"{r['epoch_time_mean_s']:.2f}",
            _nmi_cell(r),
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of :func:`summarize` rows."""
    out = [
        "| method | val accuracy (%) | test accuracy (%) | seeds | wall time / run (s) "
        "| train time / epoch (s) | aux NMI with fine labels |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['label']} | {_val_cell(r)} "
            f"| {100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} "
            f"| {len(r['seeds'])} | {r['wall_time_mean_s']:.1f} | {r['epoch_time_mean_s']:.2f} "
            f"| {_nmi_cell(r)} |"
        )
    return "\n".join(out)


def _curves(
    runs: Sequence[dict[str, Any]], key: str = "test_accuracy"
) -> dict[str, list[list[float]]]:
    curves: dict[str, list[list[float]]] = {}
    for r in runs:
        k = key
        if k == "test_accuracy" and r["history"] and "val_accuracy" in r["history"][0]:
            k = "val_accuracy"  # with a validation split the test set is evaluated once
        if r["history"] and all(k in h for h in r["history"]):
            curves.setdefault(r["label"], []).append([h[k] for h in r["history"]])
    return curves


def run_sweep(
    base: RunConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: Optional[PathLike] = None,
    title: Optional[str] = None,
) -> dict[str, Any]:
    """Train every method with every seed (same backbone and budget) and summarise.

    Seeds are the outer loop, so slow drifts in machine load spread over all methods. Each
    run writes to ``out_dir/<method>/seed<k>/`` (and resumes from there). The summary goes
    to ``out_dir/results.json`` (summary rows and all runs), ``results.md`` (a markdown
    table) and ``accuracy.png`` (test accuracy per epoch, mean ± std over seeds); for each
    MAXL variant (first seed) ``<label>_aux_spread.png`` and ``<label>_aux_examples.png``
    show what the generator learned (see :mod:`auxgen.experiments.plots`).

    Args:
        base: the shared config; ``method``, ``generator``, ``seed`` and ``out_dir`` are set
            per run.
        methods: method names (:func:`parse_method`: ``maxl-copy`` / ``maxl-head`` pick the
            generator; plain ``maxl`` uses ``base.generator``).
        seeds: the seeds.
        out_dir: the sweep's folder (``None``: write nothing).
        title: title of the plot and the markdown file.

    Returns:
        ``{"summary": rows, "runs": [results, ...], "config": base, "methods", "seeds"}``.

    Raises:
        ValueError: no method or no seed, a method or seed given twice, a config that does
            not validate, or (when the data is loaded) a ``train_subset`` count above the
            images of the smallest fine class.
    """
    variants = [base.with_method(m) for m in methods]
    if not variants:
        raise ValueError("give at least one method")
    if not seeds:
        raise ValueError("give at least one seed")
    if len(set(seeds)) != len(seeds):  # a repeated seed would count one run twice
        raise ValueError(f"seeds must differ, got {[int(s) for s in seeds]}")
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods repeat: {labels}")
    out = Path(out_dir) if out_dir is not None else None
    # Fail fast on a bad backbone, levels or psi before any training.
    check_backbone(base.backbone)
    for v in variants:
        check_config(v)
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for v, label in zip(variants, labels):
            cfg = dataclasses.replace(
                v,
                seed=int(seed),
                out_dir=str(out / label / f"seed{seed}") if out is not None else None,
            )
            runs.append(train(cfg))
    rows = summarize(runs)
    # Keep the method order given by the caller.
    rows.sort(key=lambda r: labels.index(r["label"]))
    result = {
        "title": title,
        "config": base.effective().to_dict(),
        "methods": list(labels),
        "seeds": [int(s) for s in seeds],
        "summary": rows,
        "runs": runs,
    }
    if out is not None and is_main_process():
        _write_summary(result, out)
    return result


def _write_summary(result: dict[str, Any], out: Path) -> None:
    """``results.json``, ``results.md``, ``accuracy.png`` and the MAXL figures of a sweep."""
    title, rows, runs = result["title"], result["summary"], result["runs"]
    write_json(out / RESULTS_NAME, result)
    md = [f"# {title or 'auxgen results'}", "", markdown_table(rows), ""]
    (out / "results.md").write_text("\n".join(md))
    from .plots import plot_accuracy

    cosines = _curves(runs, "train_grad_cosine")
    has_val = any(r["history"] and "val_accuracy" in r["history"][0] for r in runs)
    plot_accuracy(
        _curves(runs),
        out / "accuracy.png",
        title=title,
        grad_cosine=cosines or None,
        ylabel="validation accuracy (%)" if has_val else "test accuracy (%)",
    )
    _plot_maxl(runs, out)


def _plot_maxl(runs: Sequence[dict[str, Any]], out: Path) -> None:
    """``<label>_aux_spread.png`` and ``<label>_aux_examples.png`` for each MAXL variant.

    Uses the first seed of each variant; the test images are reloaded for the examples.
    """
    from .plots import plot_aux_examples, plot_aux_spread

    done: set[str] = set()
    for run in runs:
        aux = run.get("aux", {})
        if run["label"] in done or "aux_fine_counts_test" not in aux:
            continue
        done.add(run["label"])
        label, seed = run["label"], run["config"]["seed"]
        plot_aux_spread(
            aux["aux_fine_counts_test"],
            run["psi"],
            run["class_names"],
            run["fine_names"],
            out / f"{label}_aux_spread.png",
            title=f"{label}, seed {seed}: test images of each primary class over its generated "
            f"auxiliary classes (rows) and true fine classes (columns); NMI "
            f"{aux['aux_nmi_test']:.3f}",
        )
        cfg = RunConfig(**run["config"])
        psi = tuple(cfg.psi) if isinstance(cfg.psi, list) else cfg.psi
        data = load_data(dataclasses.replace(cfg, psi=psi, train_subset=1))
        plot_aux_examples(
            data.x_test,
            aux["aux_examples_test"],
            run["psi"],
            run["class_names"],
            out / f"{label}_aux_examples.png",
            title=f"{label}, seed {seed}: most confidently assigned test images per generated "
            "auxiliary class",
        )


def run_demo(
    out_dir: PathLike = "runs/demo",
    seeds: int = DEMO_SEEDS,
    smoke: bool = False,
    epochs: int = DEMO_EPOCHS,
    train_subset: Optional[int] = DEMO_TRAIN_SUBSET,
    methods: Sequence[str] = DEMO_METHODS,
    threads: Optional[int] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The offline digits demo: every method on a 2-class digits task with the digit as aux.

    Primary task: ``digit >= 5`` (2 classes); ``psi = (5, 5)``; the human auxiliary task is
    the digit itself. The default budget (3 seeds, 30 epochs on 10 training images per digit,
    the :class:`SmallCNN` of width 32), a small-data regime where auxiliary tasks regularise,
    runs in about 1 to 2 minutes on two CPU cores. Writes what
    :func:`run_sweep` writes, including, for MAXL, ``maxl-copy_aux_spread.png`` (how the test
    samples of each primary class spread over its generated auxiliary classes, against the
    true digits) and ``maxl-copy_aux_examples.png`` (test images per generated auxiliary
    class).

    Args:
        out_dir: output folder.
        seeds: number of seeds (0 .. seeds-1).
        smoke: a seconds-long run (1 epoch, 4 images per digit).
        epochs: epochs per run.
        train_subset: training images per digit, at most 122 (the rarest digit's training
            images; more raises ``ValueError``), or ``None``: all 1257.
        methods: the methods to compare.
        threads: torch threads.
        progress: show progress bars.

    Returns:
        The :func:`run_sweep` result.
    """
    base = RunConfig(
        dataset="digits",
        backbone="cnn",
        width=32,
        epochs=epochs,
        batch_size=32,
        lr=0.05,
        gen_lr=0.01,
        train_subset=train_subset,
        threads=threads,
        progress=progress,
        smoke=smoke,
    )
    result = run_sweep(
        base,
        methods,
        list(range(seeds)),
        out_dir,
        title="auxgen demo: digits, primary = digit >= 5, psi = (5, 5)",
    )
    return result
