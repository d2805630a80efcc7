"""The benchmark's loop baseline computes the same losses as the engine."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
from naive_loop import alrp_loop, ap_loop

from alrp_d2.losses import alrp_loss, ap_loss


def test_loop_baseline_equals_engine():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3000, generator=g, dtype=torch.float64)
    targets = torch.randint(-1, 1, (3000,), generator=g)
    targets[torch.randperm(3000, generator=g)[:40]] = 1
    loc = torch.rand(40, generator=g, dtype=torch.float64)
    cls, reg, grad = alrp_loop(logits, targets, loc)
    x = logits.clone().requires_grad_()
    fast_cls, fast_reg = alrp_loss(x, targets, loc)
    fast_cls.backward()
    assert torch.allclose(cls, fast_cls) and torch.allclose(reg, fast_reg)
    assert torch.allclose(grad, x.grad)
    loss, grad = ap_loop(logits, targets)
    x = logits.clone().requires_grad_()
    fast = ap_loss(x, targets)
    fast.backward()
    assert torch.allclose(loss, fast) and torch.allclose(grad, x.grad)
