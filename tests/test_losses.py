"""The fast ranking losses against the naive reference of the spec."""

import pytest
import torch
from reference import alrp_reference, ap_reference, ndcg_reference

from alrp_d2.losses import ALRPLoss, APLoss, NDCGLoss, alrp_loss, ap_loss, ndcg_loss

RTOL = 1e-9
DELTAS = [0.0, 0.5, 1.0]


def close(actual, expected, floor=0.0):
    """Equal up to RTOL relative to the largest magnitude of ``expected``, or to ``floor``
    if larger (loss values live in [0, 1]: floor 1; gradients: exactly 0 where all are 0)."""
    actual, expected = actual.detach().double(), expected.double()
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, floor)
    return bool(((actual - expected).abs() <= RTOL * scale).all())


def make_case(kind, seed):
    g = torch.Generator().manual_seed(seed)
    m = 40 + seed % 30
    logits = torch.randn(m, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(-1, 2, (m,), generator=g)
    if kind == "ties":
        logits = torch.round(logits * 2) / 2
    elif kind == "one_positive":
        targets[targets == 1] = 0
        targets[3] = 1
    elif kind == "positives_on_top":
        targets = torch.where(logits > 1.0, 1, torch.where(targets == 1, 0, targets))
        logits = torch.where(targets == 1, logits + 10, logits)
    elif kind == "positives_at_bottom":
        targets[:5] = 1
        logits[:5] = logits.min() - 5 - torch.arange(5, dtype=torch.float64)
    if (targets == 1).sum() == 0:
        targets[0] = 1
    p = int((targets == 1).sum())
    loc = torch.rand(p, generator=g, dtype=torch.float64)
    return logits, targets, loc


KINDS = ["random", "ties", "one_positive", "positives_on_top", "positives_at_bottom"]
CASES = [(kind, seed) for kind in KINDS for seed in range(4)]


@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("kind,seed", CASES)
def test_alrp_matches_reference(kind, seed, delta):
    logits, targets, loc = make_case(kind, seed)
    x = logits.clone().requires_grad_()
    e = loc.clone().requires_grad_()
    cls, reg = alrp_loss(x, targets, e, delta=delta)
    (cls + reg).backward()
    ref_cls, ref_loc, ref_grad, ref_grad_loc = alrp_reference(logits, targets, loc, delta)
    assert close(cls, ref_cls, floor=1.0) and close(reg, ref_loc, floor=1.0)
    assert close(x.grad, ref_grad)
    assert close(e.grad, ref_grad_loc)


@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("kind,seed", CASES)
def test_ap_and_ndcg_match_reference(kind, seed, delta):
    logits, targets, _ = make_case(kind, seed)
    for fast, slow in [(ap_loss, ap_reference), (ndcg_loss, ndcg_reference)]:
        x = logits.clone().requires_grad_()
        loss = fast(x, targets, delta=delta)
        loss.backward()
        ref_loss, ref_grad = slow(logits, targets, delta)
        assert close(loss, ref_loss, floor=1.0), fast.__name__
        assert close(x.grad, ref_grad), fast.__name__


def test_ignored_entries_get_no_gradient():
    logits, targets, loc = make_case("random", 7)
    x = logits.clone().requires_grad_()
    cls, reg = alrp_loss(x, targets, loc)
    cls.backward()
    assert (x.grad[targets == -1] == 0).all()
    assert (x.grad[targets == 1] <= 0).all() and (x.grad[targets == 0] >= 0).all()


def test_positives_on_top_have_zero_classification_loss():
    logits = torch.tensor([5.0, 4.0, -3.0, -4.0], dtype=torch.float64)
    targets = torch.tensor([1, 1, 0, 0])
    x = logits.clone().requires_grad_()
    cls, reg = alrp_loss(x, targets, torch.tensor([0.2, 0.4], dtype=torch.float64))
    cls.backward()
    assert cls.item() == 0.0
    assert (x.grad == 0).all()  # N_FP <= eps for every positive: no update
    # cumE / rank: (0.2/1 + (0.4 + 0.2)/2) / 2
    assert reg.item() == pytest.approx(0.25, rel=1e-12)


def test_batch_without_positives_gives_zero_connected_losses():
    logits = torch.randn(20, requires_grad=True)
    targets = torch.zeros(20, dtype=torch.long)
    loc = torch.zeros(0, requires_grad=True)
    cls, reg = alrp_loss(logits, targets, loc)
    assert cls.item() == 0 and reg.item() == 0
    (cls + reg).backward()
    assert logits.grad is not None and (logits.grad == 0).all()
    assert loc.grad is not None
    for fn in (ap_loss, ndcg_loss):
        x = torch.randn(20, requires_grad=True)
        loss = fn(x, targets)
        loss.backward()
        assert loss.item() == 0 and (x.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_logits_follow_float64(dtype):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5000, generator=g).to(dtype)
    targets = torch.randint(-1, 2, (5000,), generator=g)
    targets[targets == 1] = torch.where(
        torch.rand(int((targets == 1).sum()), generator=g) < 0.05, 1, 0
    )
    loc = torch.rand(int((targets == 1).sum()), generator=g)
    x = logits.clone().requires_grad_()
    cls, reg = alrp_loss(x, targets, loc)
    cls.backward()
    assert cls.dtype == torch.float32 and x.grad.dtype == dtype
    ref_cls, ref_loc, ref_grad, _ = alrp_reference(logits.double(), targets, loc.double())
    assert cls.item() == pytest.approx(ref_cls.item(), rel=1e-5)
    assert reg.item() == pytest.approx(ref_loc.item(), rel=1e-5)
    tolerance = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
    assert (x.grad.double() - ref_grad).abs().max() <= tolerance * ref_grad.abs().max()


def test_float64_in_means_float64_math():
    logits, targets, loc = make_case("random", 1)
    cls, reg = alrp_loss(logits, targets, loc)
    assert cls.dtype == torch.float64 and reg.dtype == torch.float64


def test_any_shape_is_flattened():
    logits, targets, loc = make_case("random", 2)
    m = logits.numel() - logits.numel() % 2
    flat = alrp_loss(logits[:m], targets[:m], loc[: int((targets[:m] == 1).sum())])
    shaped = alrp_loss(
        logits[:m].view(2, -1), targets[:m].view(2, -1), loc[: int((targets[:m] == 1).sum())]
    )
    assert torch.equal(flat[0], shaped[0]) and torch.equal(flat[1], shaped[1])


def test_modules_wrap_functions():
    logits, targets, loc = make_case("ties", 0)
    assert torch.equal(
        ALRPLoss(delta=0.5)(logits, targets, loc)[0], alrp_loss(logits, targets, loc, 0.5)[0]
    )
    assert torch.equal(APLoss()(logits, targets), ap_loss(logits, targets))
    assert torch.equal(NDCGLoss()(logits, targets), ndcg_loss(logits, targets))


def test_validate_false_gives_the_same_result():
    logits, targets, loc = make_case("random", 5)
    a = alrp_loss(logits, targets, loc)
    b = alrp_loss(logits, targets, loc, validate=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- bad input -----------------------------------------------------------------------------


def _good():
    logits = torch.tensor([0.5, -0.2, 1.0, 0.1])
    targets = torch.tensor([1, 0, -1, 0])
    return logits, targets, torch.tensor([0.3])


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda lg, t, e: (lg[:3], t, e), "shape mismatch"),
        (lambda lg, t, e: (lg, torch.tensor([1, 0, 2, 0]), e), "targets must contain only"),
        (lambda lg, t, e: (lg, t.float() * 0.5, e), "targets must contain only"),
        (
            lambda lg, t, e: (lg, t, torch.tensor([0.3, 0.1])),
            "loc_errors has 2 entries but targets has 1",
        ),
        (lambda lg, t, e: (lg, t, torch.zeros(0)), "loc_errors has 0 entries but targets has 1"),
        (
            lambda lg, t, e: (torch.tensor([float("nan"), 0, 0, 0]), t, e),
            "logits contain NaN or Inf",
        ),
        (
            lambda lg, t, e: (torch.tensor([0, float("inf"), 0, 0]), t, e),
            "logits contain NaN or Inf",
        ),
        (lambda lg, t, e: (lg, t, torch.tensor([float("nan")])), "loc_errors contain NaN or Inf"),
        (lambda lg, t, e: (lg, t, torch.tensor([[0.3]])), "loc_errors must be a 1-D tensor"),
        (lambda lg, t, e: (lg.long(), t, e), "logits must be floating point"),
    ],
)
def test_bad_input_names_the_problem(mutate, message):
    logits, targets, loc = mutate(*_good())
    with pytest.raises(ValueError, match=message):
        alrp_loss(logits, targets, loc)


def test_bad_delta_and_ap_inputs():
    logits, targets, loc = _good()
    with pytest.raises(ValueError, match="delta"):
        alrp_loss(logits, targets, loc, delta=-1)
    with pytest.raises(ValueError, match="targets must contain only"):
        ap_loss(logits, torch.tensor([1, 0, 3, 0]))
    with pytest.raises(ValueError, match="logits contain NaN"):
        ndcg_loss(torch.tensor([float("nan"), 0, 0, 0]), targets)


def test_huge_finite_logits_are_not_called_infinite():
    logits = torch.tensor([3e38, 3e38, 3e38, -1.0])
    targets = torch.tensor([1, 0, 0, 0])
    cls, _ = alrp_loss(logits, targets, torch.tensor([0.5]))
    assert torch.isfinite(cls)


@pytest.mark.parametrize("delta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(6))
def test_grid_location_equals_binary_search(seed, delta):
    from alrp_d2.losses.ranking import _locate

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(100_000, generator=g) * (1 + seed % 3)
    q = torch.randn(int(torch.randint(8, 2000, (1,), generator=g)), generator=g)
    if seed % 2 == 0:  # ties everywhere
        x, q = torch.round(x * 4) / 4, torch.round(q * 4) / 4
    if seed == 5:
        q[0] = 80.0  # one outlier stretches the grid
    bounds = q.sort().values if delta == 0 else torch.cat([q - delta, q + delta]).sort().values
    x[: bounds.numel()] = bounds  # elements exactly on boundaries
    x[-50:] = float("-inf")
    for dtype in (torch.float32, torch.float64):
        xs, bs = x.to(dtype), bounds.to(dtype)
        assert torch.equal(_locate(xs, bs), torch.bucketize(xs, bs, out_int32=True))


def test_large_batch_matches_reference_loop():
    g = torch.Generator().manual_seed(11)
    m, p = 200_000, 300
    logits = torch.randn(m, generator=g, dtype=torch.float64)
    targets = torch.zeros(m, dtype=torch.long)
    targets[torch.randperm(m, generator=g)[:20_000]] = -1
    targets[torch.randperm(m, generator=g)[:p]] = 1
    loc = torch.rand(p, generator=g, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    cls, reg = alrp_loss(x, targets, loc)
    cls.backward()
    pos = torch.nonzero(targets == 1).flatten()
    neg = torch.nonzero(targets == 0).flatten()
    sp, sn = logits[pos], logits[neg]
    num_fp = torch.stack([((sn - s) / 2 + 0.5).clamp(0, 1).sum() for s in sp])
    h_pos = ((sp[None, :] - sp[:, None]) / 2 + 0.5).clamp(0, 1)
    rank = h_pos.sum(1) + 0.5 + num_fp
    assert cls.item() == pytest.approx((num_fp / rank).mean().item(), rel=1e-9)
    assert x.grad[targets == -1].abs().max() == 0
    assert x.grad[neg].sum().item() == pytest.approx(-x.grad[pos].sum().item(), rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_without_host_synchronisation():
    logits, targets, loc = make_case("ties", 3)
    x_cpu = logits.clone().requires_grad_()
    cls_cpu, reg_cpu = alrp_loss(x_cpu, targets, loc)
    (cls_cpu + reg_cpu).backward()
    x = logits.cuda().float().requires_grad_()
    t, e = targets.cuda(), loc.cuda().float()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cls, reg = alrp_loss(x, t, e, validate=False)
        (cls + reg).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cls.item() == pytest.approx(cls_cpu.item(), rel=1e-5)
    assert torch.allclose(x.grad.double().cpu(), x_cpu.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tie", [0.5, 1.0])
def test_unit_step_ties_count_as_asked(tie):
    """delta == 0: a negative (and a positive) tied with positive i counts ``tie``."""
    from alrp_d2.losses.ranking import RankingUpdate, ranking_loss

    logits = torch.tensor([0.0, 1.0, 1.0, 0.0, 2.0, 1.0, -1.0], dtype=torch.float64)
    targets = torch.tensor([1, 1, 0, 0, 0, 1, -1])
    seen = {}

    def definition(stats):
        seen["num_fp"], seen["rank_pos"] = stats.num_fp.clone(), stats.rank_pos.clone()
        zeros = torch.zeros_like(stats.scores)
        return RankingUpdate(stats.scores.sum() * 0, zeros, zeros)

    ranking_loss(logits, targets, definition, delta=0.0, tie=tie)
    pos, neg = logits[targets == 1], logits[targets == 0]

    def step(x):
        return (x > 0).double() + tie * (x == 0).double()

    expected_fp = torch.stack([step(neg - s).sum() for s in pos])
    expected_rank = torch.stack([1 + step(pos - s).sum() - tie for s in pos])
    assert torch.equal(seen["num_fp"], expected_fp)
    assert torch.equal(seen["rank_pos"], expected_rank)


def test_module_forms_take_the_functional_arguments():
    import inspect

    logits, targets = torch.tensor([float("nan"), 0.0]), torch.tensor([1, 0])
    loc = torch.tensor([0.5])
    for module, args in ((ALRPLoss(), (loc,)), (APLoss(), ()), (NDCGLoss(), ())):
        with pytest.raises(ValueError, match="logits contain NaN"):
            module(logits, targets, *args)
    for module, args in (
        (ALRPLoss(validate=False), (loc,)),
        (APLoss(validate=False), ()),
        (NDCGLoss(validate=False), ()),
    ):
        module(logits, targets, *args)  # no check, no synchronisation
    for cls, fn in ((ALRPLoss, alrp_loss), (APLoss, ap_loss), (NDCGLoss, ndcg_loss)):
        module_args = set(inspect.signature(cls.__init__).parameters) - {"self"}
        # The inputs and the count of this call's positives are forward's.
        per_call = {"logits", "targets", "loc_errors", "num_positives"}
        function_args = set(inspect.signature(fn).parameters) - per_call
        assert module_args == function_args, cls
        forward_args = set(inspect.signature(cls.forward).parameters) - {"self"}
        assert forward_args == set(inspect.signature(fn).parameters) & per_call, cls
    assert "eps" not in inspect.signature(ap_loss).parameters  # AP Loss has no N_FP test
