"""Tables and a plot from the low-data summaries in ``docs/results/`` (``lowdata.py``).

For every regime summary (``docs/results/<regime>.json``) prints a markdown table: validation
and test accuracy (mean ± sample std over seeds), the test difference to ``single`` paired by
seed (same initialisation and batches: mean ± std of the per-seed differences), the final
training accuracy, the normalised mutual information between the auxiliary classes and the
fine classes on the training images, and the wall time per run. Writes one figure with a panel
per regime: each method's paired test difference to single-task, every seed as a dot. The
``tune_<regime>.json`` records of ``lowdata_tune.py`` get a table of every setting tried,
with the pick on validation accuracy marked; ``--nmi-plot REGIME PNG`` plots, for one tuning
record, each setting's test gain over single-task against its labels' NMI with the fine
classes.

Usage::

    python benchmarks/lowdata_report.py --results docs/results --plot docs/img/lowdata.png \\
        --tune-plot docs/img/lowdata_tune.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} ± {100 * sd:.2f}"


def _signed_ms(values: list[float]) -> str:
    """``_ms`` with the mean's sign (``+`` for a gain); ``-`` when there is nothing."""
    if not values:
        return "-"
    return ("+" if statistics.fmean(values) >= 0 else "") + _ms(values)


def _paired(mine: dict[int, dict], theirs: dict[int, dict]) -> list[float]:
    """Test accuracy of ``mine`` minus ``theirs`` on each seed both ran (seed -> run)."""
    return [mine[s]["test"] - theirs[s]["test"] for s in mine if s in theirs]


def _per_seed(summary: dict) -> dict[str, dict[int, dict]]:
    """method label -> seed -> {test, val, train}."""
    out: dict[str, dict[int, dict]] = {}
    for r in summary["runs"]:
        last = r["history"][-1] if r["history"] else {}
        out.setdefault(r["label"], {})[r["config"]["seed"]] = {
            "test": r["final_test_accuracy"],
            "val": r["final_val_accuracy"],
            "train": last.get("train_accuracy"),
            "wall": r["wall_time_s"],
            "epoch_s": statistics.fmean(h["epoch_time_s"] for h in r["history"])
            if r["history"]
            else None,
            "aggregated": r.get("aux", {}).get("aggregated_test_accuracy"),
        }
    return out


def regime_table(
    summary: dict, against: tuple[str, ...] = ()
) -> tuple[str, dict[str, list[float]]]:
    """The markdown table of one regime and, per method, its paired test differences.

    Args:
        summary: a ``lowdata.py`` summary.
        against: more methods to pair every row with: a column each of the test difference
            to that method (paired by seed) and, where the method gains over single-task, the
            share of its gain the row keeps (the ratio of the mean gains over the seeds both
            share with single-task).

    Returns:
        The table and, per method, its paired test differences to single-task.
    """
    runs = _per_seed(summary)
    base = runs.get("single", {})
    extra_head = "".join(f" test − {m}, paired (points) | share of {m}'s gain |" for m in against)
    cfg = summary["config"]
    n_train = summary["runs"][0].get("num_train")
    lines = [
        f"**{summary['regime']}**: {cfg['dataset']}, backbone `{cfg['backbone']}` "
        f"(width {cfg['width']}), {n_train} training images, {cfg['epochs']} epochs, "
        f"seeds {', '.join(map(str, summary['seeds']))}",
        "",
        "| method | val (%) | test (%) | test − single, paired (points) | train acc (%) "
        "| aux NMI with fine classes (train) | 4-view aggregated test (%) | epoch time / single "
        "| wall / run (s) |" + extra_head,
        "|---|---|---|---|---|---|---|---|---|" + "---|---|" * len(against),
    ]
    base_epoch = [v["epoch_s"] for v in base.values() if v.get("epoch_s")]
    nmi = {s["label"]: s.get("aux_nmi_train_mean") for s in summary["summary"]}
    deltas: dict[str, list[float]] = {}
    for label, seeds in runs.items():
        tests = [v["test"] for v in seeds.values()]
        vals = [v["val"] for v in seeds.values() if v["val"] is not None]
        trains = [v["train"] for v in seeds.values() if v["train"] is not None]
        d = _paired(seeds, base)
        deltas[label] = d
        delta = "-" if label == "single" else _signed_ms(d)
        wall = statistics.fmean(v["wall"] for v in seeds.values())
        info = "-" if nmi.get(label) is None else f"{nmi[label]:.3f}"
        agg = _ms([v["aggregated"] for v in seeds.values() if v.get("aggregated") is not None])
        epochs = [v["epoch_s"] for v in seeds.values() if v.get("epoch_s")]
        cost = "-"
        if epochs and base_epoch:
            cost = f"{statistics.fmean(epochs) / statistics.fmean(base_epoch):.1f}x"
        cells = "".join(_against_cells(runs, label, m) for m in against)
        lines.append(
            f"| {label} | {_ms(vals)} | {_ms(tests)} | {delta} | "
            f"{100 * statistics.fmean(trains):.1f} | {info} | {agg} | {cost} | {wall:.0f} |" + cells
        )
    return "\n".join(lines), deltas


def _against_cells(runs: dict[str, dict[int, dict]], label: str, other: str) -> str:
    """`` diff | share |``: ``label`` minus ``other`` paired by seed, and the share of
    ``other``'s gain over single-task that ``label`` keeps (on the seeds all three share)."""
    mine, theirs, base = runs[label], runs.get(other, {}), runs.get("single", {})
    if label == other:
        return " - | 100% |"
    diff = _signed_ms(_paired(mine, theirs))
    both = [s for s in mine if s in theirs and s in base]
    share = "-"
    if both and label != "single":
        gain = statistics.fmean(theirs[s]["test"] - base[s]["test"] for s in both)
        kept = statistics.fmean(mine[s]["test"] - base[s]["test"] for s in both)
        if gain > 0:
            share = f"{100 * kept / gain:.0f}%"
    return f" {diff} | {share} |"


def cost_points(summary: dict) -> list[dict]:
    """Per method: training time per epoch relative to single-task (means over seeds of the
    same sweep) and the paired test difference to single-task (mean, std, seeds)."""
    runs = _per_seed(summary)
    base = runs.get("single", {})
    base_epoch = statistics.fmean(v["epoch_s"] for v in base.values())
    points = []
    for label, seeds in runs.items():
        d = [100 * x for x in _paired(seeds, base)]
        points.append({
            "label": label,
            "cost": statistics.fmean(v["epoch_s"] for v in seeds.values()) / base_epoch,
            "gain": statistics.fmean(d),
            "std": statistics.stdev(d) if len(d) > 1 else 0.0,
            "seeds": len(d),
        })  # fmt: skip
    return points


def cost_plot(summary: dict, path: Path) -> None:
    """Test gain over single-task against the cost of a training epoch, one point a method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for pt in cost_points(summary):
        ax.errorbar(pt["cost"], pt["gain"], yerr=pt["std"], fmt="o", capsize=3)
        ax.annotate(f"{pt['label']} ({pt['seeds']})", (pt["cost"], pt["gain"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("training time per epoch / single-task's (same sweep)")
    ax.set_ylabel("test accuracy − single-task, paired (points)")
    ax.set_title(f"{summary['regime']}: accuracy against cost (mean ± std over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tune_table(record: dict) -> str:
    """The markdown table of a ``lowdata_tune.py`` record: every setting, the picks marked.

    When the record holds ``single`` at its default, a column gives each row's test
    difference to it, paired by seed (the seeds both have).
    """
    deltas = tune_deltas(record)
    head = "| method | setting | seeds | val (%) | test (%) |"
    head += " test − single, paired (points) |" if deltas else ""
    lines = [
        f"**{record['regime']}**: settings chosen on validation accuracy",
        "",
        head + " picked |",
        "|---|---|---|---|---|" + ("---|" if deltas else "") + "---|",
    ]
    for r in sorted(record["rows"], key=lambda r: r["method"]):
        pick = "yes" if record["picks"].get(r["method"]) == r["setting"] else ""
        line = (
            f"| {r['method']} | {r['setting']} | {len(r['seeds'])} | "
            f"{_ms(r['val_accuracies'])} | {_ms(r['test_accuracies'])} |"
        )
        if deltas:
            key = f"{r['method']} / {r['setting']}"
            line += f" {_signed_ms(deltas.get(key, []))} |"
        lines.append(f"{line} {pick} |")
    return "\n".join(lines)


def plot(all_deltas: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(all_deltas)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), sharey=True, squeeze=False)
    for ax, (regime, deltas) in zip(axes[0], all_deltas.items()):
        labels = [m for m in deltas if m != "single"]
        for i, m in enumerate(labels):
            d = [100 * v for v in deltas[m]]
            ax.scatter([i] * len(d), d, s=14, color="tab:blue", alpha=0.6)
            if d:
                ax.plot([i - 0.3, i + 0.3], [statistics.fmean(d)] * 2, color="black")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(regime, fontsize=9)
    axes[0][0].set_ylabel("test accuracy − single-task (points)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tune_deltas(record: dict) -> dict[str, list[float]]:
    """``"method / setting"`` -> per-seed test differences to ``single`` (paired by seed);
    empty when the record has no single-task row."""
    base = next(
        (r for r in record["rows"] if r["method"] == "single" and r["setting"] == "default"),
        None,
    )
    if base is None:
        return {}
    ref = dict(zip(base["seeds"], base["test_accuracies"]))
    out = {}
    for r in sorted(record["rows"], key=lambda r: r["method"]):
        if r is not base:
            d = [t - ref[s] for s, t in zip(r["seeds"], r["test_accuracies"]) if s in ref]
            out[f"{r['method']} / {r['setting']}"] = d
    return out


def nmi_points(record: dict) -> list[dict]:
    """Per setting with auxiliary labels: the labels' NMI with the fine classes (mean over
    seeds) against the paired test difference to single-task (mean and std over seeds).

    Rows without a recorded NMI (single-task, older records) are left out.
    """
    deltas = tune_deltas(record)
    out = []
    for r in sorted(record["rows"], key=lambda r: r["method"]):
        nmi = [v for v in r.get("aux_nmi_train") or [] if v is not None]
        d = deltas.get(f"{r['method']} / {r['setting']}")
        if nmi and d:
            out.append(
                {"method": r["method"], "setting": r["setting"], "nmi": statistics.fmean(nmi),
                 "delta": 100 * statistics.fmean(d),
                 "delta_std": 100 * statistics.stdev(d) if len(d) > 1 else 0.0, "seeds": len(d)}
            )  # fmt: skip
    return out


def _noise_rate(point: dict) -> float | None:
    """The fraction of random labels of a point on the human-to-random line (else None)."""
    if point["method"] == "random" and point["setting"] == "default":
        return 1.0
    if point["method"] == "human":
        if point["setting"] == "default":
            return 0.0
        if point["setting"].startswith("noise"):
            return float(point["setting"][len("noise") :])
    return None


def nmi_plot(record: dict, path: Path) -> None:
    """Test gain over single-task against how much the labels say about the fine classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = nmi_points(record)
    line = sorted((q for q in pts if _noise_rate(q) is not None), key=_noise_rate)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if line:
        ax.errorbar(
            [q["nmi"] for q in line],
            [q["delta"] for q in line],
            yerr=[q["delta_std"] for q in line],
            color="tab:green",
            marker="o",
            capsize=3,
            label="human labels, a fraction replaced by random children",
        )
        for q in line:
            ax.annotate(
                f"{_noise_rate(q):g}",
                (q["nmi"], q["delta"]),
                fontsize=7,
                xytext=(4, -10),
                textcoords="offset points",
                color="tab:green",
            )
    # the generated and k-means labels sit close together: labels fan out to the right
    others = sorted((q for q in pts if _noise_rate(q) is None), key=lambda q: -q["delta"])
    colours = {"kmeans": "tab:purple"}
    label_x = max((o["nmi"] for o in others), default=0.0) + 0.1
    for i, q in enumerate(others):
        c = colours.get(q["method"], "tab:blue")
        ax.errorbar(q["nmi"], q["delta"], yerr=q["delta_std"], color=c, marker="s", capsize=3)
        ax.annotate(
            f"{q['method']} {q['setting']}".replace(" default", ""),
            (q["nmi"], q["delta"]),
            xytext=(label_x, -0.2 - 0.4 * i),
            textcoords="data",
            fontsize=7,
            color=c,
            va="center",
            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"},
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("NMI of the auxiliary labels with the fine classes (training images)")
    ax.set_ylabel("test accuracy − single-task (points, paired)")
    ax.set_title(f"{record['regime']}: mean ± std over seeds", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="docs/results")
    p.add_argument("--regimes", nargs="+", default=None, help="default: every summary")
    p.add_argument(
        "--against",
        nargs="+",
        default=(),
        metavar="METHOD",
        help="more columns: each row's paired test difference to METHOD and its share of "
        "METHOD's gain over single-task (e.g. transform)",
    )
    p.add_argument("--plot", default=None, help="write the figure here (PNG)")
    p.add_argument(
        "--tune-plot", default=None, help="figure of the tuning records' paired differences"
    )
    p.add_argument(
        "--nmi-plot",
        nargs=2,
        metavar=("REGIME", "PNG"),
        default=None,
        help="figure of REGIME's tuning record: test gain against the labels' NMI",
    )
    p.add_argument(
        "--cost-plot",
        nargs=2,
        metavar=("REGIME", "PNG"),
        default=None,
        help="figure of REGIME's summary: each method's test gain against its epoch time",
    )
    a = p.parse_args(argv)
    files = sorted(f for f in Path(a.results).glob("*.json") if not f.name.startswith("tune_"))
    if a.regimes:
        files = [Path(a.results) / f"{r}.json" for r in a.regimes]
    all_deltas = {}
    for f in files:
        summary = json.loads(f.read_text())
        if not {"regime", "runs"} <= summary.keys():
            if a.regimes:
                p.error(f"--regimes: {f} is not a lowdata.py summary (no 'regime' and 'runs')")
            continue  # another benchmark's record (compute.json, gpu_evidence.json, ...)
        table, deltas = regime_table(summary, tuple(a.against))
        print(table + "\n")
        all_deltas[summary["regime"]] = deltas
    if not a.regimes:
        for f in sorted(Path(a.results).glob("tune_*.json")):
            print(tune_table(json.loads(f.read_text())) + "\n")
    if a.plot:
        plot(all_deltas, Path(a.plot))
    if a.tune_plot:
        tunes = {}
        for f in sorted(Path(a.results).glob("tune_*.json")):
            record = json.loads(f.read_text())
            if d := tune_deltas(record):
                tunes[f"{record['regime']} (settings)"] = d
        plot(tunes, Path(a.tune_plot))
    if a.cost_plot:
        regime, png = a.cost_plot
        cost_plot(json.loads((Path(a.results) / f"{regime}.json").read_text()), Path(png))
    if a.nmi_plot:
        regime, png = a.nmi_plot
        nmi_plot(json.loads((Path(a.results) / f"tune_{regime}.json").read_text()), Path(png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
