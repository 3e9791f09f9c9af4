"""Process-level helpers of a run: device, seeds, ranks and atomic JSON output."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "as_root",
    "world_and_rank",
    "is_main_process",
    "resolve_device",
    "seed_everything",
    "write_json",
    "missing_extras",
]

PathLike = Union[str, "os.PathLike[str]"]


def as_root(data_dir: Any) -> Path:
    """``data_dir`` as a ``Path`` (``~`` expanded); ``TypeError`` unless a str or path."""
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(
            f"data_dir must be a str or os.PathLike folder path, got {type(data_dir).__name__}"
        )
    return Path(data_dir).expanduser()


def world_and_rank() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def is_main_process() -> bool:
    """Only rank 0 writes results, checkpoints and plots."""
    return world_and_rank()[1] == 0


def resolve_device(name: str) -> torch.device:
    """``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a device; raises if unusable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"invalid device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    random.seed(seed)


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (rank 0 only under torch.distributed)."""
    if not is_main_process():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: What the command line and the harness import beyond the library: (module, package).
EXPERIMENT_EXTRAS = (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"), ("tqdm", "tqdm"))


def missing_extras() -> list[str]:
    """The packages of the ``experiments`` extra that cannot be imported."""
    import importlib.util

    missing = []
    for module, package in EXPERIMENT_EXTRAS:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, ...
            found = False
        if not found:
            missing.append(package)
    return missing
