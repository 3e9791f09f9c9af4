"""Evidence on a GPU from one command: the low-data regimes on a CIFAR ResNet-18 with several
seeds, and what a step costs in milliseconds.

Two parts, one JSON summary (``--out``), one log (``--log``) and a printed table:

1. **Step cost** (:func:`step_costs`): a plain step against ``AuxiliaryLabeler.step`` with
   MAXL (exact, first order, every 4 steps) and with the rotation task, for a ResNet-18 at
   32x32 and a ViT-S/16 at 224x224, batch 128, bf16 autocast, with and without
   ``torch.compile``, side by side in one process: median milliseconds and peak memory. A
   configuration that fails is recorded with its error and the rest goes on.
2. **Regimes** (:data:`REGIMES`): CIFAR-100 5% with crop + flip, ResNet-18 with a CIFAR stem,
   batch 128, SGD (momentum 0.9) with one-cycle: the 100 fine classes (AuxiLearn's setting,
   ``psi = 5``) and the 10-class level. Every (regime, method, seed) is one ``auxgen``
   training run; ``--parallel`` of them run at once (small models do not fill a large GPU).
   Settings are fixed in advance from the CPU results (nothing is tuned on test).

**Time.** The whole command must fit ``--budget-s`` (default 420 s). After the step costs, the
measured milliseconds of each method's step give the time of every run; the number of epochs
is the largest (at most ``--epochs``) whose planned time fits what is left, and runs that
would not fit are not started. With ``--min-epochs`` the plan keeps at least that many
epochs and drops trailing seeds instead (a budget where single-task has converged matters
more than a fifth seed). The plan and the times actually taken are in the summary.

Usage::

    python benchmarks/gpu_data.py --data-dir ~/data --out gpu_payload --wheels  # here, first
    bash benchmarks/gpu_evidence.sh       # on the GPU machine: wheels, then this script
    python benchmarks/gpu_evidence.py --device cpu --smoke --data-dir gpu_payload/data

At a converged budget (AuxiLearn's 100 classes, 100 epochs; single-task, the rotation task
and its 1.5x form; step costs from the first command)::

    bash benchmarks/gpu_evidence.sh --regimes fine100 --epochs 100 --min-epochs 100 \\
        --methods single transform transform-onehalf --parallel 15 --speedup 1.8 \\
        --step-costs-from docs/results/gpu_evidence.json --budget-s 400

(``--speedup 1.8``: what ten parallel runs gained over one after another in
``docs/results/gpu_evidence_long.json``: 333 s of planned runs took 182 s.)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path
from typing import Any, Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

__all__ = ["REGIMES", "STEP_CONFIGS", "step_costs", "plan_epochs", "run_regimes", "main"]

logger = logging.getLogger("gpu_evidence")

#: The best method without extra labels, chosen on the CPU regimes' validation accuracy.
BEST = "transform"
#: regime -> (``auxgen run`` settings, methods)
REGIMES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "fine100": ({"primary_level": 100, "psi": 5}, ["single", "random", "maxl-copy", BEST]),
    "coarse10": ({"primary_level": 10}, ["single", "human", "maxl-copy", BEST]),
}
#: Shared settings of every run (``RunConfig`` fields).
RUN = {
    "dataset": "cifar100", "backbone": "cifar_resnet18", "train_subset": None,
    "val_fraction": 0.2, "augment": True, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
    "weight_decay": 5e-4, "schedule": "onecycle", "gen_lr": 1e-3, "progress": False,
    "checkpoint": False,  # a checkpoint per epoch would cost more than the epoch on a GPU
}  # fmt: skip
#: Step-cost configurations: ``None`` is the plain step, else AuxiliaryLabeler options.
STEP_CONFIGS: dict[str, Optional[dict[str, Any]]] = {
    "plain": None,
    "maxl_exact": {"meta": "second_order", "generator": "copy"},
    "maxl_first_order": {"meta": "first_order", "generator": "copy"},
    "maxl_every4": {"meta": "second_order", "meta_every": 4, "generator": "copy"},
    "transform": {"transform": {"views": "all"}},
    "transform_one": {"transform": {"views": "one"}},
    "transform_onehalf": {"transform": {"views": "one", "fraction": 0.5}},
}
#: Which step-cost configuration times each method's step (for the time plan).
METHOD_STEP = {"single": "plain", "human": "plain", "random": "plain", "maxl-copy": "maxl_exact"}


# ----------------------------------------------------------------------------- step cost
def _runner(model_name: str, config: str, x: torch.Tensor, y: torch.Tensor, compile_: bool):
    from step_cost import CONFIGS, build_runner

    CONFIGS.setdefault(config, STEP_CONFIGS[config])
    runner = build_runner(
        model_name, config, x, y, num_classes=100, psi=5, seed=0, image_size=x.shape[-1]
    )
    if compile_:
        for m in runner.modules:
            inner = getattr(m, "model", m)
            inner.compile()
    return runner


def _time(step: Callable[[], None], device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def step_costs(
    models: dict[str, tuple[str, int]],
    device: torch.device,
    *,
    batch: int,
    repeats: int,
    warmup: int,
    compile_modes: tuple[bool, ...],
    bf16: bool,
    compile_configs: tuple[str, ...] = ("plain", "transform"),
    deadline: float = math.inf,
) -> list[dict[str, Any]]:
    """Median ms per step and peak memory of every configuration, side by side.

    Args:
        models: label -> (``benchmarks/models.build_model`` name, image size).
        device: where to run.
        batch: batch size.
        repeats: measured steps per configuration (medians reported).
        warmup: unmeasured steps first (compilation happens there).
        compile_modes: ``(False, True)`` to also measure ``torch.compile``'d models.
        bf16: run the steps under bf16 autocast.
        compile_configs: the configurations measured compiled (compiling takes a while).
        deadline: a ``time.time()`` after which the remaining configurations are skipped
            (recorded as such), so that the training runs keep their share of the budget.
    """
    rows = []
    for label, (name, size) in models.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=g).to(device)
        y = (torch.arange(batch) % 100).to(device)
        for compile_ in compile_modes:
            for config in STEP_CONFIGS:
                if compile_ and config not in compile_configs:
                    continue
                row: dict[str, Any] = {"model": label, "config": config, "compile": compile_}
                if time.time() > deadline:
                    row["error"] = "skipped: the step-cost share of the budget was spent"
                    rows.append(row)
                    continue
                try:
                    row.update(
                        _measure(name, config, x, y, compile_, device, repeats, warmup, bf16)
                    )
                except Exception as e:  # noqa: BLE001 - recorded, the rest goes on
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                logger.info("step cost %s", row)
                rows.append(row)
    return rows


def _measure(name, config, x, y, compile_, device, repeats, warmup, bf16) -> dict[str, Any]:
    runner = _runner(name, config, x, y, compile_)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        with ctx:
            runner.step()

    t0 = time.perf_counter()
    _time(step, device, warmup)
    first_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = _time(step, device, repeats * runner.cycle)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    # the median is a typical step; the mean over whole meta_every cycles is the amortised cost
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
            "min_ms": min(times), "peak_mb": peak, "warmup_s": first_s}  # fmt: skip


# -------------------------------------------------------------------------------- regimes
def _units(a: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(regime, method, seed) of every run, seeds outermost (a deadline cuts whole seeds).
    ``--methods`` replaces each regime's own methods."""
    return [(r, m, s) for s in a.seeds for r, (_, methods) in REGIMES.items()
            for m in (a.methods or methods) if not a.regimes or r in a.regimes]  # fmt: skip


def _config(regime: str, method: str, seed: int, a: argparse.Namespace, epochs: int):
    from auxgen.experiments.config import RunConfig

    fields = {**RUN, **REGIMES[regime][0], "data_dir": a.data_dir, "device": a.device}
    # one CPU thread per run on CPU; on a GPU, the machine's cores shared among the parallel runs
    threads = 1 if a.device == "cpu" else max(1, (os.cpu_count() or 2) // a.parallel)
    fields.update(epochs=epochs, seed=seed, smoke=a.smoke, threads=threads)
    fields["out_dir"] = str(Path(a.work) / regime / method / f"seed{seed}")
    if a.smoke:
        fields.update(backbone="cnn", width=8, batch_size=16)
    return RunConfig(**fields).with_method(method)


def plan_epochs(
    units: list[tuple[str, str, int]],
    step_ms: dict[str, float],
    steps_per_epoch: dict[str, int],
    *,
    budget_s: float,
    parallel: int,
    max_epochs: int,
    overhead_s: float,
    speedup: Optional[float] = None,
) -> tuple[int, float]:
    """The most epochs (at most ``max_epochs``) whose planned time fits ``budget_s``.

    A run's time is ``overhead_s + epochs * steps_per_epoch * ms / 1000``; ``parallel`` runs
    share the device and together go ``speedup`` times faster than one after another (at
    most ``parallel``, the default), so the plan is the sum over runs divided by it, and
    never less than the longest run.

    Returns:
        ``(epochs, planned seconds)``; epochs is 0 when not even one epoch fits.

    Example:
        >>> plan_epochs([("a", "single", 0)] * 4, {"single": 10.0}, {"a": 20}, budget_s=100,
        ...             parallel=2, max_epochs=200, overhead_s=5)
        (90, 100.0)
    """

    gain = parallel if speedup is None else min(speedup, parallel)

    def planned(epochs: int) -> float:
        each = [overhead_s + epochs * steps_per_epoch[r] * step_ms[m] / 1000 for r, m, _ in units]
        return max(sum(each) / gain, max(each))

    epochs = max_epochs
    while epochs > 0 and planned(epochs) > budget_s:
        epochs = int(epochs * 0.9) if epochs > 10 else epochs - 1
    return epochs, round(planned(epochs), 1) if epochs else 0.0


def _unit(regime: str, method: str, seed: int, cfg: Any) -> dict[str, Any]:
    """One training run (in a worker process)."""
    import warnings

    from auxgen.experiments.training import train

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the payload's md5 differs from the release's
        res = train(cfg)
    aux = res.get("aux", {})
    return {"regime": regime, "method": method, "seed": seed, "label": res["label"],
            "test": res["final_test_accuracy"], "val": res["final_val_accuracy"],
            "aggregated_test": aux.get("aggregated_test_accuracy"),
            "wall_s": res["wall_time_s"], "epochs": cfg.epochs}  # fmt: skip


def run_regimes(
    a: argparse.Namespace,
    epochs: int,
    deadline: float,
    on_result: Callable[[list[dict[str, Any]]], None],
) -> list[dict[str, Any]]:
    """Every unit, ``a.parallel`` at a time; units not started by the deadline are skipped.
    ``on_result`` gets the results so far after every finished run."""
    import multiprocessing as mp

    units = _units(a)
    results: list[dict[str, Any]] = []
    pool = ProcessPoolExecutor(a.parallel, mp_context=mp.get_context("spawn"))
    futures = {
        pool.submit(_unit, r, m, s, _config(r, m, s, a, epochs)): (r, m, s) for r, m, s in units
    }
    try:
        for fut in as_completed(futures, timeout=max(1.0, deadline - time.time())):
            r, m, s = futures[fut]
            try:
                results.append(fut.result())
            except Exception as e:  # noqa: BLE001 - recorded in the summary
                results.append({"regime": r, "method": m, "seed": s, "error": repr(e)[:300]})
            logger.info("run %s", results[-1])
            on_result(results)
    except FuturesTimeout:
        late = [futures[f] for f in futures if not f.done()]
        logger.info("deadline: %d runs not finished, stopped", len(late))
        results += [{"regime": r, "method": m, "seed": s, "error": "not finished by the deadline"}
                    for r, m, s in late]  # fmt: skip
        on_result(results)
    finally:  # never wait for runs past the deadline: the command must end in time
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.terminate()
    return results


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per regime and method: mean ± std over seeds and the paired difference to single."""
    rows = []
    for regime in REGIMES:
        methods = list(dict.fromkeys(r["method"] for r in results if r.get("regime") == regime))
        single = {r["seed"]: r["test"] for r in results if r.get("regime") == regime
                  and r.get("method") == "single" and "test" in r}  # fmt: skip
        for method in methods:
            mine = [r for r in results if r.get("regime") == regime and r.get("method") == method
                    and "test" in r]  # fmt: skip
            if not mine:
                continue
            acc = [100 * r["test"] for r in mine]
            paired = [100 * (r["test"] - single[r["seed"]]) for r in mine if r["seed"] in single]
            rows.append({
                "regime": regime, "method": method, "seeds": [r["seed"] for r in mine],
                "test_mean": statistics.fmean(acc),
                "test_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "paired_mean": statistics.fmean(paired) if paired else None,
                "paired_std": statistics.stdev(paired) if len(paired) > 1 else None,
                "wall_s_mean": statistics.fmean(r["wall_s"] for r in mine),
            })  # fmt: skip
    return rows


def _table(costs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<10} {'config':<18} {'compile':<8} {'ms':>9} {'x plain':>8} {'peak MB':>9}"]
    plain = {
        (c["model"], c["compile"]): c.get("median_ms") for c in costs if c["config"] == "plain"
    }
    for c in costs:
        if "error" in c:
            lines.append(
                f"{c['model']:<10} {c['config']:<18} {c['compile']!s:<8} {c['error'][:60]}"
            )
            continue
        base = plain.get((c["model"], c["compile"]))
        ratio = c["median_ms"] / base if base else math.nan
        peak = f"{c['peak_mb']:.0f}" if c.get("peak_mb") is not None else "-"
        lines.append(
            f"{c['model']:<10} {c['config']:<18} {c['compile']!s:<8} {c['median_ms']:>9.1f} "
            f"{ratio:>8.2f} {peak:>9}"
        )
    lines.append("")
    lines.append(f"{'regime':<9} {'method':<18} {'test %':>14} {'vs single':>14} {'seeds':>6}")
    for r in rows:
        paired = "-" if r["paired_mean"] is None else (
            f"{r['paired_mean']:+.2f} ± {r['paired_std'] or 0:.2f}")  # fmt: skip
        lines.append(
            f"{r['regime']:<9} {r['method']:<18} {r['test_mean']:>7.2f} ± {r['test_std']:<4.2f} "
            f"{paired:>14} {len(r['seeds']):>6}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="gpu_payload/data")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="gpu_out/gpu_evidence.json")
    p.add_argument("--log", default=None, help="default: next to --out")
    p.add_argument("--work", default="gpu_out/runs", help="the runs' folders")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), help="default: all")
    p.add_argument(
        "--methods", nargs="+", help="replace each regime's methods (default: the regime's)"
    )
    p.add_argument("--step-costs-from", help="a previous summary JSON: reuse its step costs")
    p.add_argument("--epochs", type=int, default=200, help="at most; fewer if over budget")
    p.add_argument(
        "--min-epochs",
        type=int,
        default=0,
        help="at least (up to --epochs): fewer seeds rather than fewer epochs if over budget",
    )
    p.add_argument("--parallel", type=int, default=8, help="runs at once on the device")
    p.add_argument("--budget-s", type=float, default=420.0, help="for the whole command")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument(
        "--speedup",
        type=float,
        default=3.0,
        help="assumed throughput gain of --parallel runs at once (for the plan)",
    )
    p.add_argument(
        "--plan-only",
        action="store_true",
        help="measure the step costs, print the plan (steps x ms), train nothing",
    )
    p.add_argument("--smoke", action="store_true", help="tiny models and data: seconds, on CPU")
    return p


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run both parts; write the JSON summary and the log; print the table."""
    a = _parser().parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    handlers = [logging.FileHandler(a.log or out.with_suffix(".log")), logging.StreamHandler()]
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        return _main(a, out, argv)
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()


def _main(a: argparse.Namespace, out: Path, argv: Optional[list[str]]) -> dict[str, Any]:
    t_start = time.time()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    models = {"tiny": ("tiny", 16)} if a.smoke else {
        "resnet18": ("cifar_resnet18", 32), "vit_s16": ("vit_small_patch16_224", 224)}  # fmt: skip
    if a.step_costs_from:  # a second run that trains only: the step costs of an earlier one
        costs = json.loads(Path(a.step_costs_from).read_text())["step_costs"]
    else:
        costs = step_costs(
            models, device, batch=8 if a.smoke else 128, repeats=3 if a.smoke else 10,
            warmup=1 if a.smoke else 3, compile_modes=(False,) if a.no_compile or a.smoke else
            (False, True), bf16=device.type == "cuda", deadline=t_start + 0.4 * a.budget_s,
        )  # fmt: skip
    units = _units(a)
    step_ms = _method_ms(costs, "tiny" if a.smoke else "resnet18", [m for _, m, _ in units])
    per_epoch = _steps_per_epoch(a)
    left = a.budget_s - (time.time() - t_start) - 15  # the summary and the pool's start
    plan = {"step_ms": step_ms, "steps_per_epoch": per_epoch, "budget_s": left,
            "parallel": a.parallel, "overhead_s": 20.0 if device.type == "cuda" else 5.0,
            "speedup": a.speedup}  # fmt: skip
    max_epochs = 1 if a.smoke else a.epochs
    epochs, planned = plan_epochs(units, max_epochs=max_epochs, **plan)
    if a.min_epochs and epochs < min(a.min_epochs, max_epochs):
        # fewer seeds at the epochs asked rather than every seed at fewer epochs
        a.seeds, epochs, planned = seeds_at(a, min(a.min_epochs, max_epochs), plan)
        units = _units(a)
    logger.info("plan: %d runs x %d epochs, %.0f s planned of %.0f s left", len(units), epochs,
                planned, left)  # fmt: skip
    report = {
        "command": " ".join(["python", "benchmarks/gpu_evidence.py", *(argv or sys.argv[1:])]),
        "device": gpu, "torch": torch.__version__, "settings": RUN, "regimes": REGIMES,
        "step_costs": costs, "step_ms_used_for_the_plan": step_ms,
        "plan": {"epochs": epochs, "planned_s": planned, "seeds": a.seeds,
                 "min_epochs": a.min_epochs, "parallel": a.parallel,
                 "speedup": a.speedup, "runs": len(units), "budget_s": a.budget_s,
                 "steps_per_epoch": per_epoch},
        "runs": [], "summary": [], "wall_s": time.time() - t_start,
    }  # fmt: skip

    def write(results: list[dict[str, Any]]) -> None:  # after every run: a timeout keeps them
        report.update(runs=results, summary=summarise(results), wall_s=time.time() - t_start)
        out.write_text(json.dumps(report, indent=1) + "\n")

    write([])
    if epochs and not a.plan_only:
        run_regimes(a, epochs, t_start + a.budget_s - 10, write)
    write(report["runs"])
    rows = report["summary"]
    print(_table(costs, rows))
    print(f"{gpu}: {report['wall_s']:.0f} s in all, {epochs} epochs; wrote {out}")
    return report


def _method_ms(costs: list[dict[str, Any]], model: str, methods: list[str]) -> dict[str, float]:
    """Milliseconds per step of each method (those of :data:`METHOD_STEP` and ``methods``),
    from the uncompiled step costs of ``model``; a transform form without a measured
    configuration is planned at the four views' cost, any other method at 5 plain steps."""
    ms = {c["config"]: c["median_ms"] for c in costs
          if c["model"] == model and not c["compile"] and "median_ms" in c}  # fmt: skip
    plain = ms.get("plain", 1.0)
    out = {m: ms.get(cfg, 4 * plain) for m, cfg in METHOD_STEP.items()}
    for m in methods:
        if m.startswith("transform"):  # its own form's cost, else the four views' (the most)
            own = m.replace("-", "_") if m in ("transform-one", "transform-onehalf") else None
            out[m] = ms.get(own or "transform", ms.get("transform", 5 * plain))
        elif m not in out:
            out[m] = 5 * plain
    return out


def seeds_at(
    a: argparse.Namespace, epochs: int, plan: dict[str, Any]
) -> tuple[list[int], int, float]:
    """The most leading seeds of ``a.seeds`` whose runs fit the plan at ``epochs`` epochs.

    Returns:
        ``(seeds, epochs, planned seconds)``; ``([], 0, 0.0)`` if not even one seed fits.
    """
    seeds = list(a.seeds)
    while seeds:
        units = _units(argparse.Namespace(**{**vars(a), "seeds": seeds}))
        fit, planned = plan_epochs(units, max_epochs=epochs, **plan)
        if fit == epochs:
            return seeds, epochs, planned
        seeds.pop()
    return [], 0, 0.0


def _steps_per_epoch(a: argparse.Namespace) -> dict[str, int]:
    """Training steps per epoch of each regime (80% of 5% of 50,000 images: 2,000)."""
    n = 16 * 100 if a.smoke else 2000
    batch = 16 if a.smoke else RUN["batch_size"]
    return {r: math.ceil(n / batch) for r in REGIMES}


if __name__ == "__main__":
    main()
