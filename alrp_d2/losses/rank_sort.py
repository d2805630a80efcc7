"""Rank & Sort Loss (Oksuz, Cam, Akbas, Kalkan, ICCV 2021) on the ranking engine.

Targets are continuous: a positive ``i`` carries a label ``y_i`` in ``(0, 1]`` (the IoU
of its prediction with its ground truth), a negative ``0``, an ignored element ``-1``.
With the authors' step ``H`` (``delta > 0``: ``clamp(x / (2 delta) + 1/2, 0, 1)``;
``delta == 0``: ``1[x >= 0]``) and every sum over positives including ``k = i``::

    rank+(i) = sum_{k in P} H(s_k - s_i)        N_FP(i) = sum_{j in N} H(s_j - s_i)
    l_R(i)   = N_FP(i) / (rank+(i) + N_FP(i))
    l_S(i)   = sum_{k in P} H(s_k - s_i) (1 - y_k) / rank+(i)
    l_S*(i)  = sum_{k in P, y_k >= y_i} H(s_k - s_i) (1 - y_k)
               / sum_{k in P, y_k >= y_i} H(s_k - s_i)
    L_rank   = mean_i l_R(i)        L_sort = mean_i (l_S(i) - l_S*(i))

Error-driven updates (all divided by ``|P|``): a positive with ``N_FP(i) > eps`` gets
``-l_R(i)`` and hands ``l_R(i) H(s_j - s_i) / N_FP(i)`` to each negative ``j``; with
``m_k(i) = 1[y_k < y_i] H(s_k - s_i)`` and ``D(i) = sum_k m_k(i) > eps``, it gets
``-sort(i)`` and hands ``sort(i) m_k(i) / D(i)`` to each positive ``k``.  Each update is
balanced: what a positive loses, the examples it was misranked or missorted with gain.

Cost: the negatives go through the engine's sort-and-histogram pass
(``O(M + N log P)``, no ``P x N`` tensor); the sorting part, a two-key (score, label)
query, is a ``P x P`` computation in row chunks of bounded memory.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
from torch import nn

from .ranking import (
    PositiveStats,
    RankingUpdate,
    _elementwise_dtype,
    check_arguments,
    error_driven,
    positives_of,
    ranking_loss,
    smoothed_step,
    validate_inputs,
)

__all__ = ["RankSortLoss", "rank_sort_loss"]

# Elements of one P x P chunk (float64: 16 MiB per temporary).
_CHUNK_ELEMENTS = 1 << 21


def _positive_pass(scores: torch.Tensor, labels: torch.Tensor, delta: float, eps: float):
    """The positives' side, in row chunks of a ``P x P`` comparison.

    Returns ``rank+``, the sorting error ``l_S - l_S*`` and the sorting update of each
    positive (``-sort(i)`` where ``D(i) > eps``, plus what the others hand to it), not
    yet divided by ``|P|``.
    """
    p = scores.numel()
    rows = max(1, _CHUNK_ELEMENTS // p)
    rank_pos = torch.empty_like(scores)
    sorting = torch.empty_like(scores)
    update = torch.zeros_like(scores)
    wrongness = 1 - labels  # (1 - y_k): what a positive above adds to the sorting error
    for start in range(0, p, rows):
        end = min(start + rows, p)
        # [i, k] H(s_k - s_i), the authors' step: a tie counts 1 when delta == 0
        above = smoothed_step(scores[None, :] - scores[start:end, None], delta, tie=1.0)
        target_order = labels[None, :] >= labels[start:end, None]
        in_target = above * target_order
        rank_pos[start:end] = above.sum(1)
        current = (above @ wrongness) / rank_pos[start:end]
        target = (in_target @ wrongness) / in_target.sum(1)  # > 0: k = i is in it
        sort_error = current - target
        sorting[start:end] = sort_error
        missorted = above.masked_fill_(target_order, 0)  # m_k(i), reusing ``above``
        denominator = missorted.sum(1)
        active = denominator > eps
        share = torch.where(active, sort_error / denominator.clamp_min(eps), 0.0)
        update[start:end] -= torch.where(active, sort_error, 0.0)
        update += share @ missorted
    return rank_pos, sorting, update


def rank_sort_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    delta: float = 0.5,
    eps: float = 1e-10,
    *,
    validate: bool = True,
    process_group=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rank & Sort Loss: ``(L_rank, L_sort)`` (module docstring for the definitions).

    Args:
        logits: ``(M,)`` (or any shape, flattened) class-wise pre-sigmoid scores.
        targets: float tensor shaped like ``logits``: a positive's continuous label in
            ``(0, 1]`` (e.g. the IoU of its predicted box), 0 negative, -1 ignored.
        delta: smoothing of the step function; 0 is the authors' unit step
            ``1[x >= 0]`` (ties count 1).
        eps: a positive with ``N_FP(i) <= eps`` gets no ranking update, one with
            ``D(i) <= eps`` no sorting update.
        validate: check the inputs, at the cost of one host-device synchronisation
            (without it, counting the positives costs one).
        process_group: one ranking over the concatenated ``logits`` and ``targets`` of
            every process of this group (as :func:`alrp_d2.losses.alrp_loss`): every
            process gets the global losses (means over the global positives) and the
            global updates of its own ``logits``; the positives' scores and labels are
            gathered (``O(P)``), the negatives stay in their process.

    Returns:
        ``(ranking_loss, sorting_loss)``. ``ranking_loss`` carries the ranking update to
        ``logits`` (positives and negatives), ``sorting_loss`` the sorting update
        (positives only); backpropagating their sum gives the authors' gradient.
        Without positives both are zero, with zero gradients, still connected to
        ``logits``.
    """
    check_arguments(logits, targets, delta, eps, labels="continuous")
    flat_logits = logits.reshape(-1)
    flat_targets = targets.reshape(-1)
    positive = positives_of(flat_targets, "continuous")
    if validate:
        num_positives = validate_inputs(flat_logits.detach(), flat_targets, labels="continuous",
                                        positive=positive)
    else:
        num_positives = int(positive.sum())
    elementwise = _elementwise_dtype(logits.dtype)
    grouped = process_group is not None and dist.get_world_size(process_group) > 1
    zero = flat_logits[:0].sum().to(elementwise)  # zero gradient, graph connected
    if num_positives == 0 and not grouped:
        return zero, zero.clone()

    with torch.no_grad():
        positive_index = torch.nonzero_static(positive, size=num_positives).squeeze(1)
        labels = flat_targets[positive_index]
    outputs = {}

    def definition(stats: PositiveStats) -> RankingUpdate:
        """The whole loss from the (global) positives' statistics; the sorting part is
        kept for the second output, this process's share of its update sliced out."""
        scores, num_fp = stats.scores, stats.num_fp
        total = stats.num_positives
        rank_pos, sorting, sort_update = _positive_pass(
            scores, stats.gather(labels).to(scores.dtype), delta, eps)
        ranking_error = num_fp / (rank_pos + num_fp)
        active = num_fp > eps
        rank_update = torch.where(active, ranking_error, 0.0)
        negative_weight = torch.where(active, ranking_error / num_fp.clamp_min(eps), 0.0)
        outputs["sorting"] = sorting.mean()
        sort_update = sort_update / total
        if stats.partition is not None:
            sort_update = stats.partition.local_slice(sort_update)
        outputs["sort_update"] = sort_update
        return RankingUpdate(ranking_error.mean(), -rank_update / total, negative_weight / total)

    # The engine's labels: 1 positive, 0 negative, -1 ignored (any negative value); the
    # authors' unit step counts a tie 1.
    engine_targets = positive.to(torch.int8) - (flat_targets < 0).to(torch.int8)
    rank_loss, stats = ranking_loss(logits, engine_targets.view_as(logits), definition,
                                    delta=delta, tie=1.0, num_positives=num_positives,
                                    validate=False, process_group=process_group)
    if stats is None:  # no positive in any process
        return rank_loss, zero

    def sorting_gradient() -> torch.Tensor:
        grad = torch.zeros(flat_logits.shape, dtype=elementwise, device=flat_logits.device)
        grad[positive_index] = outputs["sort_update"].to(elementwise)
        return grad.view_as(logits)

    sort_loss = error_driven(logits, outputs["sorting"].to(elementwise), sorting_gradient)
    return rank_loss, sort_loss


class RankSortLoss(nn.Module):
    """Module form of :func:`rank_sort_loss`."""

    def __init__(self, delta: float = 0.5, eps: float = 1e-10, validate: bool = True,
                 process_group=None):
        super().__init__()
        self.delta, self.eps, self.validate = delta, eps, validate
        self.process_group = process_group

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        return rank_sort_loss(logits, targets, self.delta, self.eps, validate=self.validate,
                              process_group=self.process_group)
