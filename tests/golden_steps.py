"""One training step of every config under configs/, recorded: the losses and a fingerprint
of every parameter's gradient, so that a refactor of the losses or heads can prove it keeps
the numbers (tests/test_golden_steps.py).

    python tests/golden_steps.py      # (re)records tests/golden/training_step.json
    python tests/golden_steps.py --state-dict-keys   # tests/golden/state_dict_keys.json
    ... --missing                     # only the configs not recorded yet (a new config)
    ... --only rs_                    # only the configs whose name contains "rs_"

Each config is built with tests/runs.py's ``tiny_cfg`` (random weights, 3 classes, BN
backbone, a ResNet-50/101 at a quarter of its channels), seeded, and trained one step on
``batch()`` (two 96 x 96 images) in float64 and, for the configs whose losses are this
project's, in float32 too. A gradient is kept as its sum, its L2 norm and its dot product
with a fixed random tensor.
"""

import contextlib
import glob
import json
import os
import sys

import torch
from runs import ROOT

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden", "training_step.json")
# The keys and shapes of every config's state_dict: what a checkpoint must hold to load.
STATE_KEYS = os.path.join(HERE, "golden", "state_dict_keys.json")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
DTYPES = {"float64": torch.float64, "float32": torch.float32}
# torch's threads when recorded: one, so that the tests' workers (pytest -n, one per core)
# each run a step on its own core.
RECORDED_THREADS = 1


def machine() -> str:
    """What the numbers depend on beyond the code: torch's version and the CPU's vector
    instructions (oneDNN and torch pick kernels by them; a float32 IoU one ulp apart
    changes a Rank & Sort label, and float64 losses by 1e-9)."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
    return f"torch {torch.__version__}; {' '.join(isa) or 'no avx'}"


def config_name(path):
    return os.path.relpath(path, os.path.join(ROOT, "configs"))


@contextlib.contextmanager
def _nms_of_any_dtype():
    """Detectron2's ``batched_nms`` casts the boxes to float32 but not the scores, which
    torchvision refuses in float64: the RPN's proposals are chosen in float32 here."""
    from detectron2.modeling.proposal_generator import proposal_utils

    original = proposal_utils.batched_nms

    def batched_nms(boxes, scores, idxs, iou_threshold):
        return original(boxes.float(), scores.float(), idxs, iou_threshold)

    proposal_utils.batched_nms = batched_nms
    try:
        yield
    finally:
        proposal_utils.batched_nms = original


def training_step(path, dtype):
    """``{"losses": {name: value}, "grads": {param: [sum, norm, projection]}}`` of one step."""
    sys.path.insert(0, HERE)
    # The recording's threads: float32 reductions (convolutions' backward) change with the
    # number of threads by more than float32's 1e-5.
    threads = torch.get_num_threads()
    torch.set_num_threads(RECORDED_THREADS)
    try:
        # TorchScript functions (fvcore's sigmoid_focal_loss_jit in Detectron2's RetinaNet)
        # run another, optimised graph once warmed up by earlier calls in the process: a
        # float64 gradient then moved by 1e-9 of itself depending on what ran before. Never
        # optimised here, a step is the same whatever the process did first.
        with torch.jit.optimized_execution(False):
            return _training_step(path, dtype)
    finally:
        torch.set_num_threads(threads)


def _training_step(path, dtype):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from runs import batch, tiny_cfg

    torch.manual_seed(0)
    model = build_model(tiny_cfg(path)).to(dtype)
    model.train()
    inputs = batch()
    for x in inputs:
        x["image"] = x["image"].to(dtype)
        x["instances"].gt_boxes.tensor = x["instances"].gt_boxes.tensor.to(dtype)
    torch.manual_seed(1)  # draws inside the step (mask subsampling)
    with EventStorage(), _nms_of_any_dtype():
        losses = model(inputs)
    sum(losses.values()).backward()
    grads = {}
    for index, (name, param) in enumerate(model.named_parameters()):
        if param.grad is None:
            continue
        g = param.grad.double()
        probe = torch.randn(
            g.shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64
        )
        grads[name] = [g.sum().item(), g.norm().item(), (g * probe).sum().item()]
    return {"losses": {k: v.item() for k, v in losses.items()}, "grads": grads}


def state_dict_keys(path):
    """``{key: shape}`` of the state_dict of the model ``path`` builds (tiny_cfg)."""
    sys.path.insert(0, HERE)
    from detectron2.modeling import build_model
    from runs import tiny_cfg

    cfg = tiny_cfg(path, narrow=False)  # the config's own widths
    # On the meta device: the shapes without initialising the weights (22 s of the 42
    # configs on the CPU, 6 s so).
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def record_state_dict_keys(missing_only: bool = False):
    keys = {}
    if missing_only and os.path.exists(STATE_KEYS):
        with open(STATE_KEYS) as f:
            keys = json.load(f)
    for path in CONFIGS:
        if config_name(path) not in keys:
            keys[config_name(path)] = state_dict_keys(path)
    with open(STATE_KEYS, "w") as f:
        json.dump(keys, f, indent=0, sort_keys=True)


def record(missing_only: bool = False, only: str = ""):
    golden = {}
    if (missing_only or only) and os.path.exists(GOLDEN):
        with open(GOLDEN) as f:
            golden = json.load(f)["configs"]
    for path in CONFIGS:
        name = config_name(path)
        if (missing_only and name in golden) or only not in name:
            continue
        golden[name] = {"machine": machine(), "float64": training_step(path, torch.float64)}
        if any(
            k.startswith(
                ("loss_alrp", "loss_rs", "loss_ap", "loss_rpn_alrp", "loss_rpn_rs", "loss_roi_rs")
            )
            for k in golden[name]["float64"]["losses"]
        ):
            golden[name]["float32"] = training_step(path, torch.float32)
        print(name, golden[name]["float64"]["losses"], flush=True)
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
        json.dump({"configs": golden}, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    missing = "--missing" in args
    if "--state-dict-keys" in args:
        record_state_dict_keys(missing)
    else:
        record(missing, args[args.index("--only") + 1] if "--only" in args else "")
