"""Smoke tests of ``benchmarks/step_cost.py`` and ``benchmarks/ddp_cost.py``: tiny sizes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "step_cost.py"
CONFIGS = (
    "single",
    "second_order",
    "first_order",
    "second_order_every4",
    "head_second_order",
    "head_first_order",
    "head_second_order_every4",
    "transform",
    "transform_one",
    "transform_maxl",
    "transform_sd",
    "transform_cells",
    "transform_autol",
    "transform_loss",
    "head_second_order_loss",
    "transform_onehalf",
    "transform_sixth",
    "transform_patch",
    "batchaug",
)


def _positive_finite(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_step_cost_smoke(tmp_path: Path) -> None:
    out, plot = tmp_path / "step_cost.json", tmp_path / "step_cost.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--no-progress", "--out", str(out)]
        + ["--plot", str(plot), "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]["tiny"]
    assert set(CONFIGS) <= set(results)
    for name in CONFIGS:
        stats = results[name]
        for key in ("ratio", "ratio_of_medians", "median_ms", "peak_mb", "memory_ratio"):
            assert _positive_finite(stats[key]), (name, key, stats[key])
        assert len(stats["times_ms"]) >= 2
    assert results["single"]["ratio"] == 1.0
    assert report["machine"]["threads"] == 1
    assert "median ms" in proc.stdout and "second_order_every4" in proc.stdout
    assert plot.stat().st_size > 0


def test_ddp_cost_smoke(tmp_path: Path) -> None:
    """Two CPU processes under torchrun: three steps timed, ratios written by rank 0."""
    from helpers import torchrun_cmd

    out = tmp_path / "ddp_cost.json"
    cmd = [*torchrun_cmd(2, tmp_path / "logs"), str(ROOT / "benchmarks" / "ddp_cost.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [*cmd, "--smoke", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads(out.read_text())
    assert report["world"] == 2
    assert set(report["ratio_to_plain_ddp"]) == {"plain_ddp", "loss_form_ddp", "step"}
    assert report["ratio_to_plain_ddp"]["plain_ddp"] == 1.0
    assert all(_positive_finite(v) for v in report["median_s"].values())
