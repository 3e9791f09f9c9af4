"""Faults of ``auxgen run``: a full disk while a checkpoint is written, a process killed with
``SIGKILL``, and a rank killed under ``torchrun`` (the checkpoint writer itself on a full disk
is tested in ``tests/library/test_checkpoint.py``).

* ``auxgen run`` stops at that epoch with one line on stderr and exit status 1 (in one
  process, and on every rank under ``torchrun``).
* Kill a training process right after its first checkpoint, resume it: it ends bit-identical
  to an uninterrupted run.
* ``torchrun --max-restarts 1``: SIGKILL one worker mid-epoch after a checkpoint exists; the
  job restarts, resumes and ends bit-identical to an uninterrupted job
  (``benchmarks/fault_restart.py``, which repeats this N times).
* The root cause, deterministically and without torchrun: two attempts against one shared
  store (as torchrun's agent serves them), the second with a late rank 1; without a
  per-attempt prefix rank 0 dials rank 1's dead attempt-0 port ("Connection refused").
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ROOT, rank_logs, temporaries, torchrun_cmd

from auxgen.checkpoint import TEMP_PREFIX, load_checkpoint
from auxgen.cli import main

sys.path.insert(0, str(ROOT / "benchmarks"))
import fault_restart  # noqa: E402

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


RUN = ["run", "--dataset", "digits", "--methods", "single", "--seeds", "0", "--epochs", "4"]
RUN += ["--train-subset", "4", "--batch-size", "8", "--test-limit", "100", "--threads", "1"]
RUN += ["--no-progress", "-q"]


def test_cli_stops_on_a_full_disk(tmp_path: Path, monkeypatch, capsys) -> None:
    """The second epoch's checkpoint hits a full disk: exit 1, one line, nothing lost."""
    calls = []
    real_save = torch.save

    def fill_disk_on_second_call(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(obj.get("epoch"))
        real_save(obj, f, *args, **kwargs)
        if len(calls) >= 2:
            raise ENOSPC

    monkeypatch.setattr(torch, "save", fill_disk_on_second_call)
    assert main([*RUN, "--out", str(tmp_path)]) == 1
    monkeypatch.undo()
    run_dir = tmp_path / "single" / "seed0"
    ckpt = run_dir / "checkpoint.pt"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"auxgen: error: cannot write checkpoint {ckpt}: No space left on device (ENOSPC); "
        "the previous checkpoint is unchanged"
    ]
    assert calls == [1, 2]  # training stopped: no epoch ran past the failed checkpoint
    assert load_checkpoint(ckpt)["epoch"] == 1
    assert temporaries(tmp_path) == []
    assert not (run_dir / "results.json").exists() and not (tmp_path / "results.json").exists()
    # with space again, the run resumes from the kept checkpoint and finishes
    assert main([*RUN, "--out", str(tmp_path), "--resume"]) == 0
    assert load_checkpoint(ckpt)["epoch"] == 4


FULL_DISK_LAUNCHER = """
import errno, os, sys, torch
real_save = torch.save
calls = []
def fill_disk_on_second_call(obj, f, *args, **kwargs):
    calls.append(1)
    real_save(obj, f, *args, **kwargs)
    if len(calls) >= 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
torch.save = fill_disk_on_second_call
from auxgen.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_full_disk_under_torchrun_stops_every_rank(tmp_path: Path) -> None:
    """Rank 0 cannot write: both ranks stop at the same epoch with the line and exit 1."""
    launcher = tmp_path / "full_disk.py"
    launcher.write_text(FULL_DISK_LAUNCHER)
    out = tmp_path / "out"
    cmd = [*torchrun_cmd(2, tmp_path / "logs", standalone=False), "--max-restarts", "0"]
    cmd += [str(launcher), *RUN, "--out", str(out)]
    proc = subprocess.run(
        cmd, env=fault_restart.child_env(), capture_output=True, text=True, timeout=300
    )
    log = proc.stdout + proc.stderr
    ranks = rank_logs(tmp_path / "logs")
    assert proc.returncode != 0, log
    assert sorted(ranks) == [(0, 0), (0, 1)], log[-3000:]
    ckpt = out / "single" / "seed0" / "checkpoint.pt"
    line = f"auxgen: error: cannot write checkpoint {ckpt}: No space left on device (ENOSPC)"
    for rank_log in ranks.values():  # each rank said the line once, and no worker traceback
        assert rank_log.count(line) == 1, rank_log[-3000:]
        assert "training.py" not in rank_log, rank_log[-3000:]
    assert "exitcode  : 1" in log, log[-3000:]
    assert load_checkpoint(ckpt)["epoch"] == 1
    assert temporaries(out) == []


@pytest.mark.slow
def test_killed_rank_restarts_and_ends_identical(tmp_path: Path) -> None:
    """SIGKILL rank 1 mid-epoch under ``torchrun --max-restarts 1``: the job restarts, resumes
    from the last checkpoint and ends bit-identical to an uninterrupted job."""
    # 6 epochs: the kill lands in the third, with room for a slow epoch before the end
    kw: dict[str, Any] = {"epochs": 6, "train_subset": 3, "timeout": 280.0}
    with ThreadPoolExecutor(1) as pool:  # the reference job runs alongside the killed one
        reference = pool.submit(fault_restart.run_job, tmp_path / "reference", **kw)
        job = fault_restart.run_job(tmp_path / "killed", kill_rank=1, **kw)
        ref = reference.result()
    assert ref["returncode"] == 0, ref["log"][-3000:]
    assert job["killed_at_epoch"] is not None, job["log"][-3000:]
    assert job["returncode"] == 0, job["log"][-3000:]
    assert "Connection refused" not in job["log"]
    got = fault_restart.final_state(tmp_path / "killed")
    want = fault_restart.final_state(tmp_path / "reference")
    # the survivor may still finish its epoch and checkpoint before torchrun stops it
    assert 1 <= job["killed_at_epoch"] <= got["results"]["resumed_from_epoch"] < kw["epochs"]
    assert want["results"]["resumed_from_epoch"] is None
    assert fault_restart.same_run(got, want) == []
    assert got["checkpoint"]["epoch"] == kw["epochs"]


def _join_attempt(rank: int, env: dict[str, str], delay: float, result: str) -> None:
    """A spawned worker of one torchrun attempt: join the group, all-reduce, leave."""
    os.environ.update(env)
    time.sleep(delay)
    import torch.distributed as dist

    from auxgen.cli import _finish_distributed, _init_distributed

    try:
        _init_distributed(timeout_s=30)
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        _finish_distributed()
        Path(result).write_text(f"ok {t.item():g}")
    except Exception as e:
        Path(result).write_text(f"failed {type(e).__name__}: {e}")


def test_restarted_attempt_ignores_the_dead_attempts_keys(tmp_path: Path) -> None:
    """The root cause of failed torchrun restarts, without torchrun.

    torchrun's agent serves all attempts from one store; attempt 0 leaves its gloo addresses
    there. In attempt 1 rank 1 comes up late, so rank 0 would read rank 1's attempt-0 address
    (a dead port) unless the attempt's keys are separate.
    """
    import torch.multiprocessing as mp
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    for attempt, delays in ((0, (0.0, 0.0)), (1, (0.0, 3.0))):
        procs = []
        for rank in range(2):
            env = {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(store.port),
                "WORLD_SIZE": "2",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "TORCHELASTIC_USE_AGENT_STORE": "True",
                "TORCHELASTIC_RUN_ID": "test",
                "TORCHELASTIC_RESTART_COUNT": str(attempt),
            }
            result = str(tmp_path / f"a{attempt}r{rank}")
            procs.append(ctx.Process(target=_join_attempt, args=(rank, env, delays[rank], result)))
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        got = [(tmp_path / f"a{attempt}r{r}").read_text() for r in range(2)]
        assert got == ["ok 3", "ok 3"], f"attempt {attempt}: {got}"


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


#: The victim: the CLI, with the harness's checkpoint writer replaced by one that SIGKILLs
#: its own process right after the first checkpoint is on disk (a deterministic point, at
#: any machine speed, instead of a watcher racing the training).
_VICTIM = """
import os, signal, sys
import auxgen.experiments.checkpoints as checkpoints
from auxgen.cli import main

write = checkpoints.save_checkpoint

def write_then_die(*args, **kwargs):
    write(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

checkpoints.save_checkpoint = write_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    """Kill a training process right after its first checkpoint, resume it, and compare with
    an uninterrupted run of the same seed (CPU, deterministic algorithms, 1 thread)."""
    ref_out, out = tmp_path / "reference", tmp_path / "killed"
    run_dir, ref_dir = out / "maxl-copy" / "seed3", ref_out / "maxl-copy" / "seed3"
    ckpt = run_dir / "checkpoint.pt"
    victim = subprocess.run(
        [sys.executable, "-c", _VICTIM, *RUN_ARGS, "--out", str(out)],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300,
    )  # fmt: skip
    assert ckpt.exists(), f"no checkpoint (exit {victim.returncode}): {victim.stderr!r}"
    assert victim.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(ckpt)["epoch"]
    assert killed_at == 1 < EPOCHS  # killed right after the first epoch's checkpoint
    assert main([*RUN_ARGS, "--out", str(ref_out)]) == 0  # the uninterrupted reference
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
