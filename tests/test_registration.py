"""Importing alrp_d2.config registers every model of the project (in a new process, which
has imported neither Detectron2 nor the project: tests/warm_start.py)."""

import os

import pytest
import warm_start
from runs import ROOT

# Slow: a new process (the fast lane, -m "not slow", leaves them out).
pytestmark = [pytest.mark.detectron2, pytest.mark.slow]

CODE = """
from alrp_d2.config import get_cfg
from detectron2.modeling import (BACKBONE_REGISTRY, META_ARCH_REGISTRY, PROPOSAL_GENERATOR_REGISTRY,
                                 ROI_HEADS_REGISTRY, build_model)
for registry, name in [(META_ARCH_REGISTRY, "ALRPRetinaNet"),
                       (META_ARCH_REGISTRY, "APLossRetinaNet"),
                       (PROPOSAL_GENERATOR_REGISTRY, "ALRPRPN"),
                       (PROPOSAL_GENERATOR_REGISTRY, "MaxIoURPN"),
                       (ROI_HEADS_REGISTRY, "ALRPROIHeads"),
                       (BACKBONE_REGISTRY, "build_alrp_retinanet_resnet_fpn_backbone")]:
    assert name in registry, name
cfg = get_cfg()
cfg.merge_from_file("configs/quickstart/alrp_retinanet_synthetic.yaml")
print(type(build_model(cfg)).__name__)
"""


def test_importing_the_config_registers_the_models(tmp_path):
    (tmp_path / "registers.py").write_text(CODE)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = warm_start.run([tmp_path / "registers.py"], cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ALRPRetinaNet"
