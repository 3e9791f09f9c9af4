"""``benchmarks/lowdata.py --merge``: seeds from two sessions into one regime summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from lowdata import main, merge_summaries  # noqa: E402


def _run(label: str, seed: int, test: float, epochs: int = 30) -> dict:
    return {
        "label": label, "final_test_accuracy": test, "final_val_accuracy": test + 0.01,
        "wall_time_s": 10.0, "train_time_s": 8.0, "history": [{"epoch_time_s": 0.5}],
        "config": {"seed": seed, "method": label, "epochs": epochs, "data_dir": f"/d{seed}"},
    }  # fmt: skip


def _summary(methods: list[str], runs: list[dict], wall: float = 5.0) -> dict:
    return {"regime": "toy", "title": "t", "config": {}, "methods": methods,
            "seeds": sorted({r["config"]["seed"] for r in runs}), "summary": [], "runs": runs,
            "sweep_wall_time_s": wall}  # fmt: skip


def test_merge_takes_the_union_recomputes_statistics_and_later_runs_win() -> None:
    a = _summary(["single", "transform"], [_run("single", 0, 0.40), _run("transform", 0, 0.50),
                                           _run("single", 1, 0.42)])  # fmt: skip
    b = _summary(["single", "human"], [_run("single", 1, 0.44), _run("human", 1, 0.46),
                                       _run("single", 2, 0.48)])  # fmt: skip
    m = merge_summaries(a, b)
    assert m["methods"] == ["single", "transform", "human"] and m["seeds"] == [0, 1, 2]
    assert [(r["label"], r["config"]["seed"]) for r in m["runs"]] == [
        ("single", 0),
        ("single", 1),
        ("single", 2),
        ("transform", 0),
        ("human", 1),
    ]
    single = m["summary"][0]
    assert single["label"] == "single" and single["accuracies"] == [0.40, 0.44, 0.48]
    assert single["accuracy_mean"] == pytest.approx(0.44)
    assert single["accuracy_std"] == pytest.approx(0.04)  # sample std of 0.40, 0.44, 0.48
    # the wall time of the five runs kept; merging the same runs again changes nothing
    assert m["runs_wall_time_s"] == pytest.approx(50.0) and "sweep_wall_time_s" not in m
    again = merge_summaries(m, b)
    assert again["runs_wall_time_s"] == pytest.approx(50.0) and again["runs"] == m["runs"]


def test_merge_refuses_runs_with_different_settings_and_regimes() -> None:
    a = _summary(["single"], [_run("single", 0, 0.40)])
    b = _summary(["single"], [_run("single", 1, 0.41, epochs=60)])
    with pytest.raises(ValueError, match=r"seed 1 differs in settings \['epochs'\]"):
        merge_summaries(a, b)
    with pytest.raises(ValueError, match=r"summary 1 has regime settings \['epochs'\]"):
        merge_summaries(a, {**a, "config": {"epochs": 60}})
    with pytest.raises(ValueError, match="expected one regime"):
        merge_summaries(a, {**b, "regime": "other"})
    with pytest.raises(ValueError, match="expected at least one summary"):
        merge_summaries()


def test_merge_command_writes_the_regime_summary(tmp_path: Path) -> None:
    for i, (seed, acc) in enumerate([(0, 0.3), (1, 0.5)]):
        (tmp_path / f"{i}.json").write_text(
            json.dumps(_summary(["single"], [_run("single", seed, acc)]))
        )
    out = tmp_path / "out"
    assert main(["--merge", str(tmp_path / "0.json"), str(tmp_path / "1.json"),
                 "--summary-dir", str(out)]) == 0  # fmt: skip
    merged = json.loads((out / "toy.json").read_text())
    assert merged["seeds"] == [0, 1] and merged["summary"][0]["accuracy_mean"] == pytest.approx(0.4)


def test_merge_lets_methods_differ_from_each_other_but_not_from_themselves() -> None:
    def run(label: str, seed: int, transform: str) -> dict:
        r = _run(label, seed, 0.5)
        r["config"]["transform"] = transform
        return r

    a = _summary(
        ["single", "transform-predict"],
        [run("single", 0, "both"), run("transform-predict", 0, "predict")],
    )
    b = _summary(["single"], [run("single", 1, "both")])
    m = merge_summaries(a, b)
    assert [(r["label"], r["config"]["seed"]) for r in m["runs"]] == [
        ("single", 0),
        ("single", 1),
        ("transform-predict", 0),
    ]
    c = _summary(["transform-predict"], [run("transform-predict", 1, "joint")])
    with pytest.raises(
        ValueError, match=r"'transform-predict' seed 1 differs in settings \['transform'\]"
    ):
        merge_summaries(a, c)
