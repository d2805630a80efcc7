"""Rank & Sort Loss: against the naive transcription of the spec, its balance
properties (hypothesis) and its input checks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_rank_sort import rank_sort_reference

from alrp_d2.losses import RankSortLoss, rank_sort_loss
from alrp_d2.losses import rank_sort as rank_sort_module

RTOL = 1e-9
DELTAS = [0.0, 0.25, 0.5, 1.0]


def close(actual, expected, floor=0.0):
    """Equal up to RTOL relative to the largest magnitude of ``expected`` (or ``floor``)."""
    actual, expected = actual.detach().double(), expected.double()
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, floor)
    return bool(((actual - expected).abs() <= RTOL * scale).all())


def make_case(kind, seed):
    g = torch.Generator().manual_seed(seed)
    m = 40 + seed % 30
    logits = torch.randn(m, generator=g, dtype=torch.float64) * 2
    kinds = torch.randint(-1, 2, (m,), generator=g)
    labels = torch.rand(m, generator=g, dtype=torch.float64) * 0.9 + 0.1
    if kind == "ties":  # tied scores, tied labels, exact window boundaries
        logits = torch.round(logits * 2) / 2
        labels = torch.round(labels * 4) / 4
        labels[labels == 0] = 0.25
    elif kind == "one_positive":
        kinds[kinds == 1] = 0
        kinds[3] = 1
    elif kind == "positives_on_top":
        kinds = torch.where(logits > 1.0, 1, torch.where(kinds == 1, 0, kinds))
        logits = torch.where(kinds == 1, logits + 10, logits)
    elif kind == "sorted":  # positives ranked and sorted perfectly: zero loss
        kinds = torch.where(logits > 1.0, 1, torch.where(kinds == 1, 0, kinds))
        logits = torch.where(kinds == 1, logits + 10, logits)
        labels = torch.sigmoid(logits) * 0.5 + 0.25
    if (kinds == 1).sum() == 0:
        kinds[0] = 1
    targets = torch.where(kinds == 1, labels, kinds.double())
    return logits, targets


KINDS = ["random", "ties", "one_positive", "positives_on_top", "sorted"]
CASES = [(kind, seed) for kind in KINDS for seed in range(3)]


@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("kind,seed", CASES)
def test_matches_naive_transcription(kind, seed, delta):
    logits, targets = make_case(kind, seed)
    x = logits.clone().requires_grad_()
    ranking, sorting = rank_sort_loss(x, targets, delta=delta)
    (ranking + sorting).backward()
    ref_rank, ref_sort, ref_grad = rank_sort_reference(logits, targets, delta)
    assert close(ranking, ref_rank, floor=1.0) and close(sorting, ref_sort, floor=1.0)
    # Updates are at most 1 / |P| each; relative to that scale, so that rounding noise of
    # a nearly perfectly sorted case (sorting errors of 1e-8 from differences of ratios)
    # is not compared relative to itself.
    assert close(x.grad, ref_grad, floor=1.0 / int((targets > 0).sum()))
    if kind == "sorted" and delta == 0:
        assert float(ranking.detach()) == 0 and abs(float(sorting.detach())) < 1e-12


@st.composite
def range_queries(draw):
    p = draw(st.integers(1, 70))
    keys = draw(st.lists(st.integers(0, p - 1), min_size=p, max_size=p))
    weights = draw(st.lists(st.integers(-3, 3), min_size=2 * p, max_size=2 * p))
    bounds = st.lists(st.integers(0, p), min_size=3, max_size=3).map(sorted)
    queries = draw(st.lists(st.tuples(bounds, st.integers(0, p)), min_size=1, max_size=20))
    return (torch.tensor(keys), torch.tensor(weights, dtype=torch.float64).view(p, 2), queries)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(range_queries())
def test_dominance_sums_equal_brute_force(case):
    keys, weights, queries = case
    bounds = torch.tensor([q[0] for q in queries])  # two adjacent ranges per query
    limit = torch.tensor([q[1] for q in queries])
    below, above = rank_sort_module._dominance_sums(keys, weights, bounds, limit)
    position = torch.arange(keys.numel())
    for q in range(len(queries)):
        for r in range(2):
            in_range = (position >= bounds[q, r]) & (position < bounds[q, r + 1])
            # Small integer weights: every sum is exact, so equality is exact.
            smaller = (in_range & (keys < limit[q]))[:, None]
            assert torch.equal(below[q, r], (weights * smaller).sum(0))
            assert torch.equal(above[q, r], (weights * (in_range[:, None] & ~smaller)).sum(0))


@pytest.mark.parametrize("delta", [0.0, 0.5])
@pytest.mark.parametrize("ties", [False, True])
def test_many_positives_match_naive_transcription(delta, ties):
    """Hundreds of positives (many levels of the range sums), ignored entries, ties."""
    g = torch.Generator().manual_seed(11)
    m = 1500
    logits = torch.randn(m, generator=g, dtype=torch.float64) * 2
    labels = torch.rand(m, generator=g, dtype=torch.float64) * 0.99 + 0.01
    if ties:
        logits, labels = torch.round(logits * 4) / 4, torch.ceil(labels * 10) / 10
    kinds = torch.randint(-1, 2, (m,), generator=g) * (torch.rand(m, generator=g) < 0.6)
    kinds[torch.rand(m, generator=g) < 0.25] = 1
    targets = torch.where(kinds == 1, labels, kinds.double())
    x = logits.clone().requires_grad_()
    ranking, sorting = rank_sort_loss(x, targets, delta=delta)
    (ranking + sorting).backward()
    ref_rank, ref_sort, ref_grad = rank_sort_reference(logits, targets, delta)
    assert int((targets > 0).sum()) > 300
    assert close(ranking, ref_rank, floor=1.0) and close(sorting, ref_sort, floor=1.0)
    assert close(x.grad, ref_grad, floor=1.0 / int((targets > 0).sum()))


def test_each_output_carries_its_own_update():
    logits, targets = make_case("random", 1)
    x = logits.clone().requires_grad_()
    _, sorting = rank_sort_loss(x, targets)
    sorting.backward()
    assert (x.grad[targets <= 0] == 0).all()  # the sorting update stays among positives
    assert abs(float(x.grad.sum())) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_and_shapes(dtype):
    logits, targets = make_case("random", 2)
    x = logits.to(dtype).reshape(2, -1).clone().requires_grad_()
    ranking, sorting = RankSortLoss()(x, targets.reshape(2, -1).to(dtype))
    (ranking + sorting).backward()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert torch.isfinite(ranking) and torch.isfinite(sorting)
    assert ranking.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("delta", [0.0, 0.5])
def test_no_positive_gives_zero_connected_losses(delta):
    x = torch.randn(30, requires_grad=True)
    targets = torch.where(torch.arange(30) % 3 == 0, -1.0, 0.0)
    ranking, sorting = rank_sort_loss(x, targets, delta=delta)
    assert float(ranking.detach()) == 0 and float(sorting.detach()) == 0
    (ranking + sorting).backward()
    assert x.grad is not None and (x.grad == 0).all()


def test_ignored_elements_get_no_gradient():
    logits, targets = make_case("random", 4)
    x = logits.clone().requires_grad_()
    sum(rank_sort_loss(x, targets)).backward()
    assert (targets == -1).any() and (x.grad[targets == -1] == 0).all()


@pytest.mark.parametrize(
    "logits,targets,message",
    [
        (torch.tensor([0.0, float("nan")]), torch.tensor([1.0, 0.0]), "NaN or Inf"),
        (torch.tensor([0.0, float("inf")]), torch.tensor([1.0, 0.0]), "NaN or Inf"),
        (torch.tensor([0.0, 1.0]), torch.tensor([1.5, 0.0]), r"\(0, 1\]"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0.5, -0.5]), r"\(0, 1\]"),
        (torch.tensor([0.0, 1.0]), torch.tensor([float("nan"), 0.0]), r"\(0, 1\]"),
        (torch.tensor([0.0, 1.0]), torch.tensor([1, 0]), "floating point"),
        (torch.tensor([0, 1]), torch.tensor([1.0, 0.0]), "floating point"),
        (torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0]), "shape mismatch"),
    ],
)
def test_bad_inputs_are_rejected(logits, targets, message):
    with pytest.raises(ValueError, match=message):
        rank_sort_loss(logits, targets)


@pytest.mark.parametrize("delta,eps", [(-1.0, 1e-10), (float("inf"), 1e-10), (0.5, -1.0)])
def test_bad_parameters_are_rejected(delta, eps):
    with pytest.raises(ValueError, match="delta|eps"):
        rank_sort_loss(torch.zeros(2), torch.tensor([1.0, 0.0]), delta=delta, eps=eps)


@st.composite
def batches(draw):
    m = draw(st.integers(2, 40))
    # Scores and labels on coarse grids, so that ties and exact window edges occur.
    scores = draw(st.lists(st.integers(-12, 12), min_size=m, max_size=m))
    kinds = draw(st.lists(st.sampled_from([1, 1, 0, 0, -1]), min_size=m, max_size=m))
    labels = draw(st.lists(st.integers(1, 8), min_size=m, max_size=m))
    if 1 not in kinds:
        kinds[draw(st.integers(0, m - 1))] = 1
    targets = [lab / 8 if k == 1 else float(k) for k, lab in zip(kinds, labels)]
    delta = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]))
    return (
        torch.tensor(scores, dtype=torch.float64) / 4,
        torch.tensor(targets, dtype=torch.float64),
        delta,
    )


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(batches())
def test_ranking_update_is_balanced(batch):
    """What the positives lose to ranking errors, the negatives gain, sign for sign."""
    logits, targets, delta = batch
    x = logits.clone().requires_grad_()
    ranking, _ = rank_sort_loss(x, targets, delta=delta)
    ranking.backward()
    positive, negative = x.grad[targets > 0], x.grad[targets == 0]
    assert (positive <= 0).all() and (negative >= 0).all()
    assert torch.allclose(positive.abs().sum(), negative.sum(), rtol=1e-9, atol=1e-12)
    assert (x.grad[targets == -1] == 0).all()


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(batches())
def test_sorting_update_is_balanced(batch):
    """The sorting update moves among positives only and sums to zero: each positive's
    loss equals what the positives with smaller labels above it receive."""
    logits, targets, delta = batch
    x = logits.clone().requires_grad_()
    _, sorting = rank_sort_loss(x, targets, delta=delta)
    sorting.backward()
    assert (x.grad[targets <= 0] == 0).all()
    assert abs(float(x.grad.sum())) <= 1e-12
    *_, ref_grad = rank_sort_reference(logits, targets, delta)
    full = logits.clone().requires_grad_()
    sum(rank_sort_loss(full, targets, delta=delta)).backward()
    assert close(full.grad, ref_grad)


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(batches())
def test_losses_are_bounded_and_sorting_nonnegative_at_unit_step(batch):
    logits, targets, delta = batch
    ranking, sorting = rank_sort_loss(logits, targets, delta=delta)
    assert 0 <= float(ranking) <= 1
    assert -1 <= float(sorting) <= 1
    if delta == 0:  # the target sorting error is the least one
        assert float(sorting) >= -1e-12


def test_benchmark_loop_equals_the_loss():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from rank_sort_loop import rank_sort_loop

    logits, targets = make_case("random", 5)
    x = logits.clone().requires_grad_()
    ranking, sorting = rank_sort_loss(x, targets)
    (ranking + sorting).backward()
    loop_rank, loop_sort, loop_grad = rank_sort_loop(logits, targets)
    assert close(ranking, loop_rank, 1.0) and close(sorting, loop_sort, 1.0)
    assert close(x.grad, loop_grad)
