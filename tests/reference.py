"""Naive O(|P| x |N|) ranking losses, transcribed from the spec (shared/spec/ALRP.md).

Deliberately simple and slow: loops over positives, full pairwise matrices,
float64. They are the ground truth the fast engine is tested against.
"""

import math

import torch


def step(x, delta):
    if delta == 0:
        return (x > 0).double() + 0.5 * (x == 0).double()
    return torch.clamp(x / (2 * delta) + 0.5, 0, 1)


def _split(logits, targets):
    s = logits.detach().double().reshape(-1)
    t = targets.reshape(-1)
    pos = torch.nonzero(t == 1).flatten()
    neg = torch.nonzero(t == 0).flatten()
    return s, pos, neg


def _ranks(s, pos, neg, delta):
    """rank+(i), N_FP(i), rank(i) for each positive, and the matrices H(x_ik), H(x_ij)."""
    sp, sn = s[pos], s[neg]
    h_pos = step(sp[None, :] - sp[:, None], delta)  # [i, k] = H(s_k - s_i)
    h_pos.fill_diagonal_(0)
    h_neg = step(sn[None, :] - sp[:, None], delta)  # [i, j] = H(s_j - s_i)
    rank_pos = 1 + h_pos.sum(1)
    num_fp = h_neg.sum(1)
    return rank_pos, num_fp, rank_pos + num_fp, h_pos, h_neg


def alrp_reference(logits, targets, loc_errors, delta=1.0, eps=1e-5):
    """Returns (cls_loss, loc_loss, grad_logits (M,), grad_loc (P,))."""
    s, pos, neg = _split(logits, targets)
    e = loc_errors.detach().double()
    p = len(pos)
    rank_pos, num_fp, rank, h_pos, h_neg = _ranks(s, pos, neg, delta)
    cls = (num_fp / rank).mean()
    sp = s[pos]
    # cumE with the unit step (ties 1/2), rank detached
    h0 = step(sp[None, :] - sp[:, None], 0)
    h0.fill_diagonal_(0)
    cum = e + h0 @ e
    loc = (cum / rank).mean()
    grad_loc = torch.zeros(p, dtype=torch.float64)
    for i in range(p):
        for k in range(p):
            # d cum(k) / d e(i) = 1 if i == k else h0[k, i]
            grad_loc[i] += (1.0 if i == k else h0[k, i]) / rank[k] / p
    grad = torch.zeros_like(s)
    for ii in range(p):
        if num_fp[ii] > eps:
            g = (num_fp[ii] + (h_pos[ii] * e).sum()) / rank[ii]
            grad[pos[ii]] = -g / p
            grad[neg] += g * h_neg[ii] / num_fp[ii] / p
    return cls, loc, grad, grad_loc


def ap_reference(logits, targets, delta=1.0):
    """Returns (loss, grad_logits)."""
    s, pos, neg = _split(logits, targets)
    p = len(pos)
    rank_pos, num_fp, rank, _, h_neg = _ranks(s, pos, neg, delta)
    prec = rank_pos / rank
    sp = s[pos]
    iprec = torch.stack([prec[sp <= sp[i]].max() for i in range(p)])
    grad = torch.zeros_like(s)
    for ii in range(p):
        grad[pos[ii]] = -(1 - iprec[ii]) / p
        a = 1.0 if iprec[ii] == prec[ii] else (1 - iprec[ii]) / (1 - prec[ii])
        grad[neg] += h_neg[ii] / rank[ii] * a / p
    return 1 - iprec.mean(), grad


def ndcg_reference(logits, targets, delta=1.0, eps=1e-5):
    """Returns (loss, grad_logits)."""
    s, pos, neg = _split(logits, targets)
    p = len(pos)
    _, num_fp, rank, _, h_neg = _ranks(s, pos, neg, delta)
    gain = 1 / torch.log2(1 + rank)
    g_max = sum(1 / math.log2(1 + r) for r in range(1, p + 1))
    grad = torch.zeros_like(s)
    for ii in range(p):
        if num_fp[ii] > eps:
            u = (1 - gain[ii]) / g_max
            grad[pos[ii]] = -u
            grad[neg] += u * h_neg[ii] / num_fp[ii]
    return 1 - gain.sum() / g_max, grad


def primary_terms_alrp_cls(logits, targets, delta=1.0):
    """L_ij = (N_FP(i)/rank(i)) * H(x_ij)/N_FP(i) for the classification part."""
    s, pos, neg = _split(logits, targets)
    _, num_fp, rank, _, h_neg = _ranks(s, pos, neg, delta)
    safe = torch.where(num_fp > 0, num_fp, torch.ones_like(num_fp))
    return (num_fp / rank)[:, None] * h_neg / safe[:, None]
