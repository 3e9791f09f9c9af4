"""The layout: the library never imports the experiment harness nor its extra packages, its
modules and functions stay small, and imports run one way (labeler -> tasks, step, ranks)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

#: The library: what a user imports into their own training loop.
CORE = (
    "__init__", "labeler", "step", "meta", "mirror", "distributed", "checks", "backbone",
    "hierarchy", "losses", "checkpoint", "tasks/__init__", "tasks/base", "tasks/labels",
    "tasks/transforms", "tasks/weighting", "tasks/cells",
)  # fmt: skip
#: Packages of the ``experiments`` extra (the harness and the CLI), not of the library
#: (tqdm also comes with timm's huggingface_hub, so only the other two are checked loaded).
EXTRAS = ("sklearn", "matplotlib", "tqdm")


def test_importing_auxgen_loads_no_harness_module_nor_extra() -> None:
    modules = ", ".join("auxgen." + m.replace("/", ".") for m in CORE if m != "__init__")
    code = (
        f"import json, sys; import auxgen, {modules}; "
        "print(json.dumps(sorted(m.split('.')[0] if not m.startswith('auxgen') else m "
        "for m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout)
    assert "auxgen.labeler" in loaded and "auxgen.tasks.transforms" in loaded
    harness = [m for m in loaded if m.startswith(("auxgen.experiments", "auxgen.cli"))]
    assert harness == [], harness
    assert [m for m in EXTRAS[:2] if m in loaded] == []


def test_the_extras_are_not_install_requirements() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = " ".join(meta["dependencies"])
    for package in ("scikit-learn", "matplotlib", "tqdm"):
        assert package not in required
        assert any(d.startswith(package) for d in meta["optional-dependencies"]["experiments"])
    assert "auxgen[experiments]" in meta["optional-dependencies"]["test"]


def _imports(path: Path) -> list[str]:
    """Every module a file imports, relative imports resolved against its package."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            names += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return names


def test_core_modules_do_not_import_the_harness() -> None:
    for name in CORE:
        bad = [
            m
            for m in _imports(ROOT / "auxgen" / f"{name}.py")
            if m.startswith(("auxgen.experiments", "auxgen.cli")) or m.split(".")[0] in EXTRAS
        ]
        assert bad == [], f"auxgen/{name}.py imports {bad}"


def test_imports_run_one_way() -> None:
    """Only the package's entry points import the labeler; the step, the ranks and the tasks
    take what they need as arguments."""
    for name in CORE:
        if name in ("__init__", "labeler"):
            continue
        imported = _imports(ROOT / "auxgen" / f"{name}.py")
        assert not [m for m in imported if m.startswith("auxgen.labeler")], name
    for name in ("distributed", "checks", "meta", "mirror", "backbone", "hierarchy", "losses"):
        imported = _imports(ROOT / "auxgen" / f"{name}.py")
        assert not [m for m in imported if m.startswith(("auxgen.step", "auxgen.tasks"))], name


def _function_lengths(path: Path) -> dict[str, int]:
    """Body lines (without the docstring) of every function in a file."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                body = body[1:]
            if body:
                out[f"{node.name}:{node.lineno}"] = body[-1].end_lineno - body[0].lineno + 1
    return out


def test_rooms_stay_small() -> None:
    """labeler.py ~500 lines (the public surface: its three ways to train, ``labeler(x, y)``,
    ``meta_step`` and ``step``, with their documentation; the work is in step.py and
    loop.py), library modules ~600 (harness and CLI ~550), functions ~60 lines and
    constructors ~40 (without docstrings)."""
    for path in sorted((ROOT / "auxgen").rglob("*.py")):
        lines = path.read_text().count("\n")
        name = path.relative_to(ROOT).as_posix()
        harness = "experiments" in path.parts or path.name in ("cli.py", "cli_parser.py")
        limit = 525 if path.name == "labeler.py" else 560 if harness else 600
        assert lines <= limit, f"{name}: {lines} lines (limit {limit})"
        for fn, length in _function_lengths(path).items():
            cap = 40 if fn.startswith("__init__:") else 60
            assert length <= cap, f"{name} {fn}: {length} lines (limit {cap})"
