"""The paper's toy example (Figure 1, Tables S1 and S2), computed with this library.

Ten anchors of one class are scored 1.0, 0.9, ..., 0.1 (sigmoid outputs).  The
anchors scored 1.0, 0.8, 0.5 and 0.1 are true positives, the other six false
positives; there are five ground truths, one of them never detected.  Three
classification-and-regression outputs (C&R1-3) share this ranking but give the
four positives their IoUs in different orders.  Every ground truth is the unit box
``[0, 0, 1, 1]`` and each positive box differs from it in ``y2`` only
(supplementary S1.3), which fixes the L1 and IoU losses.

Run ``python -m alrp_d2.toy`` for the tables, ``--json`` for unrounded numbers and
``--plot FILE.png`` for the interpolated precision-recall curves of Figure S2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from .losses import alrp_loss, ap_loss
from .losses.alrp import cumulative_errors
from .losses.ranking import PositiveStats, RankingUpdate, ranking_loss

SCORES = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
POSITIVE = [True, False, True, False, False, True, False, False, False, True]
NUM_GROUND_TRUTHS = 5
TAU = 0.5
IOU_THRESHOLDS = ["0.5", "0.65", "0.8", "0.95"]
RECALL_POINTS = [r / 10 for r in range(1, 11)]
# y2 of each positive box by its IoU with the unit box (supplementary Figure S1):
# a box of IoU 0.8 is the taller one, [0, 0, 1, 1.25]; the others are shorter.
Y2_BY_IOU = {0.95: 0.95, 0.80: 1.25, 0.65: 0.65, 0.50: 0.50}
OUTPUT_IOUS = {
    "C&R1": [0.95, 0.80, 0.65, 0.50],
    "C&R2": [0.80, 0.65, 0.50, 0.95],
    "C&R3": [0.50, 0.65, 0.80, 0.95],
}


def positive_boxes(ious: Sequence[float]) -> torch.Tensor:
    return torch.tensor([[0.0, 0.0, 1.0, Y2_BY_IOU[iou]] for iou in ious], dtype=torch.float64)


def interpolated_pr_curve(is_tp: Sequence[bool], num_ground_truths: int):
    """Recall and interpolated precision after each detection of a ranked list."""
    tp = torch.tensor(is_tp, dtype=torch.float64).cumsum(0)
    seen = torch.arange(1, len(is_tp) + 1, dtype=torch.float64)
    recall = tp / num_ground_truths
    precision = tp / seen
    # Interpolation keeps the best precision at this recall or beyond.
    interpolated = precision.flip(0).cummax(0).values.flip(0)
    return recall, interpolated


def average_precision(is_tp: Sequence[bool], num_ground_truths: int) -> Dict[str, object]:
    """AP over the recall points 0.1, ..., 1.0 (Table S1)."""
    recall, interpolated = interpolated_pr_curve(is_tp, num_ground_truths)
    precisions = []
    for r in RECALL_POINTS:
        reached = recall >= r - 1e-12
        precisions.append(float(interpolated[reached].max()) if reached.any() else 0.0)
    return {"ap": sum(precisions) / len(precisions), "precisions": precisions}


def _per_positive_lrp(logits, targets, loc_errors) -> List[float]:
    """LRP error of every positive (Table S2) from the engine's ranking statistics."""
    captured = {}

    def definition(stats: PositiveStats) -> RankingUpdate:
        captured["stats"] = stats
        zeros = torch.zeros_like(stats.scores)
        return RankingUpdate(zeros.sum(), zeros, zeros)

    ranking_loss(logits, targets, definition, delta=0.0)
    stats = captured["stats"]
    return ((stats.num_fp + cumulative_errors(stats, loc_errors)) / stats.rank).tolist()


def compute() -> Dict[str, object]:
    logits = torch.tensor(SCORES, dtype=torch.float64)  # only the order matters with delta = 0
    targets = torch.tensor([1 if p else 0 for p in POSITIVE])
    probabilities = logits.clamp(1e-12, 1 - 1e-12)
    ground_truth = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)

    outputs = {}
    for name, ious in OUTPUT_IOUS.items():
        boxes = positive_boxes(ious)
        iou = box_iou(boxes, ground_truth)[:, 0]
        loc_errors = (1 - iou) / (1 - TAU)
        cls, loc = alrp_loss(logits, targets, loc_errors, delta=0.0)
        per_iou = {}
        for threshold in IOU_THRESHOLDS:
            positive_iou = iter(iou.tolist())
            is_tp = [p and next(positive_iou) >= float(threshold) - 1e-12 for p in POSITIVE]
            per_iou[threshold] = average_precision(is_tp, NUM_GROUND_TRUTHS)
        outputs[name] = {
            "alrp": float(cls + loc),
            "alrp_cls": float(cls),
            "alrp_loc": float(loc),
            "ap_iou": sum(v["ap"] for v in per_iou.values()) / len(per_iou),
            "ap": {t: v["ap"] for t, v in per_iou.items()},
            "precision_at_recall": {t: v["precisions"] for t, v in per_iou.items()},
            "ious": iou.tolist(),
            "lrp_per_positive": _per_positive_lrp(logits, targets, loc_errors),
        }

    # The classification output, the IoUs and hence these losses are the same for C&R1-3.
    boxes = positive_boxes(OUTPUT_IOUS["C&R1"])
    return {
        "outputs": outputs,
        "cross_entropy": float(F.binary_cross_entropy(probabilities, targets.double())),
        "ap_loss": float(ap_loss(logits, targets, delta=0.0)),
        "l1": float((boxes - ground_truth).abs().sum(1).mean()),
        "iou_loss": float((1 - box_iou(boxes, ground_truth)[:, 0]).mean()),
    }


def format_tables(result: Dict[str, object]) -> str:
    lines = ["Figure 1 / Table S1: precision at recall 0.1 ... 1.0, AP per IoU threshold", ""]
    header = "IoU   output " + " ".join(f"R={r:.1f}" for r in RECALL_POINTS) + "    AP"
    lines.append(header)
    for threshold in IOU_THRESHOLDS:
        for name, out in result["outputs"].items():
            row = " ".join(f"{p:5.2f}" for p in out["precision_at_recall"][threshold])
            lines.append(f"{threshold:<5} {name:<6} {row}  {out['ap'][threshold]:.2f}")
    lines += ["", "Table S2: LRP per positive (scores 1.0, 0.8, 0.5, 0.1) and aLRP", ""]
    lines.append("output  IoUs                      LRP per positive          aLRP  AP_IoU")
    for name, out in result["outputs"].items():
        ious = " ".join(f"{v:.2f}" for v in out["ious"])
        lrp = " ".join(f"{v:.2f}" for v in out["lrp_per_positive"])
        lines.append(f"{name:<7} {ious:<25} {lrp:<25} {out['alrp']:.2f}  {out['ap_iou']:.2f}")
    lines += [
        "",
        "Same for all three outputs:",
        f"  cross-entropy {result['cross_entropy']:.2f}   AP Loss {result['ap_loss']:.2f}"
        f"   L1 {result['l1']:.2f}   IoU Loss {result['iou_loss']:.2f}",
    ]
    return "\n".join(lines)


def plot(result: Dict[str, object], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["outputs"])
    fig, axes = plt.subplots(
        len(IOU_THRESHOLDS), len(names), figsize=(9, 10), sharex=True, sharey=True
    )
    for row, threshold in enumerate(IOU_THRESHOLDS):
        for col, name in enumerate(names):
            out = result["outputs"][name]
            positive_iou = iter(out["ious"])
            is_tp = [p and next(positive_iou) >= float(threshold) - 1e-12 for p in POSITIVE]
            recall, interpolated = interpolated_pr_curve(is_tp, NUM_GROUND_TRUTHS)
            # Step curve from recall 0, dropping to 0 past the last recall reached.
            xs = [0.0] + recall.tolist() + [float(recall[-1]), 1.0]
            ys = [float(interpolated[0])] + interpolated.tolist() + [0.0, 0.0]
            ax = axes[row, col]
            ax.step(xs, ys, where="pre")
            ax.set_xlim(0, 1.02)
            ax.set_ylim(0, 1.05)
            ax.set_title(
                f"{name}, AP{round(float(threshold) * 100)} = {out['ap'][threshold]:.2f}",
                fontsize=9,
            )
            if row == len(IOU_THRESHOLDS) - 1:
                ax.set_xlabel("recall")
            if col == 0:
                ax.set_ylabel("precision")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alrp_d2.toy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", action="store_true", help="print unrounded numbers as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the PR curves of Figure S2")
    args = parser.parse_args(argv)
    result = compute()
    if args.json:
        keep = {"alrp", "ap_iou", "ap", "lrp_per_positive"}
        slim = {
            name: {k: v for k, v in out.items() if k in keep}
            for name, out in result["outputs"].items()
        }
        print(json.dumps({**result, "outputs": slim}, indent=2))
    else:
        print(format_tables(result))
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
