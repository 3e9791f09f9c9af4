"""What a training step needs from ``torch.distributed``: one :class:`Ranks` object.

Every collective here is a no-op without an initialised process group of more than one
rank (or with ``enabled=False``), so single-process code calls the same functions.

* :meth:`Ranks.average`: the in-place mean of gradients over the ranks (one flattened
  all-reduce), as ``DistributedDataParallel`` does for the user's optimiser step;
* :meth:`Ranks.broadcast`: copy the first rank's tensors to every rank (the state at the
  first step, as ``DistributedDataParallel`` does at construction);
* :meth:`Ranks.sync_buffers`: make buffers (BatchNorm statistics) agree after a step:
  ``"broadcast"``, ``"average"`` or ``"local"``;
* :func:`check_sync_batchnorm`: ``nn.SyncBatchNorm`` runs only on GPUs; say so before a step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["BUFFER_MODES", "Ranks", "check_sync_batchnorm"]

#: ``buffers=`` values: how buffers agree across ranks after a step.
BUFFER_MODES = ("broadcast", "average", "local")


class Ranks:
    """The ranks a step averages over: a process group, or none.

    Args:
        enabled: ``None``: whenever a process group with world size > 1 is initialised;
            ``False``: never (every rank trains on its own).
        process_group: the group to average over (default: the world).
        buffers: a :data:`BUFFER_MODES` entry, used by :meth:`sync_buffers`.

    Example:
        >>> ranks = Ranks()
        >>> ranks.world()  # no process group here
        1
        >>> g = [torch.ones(2)]
        >>> ranks.average(g)  # a no-op on one rank
        >>> g[0].tolist()
        [1.0, 1.0]
    """

    def __init__(
        self,
        enabled: Optional[bool] = None,
        process_group: Optional[Any] = None,
        buffers: str = "broadcast",
    ) -> None:
        if buffers not in BUFFER_MODES:
            raise ValueError(f"buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        self.enabled = enabled
        self.process_group = process_group
        self.buffers = buffers

    def world(self) -> int:
        """Number of ranks averaged over (1 without a process group)."""
        if self.enabled is False or not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def source(self) -> int:
        """Global rank of the process group's first member (the source of broadcasts)."""
        if self.process_group is None:
            return 0
        return dist.get_global_rank(self.process_group, 0)

    def average(self, tensors: Sequence[Tensor]) -> None:
        """In-place mean across ranks (one flattened all-reduce)."""
        world = self.world()
        if world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.process_group)
        flat /= world
        _scatter(flat, tensors)

    def broadcast(self, tensors: Iterable[Tensor], src: Optional[int] = None) -> None:
        """Copy rank ``src``'s tensors (default: :meth:`source`) to every rank, in place."""
        if self.world() == 1:
            return
        src = self.source() if src is None else src
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=src, group=self.process_group)

    def sync_buffers(self, buffers: Iterable[Tensor]) -> None:
        """Make ``buffers`` agree across ranks as :attr:`buffers` says.

        ``"broadcast"``: every rank receives the buffers of the group's first rank;
        ``"average"``: floating-point buffers become their mean over the ranks and the others
        (such as BatchNorm's ``num_batches_tracked``) are broadcast; ``"local"``: nothing.
        One collective per buffer dtype.
        """
        if self.buffers == "local" or self.world() == 1:
            return
        by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for b in buffers:
            by_dtype.setdefault((b.dtype, b.device), []).append(b)
        with torch.no_grad():
            for (dtype, _), bufs in by_dtype.items():
                flat = torch.cat([b.reshape(-1) for b in bufs])
                if self.buffers == "average" and dtype.is_floating_point:
                    dist.all_reduce(flat, group=self.process_group)
                    flat /= self.world()
                else:
                    dist.broadcast(flat, src=self.source(), group=self.process_group)
                _scatter(flat, bufs)


def _scatter(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def check_sync_batchnorm(module: nn.Module, x: Tensor) -> None:
    """``nn.SyncBatchNorm`` needs GPUs inside a process group: say so before a step."""
    if x.device.type != "cpu" or not (dist.is_available() and dist.is_initialized()):
        return
    for name, m in module.named_modules():
        if isinstance(m, nn.SyncBatchNorm):
            raise ValueError(
                f"'{name}' is an nn.SyncBatchNorm, which PyTorch runs only on GPUs, but the "
                "batch is on the CPU; use nn.BatchNorm layers on the CPU (buffers="
                "'broadcast' or 'average' keeps their running statistics equal across ranks)"
            )
