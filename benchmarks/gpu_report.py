"""Tables and a figure from the summaries that ``benchmarks/gpu_evidence.py`` writes.

For every summary given (one per GPU command), per regime and method: validation and test
accuracy (mean ± std over seeds), the test difference to single-task paired by seed (with
each seed's difference), the K-view aggregated test accuracy where there is one, and the
mean wall time of a run. ``--plot`` draws each seed's paired difference per method.

Usage::

    python benchmarks/gpu_report.py docs/results/gpu_evidence.json \
        docs/results/gpu_evidence_long.json --plot docs/img/gpu_paired.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Optional

__all__ = ["rows", "markdown", "plot", "main"]


def _mean_std(xs: list[float], sign: str = "") -> str:
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):{sign}.2f} ± {std:.2f}"


def rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (regime, method) of one summary: the accuracies and paired differences (points).

    Example:
        >>> run = {"regime": "r", "seed": 0, "val": 0.4, "wall_s": 1}
        >>> s = {"plan": {"epochs": 2}, "runs": [
        ...     {**run, "method": "single", "test": 0.5}, {**run, "method": "x", "test": 0.6}]}
        >>> [round(r["paired"][0], 6) for r in rows(s)]
        [0.0, 10.0]
    """
    runs = [r for r in summary["runs"] if "test" in r]
    out = []
    for regime in dict.fromkeys(r["regime"] for r in runs):
        single = {r["seed"]: r["test"] for r in runs if r["regime"] == regime
                  and r["method"] == "single"}  # fmt: skip
        for method in dict.fromkeys(r["method"] for r in runs if r["regime"] == regime):
            mine = sorted((r for r in runs if r["regime"] == regime and r["method"] == method),
                          key=lambda r: r["seed"])  # fmt: skip
            agg = [100 * r["aggregated_test"] for r in mine if r.get("aggregated_test")]
            out.append({
                "regime": regime, "method": method, "epochs": summary["plan"]["epochs"],
                "seeds": [r["seed"] for r in mine],
                "val": [100 * r["val"] for r in mine], "test": [100 * r["test"] for r in mine],
                "paired": [100 * (r["test"] - single[r["seed"]]) for r in mine
                           if r["seed"] in single],
                "aggregated": agg, "wall_s": statistics.fmean(r["wall_s"] for r in mine),
            })  # fmt: skip
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    """One markdown table of :func:`rows`' output."""
    lines = [
        "| regime | epochs | method | val (%) | test (%) | test − single, paired | each seed "
        "| 4-view aggregated (%) | wall / run (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        paired = "-" if r["method"] == "single" else _mean_std(r["paired"], "+")
        seeds = "-" if r["method"] == "single" else " ".join(f"{d:+.2f}" for d in r["paired"])
        agg = _mean_std(r["aggregated"]) if r["aggregated"] else "-"
        lines.append(
            f"| {r['regime']} | {r['epochs']} | {r['method']} | {_mean_std(r['val'])} | "
            f"{_mean_std(r['test'])} | {paired} | {seeds} | {agg} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def plot(table: list[dict[str, Any]], png: Path) -> None:
    """Each seed's paired test difference to single-task, one row per (regime, epochs, method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in table if r["method"] != "single"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(shown) + 1.2))
    for i, r in enumerate(shown):
        ax.scatter(r["paired"], [i] * len(r["paired"]), s=18, color="tab:blue", alpha=0.7)
        ax.plot([statistics.fmean(r["paired"])] * 2, [i - 0.3, i + 0.3], color="black")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([f"{r['regime']}, {r['epochs']} ep: {r['method']}" for r in shown])
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy − single-task, same seed (points); bar: mean")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("summaries", nargs="+", type=Path)
    p.add_argument("--plot", type=Path, default=None, help="write the figure here")
    a = p.parse_args(argv)
    table = [r for path in a.summaries for r in rows(json.loads(path.read_text()))]
    text = markdown(table)
    print(text)
    if a.plot:
        plot(table, a.plot)
    return text


if __name__ == "__main__":
    main()
