"""Rank & Sort Loss as its authors' code runs it: a Python loop over the positives, each
one a few vector operations over all positives and the relevant negatives.  The speed
baseline of ``loss_speed.py --rank-sort`` (checked equal to ``rank_sort_loss`` in
``tests/test_rank_sort_loss.py``)."""

import torch


def rank_sort_loop(logits, targets, delta=0.5, eps=1e-10):
    """Returns (ranking_loss, sorting_loss, grad_logits)."""
    with torch.no_grad():
        pos = targets > 0
        pos_scores, labels = logits[pos], targets[pos]
        p = pos_scores.numel()
        # Negatives below every positive's window never count: leave them out.
        relevant = (targets == 0) & (logits >= pos_scores.min() - delta)
        neg_scores = logits[relevant]
        neg_grad = torch.zeros_like(neg_scores)
        pos_grad = torch.zeros_like(pos_scores)
        ranking = torch.zeros_like(pos_scores)
        sorting = torch.zeros_like(pos_scores)
        for i in range(p):
            h_pos = ((pos_scores - pos_scores[i]) / (2 * delta) + 0.5).clamp(0, 1)
            h_neg = ((neg_scores - pos_scores[i]) / (2 * delta) + 0.5).clamp(0, 1)
            rank_pos, num_fp = h_pos.sum(), h_neg.sum()
            ranking[i] = num_fp / (rank_pos + num_fp)
            in_target = (labels >= labels[i]) * h_pos
            sorting[i] = (h_pos * (1 - labels)).sum() / rank_pos - (
                in_target * (1 - labels)
            ).sum() / in_target.sum()
            if num_fp > eps:  # a host synchronisation per positive, as in the authors' code
                pos_grad[i] -= ranking[i]
                neg_grad += h_neg * (ranking[i] / num_fp)
            missorted = (labels < labels[i]) * h_pos
            denominator = missorted.sum()
            if denominator > eps:
                pos_grad[i] -= sorting[i]
                pos_grad += missorted * (sorting[i] / denominator)
        grad = torch.zeros_like(logits)
        grad[pos] = pos_grad / p
        grad[relevant] = neg_grad / p
    return ranking.mean(), sorting.mean(), grad
