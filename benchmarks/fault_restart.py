"""Kill one rank of a ``torchrun`` job mid-epoch, N times, and count identical recoveries.

Each try starts

    torchrun --nproc-per-node 2 --max-restarts 1 -m auxgen run --dataset digits \\
        --methods maxl --deterministic ...

waits until the run's first checkpoint exists, waits a random fraction of an epoch more
(so the kill lands mid-epoch), sends ``SIGKILL`` to one worker process (found among
torchrun's children by its ``RANK``), and lets torchrun restart the workers. A try succeeds
when torchrun exits 0, the run reports that it resumed from a checkpoint, and its history,
final accuracy and final parameters (``checkpoint.pt``) equal those of one uninterrupted
reference job with the same arguments. Prints one line per try and a final count::

    python benchmarks/fault_restart.py --tries 10
    python benchmarks/fault_restart.py --tries 3 --epochs 8 --kill-rank 0 --out runs/faults

Only for Linux (it reads ``/proc`` to find the workers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
LABEL = "maxl-copy"


def run_args(epochs: int, train_subset: int) -> list[str]:
    """The ``auxgen run`` arguments of every job (small, deterministic, one thread)."""
    return [
        "run",
        "--dataset",
        "digits",
        "--methods",
        "maxl",
        "--seeds",
        "0",
        "--epochs",
        str(epochs),
        "--train-subset",
        str(train_subset),
        "--batch-size",
        "8",
        "--test-limit",
        "200",
        "--threads",
        "1",
        "--deterministic",
        "--no-progress",
    ]


def torchrun_cmd(out: Path, epochs: int, train_subset: int, max_restarts: int) -> list[str]:
    """The torchrun command line of one job writing to ``out``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--max-restarts", str(max_restarts), "--monitor-interval", "0.2"]
    cmd += ["-m", "auxgen", *run_args(epochs, train_subset), "--out", str(out)]
    return cmd


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    return env


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux ``/proc``)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces; ppid follows it
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def worker_pid(torchrun_pid: int, rank: int) -> Optional[int]:
    """The pid of the worker with ``RANK=rank`` under a torchrun process, if running."""
    todo = _children(torchrun_pid)
    while todo:
        pid = todo.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"\0".join(env):
            return pid
        todo.extend(_children(pid))
    return None


def run_job(
    out: Path,
    *,
    epochs: int,
    train_subset: int,
    kill_rank: Optional[int] = None,
    max_restarts: int = 1,
    timeout: float = 600.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Run one torchrun job; with ``kill_rank`` SIGKILL that rank mid-epoch once.

    Returns:
        ``{"returncode", "killed_at_epoch", "log", "seconds"}``; ``killed_at_epoch`` is the
        epoch of the checkpoint that existed when the rank was killed (``None``: no kill).
    """
    ckpt = out / LABEL / "seed0" / "checkpoint.pt"
    with tempfile.TemporaryFile() as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            torchrun_cmd(out, epochs, train_subset, max_restarts),
            env=child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        killed_at = None
        rng = random.Random(seed)
        try:
            if kill_rank is not None:
                while proc.poll() is None and time.monotonic() - t0 < timeout:
                    if ckpt.exists():
                        break
                    time.sleep(0.01)
                first = time.monotonic()
                # wait for a second checkpoint to time one epoch, then kill inside the next one
                mtime = ckpt.stat().st_mtime if ckpt.exists() else 0.0
                while proc.poll() is None and time.monotonic() - first < timeout:
                    if ckpt.exists() and ckpt.stat().st_mtime != mtime:
                        break
                    time.sleep(0.01)
                epoch_s = time.monotonic() - first
                time.sleep(rng.uniform(0.1, 0.8) * epoch_s)
                pid = worker_pid(proc.pid, kill_rank)
                if proc.poll() is None and pid is not None:
                    killed_at = int(torch.load(ckpt, weights_only=True)["epoch"])
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.seek(0)
        text = log.read().decode(errors="replace")
    return {
        "returncode": proc.returncode,
        "killed_at_epoch": killed_at,
        "log": text,
        "seconds": time.monotonic() - t0,
    }


def final_state(out: Path) -> dict[str, Any]:
    """Results (without timings) and final checkpoint of a job's run."""
    run = out / LABEL / "seed0"
    res = json.loads((run / "results.json").read_text())
    hist = [{k: v for k, v in h.items() if not k.endswith("_time_s")} for h in res["history"]]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    return {"results": res, "history": hist, "checkpoint": ckpt}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def same_run(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """What differs between two :func:`final_state` results (empty: identical)."""
    diff = []
    if got["history"] != want["history"]:
        diff.append("history")
    for key in ("final_test_accuracy", "final_test_loss"):
        if got["results"][key] != want["results"][key]:
            diff.append(key)
    for key in ("labeler", "optimizer", "gen_optimizer", "scheduler", "epoch"):
        if not _equal(got["checkpoint"][key], want["checkpoint"][key]):
            diff.append(f"checkpoint {key}")
    return diff


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tries", type=int, default=10)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--train-subset", type=int, default=4, help="training images per digit")
    p.add_argument("--kill-rank", type=int, default=None, help="default: alternate 1, 0")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per job")
    p.add_argument("--out", default=None, help="keep the jobs' folders here")
    p.add_argument("--keep-logs", action="store_true", help="print the log of failed tries")
    args = p.parse_args(argv)

    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="auxgen-faults-"))
    base.mkdir(parents=True, exist_ok=True)
    kw = {"epochs": args.epochs, "train_subset": args.train_subset, "timeout": args.timeout}
    ref = run_job(base / "reference", **kw)
    if ref["returncode"] != 0:
        print(ref["log"][-3000:])
        print(f"reference job failed with exit status {ref['returncode']}")
        return 2
    want = final_state(base / "reference")
    print(f"reference: {ref['seconds']:.1f}s, accuracy {want['results']['final_test_accuracy']}")
    ok = 0
    for i in range(args.tries):
        rank = args.kill_rank if args.kill_rank is not None else (1 - i % 2)
        out = base / f"try{i}"
        shutil.rmtree(out, ignore_errors=True)
        job = run_job(out, kill_rank=rank, seed=i, **kw)
        why = ""
        if job["killed_at_epoch"] is None:
            why = "no kill (job ended first)"
        elif job["returncode"] != 0:
            tail = [ln for ln in job["log"].splitlines() if "rror" in ln][-1:]
            why = f"exit {job['returncode']}: {tail[0][:160] if tail else '?'}"
        else:
            got = final_state(out)
            if got["results"]["resumed_from_epoch"] is None:
                why = "did not resume"
            else:
                diff = same_run(got, want)
                why = f"differs in {', '.join(diff)}" if diff else ""
        ok += not why
        status = "identical" if not why else f"FAILED ({why})"
        print(
            f"try {i}: killed rank {rank} after checkpoint of epoch {job['killed_at_epoch']}, "
            f"{job['seconds']:.1f}s: {status}",
            flush=True,
        )
        if why and args.keep_logs:
            print(job["log"][-4000:])
    print(f"{ok}/{args.tries} restarts ended identical to the uninterrupted run")
    return 0 if ok == args.tries else 1


if __name__ == "__main__":
    sys.exit(main())
