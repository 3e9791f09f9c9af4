"""Cost of one MAXL training step (auxgen) relative to a plain single-task step.

For each model and each configuration (a plain single-task SGD step, and
``AuxiliaryLabeler.step`` with ``second_order``, ``first_order``, ``second_order`` with
``meta_every=4`` and ``generator="head"``) this measures, in one process:

* the time per step: the configurations are measured round-robin, and a single-task
  measurement sits between every two MAXL measurements, so each MAXL measurement is paired
  with the single-task measurements just before and just after it. The reported ratio is
  the median over rounds of ``t_config / mean(t_single_before, t_single_after)``, which
  cancels slow drifts in machine load; the ratio of the medians is recorded too.
  A measurement of a configuration with ``meta_every=k`` covers ``k`` steps (one full
  cycle: one meta step and ``k - 1`` cheap steps), so it is the amortised cost per step.
* the peak memory of a step: the bytes of the configuration's own persistent tensors
  (parameters, buffers, gradients, optimiser state) plus the peak of the tensor memory
  allocated on top of them during a step (a full ``meta_every`` cycle). On CUDA the peak
  comes from ``torch.cuda.max_memory_allocated``; on CPU from the allocation and free
  events of ``torch.profiler`` (``profile_memory=True``), which sees every tensor the CPU
  allocator hands out (Python-side ``tracemalloc`` cannot).

``--profile`` instead times the phases of one step (generator forward/backward, model
forward/backward at theta, look-ahead forward/backward at theta_plus, the Jacobian-vector
product, optimiser steps, bookkeeping) by wrapping the library's functions from the
outside, and ``--top-ops K`` lists the ``K`` most expensive operators from
``torch.profiler``.

Example::

    python benchmarks/step_cost.py --models vgg16 --repeats 5 --out step_cost.json --plot c.png
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # run as ``python benchmarks/step_cost.py`` or imported as ``benchmarks.step_cost``
    from .models import build_model
except ImportError:  # pragma: no cover - depends on how the script is started
    from models import build_model  # type: ignore[no-redef]

__all__ = ["CONFIGS", "TARGETS", "MAXL_ORIGINAL", "run_benchmark", "run_profile", "main"]

#: Configurations: ``None`` is the plain single-task step, otherwise ``AuxiliaryLabeler``
#: keyword arguments.
#: The paper's same-size ``copy`` generator is named explicitly; ``head_*`` use the
#: library's default generator (an MLP on the model's detached features).
CONFIGS: dict[str, Optional[dict[str, Any]]] = {
    "single": None,
    "second_order": {"meta": "second_order", "generator": "copy"},
    "first_order": {"meta": "first_order", "generator": "copy"},
    "second_order_every4": {"meta": "second_order", "meta_every": 4, "generator": "copy"},
    "head_second_order": {"meta": "second_order", "generator": "head"},
    "head_first_order": {"meta": "first_order", "generator": "head"},
    "head_second_order_every4": {"meta": "second_order", "meta_every": 4, "generator": "head"},
    # labels from the four rotations (TransformLabels, both heads): every view, one per image,
    # and with MAXL's head generator as a second task
    "transform": {"transform": {"views": "all"}},
    "transform_one": {"transform": {"views": "one"}},
    "transform_maxl": {"transform": {"views": "all"}, "generator": "head"},
    # SLA's joint labels with self-distillation; MAXL's sub-labels inside the (class,
    # rotation) cells (GeneratedCellLabels, with the copy generator of docs/results.md's
    # runs); the rotation task's weight learned by the meta-gradient (LearnedWeight: Auto-λ)
    "transform_sd": {"transform": {"form": "joint", "distill": 1.0}},
    "transform_cells": {"transform": {"views": "all"}, "cells": "copy"},
    "transform_autol": {"transform": {"views": "all"}, "learned_weight": True},
    # the loss form in the user's own loop: zero_grad, labeler(x, y)["loss"].backward(),
    # (meta_step,) opt.step(), against labeler.step for the same task
    "transform_loss": {"transform": {"views": "all"}, "loop": "loss"},
    "head_second_order_loss": {"meta": "second_order", "generator": "head", "loop": "loss"},
    # cheaper forms of the rotation task: one view on half of each batch, every view on a
    # sixth of it; rotations of a square patch (any image shape); and the control of plain
    # training on four copies of each image (batch augmentation), all in the loss form
    "transform_onehalf": {"transform": {"views": "one", "fraction": 0.5}, "loop": "loss"},
    "transform_sixth": {"transform": {"views": "all", "fraction": 1 / 6}, "loop": "loss"},
    "transform_patch": {"transform": {"patch": 0.5}, "loop": "loss"},
    "batchaug": {"batch_views": 4},
}

#: Time-ratio targets (MAXL step / single-task step).
TARGETS: dict[str, float] = {
    "second_order": 3.5,
    "first_order": 3.2,
    "second_order_every4": 1.8,
}

#: Peak-memory target: ``second_order`` peak / single-task peak.
MEMORY_TARGET: tuple[str, float] = ("second_order", 2.5)

#: The original MAXL code's step-time ratios (VGG-16, batch 32, 32x32, 2 CPU threads).
MAXL_ORIGINAL: dict[str, float] = {
    "second_order": 9.1,
    "second_order_no_gradient_similarity": 7.7,
    "first_order": 8.5,
}

MB = 2.0**20


# --------------------------------------------------------------------------- runners
@dataclass
class Runner:
    """One configuration, ready to step on a fixed batch.

    Attributes:
        name: configuration name (a key of :data:`CONFIGS`).
        step: one training step on the fixed batch.
        cycle: steps per measurement (``meta_every``: one meta step per measurement).
        modules: modules whose parameters, buffers and gradients the step owns.
        optimizers: optimisers whose state the step owns.
        labeler: the ``AuxiliaryLabeler`` (``None`` for the single-task step).
    """

    name: str
    step: Callable[[], None]
    cycle: int
    modules: list[nn.Module]
    optimizers: list[torch.optim.Optimizer]
    labeler: Optional[nn.Module] = None

    def state_bytes(self) -> int:
        """Bytes of the persistent tensors: parameters, buffers, gradients, optimiser state."""
        seen: set[int] = set()
        total = 0

        def add(t: Any) -> None:
            nonlocal total
            if not isinstance(t, Tensor):
                return
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                return
            seen.add(storage.data_ptr())
            total += storage.nbytes()

        for m in self.modules:
            for p in m.parameters():
                add(p)
                add(p.grad)
            for b in m.buffers():
                add(b)
        for opt in self.optimizers:
            for st in opt.state.values():
                for v in st.values():
                    add(v)
        return total


def build_runner(
    model_name: str,
    config: str,
    x: Tensor,
    y: Tensor,
    *,
    num_classes: int,
    psi: int,
    seed: int,
    image_size: int = 32,
) -> Runner:
    """Build the model (same initialisation for every configuration) and its step."""
    from auxgen import (
        AuxiliaryLabeler,
        GeneratedCellLabels,
        GeneratedLabels,
        LearnedWeight,
        TransformLabels,
        patch_rotations,
    )

    torch.manual_seed(seed)
    model = build_model(model_name, num_classes, image_size).to(x.device).train()
    kwargs = CONFIGS[config]
    if kwargs is not None and "batch_views" in kwargs:  # plain training on k copies
        k = kwargs["batch_views"]
        x, y = x.repeat(k, *([1] * (x.dim() - 1))), y.repeat(k)
        kwargs = None
    if kwargs is None:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def plain_step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return Runner(config, plain_step, 1, [model], [opt])

    options = dict(kwargs)
    transform = options.pop("transform", None)
    maxl = {k: options.pop(k) for k in ("generator",) if k in options}
    cells = options.pop("cells", None)
    learned_weight = options.pop("learned_weight", False)
    loop = options.pop("loop", "step")
    tasks: list[Any] = []
    if transform is not None:
        transform = dict(transform)
        if "patch" in transform:
            transform["transforms"] = patch_rotations(transform.pop("patch"))[0]
        task = TransformLabels(**transform)
        tasks.append(LearnedWeight(task) if learned_weight else task)
    if cells is not None:
        tasks.append(GeneratedCellLabels([psi] * num_classes, generator=cells))
    if maxl or transform is None:
        tasks.append(GeneratedLabels([psi] * num_classes, **maxl))
    labeler = AuxiliaryLabeler(model, tasks=tasks, **options).to(x.device).train()
    opt = torch.optim.SGD(labeler.model_parameters(), lr=0.01, momentum=0.9)
    gen_params = labeler.generator_parameters()
    gen_opt = torch.optim.SGD(gen_params, lr=1e-3, weight_decay=5e-4) if gen_params else None
    optimizers = [opt] if gen_opt is None else [opt, gen_opt]

    def labeler_step() -> None:
        labeler.step(x, y, opt, gen_opt)

    def loss_form_step() -> None:
        opt.zero_grad(set_to_none=True)
        labeler(x, y)["loss"].backward()
        if gen_opt is not None:
            labeler.meta_step(opt, gen_opt)
        opt.step()

    if loop == "loss":
        return Runner(config, loss_form_step, labeler.meta_every, [labeler], optimizers, labeler)

    return Runner(config, labeler_step, labeler.meta_every, [labeler], optimizers, labeler)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(runner: Runner, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` rounded up to whole ``meta_every`` cycles."""
    n = runner.cycle * max(1, math.ceil(steps / runner.cycle))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        runner.step()
    _sync(device)
    return (time.perf_counter() - t0) / n


# --------------------------------------------------------------------------- memory
@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the C++ profiler's log lines on file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_BOUNDARY = "step_cost::boundary"


def _peak_after_boundary(prof: Any) -> int:
    """Peak of the running allocation total after the boundary marker, minus its level there."""
    events = prof.profiler.kineto_results.events()
    marks = [e.start_ns() for e in events if e.name() == _BOUNDARY]
    if not marks:
        raise RuntimeError("the step boundary is missing from the profile")
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    level = 0
    base: Optional[int] = None
    peak = 0
    for e in memory:
        if base is None and e.start_ns() >= marks[0]:
            base = peak = level
        level += e.nbytes()
        if base is not None:
            peak = max(peak, level)
    return 0 if base is None else peak - base


def transient_peak(runner: Runner, device: torch.device) -> int:
    """Peak bytes allocated during one ``meta_every`` cycle on top of the live tensors.

    One step runs first (unmeasured). On CPU it also runs under the profiler, so that every
    tensor the measured cycle frees has a recorded size: the profiler cannot see the size
    of a tensor allocated before it started, and would miss its free.
    """
    if device.type == "cuda":
        runner.step()
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(runner.cycle):
            runner.step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile, record_function

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step()
        with record_function(_BOUNDARY):
            pass
        for _ in range(runner.cycle):
            runner.step()
    return _peak_after_boundary(prof)


# --------------------------------------------------------------------------- benchmark
def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def run_benchmark(
    model_names: Sequence[str],
    configs: Sequence[str],
    *,
    device: torch.device,
    batch: int = 32,
    num_classes: int = 20,
    psi: int = 5,
    repeats: int = 5,
    warmup: int = 2,
    steps: int = 1,
    seed: int = 0,
    memory: bool = True,
    progress: bool = True,
    image_size: int = 32,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Time and measure every configuration for every model; see the module docstring.

    Returns:
        ``{model: {config: stats}}`` with ``median_ms``, ``min_ms``, ``times_ms``,
        ``ratio`` (median of paired ratios), ``ratio_of_medians``, ``ratio_of_mins``,
        ``paired_ratios`` and,
        with ``memory``, ``state_mb``, ``transient_mb``, ``peak_mb`` and ``memory_ratio``.
    """
    if "single" not in configs:
        configs = ["single", *configs]
    others = [c for c in configs if c != "single"]
    total = len(model_names) * (warmup + repeats) * max(1, len(others))
    bar = _progress(total, progress)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for model_name in model_names:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)
        y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
        runners = {
            c: build_runner(
                model_name,
                c,
                x,
                y,
                num_classes=num_classes,
                psi=psi,
                seed=seed,
                image_size=image_size,
            )  # fmt: skip
            for c in configs
        }
        single_times: list[float] = []
        times: dict[str, list[float]] = {c: [] for c in others}
        for r in range(warmup + repeats):
            keep = r >= warmup
            for c in others or ["single"]:
                t_single = time_block(runners["single"], steps, device)
                if keep:
                    single_times.append(t_single)
                if c != "single":
                    t = time_block(runners[c], steps, device)
                    if keep:
                        times[c].append(t)
                bar(f"{model_name} {c}")
        single_times.append(time_block(runners["single"], steps, device))  # closes the pairs
        k = len(others)
        out: dict[str, dict[str, Any]] = {}
        base = single_times[:-1] if k else single_times
        out["single"] = _stats(base, [1.0] * len(base), base)
        for j, c in enumerate(others):
            paired = [
                t / (0.5 * (single_times[i * k + j] + single_times[i * k + j + 1]))
                for i, t in enumerate(times[c])
            ]
            out[c] = _stats(times[c], paired, base)
        if memory:
            for c, runner in runners.items():
                state = runner.state_bytes()
                trans = transient_peak(runner, device)
                out[c].update(
                    state_mb=state / MB, transient_mb=trans / MB, peak_mb=(state + trans) / MB
                )
            for c in configs:
                out[c]["memory_ratio"] = out[c]["peak_mb"] / out["single"]["peak_mb"]
        results[model_name] = out
        del runners
    bar(None)
    return results


def _stats(
    times: Sequence[float], paired: Sequence[float], single: Sequence[float]
) -> dict[str, Any]:
    med = _median(times)
    return {
        "median_ms": 1e3 * med,
        "min_ms": 1e3 * min(times),
        "times_ms": [1e3 * t for t in times],
        "ratio": _median(paired),
        "ratio_of_medians": med / _median(single),
        "ratio_of_mins": min(times) / min(single),
        "paired_ratios": list(paired),
    }


def _progress(total: int, enabled: bool) -> Callable[[Optional[str]], None]:
    """A tqdm bar when available and enabled, else a no-op; call with ``None`` to close."""
    if not enabled:
        return lambda _desc: None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of auxgen
        return lambda _desc: None
    bar = tqdm(total=total, file=sys.stderr, leave=False)

    def update(desc: Optional[str]) -> None:
        if desc is None:
            bar.close()
            return
        bar.set_description(desc)
        bar.update(1)

    return update


# --------------------------------------------------------------------------- profile
class PhaseTimer:
    """Exclusive wall-clock time per named phase, with nesting (a stack of phases)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}
        self.stack: list[str] = []
        self.last = 0.0

    def _charge(self) -> None:
        _sync(self.device)
        now = time.perf_counter()
        if self.stack:
            top = self.stack[-1]
            self.totals[top] = self.totals.get(top, 0.0) + now - self.last
        self.last = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the time spent inside to ``name`` (minus nested phases)."""
        self._charge()
        self.stack.append(name)
        try:
            yield
        finally:
            self._charge()
            self.stack.pop()

    def top(self) -> str:
        return self.stack[-1] if self.stack else ""

    def wrap(self, fn: Callable[..., Any], name: Callable[[], str]) -> Callable[..., Any]:
        """``fn`` timed under the phase ``name()`` chosen at call time."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name()):
                return fn(*args, **kwargs)

        return wrapper


#: Phase names of the profile, in display order.
PHASES = (
    "checks + buffer snapshot",
    "generator fwd",
    "model fwd (theta)",
    "multi-task bwd (theta)",
    "finite checks",
    "buffer clones",
    "look-ahead step U(theta, G)",
    "look-ahead fwd (theta+)",
    "look-ahead bwd (theta+)",
    "look-ahead other",
    "optimiser VJP",
    "JVP fwd (forward-mode / shifted)",
    "JVP other (norms, rng)",
    "generator bwd (surrogate)",
    "meta other (entropy, surrogate)",
    "optimiser steps",
    "other (losses, labels)",
)


@contextlib.contextmanager
def instrument(runner: Runner, timer: PhaseTimer) -> Iterator[None]:
    """Wrap the library's functions and the runner's modules with phase timers.

    Nothing under ``auxgen/`` is edited: module attributes are replaced for the duration
    of the context and restored afterwards.
    """
    import auxgen.labeler as L
    import auxgen.meta as M

    labeler = runner.labeler
    assert labeler is not None
    patches: list[tuple[Any, str, Any, bool]] = []

    def patch(obj: Any, attr: str, new: Any) -> None:
        if not hasattr(obj, attr):  # the library changed: time this phase as its caller
            return
        on_instance = not isinstance(obj, types.ModuleType) and attr not in vars(obj)
        patches.append((obj, attr, getattr(obj, attr), on_instance))
        setattr(obj, attr, new)

    def model_phase() -> str:
        return {
            "step": "model fwd (theta)",
            "lookahead": "look-ahead fwd (theta+)",
            "jvp": "JVP fwd (forward-mode / shifted)",
        }.get(timer.top(), "model fwd (theta)")

    grad_calls = {"lookahead": 0}

    def grad_phase() -> str:
        top = timer.top()
        if top == "lookahead":
            grad_calls["lookahead"] += 1
            return "look-ahead bwd (theta+)" if grad_calls["lookahead"] % 2 else "optimiser VJP"
        if top == "meta":
            return "generator bwd (surrogate)"
        if top == "jvp":
            return "JVP bwd (double backward)"
        return "multi-task bwd (theta)"

    def fixed(name: str) -> Callable[[], str]:
        return lambda: name

    model = labeler.model  # type: ignore[union-attr]
    gen = labeler.generator  # type: ignore[union-attr]
    targets: list[tuple[Any, str, Callable[[], str]]] = [
        (model, "forward", model_phase),
        (gen, "forward", fixed("generator fwd")),
        (torch.autograd, "grad", grad_phase),
        (L, "lookahead_direction", fixed("lookahead")),
        (M, "lookahead", fixed("look-ahead step U(theta, G)")),
        (L, "meta_jvp", fixed("jvp")),
        (L, "_all_finite", fixed("finite checks")),
        (L, "check_optimizer", fixed("checks + buffer snapshot")),
        (labeler, "_meta_gradient", fixed("meta")),
        (labeler, "_check_batch", fixed("checks + buffer snapshot")),
        (labeler, "_snapshot_buffers", fixed("checks + buffer snapshot")),
        (labeler, "_model_buffers", fixed("buffer clones")),
    ]
    targets += [(opt, "step", fixed("optimiser steps")) for opt in runner.optimizers]
    for obj, attr, name in targets:
        if hasattr(obj, attr):
            patch(obj, attr, timer.wrap(getattr(obj, attr), name))
    try:
        yield
    finally:
        for obj, attr, old, on_instance in reversed(patches):
            if on_instance:
                delattr(obj, attr)  # back to the class attribute
            else:
                setattr(obj, attr, old)


_RENAME = {
    "step": "other (losses, labels)",
    "lookahead": "look-ahead other",
    "jvp": "JVP other (norms, rng)",
    "meta": "meta other (entropy, surrogate)",
}


def profile_step(runner: Runner, device: torch.device) -> dict[str, float]:
    """Seconds per phase of one step of a MAXL ``runner`` (see :data:`PHASES`)."""
    timer = PhaseTimer(device)
    with instrument(runner, timer), timer.phase("step"):
        runner.step()
    out: dict[str, float] = {}
    for k, v in timer.totals.items():
        name = _RENAME.get(k, k)
        out[name] = out.get(name, 0.0) + v
    return out


def profile_plain(runner: Runner, x: Tensor, y: Tensor, device: torch.device) -> dict[str, float]:
    """Seconds per phase (forward, backward, optimiser) of one plain single-task step."""
    timer = PhaseTimer(device)
    model, opt = runner.modules[0], runner.optimizers[0]
    with timer.phase("step"):
        with timer.phase("zero_grad"):
            opt.zero_grad(set_to_none=True)
        with timer.phase("model fwd"):
            loss = F.cross_entropy(model(x), y)
        with timer.phase("model bwd"):
            loss.backward()
        with timer.phase("optimiser step"):
            opt.step()
    return timer.totals


def run_profile(
    model_name: str,
    configs: Sequence[str],
    *,
    device: torch.device,
    batch: int = 32,
    num_classes: int = 20,
    psi: int = 5,
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
    top_ops: int = 0,
) -> dict[str, Any]:
    """Median time per phase of one step, for the plain step and each MAXL config.

    Configurations are profiled round-robin (one step each per round, after ``warmup``
    rounds); a ``meta_every > 1`` configuration is profiled on the step after a meta step
    (a cheap step: the meta steps are those of the ``meta_every=1`` configuration).

    Returns:
        ``{config: {phase: median_ms}}`` plus, with ``top_ops``, ``{"top_ops": {config:
        table}}`` from ``torch.profiler`` (self CPU time of the most expensive operators).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    names = ["single", *[c for c in configs if c != "single"]]
    runners = {
        c: build_runner(model_name, c, x, y, num_classes=num_classes, psi=psi, seed=seed)
        for c in names
    }
    samples: dict[str, list[dict[str, float]]] = {c: [] for c in names}
    for r in range(warmup + repeats):
        for c, runner in runners.items():
            if c == "single":
                prof = profile_plain(runner, x, y, device)
            else:
                # meta_every=1: every step is a meta step; otherwise profile a cheap step
                want = 0 if runner.cycle == 1 else 1
                while runner.labeler._steps % runner.cycle != want:  # type: ignore[union-attr]
                    runner.step()
                prof = profile_step(runner, device)
            if r >= warmup:
                samples[c].append(prof)
    out: dict[str, Any] = {}
    for c, profs in samples.items():
        keys = sorted({k for p in profs for k in p})
        out[c] = {k: 1e3 * _median([p.get(k, 0.0) for p in profs]) for k in keys}
        out[c]["total"] = 1e3 * _median([sum(p.values()) for p in profs])
    if top_ops:
        from torch.profiler import profile

        tables: dict[str, str] = {}
        for c, runner in runners.items():
            with _quiet_stderr(), profile(activities=_activities(device)) as prof:
                runner.step()
            sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            tables[c] = prof.key_averages().table(sort_by=sort, row_limit=top_ops)
        out["top_ops"] = tables
    return out


def _activities(device: torch.device) -> list[Any]:
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    return acts


# --------------------------------------------------------------------------- reporting
def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """Torch version, device, thread count, CPU model and platform."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": str(device),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A plain-text table: median/min ms, ratios, targets and memory per model and config."""
    head = (
        f"{'model':<10} {'config':<20} {'median ms':>10} {'min ms':>9} {'ratio':>6} "
        f"{'r(med)':>6} {'r(min)':>6} {'target':>13} {'peak MB':>8} {'mem x':>6}"
    )
    lines = [head, "-" * len(head)]
    for model, per in results.items():
        for c, s in per.items():
            target = TARGETS.get(c)
            tgt = f"<={target:g}" if target else ""
            if c == MEMORY_TARGET[0]:
                tgt += f" m<={MEMORY_TARGET[1]:g}"
            peak = f"{s['peak_mb']:8.1f}" if "peak_mb" in s else f"{'-':>8}"
            mem = f"{s['memory_ratio']:6.2f}" if "memory_ratio" in s else f"{'-':>6}"
            lines.append(
                f"{model:<10} {c:<20} {s['median_ms']:10.1f} {s['min_ms']:9.1f} "
                f"{s['ratio']:6.2f} {s['ratio_of_medians']:6.2f} {s['ratio_of_mins']:6.2f} "
                f"{tgt:>13} {peak} {mem}"
            )
    return "\n".join(lines)


def format_profile(profile: dict[str, Any]) -> str:
    """Phase table (median ms per phase) of :func:`run_profile`'s result for one model."""
    configs = [c for c in profile if c not in ("single", "top_ops")]
    width = max(len(p) for p in PHASES) + 2
    lines = [f"{'phase':<{width}}" + "".join(f"{c:>22}" for c in configs)]
    for phase in (*PHASES, "total"):
        if not any(phase in profile[c] for c in configs):
            continue
        cells = []
        for c in configs:
            v = profile[c].get(phase, 0.0)
            share = 100 * v / profile[c]["total"] if profile[c]["total"] else 0.0
            cells.append(f"{v:12.1f} ms {share:5.1f}%")
        lines.append(f"{phase:<{width}}" + "".join(f"{cell:>22}" for cell in cells))
    single = profile["single"]
    parts = ", ".join(f"{k} {v:.1f} ms" for k, v in single.items() if k != "step")
    lines.append(f"single-task step: {parts}")
    return "\n".join(lines)


def plot_ratios(results: dict[str, dict[str, dict[str, Any]]], path: str) -> None:
    """Bar chart of the time ratios (and memory ratios, when measured) per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    configs = [c for c in next(iter(results.values())) if c != "single"]
    has_mem = all("memory_ratio" in s for per in results.values() for s in per.values())
    panels = [("ratio", "step time / single-task step")]
    if has_mem:
        panels.append(("memory_ratio", "peak memory / single-task step"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    width = 0.8 / max(1, len(configs))
    for ax, (key, label) in zip(axes[0], panels):
        for j, c in enumerate(configs):
            xs = [i + (j - (len(configs) - 1) / 2) * width for i in range(len(models))]
            vals = [results[m][c][key] for m in models]
            bars = ax.bar(xs, vals, width, label=c)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
            target = TARGETS.get(c) if key == "ratio" else None
            if key == "memory_ratio" and c == MEMORY_TARGET[0]:
                target = MEMORY_TARGET[1]
            if target is not None:
                for xi in xs:
                    ax.hlines(target, xi - width / 2, xi + width / 2, colors="k", linestyles="--")
        if key == "ratio" and "vgg16" in models:
            i = models.index("vgg16")
            ax.plot([i], [MAXL_ORIGINAL["second_order"]], "rx", label="original MAXL (vgg16)")
        ax.axhline(1.0, color="grey", lw=0.8)
        top = max(results[m][c][key] for m in models for c in configs)
        if key == "ratio" and "vgg16" in models:
            top = max(top, MAXL_ORIGINAL["second_order"])
        ax.set_ylim(0, 1.25 * max(top, *TARGETS.values(), MEMORY_TARGET[1]))
        ax.set_xticks(range(len(models)), models)
        ax.set_ylabel(label)
        ax.set_title(f"{label} (dashes: targets)", fontsize=9)
        ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def auxgen_info() -> dict[str, Any]:
    """auxgen's version, location and a digest of its source (the code that was measured)."""
    import hashlib
    from pathlib import Path

    import auxgen

    root = Path(auxgen.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return {
        "version": getattr(auxgen, "__version__", "?"),
        "source_sha256": digest.hexdigest()[:16],
    }


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Time and memory of an auxgen MAXL step relative to a single-task step."
    )
    p.add_argument("--models", default="vgg16,resnet18,resnet10t", help="comma-separated")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32, help="height and width of the inputs")
    p.add_argument("--num-classes", type=int, default=20)
    p.add_argument("--psi", type=int, default=5, help="auxiliary classes per primary class")
    p.add_argument("--repeats", type=int, default=5, help="measured round-robin rounds")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    p.add_argument("--steps", type=int, default=1, help="steps per measurement")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG bar chart of the ratios here")
    p.add_argument(
        "--profile",
        action="store_true",
        help="time the phases of one step per config instead of the benchmark",
    )
    p.add_argument("--top-ops", type=int, default=0, help="with --profile: torch.profiler top-K")
    p.add_argument(
        "--smoke", action="store_true", help="tiny model, 2 rounds: a few seconds (for tests)"
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark (or ``--profile``), print the table and write ``--out``/``--plot``."""
    args = _parser().parse_args(argv)
    if args.smoke:
        args.models, args.repeats, args.warmup, args.steps = "tiny", 2, 1, 1
    models = [m for m in args.models.split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    common = dict(
        device=device,
        batch=args.batch,
        num_classes=args.num_classes,
        psi=args.psi,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
    )
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(argv),
        "machine": machine_info(device, args.threads),
        "auxgen": auxgen_info(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
        "targets": {"time": TARGETS, "memory": dict([MEMORY_TARGET])},
        "maxl_original": MAXL_ORIGINAL,
    }
    if args.profile:
        prof_configs = [c for c in configs if c != "single"]
        report["profile"] = {}
        for m in models:
            prof = run_profile(m, prof_configs, top_ops=args.top_ops, **common)  # type: ignore[arg-type]
            report["profile"][m] = prof
            print(f"== {m}: median ms per phase of one step ({args.batch}x3x32x32)")
            print(format_profile(prof))
            for c, table in prof.get("top_ops", {}).items():
                print(f"-- {m} {c}: top operators by self time\n{table}")
    else:
        results = run_benchmark(
            models,
            configs,
            steps=args.steps,
            memory=not args.no_memory,
            progress=not args.no_progress,
            image_size=args.image_size,
            **common,  # type: ignore[arg-type]
        )
        report["results"] = results
        if hasattr(os, "getloadavg"):
            report["machine"]["loadavg_end"] = list(os.getloadavg())
        print(format_table(results))
        if args.plot:
            plot_ratios(results, args.plot)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
