"""Accuracy against compute: each method at several budgets, up to convergence.

Reads low-data summaries (``lowdata.py``'s ``docs/results/<regime>.json``) of one setting
run at several epoch budgets (``cifar10cnn5_aug`` at 60 epochs, ``cifar10cnn5_aug_e120``,
``_e240``, ...) and, per method and budget, reports the test and validation accuracy over
seeds, the compute (forward-backward image passes: epochs x training images x the images a
step forwards per training image, hardware-independent; and the measured training time on
the machine that ran it) and two numbers per method against single-task training:

* **the gain at equal compute**: at each of the method's budgets, the method against
  single-task training given at most the same compute, each at the budget (within that
  compute) its *validation* accuracy prefers;
* **the gain at convergence**: each at the budget its validation accuracy prefers, however
  much compute that takes. It is marked as shown (``"converged"``) only where both sides
  measured a longer budget that validation did not prefer; otherwise the curve may still be
  rising and the table says so.

Differences are paired by seed where both sides ran the same seeds. Writes a markdown table
(stdout, ``--md``), the numbers as JSON (``--json``) and a figure of test accuracy against
compute, one curve per method (``--plot``).

Usage::

    python benchmarks/compute_report.py docs/results/cifar10cnn5_aug*.json \\
        --md docs/results/compute.md --json docs/results/compute.json \\
        --plot docs/img/compute.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

#: Images a step forwards per training image, by method label (the batch and its views).
PASSES: dict[str, float] = {
    "single": 1.0, "human": 1.0, "random": 1.0, "kmeans": 1.0, "maxl-copy": 1.0,
    "transform": 4.0, "transform-joint": 4.0, "transform-predict": 4.0, "transform-sd": 4.0,
    "transform-patch": 4.0, "transform-pviews": 4.0, "transform-one": 2.0,
    "transform-onehalf": 1.5, "transform-sixth": 1.5, "batchaug": 4.0,
}  # fmt: skip


def passes(method: str, epochs: int, num_train: int) -> float:
    """Forward-backward image passes of a run: epochs x training images x images a step
    forwards per training image (:data:`PASSES`)."""
    return epochs * num_train * PASSES[method]


def points(summaries: Sequence[dict]) -> dict[str, dict[int, dict[str, Any]]]:
    """method -> epochs -> {seeds: {seed: (test, val)}, passes, train_s} from the runs."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for summary in summaries:
        for r in summary["runs"]:
            label, cfg = r["label"], r["config"]
            if label not in PASSES:
                continue
            epochs = int(cfg["epochs"])
            p = out.setdefault(label, {}).setdefault(
                epochs, {"seeds": {}, "train_s": [], "num_train": r.get("num_train")}
            )
            p["seeds"][int(cfg["seed"])] = (r["final_test_accuracy"], r["final_val_accuracy"])
            p["train_s"].append(r.get("train_time_s") or 0.0)
    for label, budgets in out.items():
        for epochs, p in budgets.items():
            p["passes"] = passes(label, epochs, p["num_train"] or 0)
    return out


def _epochs(args: Sequence[str]) -> Optional[int]:
    """The last ``--epochs`` value of a command line (later flags override earlier ones)."""
    found = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--epochs"]
    return int(found[-1]) if found else None


def tuned_points(
    tunes: Sequence[dict],
    data: dict[str, dict[int, dict[str, Any]]],
    methods: Optional[Sequence[str]] = None,
) -> dict[str, dict[int, dict[str, Any]]]:
    """Each method's setting chosen on validation by ``lowdata_tune.py`` (its ``picks``), as
    points labelled ``"<method> (<setting>)"``, so the figure shows the cheap forms at the
    settings validation picks beside their defaults; only ``methods`` when given. A
    ``default`` pick is the method's own point already and is left out. The number of
    training images comes from ``data`` (the low-data summaries of the same regime), which
    must agree on it. A tune records each run's wall time, not its training time, so its
    time column includes evaluation.
    """
    sizes = {p["num_train"] for budgets in data.values() for p in budgets.values()}
    sizes.discard(None)
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for tune in tunes:
        picks = tune.get("picks", {})
        for row in tune["rows"]:
            method, setting = row["method"], row["setting"]
            if picks.get(method) != setting or setting == "default" or method not in PASSES:
                continue
            if methods and method not in methods:
                continue
            if len(sizes) != 1:
                raise ValueError(
                    f"tuned rows need the low-data summaries of their regime for the number "
                    f"of training images; the summaries given hold {sorted(sizes) or 'none'}"
                )
            epochs = _epochs([*tune["base_args"], *row["args"]])
            if epochs is None:
                raise ValueError(f"{tune.get('regime')}: no --epochs in the tune's arguments")
            seeds = {
                int(s): (t, v)
                for s, t, v in zip(row["seeds"], row["test_accuracies"], row["val_accuracies"])
            }
            (n,) = sizes
            out[f"{method} ({setting})"] = {
                epochs: {
                    "seeds": seeds,
                    "train_s": [row.get("wall_time_mean_s") or 0.0],
                    "num_train": n,
                    "passes": passes(method, epochs, n),
                }
            }
    return out


#: The default title of the markdown page and the figure.
TITLE = "Accuracy against compute"


def header(title: str = TITLE, figure_path: Optional[str] = None, tuned: bool = False) -> str:
    """The markdown file's title and provenance (the tables follow)."""
    fig = f"; the figure is `{figure_path}`" if figure_path else ""
    picked = (
        " and, labelled `method (setting)`, the settings `lowdata_tune.py` chose on validation"
        if tuned
        else ""
    )
    return (
        f"# {title}\n\n"
        "Written by `benchmarks/compute_report.py` from the low-data summaries of one setting "
        f"(see [Results](../results.md)){picked}{fig}. Image passes "
        "do not depend on the hardware; the training time is as measured on the machine that "
        "ran each summary, with other runs sharing its cores, so it compares only rows run "
        "together.\n\n"
    )


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs)


def _sd(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _val(p: dict) -> float:
    return _mean([v for _, v in p["seeds"].values()])


def _test(p: dict) -> float:
    return _mean([t for t, _ in p["seeds"].values()])


def preferred(budgets: dict[int, dict], epochs: Sequence[int]) -> int:
    """The budget validation prefers among ``epochs``: the mean validation accuracy over the
    seeds every one of them ran (budgets run on different seeds would otherwise be compared
    on different splits and initialisations); over each budget's own seeds if none is shared.
    """
    shared = set.intersection(*(set(budgets[e]["seeds"]) for e in epochs))

    def val(e: int) -> float:
        seeds = budgets[e]["seeds"]
        return _mean([seeds[s][1] for s in sorted(shared)]) if shared else _val(budgets[e])

    return max(epochs, key=val)


def best_within(budgets: dict[int, dict], compute: float) -> Optional[int]:
    """The budget (epochs) validation prefers among those of at most ``compute`` passes."""
    fit = [e for e, p in budgets.items() if p["passes"] <= compute * (1 + 1e-9)]
    return preferred(budgets, fit) if fit else None


def difference(a: dict, b: dict) -> dict[str, Any]:
    """Test difference ``a - b``: paired by seed when they share seeds, else unpaired."""
    shared = sorted(set(a["seeds"]) & set(b["seeds"]))
    if shared:
        d = [a["seeds"][s][0] - b["seeds"][s][0] for s in shared]
        return {"mean": _mean(d), "sd": _sd(d), "seeds": shared, "paired": True}
    return {"mean": _test(a) - _test(b), "sd": None, "seeds": [], "paired": False}


def gains(data: dict[str, dict[int, dict]], base: str = "single") -> dict[str, Any]:
    """Per method: the gain at equal compute at each of its budgets, and at convergence."""
    ref = data.get(base)
    out: dict[str, Any] = {}
    if not ref:
        return out
    ref_best = preferred(ref, list(ref))
    for label, budgets in data.items():
        if label == base:
            continue
        equal = []
        for epochs in sorted(budgets):
            p = budgets[epochs]
            r = best_within(ref, p["passes"])
            if r is None:
                continue
            diff = difference(p, ref[r])
            equal.append({"epochs": epochs, "passes": p["passes"], f"{base}_epochs": r, **diff})
        best = preferred(budgets, list(budgets))
        conv = difference(budgets[best], ref[ref_best])
        # validation's choice shows convergence only where a longer budget was measured
        # and not preferred; at the longest budget run, the curve may still be rising
        shown = best < max(budgets) and ref_best < max(ref)
        out[label] = {
            "equal_compute": equal,
            "convergence": {"epochs": best, f"{base}_epochs": ref_best, **conv, "converged": shown},
        }
    return out


def _gain(d: dict[str, Any]) -> str:
    """A difference from :func:`difference` in points, with the seeds it was paired on."""
    mean, seeds = f"{100 * d['mean']:+.2f}", d["seeds"]
    if not d["paired"]:
        return f"{mean} (unpaired: no seed in common)"
    if len(seeds) == 1:
        return f"{mean} (seed {seeds[0]} only)"
    return f"{mean} ± {100 * d['sd']:.2f} ({len(seeds)} seeds)"


def _spread(xs: Sequence[float], digits: int) -> str:
    return f"{_mean(xs):.{digits}f}" + (f" ± {_sd(xs):.{digits}f}" if len(xs) > 1 else "")


def table(data: dict[str, dict[int, dict]], result: dict[str, Any], base: str = "single") -> str:
    """The markdown tables: every point, then the gains against ``base`` (as :func:`gains`)."""
    lines = [
        "| method | epochs | seeds | test % | val % | image passes (M) | train time / run (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, budgets in data.items():
        for epochs in sorted(budgets):
            p = budgets[epochs]
            tests = [100 * t for t, _ in p["seeds"].values()]
            vals = [100 * v for _, v in p["seeds"].values()]
            lines.append(
                f"| {label} | {epochs} | {len(tests)} | {_spread(tests, 2)} | "
                f"{_spread(vals, 1)} | {p['passes'] / 1e6:.2f} | "
                f"{_mean(p['train_s']):.0f} |"
            )
    lines += ["", f"| method | gain at equal compute (its epochs vs {base}'s) | gain at "
              "convergence (epochs chosen on validation) |", "|---|---|---|"]  # fmt: skip
    for label, g in result.items():
        eq = "; ".join(
            f"{e['epochs']} vs {e[f'{base}_epochs']}: {_gain(e)}" for e in g["equal_compute"]
        )
        c = g["convergence"]
        edge = "" if c["converged"] else " (not shown: a longest budget run was chosen)"
        lines.append(
            f"| {label} | {eq or '-'} | {c['epochs']} vs {c[f'{base}_epochs']}: {_gain(c)}{edge} |"
        )
    return "\n".join(lines)


def figure(data: dict[str, dict[int, dict]], title: str = TITLE) -> Any:
    """The matplotlib figure of :func:`plot` (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, budgets in data.items():
        es = sorted(budgets)
        xs = [budgets[e]["passes"] / 1e6 for e in es]
        ys = [100 * _test(budgets[e]) for e in es]
        sds = [100 * _sd([t for t, _ in budgets[e]["seeds"].values()]) for e in es]
        ax.errorbar(xs, ys, yerr=sds, marker="o", capsize=3, label=label)
        for x, y, e in zip(xs, ys, es):
            ax.annotate(f"{e}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("compute: forward-backward image passes (millions, log scale)")
    ax.set_ylabel("test accuracy (%)")
    # wrapped: a long --title would run off the figure
    ax.set_title("\n".join(textwrap.wrap(f"{title} (numbers: epochs)", 55)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(data: dict[str, dict[int, dict]], path: Path, title: str = TITLE) -> None:
    """Test accuracy against image passes, one curve per method (error bars: seed sd)."""
    import matplotlib.pyplot as plt

    fig = figure(data, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("summaries", nargs="+", help="lowdata.py summaries of one setting")
    p.add_argument("--methods", nargs="+", default=None, help="default: every known method")
    p.add_argument(
        "--tuned",
        nargs="+",
        default=[],
        help="lowdata_tune.py summaries of the same regime: add each method at the setting "
        "validation picked",
    )
    p.add_argument("--md", help="write the tables here")
    p.add_argument("--json", help="write the points and gains here")
    p.add_argument("--plot", help="write the figure here (PNG)")
    p.add_argument("--title", default=TITLE, help="the title of the markdown page and the figure")
    a = p.parse_args(argv)
    data = points([json.loads(Path(f).read_text()) for f in a.summaries])
    if a.methods:
        data = {k: v for k, v in data.items() if k in a.methods}
    tuned = tuned_points([json.loads(Path(f).read_text()) for f in a.tuned], data, a.methods)
    data.update(tuned)
    result = gains(data)
    text = table(data, result)
    print(text)
    if a.md:
        Path(a.md).write_text(header(a.title, a.plot, bool(tuned)) + text + "\n")
    if a.json:
        flat = {
            label: {str(e): {**p, "seeds": {str(s): v for s, v in p["seeds"].items()}}
                    for e, p in budgets.items()}
            for label, budgets in data.items()
        }  # fmt: skip
        Path(a.json).write_text(json.dumps({"points": flat, "gains": result}, indent=1) + "\n")
    if a.plot:
        plot(data, Path(a.plot), a.title)
    return result


if __name__ == "__main__":
    main()
