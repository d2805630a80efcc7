"""MODEL.ALRP.RANKING_SCOPE "global": a 2-process training step equals one process
holding the whole batch.

A tiny ALRPRetinaNet without batch statistics (frozen batch norm in the backbone, no
normalisation in the head), in float64: 2 gloo processes with 2 images each, their
gradients averaged as DDP averages them, against one process ranking all 4 images.
The same for RankSortRetinaNet's ranking and sorting terms (its box loss is each
process's own weighted mean in both scopes, so it is left out of the comparison).
"""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from runs import TINY

# Slow: trainings of two processes (the fast lane, -m "not slow", leaves them out).
pytestmark = [pytest.mark.detectron2, pytest.mark.slow]

WORLD = 2
RTOL = 1e-9


# meta-architecture: (losses compared, the scalar that counts the images ranked together)
ARCHITECTURES = {
    "ALRPRetinaNet": (("loss_alrp_cls", "loss_alrp_loc"), "alrp/ranked_images"),
    "RankSortRetinaNet": (("loss_rs_rank", "loss_rs_sort"), "rs/ranked_images"),
}


def build(scope, architecture="ALRPRetinaNet"):
    from detectron2.modeling import build_model

    from alrp_d2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(TINY)
    cfg.MODEL.META_ARCHITECTURE = architecture
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.ALRP.RANKING_SCOPE = scope
    torch.manual_seed(0)
    return build_model(cfg).double().train()


def images(count=4, size=128):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(5)
    batch = []
    for i in range(count):
        n = 1 + i % 3
        xy = torch.rand(n, 2, generator=g) * 80
        wh = 16 + torch.rand(n, 2, generator=g) * 40
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(torch.cat([xy, (xy + wh).clamp(max=size)], 1))
        instances.gt_classes = torch.randint(0, 4, (n,), generator=g)
        image = (torch.rand(3, size, size, generator=g) * 255).to(torch.uint8)
        batch.append({"image": image, "instances": instances, "height": size, "width": size})
    return batch


def step(model, batch, architecture):
    from detectron2.utils.events import EventStorage

    compared, ranked_key = ARCHITECTURES[architecture]
    with EventStorage(0) as storage:
        losses = {k: v for k, v in model(batch).items() if k in compared}
        sum(losses.values()).backward()
        ranked = storage.latest()[ranked_key][0]
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {k: float(v) for k, v in losses.items()}, grads, ranked


def worker(rank, init_file, out_dir):
    # Forked from the tests' process: one thread, never its OpenMP pool (not fork-safe).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    batch = images()
    results = {}
    for architecture in ARCHITECTURES:
        losses, grads, ranked = step(
            build("global", architecture), batch[2 * rank : 2 * rank + 2], architecture
        )
        for grad in grads.values():  # what DDP applies: the mean over the processes
            dist.all_reduce(grad)
            grad /= WORLD
        # group None: no collective
        ref_losses, ref_grads, _ = step(build("process", architecture), batch, architecture)
        worst = max(
            float((grads[k] - ref_grads[k]).abs().max())
            / max(float(ref_grads[k].abs().max()), 1e-300)
            for k in ref_grads
        )
        results[architecture] = {
            "losses": losses,
            "ref_losses": ref_losses,
            "grad": worst,
            "ranked": ranked,
            "same_params": sorted(grads) == sorted(ref_grads),
        }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("global_scope")
    mp.start_processes(
        worker, args=(str(out / "init"), str(out)), nprocs=WORLD, start_method="fork"
    )
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("rank", range(WORLD))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_global_scope_step_equals_one_process_with_the_whole_batch(results, rank, architecture):
    result = results[rank][architecture]
    assert len(result["losses"]) == 2
    assert result["same_params"]
    for name, value in result["ref_losses"].items():
        assert result["losses"][name] == pytest.approx(value, rel=RTOL, abs=1e-12), name
    assert result["grad"] <= RTOL
    assert result["ranked"] == 4  # logged: the images ranked together


def test_unknown_scope_is_refused():
    with pytest.raises(ValueError, match=r"RANKING_SCOPE\) must be one of"):
        build("node")
