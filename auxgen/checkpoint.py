"""Atomic, ``weights_only``-loadable training checkpoints.

:func:`save_checkpoint` writes the state to a temporary file in the checkpoint's own folder,
flushes it to disk and renames it over the target with :func:`os.replace`, so a reader (or a
resumed run after a crash or ``SIGKILL``) sees either the previous checkpoint or the new one,
never a half-written file. :func:`load_checkpoint` reads it back with
``torch.load(..., weights_only=True)``: only tensors and plain containers (dicts, lists,
tuples, strings, numbers, booleans, ``None``) are accepted, so loading a checkpoint cannot run
arbitrary code. :func:`rng_state` / :func:`set_rng_state` capture and restore the random number
generators of torch (CPU and CUDA), NumPy and Python's :mod:`random` in that format.

Example:
    >>> import tempfile, os, torch
    >>> folder = tempfile.mkdtemp()
    >>> path = os.path.join(folder, "checkpoint.pt")
    >>> save_checkpoint(path, epoch=3, weights={"w": torch.ones(2)}, rng=rng_state())
    >>> state = load_checkpoint(path)
    >>> state["epoch"], state["weights"]["w"].tolist()
    (3, [1.0, 1.0])
    >>> set_rng_state(state["rng"])
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "CheckpointWriteError",
    "TEMP_PREFIX",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Prefix of the temporary files :func:`save_checkpoint` writes next to the target.
TEMP_PREFIX = ".tmp-ckpt-"


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (full disk, no permission, ...); the previous one is kept.

    An :class:`OSError` with the original ``errno``, ``strerror`` and ``filename`` (the
    checkpoint's path); the original exception is its ``__cause__``.

    Example:
        >>> import errno, os
        >>> e = CheckpointWriteError(errno.ENOSPC, os.strerror(errno.ENOSPC), "run/ckpt.pt")
        >>> print(str(e).replace("; ", ";\\n"))
        cannot write checkpoint run/ckpt.pt: No space left on device (ENOSPC);
        the previous checkpoint is unchanged
    """

    def __str__(self) -> str:
        code = errno.errorcode.get(self.errno, "") if isinstance(self.errno, int) else ""
        cause = f"{self.strerror} ({code})" if code else f"{self.strerror}"
        return (
            f"cannot write checkpoint {self.filename}: {cause}; the previous checkpoint is "
            "unchanged"
        )


def _fsync_dir(folder: Path) -> None:
    """Flush a directory entry (the rename) to disk where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems without directory fsync
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: PathLike, **state: Any) -> None:
    """Atomically write ``state`` (keyword arguments) to ``path`` with :func:`torch.save`.

    The state is written to a temporary file in the same folder (same filesystem), fsynced and
    then moved over ``path`` with :func:`os.replace`. If anything fails, the temporary file is
    removed and ``path`` is left untouched (a full disk mid-write loses nothing).

    Args:
        path: the checkpoint file; its folder is created if needed.
        **state: what to save. Keep it ``weights_only``-loadable: tensors, dicts, lists,
            tuples, strings, ints, floats, booleans and ``None`` (``state_dict()`` of modules,
            ``torch.optim`` optimisers and LR schedulers qualify; use :func:`rng_state` for
            RNG states).

    Raises:
        CheckpointWriteError: if the folder cannot be created or the file cannot be written,
            flushed or renamed (``errno.ENOSPC`` on a full disk); ``path`` still holds the
            previous checkpoint, if there was one, and no temporary file is left behind.

    Example:
        >>> import tempfile, os, torch
        >>> p = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> save_checkpoint(p, step=1, w=torch.zeros(3))
        >>> sorted(load_checkpoint(p))
        ['step', 'w']
    """
    target = Path(path)
    tmp: Optional[Path] = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".pt", dir=target.parent)
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; give it an ordinary file's mode
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):
            err = CheckpointWriteError(e.errno, e.strerror or str(e), str(target))
            raise err from e
        raise
    _fsync_dir(target.parent)
    logger.debug("saved checkpoint %s", target)


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Args:
        path: the checkpoint file.
        map_location: passed to :func:`torch.load` (default ``"cpu"``).

    Returns:
        The saved state as a dict.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a readable checkpoint (truncated, not a torch file, or
            holding objects that ``weights_only`` loading refuses).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types (RuntimeError, UnpicklingError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{p} is not a readable auxgen checkpoint: {first}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{p} is not an auxgen checkpoint: expected a dict, got {type(state)}")
    return state


def rng_state() -> dict[str, Any]:
    """The states of torch's CPU (and CUDA) RNGs, NumPy's global RNG and :mod:`random`.

    Returns:
        A ``weights_only``-loadable dict for :func:`set_rng_state`.
    """
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by :func:`rng_state`.

    A CUDA state is restored only when CUDA is available with the same number of devices.
    """
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"]), py["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # pragma: no cover - needs GPUs
            logger.warning(
                "checkpoint holds %d CUDA RNG states but %d devices are visible; not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def current_name(name: str) -> Optional[str]:
    """A labeler state-dict key of an earlier layout renamed to today's (``None``: current).

    Version 1 held one head and MAXL's generator on the labeler (``aux_head.*``,
    ``generator.*``, ``owner``); version 2 the heads on the labeler (``aux_heads.<i>.*``) and
    an Auto-lambda weight as a wrapper of its task (``tasks.<i>.log_weight``,
    ``tasks.<i>.task.*``); today each task owns its head and its weight.

    Example:
        >>> current_name("aux_head.weight"), current_name("aux_heads.1.bias")
        ('tasks.0.head.weight', 'tasks.1.head.bias')
        >>> current_name("tasks.0.log_weight"), current_name("tasks.2.head.weight") is None
        ('tasks.0.loss_weight.log_weight', True)
    """
    renamed = name
    if renamed == "owner":
        renamed = "tasks.0.owner"
    for old, new in (("aux_head.", "aux_heads.0."), ("generator.", "tasks.0.generator.")):
        if renamed.startswith(old):
            renamed = new + renamed[len(old) :]
    match = re.match(r"aux_heads\.(\d+)\.(.*)", renamed)
    if match:
        renamed = f"tasks.{match[1]}.head.{match[2]}"
    match = re.match(r"tasks\.(\d+)\.(log_weight|task\.(.*))$", renamed)
    if match:
        rest = "loss_weight.log_weight" if match[2] == "log_weight" else match[3]
        renamed = f"tasks.{match[1]}.{rest}"
    return None if renamed == name else renamed
