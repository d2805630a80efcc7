"""Forward plus backward time of alrp_loss and ap_loss against the naive loop over
positives and against fvcore's sigmoid focal loss, on the same logits.

    python benchmarks/loss_speed.py                 # CPU, the issue's sizes
    python benchmarks/loss_speed.py --device cuda   # GPU
    python benchmarks/loss_speed.py --sizes 100:1e5 --repeats 3
    python benchmarks/loss_speed.py --rank-sort     # Rank & Sort Loss against its loop and aLRP

Prints a markdown table: medians over repeats, and ratios to the loop and to focal
loss. The loop is skipped where a first timing of a few positives predicts it would
run past ``--loop-limit`` seconds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from fvcore.nn import sigmoid_focal_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from naive_loop import alrp_loop, ap_loop
from rank_sort_loop import rank_sort_loop

from alrp_d2.losses import alrp_loss, ap_loss, rank_sort_loss

DEFAULT_SIZES = "100:1e5,1000:2e6,1000:1e7,3000:3e7"


def make_batch(p: int, m: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, generator=g)
    targets = torch.zeros(m, dtype=torch.long)
    targets[torch.randperm(m, generator=g)[: m // 10]] = -1  # ignored anchors
    targets[torch.randperm(m, generator=g)[:p]] = 1
    loc_errors = torch.rand(p, generator=g)
    return logits.to(device), targets.to(device), loc_errors.to(device)


def timed(fn, device: str, repeats: int) -> float:
    """Median time of ``fn`` after a warm-up."""
    return timed_interleaved([fn], device, repeats)[0]


def timed_interleaved(fns, device: str, repeats: int):
    """Median times of several functions run in turn, so that the load of a shared machine
    falls on all of them alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def run_size(p, m, device, repeats, loop_limit):
    logits, targets, loc_errors = make_batch(p, m, device)
    focal_targets = (targets == 1).to(logits.dtype)

    def alrp():
        x = logits.detach().requires_grad_()
        e = loc_errors.detach().requires_grad_()
        cls, loc = alrp_loss(x, targets, e)
        (cls + loc).backward()

    def ap():
        x = logits.detach().requires_grad_()
        ap_loss(x, targets).backward()

    def focal():
        x = logits.detach().requires_grad_()
        # Over all M logits, without masking the ignored ones: the stricter comparison.
        loss = sigmoid_focal_loss(x, focal_targets, alpha=0.25, gamma=2.0, reduction="sum")
        (loss / p).backward()

    def loop_alrp():
        alrp_loop(logits, targets, loc_errors)

    def loop_ap():
        ap_loop(logits, targets)

    row = {"P": p, "M": m}
    row["alrp"] = timed(alrp, device, repeats)
    row["ap"] = timed(ap, device, repeats)
    row["focal"] = timed(focal, device, repeats)

    # Predict the loop's time from runs on a few positives (its cost is linear in P).
    def loop_on(count):
        sub = targets.clone()
        sub[torch.nonzero(targets == 1).flatten()[count:]] = 0
        start = time.perf_counter()
        alrp_loop(logits, sub, loc_errors[:count])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    few, more = min(p, 10), min(p, 40)
    t_few, t_more = loop_on(few), loop_on(more)
    per_positive = (t_more - t_few) / max(more - few, 1)
    predicted = t_more + per_positive * (p - more)
    if predicted <= loop_limit:
        loop_repeats = 1 if predicted > 5 else repeats
        row["loop_alrp"] = timed(loop_alrp, device, loop_repeats)
        row["loop_ap"] = timed(loop_ap, device, loop_repeats)
    else:
        row["loop_alrp"] = row["loop_ap"] = None
        row["loop_predicted"] = predicted
    return row


def run_rank_sort_size(p, m, device, repeats, loop_limit):
    """Rank & Sort Loss (delta 0.5, labels uniform in (0.1, 1]) against the authors' loop,
    aLRP (delta 1) and focal loss on the same logits, the three timed in turn."""
    logits, targets, loc_errors = make_batch(p, m, device)
    g = torch.Generator().manual_seed(1)
    labels = (0.1 + 0.9 * torch.rand(m, generator=g)).to(device)
    rs_targets = torch.where(targets == 1, labels, targets.to(labels.dtype))
    focal_targets = (targets == 1).to(logits.dtype)

    def rank_sort():
        x = logits.detach().requires_grad_()
        ranking, sorting = rank_sort_loss(x, rs_targets)
        (ranking + sorting).backward()

    def alrp():
        x = logits.detach().requires_grad_()
        cls, loc = alrp_loss(x, targets, loc_errors.detach().requires_grad_())
        (cls + loc).backward()

    def focal():
        x = logits.detach().requires_grad_()
        loss = sigmoid_focal_loss(x, focal_targets, alpha=0.25, gamma=2.0, reduction="sum")
        (loss / p).backward()

    row = {"P": p, "M": m}
    row["rs"], row["alrp"], row["focal"] = timed_interleaved(
        [rank_sort, alrp, focal], device, repeats
    )

    def loop_on(count):
        sub = rs_targets.clone()
        sub[torch.nonzero(rs_targets > 0).flatten()[count:]] = 0
        start = time.perf_counter()
        rank_sort_loop(logits, sub)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    few, more = min(p, 10), min(p, 40)
    t_few, t_more = loop_on(few), loop_on(more)
    predicted = t_more + (t_more - t_few) / max(more - few, 1) * (p - more)
    if predicted <= loop_limit:
        row["loop"] = timed(
            lambda: rank_sort_loop(logits, rs_targets), device, 1 if predicted > 5 else repeats
        )
    else:
        row["loop"], row["loop_predicted"] = None, predicted
    return row


def markdown_rank_sort(rows) -> str:
    out = [
        "| P | M | RS Loss (s) | aLRP (s) | focal (s) | loop RS (s) | loop/RS | RS/aLRP "
        "| RS/focal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["loop"] is None:
            loop, speedup = f"skipped (~{r['loop_predicted']:.0f} s predicted)", "-"
        else:
            loop, speedup = f"{r['loop']:.4f}", f"{r['loop'] / r['rs']:.1f}x"
        out.append(
            f"| {r['P']} | {r['M']:.0e} | {r['rs']:.4f} | {r['alrp']:.4f} | "
            f"{r['focal']:.4f} | {loop} | {speedup} | {r['rs'] / r['alrp']:.2f}x | "
            f"{r['rs'] / r['focal']:.2f}x |"
        )
    return "\n".join(out)


def markdown(rows) -> str:
    out = [
        "| P | M | aLRP (s) | AP Loss (s) | focal (s) | loop aLRP (s) | loop AP (s) "
        "| loop/aLRP | loop/AP | aLRP/focal | AP/focal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def fmt(v):
            return "skipped" if v is None else f"{v:.4f}"

        loop_a = "-" if r["loop_alrp"] is None else f"{r['loop_alrp'] / r['alrp']:.1f}x"
        loop_b = "-" if r["loop_ap"] is None else f"{r['loop_ap'] / r['ap']:.1f}x"
        if r["loop_alrp"] is None:
            skipped = f"skipped (~{r['loop_predicted']:.0f} s predicted)"
            loops = f"{skipped} | {skipped}"
        else:
            loops = f"{fmt(r['loop_alrp'])} | {fmt(r['loop_ap'])}"
        out.append(
            f"| {r['P']} | {r['M']:.0e} | {r['alrp']:.4f} | {r['ap']:.4f} | {r['focal']:.4f} | "
            f"{loops} | {loop_a} | {loop_b} | {r['alrp'] / r['focal']:.2f}x | "
            f"{r['ap'] / r['focal']:.2f}x |"
        )
    return "\n".join(out)


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="P:M pairs, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-limit", type=float, default=60.0, help="seconds")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch's CPU threads (default: torch's choice); 1 compares losses"
        " fairly on a machine other jobs share",
    )
    parser.add_argument(
        "--rank-sort",
        action="store_true",
        help="time rank_sort_loss against its loop, aLRP and focal loss",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [
        (int(float(a)), int(float(b))) for a, b in (s.split(":") for s in args.sizes.split(","))
    ]
    print(f"device: {describe_device(args.device)}; torch {torch.__version__}", flush=True)
    run, table = (
        (run_rank_sort_size, markdown_rank_sort) if args.rank_sort else (run_size, markdown)
    )
    rows = []
    for p, m in sizes:
        rows.append(run(p, m, args.device, args.repeats, args.loop_limit))
        print(f"done P={p} M={m:.0e}", file=sys.stderr, flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
