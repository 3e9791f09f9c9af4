"""``benchmarks/gpu_data.py`` and ``benchmarks/gpu_evidence.py`` on the CPU: the payload gives
the harness the exact images of the full dataset, the smoke run goes through every part, and
the time plan stays within its budget."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import fake_cifar100

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_data  # noqa: E402
import gpu_evidence  # noqa: E402


def test_payload_is_the_harness_subset_and_the_smoke_run_completes(tmp_path: Path) -> None:
    full = fake_cifar100(tmp_path / "full", n_train=2000, n_test=200, shuffle=True)
    payload = tmp_path / "payload"
    sizes = gpu_data.write_payload(str(full), payload, train_subset=0.25)
    assert sizes["train"] == 500 and sizes["test"] == 200
    gpu_data.check_payload(str(full), payload, train_subset=0.25)  # raises if anything differs
    out = tmp_path / "out" / "e.json"
    report = gpu_evidence.main(
        ["--device", "cpu", "--smoke", "--data-dir", str(payload / "data"), "--out", str(out)]
        + ["--work", str(tmp_path / "runs"), "--seeds", "0", "--parallel", "2"]
        + ["--budget-s", "240"]
    )
    assert out.is_file() and out.with_suffix(".log").is_file()
    costs = {c["config"]: c for c in report["step_costs"]}
    assert set(costs) == set(gpu_evidence.STEP_CONFIGS)
    assert all(c.get("median_ms", 0) > 0 for c in costs.values()), costs
    assert report["plan"]["epochs"] == 1
    runs = report["runs"]
    assert len(runs) == sum(len(m) for _, m in gpu_evidence.REGIMES.values())
    assert not [r for r in runs if "error" in r], runs
    labels = {(r["regime"], r["method"]) for r in report["summary"]}
    assert ("fine100", "single") in labels and ("coarse10", gpu_evidence.BEST) in labels
    assert report["wall_s"] < 240


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

    full = fake_cifar100(tmp_path / "full", n_train=2000, n_test=200, shuffle=True)
    payload = tmp_path / "payload"
    gpu_data.write_payload(str(full), payload, train_subset=0.25)
    data = ["--device", "cpu", "--smoke", "--data-dir", str(payload / "data")]
    a = gpu_evidence._parser().parse_args(data + ["--parallel", "2", "--seeds", "0"])
    t0 = time.time()
    late = gpu_evidence.run_regimes(a, 1, time.time() + 0.5, lambda results: None)
    assert time.time() - t0 < 30  # returned at the deadline, not after the runs
    assert late and all(r["error"] == "not finished by the deadline" for r in late)

    first = tmp_path / "first.json"
    first.write_text(json.dumps({"step_costs": [
        {"model": "tiny", "config": "plain", "compile": False, "median_ms": 5.0}]}))  # fmt: skip
    report = gpu_evidence.main(
        data
        + ["--out", str(tmp_path / "second.json"), "--work", str(tmp_path / "runs")]
        + ["--seeds", "0", "1", "--parallel", "2", "--regimes", "coarse10"]
        + ["--methods", "single", "transform", "--step-costs-from", str(first)]
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
