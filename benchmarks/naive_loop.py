"""The paper's Algorithm S1 as its reference code runs it: a Python loop over the
positives, each one a few vector operations over the relevant negatives.  Used
only as the speed baseline of ``loss_speed.py``."""

import torch


def alrp_loop(logits, targets, loc_errors, delta=1.0, eps=1e-5):
    """aLRP by a loop over positives; returns (cls, loc) with the gradient attached to logits."""
    with torch.no_grad():
        pos = targets == 1
        pos_scores = logits[pos]
        p = pos_scores.numel()
        threshold = pos_scores.min() - delta
        relevant = (targets == 0) & (logits >= threshold)
        neg_scores = logits[relevant]
        neg_grad = torch.zeros_like(neg_scores)
        pos_grad = torch.zeros_like(pos_scores)
        rank = torch.zeros_like(pos_scores)
        num_fp = torch.zeros_like(pos_scores)
        for i in range(p):
            h_pos = ((pos_scores - pos_scores[i]) / (2 * delta) + 0.5).clamp(0, 1)
            h_pos[i] = 0
            h_neg = ((neg_scores - pos_scores[i]) / (2 * delta) + 0.5).clamp(0, 1)
            fp = h_neg.sum()
            rank[i] = 1 + h_pos.sum() + fp
            num_fp[i] = fp
            if fp > eps:  # the reference code's per-positive host synchronisation
                g = (fp + (h_pos * loc_errors).sum()) / rank[i]
                pos_grad[i] = -g
                neg_grad += h_neg * (g / fp)
        grad = torch.zeros_like(logits)
        grad[pos] = pos_grad / p
        grad[relevant] = neg_grad / p
        cls = (num_fp / rank).mean()
        order = pos_scores.argsort(descending=True)
        loc = (loc_errors[order].cumsum(0) / rank[order]).mean()
    return cls, loc, grad


def ap_loop(logits, targets, delta=1.0):
    """AP Loss by a loop over positives (from the lowest score up)."""
    with torch.no_grad():
        pos = targets == 1
        pos_scores = logits[pos]
        p = pos_scores.numel()
        relevant = (targets == 0) & (logits >= pos_scores.min() - delta)
        neg_scores = logits[relevant]
        neg_grad = torch.zeros_like(neg_scores)
        pos_grad = torch.zeros_like(pos_scores)
        interpolated = torch.zeros_like(pos_scores)
        best = torch.zeros((), dtype=logits.dtype, device=logits.device)
        for i in pos_scores.argsort().tolist():
            h_pos = ((pos_scores - pos_scores[i]) / (2 * delta) + 0.5).clamp(0, 1)
            h_pos[i] = 0
            h_neg = ((neg_scores - pos_scores[i]) / (2 * delta) + 0.5).clamp(0, 1)
            rank_pos = 1 + h_pos.sum()
            rank = rank_pos + h_neg.sum()
            prec = rank_pos / rank
            if best <= prec:
                best = prec
                neg_grad += h_neg / rank
            else:
                neg_grad += h_neg / rank * ((1 - best) / (1 - prec))
            pos_grad[i] = -(1 - best)
            interpolated[i] = best
        grad = torch.zeros_like(logits)
        grad[pos] = pos_grad / p
        grad[relevant] = neg_grad / p
    return 1 - interpolated.mean(), grad
