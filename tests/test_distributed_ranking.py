"""One ranking across 2 gloo processes equals one process holding the concatenated batch
(aLRP, AP, NDCG and Rank & Sort Loss, whose two outputs are both compared).

Every case is computed in 2 CPU processes with ``process_group`` and, in each of them,
by one call on the concatenation of both processes' inputs; each process's loss and the
gradients of its own logits and localisation errors must agree (float64, relative 1e-9
of the largest magnitude, as tests/test_losses.py).
"""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alrp_d2.losses import alrp_loss, ap_loss, ndcg_loss, rank_sort_loss

# Slow: process groups of two processes (the fast lane, -m "not slow", leaves them out).
pytestmark = pytest.mark.slow

RTOL = 1e-9
WORLD = 2


def make_part(kind, seed, rank):
    """This rank's ``(logits, targets, loc_errors)`` of case ``(kind, seed)``."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    m = 30 + 17 * rank + seed % 11
    logits = torch.randn(m, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(-1, 2, (m,), generator=g)
    if kind == "ties":  # ties within and across processes
        logits = torch.round(logits * 2) / 2
    elif kind == "no_positive_on_rank1" and rank == 1:
        targets[targets == 1] = 0
    elif kind == "no_positive_anywhere":
        targets[targets == 1] = 0
    loc = torch.rand(int((targets == 1).sum()), generator=g, dtype=torch.float64)
    return logits, targets, loc


def continuous_labels(targets, loc):
    """Rank & Sort targets: each positive labelled in (0, 1] (from its ``loc`` draw, with
    ties among labels), 0 negative, -1 ignored."""
    labels = targets.to(torch.float64)
    labels[targets == 1] = torch.ceil(loc * 4).clamp_min(1) / 4
    return labels


def evaluate(loss_name, logits, targets, loc, delta, group):
    """Loss value and gradients of ``logits`` (and ``loc``)."""
    x = logits.clone().requires_grad_()
    e = loc.clone().requires_grad_()
    if loss_name == "alrp":
        cls, reg = alrp_loss(x, targets, e, delta=delta, process_group=group)
        value = cls + reg
    elif loss_name == "ap":
        value = ap_loss(x, targets, delta=delta, process_group=group)
    elif loss_name == "rank_sort":
        ranking, sorting = rank_sort_loss(
            x, continuous_labels(targets, loc), delta=delta, process_group=group
        )
        value = torch.stack([ranking, sorting])
        (ranking + sorting).backward()
        return value.detach(), x.grad, torch.zeros_like(e)
    else:
        value = ndcg_loss(x, targets, delta=delta, process_group=group)
    value.backward()
    return value.detach(), x.grad, (e.grad if e.grad is not None else torch.zeros_like(e))


def disagreement(actual, expected, floor=0.0):
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, floor)
    if not actual.numel():
        return 0.0
    return (
        float((actual - expected).abs().max()) / scale
        if scale
        else float((actual - expected).abs().max())
    )


KINDS = ["random", "ties", "no_positive_on_rank1", "no_positive_anywhere"]
CASES = [
    (loss, kind, seed, delta)
    for loss in ("alrp", "ap", "ndcg", "rank_sort")
    for kind in KINDS
    for seed in range(2)
    for delta in (0.0, 0.5, 1.0)
]


def worker(rank, init_file, out_dir):
    # Forked from the tests' process: one thread, never its OpenMP pool (not fork-safe).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for loss_name, kind, seed, delta in CASES:
        parts = [make_part(kind, seed, r) for r in range(WORLD)]
        logits, targets, loc = parts[rank]
        value, grad, grad_loc = evaluate(loss_name, logits, targets, loc, delta, dist.group.WORLD)
        whole = [torch.cat([p[i] for p in parts]) for i in range(3)]
        ref_value, ref_grad, ref_grad_loc = evaluate(loss_name, *whole, delta, None)
        start = sum(len(p[0]) for p in parts[:rank])
        loc_start = sum(len(p[2]) for p in parts[:rank])
        results[f"{loss_name}-{kind}-{seed}-{delta}"] = {
            "value": disagreement(value.reshape(-1), ref_value.reshape(-1), floor=1.0),
            "grad": disagreement(grad, ref_grad[start : start + len(logits)]),
            "grad_loc": disagreement(grad_loc, ref_grad_loc[loc_start : loc_start + len(loc)]),
            "zero": bool((value == 0).all()) if kind == "no_positive_anywhere" else True,
        }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    mp.start_processes(
        worker, args=(str(out / "init"), str(out)), nprocs=WORLD, start_method="fork"
    )
    merged = {}
    for rank in range(WORLD):
        with open(out / f"rank{rank}.json") as f:
            for key, value in json.load(f).items():
                merged[(rank, key)] = value
    return merged


@pytest.mark.parametrize("rank", range(WORLD))
@pytest.mark.parametrize("loss_name,kind,seed,delta", CASES)
def test_global_ranking_equals_one_process_with_the_whole_batch(
    results, rank, loss_name, kind, seed, delta
):
    result = results[(rank, f"{loss_name}-{kind}-{seed}-{delta}")]
    assert result["value"] <= RTOL
    assert result["grad"] <= RTOL
    assert result["grad_loc"] <= RTOL
    assert result["zero"]
