"""Evaluation of a run: primary accuracy and loss, and what the auxiliary task looks like.

:func:`evaluate` measures the primary task on the test or validation split;
:func:`aux_analysis` compares the auxiliary labels with the true fine labels (normalised
mutual information), counts how the test images spread over the generated auxiliary classes
and picks the most confidently assigned examples of each.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..labeler import AuxiliaryLabeler
from .batches import prepare
from .config import RunConfig
from .datasets import Data

__all__ = ["evaluate", "evaluate_aggregated", "aux_analysis"]


@torch.no_grad()
def evaluate(
    labeler: AuxiliaryLabeler,
    data: Data,
    idx: Optional[Tensor],
    device: torch.device,
    split: str = "test",
) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of the primary task on (a subset of) a split."""
    labeler.eval()
    x_all, y_all = (data.x_val, data.y_val) if split == "val" else (data.x_test, data.y_test)
    assert x_all is not None and y_all is not None
    if idx is not None:
        x_all, y_all = x_all[idx], y_all[idx]
    correct, loss, n = 0, 0.0, int(y_all.numel())
    for start in range(0, n, 500):
        x = prepare(x_all[start : start + 500], data, device)
        y = y_all[start : start + 500].to(device)
        logits = labeler(x)
        correct += int((logits.argmax(1) == y).sum())
        loss += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
    return correct / max(n, 1), loss / max(n, 1)


@torch.no_grad()
def evaluate_aggregated(
    labeler: AuxiliaryLabeler, data: Data, device: torch.device, split: str = "test"
) -> float:
    """Accuracy of SLA's aggregated prediction (:meth:`AuxiliaryLabeler.aggregated_log_probs`)
    on a split: every image under every transform, one pass per view."""
    labeler.eval()
    x_all, y_all = (data.x_val, data.y_val) if split == "val" else (data.x_test, data.y_test)
    assert x_all is not None and y_all is not None
    correct, n = 0, int(y_all.numel())
    for start in range(0, n, 500):
        x = prepare(x_all[start : start + 500], data, device)
        y = y_all[start : start + 500].to(device)
        correct += int((labeler.aggregated_log_probs(x).argmax(1) == y).sum())
    return correct / max(n, 1)


@torch.no_grad()
def _generated_aux(
    labeler: AuxiliaryLabeler, x_all: Tensor, y_all: Tensor, data: Data, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Argmax and confidence of the generated auxiliary labels (eval mode)."""
    labeler.eval()
    hard, conf = [], []
    for start in range(0, int(y_all.numel()), 500):
        x = prepare(x_all[start : start + 500], data, device)
        y = y_all[start : start + 500].to(device)
        p = labeler.generate_labels(x, y)
        c, a = p.max(1)
        hard.append(a.cpu())
        conf.append(c.float().cpu())
    return torch.cat(hard), torch.cat(conf)


def _nmi(a: Tensor, b: Tensor) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(a.numpy(), b.numpy()))


def aux_analysis(
    cfg: RunConfig,
    labeler: AuxiliaryLabeler,
    data: Data,
    fixed: Optional[Tensor],
    device: torch.device,
    examples: int = 8,
) -> dict[str, Any]:
    """What the auxiliary task looks like: NMI with the fine labels, class usage, examples."""
    out: dict[str, Any] = {}
    if cfg.method in ("single", "batchaug") or not data.has_hierarchy:
        return out
    if cfg.method == "transform" and cfg.transform not in ("maxl", "cells"):  # no generated labels
        return out
    num_aux = sum(data.psi)
    if fixed is not None:
        out["aux_nmi_train"] = _nmi(data.fine_train, fixed)
        return out
    n_train = min(int(data.y_train.numel()), 10000)
    hard_tr, _ = _generated_aux(
        labeler, data.x_train[:n_train], data.y_train[:n_train], data, device
    )
    hard, conf = _generated_aux(labeler, data.x_test, data.y_test, data, device)
    out["aux_nmi_train"] = _nmi(data.fine_train[:n_train], hard_tr)
    out["aux_nmi_test"] = _nmi(data.fine_test, hard)
    n_fine = len(data.fine_names)
    counts = torch.zeros(num_aux, n_fine, dtype=torch.int64)
    counts.index_put_((hard, data.fine_test), torch.ones_like(hard), accumulate=True)
    out["aux_fine_counts_test"] = counts.tolist()
    out["aux_used_test"] = int((counts.sum(1) > 0).sum())
    top = []
    for k in range(num_aux):
        members = torch.nonzero(hard == k).flatten()
        order = torch.argsort(conf[members], descending=True, stable=True)
        top.append(members[order[:examples]].tolist())
    out["aux_examples_test"] = top
    return out
