"""``benchmarks/gpu_data.py`` and ``benchmarks/gpu_evidence.py`` on the CPU: the payload gives
the harness the exact images of the full dataset, the smoke run goes through every part, and
the time plan stays within its budget.

Nothing here depends on the machine's speed: the commands get a budget that no speed uses up,
the plan is made from step times the test supplies, and the deadline is checked against runs
that could not finish in time on any machine.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, fake_cifar100

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_data  # noqa: E402
import gpu_evidence  # noqa: E402

#: A budget (seconds) that no machine uses up: the runs are never cut short.
AMPLE_BUDGET_S = "1e6"
#: The step time (ms) the step-cost part reports in place of the measured one.
STEP_MS = 5.0


def test_payload_is_the_harness_subset_and_the_smoke_run_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = fake_cifar100(tmp_path / "full", n_train=2000, n_test=200, shuffle=True)
    payload = tmp_path / "payload"
    sizes = gpu_data.write_payload(str(full), payload, train_subset=0.25)
    assert sizes["train"] == 500 and sizes["test"] == 200
    gpu_data.check_payload(str(full), payload, train_subset=0.25)  # raises if anything differs
    measure = gpu_evidence._time
    timed: list[int] = []

    def fixed_time(step: Callable[[], None], device: torch.device, repeats: int) -> list[float]:
        """Run the steps for real, but report ``STEP_MS`` each: the plan cannot depend on
        how busy the machine is."""
        measure(step, device, repeats)
        timed.append(repeats)
        return [STEP_MS] * repeats

    monkeypatch.setattr(gpu_evidence, "_time", fixed_time)
    out = tmp_path / "out" / "e.json"
    report = gpu_evidence.main(
        ["--device", "cpu", "--smoke", "--data-dir", str(payload / "data"), "--out", str(out)]
        + ["--work", str(tmp_path / "runs"), "--seeds", "0", "--parallel", "2"]
        + ["--budget-s", AMPLE_BUDGET_S]
    )
    assert out.is_file() and out.with_suffix(".log").is_file()
    costs = {c["config"]: c for c in report["step_costs"]}
    assert set(costs) == set(gpu_evidence.STEP_CONFIGS)
    assert not [c for c in costs.values() if "error" in c], costs
    assert all(c["median_ms"] == STEP_MS for c in costs.values()), costs
    assert len(timed) == 2 * len(gpu_evidence.STEP_CONFIGS) and min(timed) >= 1  # warm-up, timed
    # the plan is made from the step costs: 8 runs of (5 s + 1 epoch of 100 steps x 5 ms),
    # 2 at a time
    n_runs = sum(len(m) for _, m in gpu_evidence.REGIMES.values())
    used = report["step_ms_used_for_the_plan"]
    assert all(used[m] == STEP_MS for _, ms in gpu_evidence.REGIMES.values() for m in ms), used
    steps = report["plan"]["steps_per_epoch"]
    assert steps == dict.fromkeys(gpu_evidence.REGIMES, 100)
    per_run = 5.0 + 1 * 100 * STEP_MS / 1000
    assert report["plan"]["epochs"] == 1
    assert report["plan"]["planned_s"] == pytest.approx(n_runs * per_run / 2, abs=0.1)
    runs = report["runs"]
    assert len(runs) == n_runs
    assert not [r for r in runs if "error" in r], runs
    assert all(r["epochs"] == 1 for r in runs), runs
    labels = {(r["regime"], r["method"]) for r in report["summary"]}
    assert ("fine100", "single") in labels and ("coarse10", gpu_evidence.BEST) in labels


@pytest.mark.parametrize("parallel", [1, 4])
def test_time_plan_fits_the_budget(parallel: int) -> None:
    units = [("a", "single", s) for s in range(5)] + [("a", "transform", s) for s in range(5)]
    ms = {"single": 12.0, "transform": 60.0}
    epochs, planned = gpu_evidence.plan_epochs(
        units, ms, {"a": 16}, budget_s=300, parallel=parallel, max_epochs=200, overhead_s=20
    )
    assert 0 < epochs <= 200 and planned <= 300
    each = [20 + epochs * 16 * ms[m] / 1000 for _, m, _ in units]
    assert max(sum(each) / parallel, max(each)) == pytest.approx(planned, abs=0.1)
    more, _ = gpu_evidence.plan_epochs(
        units, ms, {"a": 16}, budget_s=300, parallel=parallel * 2, max_epochs=200, overhead_s=20
    )
    assert more >= epochs
    assert gpu_evidence.plan_epochs(units, ms, {"a": 16}, budget_s=10, parallel=1,
                                    max_epochs=200, overhead_s=20) == (0, 0.0)  # fmt: skip


def test_runs_stop_at_the_deadline_and_a_second_command_reuses_step_costs(tmp_path: Path) -> None:
    import time

    import gpu_report

    from auxgen.experiments.config import check_config

    full = fake_cifar100(tmp_path / "full", n_train=2000, n_test=200, shuffle=True)
    payload = tmp_path / "payload"
    gpu_data.write_payload(str(full), payload, train_subset=0.25)
    data = ["--device", "cpu", "--data-dir", str(payload / "data")]
    work = ["--work", str(tmp_path / "runs")]
    # a million epochs of the full-size ResNet-18 on the CPU: runs no machine finishes, so a
    # result other than "not finished by the deadline" would mean it waited for them
    a = gpu_evidence._parser().parse_args(data + work + ["--parallel", "2", "--seeds", "0"])
    for r, m, s in gpu_evidence._units(a):  # valid runs: none can fail before the deadline
        check_config(gpu_evidence._config(r, m, s, a, 10**6))
    t0 = time.monotonic()
    late = gpu_evidence.run_regimes(a, 10**6, time.time() + 0.5, lambda results: None)
    assert time.monotonic() - t0 < 300  # a safety limit only: waiting for the runs takes days
    assert len(late) == sum(len(m) for _, m in gpu_evidence.REGIMES.values())
    assert all(r["error"] == "not finished by the deadline" for r in late), late
    data.append("--smoke")

    first = tmp_path / "first.json"
    first.write_text(json.dumps({"step_costs": [
        {"model": "tiny", "config": "plain", "compile": False, "median_ms": 5.0}]}))  # fmt: skip
    report = gpu_evidence.main(
        data
        + ["--out", str(tmp_path / "second.json"), "--work", str(tmp_path / "runs2")]
        + ["--seeds", "0", "1", "--parallel", "2", "--regimes", "coarse10"]
        + ["--methods", "single", "transform", "--step-costs-from", str(first)]
        + ["--budget-s", AMPLE_BUDGET_S]
    )
    assert report["step_costs"] == json.loads(first.read_text())["step_costs"]
    assert sorted((r["method"], r["seed"]) for r in report["runs"]) == [
        ("single", 0), ("single", 1), ("transform", 0), ("transform", 1)]  # fmt: skip
    table = gpu_report.rows(report)
    by = {r["method"]: r for r in table}
    tests = {(r["method"], r["seed"]): 100 * r["test"] for r in report["runs"]}
    assert by["transform"]["paired"] == pytest.approx(
        [tests["transform", s] - tests["single", s] for s in (0, 1)])  # fmt: skip
    text = gpu_report.markdown(table)
    assert text.count("\n") == 3 and "| coarse10 | 1 | transform |" in text
    gpu_report.plot(table, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_methods_replace_the_regimes_and_min_epochs_cuts_seeds_not_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The converged-budget command (single, rotation task, cheap form at 100 epochs): the
    plan keeps the epochs and drops trailing seeds when all five do not fit."""
    argv = ["--device", "cpu", "--regimes", "fine100", "--seeds", "0", "1", "2", "3", "4"]
    argv += ["--methods", "single", "transform", "transform-onehalf", "--parallel", "2"]
    a = gpu_evidence._parser().parse_args(argv)
    units = gpu_evidence._units(a)
    assert units[:3] == [("fine100", "single", 0), ("fine100", "transform", 0),
                         ("fine100", "transform-onehalf", 0)] and len(units) == 15  # fmt: skip
    ms = {"plain": 10.0, "transform": 40.0, "transform_onehalf": 15.0}
    costs = [{"model": "resnet18", "config": c, "compile": False, "median_ms": t}
             for c, t in ms.items()]  # fmt: skip
    step_ms = gpu_evidence._method_ms(costs, "resnet18", [m for _, m, _ in units])
    assert (step_ms["single"], step_ms["transform"], step_ms["transform-onehalf"]) == (10, 40, 15)
    # a form without its own measured cost is planned at the four views' (its upper bound)
    assert gpu_evidence._method_ms(costs, "resnet18", ["transform-sixth"])["transform-sixth"] == 40
    assert gpu_evidence._method_ms(costs[:2], "resnet18", ["transform-onehalf"])[
        "transform-onehalf"] == 40  # fmt: skip
    assert gpu_evidence._method_ms(costs, "resnet18", ["batchaug"])["batchaug"] == 50
    # 16 steps an epoch; at 100 epochs a seed's runs take 5 + 16, 5 + 64 and 5 + 24 s (119 s),
    # two at a time: k seeds plan k x 59.5 s, so 3 seeds fit 200 s and 4 do not
    plan = {"step_ms": step_ms, "steps_per_epoch": {"fine100": 16}, "budget_s": 200.0,
            "parallel": 2, "overhead_s": 5.0, "speedup": None}  # fmt: skip
    assert gpu_evidence.plan_epochs(units, max_epochs=100, **plan)[0] < 100  # 5 seeds: fewer epochs
    seeds, epochs, planned = gpu_evidence.seeds_at(a, 100, plan)
    assert (seeds, epochs, planned) == ([0, 1, 2], 100, pytest.approx(3 * 119 / 2))
    assert gpu_evidence.seeds_at(a, 100, {**plan, "budget_s": 60.0}) == ([], 0, 0.0)  # 69 s run
    # the command: every seed at 100 epochs when the budget allows, recorded in the plan
    first = tmp_path / "costs.json"
    first.write_text(json.dumps({"step_costs": costs}))
    report = gpu_evidence.main(
        argv
        + ["--epochs", "100", "--min-epochs", "100", "--step-costs-from", str(first)]
        + ["--out", str(tmp_path / "e.json"), "--budget-s", AMPLE_BUDGET_S, "--plan-only"]
    )
    assert report["plan"]["epochs"] == 100 and report["plan"]["seeds"] == [0, 1, 2, 3, 4]
    assert report["plan"]["runs"] == 15 and report["runs"] == []
    # and with 200 s left after the 15 s the command keeps back (a clock that stands still:
    # the plan cannot depend on the machine's speed), the first three seeds at 100 epochs
    monkeypatch.setattr(gpu_evidence, "time", SimpleNamespace(time=lambda: 1000.0))
    report = gpu_evidence.main(
        argv
        + ["--epochs", "100", "--min-epochs", "100", "--step-costs-from", str(first)]
        + ["--out", str(tmp_path / "e.json"), "--budget-s", "215", "--plan-only"]
    )
    assert report["plan"]["epochs"] == 100 and report["plan"]["seeds"] == [0, 1, 2]
    assert report["plan"]["runs"] == 9 and report["plan"]["planned_s"] == pytest.approx(178.5)
