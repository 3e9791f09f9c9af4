"""The documentation site builds in strict mode, with the API reference from the docstrings.

``mkdocs build --strict`` fails on any warning: a broken link between pages, a page left
out of the navigation, a docstring that cannot be rendered or a cross-reference
(``[text][auxgen.Name]``) to something that does not exist. The packages come with the
``test`` extra (``pip install ".[test]"``) or the ``docs`` extra.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")
pytest.importorskip("mkdocstrings_handlers.python")
yaml = pytest.importorskip("yaml")


def build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of ``config`` into ``site``."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_docs_build_strict_with_api_reference(tmp_path: Path) -> None:
    proc = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-4000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    # rendered from the docstrings: the class, its step method and the hierarchy helpers
    assert "One MAXL training step" in api  # AuxiliaryLabeler.step's summary line
    assert "Softmax restricted to the children" in api  # masked_softmax
    assert "NonFiniteError" in api and "SUPPORTED_OPTIMIZERS" in api
    assert "&gt;&gt;&gt;" in api and "Example:" not in api  # doctests rendered as code
    for page in (
        "timm_train",
        "lightning_module",
        "accelerate_train",
        "hf_trainer",
        "text_classifier",
    ):
        assert (tmp_path / "site" / "examples" / page / "index.html").is_file(), page


def test_docs_build_fails_on_a_broken_reference(tmp_path: Path) -> None:
    """The same configuration rejects a cross-reference to a name that does not exist."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    python = config["plugins"][1]["mkdocstrings"]["handlers"]["python"]
    python["paths"] = [str(ROOT)]
    python["options"]["extensions"] = [
        str(ROOT / ext) for ext in python["options"]["extensions"]
    ]  # relative to the repository root, this config lives elsewhere
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text(
        "# Broken\n\nSee [the method][auxgen.AuxiliaryLabeler.no_such_method].\n\n"
        "::: auxgen.owner_index\n"
    )
    config.update(docs_dir=str(docs), nav=["index.md"])
    config.pop("exclude_docs", None)
    path = tmp_path / "mkdocs.yml"
    path.write_text(yaml.safe_dump(config))

    proc = build(path, tmp_path / "site")
    assert proc.returncode != 0
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, proc.stderr  # the rest of the configuration is fine
    assert "auxgen.AuxiliaryLabeler.no_such_method" in warnings[0]
