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
query, goes through two-key range sums over the positives (``O(P log P)`` time,
``O(P)`` memory, no ``P x P`` work).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .ranking import (
    NUM_POSITIVES_GIVEN,
    PositiveStats,
    RankingUpdate,
    _elementwise_dtype,
    check_arguments,
    error_driven,
    positives_of,
    ranking_loss,
    validate_inputs,
)

__all__ = ["RankSortLoss", "rank_sort_loss"]


def _dominance_sums(
    keys: torch.Tensor, weights: torch.Tensor, bounds: torch.Tensor, limit: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two-key range sums without comparing every pair.

    ``P`` points sit at positions ``0 .. P-1`` with integer ``keys`` in ``[0, P)`` and rows
    of ``weights`` ``(P, W)``. Query ``q`` has ``R`` adjacent position ranges
    ``[bounds[q, r], bounds[q, r + 1])`` (``bounds`` ``(Q, R + 1)``, non-decreasing rows)
    and a key ``limit[q]`` in ``[0, P]``; for each range::

        below[q, r] = sum of weights[p] over the range with keys[p] <  limit[q]
        above[q, r] = sum of weights[p] over the range with keys[p] >= limit[q]

    A wavelet matrix over the keys' bits, most significant first: each level stably
    partitions the points by one bit (zeros first, positions from a prefix count), and
    every range moves to the part whose bit equals the limit's, the other part's sum
    going to ``below`` (its keys are smaller) or ``above`` (larger); what remains after
    the last bit has keys equal to the limit. Time ``O((P + Q R) W log P)`` in tensor
    operations (the Python loop runs over the ``log P`` levels), memory
    ``O((P + Q R) W)``. A sum over a range without a qualifying point is exactly zero.
    """
    num_points, width = keys.numel(), weights.shape[1]
    num_queries, num_ranges = bounds.shape[0], bounds.shape[1] - 1
    below = weights.new_zeros(num_queries, num_ranges, width)
    above = torch.zeros_like(below)
    position = torch.arange(num_points, device=keys.device)
    # Query-side positions in int32 (half the memory traffic of the per-level updates).
    bounds, limit = bounds.to(torch.int32), limit.to(torch.int32)[:, None]
    zeros_before = torch.zeros(num_points + 1, dtype=torch.int32, device=keys.device)
    cumulative = weights.new_zeros(num_points + 1, width)

    def range_sums(ends):
        at_ends = cumulative.index_select(0, ends.reshape(-1)).view(num_queries, -1, width)
        return at_ends[:, 1:] - at_ends[:, :-1]

    for bit in reversed(range(max(1, num_points.bit_length()))):
        is_zero = ((keys >> bit) & 1) == 0
        torch.cumsum(is_zero, 0, dtype=torch.int32, out=zeros_before[1:])
        num_zeros = zeros_before[-1]
        zeros_so_far = zeros_before[:-1].long()
        new_position = torch.where(is_zero, zeros_so_far, num_zeros + position - zeros_so_far)
        keys = torch.empty_like(keys).index_copy_(0, new_position, keys)
        weights = torch.empty_like(weights).index_copy_(0, new_position, weights)
        torch.cumsum(weights, 0, out=cumulative[1:])
        # Each bound's place in the zeros' part and in the ones' part of the new order.
        in_zeros = zeros_before.index_select(0, bounds.reshape(-1)).view_as(bounds)
        in_ones = bounds - in_zeros + num_zeros
        # Limit bit 1: the zeros' keys are smaller (below), follow the ones; bit 0: the
        # ones' keys are larger (above), follow the zeros. (Selection by arithmetic on the
        # 0/1 bit: several times faster than torch.where on the CPU.)
        limit_bit = (limit >> bit) & 1
        to_zeros = limit_bit * (in_zeros - in_ones)
        passed = range_sums(in_ones + to_zeros)
        into_below = limit_bit.to(weights.dtype)[:, :, None]
        below.addcmul_(passed, into_below)  # times 1 or 0: exact
        above.addcmul_(passed, 1 - into_below)
        bounds = in_zeros - to_zeros
    above += range_sums(bounds)  # what remains has keys equal to the limit
    return below, above


def _step_sums(
    window: torch.Tensor, plateau: torch.Tensor, at: torch.Tensor, delta: float, sign: float
) -> torch.Tensor:
    """``sum_k w_k H(.)`` from :func:`_dominance_sums` of weights in column pairs
    ``(w, w s)``: ``window`` summed where the step is linear,
    ``H = sign (s - at) / (2 delta) + 1/2``, ``plateau`` where it is 1 (``sign``: +1 where
    ``s`` is the other positive's score, -1 where it is the query's)."""
    if delta == 0:
        return plateau[:, 0::2]
    weight, weighted_score = window[:, 0::2], window[:, 1::2]
    return (
        plateau[:, 0::2]
        + sign * (weighted_score - at[:, None] * weight) / (2 * delta)
        + 0.5 * weight
    )


def _positive_pass(scores: torch.Tensor, labels: torch.Tensor, delta: float, eps: float):
    """The positives' side: ``rank+``, the sorting error ``l_S - l_S*`` and the sorting
    update of each positive (``-sort(i)`` where ``D(i) > eps``, plus what the others hand
    to it), not yet divided by ``|P|``.

    Each sum runs over the positives on one side of a label and is a sum of affine
    functions of the scores over score ranges (the step's plateau and its linear
    window): two-key range sums (:func:`_dominance_sums`) with the positives in score
    order and keyed by their place in descending label order, so that ``y_k >= y_i`` is
    ``key_k < #{y >= y_i}``. Two passes (the errors, then the updates they give), no
    ``P x P`` work.
    """
    p = scores.numel()
    # Everything in ascending score order (sorted queries search faster), back at the end.
    score_order = scores.argsort(stable=True)
    scores, labels = scores[score_order], labels[score_order]
    keys = torch.empty_like(score_order)
    keys[labels.argsort(descending=True, stable=True)] = torch.arange(p, device=scores.device)
    sorted_labels = labels.sort().values
    at_least_as_good = p - torch.searchsorted(sorted_labels, labels, right=False)
    better = p - torch.searchsorted(sorted_labels, labels, right=True)

    def find(values, right):
        return torch.searchsorted(scores, values, right=right)

    # Pass 1, for each positive i over the positives k: H(s_k - s_i) is 1 where
    # s_k >= s_i + delta (ties count 1 at delta 0) and linear on (s_i - delta, s_i + delta).
    if delta == 0:
        plateau_lo = find(scores, False)
        window_lo = plateau_lo  # no window
    else:
        plateau_lo, window_lo = find(scores + delta, False), find(scores - delta, True)
    wrongness = 1 - labels
    weights = torch.stack([torch.ones_like(scores), scores, wrongness, wrongness * scores], 1)
    end = torch.full_like(plateau_lo, p)
    better_or_equal, worse = _dominance_sums(
        keys, weights, torch.stack([window_lo, plateau_lo, end], 1), at_least_as_good
    )
    target_rank, target_wrong = _step_sums(*better_or_equal.unbind(1), scores, delta, 1.0).unbind(1)
    missorted, worse_wrong = _step_sums(*worse.unbind(1), scores, delta, 1.0).unbind(1)  # D(i)
    rank_pos = target_rank + missorted
    sorting = (target_wrong + worse_wrong) / rank_pos - target_wrong / target_rank
    active = missorted > eps
    share = torch.where(active, sorting / missorted.clamp_min(eps), 0.0)

    # Pass 2, for each positive k over the positives i with y_i > y_k: H(s_k - s_i) is 1
    # where s_i <= s_k - delta (ties count 1 at delta 0), linear on (s_k - delta, s_k + delta).
    if delta == 0:
        plateau_hi = find(scores, True)
        window_hi = plateau_hi  # no window
    else:
        plateau_hi, window_hi = find(scores - delta, True), find(scores + delta, False)
    received, _ = _dominance_sums(
        keys,
        torch.stack([share, share * scores], 1),
        torch.stack([torch.zeros_like(plateau_hi), plateau_hi, window_hi], 1),
        better,
    )
    plateau, window = received.unbind(1)
    update = _step_sums(window, plateau, scores, delta, -1.0)[:, 0]
    update -= torch.where(active, sorting, 0.0)
    in_input_order = torch.empty_like(score_order)
    in_input_order[score_order] = torch.arange(p, device=scores.device)
    return rank_pos[in_input_order], sorting[in_input_order], update[in_input_order]


def rank_sort_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    delta: float = 0.5,
    eps: float = 1e-10,
    *,
    validate: bool = True,
    process_group=None,
    num_positives: Optional[int] = None,
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
            (without it, counting the positives costs one, unless ``num_positives``).
        process_group: one ranking over the concatenated ``logits`` and ``targets`` of
            every process of this group (as :func:`alrp_d2.losses.alrp_loss`): every
            process gets the global losses (means over the global positives) and the
            global updates of its own ``logits``; the positives' scores and labels are
            gathered (``O(P)``), the negatives stay in their process.
        num_positives: the number of positives (targets above 0), where the caller knows
            it on the host: with ``validate=False`` the loss then never synchronises host
            and device; with ``validate`` it is checked against the targets. A wrong
            number unchecked gives a wrong loss.

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
        num_positives = validate_inputs(
            flat_logits.detach(),
            flat_targets,
            labels="continuous",
            num_positives=num_positives,
            num_positives_from=NUM_POSITIVES_GIVEN,
            positive=positive,
        )
    elif num_positives is None:
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
            scores, stats.gather(labels).to(scores.dtype), delta, eps
        )
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
    rank_loss, stats = ranking_loss(
        logits,
        engine_targets.view_as(logits),
        definition,
        delta=delta,
        tie=1.0,
        num_positives=num_positives,
        validate=False,
        process_group=process_group,
    )
    if stats is None:  # no positive in any process
        return rank_loss, zero

    def sorting_gradient() -> torch.Tensor:
        grad = torch.zeros(flat_logits.shape, dtype=elementwise, device=flat_logits.device)
        grad[positive_index] = outputs["sort_update"].to(elementwise)
        return grad.view_as(logits)

    sort_loss = error_driven(logits, outputs["sorting"].to(elementwise), sorting_gradient)
    return rank_loss, sort_loss


class RankSortLoss(nn.Module):
    """Module form of :func:`rank_sort_loss` (``num_positives`` per call)."""

    def __init__(
        self, delta: float = 0.5, eps: float = 1e-10, validate: bool = True, process_group=None
    ):
        super().__init__()
        self.delta, self.eps, self.validate = delta, eps, validate
        self.process_group = process_group

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        num_positives: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return rank_sort_loss(
            logits,
            targets,
            self.delta,
            self.eps,
            validate=self.validate,
            process_group=self.process_group,
            num_positives=num_positives,
        )
