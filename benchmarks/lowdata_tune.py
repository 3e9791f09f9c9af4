"""Choose each method's own settings on the validation split of a low-data regime.

For one regime of ``lowdata.py`` (same backbone, data, epochs and learning rate for every
method), each method in ``--methods`` is run with every setting in ``--grid`` and ``--seeds``
seeds; the setting with the best **mean validation accuracy** is that method's pick. Test
accuracy is recorded for every setting (so nothing is hidden), but only the pick's test
accuracy is the method's result. The settings vary one factor at a time from the defaults
(``SETTINGS`` below): the auxiliary weight, amortised generator updates (``meta_every``),
the generator's learning rate and optimiser, the entropy weight and the label temperature;
and, for the human and k-means labels, a fraction of them replaced by random children.

Usage::

    python benchmarks/lowdata_tune.py --data-dir ~/data --regime mnist5 \\
        --methods human maxl-copy maxl-head-next --grid default aw0.3 aw3 every10 --jobs 2

writes ``--summary-dir/tune_<regime>.json`` (every setting's validation and test accuracy,
final auxiliary training loss, NMI of the labels with the fine classes and number of
auxiliary classes used on test per seed, and the pick per method) and prints its table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from lowdata import REGIMES, run_regime
from lowdata_report import tune_table

#: setting name -> extra ``auxgen run`` arguments (one factor at a time from the defaults)
SETTINGS: dict[str, list[str]] = {
    "default": [],
    "aw0.1": ["--aux-weight", "0.1"],
    "aw0.3": ["--aux-weight", "0.3"],
    "aw3": ["--aux-weight", "3"],
    "every10": ["--meta-every", "10"],
    "genlr0.01": ["--gen-lr", "0.01"],
    "ent1": ["--entropy-weight", "1"],
    "temp0.3": ["--label-temperature", "0.3"],
    "temp0.1": ["--label-temperature", "0.1"],
    "genadam": ["--gen-optimizer", "adam"],
    "genadam0.01": ["--gen-optimizer", "adam", "--gen-lr", "0.01"],
    "mi0.2": ["--confidence-weight", "0.2"],
    "mi1": ["--confidence-weight", "1", "--entropy-weight", "1"],
    # fixed labels with a fraction replaced by random children: how informative must they be?
    "noise0.25": ["--aux-label-noise", "0.25"],
    "noise0.5": ["--aux-label-noise", "0.5"],
    "noise0.75": ["--aux-label-noise", "0.75"],
}
#: settings that only mean something for methods with a label generator
_MAXL_ONLY = {
    "every10",
    "genlr0.01",
    "ent1",
    "temp0.3",
    "temp0.1",
    "genadam",
    "genadam0.01",
    "mi0.2",
    "mi1",
}

#: settings that only mean something for methods with fixed labels (human, k-means)
_FIXED_ONLY = {g for g, args in SETTINGS.items() if "--aux-label-noise" in args}


def _stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--regime", required=True, choices=list(REGIMES))
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--grid", nargs="+", default=list(SETTINGS), help=", ".join(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="parallel one-thread processes")
    p.add_argument("--out", default="runs/lowdata_tune")
    p.add_argument("--summary-dir", default="docs/results")
    a = p.parse_args(argv)
    for g in a.grid:
        if g not in SETTINGS:
            p.error(f"unknown setting {g!r}; expected one of {', '.join(SETTINGS)}")

    rows: list[dict] = []
    for method in a.methods:
        for g in a.grid:
            if g in _MAXL_ONLY and not method.startswith("maxl"):
                continue
            if g in _FIXED_ONLY and method not in ("human", "kmeans"):
                continue
            run_args = argparse.Namespace(**{**vars(a), "methods": [method]})
            summary = run_regime(a.regime, run_args, extra=SETTINGS[g], tag=f"{method}/{g}")
            (s,) = summary["summary"]
            val, test = _stats(s["val_accuracies"]), _stats(s["accuracies"])
            # the auxiliary loss at the end of training, per seed (how far from uniform), and
            # the primary accuracy on the training batches (does the setting fit the images?)
            aux = [r["history"][-1].get("train_aux_loss") for r in summary["runs"]]
            fit = [r["history"][-1].get("train_accuracy") for r in summary["runs"]]
            # what the labels became, per seed: NMI with the fine classes, children used
            nmi = [r["aux"].get("aux_nmi_train") for r in summary["runs"]]
            used = [r["aux"].get("aux_used_test") for r in summary["runs"]]
            rows.append(
                {"method": method, "setting": g, "args": SETTINGS[g], "seeds": s["seeds"],
                 "val_accuracies": s["val_accuracies"], "test_accuracies": s["accuracies"],
                 "val_mean": val[0], "val_std": val[1], "test_mean": test[0],
                 "test_std": test[1], "final_train_aux_loss": aux, "final_train_accuracy": fit,
                 "aux_nmi_train": nmi, "aux_used_test": used,
                 "wall_time_mean_s": s["wall_time_mean_s"]}
            )  # fmt: skip

    path = Path(a.summary_dir) / f"tune_{a.regime}.json"
    command = (
        f"python benchmarks/lowdata_tune.py --regime {a.regime} --methods {' '.join(a.methods)} "
        f"--grid {' '.join(a.grid)} --seeds {' '.join(map(str, a.seeds))}"
    )
    commands = [command]
    if path.exists():  # several invocations on one regime accumulate; new rows replace old
        new = {(r["method"], r["setting"]) for r in rows}
        previous = json.loads(path.read_text())
        old = previous["rows"]
        rows = [r for r in old if (r["method"], r["setting"]) not in new] + rows
        commands = previous.get("commands", [previous["command"]]) + commands
    picks = {
        m: max((r for r in rows if r["method"] == m), key=lambda r: r["val_mean"])["setting"]
        for m in dict.fromkeys(r["method"] for r in rows)
    }
    record = {
        "regime": a.regime,
        "base_args": REGIMES[a.regime][0],
        "command": command,
        "commands": commands,  # every invocation that wrote rows into this record, in order
        "selection": "highest mean validation accuracy over seeds",
        "rows": rows,
        "picks": picks,
    }
    print(tune_table(record))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
