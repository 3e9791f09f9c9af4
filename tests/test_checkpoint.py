"""Checkpoints: atomic writes, weights_only loading, RNG round trips, and exact resume after
``SIGKILL``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from auxgen.checkpoint import (
    TEMP_PREFIX,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from auxgen.cli import main

ROOT = Path(__file__).resolve().parents[1]


class Arbitrary:
    """A class that weights_only loading must refuse."""


def test_round_trip_and_weights_only(tmp_path: Path) -> None:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    path = tmp_path / "sub" / "ckpt.pt"
    save_checkpoint(
        path, epoch=2, opt=opt.state_dict(), hist=[{"a": 1.5, "b": None}], rng=rng_state()
    )
    state = load_checkpoint(path)
    assert state["epoch"] == 2 and state["hist"] == [{"a": 1.5, "b": None}]
    assert torch.equal(state["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # the file really is weights_only-loadable
    torch.load(path, weights_only=True)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]


def test_rng_state_round_trip(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "r.pt", rng=rng_state())
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_failed_write_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, epoch=1)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, epoch=2)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert not any(p.name.startswith(TEMP_PREFIX) for p in tmp_path.iterdir())


def test_unreadable_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "ok.pt", w=torch.arange(1000))
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable auxgen checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")
    torch.save({"x": Arbitrary()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a readable auxgen checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


# ------------------------------------------------------------------------------------------
# kill -9 in the middle of training, resume, compare with an uninterrupted run
# ------------------------------------------------------------------------------------------

EPOCHS = 6
RUN_ARGS = [
    "run",
    "--dataset",
    "digits",
    "--method",
    "maxl-copy",
    "--seeds",
    "3",
    "--epochs",
    str(EPOCHS),
    "--train-subset",
    "30",
    "--batch-size",
    "32",
    "--gen-lr",
    "0.01",
    "--threads",
    "1",
    "--deterministic",
    "--no-progress",
    "-q",
]


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "auxgen", *RUN_ARGS, "--out", str(out), *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _strip_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.endswith("_time_s")} for h in history]


def _assert_same_state(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_sigkill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    """Kill a training process right after its first checkpoint, resume it, and compare with
    an uninterrupted run of the same seed (CPU, deterministic algorithms, 1 thread)."""
    ref_out, out = tmp_path / "reference", tmp_path / "killed"
    run_dir, ref_dir = out / "maxl-copy" / "seed3", ref_out / "maxl-copy" / "seed3"
    ckpt = run_dir / "checkpoint.pt"
    victim = subprocess.Popen(
        _cli(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    killed = threading.Event()

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 90
        while victim.poll() is None and time.monotonic() < deadline:
            if ckpt.exists():
                victim.send_signal(signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    try:
        # the uninterrupted reference run, in this process, while the victim trains
        assert main([*RUN_ARGS, "--out", str(ref_out)]) == 0
        watcher.join(timeout=90)
        _, err = victim.communicate(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.communicate()
    assert killed.is_set(), f"no checkpoint appeared (exit {victim.returncode}): {err!r}"
    assert victim.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(ckpt)["epoch"]
    assert 1 <= killed_at < EPOCHS, f"killed too late (epoch {killed_at} of {EPOCHS})"
    assert not (run_dir / "results.json").exists()

    assert main([*RUN_ARGS, "--out", str(out), "--resume"]) == 0

    got = json.loads((run_dir / "results.json").read_text())
    want = json.loads((ref_dir / "results.json").read_text())
    assert got["resumed_from_epoch"] == killed_at and want["resumed_from_epoch"] is None
    assert _strip_times(got["history"]) == _strip_times(want["history"])
    assert got["final_test_accuracy"] == want["final_test_accuracy"]
    assert got["final_test_loss"] == want["final_test_loss"]
    assert got["aux"] == want["aux"]
    final = load_checkpoint(run_dir / "checkpoint.pt")
    ref_final = load_checkpoint(ref_dir / "checkpoint.pt")
    for key in ("labeler", "optimizer", "gen_optimizer", "scheduler", "epoch"):
        _assert_same_state(final[key], ref_final[key], key)
    assert not any(p.name.startswith(TEMP_PREFIX) for p in run_dir.iterdir())
