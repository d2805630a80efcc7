"""The aLRP authors' FoveaBox heads, transcribed for equality tests (tests/test_foveabox.py).

Written from their mmdetection code (kemaloksuz/aLRPLoss: ``mmdet/models/dense_heads/``
``fovea_head.py``, ``ap_loss_fovea_head.py``, ``alrp_loss_fovea_head.py``, the autograd
functions in ``mmdet/models/losses/ap_loss.py`` and ``alrp_loss.py``, mmdetection's focal,
smooth L1 and GIoU losses, ``multiclass_nms``), structure kept where it decides a number:

- targets per image and level, ground truths written one after the other from the
  largest to the smallest into the cells of their fovea (slices of a grid);
- the batch flattened level by level, the images of a level inside it;
- the ranking losses as loops over the positives in ascending score;
- aLRP's boxes decoded by the authors' loop over images, then levels, which pairs the rows
  (flattened level-major) with other locations' centres and base edges than their own
  (predictions and targets alike);
- test time: per level the top locations by best class score, boxes clipped to the image's
  last pixel, then NMS per class over the levels.

Deliberately direct and slow; float64 except where the authors' dtype decides a cell.
"""

import torch
from torchvision.ops import batched_nms

FOCAL_GAMMA, FOCAL_ALPHA = 1.5, 0.4  # fovea_r50_fpn_4x4_100e_coco500.py
SMOOTH_L1_BETA = 0.11
SB_WEIGHT = 50.0  # the aLRP head's self-balance weight before its first update


def ref_grid(sizes):
    """Per level, (y, x) grids of the cells' centres in cell units (index + 0.5)."""
    out = []
    for h, w in sizes:
        ys = torch.arange(h, dtype=torch.float32) + 0.5
        xs = torch.arange(w, dtype=torch.float32) + 0.5
        out.append(torch.meshgrid(ys, xs, indexing="ij"))
    return out


def ref_image_targets(boxes, classes, sizes, grids, strides, edges, ranges, sigma, num_classes):
    """One image: per level a (H, W) label map (num_classes: background) and a (H, W, 4)
    map of log target distances (log 1 = 0 outside the foveas), in float32."""
    side = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    labels, targets = [], []
    for (h, w), (gy, gx), stride, edge, (lo, hi) in zip(sizes, grids, strides, edges, ranges):
        lab = torch.full((h, w), num_classes, dtype=torch.long)
        tgt = torch.ones(h, w, 4)  # the authors' map starts uninitialised (+1); only
        # positives are read
        chosen = ((side >= lo) & (side <= hi)).nonzero().flatten()
        if len(chosen):
            chosen = chosen[torch.sort(-side[chosen]).indices]  # largest first
            cell = boxes[chosen] / stride
            hw, hh = 0.5 * (cell[:, 2] - cell[:, 0]), 0.5 * (cell[:, 3] - cell[:, 1])
            x_lo = torch.ceil(cell[:, 0] + (1 - sigma) * hw - 0.5).long().clamp(0, w - 1)
            x_hi = torch.floor(cell[:, 0] + (1 + sigma) * hw - 0.5).long().clamp(0, w - 1)
            y_lo = torch.ceil(cell[:, 1] + (1 - sigma) * hh - 0.5).long().clamp(0, h - 1)
            y_hi = torch.floor(cell[:, 1] + (1 + sigma) * hh - 0.5).long().clamp(0, h - 1)
            for k, g in enumerate(chosen.tolist()):
                ys = slice(int(y_lo[k]), int(y_hi[k]) + 1)
                xs = slice(int(x_lo[k]), int(x_hi[k]) + 1)
                x1, y1, x2, y2 = boxes[g]
                lab[ys, xs] = classes[g]
                tgt[ys, xs, 0] = (stride * gx[ys, xs] - x1) / edge
                tgt[ys, xs, 1] = (stride * gy[ys, xs] - y1) / edge
                tgt[ys, xs, 2] = (x2 - stride * gx[ys, xs]) / edge
                tgt[ys, xs, 3] = (y2 - stride * gy[ys, xs]) / edge
            tgt = tgt.clamp(min=1 / 16, max=16)
        labels.append(lab)
        targets.append(torch.log(tgt))
    return labels, targets


def ref_targets(gt_boxes, gt_classes, sizes, strides, edges, ranges, sigma, num_classes):
    """The batch's labels (M,) and log target distances (M, 4), level-major."""
    grids = ref_grid(sizes)
    per_image = [
        ref_image_targets(b, c, sizes, grids, strides, edges, ranges, sigma, num_classes)
        for b, c in zip(gt_boxes, gt_classes)
    ]
    labels = torch.cat(
        [torch.cat([lab[level].flatten() for lab, _ in per_image]) for level in range(len(sizes))]
    )
    targets = torch.cat(
        [
            torch.cat([tgt[level].reshape(-1, 4) for _, tgt in per_image])
            for level in range(len(sizes))
        ]
    )
    return labels, targets


def ref_flatten(outputs, channels):
    """Head outputs [(N, C, H, W)] per level to (M, C), level-major."""
    return torch.cat([o.permute(0, 2, 3, 1).reshape(-1, channels) for o in outputs])


def ref_onehot(labels, num_classes):
    """(M * K,) class-wise targets: 1 at a row's class, 0 elsewhere (background: all 0)."""
    out = torch.zeros(len(labels), num_classes, dtype=torch.long)
    fg = labels < num_classes
    out[fg, labels[fg]] = 1
    return out.reshape(-1)


def ref_focal_sum(logits, onehot, gamma=FOCAL_GAMMA, alpha=FOCAL_ALPHA):
    """mmdetection's sigmoid focal loss, summed."""
    p = logits.sigmoid()
    t = onehot.to(logits.dtype)
    modulator = (alpha * t + (1 - alpha) * (1 - t)) * ((1 - p) * t + p * (1 - t)).pow(gamma)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none")
    return (bce * modulator).sum()


def ref_smooth_l1(pred, target, beta=SMOOTH_L1_BETA):
    diff = (pred - target).abs()
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def _step(x, delta=1.0):
    return (x / (2 * delta) + 0.5).clamp(0, 1)


def ref_ap(logits, onehot, delta=1.0):
    """The authors' AP Loss: (loss, gradient of the logits)."""
    pos = onehot == 1
    s_pos = logits[pos]
    neg = (onehot == 0) & (logits >= s_pos.min() - delta)
    s_neg = logits[neg]
    grad_pos = torch.zeros_like(s_pos)
    grad_neg = torch.zeros_like(s_neg)
    interpolated = torch.zeros_like(s_pos)
    best = 0.0
    for i in torch.argsort(s_pos).tolist():  # ascending score
        h_pos = _step(s_pos - s_pos[i], delta)
        h_pos[i] = 0
        h_neg = _step(s_neg - s_pos[i], delta)
        rank = 1 + h_pos.sum() + h_neg.sum()
        precision = (1 + h_pos.sum()) / rank
        if best <= precision:
            best = precision
            grad_neg += h_neg / rank
        else:
            grad_neg += h_neg / rank * (1 - best) / (1 - precision)
        grad_pos[i] = -(1 - best)
        interpolated[i] = best
    grad = torch.zeros_like(logits)
    grad[pos], grad[neg] = grad_pos, grad_neg
    return 1 - interpolated.mean(), grad / len(s_pos)


def ref_alrp(logits, onehot, errors, delta=1.0, eps=1e-5):
    """The authors' aLRP Loss: (classification loss, its logits' gradient, rank of each
    positive, the positives' ascending order)."""
    pos = onehot == 1
    s_pos = logits[pos]
    neg = (onehot == 0) & (logits >= s_pos.min() - delta)
    s_neg = logits[neg]
    grad_pos = torch.zeros_like(s_pos)
    grad_neg = torch.zeros_like(s_neg)
    rank = torch.zeros_like(s_pos)
    precision = torch.zeros_like(s_pos)
    order = torch.argsort(s_pos)
    for i in order.tolist():
        h_pos = _step(s_pos - s_pos[i], delta)
        h_pos[i] = 0
        h_neg = _step(s_neg - s_pos[i], delta)
        false_positives = h_neg.sum()
        rank[i] = 1 + h_pos.sum() + false_positives
        precision[i] = (1 + h_pos.sum()) / rank[i]
        if false_positives > eps:
            grad_pos[i] = -((h_pos * errors).sum() + false_positives) / rank[i]
            grad_neg += h_neg * (-grad_pos[i] / false_positives)
    grad = torch.zeros_like(logits)
    grad[pos], grad[neg] = grad_pos, grad_neg
    return 1 - precision.mean(), grad / len(s_pos), rank, order


def ref_decode_as_authors(log_distances, sizes, strides, edges, num_images):
    """The aLRP head's decoding of its level-major rows: image by image, level by level,
    each next block of rows read as that (image, level)'s locations."""
    grids = ref_grid(sizes)
    d = log_distances.exp()
    boxes, start = [], 0
    for _ in range(num_images):
        for (h, w), (gy, gx), stride, edge in zip(sizes, grids, strides, edges):
            rows = d[start : start + h * w]
            x, y = (stride * gx).reshape(-1).to(d.dtype), (stride * gy).reshape(-1).to(d.dtype)
            boxes.append(
                torch.stack(
                    [
                        x - edge * rows[:, 0],
                        y - edge * rows[:, 1],
                        x + edge * rows[:, 2],
                        y + edge * rows[:, 3],
                    ],
                    dim=1,
                )
            )
            start += h * w
    return torch.cat(boxes)


def ref_giou_loss(pred, target, eps=1e-6):
    """mmdetection's GIoU loss (1 - GIoU), eps 1e-6 on the union and the hull."""
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    union = (
        (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
        + (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
        - inter
        + eps
    )
    hull = torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])
    hull = hull.clamp(min=0).prod(1) + eps
    return 1 - (inter / union - (hull - union) / hull)


def _carrying(value, logits, grad):
    """``value`` whose gradient in ``logits`` is ``grad`` (the autograd functions' backward)."""
    return value + (logits * grad).sum() - (logits * grad).sum().detach()


def ref_fovea_losses(
    kind, cls_out, box_out, gt_boxes, gt_classes, strides, edges, ranges, sigma=0.4
):
    """The authors' FoveaBox head losses for raw outputs ``cls_out[l]`` ``(N, K, H, W)`` and
    ``box_out[l]`` ``(N, 4, H, W)``: ``kind`` ``"focal"``, ``"ap"`` or ``"alrp"``; a dict
    of losses differentiable in the outputs, and the (M,) labels (level-major)."""
    num_images, num_classes = cls_out[0].shape[:2]
    sizes = [tuple(o.shape[-2:]) for o in cls_out]
    labels, targets = ref_targets(
        gt_boxes, gt_classes, sizes, strides, edges, ranges, sigma, num_classes
    )
    targets = targets.to(box_out[0].dtype)
    logits = ref_flatten(cls_out, num_classes)
    deltas = ref_flatten(box_out, 4)
    pos = labels < num_classes
    num_pos = int(pos.sum())
    onehot = ref_onehot(labels, num_classes)
    if kind == "focal":
        cls = ref_focal_sum(logits.reshape(-1), onehot) / (num_pos + num_images)
        box = ref_smooth_l1(deltas[pos], targets[pos]).sum() / num_pos
        return {"cls": cls, "box": box}, labels
    flat = logits.reshape(-1)
    if kind == "ap":
        value, grad = ref_ap(flat.detach(), onehot)
        box = ref_smooth_l1(deltas[pos], targets[pos]).mean()
        return {"cls": _carrying(value, flat, grad), "box": box}, labels
    pred = ref_decode_as_authors(deltas, sizes, strides, edges, num_images)[pos]
    target = ref_decode_as_authors(targets, sizes, strides, edges, num_images)[pos]
    errors = ref_giou_loss(pred, target)
    value, grad, rank, order = ref_alrp(flat.detach(), onehot, errors.detach())
    descending = order.flip(0)
    loc = (torch.cumsum(errors[descending], 0) / rank[descending]).mean()
    return {"cls": _carrying(value, flat, grad), "loc": SB_WEIGHT * loc}, labels


def ref_fovea_detections(
    cls_out,
    box_out,
    image,
    image_shape,
    strides,
    edges,
    nms_pre=1000,
    score_thr=0.05,
    iou_thr=0.5,
    max_per_img=100,
):
    """The authors' test-time boxes of image ``image``: (boxes, scores, classes), sorted by
    decreasing score."""
    num_classes = cls_out[0].shape[1]
    sizes = [tuple(o.shape[-2:]) for o in cls_out]
    grids = ref_grid(sizes)
    all_boxes, all_scores = [], []
    for c, b, (gy, gx), stride, edge in zip(cls_out, box_out, grids, strides, edges):
        scores = c[image].permute(1, 2, 0).reshape(-1, num_classes).sigmoid()
        d = b[image].permute(1, 2, 0).reshape(-1, 4).exp()
        y, x = gy.reshape(-1).to(d.dtype), gx.reshape(-1).to(d.dtype)
        if scores.shape[0] > nms_pre:
            top = scores.max(dim=1).values.topk(nms_pre).indices
            scores, d, y, x = scores[top], d[top], y[top], x[top]
        height, width = image_shape
        all_boxes.append(
            torch.stack(
                [
                    (stride * x - edge * d[:, 0]).clamp(0, width - 1),
                    (stride * y - edge * d[:, 1]).clamp(0, height - 1),
                    (stride * x + edge * d[:, 2]).clamp(0, width - 1),
                    (stride * y + edge * d[:, 3]).clamp(0, height - 1),
                ],
                dim=1,
            )
        )
        all_scores.append(scores)
    boxes, scores = torch.cat(all_boxes), torch.cat(all_scores)
    rows, classes = (scores > score_thr).nonzero().unbind(1)
    boxes, scores = boxes[rows], scores[rows, classes]
    keep = batched_nms(boxes, scores, classes, iou_thr)[:max_per_img]
    return boxes[keep], scores[keep], classes[keep]
