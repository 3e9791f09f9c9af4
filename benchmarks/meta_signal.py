"""Does MAXL's meta-gradient point towards informative auxiliary labels?

MAXL trains its label generator with the gradient of a *meta loss*, the primary loss after
one training step of the multi-task network, with respect to the soft auxiliary labels
``t`` (``(N, sum(psi))``, each row a distribution over its primary class's children). The
generator can only find labels this gradient points to. This script measures, along real
training runs, whether it points to the fine classes: the human auxiliary task that helps
the classifier (see ``docs/results.md``).

For a run of one method and seed (the ``cifar10cnn5`` regime of ``lowdata.py`` by default),
it trains exactly as ``auxgen run`` does and, at the start of each probed epoch (and at the
end), computes for every training batch the label gradient ``g = d L_p(theta+(t); meta) / d t``
at the run's current labels (``human``: the one-hot fine classes; ``maxl-*``: the
generator's soft labels), where ``theta+`` is the run's own SGD step (its learning rate,
momentum buffer and weight decay) on ``L_p + aux_weight * mean_i sum_k t_ik l_ik``, for
three meta batches:

* ``same``: the batch the step trains on (the paper's meta loss, ``auxgen run``'s default);
* ``next``: the next training batch (``--meta-source next``);
* ``val``: the whole validation split (a held-out meta loss, AuxiLearn's idea, measured on
  the validation images so that it is the loss the model is selected on).

A generator step moves the labels along ``-g``. Per probe it records:

* ``agree``: the fraction of images whose most favoured child (the smallest ``g`` among its
  primary class's children) is its fine class, against ``chance`` (``1/psi``);
* ``agree_head``: the same for the child the auxiliary head predicts (among the
  children), and ``head_fine``: how often that prediction is the fine class;
* ``cos_human``: the cosine, in the tangent space of the label simplex, between ``-g`` and
  the direction from the current labels' centre (uniform over the children) to the human
  labels; ``cos_random`` the same for a random child per image (a control: what no
  preference looks like); both averaged over batches.

``--fork-epochs`` also forks a ``maxl-*`` run at those epochs and continues it for
``--fork-steps`` steps with fixed labels (``human``, ``uniform`` over the children, which
is where MAXL's labels sit, and ``random``), recording the validation loss and accuracy
after 1, 3, 10, ... steps: how many steps a look-ahead would need before the human labels'
advantage shows.

Usage::

    python benchmarks/meta_signal.py --data-dir ~/data --methods human maxl-copy \\
        --seeds 0 1 --jobs 2 --work runs/meta_signal --out docs/results/meta_signal.json \\
        --plot docs/img/meta_signal.png

Each (method, seed) is one one-thread process; its record is written to ``--work`` when it
finishes and reused on a rerun.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import statistics
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from tqdm.auto import tqdm

from auxgen.backbone import primary_logits

SOURCES = ("same", "next", "val")
FORK_LABELS = ("human", "uniform", "random")
STATS = ("agree", "chance", "cos_human", "cos_random", "agree_head", "head_fine")
logger = logging.getLogger("meta_signal")


# ------------------------------------------------------------------ the label gradient
def label_gradient(
    labeler: Any,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    t: Tensor,
    meta_x: Tensor,
    meta_y: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d L_p(theta+(t); meta_x, meta_y) / d t, L_p(theta+), aux logits)`` by double backward.

    ``theta+`` is one step of ``optimizer`` (``torch.optim.SGD``: learning rate, momentum
    buffer, weight decay; no dampening or Nesterov) on the multi-task loss of ``(x, y)``
    with soft auxiliary labels ``t``; the auxiliary logits are those of ``x`` at the current
    parameters (detached). Computed here without the library's meta machinery (an
    independent check of it: see ``tests/benchmarks/test_meta_signal.py``). Parameters, buffers and
    the optimiser's state are left as they were.

    Raises:
        TypeError: ``optimizer`` is not SGD.
        ValueError: SGD with dampening or Nesterov momentum.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(f"optimizer must be torch.optim.SGD, got {type(optimizer).__name__}")
    model = labeler.model
    buffers = {k: b.detach().clone() for k, b in labeler.named_buffers()}
    moving: list[tuple[torch.nn.Parameter, dict[str, Any]]] = []
    for group in optimizer.param_groups:
        if group.get("nesterov") or group.get("dampening", 0):
            raise ValueError("optimizer: dampening and Nesterov momentum are not supported")
        moving += [(p, group) for p in group["params"] if p.requires_grad]
    t = t.detach().clone().requires_grad_(True)
    try:
        z_p, z_a = labeler.forward_all(x)
        ell = -torch.log_softmax(z_a.double(), 1)
        loss = F.cross_entropy(z_p.double(), y) + labeler.tasks[0].weight * (ell * t).sum(1).mean()
        grads = torch.autograd.grad(
            loss, [p for p, _ in moving], create_graph=True, allow_unused=True
        )
        plus: dict[int, Tensor] = {}
        for (p, group), g in zip(moving, grads):
            if g is None:
                continue
            d = g + group.get("weight_decay", 0.0) * p.detach()
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if group.get("momentum", 0.0) and buf is not None:
                d = group["momentum"] * buf + d
            plus[id(p)] = p.detach() - group["lr"] * d
        values = {k: plus.get(id(p), p.detach()) for k, p in model.named_parameters()}
        model_buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
        out = functional_call(model, {**values, **model_buffers}, (meta_x,))
        meta = F.cross_entropy(primary_logits(out, labeler.output).double(), meta_y)
        (g_t,) = torch.autograd.grad(meta, t)
    finally:  # the forward's BatchNorm statistics update is undone (after the backward,
        # which reads them)
        state = dict(labeler.named_buffers())
        with torch.no_grad():
            for k, b in buffers.items():
                state[k].copy_(b)
    return g_t, meta.detach(), z_a.detach()


def uniform_labels(owner: Tensor, y: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Soft labels ``(N, sum(psi))`` uniform over the children of each sample's class."""
    mask = (owner[None, :] == y[:, None]).to(dtype)
    return mask / mask.sum(1, keepdim=True)


def signal_stats(
    g: Tensor,
    y: Tensor,
    fine_aux: Tensor,
    owner: Tensor,
    generator: torch.Generator,
    aux_logits: Optional[Tensor] = None,
) -> dict[str, float]:
    """How far ``-g`` favours each image's fine child: agreement and tangent cosines.

    Returns ``agree`` / ``chance`` (sums over images of "the most favoured child is the fine
    class" and of ``1/psi``), ``n`` (images), and the batch's ``cos_human`` and
    ``cos_random`` (see the module docstring). With ``aux_logits`` also ``agree_head`` (sum
    of "the most favoured child is the auxiliary head's prediction among the children") and
    ``head_fine`` (sum of "the head's prediction is the fine class").
    """
    mask = owner[None, :] == y[:, None]
    psi = mask.sum(1, keepdim=True).to(g.dtype)
    favoured = g.masked_fill(~mask, float("inf")).argmin(1)
    extra: dict[str, float] = {}
    if aux_logits is not None:
        head = aux_logits.masked_fill(~mask, float("-inf")).argmax(1)
        extra = {
            "agree_head": float((favoured == head).sum()),
            "head_fine": float((head == fine_aux).sum()),
        }
    centre = uniform_labels(owner, y, g.dtype)
    gc = (g - (g * mask).sum(1, keepdim=True) / psi) * mask  # tangent part of g
    human = F.one_hot(fine_aux, owner.numel()).to(g.dtype) - centre
    # a uniformly random child of each image's primary class
    pick = (torch.rand(mask.shape, generator=generator, dtype=g.dtype) * mask).argmax(1)
    rand = F.one_hot(pick, owner.numel()).to(g.dtype) - centre

    def cos(a: Tensor, b: Tensor) -> float:
        den = float(a.norm() * b.norm())
        return float((a * b).sum()) / den if den > 0 else 0.0

    return {
        "agree": float((favoured == fine_aux).sum()),
        "chance": float((1.0 / psi).sum()),
        "n": float(y.numel()),
        "cos_human": cos(-gc, human),
        "cos_random": cos(-gc, rand),
        **extra,
    }


# ------------------------------------------------------------------ one run
def regime_config(regime: str, method: str, seed: int, data_dir: str) -> Any:
    """The ``RunConfig`` that ``lowdata.py`` runs for ``regime``, ``method`` and ``seed``."""
    from lowdata import COMMON, REGIMES

    from auxgen.cli import build_parser, run_config

    args = build_parser().parse_args(
        ["run", *COMMON, *REGIMES[regime][0], "--data-dir", data_dir, "--methods", method]
    )
    cfg = run_config(args).with_method(method)
    return dataclasses.replace(cfg, seed=seed, out_dir=None, checkpoint=False)


def _current_labels(run: Any, x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
    """The run's labels of the batch: one-hot fixed labels, or the generator's soft ones."""
    if run.fixed is not None:
        return F.one_hot(run.fixed[idx], run.labeler.tasks[0].num_aux).double()
    return run.labeler.generate_labels(x, y).double()


def probe(run: Any, cfg: Any, epoch: int, fine_aux: Tensor, seed: int) -> dict[str, Any]:
    """The label gradient's statistics over one epoch's training batches, per meta source."""
    from auxgen.experiments.batches import epoch_batches, prepare

    data, lab = run.data, run.labeler
    lab.train()
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    x_val = prepare(data.x_val, data, torch.device("cpu"))
    batches = [(x, y, idx) for x, y, idx, _ in epoch_batches(data, cfg, epoch, torch.device("cpu"))]
    counts = ("agree", "chance", "n", "agree_head", "head_fine")
    sums = {s: dict.fromkeys(counts, 0.0) for s in SOURCES}
    cosines: dict[str, dict[str, list[float]]] = {
        s: {"cos_human": [], "cos_random": []} for s in SOURCES
    }
    meta_losses: dict[str, list[float]] = {s: [] for s in SOURCES}
    for i, (x, y, idx) in enumerate(batches):
        t = _current_labels(run, x, y, idx)
        nx, ny, _ = batches[(i + 1) % len(batches)]
        metas = {"same": (x, y), "next": (nx, ny), "val": (x_val, data.y_val)}
        for s in SOURCES:
            g, meta, z_a = label_gradient(lab, run.opt, x, y, t, *metas[s])
            st = signal_stats(g, y, fine_aux[idx], lab.owner, gen, z_a)
            for k in sums[s]:
                sums[s][k] += st[k]
            for k in cosines[s]:
                cosines[s][k].append(st[k])
            meta_losses[s].append(float(meta))
    out: dict[str, Any] = {"epoch": epoch, "lr": float(run.opt.param_groups[0]["lr"])}
    for s in SOURCES:
        out[s] = {
            "agree": sums[s]["agree"] / sums[s]["n"],
            "agree_head": sums[s]["agree_head"] / sums[s]["n"],
            "head_fine": sums[s]["head_fine"] / sums[s]["n"],
            "chance": sums[s]["chance"] / sums[s]["n"],
            "cos_human": statistics.fmean(cosines[s]["cos_human"]),
            "cos_human_sem": _sem(cosines[s]["cos_human"]),
            "cos_random": statistics.fmean(cosines[s]["cos_random"]),
            "cos_random_sem": _sem(cosines[s]["cos_random"]),
            "meta_loss": statistics.fmean(meta_losses[s]),
            "batches": len(batches),
        }
    return out


def _sem(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def fork(run: Any, cfg: Any, epoch: int, fine_aux: Tensor, steps: Sequence[int]) -> dict[str, Any]:
    """Continue a copy of ``run`` with fixed labels; validation loss/accuracy after ``steps``."""
    from auxgen.experiments.baselines import random_aux_labels
    from auxgen.experiments.batches import epoch_batches
    from auxgen.experiments.evaluation import evaluate

    data = run.data
    owner = run.labeler.owner
    fixed = {
        "human": fine_aux,
        "random": random_aux_labels(data.y_train, data.psi, seed=cfg.seed),
    }
    out: dict[str, Any] = {"epoch": epoch, "steps": list(steps)}
    for kind in FORK_LABELS:
        lab, opt, sched = copy.deepcopy((run.labeler, run.opt, run.sched))
        losses, accs = [], []
        done, e = 0, epoch
        while done < max(steps):
            for x, y, idx, _ in epoch_batches(data, cfg, e, torch.device("cpu")):
                lab.train()
                t = uniform_labels(owner, y) if kind == "uniform" else fixed[kind][idx]
                lab.step(x, y, opt, None, aux_target=t)
                if sched is not None:
                    with warnings.catch_warnings():  # the copied scheduler lost its step hook
                        warnings.simplefilter("ignore", UserWarning)
                        sched.step()
                done += 1
                if done in steps:
                    acc, loss = evaluate(lab, data, None, torch.device("cpu"), split="val")
                    losses.append(loss)
                    accs.append(acc)
                if done >= max(steps):
                    break
            e += 1
        out[kind] = {"val_loss": losses, "val_accuracy": accs}
    return out


def run_unit(
    regime: str,
    method: str,
    seed: int,
    data_dir: str,
    probe_epochs: Sequence[int],
    fork_epochs: Sequence[int],
    fork_steps: Sequence[int],
    epochs: Optional[int] = None,
) -> dict[str, Any]:
    """Train one (method, seed) of ``regime`` as ``auxgen run`` does, probing on the way."""
    from auxgen.experiments.baselines import human_aux_labels
    from auxgen.experiments.evaluation import evaluate
    from auxgen.experiments.training import _build, _epoch

    torch.set_num_threads(1)
    cfg = regime_config(regime, method, seed, data_dir)
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    cfg = cfg.validate().effective()
    run = _build(cfg, torch.device("cpu"))
    data = run.data
    fine_aux = human_aux_labels(data.fine_train, data.human_aux, y=data.y_train, psi=data.psi)
    record: dict[str, Any] = {
        "regime": regime, "method": method, "seed": seed, "epochs": cfg.epochs,
        "probes": [], "forks": [], "val_accuracy": [],
    }  # fmt: skip
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs + 1):
        if epoch in probe_epochs or epoch == cfg.epochs:
            record["probes"].append(probe(run, cfg, epoch, fine_aux, seed))
            logger.info("%s seed %d epoch %d: %s", method, seed, epoch, record["probes"][-1])
        if epoch in fork_epochs and run.fixed is None:
            record["forks"].append(fork(run, cfg, epoch, fine_aux, fork_steps))
        if epoch == cfg.epochs:
            break
        rec = _epoch(cfg, run, epoch, torch.device("cpu"))
        record["val_accuracy"].append(rec["val_accuracy"])
    record["final_test_accuracy"] = evaluate(run.labeler, data, None, torch.device("cpu"))[0]
    record["wall_time_s"] = time.perf_counter() - t0
    return record


def _unit_job(args: tuple) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work, regime, method, seed, *options = args
    path = Path(work) / f"{method}_seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    record = run_unit(regime, method, seed, *options)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return record


# ------------------------------------------------------------------ summary
def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method, probe epoch and meta source: mean and std over seeds of each statistic."""
    table: dict[str, Any] = {}
    for method in sorted({r["method"] for r in records}):
        runs = [r for r in records if r["method"] == method]
        epochs = sorted({p["epoch"] for r in runs for p in r["probes"]})
        rows = []
        for e in epochs:
            probes = [p for r in runs for p in r["probes"] if p["epoch"] == e]
            row: dict[str, Any] = {"epoch": e, "seeds": len(probes)}
            for s in SOURCES:
                for k in STATS:
                    vals = [p[s][k] for p in probes]
                    row[f"{s}_{k}"] = statistics.fmean(vals)
                    row[f"{s}_{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            rows.append(row)
        table[method] = {
            "seeds": sorted(r["seed"] for r in runs),
            "probes": rows,
            "final_test_accuracy": {r["seed"]: r["final_test_accuracy"] for r in runs},
        }
    return table


def signal_table(summary: dict[str, Any]) -> str:
    """Markdown: which child ``-g`` favours (the fine class, the head's prediction; chance)
    and its cosine with the human and random directions (mean ± std over seeds)."""
    lines = [
        "| run | epoch | meta batch | favours the fine child (%) | favours the head's "
        "prediction (%) | chance (%) | cos(-g, human) | cos(-g, random) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ms(row: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
        return f"{scale * row[key]:{fmt}} ± {scale * row[key + '_std']:.{fmt[-2]}f}"

    for method, m in summary.items():
        for row in m["probes"]:
            for s in SOURCES:
                lines.append(
                    f"| {method} | {row['epoch']} | {s} | {ms(row, f'{s}_agree', '.1f', 100)} | "
                    f"{ms(row, f'{s}_agree_head', '.1f', 100)} | "
                    f"{100 * row[f'{s}_chance']:.1f} | {ms(row, f'{s}_cos_human', '+.3f')} | "
                    f"{ms(row, f'{s}_cos_random', '+.3f')} |"
                )
    return "\n".join(lines)


def fork_table(records: list[dict[str, Any]]) -> str:
    """Markdown: validation loss after k steps with human / random labels minus uniform."""
    forks = [(r["seed"], f) for r in records for f in r["forks"]]
    if not forks:
        return ""
    steps = forks[0][1]["steps"]
    lines = [
        "| fork epoch | labels | " + " | ".join(f"{k} step{'s' * (k > 1)}" for k in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for e in sorted({f["epoch"] for _, f in forks}):
        at = [f for _, f in forks if f["epoch"] == e]
        for kind in ("human", "random"):
            cells = []
            for j in range(len(steps)):
                d = [f[kind]["val_loss"][j] - f["uniform"]["val_loss"][j] for f in at]
                sd = statistics.stdev(d) if len(d) > 1 else 0.0
                cells.append(f"{statistics.fmean(d):+.4f} ± {sd:.4f}")
            lines.append(f"| {e} | {kind} − uniform | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: str) -> None:
    """Agreement above chance per epoch, one panel per run, a line per meta source."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(summary), figsize=(5 * len(summary), 3.6), squeeze=False, sharey=True
    )
    for ax, (method, m) in zip(axes[0], summary.items()):
        ep = [r["epoch"] for r in m["probes"]]
        for s in SOURCES:
            mean = [100 * (r[f"{s}_agree"] - r[f"{s}_chance"]) for r in m["probes"]]
            sd = [100 * r[f"{s}_agree_std"] for r in m["probes"]]
            ax.errorbar(ep, mean, yerr=sd, marker="o", capsize=3, label=f"meta batch: {s}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{method} run ({len(m['seeds'])} seeds)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("fine child favoured by -g,\nabove chance (points)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _command(a: argparse.Namespace) -> str:
    """The command line of ``a``, without this machine's folders."""

    def ints(v: Sequence[int]) -> str:
        return " ".join(map(str, v))

    parts = [
        "python benchmarks/meta_signal.py --data-dir DATA",
        f"--regime {a.regime} --methods {' '.join(a.methods)} --seeds {ints(a.seeds)}",
        f"--probe-epochs {ints(a.probe_epochs)} --fork-epochs {ints(a.fork_epochs)}",
        f"--fork-steps {ints(a.fork_steps)}",
    ]
    if a.epochs is not None:
        parts.append(f"--epochs {a.epochs}")
    return " ".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--regime", default="cifar10cnn5")
    p.add_argument("--methods", nargs="+", default=["human", "maxl-copy"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--probe-epochs", nargs="+", type=int, default=[0, 1, 5, 15])
    p.add_argument("--fork-epochs", nargs="*", type=int, default=[1, 10])
    p.add_argument("--fork-steps", nargs="+", type=int, default=[1, 3, 10, 30, 100])
    p.add_argument("--epochs", type=int, default=None, help="override the regime's epochs")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work", default="runs/meta_signal")
    p.add_argument("--out", default=None, help="summary JSON")
    p.add_argument("--plot", default=None, help="figure (PNG)")
    a = p.parse_args(argv)
    units = [
        (a.work, a.regime, m, s, a.data_dir, a.probe_epochs, a.fork_epochs, a.fork_steps, a.epochs)
        for s in a.seeds
        for m in a.methods
    ]
    with ProcessPoolExecutor(max_workers=a.jobs) as pool:
        records = list(tqdm(pool.map(_unit_job, units), total=len(units), desc="runs"))
    summary = summarize(records)
    print(signal_table(summary))
    print()
    print(fork_table(records))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(
            json.dumps(
                {"command": _command(a), "summary": summary, "runs": records},
                indent=1,
            )
            + "\n"
        )
    if a.plot:
        plot(summary, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
