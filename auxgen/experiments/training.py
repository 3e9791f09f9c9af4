"""The training loop of one run: :func:`train`, the engine behind ``auxgen run`` and ``demo``.

One run trains one classifier on one dataset with one method and one seed, evaluates it
after every epoch, checkpoints atomically after every epoch (resumable, bit-identically on
CPU under ``deterministic=True``) and writes ``results.json``.

Example:
    >>> from auxgen.experiments.config import RunConfig
    >>> cfg = RunConfig(dataset="digits", method="human", epochs=1, train_subset=5,
    ...                 progress=False)
    >>> res = train(cfg)
    >>> 0.0 <= res["final_test_accuracy"] <= 1.0
    True
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..labeler import AuxiliaryLabeler
from ..tasks import (
    AuxiliaryTask,
    GeneratedCellLabels,
    GeneratedLabels,
    LearnedWeight,
    TransformLabels,
    patch_rotations,
)
from . import checkpoints as C
from .batches import epoch_batches, prepare, steps_per_epoch
from .config import RunConfig
from .datasets import Data, load_data
from .evaluation import aux_analysis, evaluate, evaluate_aggregated
from .models import build_model, check_backbone, load_backbone
from .runtime import resolve_device, seed_everything, world_and_rank, write_json

__all__ = ["train"]

logger = logging.getLogger(__name__)


def _fixed_aux_labels(cfg: RunConfig, data: Data) -> Optional[Tensor]:
    """The fixed auxiliary labels of the human / random / k-means baselines (else ``None``),
    with ``cfg.aux_label_noise`` of them replaced by random children."""
    from . import baselines as B

    aux = _clean_aux_labels(cfg, data)
    if aux is not None and cfg.aux_label_noise:
        aux = B.noisy_aux_labels(aux, data.y_train, data.psi, cfg.aux_label_noise, seed=cfg.seed)
    return aux


def _clean_aux_labels(cfg: RunConfig, data: Data) -> Optional[Tensor]:
    from . import baselines as B

    if cfg.method == "human":
        assert data.human_aux is not None
        return B.human_aux_labels(data.fine_train, data.human_aux, y=data.y_train, psi=data.psi)
    if cfg.method == "random":
        return B.random_aux_labels(data.y_train, data.psi, seed=cfg.seed)
    if cfg.method == "kmeans":
        feats = prepare(data.x_train, data, torch.device("cpu")).flatten(1)
        t0 = time.perf_counter()
        aux = B.kmeans_aux_labels(feats, data.y_train, data.psi, seed=cfg.seed, pca_dim=64)
        logger.info("k-means auxiliary labels computed in %.1fs", time.perf_counter() - t0)
        return aux
    return None


def _learns(cfg: RunConfig) -> bool:
    """Whether the run trains tasks by the meta-gradient (and so has a generator optimiser)."""
    return cfg.method == "maxl" or (
        cfg.method == "transform" and cfg.transform in ("maxl", "cells", "autol")
    )


def _tasks(cfg: RunConfig, data: Data) -> list[AuxiliaryTask]:
    """The run's auxiliary tasks (see :data:`~auxgen.experiments.config.TRANSFORM_VARIANTS`)."""
    generated: dict[str, Any] = {  # MAXL's options, for GeneratedLabels and the cells
        "generator": cfg.generator if cfg.method in ("maxl", "transform") else "head",
        "weight": 0.0 if cfg.method in ("single", "batchaug") else cfg.aux_weight,
        "entropy_weight": cfg.entropy_weight,
        "confidence_weight": cfg.confidence_weight,
        "label_temperature": cfg.label_temperature,
    }
    maxl = GeneratedLabels(data.psi, **generated)
    if cfg.method != "transform":
        return [maxl]
    variant = cfg.transform
    options: dict[str, Any] = {"form": "both", "weight": cfg.aux_weight}
    if variant in ("joint", "predict"):
        options["form"] = variant
    elif variant == "one":
        options["views"] = "one"
    elif variant == "sd":
        options.update(form="joint", distill=1.0)
    elif variant == "pviews":
        options["primary_views"] = True
    elif variant == "onehalf":
        options.update(views="one", fraction=0.5)
    elif variant == "sixth":
        options["fraction"] = 1 / 6
    elif variant == "patch":
        options.update(transforms=patch_rotations(0.5)[0], names=patch_rotations(0.5)[1])
    task = TransformLabels(**options)
    if variant == "cells":
        return [task, GeneratedCellLabels(data.psi, **generated)]
    if variant == "autol":
        return [LearnedWeight(task)]
    return [task, maxl] if variant == "maxl" else [task]


def _make_optimizer(kind: str, params: list, lr: float, momentum: float, wd: float):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)


def _make_scheduler(cfg: RunConfig, opt: torch.optim.Optimizer, total_steps: int):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=cfg.lr,
            total_steps=max(total_steps, 2),
            max_momentum=max(cfg.momentum, 0.85),
            cycle_momentum=cfg.optimizer == "sgd" and cfg.momentum > 0,
        )
    return None


def train(config: RunConfig) -> dict[str, Any]:
    """Train one classifier with one method and seed; return (and write) its results.

    Builds the data and the model, computes fixed auxiliary labels once (human, random,
    k-means), trains for ``config.epochs`` epochs with :meth:`AuxiliaryLabeler.step`, evaluates
    the primary test accuracy after every epoch, checkpoints atomically to
    ``out_dir/checkpoint.pt`` after every epoch and resumes from it (see
    ``RunConfig.resume``). On CPU with ``deterministic=True`` and a fixed ``threads``, a run
    that is killed and resumed ends bit-identical to an uninterrupted one.

    Args:
        config: the run.

    Returns:
        A JSON-able dict: ``config`` (as run), ``label``, ``history`` (per-epoch
        ``train_loss``, ``train_primary_loss``, ``train_aux_loss``, ``train_accuracy``,
        ``test_accuracy``, ``test_loss``, ``lr``, ``epoch_time_s``, ``meta_updates``; with
        a learned loss weight also ``task_weights``, the weight at the end of the epoch),
        ``final_test_accuracy``, ``final_test_loss``, ``wall_time_s`` (whole run, across
        resumes), ``train_time_s`` (training epochs only), ``num_train``, ``num_test``,
        ``psi``, ``num_parameters``, ``generator_parameters`` and ``aux`` (NMI of the
        auxiliary labels with the fine labels; for ``maxl`` also the test-set assignment
        counts and example indices). Also written to ``out_dir/results.json``.

    Raises:
        ValueError: bad config values, unknown backbone, levels / psi that do not fit.
        FileNotFoundError: missing data, or ``resume=True`` without a checkpoint.
        CheckpointWriteError: a checkpoint could not be written (e.g. a full disk); the
            previous one is kept and training stops at that epoch.
    """
    cfg = config.validate().effective()
    t_start = time.perf_counter()
    check_backbone(cfg.backbone)
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    ckpt_path = out_dir / C.CHECKPOINT_NAME if out_dir is not None else None
    ckpt = C.open_checkpoint(cfg, ckpt_path)
    if ckpt is not None and out_dir is not None and int(ckpt["epoch"]) >= cfg.epochs:
        done = C.finished_results(out_dir / C.RESULTS_NAME, cfg)
        if done is not None:
            logger.info("%s seed %d: already finished in %s", cfg.label, cfg.seed, out_dir)
            return done

    threads_before = torch.get_num_threads()
    det_before = torch.are_deterministic_algorithms_enabled()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, device, out_dir, ckpt_path, ckpt, t_start)
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(det_before)


@dataclass
class _Run:
    """What one run holds across epochs."""

    data: Data
    labeler: AuxiliaryLabeler
    opt: torch.optim.Optimizer
    gen_opt: Optional[torch.optim.Optimizer]
    sched: Optional[Any]
    fixed: Optional[Tensor]
    eval_idx: Optional[Tensor]
    steps: int


def _build(cfg: RunConfig, device: torch.device) -> _Run:
    """Load the data, seed, build the model, the labeler, the optimisers and fixed labels."""
    data = load_data(cfg)
    seed_everything(cfg.seed)
    c, h, _ = data.image_shape
    model = build_model(cfg.backbone, c, data.num_classes, h, cfg.width)
    if cfg.init is not None:
        load_backbone(model, cfg.init)
    labeler = AuxiliaryLabeler(
        model,
        tasks=_tasks(cfg, data),
        meta=cfg.meta,
        meta_every=cfg.meta_every,
        diagnostics=cfg.diagnostics,
    ).to(device)
    opt = _make_optimizer(
        cfg.optimizer, labeler.model_parameters(), cfg.lr, cfg.momentum, cfg.weight_decay
    )
    gen_opt = (
        _make_optimizer(
            cfg.optimizer if cfg.gen_optimizer == "same" else cfg.gen_optimizer,
            labeler.generator_parameters(),
            cfg.gen_lr,
            cfg.momentum,
            cfg.gen_weight_decay,
        )
        if _learns(cfg)
        else None
    )
    steps = steps_per_epoch(int(data.y_train.numel()) // world_and_rank()[0], cfg.batch_size)
    sched = _make_scheduler(cfg, opt, cfg.epochs * steps)
    fixed = _fixed_aux_labels(cfg, data)
    if fixed is not None:
        fixed = fixed.to(device)
    eval_idx: Optional[Tensor] = None
    n_test = int(data.y_test.numel())
    if cfg.eval_subset is not None and cfg.eval_subset < n_test:
        g = torch.Generator().manual_seed(cfg.data_seed)
        eval_idx = torch.sort(torch.randperm(n_test, generator=g)[: cfg.eval_subset]).values
    return _Run(data, labeler, opt, gen_opt, sched, fixed, eval_idx, steps)


def _train_epoch(
    cfg: RunConfig, run: _Run, epoch: int, device: torch.device
) -> tuple[dict[str, float], int, list[float]]:
    """One pass over the training batches: ``(train statistics, meta updates, cosines)``."""
    sums = {"loss": 0.0, "primary_loss": 0.0, "aux_loss": 0.0}
    correct = seen = meta_updates = 0
    cosines: list[float] = []
    bar = tqdm(
        epoch_batches(run.data, cfg, epoch, device),
        total=run.steps,
        desc=f"{cfg.label} s{cfg.seed} {epoch + 1}/{cfg.epochs}",
        leave=False,
        disable=None if cfg.progress else True,
        dynamic_ncols=True,
    )
    for x, y, idx, meta in bar:
        aux_t = run.fixed[idx.to(device)] if run.fixed is not None else None
        out = run.labeler.step(x, y, run.opt, run.gen_opt, aux_target=aux_t, meta_batch=meta)
        if run.sched is not None:
            run.sched.step()
        b = int(y.numel())
        for k in sums:
            sums[k] += float(out[k]) * b
        correct += int((out["logits"].argmax(1) == y).sum())
        seen += b
        meta_updates += int(out["meta_updated"])
        if out.get("grad_cosine") is not None:
            cosines.append(float(out["grad_cosine"]))
        bar.set_postfix(loss=f"{float(out['loss']):.3f}", refresh=False)
    bar.close()
    stats = {
        "train_loss": sums["loss"] / max(seen, 1),
        "train_primary_loss": sums["primary_loss"] / max(seen, 1),
        "train_aux_loss": sums["aux_loss"] / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
    }
    return stats, meta_updates, cosines


def _epoch(cfg: RunConfig, run: _Run, epoch: int, device: torch.device) -> dict[str, Any]:
    """Train one epoch, evaluate (validation split if any, else test), log; its record."""
    run.labeler.train()
    t0 = time.perf_counter()
    stats, meta_updates, cosines = _train_epoch(cfg, run, epoch, device)
    train_time = time.perf_counter() - t0
    has_val = run.data.x_val is not None
    if has_val:
        acc, loss = evaluate(run.labeler, run.data, None, device, split="val")
        scores = {"val_accuracy": acc, "val_loss": loss}
    else:
        acc, loss = evaluate(run.labeler, run.data, run.eval_idx, device)
        scores = {"test_accuracy": acc, "test_loss": loss}
    record = {
        "epoch": epoch + 1,
        **stats,
        **scores,
        "lr": float(run.opt.param_groups[0]["lr"]),
        "epoch_time_s": train_time,
        "eval_time_s": time.perf_counter() - t0 - train_time,
        "meta_updates": meta_updates,
    }
    if cosines:
        record["train_grad_cosine"] = sum(cosines) / len(cosines)
    learned = [t for t in run.labeler.tasks if isinstance(t.loss_weight, LearnedWeight)]
    if learned:  # Auto-lambda: the weight the meta-gradient has reached
        record["task_weights"] = {t.name: t.weight for t in learned}
    logger.info(
        "%s seed %d epoch %d/%d: loss %.4f (primary %.4f, aux %.4f), train acc %.4f, "
        "%s acc %.4f [%.1fs]",
        cfg.label,
        cfg.seed,
        epoch + 1,
        cfg.epochs,
        record["train_loss"],
        record["train_primary_loss"],
        record["train_aux_loss"],
        record["train_accuracy"],
        "val" if has_val else "test",
        acc,
        train_time,
    )
    return record


def _train(
    cfg: RunConfig,
    device: torch.device,
    out_dir: Optional[Path],
    ckpt_path: Optional[Path],
    ckpt: Optional[dict[str, Any]],
    t_start: float,
) -> dict[str, Any]:
    run = _build(cfg, device)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    elapsed_before = 0.0
    if ckpt is not None:
        history, start_epoch, elapsed_before = C.restore(
            ckpt, run.labeler, run.opt, run.gen_opt, run.sched
        )
        logger.info("resumed %s from %s at epoch %d", cfg.label, ckpt_path, start_epoch)
    t_run = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        history.append(_epoch(cfg, run, epoch, device))
        if ckpt_path is not None and cfg.checkpoint:
            C.save_epoch(
                ckpt_path,
                cfg,
                epoch + 1,
                run.labeler,
                run.opt,
                run.gen_opt,
                run.sched,
                history,
                elapsed_before + time.perf_counter() - t_start,
            )
    results = _results(cfg, run, history, ckpt, device, elapsed_before, t_start)
    logger.info(
        "%s seed %d: final test accuracy %.4f (%.1fs, this session %.1fs)",
        cfg.label,
        cfg.seed,
        results["final_test_accuracy"],
        results["wall_time_s"],
        time.perf_counter() - t_run,
    )
    if out_dir is not None:
        write_json(out_dir / C.RESULTS_NAME, results)
    return results


def _results(
    cfg: RunConfig,
    run: _Run,
    history: list[dict[str, Any]],
    ckpt: Optional[dict[str, Any]],
    device: torch.device,
    elapsed_before: float,
    t_start: float,
) -> dict[str, Any]:
    """The final evaluation, the auxiliary-label analysis and the results dict of :func:`train`."""
    data, labeler = run.data, run.labeler
    has_val = data.x_val is not None
    if run.eval_idx is not None or has_val:
        final_acc, final_loss = evaluate(labeler, data, None, device)
    elif history:
        final_acc, final_loss = history[-1]["test_accuracy"], history[-1]["test_loss"]
    else:  # epochs already done and nothing to train: evaluate the restored model
        final_acc, final_loss = evaluate(labeler, data, None, device)
    fixed = run.fixed.cpu() if run.fixed is not None else None
    aux = aux_analysis(cfg, labeler, data, fixed, device)
    if cfg.method == "transform" and cfg.transform != "predict":
        aux["aggregated_test_accuracy"] = evaluate_aggregated(labeler, data, device)
        if has_val:
            aux["aggregated_val_accuracy"] = evaluate_aggregated(labeler, data, device, "val")
    wall = elapsed_before + time.perf_counter() - t_start
    return {
        "label": cfg.label,
        "config": cfg.to_dict(),
        "history": history,
        "final_test_accuracy": final_acc,
        "final_test_loss": final_loss,
        "final_val_accuracy": history[-1]["val_accuracy"] if has_val and history else None,
        "num_val": 0 if data.y_val is None else int(data.y_val.numel()),
        "num_meta": 0 if data.y_meta is None else int(data.y_meta.numel()),
        "wall_time_s": wall,
        "train_time_s": sum(r["epoch_time_s"] for r in history),
        "num_train": int(data.y_train.numel()),
        "num_test": int(data.y_test.numel()),
        "psi": list(data.psi),
        "num_parameters": sum(p.numel() for p in labeler.model_parameters()),
        "generator_parameters": sum(p.numel() for p in labeler.generator_parameters())
        if _learns(cfg)
        else 0,
        "aux": aux,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "resumed_from_epoch": int(ckpt["epoch"]) if ckpt is not None else None,
        "class_names": list(data.class_names),
        "fine_names": list(data.fine_names),
    }
