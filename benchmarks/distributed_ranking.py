"""Cost of one ranking across processes (``process_group``) against each process ranking
its own anchors: forward plus backward time of alrp_loss per call, and the bytes each
process sends, with 2 gloo processes on this machine.

    python benchmarks/distributed_ranking.py                    # P=1000, M=2e6 per process
    python benchmarks/distributed_ranking.py --sizes 1000:2e6,3000:1e7 --repeats 5

Bytes are counted by wrapping the ``torch.distributed`` collectives the loss calls
(the size of the tensor each process contributes). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_speed import make_batch

from alrp_d2.losses import alrp_loss

WORLD = 2


class ByteCounter:
    """Counts the bytes this process contributes to all_gather and all_reduce."""

    def __init__(self):
        self.sent = 0
        self._gather, self._reduce = dist.all_gather, dist.all_reduce

    def __enter__(self):
        def all_gather(tensors, tensor, *args, **kwargs):
            self.sent += tensor.numel() * tensor.element_size()
            return self._gather(tensors, tensor, *args, **kwargs)

        def all_reduce(tensor, *args, **kwargs):
            self.sent += tensor.numel() * tensor.element_size()
            return self._reduce(tensor, *args, **kwargs)

        dist.all_gather, dist.all_reduce = all_gather, all_reduce
        return self

    def __exit__(self, *exc):
        dist.all_gather, dist.all_reduce = self._gather, self._reduce


def one_call(logits, targets, loc_errors, group):
    x = logits.clone().requires_grad_()
    e = loc_errors.clone().requires_grad_()
    cls, loc = alrp_loss(x, targets, e, validate=False, process_group=group)
    (cls + loc).backward()


def timed(fn, repeats):
    dist.barrier()
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank, init_file, sizes, repeats, queue):
    torch.set_num_threads(1)  # one core per process on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    rows = []
    for p, m in sizes:
        batch = make_batch(p, m, "cpu", seed=rank)
        local = timed(lambda: one_call(*batch, None), repeats)
        shared = timed(lambda: one_call(*batch, dist.group.WORLD), repeats)
        with ByteCounter() as counter:
            one_call(*batch, dist.group.WORLD)
        rows.append((p, m, local, shared, counter.sent))
    queue.put((rank, rows))
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000:2e6", help="P:M per process, comma separated")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = [(int(p), int(float(m))) for p, m in (s.split(":") for s in args.sizes.split(","))]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            worker,
            args=(os.path.join(tmp, "init"), sizes, args.repeats, queue),
            nprocs=WORLD,
            start_method="spawn",
        )
    results = dict(queue.get() for _ in range(WORLD))
    print(f"{WORLD} gloo processes, 1 thread each; medians of {args.repeats}; rank 0 (rank 1)")
    print(
        '| P per process | M per process | "process" scope | "global" scope | global / process '
        "| bytes sent per call |"
    )
    print("|---|---|---|---|---|---|")
    for row0, row1 in zip(results[0], results[1]):
        p, m, local, shared, sent = row0
        print(
            f"| {p} | {m:.0e} | {local:.3f} s ({row1[2]:.3f} s) | {shared:.3f} s ({row1[3]:.3f} s) "
            f"| {shared / local:.2f}x | {sent} ({row1[4]}) |"
        )


if __name__ == "__main__":
    main()
