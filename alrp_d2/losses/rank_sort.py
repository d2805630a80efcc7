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

from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .distributed import PositivePartition
from .ranking import PositiveStats, RankingUpdate, ranking_loss

__all__ = ["RankSortLoss", "rank_sort_loss"]

# Elements of one P x P chunk (float64: 16 MiB per temporary).
_CHUNK_ELEMENTS = 1 << 21


class _GivenGradient(torch.autograd.Function):
    """Returns ``value``; the backward pass gives ``logits`` the tensor ``gradient_fn()``
    (an error-driven update, not the derivative of the value)."""

    @staticmethod
    def forward(ctx, logits, value, gradient_fn):
        ctx.gradient_fn = gradient_fn
        ctx.logits_dtype = logits.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.gradient_fn()
        ctx.gradient_fn = None
        return (grad * grad_output).to(ctx.logits_dtype), None, None


def _step(x: torch.Tensor, delta: float) -> torch.Tensor:
    """The authors' step: ties count 1 when ``delta == 0`` (``x >= 0``)."""
    if delta == 0:
        return (x >= 0).to(x.dtype)
    return (x / (2 * delta) + 0.5).clamp_(0.0, 1.0)


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
        above = _step(scores[None, :] - scores[start:end, None], delta)  # [i, k] H(s_k - s_i)
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


class _UnitStepNegatives:
    """Negatives counted with the unit step ``1[s_j >= s_i]`` (``delta == 0``), which the
    engine's ``H(0) = 1/2`` convention does not give: each negative is located among the
    sorted positive scores once, then prefix sums answer every positive."""

    def __init__(self, scores: torch.Tensor, negative: torch.Tensor,
                 positive_scores: torch.Tensor, wide: torch.dtype):
        sorted_scores = positive_scores.sort().values
        p = sorted_scores.numel()
        # Bin b: negatives with exactly b positive scores <= theirs; others go to bin 0,
        # where no positive counts them.
        located = torch.searchsorted(sorted_scores, scores.to(sorted_scores.dtype), right=True)
        self.bin = torch.where(negative, located, 0)
        count = torch.zeros(p + 1, dtype=wide, device=scores.device)
        count.index_add_(0, self.bin, negative.to(wide))
        # s_j >= s_i exactly when bin(j) > first(i), first(i) the count of scores < s_i.
        self.first = torch.searchsorted(sorted_scores, positive_scores, right=False)
        above = count.flip(0).cumsum(0).flip(0)  # above[b] = negatives in bins >= b
        self.num_fp = torch.cat([above, above.new_zeros(1)])[self.first + 1]
        self.negative = negative
        self.size = p + 1

    def distribute(self, weight: torch.Tensor) -> torch.Tensor:
        """``sum_i weight_i 1[s_j >= s_i]`` for every negative ``j``, 0 elsewhere."""
        per_bin = torch.zeros(self.size, dtype=weight.dtype, device=weight.device)
        per_bin.index_add_(0, self.first, weight)
        below = torch.cat([per_bin.new_zeros(1), per_bin.cumsum(0)[:-1]])  # bins < b
        return torch.where(self.negative, below[self.bin], 0.0)


def _check(logits: torch.Tensor, targets: torch.Tensor, delta: float, eps: float) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ValueError("logits and targets must be tensors")
    if logits.shape != targets.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)} and targets {tuple(targets.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if not targets.is_floating_point():
        raise ValueError(
            f"targets must be floating point (continuous labels in (0, 1]), got {targets.dtype}")
    if not (delta >= 0 and delta < float("inf")):
        raise ValueError(f"delta must be a finite number >= 0, got {delta}")
    if not (eps >= 0 and eps < float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")


def _validated_count(logits: torch.Tensor, targets: torch.Tensor, positive: torch.Tensor) -> int:
    """Input checks and the number of positives, with one host-device synchronisation."""
    bad_logits = ~torch.isfinite(logits).all()
    low, high = torch.aminmax(targets)
    bad_targets = (low.isnan() | high.isnan() | (low < -1) | (high > 1)
                   | ((targets < 0) & (targets != -1)).any())
    bad_logits, bad_targets, count = torch.stack(
        [bad_logits.to(torch.int64), bad_targets.to(torch.int64), positive.sum()]).tolist()
    if bad_logits:
        raise ValueError("logits contain NaN or Inf")
    if bad_targets:
        raise ValueError(
            "targets must be a label in (0, 1] (positive), 0 (negative) or -1 (ignored)")
    return count


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
    _check(logits, targets, delta, eps)
    flat_logits = logits.reshape(-1)
    flat_targets = targets.reshape(-1)
    positive = flat_targets > 0
    if validate:
        num_positives = _validated_count(flat_logits.detach(), flat_targets, positive)
    else:
        num_positives = int(positive.sum())
    elementwise = torch.float64 if logits.dtype == torch.float64 else torch.float32
    grouped = process_group is not None and dist.get_world_size(process_group) > 1
    zero = flat_logits[:0].sum().to(elementwise)  # zero gradient, graph connected
    if num_positives == 0 and not grouped:
        return zero, zero.clone()
    # For delta > 0 the engine makes its own partition (and returns no stats without any
    # positive in the group).
    partition = PositivePartition(num_positives, process_group, logits.device) \
        if grouped and delta == 0 else None
    if partition is not None and partition.num_global == 0:
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

    if delta > 0:
        # The engine's labels: 1 positive, 0 negative, -1 ignored (any negative value).
        engine_targets = positive.to(torch.int8) - (flat_targets < 0).to(torch.int8)
        rank_loss, stats = ranking_loss(flat_logits.view_as(logits), engine_targets.view_as(logits),
                                        definition, delta=delta, num_positives=num_positives,
                                        validate=False, process_group=process_group)
        if stats is None:  # no positive in any process
            return rank_loss, zero
    else:
        rank_loss = _unit_step_ranking(flat_logits, flat_targets, positive_index, definition,
                                       partition)

    def sorting_gradient() -> torch.Tensor:
        grad = torch.zeros(flat_logits.shape, dtype=elementwise, device=flat_logits.device)
        grad[positive_index] = outputs["sort_update"].to(elementwise)
        return grad.view_as(logits)

    sort_loss = _GivenGradient.apply(logits, outputs["sorting"].to(elementwise), sorting_gradient)
    return rank_loss, sort_loss


def _unit_step_ranking(flat_logits: torch.Tensor, flat_targets: torch.Tensor,
                       positive_index: torch.Tensor,
                       definition: Callable[[PositiveStats], RankingUpdate],
                       partition: Optional[PositivePartition] = None) -> torch.Tensor:
    """The ranking part for ``delta == 0``, where negatives tied with a positive count 1;
    with ``partition``, this process's negatives against every process's positives."""
    elementwise = torch.float64 if flat_logits.dtype == torch.float64 else torch.float32
    wide = torch.float64 if flat_logits.device.type != "mps" else elementwise
    with torch.no_grad():
        scores = flat_logits.detach().to(elementwise)
        positive_scores = scores[positive_index].to(wide)
        if partition is not None:
            positive_scores = partition.gather(positive_scores)
        negatives = _UnitStepNegatives(scores, flat_targets == 0, positive_scores, wide)
        num_fp = negatives.num_fp if partition is None else partition.sum(negatives.num_fp)
        sorted_scores, order = positive_scores.sort(stable=True)
        # Only ``scores`` and ``num_fp`` are read by the definition; rank+ is recomputed
        # with the authors' step there.
        stats = PositiveStats(positive_scores, sorted_scores, order, None, num_fp, None, 0.0,
                              partition)
    update = definition(stats)

    def gradient() -> torch.Tensor:
        grad = negatives.distribute(update.negative_weight.to(wide))
        positive_grad = update.positive_grad
        if partition is not None:
            positive_grad = partition.local_slice(positive_grad)
        grad[positive_index] = positive_grad.to(grad.dtype)
        return grad.to(elementwise)

    return _GivenGradient.apply(flat_logits, update.loss.to(elementwise), gradient)


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
