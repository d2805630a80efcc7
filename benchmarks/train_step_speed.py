"""Time of one training step (forward, backward, SGD step) of RetinaNet R50-FPN trained
by aLRP Loss against the same network trained by focal loss.

    python benchmarks/train_step_speed.py --device cuda              # the issue's setting
    python benchmarks/train_step_speed.py --device cpu --batch 2 --steps 3

Random initialisation, random images of --size x --size with a few boxes each; the
aLRP model uses the IoU assigner and the anchors of the focal model, so that the two
differ in their loss computation only (both built from the aLRPLoss500 GIoU config).
Prints a markdown row with medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import alrp_d2.modeling  # noqa: F401  (registers ALRPRetinaNet)
from alrp_d2.config import get_cfg

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
CONFIG = os.path.join(ROOT, "configs", "COCO-Detection", "alrp_retinanet_R_50_FPN_500_giou.yaml")


def make_cfg(meta_architecture: str, device: str):
    cfg = get_cfg()
    cfg.merge_from_file(CONFIG)
    cfg.MODEL.META_ARCHITECTURE = meta_architecture
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    cfg.MODEL.RESNETS.NORM = "BN"  # random initialisation: batch statistics
    cfg.MODEL.PIXEL_STD = [57.375, 57.12, 58.395]
    return cfg


def make_batch(n: int, size: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        k = int(torch.randint(3, 12, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * size * 0.7
        wh = 16 + torch.rand(k, 2, generator=g) * size * 0.3
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.cat([xy, (xy + wh).clamp(max=size)], 1))
        inst.gt_classes = torch.randint(0, 80, (k,), generator=g)
        image = torch.randint(0, 255, (3, size, size), generator=g).float()
        batch.append({"image": image.to(device), "instances": inst.to(device)})
    return batch


def time_steps(meta_architecture, args):
    torch.manual_seed(0)
    model = build_model(make_cfg(meta_architecture, args.device)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    batch = make_batch(args.batch, args.size, args.device)
    times = []
    for step in range(args.warmup + args.steps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with EventStorage(step):
            losses = model(batch)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    focal = time_steps("RetinaNet", args)
    alrp = time_steps("ALRPRetinaNet", args)
    print(f"device: {name}; batch {args.batch}, {args.size} px, median of {args.steps} steps")
    print("| model | focal step (s) | aLRP step (s) | aLRP / focal |")
    print("|---|---|---|---|")
    print(f"| RetinaNet R50-FPN | {focal:.4f} | {alrp:.4f} | {alrp / focal:.3f}x |")


if __name__ == "__main__":
    main()
