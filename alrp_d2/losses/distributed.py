"""One ranking over the anchors of every process, with communication in the positives only.

A ranking loss over the concatenation of every process's ``logits`` needs, for each
positive ``i`` of any process, ``rank+(i)`` (a function of the positives' scores alone)
and ``N_FP(i) = sum_j H(s_j - s_i)`` over every process's negatives. The negatives
never leave their process: each process gathers the positives' scores (``O(P)``),
counts its own negatives against every positive's window, and the counts are summed
across processes (``O(P)``). Every process then evaluates the loss definition on the
same global statistics, and hands its own negatives and positives their part of the
global gradient.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

__all__ = ["PositivePartition"]


class PositivePartition:
    """How the global positives are split among the processes of ``group``.

    The global order is the concatenation of the processes' positives, by rank, each
    process's in the order they appear in its ``logits``: that of one ranking over the
    concatenated ``logits``.

    Creating it exchanges the processes' numbers of positives (one small all-gather,
    whose result the host needs: a host-device synchronisation on accelerators).
    """

    def __init__(self, num_local: int, group, device: torch.device):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        count = torch.tensor([num_local], dtype=torch.int64, device=device)
        counts = [torch.empty_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count, group=group)
        self.counts: List[int] = torch.cat(counts).tolist()
        self.offset = sum(self.counts[: self.rank])
        self.num_local = num_local
        self.num_global = sum(self.counts)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The concatenation of every process's ``local`` (``(P_local, ...)``), detached."""
        width = max(self.counts)
        padded = local.detach().new_zeros((width,) + tuple(local.shape[1:]))
        padded[: self.num_local] = local.detach()
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(pieces, padded.contiguous(), group=self.group)
        return torch.cat([piece[:count] for piece, count in zip(pieces, self.counts)])

    def gather_keeping_grad(self, local: torch.Tensor) -> torch.Tensor:
        """:meth:`gather`, with this process's slice being ``local`` itself, so that a
        function of the result differentiates into ``local``."""
        gathered = self.gather(local)
        start, end = self.offset, self.offset + self.num_local
        return torch.cat([gathered[:start], local.to(gathered.dtype), gathered[end:]])

    def local_slice(self, global_values: torch.Tensor) -> torch.Tensor:
        """This process's entries of a tensor over the global positives."""
        return global_values[self.offset : self.offset + self.num_local]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes (a new tensor)."""
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total
