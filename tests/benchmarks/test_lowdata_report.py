"""``benchmarks/lowdata_report.py``: the tuning table's paired differences to single-task and
the gain-against-NMI points."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from lowdata_report import (  # noqa: E402
    _noise_rate,
    cost_plot,
    cost_points,
    main,
    nmi_plot,
    nmi_points,
    regime_table,
    tune_deltas,
    tune_table,
)


def _row(method: str, setting: str, seeds: list[int], val: list[float], test: list[float]):
    return dict(method=method, setting=setting, seeds=seeds, val_accuracies=val,
                test_accuracies=test)  # fmt: skip


def test_tune_table_pairs_by_seed_and_marks_picks() -> None:
    record = {
        "regime": "toy",
        "rows": [
            _row("single", "default", [0, 1, 2], [0.50, 0.52, 0.54], [0.40, 0.42, 0.44]),
            # seed 3 has no single-task run: it is left out of the paired difference
            _row("maxl-copy", "mi0.2", [0, 1, 3], [0.60, 0.60, 0.60], [0.41, 0.45, 0.99]),
            _row("maxl-copy", "default", [2, 1], [0.50, 0.50], [0.44, 0.40]),
        ],
        "picks": {"single": "default", "maxl-copy": "mi0.2"},
    }
    lines = tune_table(record).splitlines()
    assert "test − single, paired (points)" in lines[2]
    mi, default, single = lines[4:7]  # sorted by method, settings in record order
    assert single.split("|")[6].strip() == "-"
    # mi0.2: seed 0 +1, seed 1 +3 points -> +2.00 ± 1.41; picked
    assert mi.split("|")[6].strip() == "+2.00 ± 1.41" and mi.split("|")[7].strip() == "yes"
    assert mi.split("|")[3].strip() == "3"
    # default: seed 2 +0, seed 1 -2 points (pairs follow the seeds, not the order)
    assert default.split("|")[6].strip() == "-1.00 ± 1.41"
    assert default.split("|")[7].strip() == ""


def test_tune_table_without_single_has_no_paired_column() -> None:
    record = {
        "regime": "toy",
        "rows": [_row("human", "aw3", [0, 1], [0.5, 0.6], [0.5, 0.7])],
        "picks": {"human": "aw3"},
    }
    lines = tune_table(record).splitlines()
    assert "paired" not in lines[2]
    assert lines[4].split("|")[4].strip() == "55.00 ± 7.07"


def test_tune_deltas_pair_by_seed() -> None:
    record = {
        "regime": "toy",
        "rows": [
            _row("maxl-copy", "mi1", [1, 0, 3], [0.5] * 3, [0.45, 0.40, 0.9]),
            _row("single", "default", [0, 1], [0.5, 0.5], [0.40, 0.42]),
        ],
        "picks": {},
    }
    ((key, d),) = tune_deltas(record).items()
    assert key == "maxl-copy / mi1" and d == pytest.approx([0.03, 0.0])
    assert tune_deltas({"rows": [record["rows"][0]]}) == {}


def test_nmi_points_pair_by_seed_and_skip_rows_without_labels(tmp_path: Path) -> None:
    record = {
        "regime": "toy",
        "rows": [
            _row("single", "default", [0, 1], [0.5, 0.5], [0.40, 0.42]),
            {**_row("human", "noise0.5", [1, 0], [0.5] * 2, [0.45, 0.42]),
             "aux_nmi_train": [0.7, 0.9]},
            {**_row("human", "default", [0, 1], [0.5] * 2, [0.44, 0.44]),
             "aux_nmi_train": [1.0, 1.0]},
            {**_row("random", "default", [0], [0.5], [0.39]), "aux_nmi_train": [0.5]},
            {**_row("maxl-copy", "default", [0, 1], [0.5] * 2, [0.40, 0.42]),
             "aux_nmi_train": [None, None]},  # no NMI recorded: left out
            _row("kmeans", "default", [0, 1], [0.5] * 2, [0.40, 0.42]),  # older record
        ],
        "picks": {},
    }  # fmt: skip
    pts = {(q["method"], q["setting"]): q for q in nmi_points(record)}
    assert set(pts) == {("human", "noise0.5"), ("human", "default"), ("random", "default")}
    noisy = pts[("human", "noise0.5")]
    # seed 1: +3 points, seed 0: +2 points
    assert noisy["nmi"] == pytest.approx(0.8) and noisy["delta"] == pytest.approx(2.5)
    assert noisy["delta_std"] == pytest.approx(0.7071, abs=1e-4) and noisy["seeds"] == 2
    assert pts[("random", "default")]["delta_std"] == 0.0
    rates = sorted((_noise_rate(q), q["setting"]) for q in pts.values())
    assert rates == [(0.0, "default"), (0.5, "noise0.5"), (1.0, "default")]
    nmi_plot(record, tmp_path / "nmi.png")
    assert (tmp_path / "nmi.png").read_bytes()[:4] == b"\x89PNG"


def test_tune_records_accumulate_rows_and_commands(tmp_path: Path, monkeypatch) -> None:
    """``lowdata_tune.py`` invocations on one regime add rows (a setting run again replaces
    its row), keep every command, and skip settings that do not apply to a method."""
    import lowdata_tune

    calls = []

    def fake_run_regime(name, a, *, extra, tag):
        calls.append(tag)
        acc = 0.5 + 0.01 * len(calls)
        run = {"history": [{"train_aux_loss": 1.0}], "aux": {"aux_nmi_train": 0.6}}
        return {"summary": [{"seeds": a.seeds, "val_accuracies": [acc] * len(a.seeds),
                             "accuracies": [acc] * len(a.seeds), "wall_time_mean_s": 1.0}],
                "runs": [run] * len(a.seeds)}  # fmt: skip

    monkeypatch.setattr(lowdata_tune, "run_regime", fake_run_regime)
    base = ["--data-dir", "d", "--regime", "cifar3_5", "--summary-dir", str(tmp_path)]
    lowdata_tune.main([*base, "--methods", "human", "maxl-copy", "--grid", "default", "mi1",
                       "noise0.5", "--seeds", "0", "1"])  # fmt: skip
    # mi1 is a generator setting, noise0.5 a fixed-label one
    assert calls == ["human/default", "human/noise0.5", "maxl-copy/default", "maxl-copy/mi1"]
    lowdata_tune.main([*base, "--methods", "human", "--grid", "default", "--seeds", "0"])
    record = json.loads((tmp_path / "tune_cifar3_5.json").read_text())
    keys = [(r["method"], r["setting"], r["seeds"]) for r in record["rows"]]
    assert keys == [("human", "noise0.5", [0, 1]), ("maxl-copy", "default", [0, 1]),
                    ("maxl-copy", "mi1", [0, 1]), ("human", "default", [0])]  # fmt: skip
    assert record["picks"] == {"human": "default", "maxl-copy": "mi1"}
    assert len(record["commands"]) == 2 and record["command"] == record["commands"][-1]
    assert record["commands"][0].endswith("--grid default mi1 noise0.5 --seeds 0 1")


def _run(label: str, seed: int, test: float, epoch_s: float, agg: float | None = None) -> dict:
    aux = {} if agg is None else {"aggregated_test_accuracy": agg}
    return {
        "label": label, "config": {"seed": seed}, "final_test_accuracy": test,
        "final_val_accuracy": test - 0.01, "wall_time_s": 10 * epoch_s, "num_train": 100,
        "history": [{"train_accuracy": 0.9, "epoch_time_s": epoch_s}], "aux": aux,
    }  # fmt: skip


def test_regime_table_and_cost_points_pair_by_seed(tmp_path: Path) -> None:
    summary = {
        "regime": "toy", "seeds": [0, 1],
        "config": {"dataset": "cifar100", "backbone": "cnn", "width": 32, "epochs": 3},
        "summary": [{"label": "single"}, {"label": "transform"}],
        "runs": [_run("single", 0, 0.40, 2.0), _run("single", 1, 0.44, 2.0),
                 _run("transform", 1, 0.47, 10.0, agg=0.45),
                 _run("transform", 0, 0.42, 10.0, agg=0.43)],
    }  # fmt: skip
    table, deltas = regime_table(summary)
    row = [line for line in table.splitlines() if line.startswith("| transform")][0].split("|")
    assert row[4].strip() == "+2.50 ± 0.71"  # seed 0: +2, seed 1: +3 points
    assert row[7].strip() == "44.00 ± 1.41" and row[8].strip() == "5.0x"
    points = {p["label"]: p for p in cost_points(summary)}
    assert points["transform"]["cost"] == pytest.approx(5.0)
    assert points["transform"]["gain"] == pytest.approx(2.5) and points["single"]["gain"] == 0
    cost_plot(summary, tmp_path / "cost.png")
    assert (tmp_path / "cost.png").stat().st_size > 0


def test_against_pairs_with_another_method_and_gives_the_share_of_its_gain() -> None:
    summary = {
        "regime": "toy", "seeds": [0, 1, 2],
        "config": {"dataset": "cifar100", "backbone": "cnn", "width": 32, "epochs": 3},
        "summary": [{"label": m} for m in ("single", "transform", "patch")],
        "runs": [_run("single", 0, 0.40, 2.0), _run("single", 1, 0.44, 2.0),
                 _run("transform", 0, 0.44, 8.0), _run("transform", 1, 0.48, 8.0),
                 _run("transform", 2, 0.50, 8.0),
                 # seed 2 has no single-task run: paired with transform, not in the share
                 _run("patch", 0, 0.43, 8.0), _run("patch", 1, 0.47, 8.0),
                 _run("patch", 2, 0.40, 8.0)],
    }  # fmt: skip
    table, _ = regime_table(summary, against=("transform",))
    head = table.splitlines()[2].split("|")
    assert head[10].strip() == "test − transform, paired (points)"
    assert head[11].strip() == "share of transform's gain"
    rows = {r.split("|")[1].strip(): r.split("|") for r in table.splitlines()[4:]}
    # patch − transform: -1, -1, -10 points
    assert rows["patch"][10].strip() == "-4.00 ± 5.20"
    # on seeds 0-1 transform gains 4 points and patch 3: 75% of the gain
    assert rows["patch"][11].strip() == "75%"
    assert rows["transform"][10:12] == [" - ", " 100% "]
    assert rows["single"][10].strip() == "-4.00 ± 0.00" and rows["single"][11].strip() == "-"


def test_the_default_report_skips_records_that_are_not_regime_summaries(tmp_path, capsys) -> None:
    summary = {
        "regime": "toy", "seeds": [0],
        "config": {"dataset": "cifar100", "backbone": "cnn", "width": 32, "epochs": 3},
        "summary": [{"label": "single"}], "runs": [_run("single", 0, 0.40, 2.0)],
    }  # fmt: skip
    (tmp_path / "toy.json").write_text(json.dumps(summary))
    (tmp_path / "compute.json").write_text(json.dumps({"points": [], "gains": []}))
    assert main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "**toy**" in out and "| single | 39.00 ± 0.00 | 40.00 ± 0.00 |" in out
    with pytest.raises(SystemExit):  # named explicitly, it is an error that says why
        main(["--results", str(tmp_path), "--regimes", "compute"])
    assert "compute.json is not a lowdata.py summary" in capsys.readouterr().err
