"""The ranking engine shared by every ranking-based loss of this package.

A ranking-based loss in the error-driven framework of Chen et al. (AP Loss) and
Oksuz et al. (aLRP Loss) is defined by per-positive quantities only: each positive
``i`` has an error ``l(i)``, a target ``l*(i)`` and hence an update that it spreads
over the negatives ``j`` in proportion to ``H(s_j - s_i)``, the smoothed step

    H(x) = clamp(x / (2 delta) + 1/2, 0, 1)        (delta > 0)
    H(x) = 1[x > 0] + 1[x = 0] / 2                 (delta = 0, the unit step)

The engine computes, without any loop over positives and without a ``|P| x |N|``
tensor,

    rank+(i) = 1 + sum_{k in P, k != i} H(s_k - s_i)
    N_FP(i)  =     sum_{j in N}         H(s_j - s_i)
    rank(i)  = rank+(i) + N_FP(i)

and then, given weights ``c_i`` chosen by a loss definition, the negatives'
gradients ``sum_i c_i H(s_j - s_i)``.  Because ``H`` is piecewise linear, both are
sums over score intervals.  The ``2|P|`` boundaries ``s_i -+ delta`` cut the score
axis into bins; every negative is located among them once (``O(|N| log |P|)``) and
histogrammed (count and sum of offsets from the bin's lower edge).  Prefix sums over
the bins then answer each positive's interval query, and per-bin linear functions
give each negative its gradient.  Time ``O(M + |N| log |P| + |P| log |P|)``,
memory ``O(M)``.

Per-element work runs in float32 (float64 for float64 logits); sums over bins and
positives run in float64 where the device has it, so that prefix-sum differences do
not lose precision at tens of millions of anchors.

The engine never synchronises host and device when the number of positives is
given and validation is off; validation (on by default) costs one synchronisation.

With a ``process_group``, the loss is that of one ranking over the concatenation of
every process's ``logits`` and ``targets`` (:mod:`alrp_d2.losses.distributed`): every
process returns the global loss and its own inputs' part of the global gradient; the
processes exchange ``O(P)`` numbers per call, never their negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

from .distributed import PositivePartition

__all__ = [
    "LABELS",
    "NUM_POSITIVES_GIVEN",
    "PositiveStats",
    "RankingUpdate",
    "check_arguments",
    "error_driven",
    "positives_of",
    "ranking_loss",
    "smoothed_step",
    "sorted_step_sums",
    "validate_inputs",
]


def smoothed_step(x: torch.Tensor, delta: float, tie: float = 0.5) -> torch.Tensor:
    """``H(x)``: the piecewise-linear step of width ``2 delta``; the unit step with
    ``H(0) = tie`` when ``delta == 0`` (1/2 for aLRP, AP and NDCG Loss, 1 for Rank & Sort
    Loss, whose authors count a tie as ``x >= 0``)."""
    if delta == 0:
        return (x > 0).to(x.dtype) + tie * (x == 0).to(x.dtype)
    return (x / (2 * delta) + 0.5).clamp(0.0, 1.0)


def _wide_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """Dtype for sums over positives and bins: float64 unless the device lacks it."""
    if dtype == torch.float64 or device.type != "mps":
        return torch.float64
    return torch.float32


def _elementwise_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for per-anchor work: float32, or float64 for float64 logits."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sorted_step_sums(
    values_sorted: torch.Tensor,
    weights: torch.Tensor,
    queries: torch.Tensor,
    delta: float,
    tie: float = 0.5,
) -> torch.Tensor:
    """``out[q] = sum_k weights[k] * H(values_sorted[k] - queries[q])`` (``H(0) = tie``
    for ``delta == 0``).

    ``values_sorted`` must be ascending; ``weights`` is aligned with it and may
    require grad (the result is differentiable in ``weights``).  Each query costs
    two binary searches on prefix sums of ``w`` and ``w * v``.
    """
    zero = weights.new_zeros(1)
    cum_w = torch.cat([zero, weights.cumsum(0)])
    total = cum_w[-1]
    if delta == 0:
        below_or_equal = torch.searchsorted(values_sorted, queries, right=True)
        below = torch.searchsorted(values_sorted, queries, right=False)
        above = total - cum_w[below_or_equal]
        equal = cum_w[below_or_equal] - cum_w[below]
        return above + tie * equal
    cum_wv = torch.cat([zero, (weights * values_sorted).cumsum(0)])
    upper = torch.searchsorted(values_sorted, queries + delta, right=True)
    lower = torch.searchsorted(values_sorted, queries - delta, right=True)
    window_w = cum_w[upper] - cum_w[lower]
    window_wv = cum_wv[upper] - cum_wv[lower]
    above = total - cum_w[upper]
    return above + (window_wv - queries * window_w) / (2 * delta) + 0.5 * window_w


def _locate(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """``torch.bucketize(x, bounds)`` (the count of bounds ``< x``), as int32.

    On the CPU a binary search per element is slow (a mispredicted branch per
    step), so most elements are located by one lookup in a table over a uniform
    grid of cells; only elements in cells that hold a boundary (widened by a quarter
    cell against rounding) take the binary search.
    """
    n = bounds.numel()
    if x.device.type != "cpu" or x.numel() < 65536 or n < 8:
        return torch.bucketize(x, bounds, right=False, out_int32=True)
    low, high = float(bounds[0]), float(bounds[-1])
    span = high - low
    cells = min(32 * n, 1 << 20)
    if not (span > 0 and math.isfinite(span)):
        return torch.bucketize(x, bounds, right=False, out_int32=True)
    scale = cells / span
    # Table entry k + 1 describes cell k = floor((x - low) * scale), k in [-1, cells + 1].
    k = torch.arange(-1, cells + 2, dtype=torch.float64)
    left = torch.searchsorted(bounds.double(), low + (k - 0.25) / scale, right=False)
    right = torch.searchsorted(bounds.double(), low + (k + 1.25) / scale, right=True)
    table = torch.where(left == right, left, -1).to(torch.int32)
    table[0] = 0  # x < low exactly when x - low < 0: below every boundary
    table[-1] = n  # far above the last boundary
    cell = (x - low).mul_(scale).floor_().clamp_(-1, cells + 1).to(torch.int32).add_(1)
    located = table.index_select(0, cell)
    unsure = torch.nonzero(located < 0).squeeze(1)
    if unsure.numel():
        located[unsure] = torch.bucketize(x[unsure], bounds, right=False, out_int32=True)
    return located


class _NegativeBins:
    """Negatives histogrammed among the positives' boundaries ``s_i -+ delta``.

    Bin ``b`` holds the scores ``x`` with ``B[b-1] < x <= B[b]`` (``B`` sorted);
    everything that is not a negative is sent to bin 0, below every boundary,
    where it neither counts nor receives a gradient. With ``delta == 0`` a negative tied
    with a positive counts ``tie`` (the unit step's ``H(0)``).
    """

    def __init__(
        self,
        scores: torch.Tensor,
        negative: torch.Tensor,
        positive_scores: torch.Tensor,
        delta: float,
        wide: torch.dtype,
        tie: float = 0.5,
    ):
        elementwise = scores.dtype
        self.delta = delta
        self.tie = tie
        # Each positive's interval (lower, upper], in the very values stored as
        # boundaries, so that a positive's own boundaries fall on bin edges exactly.
        lower, upper = positive_scores - delta, positive_scores + delta
        bounds = upper.sort().values if delta == 0 else torch.cat([lower, upper]).sort().values
        self.bounds = bounds.contiguous()
        self.num_bins = bounds.numel() + 1
        self.centre = positive_scores.to(wide)
        x = torch.where(negative, scores, scores.new_full((), float("-inf")))
        self.bin = _locate(x, self.bounds)
        # Lower edge of each bin (bin 0: the first boundary, so its offsets clamp to 0).
        self.lower_edge = torch.cat([self.bounds[:1], self.bounds])
        self.offset = (x - self.lower_edge.index_select(0, self.bin)).clamp_min_(0)
        if x.device.type == "cpu":
            count = torch.bincount(self.bin, minlength=self.num_bins).to(wide)
        else:  # bincount sizes its output from the data: a synchronisation on accelerators
            count = torch.zeros(self.num_bins, dtype=wide, device=x.device)
            count.index_add_(0, self.bin, count.new_ones(()).expand(x.numel()))
        offset_sum = torch.zeros(self.num_bins, dtype=elementwise, device=x.device)
        offset_sum.index_add_(0, self.bin, self.offset)
        # Sum of the scores of each bin, rebuilt in wide precision from bounded offsets.
        score_sum = offset_sum.to(wide) + count * self.lower_edge.to(wide)
        count[0] = 0
        score_sum[0] = 0
        zero = count.new_zeros(1)
        self.cum_count = torch.cat([zero, count.cumsum(0)])
        self.cum_score = torch.cat([zero, score_sum.cumsum(0)])
        # Bins [window_start_i, window_end_i) hold the scores in (lower_i, upper_i],
        # bins >= window_end_i the scores above upper_i.
        self.window_start = torch.searchsorted(self.bounds, lower, right=True)
        self.window_end = torch.searchsorted(self.bounds, upper, right=True)
        if delta == 0:
            # The unit step counts a tie ``tie``: count the scores equal to each upper edge.
            self.equal_bin = torch.searchsorted(self.bounds, upper, right=False)
            upper_edge = torch.cat([self.bounds, self.bounds.new_full((1,), float("inf"))])
            self.at_upper_edge = x == upper_edge.index_select(0, self.bin)
            equal = torch.zeros(self.num_bins, dtype=elementwise, device=x.device)
            equal.index_add_(0, self.bin, self.at_upper_edge.to(elementwise))
            self.equal_count = equal.to(wide)

    def step_sums(self) -> torch.Tensor:
        """``N_FP(i) = sum_j H(s_j - s_i)`` over the negatives, for each positive."""
        above = self.cum_count[-1] - self.cum_count[self.window_end]
        if self.delta == 0:
            return above + self.tie * self.equal_count[self.equal_bin]
        start, end = self.window_start, self.window_end
        window_count = self.cum_count[end] - self.cum_count[start]
        window_score = self.cum_score[end] - self.cum_score[start]
        return (
            above
            + (window_score - self.centre * window_count) / (2 * self.delta)
            + 0.5 * window_count
        )

    def _gather(self, per_bin_values: torch.Tensor) -> torch.Tensor:
        return per_bin_values.to(self.offset.dtype).index_select(0, self.bin)

    def distribute(self, weight: torch.Tensor) -> torch.Tensor:
        """``sum_i weight_i H(x - s_i)`` for every negative ``x``, 0 for other elements."""

        def per_bin(index, value):
            out = torch.zeros(self.num_bins, dtype=value.dtype, device=value.device)
            return out.index_add_(0, index, value)

        # Positive i lies below every score of the bins >= window_end_i ...
        below = per_bin(self.window_end, weight).cumsum(0)
        if self.delta == 0:
            tied = per_bin(self.equal_bin, weight)
            return self._gather(below) + self.tie * self.at_upper_edge * self._gather(tied)
        # ... and within delta of the scores of the bins in [window_start_i, window_end_i).
        window = (per_bin(self.window_start, weight) - per_bin(self.window_end, weight)).cumsum(0)
        weighted_centre = weight * self.centre
        window_centre = (
            per_bin(self.window_start, weighted_centre) - per_bin(self.window_end, weighted_centre)
        ).cumsum(0)
        two_delta = 2 * self.delta
        edge = self.lower_edge.to(window.dtype)
        base = below + 0.5 * window + (window * edge - window_centre) / two_delta
        slope = window / two_delta
        return torch.addcmul(self._gather(base), self._gather(slope), self.offset)


@dataclass
class PositiveStats:
    """Per-positive ranking statistics, in the order the positives appear in ``logits``.

    All tensors are detached, of shape ``(P,)`` and of a wide dtype (float64 where the
    device has it).  ``scores`` are the positives' logits; ``rank_pos`` is ``rank+``,
    ``num_fp`` is ``N_FP`` and ``rank`` is their sum.

    In a ranking across processes (``partition`` set) the positives are those of every
    process, concatenated by rank; :meth:`gather` brings a per-positive tensor of this
    process (e.g. localisation errors) into that order.
    """

    scores: torch.Tensor
    sorted_scores: torch.Tensor
    order: torch.Tensor
    rank_pos: torch.Tensor
    num_fp: torch.Tensor
    rank: torch.Tensor
    delta: float
    partition: Optional[PositivePartition] = None

    @property
    def num_positives(self) -> int:
        return self.scores.numel()

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """This process's per-positive ``local`` values extended to every positive
        (detached); ``local`` itself without a process group."""
        return local.detach() if self.partition is None else self.partition.gather(local)

    def gather_keeping_grad(self, local: torch.Tensor) -> torch.Tensor:
        """:meth:`gather`, differentiable in this process's ``local``."""
        return local if self.partition is None else self.partition.gather_keeping_grad(local)

    def positive_step_sums(
        self, weights: torch.Tensor, delta: Optional[float] = None
    ) -> torch.Tensor:
        """``sum_{k in P, k != i} w_k H(s_k - s_i)`` for each positive ``i``.

        ``weights`` are aligned with ``scores`` and may require grad; ``delta``
        defaults to the loss's (pass 0 for the unit step).
        """
        delta = self.delta if delta is None else delta
        weights = weights.to(self.scores.dtype)
        total = sorted_step_sums(self.sorted_scores, weights[self.order], self.scores, delta)
        return total - 0.5 * weights  # H(0) = 1/2 for the positive itself


class RankingUpdate(NamedTuple):
    """What a loss definition returns to the engine.

    ``loss``: the loss value (scalar).  ``positive_grad``: ``dL/ds_i`` of each
    positive, ``(P,)``.  ``negative_weight``: ``c_i`` such that a negative ``j``
    receives ``dL/ds_j = sum_i c_i H(s_j - s_i)``, ``(P,)``.
    """

    loss: torch.Tensor
    positive_grad: torch.Tensor
    negative_weight: torch.Tensor


class _ErrorDrivenGradient(torch.autograd.Function):
    """Returns ``value`` in the forward pass; the backward pass gives ``logits`` the
    gradient computed by the ranking engine instead of the value's derivative."""

    @staticmethod
    def forward(ctx, logits, value, gradient_fn):
        ctx.gradient_fn = gradient_fn
        ctx.logits_dtype = logits.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.gradient_fn()
        ctx.gradient_fn = None  # free the saved bins
        return (grad * grad_output).to(ctx.logits_dtype), None, None


def error_driven(
    logits: torch.Tensor, value: torch.Tensor, gradient_fn: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``value``, whose backward pass gives ``logits`` the gradient ``gradient_fn()``
    (shaped like ``logits``, computed only then): how every ranking loss of this package
    hands its error-driven update to the logits instead of a derivative."""
    return _ErrorDrivenGradient.apply(logits, value, gradient_fn)


# The labels a ranking loss takes: what a positive is, and how bad targets are described.
LABELS = {
    "binary": "targets must contain only 1 (positive), 0 (negative) or -1 (ignored)",
    "continuous": "targets must be a label in (0, 1] (positive), 0 (negative) or -1 (ignored)",
}


# The message of validate_inputs for a ``num_positives`` argument that is not the targets'.
NUM_POSITIVES_GIVEN = "num_positives is {}"


def check_arguments(
    logits, targets, delta: float, eps: Optional[float] = None, labels: str = "binary"
) -> None:
    """The checks that cost nothing (no look at the values): tensors, shapes, dtypes, the
    smoothing ``delta`` and the threshold ``eps``; ``ValueError`` naming the problem."""
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ValueError("logits and targets must be tensors")
    if logits.shape != targets.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)} and targets {tuple(targets.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if labels == "continuous" and not targets.is_floating_point():
        raise ValueError(
            f"targets must be floating point (continuous labels in (0, 1]), got {targets.dtype}"
        )
    if not (delta >= 0 and delta < float("inf")):
        raise ValueError(f"delta must be a finite number >= 0, got {delta}")
    if eps is not None and not (eps >= 0 and eps < float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")


def positives_of(targets: torch.Tensor, labels: str = "binary") -> torch.Tensor:
    """Which elements are positives: target 1 (binary labels), above 0 (continuous)."""
    return targets == 1 if labels == "binary" else targets > 0


def _any_not_finite(tensor: torch.Tensor) -> torch.Tensor:
    # A sum is a fast screen (NaN or Inf anywhere make it non-finite); only when it
    # is non-finite does the exact element-wise test run (finite values may overflow).
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    if tensor.device.type == "cpu" and bool(torch.isfinite(total)):
        return total.new_zeros((), dtype=torch.bool)
    return ~torch.isfinite(tensor).all()


def _any_invalid_target(targets: torch.Tensor, labels: str) -> torch.Tensor:
    if labels == "continuous":
        low, high = torch.aminmax(targets)
        return (
            low.isnan()
            | high.isnan()
            | (low < -1)
            | (high > 1)
            | ((targets < 0) & (targets != -1)).any()
        )
    if targets.is_floating_point() or targets.dtype == torch.bool:
        return ~((targets == 0) | (targets == 1) | (targets == -1)).all()
    low, high = torch.aminmax(targets)
    return (low < -1) | (high > 1)


def validate_inputs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    labels: str = "binary",
    num_positives: Optional[int] = None,
    num_positives_from: str = "loc_errors has {} entries",
    extra_finite: Optional[dict] = None,
    positive: Optional[torch.Tensor] = None,
) -> int:
    """Every value check of a ranking loss's inputs, with a single host-device
    synchronisation: finite ``logits`` (and ``extra_finite``'s named tensors), targets of
    the kind ``labels`` names (:data:`LABELS`), and ``num_positives`` positives where
    given (``num_positives_from``: where that number comes from, for the message;
    ``positive``: :func:`positives_of` the targets, where the caller has it already).
    Returns the number of positives; ``ValueError`` naming the problem."""
    extra_finite = extra_finite or {}
    positive = positives_of(targets, labels) if positive is None else positive
    checks = [_any_not_finite(logits), _any_invalid_target(targets, labels), positive.sum()]
    checks += [_any_not_finite(tensor) for tensor in extra_finite.values()]
    values = torch.stack([c.to(torch.int64) for c in checks]).tolist()
    if values[0]:
        raise ValueError("logits contain NaN or Inf")
    if values[1]:
        raise ValueError(LABELS[labels])
    if num_positives is not None and values[2] != num_positives:
        raise ValueError(
            f"{num_positives_from.format(num_positives)} but targets has {values[2]} positives"
        )
    for name, bad in zip(extra_finite, values[3:]):
        if bad:
            raise ValueError(f"{name} contain NaN or Inf")
    return values[2]


def ranking_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    definition: Callable[[PositiveStats], RankingUpdate],
    *,
    delta: float = 1.0,
    tie: float = 0.5,
    num_positives: Optional[int] = None,
    num_positives_from: str = "loc_errors has {} entries",
    validate: bool = True,
    extra_finite: Optional[dict] = None,
    process_group=None,
):
    """Apply a ranking-based loss ``definition`` to class-wise flattened logits.

    Args:
        logits: ``(M,)`` (or any shape, flattened) pre-sigmoid scores.
        targets: same shape; 1 positive, 0 negative, -1 ignored.
        definition: maps the positives' :class:`PositiveStats` to a
            :class:`RankingUpdate` (loss value and error-driven gradients).
        delta: smoothing of the step function; 0 is the unit step.
        tie: ``H(0)`` of the unit step (``delta == 0``): 1/2 (aLRP, AP, NDCG Loss) or 1
            (Rank & Sort Loss); with ``delta > 0``, ``H(0)`` is 1/2.
        num_positives: the number of positives if known on the host (avoids a
            synchronisation when ``validate`` is off; checked when it is on).
        num_positives_from: where ``num_positives`` comes from, for the message of a
            count that is not the targets' (``{}``: the number).
        validate: check the inputs (one host-device synchronisation).
        extra_finite: named tensors that must also be finite (checked with the rest).
        process_group: rank the concatenation of the ``logits`` of every process of
            this ``torch.distributed`` group (every process must call, with its own
            inputs); ``None``: this process's logits alone. The processes' numbers of
            positives are exchanged first: one host-device synchronisation.

    Returns:
        ``(loss, stats)``; ``loss`` carries the error-driven gradient to ``logits``,
        ``stats`` is ``None`` when there is no positive (in any process of the group).
    """
    check_arguments(logits, targets, delta)
    flat_logits = logits.reshape(-1)
    flat_targets = targets.reshape(-1)
    positive = flat_targets == 1
    if validate:
        counted = validate_inputs(
            flat_logits,
            flat_targets,
            num_positives=num_positives,
            num_positives_from=num_positives_from,
            extra_finite=extra_finite,
            positive=positive,
        )
        num_positives = counted if num_positives is None else num_positives
    elif num_positives is None:
        num_positives = int(positive.sum())
    partition = None
    if process_group is not None and dist.get_world_size(process_group) > 1:
        partition = PositivePartition(num_positives, process_group, logits.device)

    elementwise = _elementwise_dtype(logits.dtype)
    if (partition.num_global if partition else num_positives) == 0:
        # Zero loss, zero gradient, graph still connected (no DDP hang).
        zero = flat_logits.new_zeros((), dtype=elementwise)
        return error_driven(logits, zero, lambda: torch.zeros_like(logits, dtype=elementwise)), None

    wide = _wide_dtype(logits.device, logits.dtype)
    with torch.no_grad():
        scores = flat_logits.detach().to(elementwise)
        positive_index = torch.nonzero_static(positive, size=num_positives).squeeze(1)
        positive_scores = scores[positive_index]
        if partition is not None:
            positive_scores = partition.gather(positive_scores)
        q = positive_scores.to(wide)
        sorted_q, order = q.sort(stable=True)
        own_step = 0.5 if delta > 0 else tie  # H(0): a positive's comparison with itself
        rank_pos = (1 - own_step) + sorted_step_sums(
            sorted_q, torch.ones_like(sorted_q), q, delta, tie
        )
        bins = _NegativeBins(scores, flat_targets == 0, positive_scores, delta, wide, tie)
        num_fp = bins.step_sums()  # this process's negatives only ...
        if partition is not None:
            num_fp = partition.sum(num_fp)  # ... and everybody's
        stats = PositiveStats(
            q, sorted_q, order, rank_pos, num_fp, rank_pos + num_fp, delta, partition
        )

    update = definition(stats)

    def gradient():
        with torch.no_grad():
            grad = bins.distribute(update.negative_weight.detach().to(wide))
            positive_grad = update.positive_grad.detach()
            if partition is not None:
                positive_grad = partition.local_slice(positive_grad)
            grad[positive_index] = positive_grad.to(grad.dtype)
            return grad.view_as(logits)

    return error_driven(logits, update.loss.to(elementwise), gradient), stats
