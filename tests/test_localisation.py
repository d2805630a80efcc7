"""Localisation errors stay finite for a prediction anywhere (issue 17): far off the image,
of zero area, in float32; and equal the plain formulas for ordinary boxes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import generalized_box_iou_loss

from alrp_d2.losses import giou_loss, localisation_error, matched_box_iou

TARGET = [[10.0, 20.0, 50.0, 80.0]]
FAR = [
    [3.3e21, 40.0, 3.3e21 + 1e5, 60.0],  # the user's: x = 3.3e21, width lost in float32
    [-1e20, -1e20, -1e20 + 30.0, -1e20 + 40.0],  # far off in both directions
    [1e30, 1e30, 1e30, 1e30],  # a point, very far
    [30.0, 50.0, 30.0, 50.0],  # zero area, inside the target
    [30.0, 50.0, 30.0, 90.0],  # zero width
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["giou", "iou"])
def test_any_prediction_gives_a_finite_error_and_gradient(kind, dtype):
    pred = torch.tensor(FAR, dtype=dtype, requires_grad=True)
    target = torch.tensor(TARGET * len(FAR), dtype=dtype)
    errors = localisation_error(pred, target, kind, tau=0.5)
    assert torch.isfinite(errors).all(), errors
    assert ((errors >= 0) & (errors <= 2.0 + 1e-6)).all()
    errors.sum().backward()
    assert torch.isfinite(pred.grad).all(), pred.grad
    # Far off: no overlap, and (GIoU) the enclosing box dwarfs both: the largest error.
    assert errors[:3].tolist() == pytest.approx([2.0] * 3, abs=1e-5) if kind == "giou" else True


def test_the_plain_formula_overflows_where_the_target_frame_does_not():
    """What the issue met: the enclosing area of raw float32 boxes overflows (inf/inf)."""
    pred = torch.tensor([[3.3e21, 3.3e21, 3.3e21 + 1e3, 3.3e21 + 1e3]])
    target = torch.tensor(TARGET)
    assert not torch.isfinite(generalized_box_iou_loss(pred, target)).all()
    assert torch.isfinite(giou_loss(pred, target)).all()


# Corners on a grid of 1/8 pixel: two coordinates are equal (a kink of min/max) or clearly not.
eighths = st.integers(-1600, 1600).map(lambda v: v / 8)
sizes = st.integers(4, 2400).map(lambda v: v / 8)
boxes = st.tuples(eighths, eighths, sizes, sizes).map(
    lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]
)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(boxes, boxes), min_size=1, max_size=8))
def test_ordinary_boxes_keep_their_values_and_gradients(pairs):
    pred = torch.tensor([p for p, _ in pairs], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([t for _, t in pairs], dtype=torch.float64)
    plain = pred.detach().clone().requires_grad_(True)
    got = giou_loss(pred, target)
    expected = generalized_box_iou_loss(plain, target, reduction="none")
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    got.sum().backward()
    expected.sum().backward()
    # Where a coordinate of one box equals one of the other, min/max have a kink and the
    # two formulas may take different one-sided derivatives: compare the others.
    smooth = ~(plain.detach()[:, :, None] == target[:, None, :]).flatten(1).any(1)
    assert torch.allclose(pred.grad[smooth], plain.grad[smooth], rtol=1e-8, atol=1e-12)
    lt = torch.maximum(plain[:, :2], target[:, :2])
    rb = torch.minimum(plain[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    union = (plain[:, 2:] - plain[:, :2]).prod(1) + (target[:, 2:] - target[:, :2]).prod(1) - inter
    assert torch.allclose(matched_box_iou(pred, target), inter / union, rtol=1e-10, atol=1e-12)
