"""Smoke test of ``benchmarks/step_cost.py``: a tiny model, two rounds, a few seconds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
