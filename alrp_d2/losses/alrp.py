"""aLRP, AP and NDCG losses: short definitions on the ranking engine.

Each definition maps the positives' ranking statistics to a loss value and the
error-driven update of the generalised framework (Oksuz et al., NeurIPS 2020,
Section 3): a positive ``i`` with error ``l(i)`` and target error ``l*(i)`` gets
``dL/ds_i = -(l(i) - l*(i)) / Z`` and hands the same amount to the negatives in
proportion to ``H(s_j - s_i) / N_FP(i)``.  Gradients of positives and negatives
therefore have equal total magnitude (Theorem 2).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .ranking import NUM_POSITIVES_GIVEN, PositiveStats, RankingUpdate, ranking_loss

__all__ = [
    "ALRPLoss",
    "APLoss",
    "NDCGLoss",
    "alrp_loss",
    "ap_loss",
    "cumulative_errors",
    "ndcg_loss",
]


def _spread_over_false_positives(stats: PositiveStats, update: torch.Tensor, eps: float):
    """Positives with ``N_FP(i) > eps`` keep ``update`` and spread it as ``update/N_FP``;
    the others neither get nor send an update."""
    active = stats.num_fp > eps
    update = torch.where(active, update, torch.zeros_like(update))
    weight = torch.where(active, update / stats.num_fp.clamp_min(eps), torch.zeros_like(update))
    return update, weight


def cumulative_errors(stats: PositiveStats, errors: torch.Tensor) -> torch.Tensor:
    """``cumE(i) = E(i) + sum_{k != i} E(k) H0(s_k - s_i)`` (unit step, ties count 1/2):
    each positive's error plus those of the positives scored above it. ``errors`` are
    aligned with ``stats.scores``; the result is differentiable in them."""
    errors = errors.to(stats.scores.dtype)
    return stats.positive_step_sums(errors, delta=0) + errors


def alrp_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loc_errors: torch.Tensor,
    delta: float = 1.0,
    eps: float = 1e-5,
    *,
    validate: bool = True,
    process_group=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Average Localisation-Recall-Precision loss, split into its two components.

    With ``rank(i) = rank+(i) + N_FP(i)`` (see :mod:`alrp_d2.losses.ranking`)::

        L_cls = 1/|P| sum_i N_FP(i) / rank(i)
        L_loc = 1/|P| sum_i cumE(i) / rank(i)       rank(i) detached
        cumE(i) = E(i) + sum_{k != i} E(k) H0(s_k - s_i)     (unit step H0)

    ``L_cls`` gets the error-driven gradient: for a positive with ``N_FP(i) > eps``
    ``dL/ds_i = -(N_FP(i) + sum_{k != i} E(k) H(s_k - s_i)) / rank(i) / |P|``, spread
    over the negatives in proportion to ``H(s_j - s_i) / N_FP(i)``; ``L_loc`` is
    differentiable in ``loc_errors``.  Tied positives count 1/2 each in ``cumE``.

    Args:
        logits: ``(M,)`` class-wise flattened pre-sigmoid scores.
        targets: ``(M,)``: 1 positive, 0 negative, -1 ignored.
        loc_errors: ``(P,)`` localisation errors in ``[0, 1]`` of the positives, in
            the order they appear in ``logits`` (e.g. ``(1 - IoU) / (1 - tau)``).
        delta: smoothing of the step function; 0 is the unit step.
        eps: positives with ``N_FP <= eps`` get no classification update.
        validate: check the inputs, at the cost of one host-device synchronisation.
        process_group: one ranking over the concatenated ``logits``, ``targets`` and
            ``loc_errors`` of every process of this group (see
            :func:`alrp_d2.losses.ranking.ranking_loss`): every process gets the global
            losses (normalised by the global number of positives) and the global
            gradient with respect to its own ``logits`` and ``loc_errors``.

    Returns:
        ``(cls_loss, loc_loss)``; the aLRP loss value is their sum.
    """
    if not isinstance(loc_errors, torch.Tensor) or loc_errors.dim() != 1:
        raise ValueError("loc_errors must be a 1-D tensor with one entry per positive")
    num_positives = loc_errors.shape[0]
    loc_detached = loc_errors.detach()

    def definition(stats: PositiveStats) -> RankingUpdate:
        errors = stats.gather(loc_detached).to(stats.scores.dtype)
        cls = (stats.num_fp / stats.rank).mean()
        above_errors = stats.positive_step_sums(errors)
        update, weight = _spread_over_false_positives(
            stats, (stats.num_fp + above_errors) / stats.rank, eps
        )
        total = stats.num_positives
        return RankingUpdate(cls, -update / total, weight / total)

    cls_loss, stats = ranking_loss(
        logits,
        targets,
        definition,
        delta=delta,
        num_positives=num_positives,
        validate=validate,
        extra_finite={"loc_errors": loc_errors},
        process_group=process_group,
    )
    if stats is None:
        return cls_loss, loc_errors.sum() * 0.0
    loc_loss = (cumulative_errors(stats, stats.gather_keeping_grad(loc_errors)) / stats.rank).mean()
    return cls_loss, loc_loss.to(cls_loss.dtype)


def ap_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    delta: float = 1.0,
    *,
    validate: bool = True,
    process_group=None,
    num_positives: Optional[int] = None,
) -> torch.Tensor:
    """AP Loss (Chen et al.): ``1 - mean_i iprec(i)``.

    ``prec(i) = rank+(i) / rank(i)`` and ``iprec(i) = max prec(k)`` over the positives
    with ``s_k <= s_i``.  Positive ``i`` gets ``-(1 - iprec(i)) / |P|`` and sends
    ``a(i) H(s_j - s_i) / rank(i) / |P|`` to negative ``j``, with ``a(i) = 1`` where
    ``iprec(i) = prec(i)`` and ``(1 - iprec(i)) / (1 - prec(i))`` elsewhere (AP Loss has
    no ``N_FP`` test, hence no ``eps``).
    ``process_group``: one ranking across processes, as in :func:`alrp_loss`.
    ``num_positives``: the number of positives (targets equal to 1), where the caller
    knows it on the host: with ``validate=False`` the loss then never synchronises
    host and device (without it, counting them costs one synchronisation); with
    ``validate`` it is checked against the targets. A wrong number unchecked gives
    a wrong loss.
    """

    def definition(stats: PositiveStats) -> RankingUpdate:
        precision = stats.rank_pos / stats.rank
        # Running maximum from the lowest score up; ties share their group's maximum.
        running_max = precision[stats.order].cummax(0).values
        last_tied = torch.searchsorted(stats.sorted_scores, stats.scores, right=True) - 1
        interpolated = running_max[last_tied]
        shortfall = 1 - interpolated
        is_interpolated = interpolated > precision
        share = torch.where(
            is_interpolated,
            shortfall / (1 - precision).clamp_min(torch.finfo(precision.dtype).tiny),
            torch.ones_like(precision),
        )
        p = stats.num_positives
        return RankingUpdate(shortfall.mean(), -shortfall / p, share / stats.rank / p)

    loss, _ = ranking_loss(
        logits,
        targets,
        definition,
        delta=delta,
        num_positives=num_positives,
        num_positives_from=NUM_POSITIVES_GIVEN,
        validate=validate,
        process_group=process_group,
    )
    return loss


def ndcg_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    delta: float = 1.0,
    eps: float = 1e-5,
    *,
    validate: bool = True,
    process_group=None,
    num_positives: Optional[int] = None,
) -> torch.Tensor:
    """NDCG Loss (supplementary S4): ``1 - sum_i G(i) / G_max``.

    ``G(i) = 1 / log2(1 + rank(i))`` and ``G_max = sum_{r=1..|P|} 1 / log2(1 + r)``.
    A positive with ``N_FP(i) > eps`` gets ``-(1 - G(i)) / G_max`` and spreads it over
    the negatives in proportion to ``H(s_j - s_i) / N_FP(i)`` (``Z = 1``).
    ``process_group``: one ranking across processes, as in :func:`alrp_loss`;
    ``num_positives``: as in :func:`ap_loss`.
    """

    def definition(stats: PositiveStats) -> RankingUpdate:
        gain = 1.0 / torch.log2(1.0 + stats.rank)
        ideal_ranks = torch.arange(1, stats.num_positives + 1, dtype=gain.dtype, device=gain.device)
        max_gain = (1.0 / torch.log2(1.0 + ideal_ranks)).sum()
        update, weight = _spread_over_false_positives(stats, (1 - gain) / max_gain, eps)
        return RankingUpdate(1 - gain.sum() / max_gain, -update, weight)

    loss, _ = ranking_loss(
        logits,
        targets,
        definition,
        delta=delta,
        num_positives=num_positives,
        num_positives_from=NUM_POSITIVES_GIVEN,
        validate=validate,
        process_group=process_group,
    )
    return loss


class ALRPLoss(nn.Module):
    """Module form of :func:`alrp_loss` (the same arguments)."""

    def __init__(
        self, delta: float = 1.0, eps: float = 1e-5, *, validate: bool = True, process_group=None
    ):
        super().__init__()
        self.delta, self.eps, self.validate = delta, eps, validate
        self.process_group = process_group

    def forward(self, logits, targets, loc_errors):
        return alrp_loss(
            logits,
            targets,
            loc_errors,
            self.delta,
            self.eps,
            validate=self.validate,
            process_group=self.process_group,
        )


class APLoss(nn.Module):
    """Module form of :func:`ap_loss` (the same arguments; ``num_positives`` per call)."""

    def __init__(self, delta: float = 1.0, *, validate: bool = True, process_group=None):
        super().__init__()
        self.delta, self.validate, self.process_group = delta, validate, process_group

    def forward(self, logits, targets, num_positives: Optional[int] = None):
        return ap_loss(
            logits,
            targets,
            self.delta,
            validate=self.validate,
            process_group=self.process_group,
            num_positives=num_positives,
        )


class NDCGLoss(nn.Module):
    """Module form of :func:`ndcg_loss` (the same arguments; ``num_positives`` per call)."""

    def __init__(
        self, delta: float = 1.0, eps: float = 1e-5, *, validate: bool = True, process_group=None
    ):
        super().__init__()
        self.delta, self.eps, self.validate = delta, eps, validate
        self.process_group = process_group

    def forward(self, logits, targets, num_positives: Optional[int] = None):
        return ndcg_loss(
            logits,
            targets,
            self.delta,
            self.eps,
            validate=self.validate,
            process_group=self.process_group,
            num_positives=num_positives,
        )
