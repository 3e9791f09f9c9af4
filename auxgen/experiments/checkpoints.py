"""Per-run checkpoints: what identifies a run, resuming from ``checkpoint.pt``, saving it.

A checkpoint holds the labeler, the optimisers, the scheduler, the history, the elapsed time
and every RNG state, written atomically after every epoch by
:func:`auxgen.checkpoint.save_checkpoint`. It carries the run's *fingerprint* (the config
fields that change the training arithmetic), so a checkpoint of another run is refused
instead of being resumed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from ..checkpoint import (
    CheckpointWriteError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ..labeler import AuxiliaryLabeler
from .config import RunConfig
from .runtime import is_main_process, world_and_rank

__all__ = ["CHECKPOINT_NAME", "RESULTS_NAME", "fingerprint", "open_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"
RESULTS_NAME = "results.json"
_CHECKPOINT_FORMAT = 1

#: Config fields that do not change the training arithmetic: a checkpoint written with other
#: values of these may be resumed.
_NON_MATH_FIELDS = frozenset(
    {"data_dir", "download", "out_dir", "device", "threads", "deterministic", "resume"}
    | {"checkpoint", "progress", "diagnostics"}
)


def fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The config fields that change the training arithmetic."""
    return {k: v for k, v in cfg.to_dict().items() if k not in _NON_MATH_FIELDS}


def _stored_fingerprint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's fingerprint, with the defaults for fields added after it was written
    (a new field's default keeps the arithmetic of the versions without it)."""
    stored = ckpt.get("fingerprint")
    if not isinstance(stored, dict):
        return {}
    return {**fingerprint(RunConfig()), **stored}


def finished_results(path: Path, cfg: RunConfig) -> Optional[dict[str, Any]]:
    """The stored results of a finished run with the same settings, else ``None``."""
    try:
        stored = json.loads(path.read_text())
        same = fingerprint(RunConfig(**stored["config"])) == fingerprint(cfg)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return stored if same else None


def open_checkpoint(cfg: RunConfig, ckpt_path: Optional[Path]) -> Optional[dict[str, Any]]:
    """The checkpoint to resume from (``None``: start afresh), as ``cfg.resume`` asks.

    Raises:
        ValueError: the checkpoint belongs to a run with other settings.
        FileNotFoundError: ``resume=True`` but there is no checkpoint.
    """
    ckpt: Optional[dict[str, Any]] = None
    if cfg.resume is not False and ckpt_path is not None and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        old, new = _stored_fingerprint(ckpt), fingerprint(cfg)
        if old != new:
            diff = sorted(k for k in new if old.get(k) != new[k])
            raise ValueError(
                f"{ckpt_path} belongs to a different run (differs in: {', '.join(diff)}); "
                "use another --out, or --no-resume to overwrite it"
            )
    elif cfg.resume is True:
        raise FileNotFoundError(f"resume requested but there is no checkpoint at {ckpt_path}")
    return ckpt


def restore(
    ckpt: dict[str, Any],
    labeler: AuxiliaryLabeler,
    opt: Any,
    gen_opt: Optional[Any],
    sched: Optional[Any],
) -> tuple[list[dict[str, Any]], int, float]:
    """Load a checkpoint's states (and RNG states); return ``(history, epoch, elapsed_s)``."""
    labeler.load_state_dict(ckpt["labeler"])
    opt.load_state_dict(ckpt["optimizer"])
    if gen_opt is not None:
        gen_opt.load_state_dict(ckpt["gen_optimizer"])
    if sched is not None:
        sched.load_state_dict(ckpt["scheduler"])
    history = list(ckpt["history"])
    start_epoch = int(ckpt["epoch"])
    elapsed_before = float(ckpt["elapsed_s"])
    set_rng_state(ckpt["rng"])
    return history, start_epoch, elapsed_before


def save_epoch(
    ckpt_path: Path,
    cfg: RunConfig,
    epoch: int,
    labeler: AuxiliaryLabeler,
    opt: Any,
    gen_opt: Optional[Any],
    sched: Optional[Any],
    history: list[dict[str, Any]],
    elapsed_s: float,
) -> None:
    """Write the checkpoint after ``epoch`` epochs (rank 0); every rank raises its failure.

    Raises:
        CheckpointWriteError: the checkpoint could not be written; the previous one is kept.
    """
    failure: Optional[CheckpointWriteError] = None
    if is_main_process():
        try:
            save_checkpoint(
                ckpt_path,
                format=_CHECKPOINT_FORMAT,
                fingerprint=fingerprint(cfg),
                epoch=epoch,
                labeler=labeler.state_dict(),
                optimizer=opt.state_dict(),
                gen_optimizer=gen_opt.state_dict() if gen_opt is not None else None,
                scheduler=sched.state_dict() if sched is not None else None,
                history=history,
                elapsed_s=elapsed_s,
                rng=rng_state(),
            )
        except CheckpointWriteError as e:
            failure = e
    _share_checkpoint_failure(failure)


def _share_checkpoint_failure(failure: Optional[CheckpointWriteError]) -> None:
    """Raise rank 0's checkpoint-write error (or ``None``: return) on every rank.

    Under ``torch.distributed`` only rank 0 writes; one broadcast lets all ranks stop at the
    same epoch with the same error instead of waiting for a rank that has gone.
    """
    world, rank = world_and_rank()
    if world > 1:
        info = [None if failure is None else (failure.errno, failure.strerror, failure.filename)]
        dist.broadcast_object_list(info, src=0)
        if info[0] is not None and failure is None:
            failure = CheckpointWriteError(*info[0])
    if failure is not None:
        raise failure
