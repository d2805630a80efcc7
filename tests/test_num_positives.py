"""``num_positives`` of AP, NDCG and Rank & Sort Loss (as aLRP Loss's localisation errors
give it): the same values and gradients with it as without, and with ``validate=False`` no
host-device synchronisation at all.

A synchronisation cannot be observed on the CPU, so :class:`HostReads` records what would
cause one on CUDA: a read of a tensor's value by the host (``aten._local_scalar_dense``,
behind ``item``, ``int``, ``float`` and ``bool``; ``tolist`` and ``numpy``, which read CPU
memory directly) and the operators whose output size depends on the values (``nonzero``,
boolean-mask indexing, ``masked_select``, ``unique``, ``repeat_interleave`` without
``output_size``), forward and backward. On CUDA,
``test_cuda_has_no_synchronisation_with_num_positives`` checks the same with
``torch.cuda.set_sync_debug_mode("error")``, as ``benchmarks/gpu/verify.py`` does."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alrp_d2.losses import (
    APLoss,
    NDCGLoss,
    RankSortLoss,
    alrp_loss,
    ap_loss,
    ndcg_loss,
    rank_sort_loss,
)

aten = torch.ops.aten
# Operators whose output shape depends on the values: the host waits for the device.
_VALUE_SIZED = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.is_nonzero,
    aten.equal,
}


class HostReads(TorchDispatchMode):
    """Records, by operator name, what would make the host wait for the device on CUDA
    (module docstring) while the block runs; ``tolist`` and ``numpy`` raise there."""

    _READERS = ("tolist", "numpy")

    def __init__(self):
        super().__init__()
        self.found = []

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in self._READERS}
        for name in self._READERS:

            def refuse(*args, _name=name, **kwargs):
                raise AssertionError(f"host read: Tensor.{_name}")

            setattr(torch.Tensor, name, refuse)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _VALUE_SIZED:
            self.found.append(str(packet))
        elif packet in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in (args[1] or ())
        ):
            self.found.append(f"{packet} by a mask")
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None:
            self.found.append(str(packet))
        return func(*args, **kwargs)


def case(m=3000, p=40, seed=0, dtype=torch.float32):
    """Logits with ties, 10% ignored, ``p`` positives; aLRP's localisation errors and Rank &
    Sort's continuous labels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, generator=g, dtype=torch.float64) * 2
    logits[: m // 3] = torch.round(logits[: m // 3] * 4) / 4
    targets = torch.zeros(m, dtype=torch.long)
    targets[torch.randperm(m, generator=g)[: m // 10]] = -1
    targets[torch.randperm(m, generator=g)[:p]] = 1
    labels = torch.where(targets == 1, 0.05 + 0.95 * torch.rand(m, generator=g), targets.float())
    loc = torch.rand(p, generator=g)
    return logits.to(dtype), targets, labels.to(dtype), loc


def losses(logits, targets, labels, loc, validate, count):
    """name -> the loss (a sum of its parts) of each ranking loss; ``count``: pass
    ``num_positives`` (aLRP: its localisation errors always give it)."""
    given = {"num_positives": len(loc)} if count else {}
    return {
        "aLRP": lambda x: sum(alrp_loss(x, targets, loc, validate=validate)),
        "AP": lambda x: ap_loss(x, targets, validate=validate, **given),
        "NDCG": lambda x: ndcg_loss(x, targets, validate=validate, **given),
        "Rank & Sort": lambda x: sum(rank_sort_loss(x, labels, validate=validate, **given)),
    }


def value_and_grad(fn, logits):
    x = logits.clone().requires_grad_()
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("name", ["aLRP", "AP", "NDCG", "Rank & Sort"])
def test_no_host_read_with_num_positives_and_validate_off(name):
    inputs = case()
    fn = losses(*inputs, validate=False, count=True)[name]
    with HostReads() as reads:
        value_and_grad(fn, inputs[0])
    assert reads.found == []


@pytest.mark.parametrize("name", ["AP", "NDCG", "Rank & Sort"])
def test_without_num_positives_counting_them_reads_the_device(name):
    """What the argument saves (and what shows that :class:`HostReads` sees it)."""
    inputs = case()
    fn = losses(*inputs, validate=False, count=False)[name]
    with HostReads() as reads:
        value_and_grad(fn, inputs[0])
    assert reads.found == ["aten._local_scalar_dense"]


def test_host_reads_sees_each_kind_forward_and_backward():
    class ReadInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * float(grad.sum())

    x = torch.randn(10, requires_grad=True)
    with HostReads() as reads:
        ReadInBackward.apply(x).sum().backward()
        y = x.detach()
        y[y > 0]
        y.nonzero()
        torch.repeat_interleave(torch.tensor([1, 2]))
        bool(y.sum() > 0)
        with pytest.raises(AssertionError, match="host read: Tensor.tolist"):
            y.tolist()
    assert reads.found == [
        "aten._local_scalar_dense",
        "aten.index by a mask",
        "aten.nonzero",
        "aten.repeat_interleave",
        "aten._local_scalar_dense",
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m, p", [(200, 0), (500, 3), (3000, 40), (20000, 700)])
@pytest.mark.parametrize("validate", [True, False])
def test_the_same_values_and_gradients_with_and_without(m, p, dtype, validate):
    for seed in range(3):
        inputs = case(m, p, seed, dtype)
        without = losses(*inputs, validate=validate, count=False)
        given = losses(*inputs, validate=validate, count=True)
        for name in ("AP", "NDCG", "Rank & Sort"):
            a, b = value_and_grad(without[name], inputs[0]), value_and_grad(given[name], inputs[0])
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (name, seed)


def test_a_wrong_count_is_refused_when_validated():
    logits, targets, labels, loc = case(p=7)
    for call in (
        lambda: ap_loss(logits, targets, num_positives=5),
        lambda: ndcg_loss(logits, targets, num_positives=5),
        lambda: rank_sort_loss(logits, labels, num_positives=5),
    ):
        with pytest.raises(ValueError, match="num_positives is 5 but targets has 7 positives"):
            call()


def test_the_modules_take_it_per_call():
    logits, targets, labels, loc = case()
    x = logits.clone()
    assert torch.equal(APLoss(validate=False)(x, targets, 40), ap_loss(x, targets))
    assert torch.equal(NDCGLoss(validate=False)(x, targets, 40), ndcg_loss(x, targets))
    got = RankSortLoss(validate=False)(x, labels, 40)
    assert all(torch.equal(a, b) for a, b in zip(got, rank_sort_loss(x, labels)))


def test_ap_head_loss_passes_it():
    """The AP head, which knows its positives (one box each), trains without reading the
    device (validation and self-balance off: the self-balance weight is logged)."""
    pytest.importorskip("detectron2")
    from detectron2.utils.events import EventStorage

    from alrp_d2.modeling import APHeadLoss, HeadOutputs

    logits, targets, _, _ = case(p=40)
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(40, 2, generator=g) * 50
    target = torch.cat([xy, xy + 20], 1)
    outputs = HeadOutputs(
        logits=logits.clone().requires_grad_(),
        targets=targets,
        pred_boxes=target + torch.randn(40, 4, generator=g),
        target_boxes=target,
        scores=torch.rand(40, generator=g),
        num_images=2,
        pred_deltas=torch.randn(40, 4, generator=g, requires_grad=True),
        target_deltas=torch.randn(40, 4, generator=g),
    )
    head_loss = APHeadLoss(prefix="ap", validate=False)
    with EventStorage(), HostReads() as reads:
        losses = head_loss(outputs)
        sum(losses.values()).backward()
    assert reads.found == []
    assert torch.equal(losses["loss_ap_cls"], ap_loss(logits, targets, validate=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["aLRP", "AP", "NDCG", "Rank & Sort"])
def test_cuda_has_no_synchronisation_with_num_positives(name):
    logits, targets, labels, loc = (t.cuda() for t in case())
    fn = losses(logits, targets, labels, loc, validate=False, count=True)[name]
    value_and_grad(fn, logits)  # warm-up outside the check (lazy initialisations)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        value_and_grad(fn, logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")
