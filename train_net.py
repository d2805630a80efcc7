#!/usr/bin/env python
"""Train or evaluate a Detectron2 detector with PyTorch Lightning.

    python train_net.py --config-file configs/quickstart/alrp_retinanet_synthetic.yaml
    python train_net.py --config-file CONFIG --num-gpus 8                 # one node, DDP
    python train_net.py --config-file CONFIG --accelerator cpu --devices 2  # 2 CPU processes
    python train_net.py --config-file CONFIG --resume                     # OUTPUT_DIR/last.ckpt
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS OUTPUT_DIR/model_final.pth

Detectron2's flags (--num-machines, --machine-rank, --dist-url) and trailing
``KEY VALUE`` overrides work as in Detectron2's tools/train_net.py.
"""

import sys

from alrp_d2.engine.launch import main

if __name__ == "__main__":
    sys.exit(main())
