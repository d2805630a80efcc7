"""Detectron2's solver and data keys as the Lightning engine reads them: the config scaled
to the processes at hand (``SOLVER.REFERENCE_WORLD_SIZE``), gradient clipping with
Detectron2's meaning, and the keys the engine does not honour refused by name."""

import glob
import os

import pytest
import pytorch_lightning as pl
import torch
from runs import ROOT, TINY, lightning_trainer, train_net

pytestmark = pytest.mark.detectron2

ALRP_500 = os.path.join(ROOT, "configs", "COCO-Detection", "alrp_retinanet_R_50_FPN_500_giou.yaml")


def config(path=TINY, *overrides):
    from alrp_d2.cli import load_config

    return load_config(path, [str(o) for o in overrides])


# -- SOLVER.REFERENCE_WORLD_SIZE ----------------------------------------------------------


@pytest.mark.parametrize("world", [1, 4, 8])
def test_an_authors_config_keeps_its_images_per_process_on_any_number_of_processes(world):
    from alrp_d2.engine.world_size import scale_to_world_size

    cfg = config(os.path.join(ROOT, "configs", "COCO-Detection", "rs_atss_R_50_FPN_1x.yaml"))
    scaled = scale_to_world_size(cfg, world)
    assert scaled.SOLVER.IMS_PER_BATCH // world == 4  # the authors' images per GPU
    assert scaled.SOLVER.IMS_PER_BATCH == 4 * world
    assert scaled.SOLVER.BASE_LR == pytest.approx(0.008 * world / 4)
    assert scaled.SOLVER.WARMUP_ITERS == round(500 * 4 / world)
    assert scaled.SOLVER.CHECKPOINT_ITERS == round(1000 * 4 / world)
    # Epochs are epochs on any number of processes.
    for key in ("MAX_EPOCHS", "STEPS_EPOCHS", "CHECKPOINT_PERIOD"):
        assert scaled.SOLVER[key] == cfg.SOLVER[key]
    assert scaled.TEST.EVAL_PERIOD == cfg.TEST.EVAL_PERIOD
    assert scaled.SOLVER.REFERENCE_WORLD_SIZE == world
    assert scale_to_world_size(scaled, world) is scaled  # scaling again changes nothing
    assert cfg.SOLVER.IMS_PER_BATCH == 16  # a copy was scaled


def test_no_reference_world_size_changes_nothing_and_a_bad_one_is_named():
    from alrp_d2.engine.world_size import scale_to_world_size

    cfg = config(TINY, "SOLVER.REFERENCE_WORLD_SIZE", 0)
    assert scale_to_world_size(cfg, 8) is cfg
    with pytest.raises(ValueError, match=r"IMS_PER_BATCH \(8\) must be divisible by"):
        scale_to_world_size(config(TINY, "SOLVER.REFERENCE_WORLD_SIZE", 3), 2)


def test_every_authors_coco_config_is_made_for_4_processes():
    """The aLRP and Rank & Sort authors trained every COCO model on 4 GPUs; Detectron2's
    FCOS recipe is not theirs."""
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "COCO-Detection", "*.yaml"))):
        cfg = config(path)
        expected = 0 if "fcos" in os.path.basename(path) else 4
        assert cfg.SOLVER.REFERENCE_WORLD_SIZE == expected, path


def test_a_training_prints_and_saves_the_scaled_config(trained_run):
    """The shared tiny training asks for 16 images on 2 processes and runs 1: 8 images at
    half the learning rate and twice the warm-up (tests/runs.py ``TRAINING``)."""
    saved = config(str(trained_run.out / "config.yaml"))
    assert saved.SOLVER.IMS_PER_BATCH == 8
    assert saved.SOLVER.BASE_LR == pytest.approx(0.002)
    assert saved.SOLVER.WARMUP_ITERS == 8
    assert saved.SOLVER.REFERENCE_WORLD_SIZE == 1
    log = (trained_run.out / "log.txt").read_text()
    assert "SOLVER.REFERENCE_WORLD_SIZE 2, trained by 1 processes: 8 images per process" in log
    assert "SOLVER.IMS_PER_BATCH 16 -> 8, BASE_LR 0.004 -> 0.002, WARMUP_ITERS 4 -> 8" in log


# -- SOLVER.CLIP_GRADIENTS -------------------------------------------------------------------


def clip_config(kind, value=1.0, norm=2.0):
    from detectron2.config import CfgNode

    return CfgNode(dict(ENABLED=True, CLIP_TYPE=kind, CLIP_VALUE=value, NORM_TYPE=norm))


def parameters_with_gradients():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([-12.0])  # norms 5 and 12; 13
    return a, b


def test_norm_clips_each_parameter_as_detectron2_full_model_clips_them_together():
    from alrp_d2.engine.module import clip_gradients

    a, b = parameters_with_gradients()
    clip_gradients([a, b], clip_config("norm"))
    assert torch.linalg.vector_norm(a.grad) == pytest.approx(1.0, rel=1e-5)
    assert torch.linalg.vector_norm(b.grad) == pytest.approx(1.0, rel=1e-5)
    a, b = parameters_with_gradients()
    clip_gradients([a, b], clip_config("full_model", value=2.6))
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.8]), atol=1e-5)  # all scaled by 1/5
    assert torch.allclose(b.grad, torch.tensor([-2.4]), atol=1e-5)
    a, b = parameters_with_gradients()
    clip_gradients([a, b], clip_config("value", value=3.5))
    assert a.grad.tolist() == [3.0, 3.5] and b.grad.tolist() == [-3.5]
    a, b = parameters_with_gradients()
    clip_gradients([a, b], clip_config("norm", value=1.0, norm=float("inf")))
    assert a.grad.abs().max() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="CLIP_TYPE must be one of value, norm, full_model"):
        clip_gradients([a], clip_config("global"))


class _OneParameter(pl.LightningModule):
    """A loss of 100 x w: its gradient is 100; with norm clipping at 1 one SGD step of rate
    1 moves w by 1, unclipped by 100."""

    def __init__(self, clip):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.clip = clip

    def training_step(self, batch, batch_idx):
        return 100 * self.w.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, **kwargs):
        from alrp_d2.engine.module import DetectionModule

        DetectionModule.configure_gradient_clipping(self, optimizer, gradient_clip_val, **kwargs)


def test_lightning_clips_through_the_module_before_the_step(tmp_path):
    """The installed Lightning calls ``configure_gradient_clipping`` after the backward
    pass and before the optimizer's step, without ``gradient_clip_val``."""
    cfg = config(TINY, "SOLVER.CLIP_GRADIENTS.ENABLED", True)
    module = _OneParameter(cfg)
    module.cfg = cfg  # what DetectionModule's hook reads
    trainer = lightning_trainer(tmp_path, max_steps=1)
    trainer.fit(module, torch.utils.data.DataLoader([0]))
    assert module.w.item() == pytest.approx(-1.0)  # clipped to CLIP_VALUE 1 (value), not -100


# -- keys the engine does not honour ---------------------------------------------------------


def project_configs():
    paths = glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
    return sorted(paths + glob.glob(os.path.join(ROOT, "tests", "configs", "*.yaml")))


@pytest.mark.parametrize("path", project_configs(), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_project_config_sets_an_unhonoured_key(path):
    from alrp_d2.engine.unhonoured_keys import unhonoured_keys

    if os.path.basename(path).startswith("Base-"):
        pytest.skip("a base config is checked through the configs that inherit it")
    assert unhonoured_keys(config(path)) == []


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["TEST.AUG.ENABLED", True], "TEST.AUG.ENABLED (True): test-time augmentation"),
        (["TEST.AUG.FLIP", False], "TEST.AUG.FLIP (False)"),
        (["TEST.PRECISE_BN.ENABLED", True], "TEST.PRECISE_BN.ENABLED (True): precise"),
        (["TEST.EXPECTED_RESULTS", "[['bbox','AP',40,1]]"], "TEST.EXPECTED_RESULTS"),
        (["DATASETS.PROPOSAL_FILES_TRAIN", "('p.pkl',)"], "DATASETS.PROPOSAL_FILES_TRAIN"),
        (["SOLVER.STEPS", "(10,)"], "SOLVER.STEPS ((10,)): training counts epochs"),
        (["SOLVER.MAX_ITER", 90000], "SOLVER.MAX_ITER (90000): training counts epochs"),
        (["INPUT.MIN_SIZE_TRAIN", "(600,)"], "INPUT.MIN_SIZE_TRAIN ((600,)): INPUT.ALRP_AUG"),
        (["INPUT.CROP.ENABLED", True], "INPUT.CROP.ENABLED (True): INPUT.ALRP_AUG"),
        (
            ["DATALOADER.SAMPLER_TRAIN", "RandomSubsetTrainingSampler"],
            "DATALOADER.SAMPLER_TRAIN ('RandomSubsetTrainingSampler'): this engine implements",
        ),
    ],
)
def test_an_unhonoured_key_is_named(overrides, named):
    from alrp_d2.engine.unhonoured_keys import unhonoured_keys

    # A config with the paper's augmentation, which sets no Detectron2 training resize.
    found = unhonoured_keys(config(ALRP_500, *overrides))
    assert len(found) == 1 and found[0].startswith(named), found


def test_keys_honoured_in_one_setting_are_refused_only_in_the_other():
    from alrp_d2.engine.unhonoured_keys import unhonoured_keys

    # Detectron2's training resize works without the paper's augmentation ...
    cfg = config(ALRP_500, "INPUT.ALRP_AUG.ENABLED", False, "INPUT.CROP.ENABLED", True)
    assert unhonoured_keys(cfg) == []
    # ... and an iteration schedule is Detectron2's when no epochs are set (--eval-only).
    assert unhonoured_keys(config(TINY, "SOLVER.MAX_EPOCHS", 0, "SOLVER.STEPS", "(5,)")) == []
    cfg = config(ALRP_500, "INPUT.ALRP_AUG.ENABLED", False, "INPUT.MIN_SIZE_TRAIN", "(600,)")
    assert unhonoured_keys(cfg) == []
    assert unhonoured_keys(config(ALRP_500, "INPUT.MIN_SIZE_TRAIN", "(600,)")) != []


@pytest.mark.slow
def test_a_training_with_an_unhonoured_key_exits_2_naming_it(tmp_path):
    out = tmp_path / "out"
    done = train_net(
        "--config-file", TINY, "--accelerator", "cpu", "TEST.AUG.ENABLED", True,
        "OUTPUT_DIR", out, env_root=tmp_path / "data", timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "does not honour" in done.stderr and "TEST.AUG.ENABLED (True)" in done.stderr
    assert not out.exists()  # stopped before writing anything
