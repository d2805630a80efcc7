"""Padding per training batch, with and without aspect-ratio grouping.

Each image of a batch is resized as the R-CNN and Rank & Sort configs resize it
(Detectron2's ``ResizeShortestEdge``, shorter side 800, longer at most 1333), and the
batch is padded as Detectron2 pads it (``ImageList.from_tensors``: the largest height and
width of the batch, rounded up to a multiple of 32). The figure is the batch's pixels over
its images' pixels, summed over one epoch of every process's batches, as
:class:`alrp_d2.data.sampling.EpochBatchSampler` makes them: without grouping, with
Detectron2's two groups (landscape and the rest) and with the default
``DATALOADER.ASPECT_RATIO_BINS`` (the common photo formats apart).

The images' sizes are drawn from an assumed COCO-like mix (most images 640 pixels wide and
landscape, about a fifth portrait; proportions in ``MIX``), not read from COCO.

    python benchmarks/padding.py [--images 20000] [--per-process 4] [--processes 4]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from alrp_d2.data.sampling import (
    ASPECT_RATIO_BINS,
    EpochBatchSampler,
    EpochShardSampler,
    aspect_ratio_groups,
)

# (width, height): share of the images (assumed, COCO-like)
MIX = {
    (640, 480): 0.45,
    (640, 427): 0.20,
    (640, 360): 0.07,
    (500, 375): 0.05,
    (640, 640): 0.03,
    (480, 640): 0.12,
    (427, 640): 0.08,
}
SHORT, LONG, DIVISIBILITY = 800, 1333, 32


def resized(width: int, height: int):
    """Detectron2's ResizeShortestEdge output size (its get_output_shape), as (h, w)."""
    from detectron2.data.transforms import ResizeShortestEdge

    return ResizeShortestEdge.get_output_shape(height, width, SHORT, LONG)


def records(count: int, seed: int):
    rng = np.random.default_rng(seed)
    sizes = list(MIX)
    picks = rng.choice(len(sizes), size=count, p=np.array(list(MIX.values())))
    return [{"width": sizes[i][0], "height": sizes[i][1]} for i in picks]


def padding_ratio(dicts, per_process: int, processes: int, bins=None, epoch: int = 0):
    """Batch pixels over image pixels; ``bins``: the aspect-ratio groups' edges (None: no
    grouping)."""
    shapes = [resized(d["width"], d["height"]) for d in dicts]
    groups = None if bins is None else aspect_ratio_groups(dicts, bins)
    padded = content = 0
    for rank in range(processes):
        sampler = EpochShardSampler(len(dicts), num_replicas=processes, rank=rank, seed=0)
        for batch in EpochBatchSampler(sampler, per_process, groups).batches(epoch):
            heights = [shapes[i][0] for i in batch]
            widths = [shapes[i][1] for i in batch]
            height = math.ceil(max(heights) / DIVISIBILITY) * DIVISIBILITY
            width = math.ceil(max(widths) / DIVISIBILITY) * DIVISIBILITY
            padded += len(batch) * height * width
            content += sum(h * w for h, w in zip(heights, widths))
    return padded / content


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--per-process", type=int, default=4)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dicts = records(args.images, args.seed)
    portrait = sum(d["height"] > d["width"] for d in dicts) / len(dicts)
    print(
        f"{args.images} images ({portrait:.0%} portrait), {args.processes} processes x"
        f" {args.per_process} images, resize {SHORT}x{LONG}, padding to multiples of"
        f" {DIVISIBILITY}"
    )
    print("| DATALOADER.ASPECT_RATIO_GROUPING | ASPECT_RATIO_BINS | batch pixels / image pixels |")
    print("|---|---|---|")
    for grouping, bins in (
        ("False", None),
        ("True", (1.0,)),  # Detectron2's two groups
        ("True", ASPECT_RATIO_BINS),  # the default
    ):
        ratio = padding_ratio(dicts, args.per_process, args.processes, bins)
        label = "-" if bins is None else ", ".join(f"{b:g}" for b in bins)
        print(f"| {grouping} | {label} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
