"""The layout: the library never imports the experiment harness; the old paths still work."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The library: what a user imports into their own training loop.
CORE = ("__init__", "labeler", "meta", "mirror", "backbone", "hierarchy", "losses", "checkpoint")


def test_importing_auxgen_loads_no_harness_module() -> None:
    code = (
        "import json, sys; import auxgen, auxgen.labeler, auxgen.meta, auxgen.mirror, "
        "auxgen.backbone, auxgen.hierarchy, auxgen.losses, auxgen.checkpoint; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('auxgen'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout)
    assert "auxgen.labeler" in loaded
    harness = [m for m in loaded if m.startswith("auxgen.experiments")]
    harness += [m for m in loaded if m in ("auxgen.runner", "auxgen.data", "auxgen.cli")]
    assert harness == [], harness


def _imports(path: Path) -> list[str]:
    """Every module a file imports, relative imports resolved against ``auxgen``."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "auxgen." * (node.level > 0) + (node.module or "")
            names += [base.rstrip(".")] + [f"{base}.{a.name}".lstrip(".") for a in node.names]
    return names


def test_core_modules_do_not_import_the_harness() -> None:
    for name in CORE:
        bad = [
            m
            for m in _imports(ROOT / "auxgen" / f"{name}.py")
            if m.startswith(("auxgen.experiments", "auxgen.runner", "auxgen.data", "auxgen.cli"))
            or m in ("auxgen.plots", "auxgen.baselines")
        ]
        assert bad == [], f"auxgen/{name}.py imports {bad}"


def test_old_module_paths_still_work() -> None:
    from auxgen import baselines, data, plots, runner
    from auxgen.experiments import baselines as new_baselines
    from auxgen.experiments import config, sweep, training
    from auxgen.experiments import plots as new_plots

    assert runner.RunConfig is config.RunConfig
    assert runner.train is training.train and runner.run_sweep is sweep.run_sweep
    assert data.hierarchy_psi(20, 100)[0] == (5,) * 20
    assert plots.plot_accuracy is new_plots.plot_accuracy
    assert baselines.random_aux_labels is new_baselines.random_aux_labels
    for module in (runner, data, plots, baselines):
        assert all(hasattr(module, n) for n in module.__all__), module.__name__
