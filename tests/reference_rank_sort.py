"""Naive Rank & Sort Loss, transcribed from shared/spec/ALRP.md section 9.

A loop over positives with full rows of comparisons, in float64: slow and obvious, the
ground truth the fast loss is tested against.
"""

import torch


def rs_step(x, delta):
    """The authors' step: ``1[x >= 0]`` when ``delta == 0``."""
    if delta == 0:
        return (x >= 0).double()
    return torch.clamp(x / (2 * delta) + 0.5, 0, 1)


def rank_sort_reference(logits, targets, delta=0.5, eps=1e-10):
    """Returns (ranking_loss, sorting_loss, grad_logits (M,))."""
    s = logits.detach().double().reshape(-1)
    t = targets.detach().double().reshape(-1)
    pos = torch.nonzero(t > 0).flatten()
    neg = torch.nonzero(t == 0).flatten()
    p = len(pos)
    y = t[pos]
    ranking = torch.zeros(p, dtype=torch.float64)
    sorting = torch.zeros(p, dtype=torch.float64)
    grad = torch.zeros_like(s)
    for i in range(p):
        h_pos = rs_step(s[pos] - s[pos[i]], delta)  # includes k = i
        h_neg = rs_step(s[neg] - s[pos[i]], delta)
        rank_pos = h_pos.sum()
        num_fp = h_neg.sum()
        ranking[i] = num_fp / (rank_pos + num_fp)
        current = (h_pos * (1 - y)).sum() / rank_pos
        in_target = (y >= y[i]).double() * h_pos
        target = (in_target * (1 - y)).sum() / in_target.sum()
        sorting[i] = current - target
        if num_fp > eps:
            grad[pos[i]] -= ranking[i] / p
            grad[neg] += ranking[i] * h_neg / num_fp / p
        missorted = (y < y[i]).double() * h_pos
        denominator = missorted.sum()
        if denominator > eps:
            grad[pos[i]] -= sorting[i] / p
            grad[pos] += sorting[i] * missorted / denominator / p
    return ranking.mean(), sorting.mean(), grad
