"""The paper's Theorems 1 and 2 as properties of the fast losses (hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import primary_terms_alrp_cls

from alrp_d2.losses import alrp_loss, ap_loss, ndcg_loss


@st.composite
def ranking_batches(draw):
    m = draw(st.integers(2, 40))
    # Scores on a coarse grid so that ties and exact window boundaries occur.
    scores = draw(st.lists(st.integers(-12, 12), min_size=m, max_size=m))
    targets = draw(st.lists(st.sampled_from([1, 0, 0, -1]), min_size=m, max_size=m))
    if 1 not in targets:
        targets[draw(st.integers(0, m - 1))] = 1
    p = targets.count(1)
    loc = draw(st.lists(st.floats(0, 1), min_size=p, max_size=p))
    delta = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]))
    return (
        torch.tensor(scores, dtype=torch.float64) / 4,
        torch.tensor(targets),
        torch.tensor(loc, dtype=torch.float64),
        delta,
    )


def _balance(grad, targets):
    positive = grad[targets == 1].abs().sum()
    negative = grad[targets == 0].abs().sum()
    return positive, negative


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(ranking_batches())
def test_theorem1_loss_is_mean_of_primary_terms(batch):
    logits, targets, loc, delta = batch
    cls, _ = alrp_loss(logits, targets, loc, delta=delta)
    primary = primary_terms_alrp_cls(logits, targets, delta)
    z = int((targets == 1).sum())
    assert torch.allclose(cls, primary.sum() / z, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(ranking_batches())
def test_theorem2_gradients_are_balanced(batch):
    logits, targets, loc, delta = batch
    for name in ("alrp", "ap", "ndcg"):
        x = logits.clone().requires_grad_()
        if name == "alrp":
            loss = alrp_loss(x, targets, loc, delta=delta)[0]
        else:
            loss = {"ap": ap_loss, "ndcg": ndcg_loss}[name](x, targets, delta=delta)
        loss.backward()
        positive, negative = _balance(x.grad, targets)
        assert torch.allclose(positive, negative, rtol=1e-9, atol=1e-12), name
        assert (x.grad[targets == 1] <= 0).all() and (x.grad[targets == 0] >= 0).all(), name
        assert (x.grad[targets == -1] == 0).all(), name


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(ranking_batches(), st.floats(-5, 5))
def test_losses_are_invariant_to_shifting_all_scores(batch, shift):
    logits, targets, loc, delta = batch
    a = alrp_loss(logits, targets, loc, delta=delta)
    b = alrp_loss(logits + 0.25 * round(shift * 4), targets, loc, delta=delta)
    assert torch.allclose(a[0], b[0], rtol=1e-9, atol=1e-12)
    assert torch.allclose(a[1], b[1], rtol=1e-9, atol=1e-12)
