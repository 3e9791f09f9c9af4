"""The README's code runs as written: its Python blocks under "Usage", in order, in one fresh
interpreter, after the one thing a reader supplies (a tiny ``loader``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

#: what a reader has before the README's first block: a loader of (images, labels) batches
PRELUDE = """
import torch
torch.manual_seed(0)
loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 20, (4,))) for _ in range(2)]
"""


def usage_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    usage = text.split("\n## Usage", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", usage, flags=re.S)


def test_readme_usage_blocks_run_in_order(tmp_path: Path) -> None:
    blocks = usage_blocks()
    assert len(blocks) >= 3  # the loss form, MAXL in the loop, several tasks
    script = PRELUDE + "\n".join(blocks) + "\nprint('README OK', type(labeler).__name__)\n"
    (tmp_path / "readme.py").write_text(script)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "readme.py")], cwd=tmp_path, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "README OK AuxiliaryLabeler" in proc.stdout
