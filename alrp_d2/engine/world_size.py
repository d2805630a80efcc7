"""A config made for one number of processes, trained on another
(``SOLVER.REFERENCE_WORLD_SIZE``, as Detectron2's ``DefaultTrainer.auto_scale_workers``).

Detectron2's meaning: the images per process (``IMS_PER_BATCH / REFERENCE_WORLD_SIZE``)
are kept, so the total batch and the learning rate grow linearly with the number of
processes, and what counts iterations shrinks in proportion. Here the schedule counts
epochs (``MAX_EPOCHS``, ``STEPS_EPOCHS``, ``EVAL_PERIOD``, ``CHECKPOINT_PERIOD``), which
a larger batch runs in fewer iterations by itself; what still counts iterations is
scaled: ``WARMUP_ITERS`` and ``CHECKPOINT_ITERS``. Detectron2's own function would also
scale ``EVAL_PERIOD`` and ``CHECKPOINT_PERIOD``, which are epochs here, so it is not used.

For the ranking losses this is what keeps a config's meaning: they rank the anchors of
each process's images together, so the images per process are part of the loss.
"""

from __future__ import annotations

import logging

__all__ = ["scale_to_world_size"]

logger = logging.getLogger("alrp_d2")


def scale_to_world_size(cfg, world_size: int):
    """``cfg`` for ``world_size`` processes: itself when ``SOLVER.REFERENCE_WORLD_SIZE`` is
    0 or ``world_size``, else a copy with the batch, learning rate, warm-up and
    ``CHECKPOINT_ITERS`` scaled by ``world_size / REFERENCE_WORLD_SIZE`` and
    ``REFERENCE_WORLD_SIZE`` set to ``world_size`` (so that scaling again changes nothing).
    Raises ``ValueError`` naming the keys when the batch does not divide into the
    reference's processes."""
    reference = cfg.SOLVER.REFERENCE_WORLD_SIZE
    if reference < 0:
        raise ValueError(f"SOLVER.REFERENCE_WORLD_SIZE must be 0 or more, got {reference}")
    if reference == 0 or reference == world_size:
        return cfg
    solver = cfg.SOLVER
    if solver.IMS_PER_BATCH % reference:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({solver.IMS_PER_BATCH}) must be divisible by"
            f" SOLVER.REFERENCE_WORLD_SIZE ({reference}): the images per process"
        )
    scale = world_size / reference
    cfg = cfg.clone()
    frozen = cfg.is_frozen()
    cfg.defrost()
    solver = cfg.SOLVER
    before = (solver.IMS_PER_BATCH, solver.BASE_LR, solver.WARMUP_ITERS)
    solver.IMS_PER_BATCH = solver.IMS_PER_BATCH // reference * world_size
    solver.BASE_LR = solver.BASE_LR * scale
    solver.WARMUP_ITERS = int(round(solver.WARMUP_ITERS / scale))
    solver.CHECKPOINT_ITERS = int(round(solver.CHECKPOINT_ITERS / scale))
    solver.REFERENCE_WORLD_SIZE = world_size
    logger.info(
        "SOLVER.REFERENCE_WORLD_SIZE %d, trained by %d processes: %d images per process;"
        " SOLVER.IMS_PER_BATCH %d -> %d, BASE_LR %g -> %g, WARMUP_ITERS %d -> %d,"
        " CHECKPOINT_ITERS -> %d",
        reference,
        world_size,
        solver.IMS_PER_BATCH // world_size,
        before[0],
        solver.IMS_PER_BATCH,
        before[1],
        solver.BASE_LR,
        before[2],
        solver.WARMUP_ITERS,
        solver.CHECKPOINT_ITERS,
    )
    if frozen:
        cfg.freeze()
    return cfg
