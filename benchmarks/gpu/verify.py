"""Everything the GPU must show, in one run: the CUDA tests, the loss and training-step
benchmarks and the quickstart, into a Markdown report and its raw JSON.

    bash benchmarks/gpu/run.sh                 # device: installs, builds, then runs this
    bash benchmarks/gpu/run.sh --cpu-dry-run   # CI: this, tiny sizes, on the CPU
    python benchmarks/gpu/verify.py --out DIR [--cpu-dry-run] [--deadline EPOCH_SECONDS]

Writes ``DIR/report.md`` and ``DIR/report.json`` after every section, so that a run stopped
by its time limit still leaves what it measured; ``DIR/quickstart.log`` holds the end of
the quickstart's output. Every figure is measured by this run; the targets are compared and
printed PASS or FAIL. Exit status 1 when a section raised an error (a target missed is a
finding, not an error), 0 otherwise.

Sections, in order of what a short lease should get first:

1. environment: torch, the device, Detectron2 and proof that ``detectron2._C`` holds its
   CUDA ops (deformable convolution run on CUDA, equal to the CPU's);
2. loss_equality: aLRP, AP, NDCG and Rank & Sort Loss equal on the device and on the CPU
   for float32, bfloat16 and float16 logits (value and gradient);
3. loss_sync: none of them synchronises host and device with ``validate=False``
   (``torch.cuda.set_sync_debug_mode("error")``), and how many it does (``"warn"``);
4. training_steps: one training step of every detector family under ``configs/`` (one
   config per meta-architecture, head loss, assigner and deformable convolution) with AMP
   off, float16 AMP (the engine's ``16-mixed`` on GPU) and bfloat16 AMP;
5. loss_benchmark: forward plus backward of aLRP, AP and Rank & Sort Loss against
   torchvision's and fvcore's sigmoid focal loss (CUDA events after warm-up), peak memory;
6. train_benchmark: training steps of RetinaNet R50-FPN trained by aLRP (ATSS) against
   Detectron2's RetinaNet (focal loss) from the same config, float32 and bfloat16 AMP, and
   RS-ATSS against Detectron2's RetinaNet at 1333x800; the host-device synchronisations of
   a step of each, and where they come from;
7. quickstart: ``train_net.py`` on the quickstart config: wall time, AP50, oLRP.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import nullcontext

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BENCHMARKS = os.path.dirname(HERE)
for path in (ROOT, BENCHMARKS):
    if path not in sys.path:
        sys.path.insert(0, path)

MiB = 1024**2

# The sizes of a GPU run and of the CPU dry run (which only proves that the code runs).
SIZES = {
    "gpu": {
        "equality": (200_000, 300),  # (M, P)
        "loss_bench": [
            (1000, 1_000_000),
            (1000, 7_000_000),
            (1000, 30_000_000),
            (10_000, 30_000_000),
        ],
        "loss_warmup": 3,
        "loss_repeats": 20,
        "step_image": 128,
        "step_precisions": ("fp32", "fp16", "bf16"),
        "step_families": "all",
        "bench_pairs": [
            # (name, config, images, (height, width), precisions)
            (
                "aLRP ATSS vs focal, R50-FPN, 512x512, 8 images",
                "configs/COCO-Detection/alrp_atss_R_50_FPN_500.yaml",
                8,
                (512, 512),
                ("fp32", "bf16"),
            ),
            (
                "RS-ATSS vs RetinaNet, R50-FPN, 1333x800, 4 images",
                "configs/COCO-Detection/rs_atss_R_50_FPN_1x.yaml",
                4,
                (800, 1333),
                ("fp32",),
            ),
        ],
        "bench_warmup": 3,
        "bench_steps": 20,
        "model_overrides": [],
        "quickstart_overrides": [],
    },
    "cpu-dry-run": {
        "equality": (5_000, 40),
        "loss_bench": [(50, 10_000), (50, 20_000)],
        "loss_warmup": 1,
        "loss_repeats": 2,
        # The first and the last family (ATSS aLRP RetinaNet, RS Mask R-CNN); AMP (slow on a
        # CPU) runs in the train benchmark's bf16 pair.
        "step_image": 64,
        "step_precisions": ("fp32",),
        "step_families": "first and last",
        "bench_pairs": [
            (
                "aLRP ATSS vs focal, R18-FPN, 64x64, 1 image (dry run)",
                "configs/COCO-Detection/alrp_atss_R_50_FPN_500.yaml",
                1,
                (64, 64),
                ("fp32", "bf16"),
            ),
            (
                "RS-ATSS vs RetinaNet, R18-FPN, 64x96, 1 image (dry run)",
                "configs/COCO-Detection/rs_atss_R_50_FPN_1x.yaml",
                1,
                (64, 96),
                ("fp32",),
            ),
        ],
        "bench_warmup": 0,
        "bench_steps": 1,
        # A ResNet-18 FPN of 64 channels: the configs' heads and losses, a CPU's step time.
        "model_overrides": [
            "MODEL.RESNETS.DEPTH",
            "18",
            "MODEL.RESNETS.RES2_OUT_CHANNELS",
            "64",
            "MODEL.FPN.OUT_CHANNELS",
            "64",
        ],
        # The tiny splits (32 training images), one epoch; a barely trained model scores
        # every anchor about 0.01: threshold 0 keeps detections to evaluate.
        "quickstart_overrides": [
            "DATASETS.TRAIN",
            '("alrp_synthetic_tiny_train",)',
            "DATASETS.TEST",
            '("alrp_synthetic_tiny_val",)',
            "SOLVER.IMS_PER_BATCH",
            "8",
            "SOLVER.MAX_EPOCHS",
            "1",
            "SOLVER.STEPS_EPOCHS",
            "()",
            "SOLVER.WARMUP_ITERS",
            "2",
            "DATALOADER.NUM_WORKERS",
            "0",
            "MODEL.RETINANET.SCORE_THRESH_TEST",
            "0.0",
            "TEST.DETECTIONS_PER_IMAGE",
            "20",
        ],
    },
}
QUICKSTART = "configs/quickstart/alrp_retinanet_synthetic.yaml"

# Targets (issue 20): loss at most 1.0x focal at P=1000, M=7e6 (moonshot 0.5x); training
# step at most 1.05x focal; no host-device synchronisation added by the ranking losses.
LOSS_TARGET_SIZE = (1000, 7_000_000)
LOSS_TARGET, LOSS_MOONSHOT, STEP_TARGET = 1.0, 0.5, 1.05
# Equality of device and CPU: the largest difference of the loss values (relative) and of
# the gradients (relative to the largest gradient), per logits dtype.
EQUALITY_TOLERANCE = {"float32": (1e-5, 1e-4), "bfloat16": (1e-4, 2e-2), "float16": (1e-4, 1e-2)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AMP_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------
# The report: written whole after every section.


class Report:
    def __init__(self, out_dir: str, mode: str, deadline: float):
        self.out_dir, self.mode, self.deadline = out_dir, mode, deadline
        self.started = time.time()
        self.data = {
            "mode": mode,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "sections": {},
            "targets": [],
        }
        self.markdown = {}  # section name -> list of lines

    def left(self) -> float:
        return self.deadline - time.time()

    def section(self, name, status, data, lines, seconds):
        self.data["sections"][name] = {"status": status, "seconds": round(seconds, 2), **data}
        self.markdown[name] = lines
        self.save()

    def target(self, name, measured, limit, passed, note=""):
        self.data["targets"].append(
            {
                "target": name,
                "measured": measured,
                "limit": limit,
                "pass": bool(passed),
                "note": note,
            }
        )

    def save(self):
        self.data["wall_seconds"] = round(time.time() - self.started, 1)
        _atomic_write(
            os.path.join(self.out_dir, "report.json"), json.dumps(self.data, indent=1, default=str)
        )
        _atomic_write(os.path.join(self.out_dir, "report.md"), self.render())

    def render(self) -> str:
        d = self.data
        title = "GPU verification" if self.mode == "gpu" else "GPU verification: CPU DRY RUN"
        out = [f"# {title}", ""]
        if self.mode != "gpu":
            out += [
                "**CPU dry run** (`run.sh --cpu-dry-run`): tiny sizes on the CPU, no build, "
                "no CUDA tests. It proves that the script runs; its figures are **not** GPU "
                "results and its PASS/FAIL say nothing about the targets.",
                "",
            ]
        out += [
            f"Started {d['started']}; {d['wall_seconds']} s so far "
            f"(verify.py; the install and build are timed in `build`).",
            "",
        ]
        if d["targets"]:
            out += ["## Targets", "", "| target | measured | limit | result |", "|---|---|---|---|"]
            for t in d["targets"]:
                result = "PASS" if t["pass"] else "**FAIL**"
                note = f" ({t['note']})" if t["note"] else ""
                out.append(
                    f"| {t['target']} | {_fmt(t['measured'])} | {t['limit']} | {result}{note} |"
                )
            out.append("")
        for name, lines in self.markdown.items():
            sec = d["sections"][name]
            out += [f"## {name}: {sec['status']} ({sec['seconds']} s)", ""] + lines + [""]
        return "\n".join(out)


def _atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def run_section(report, name, fn, need_seconds, *args):
    """Runs ``fn(report, *args) -> (data, lines, status)``; records an error or a skip for
    want of time instead of raising. Returns False when the section raised."""
    if report.left() < need_seconds:
        report.section(
            name,
            "skipped",
            {"reason": f"{report.left():.0f} s left, needs ~{need_seconds} s"},
            [
                f"Skipped: {report.left():.0f} s left of the budget, the section needs "
                f"about {need_seconds} s."
            ],
            0.0,
        )
        return True
    print(f"== {name} ({report.left():.0f} s left)", flush=True)
    start = time.time()
    try:
        data, lines, status = fn(report, *args)
    except Exception as err:
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        report.section(
            name,
            "error",
            {"error": repr(err), "traceback": tb[-4000:]},
            ["Error:", "", "```", tb[-3000:].rstrip(), "```"],
            time.time() - start,
        )
        return False
    report.section(name, status, data, lines, time.time() - start)
    print(f"   {name}: {status} in {time.time() - start:.1f} s", flush=True)
    return True


# --------------------------------------------------------------------------------------
# Timing, memory and synchronisations.


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, warmup, repeats):
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup``: CUDA events on a
    GPU (each call between two events, no synchronisation between calls), the wall clock
    on a CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        wall = time.perf_counter()
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        wall = (time.perf_counter() - wall) / repeats
        return statistics.median(s.elapsed_time(e) / 1000 for s, e in events), wall
    times = []
    wall = time.perf_counter()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), (time.perf_counter() - wall) / repeats


def peak_memory(fn, device):
    """Peak memory (MiB) a call of ``fn`` allocates above what was allocated before it
    (CUDA only; None on the CPU)."""
    if device.type != "cuda":
        fn()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MiB


class SyncCounter:
    """Host-device synchronisations inside the block (``torch.cuda.set_sync_debug_mode``
    ``"warn"``), each attributed to the innermost frame of this project (``alrp_d2/...``)
    or else of Detectron2 (``detectron2/...``), else ``other`` (torch internals, or the
    autograd engine replaying a backward's warnings at ``backward()``). ``count`` is None
    off CUDA, where there is nothing to count."""

    def __init__(self, device):
        self.active = device.type == "cuda"
        self.device = device
        self.where = []

    def __enter__(self):
        if not self.active:
            return self
        synchronize(self.device)
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        self._previous = warnings.showwarning
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return self._previous(message, category, filename, lineno, file, line)
        self.where.append(attribute(traceback.extract_stack()[:-1]))

    def __exit__(self, *exc):
        if self.active:
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(*exc)
        return False

    @property
    def count(self):
        return len(self.where) if self.active else None

    def by_place(self):
        places = {}
        for w in self.where:
            places[w] = places.get(w, 0) + 1
        return dict(sorted(places.items(), key=lambda kv: -kv[1]))


def attribute(stack) -> str:
    """``alrp_d2/...:line`` or ``detectron2/...:line`` of the innermost such frame."""
    for prefix, marker in (
        (os.path.join(ROOT, "alrp_d2") + os.sep, "alrp_d2/"),
        (os.sep + "detectron2" + os.sep, "detectron2/"),
    ):
        for frame in reversed(stack):
            name = frame.filename
            if marker == "alrp_d2/" and name.startswith(prefix):
                return f"alrp_d2/{os.path.relpath(name, prefix)}:{frame.lineno}"
            if marker == "detectron2/" and prefix in name and not name.startswith(ROOT + os.sep):
                return f"detectron2/{name.rsplit(prefix, 1)[1]}:{frame.lineno}"
    return "other"


def in_ranking_losses(place: str) -> bool:
    return place.startswith("alrp_d2/losses/")


# --------------------------------------------------------------------------------------
# 1. environment


def section_environment(report, device, build):
    data = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "build": build,
    }
    lines = []
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        data.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            device_memory_gib=round(props.total_memory / 1024**3, 1),
            multiprocessors=props.multi_processor_count,
        )
    else:
        data["device_name"] = f"CPU ({platform.processor() or platform.machine()})"
    import detectron2
    from detectron2 import _C

    data["detectron2"] = {
        "version": detectron2.__version__,
        "path": os.path.dirname(detectron2.__file__),
        "has_cuda": bool(_C.has_cuda()),
        "cuda_version": _C.get_cuda_version(),
        "compiler": _C.get_compiler_version(),
    }
    import torchvision

    data["torchvision"] = torchvision.__version__
    from importlib import metadata

    for name in ("pytorch-lightning", "fvcore", "iopath", "pycocotools", "omegaconf", "numpy"):
        try:
            data[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            data[name] = "missing"

    deform = deform_conv_check(device)
    data["deform_conv"] = deform
    status = "done"
    if device.type == "cuda":
        diff = deform["max_rel_diff"]
        ok = data["detectron2"]["has_cuda"] and diff is not None and diff <= 1e-3
        report.target(
            "detectron2._C has CUDA (has_cuda(), deformable convolution on CUDA = CPU)",
            deform["max_rel_diff"],
            "<= 1e-3",
            ok,
        )
        status = "done" if ok else "failed"
    lines += ["| what | value |", "|---|---|"]
    for key in (
        "python",
        "torch",
        "torch_cuda",
        "torchvision",
        "device_name",
        "capability",
        "device_memory_gib",
        "multiprocessors",
        "cpu_threads",
        "pytorch-lightning",
        "fvcore",
        "iopath",
        "pycocotools",
        "omegaconf",
        "numpy",
    ):
        if key in data:
            lines.append(f"| {key} | {data[key]} |")
    d2 = data["detectron2"]
    lines.append(
        f"| detectron2 | {d2['version']} at {d2['path']}; _C.has_cuda() {d2['has_cuda']}, "
        f"CUDA {d2['cuda_version']}, {d2['compiler']} |"
    )
    lines.append(
        f"| deformable convolution: detectron2._C on {device.type} vs torchvision on the CPU "
        f"(float64) | largest difference over the largest value (output, gradients): "
        f"{_fmt(deform['max_rel_diff'])} {deform.get('note', '')} |"
    )
    if build:
        lines.append(f"| build | {json.dumps(build)} |")
    return data, lines, status


def deform_conv_check(device):
    """Detectron2's DeformConv (its ``_C`` kernels, CUDA only) forward and backward on the
    device against torchvision's ``deform_conv2d`` on the CPU in float64 (the same offset
    layout and bilinear sampling): the proof that the CUDA ops were built and work. On the
    CPU (dry run) only the reference runs."""
    from torchvision.ops import deform_conv2d

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 8, 3, 3, generator=g) * 0.1
    x = torch.randn(2, 8, 20, 24, generator=g)
    offset = torch.randn(2, 18, 20, 24, generator=g) * 2

    def run(conv, dev, dtype):
        w = weight.to(dev, dtype).requires_grad_()
        xi = x.to(dev, dtype).requires_grad_()
        oi = offset.to(dev, dtype).requires_grad_()
        y = conv(xi, oi, w)
        (y * y).sum().backward()
        return [t.detach().double().cpu() for t in (y, xi.grad, oi.grad, w.grad)]

    ref = run(
        lambda xi, oi, w: deform_conv2d(xi, oi, w, padding=1), torch.device("cpu"), torch.float64
    )
    if device.type != "cuda":
        return {"max_rel_diff": None, "note": "detectron2's DeformConv runs on CUDA only"}
    from detectron2.layers.deform_conv import deform_conv

    try:
        got = run(
            lambda xi, oi, w: deform_conv(xi, oi, w, 1, 1, 1, 1, 1, 64), device, torch.float32
        )
    except (RuntimeError, NotImplementedError) as err:  # built without its CUDA ops
        return {"max_rel_diff": None, "note": f"{type(err).__name__}: {err}"}
    diff = max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(got, ref)
    )
    return {"max_rel_diff": diff, "shape": list(x.shape)}


# --------------------------------------------------------------------------------------
# 2-3. the losses on the device


def loss_inputs(m, p, seed=0):
    """Logits (a third of them rounded to 1/8: ties), 10% ignored, ``p`` positives; the
    localisation errors of aLRP and the continuous labels of Rank & Sort."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, generator=g) * 2
    logits[: m // 3] = torch.round(logits[: m // 3] * 8) / 8
    targets = torch.zeros(m, dtype=torch.long)
    targets[torch.randperm(m, generator=g)[: m // 10]] = -1
    targets[torch.randperm(m, generator=g)[:p]] = 1
    loc = torch.rand(p, generator=g)
    labels = torch.where(targets == 1, 0.1 + 0.9 * torch.rand(m, generator=g), targets.float())
    return logits, targets, loc, labels


def loss_calls():
    """name -> fn(logits, targets, loc, labels, validate) returning (value, grad inputs).
    Each loss is given its number of positives as a head that knows it gives it: aLRP by
    its localisation errors, the others by ``num_positives`` (``loss_inputs`` has one
    localisation error per positive), so that ``validate=False`` needs no synchronisation."""
    from alrp_d2.losses import alrp_loss, ap_loss, ndcg_loss, rank_sort_loss

    def alrp(x, t, e, lab, validate):
        cls, loc = alrp_loss(x, t, e, validate=validate)
        return cls + loc

    def ap(x, t, e, lab, validate):
        return ap_loss(x, t, validate=validate, num_positives=len(e))

    def ndcg(x, t, e, lab, validate):
        return ndcg_loss(x, t, validate=validate, num_positives=len(e))

    def rank_sort(x, t, e, lab, validate):
        ranking, sorting = rank_sort_loss(x, lab, validate=validate, num_positives=len(e))
        return ranking + sorting

    return {"aLRP": alrp, "AP": ap, "NDCG": ndcg, "Rank & Sort": rank_sort}


def run_loss(fn, inputs, dtype, device, validate):
    logits, targets, loc, labels = inputs
    x = logits.to(device=device, dtype=dtype, copy=True).requires_grad_()
    e = loc.to(device, copy=True).requires_grad_()
    value = fn(x, targets.to(device), e, labels.to(device), validate)
    value.backward()
    e_grad = e.grad.detach().double().cpu() if e.grad is not None else None
    return value.detach().double().cpu(), x.grad.detach().double().cpu(), e_grad


def section_loss_equality(report, device, sizes):
    m, p = sizes["equality"]
    inputs = loss_inputs(m, p)
    rows, data, failed = [], {}, False
    for name, fn in loss_calls().items():
        for dtype_name, dtype in DTYPES.items():
            # CPU: validation on (the checked path); device: off (the training path).
            ref = run_loss(fn, inputs, dtype, torch.device("cpu"), True)
            got = run_loss(fn, inputs, dtype, device, False)
            value_diff = float((got[0] - ref[0]).abs() / ref[0].abs().clamp_min(1e-30))
            grad_diff = float((got[1] - ref[1]).abs().max() / ref[1].abs().max().clamp_min(1e-30))
            if name == "aLRP":  # the localisation errors' gradient too
                grad_diff = max(
                    grad_diff,
                    float((got[2] - ref[2]).abs().max() / ref[2].abs().max().clamp_min(1e-30)),
                )
            value_tol, grad_tol = EQUALITY_TOLERANCE[dtype_name]
            ok = value_diff <= value_tol and grad_diff <= grad_tol
            failed |= not ok
            data[f"{name}/{dtype_name}"] = {
                "value_cpu": float(ref[0]),
                "value_device": float(got[0]),
                "value_rel_diff": value_diff,
                "grad_rel_diff": grad_diff,
                "pass": ok,
            }
            rows.append(
                f"| {name} | {dtype_name} | {float(ref[0]):.6f} | {float(got[0]):.6f} | "
                f"{value_diff:.1e} (<= {value_tol:.0e}) | {grad_diff:.1e} (<= {grad_tol:.0e}) | "
                f"{'PASS' if ok else '**FAIL**'} |"
            )
            report.target(
                f"{name} equal on {device.type} and CPU, {dtype_name} logits",
                max(value_diff / value_tol, grad_diff / grad_tol),
                "<= 1 (difference / tolerance)",
                ok,
            )
    lines = [
        f"M = {m} anchors, P = {p} positives, a third of the logits rounded to 1/8 (ties), "
        "10% ignored; "
        "the same float32 logits cast to each dtype on both. "
        "The CPU with validation on against the device with validation off; value: "
        "relative difference; gradient: largest difference over the largest gradient.",
        "",
        f"| loss | logits | value CPU | value {device.type} | value diff | gradient diff "
        "| result |",
        "|---|---|---|---|---|---|---|",
    ] + rows
    return {"M": m, "P": p, "results": data}, lines, "failed" if failed else "done"


def section_loss_sync(report, device, sizes):
    if device.type != "cuda":
        return (
            {"note": "no CUDA device"},
            ["Not applicable on the CPU (nothing to synchronise)."],
            "n/a",
        )
    m, p = sizes["equality"]
    inputs = [t.to(device) for t in loss_inputs(m, p, seed=1)]
    rows, data = [], {}
    for name, fn in loss_calls().items():
        logits, targets, loc, labels = inputs

        def call():
            x = logits.detach().requires_grad_()
            e = loc.detach().requires_grad_()
            fn(x, targets, e, labels, False).backward()

        call()  # warm-up outside the check (lazy initialisations)
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
            error = None
        except RuntimeError as err:
            error = (
                f"{err}".splitlines()[0][:200]
                + " at "
                + attribute(traceback.extract_tb(err.__traceback__))
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
        with SyncCounter(device) as counter:
            call()
        ok = error is None and counter.count == 0
        data[name] = {
            "error_mode": error or "no error",
            "syncs": counter.count,
            "where": counter.by_place(),
        }
        report.target(
            f"{name}: no host-device synchronisation, validate=False (sync debug mode error)",
            counter.count,
            "0",
            ok,
        )
        rows.append(
            f"| {name} | {error or 'no error'} | {counter.count} | "
            f"{', '.join(f'{k} x{v}' for k, v in counter.by_place().items()) or '-'} |"
        )
    lines = [
        f"Forward and backward, float32, M = {m}, P = {p}, `validate=False`.",
        "",
        '| loss | sync debug mode "error" | syncs ("warn") | where |',
        "|---|---|---|---|",
    ] + rows
    failed = any(v["syncs"] != 0 or v["error_mode"] != "no error" for v in data.values())
    return data, lines, "failed" if failed else "done"


# --------------------------------------------------------------------------------------
# 4. a training step of every detector family

# The RetinaNets trained by a ranking loss, whose anchors MODEL.ALRP.ASSIGNER assigns.
RANKING_RETINANETS = ("ALRPRetinaNet", "APLossRetinaNet", "RankSortRetinaNet", "RankingRetinaNet")


def families():
    """One config per detector family under configs/COCO-Detection: meta-architecture, head
    loss, proposal generator, RoI and mask heads, assigner, deformable convolution."""
    from alrp_d2.config import get_cfg

    chosen = {}
    paths = glob.glob(os.path.join(ROOT, "configs", "COCO-Detection", "*.yaml"))
    for path in sorted(paths, key=lambda p: ("R_50" not in p, p)):  # R-50 stands for its family
        cfg = get_cfg()
        cfg.merge_from_file(path)
        m = cfg.MODEL
        rcnn = m.META_ARCHITECTURE == "GeneralizedRCNN"
        key = (
            m.META_ARCHITECTURE,
            m.RANKING_LOSS.NAME,
            f"{m.PROPOSAL_GENERATOR.NAME}+{m.ROI_HEADS.NAME}" if rcnn else "",
            m.ROI_MASK_HEAD.NAME if rcnn and m.MASK_ON else "",
            m.ALRP.ASSIGNER if m.META_ARCHITECTURE in RANKING_RETINANETS else "",
            "deformable" if any(m.RESNETS.DEFORM_ON_PER_STAGE) else "",
        )
        chosen.setdefault(key, path)
    return {" ".join(k for k in key if k): path for key, path in chosen.items()}


def model_cfg(path, device, num_classes=3, image=None, overrides=()):
    """The config's model with random weights (batch statistics in the backbone), on
    ``device``; ``overrides``: KEY VALUE pairs (the dry run's small backbone)."""
    from alrp_d2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(overrides))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device.type if device.type == "cpu" else str(device)
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.PIXEL_STD = [57.375, 57.12, 58.395]
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    if image is not None:  # tiny images: fewer proposals
        cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 200
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 100
    return cfg


def make_images(n, height, width, device, num_classes, seed=0, masks=False):
    """``n`` random images of ``height x width`` with 3 to 11 random boxes each (and an
    ellipse mask in each box for Mask R-CNN)."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        k = int(torch.randint(3, 12, (1,), generator=g))
        size = torch.tensor([width, height], dtype=torch.float32)
        xy = torch.rand(k, 2, generator=g) * size * 0.7
        wh = 8 + torch.rand(k, 2, generator=g) * size * 0.3
        boxes = torch.cat([xy, torch.minimum(xy + wh, size)], 1)
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, num_classes, (k,), generator=g)
        if masks:
            ys, xs = torch.meshgrid(
                torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij"
            )
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            rx, ry = (boxes[:, 2] - boxes[:, 0]) / 2, (boxes[:, 3] - boxes[:, 1]) / 2
            inst.gt_masks = BitMasks(
                ((xs[None] - cx[:, None, None]) / rx[:, None, None]) ** 2
                + ((ys[None] - cy[:, None, None]) / ry[:, None, None]) ** 2
                <= 1
            )
        image = torch.randint(0, 255, (3, height, width), generator=g).float()
        batch.append(
            {
                "image": image.to(device),
                "instances": inst.to(device),
                "height": height,
                "width": width,
            }
        )
    return batch


class Stepper:
    """One training step (forward, backward, SGD) as the engine runs it: AMP by autocast,
    float16 with a gradient scaler, bfloat16 without."""

    def __init__(self, model, device, precision):
        self.model, self.device, self.precision = model, device, precision
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.iteration = 0

    def __call__(self, batch):
        from detectron2.utils.events import EventStorage

        dtype = AMP_DTYPES[self.precision]
        amp = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        with EventStorage(self.iteration), amp:
            losses = self.model(batch)
        self.iteration += 1
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return losses


def build(path, device, sizes, num_classes=3, image=None, meta_architecture=None):
    from detectron2.modeling import build_model

    cfg = model_cfg(path, device, num_classes, image, sizes["model_overrides"])
    if meta_architecture:
        cfg.MODEL.META_ARCHITECTURE = meta_architecture
    torch.manual_seed(0)
    return build_model(cfg).train()


def section_training_steps(report, device, sizes):
    every = fams = families()
    if sizes["step_families"] == "first and last":
        # of those the dry run's ResNet-18 can build: Detectron2 has deformable blocks
        # from ResNet-50 on only
        first, *_, last = [n for n in every if not n.endswith("deformable")]
        fams = {first: every[first], last: every[last]}
    size = sizes["step_image"]
    precisions = sizes["step_precisions"]
    rows, data, failed = [], {}, False
    for name, path in fams.items():
        model = batch = None
        for precision in precisions:
            if report.left() < 20:
                data[f"{name}/{precision}"] = {"skipped": "time"}
                rows.append(f"| {name} | {precision} | skipped (time) | | | |")
                continue
            if model is None:
                model = build(path, device, sizes, image=size)
                batch = make_images(2, size, size, device, 3, masks=True)
            stepper = Stepper(model, device, precision)
            stepper(batch)  # the first step: lazy initialisations
            synchronize(device)
            with SyncCounter(device) as counter:
                start = time.perf_counter()
                losses = stepper(batch)
                synchronize(device)
                seconds = time.perf_counter() - start
            values = {k: float(v) for k, v in losses.items()}
            grads_finite = all(
                bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None
            )
            ok = all(math.isfinite(v) for v in values.values()) and grads_finite
            if precision == "fp16" and not grads_finite:  # the scaler skips such a step
                ok = all(math.isfinite(v) for v in values.values())
            failed |= not ok
            in_losses = None
            if counter.active:
                in_losses = sum(v for k, v in counter.by_place().items() if in_ranking_losses(k))
            data[f"{name}/{precision}"] = {
                "config": os.path.relpath(path, ROOT),
                "losses": values,
                "grads_finite": grads_finite,
                "seconds": seconds,
                "syncs": counter.count,
                "syncs_in_losses": in_losses,
                "where": counter.by_place(),
                "pass": ok,
            }
            report.target(
                f"training step {name}, {precision}: finite losses and gradients",
                "finite" if ok else "not finite",
                "finite",
                ok,
            )
            loss_text = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
            rows.append(
                f"| {name} (`{os.path.basename(path)}`) | {precision} | {seconds:.3f} | "
                f"{_fmt(counter.count)} ({_fmt(in_losses)}) | {loss_text} | "
                f"{'PASS' if ok else '**FAIL**'} |"
            )
            stepper = None
        model = batch = None
    deformable = [n for n in every if n.endswith("deformable")]
    if any(n not in fams for n in deformable):
        deformable.append("not stepped in the dry run (its ResNet-18 has no deformable blocks)")
    lines = [
        f"One config per family under `configs/COCO-Detection` ({len(every)} families"
        + ("" if sizes["step_families"] == "all" else f", the dry run's {sizes['step_families']}")
        + f"), random weights, 2 images of {size}x{size}, second step of each; AMP fp16 with a "
        "gradient scaler (Lightning's `16-mixed`), bf16 without."
        + (
            f" Dry run's backbone: {' '.join(sizes['model_overrides'])}."
            if sizes["model_overrides"]
            else ""
        ),
        "Deformable convolution: "
        + (
            ", ".join(deformable)
            if deformable
            else "no config sets `MODEL.RESNETS.DEFORM_ON_PER_STAGE` yet; "
            "the op itself is checked under environment."
        ),
        "",
        "| family (config) | precision | step (s) | syncs (in alrp_d2/losses) | losses | result |",
        "|---|---|---|---|---|---|",
    ] + rows
    return (
        {
            "families": {k: os.path.relpath(v, ROOT) for k, v in every.items()},
            "stepped": list(fams),
            "steps": data,
        },
        lines,
        "failed" if failed else "done",
    )


# --------------------------------------------------------------------------------------
# 5. the loss benchmark


def section_loss_benchmark(report, device, sizes):
    from fvcore.nn import sigmoid_focal_loss as fvcore_focal
    from loss_speed import make_batch  # benchmarks/loss_speed.py: the same inputs
    from torchvision.ops import sigmoid_focal_loss as torchvision_focal

    from alrp_d2.losses import alrp_loss, ap_loss, rank_sort_loss

    rows, results = [], []
    for p, m in sizes["loss_bench"]:
        if report.left() < 15:
            results.append({"P": p, "M": m, "skipped": "time"})
            rows.append(f"| {p} | {m:.0e} | skipped (time) |" + " |" * 10)
            continue
        logits, targets, loc_errors = make_batch(p, m, str(device))
        g = torch.Generator().manual_seed(1)
        labels = (0.1 + 0.9 * torch.rand(m, generator=g)).to(device)
        rs_targets = torch.where(targets == 1, labels, targets.to(labels.dtype))
        focal_targets = (targets == 1).to(logits.dtype)

        def alrp():
            x = logits.detach().requires_grad_()
            cls, loc = alrp_loss(x, targets, loc_errors.detach().requires_grad_(), validate=False)
            (cls + loc).backward()

        def ap():
            ap_loss(logits.detach().requires_grad_(), targets, validate=False).backward()

        def rank_sort():
            ranking, sorting = rank_sort_loss(
                logits.detach().requires_grad_(), rs_targets, validate=False
            )
            (ranking + sorting).backward()

        def focal_tv():
            x = logits.detach().requires_grad_()
            (
                torchvision_focal(x, focal_targets, alpha=0.25, gamma=2.0, reduction="sum") / p
            ).backward()

        def focal_fv():
            x = logits.detach().requires_grad_()
            (fvcore_focal(x, focal_targets, alpha=0.25, gamma=2.0, reduction="sum") / p).backward()

        fns = {
            "aLRP": alrp,
            "AP": ap,
            "Rank & Sort": rank_sort,
            "focal (torchvision)": focal_tv,
            "focal (fvcore)": focal_fv,
        }
        row = {"P": p, "M": m, "seconds": {}, "wall_seconds": {}, "peak_mib": {}}
        for name, fn in fns.items():
            t, wall = time_calls(fn, device, sizes["loss_warmup"], sizes["loss_repeats"])
            row["seconds"][name], row["wall_seconds"][name] = t, wall
            row["peak_mib"][name] = peak_memory(fn, device)
        focal = min(row["seconds"]["focal (torchvision)"], row["seconds"]["focal (fvcore)"])
        row["ratio_to_faster_focal"] = {
            k: row["seconds"][k] / focal for k in ("aLRP", "AP", "Rank & Sort")
        }
        results.append(row)
        s, mem, r = row["seconds"], row["peak_mib"], row["ratio_to_faster_focal"]
        rows.append(
            f"| {p} | {m:.0e} | "
            + " | ".join(f"{s[k] * 1e3:.3f}" for k in fns)
            + " | "
            + " | ".join(f"{r[k]:.2f}x" for k in ("aLRP", "AP", "Rank & Sort"))
            + " | "
            + " / ".join("-" if mem[k] is None else f"{mem[k]:.0f}" for k in fns)
            + " |"
        )
        if (p, m) == LOSS_TARGET_SIZE or (
            report.mode != "gpu" and (p, m) == sizes["loss_bench"][-1]
        ):
            for k in ("aLRP", "AP", "Rank & Sort"):
                report.target(
                    f"{k} loss time / faster focal loss, P={p}, M={m:.0e}"
                    f" (moonshot {LOSS_MOONSHOT}x)",
                    r[k],
                    f"<= {LOSS_TARGET}x",
                    r[k] <= LOSS_TARGET,
                    "moonshot met" if r[k] <= LOSS_MOONSHOT else "",
                )
        logits = targets = loc_errors = labels = rs_targets = focal_targets = fns = None  # freed
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timing = "CUDA events" if device.type == "cuda" else "wall clock"
    lines = [
        f"Forward plus backward, medians of {sizes['loss_repeats']} calls after "
        f"{sizes['loss_warmup']} warm-up ({timing}); `validate=False` (as the heads call them); "
        "inputs of `benchmarks/loss_speed.py` (standard-normal logits, 10% ignored); focal "
        "loss over all M logits, alpha 0.25, gamma 2. Peak: memory allocated by one call "
        "beyond its inputs (aLRP / AP / RS / focal tv / focal fvcore).",
        "",
        "| P | M | aLRP (ms) | AP (ms) | RS (ms) | focal tv (ms) | focal fvcore (ms) "
        "| aLRP/focal | AP/focal | RS/focal | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ] + rows
    return {"rows": results}, lines, "done"


# --------------------------------------------------------------------------------------
# 6. the training-step benchmark


def section_train_benchmark(report, device, sizes):
    rows, results = [], []
    for name, path, n, (h, w), precisions in sizes["bench_pairs"]:
        batch = make_images(n, h, w, device, 80, seed=0)
        ranking_arch = model_cfg(path, device).MODEL.META_ARCHITECTURE
        for precision in precisions:
            if report.left() < 30:
                results.append({"pair": name, "precision": precision, "skipped": "time"})
                rows.append(f"| {name} | {precision} | skipped (time) | | | | |")
                continue
            runs = {}
            for label, arch in (("ranking", ranking_arch), ("focal", "RetinaNet")):
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                model = build(path, device, sizes, num_classes=80, meta_architecture=arch)
                stepper = Stepper(model, device, precision)
                t, wall = time_calls(
                    lambda: stepper(batch), device, sizes["bench_warmup"], sizes["bench_steps"]
                )
                with SyncCounter(device) as counter:
                    if counter.active:
                        stepper(batch)
                        synchronize(device)
                runs[label] = {
                    "meta_architecture": arch,
                    "seconds": t,
                    "wall_seconds": wall,
                    "syncs": counter.count,
                    "where": counter.by_place(),
                    "max_memory_mib": (
                        torch.cuda.max_memory_allocated(device) / MiB
                        if device.type == "cuda"
                        else None
                    ),
                }
                model = stepper = None  # freed before the next model is built
            ratio = runs["ranking"]["seconds"] / runs["focal"]["seconds"]
            result = {
                "pair": name,
                "config": os.path.relpath(path, ROOT),
                "precision": precision,
                "ratio": ratio,
                **runs,
            }
            report.target(
                f"training step {ranking_arch} / RetinaNet, {name}, {precision}",
                ratio,
                f"<= {STEP_TARGET}x",
                ratio <= STEP_TARGET,
            )
            syncs_r, syncs_f = runs["ranking"]["syncs"], runs["focal"]["syncs"]
            if syncs_r is not None:
                in_losses = sum(
                    v for k, v in runs["ranking"]["where"].items() if in_ranking_losses(k)
                )
                result["syncs_in_losses"] = in_losses
                report.target(
                    f"syncs per step in alrp_d2/losses, {name}, {precision}",
                    in_losses,
                    "0",
                    in_losses == 0,
                )
                report.target(
                    f"syncs per step {ranking_arch} vs RetinaNet, {name}, {precision}",
                    f"{syncs_r} vs {syncs_f}",
                    "<= RetinaNet's",
                    syncs_r <= syncs_f,
                )
            results.append(result)
            where = "; ".join(f"{k} x{v}" for k, v in runs["ranking"]["where"].items()) or "-"
            where_f = "; ".join(f"{k} x{v}" for k, v in runs["focal"]["where"].items()) or "-"
            mem = (
                "-"
                if runs["ranking"]["max_memory_mib"] is None
                else f"{runs['ranking']['max_memory_mib']:.0f} / "
                f"{runs['focal']['max_memory_mib']:.0f}"
            )
            rows.append(
                f"| {name} | {precision} | {runs['ranking']['seconds']:.4f} | "
                f"{runs['focal']['seconds']:.4f} | {ratio:.3f}x | "
                f"{_fmt(syncs_r)} / {_fmt(syncs_f)} | "
                f"{mem} |"
            )
            rows.append(f"| | syncs of the ranking model: {where} | | | | RetinaNet: {where_f} | |")
        batch = None
    timing = "CUDA events" if device.type == "cuda" else "wall clock"
    lines = [
        f"Forward, backward and SGD step, random weights (BN), 80 classes, random boxes; "
        f"medians of {sizes['bench_steps']} steps after {sizes['bench_warmup']} ({timing}). "
        "The focal model is Detectron2's `RetinaNet` built from the same config (same "
        "backbone, anchors and head; its IoU matcher and focal loss). Syncs: one more step "
        'with `torch.cuda.set_sync_debug_mode("warn")`, each at the innermost frame of '
        "alrp_d2 or Detectron2 (`other`: torch, or a backward's replayed at `backward()`).",
        "",
        "| pair | precision | ranking step (s) | focal step (s) | ratio "
        "| syncs per step (ranking / focal) "
        "| peak MiB (ranking / focal) |",
        "|---|---|---|---|---|---|---|",
    ] + rows
    return {"rows": results}, lines, "done"


# --------------------------------------------------------------------------------------
# 7. the quickstart


def section_quickstart(report, device, sizes, out_dir):
    work = tempfile.mkdtemp(prefix="alrp-quickstart-")
    output = os.path.join(work, "output")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train_net.py"),
        "--config-file",
        os.path.join(ROOT, QUICKSTART),
        "--accelerator",
        "gpu" if device.type == "cuda" else "cpu",
    ]
    cmd += sizes["quickstart_overrides"] + ["OUTPUT_DIR", output]
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.join(work, "datasets"), PYTHONUNBUFFERED="1")
    timeout = max(10.0, report.left() - 5)
    start = time.time()
    log_path = os.path.join(out_dir, "quickstart.log")
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        returncode, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        returncode = "timeout"
        text = "".join(
            t.decode(errors="replace") if isinstance(t, bytes) else (t or "")
            for t in (err.stdout, err.stderr)
        )
    wall = time.time() - start
    metrics_path = os.path.join(output, "final_metrics.json")
    metrics = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
    shutil.rmtree(work, ignore_errors=True)
    _atomic_write(
        log_path, "$ " + " ".join(cmd) + "\n" + "\n".join(text.splitlines()[-300:]) + "\n"
    )
    ap50, olrp, ap = metrics.get("bbox/AP50"), metrics.get("lrp/oLRP"), metrics.get("bbox/AP")
    ok = returncode == 0 and ap50 is not None and olrp is not None
    data = {
        "command": " ".join(cmd[1:]),
        "returncode": returncode,
        "wall_seconds": wall,
        "bbox/AP": ap,
        "bbox/AP50": ap50,
        "lrp/oLRP": olrp,
        "metrics": {k: v for k, v in metrics.items() if k.startswith(("bbox/", "lrp/"))},
    }
    report.target(
        "quickstart trains and evaluates (AP50, oLRP measured)",
        f"AP50 {_fmt(ap50)}, oLRP {_fmt(olrp)}, {wall:.0f} s",
        "exit 0",
        ok,
    )
    lines = [
        f"`python {os.path.relpath(cmd[1], ROOT)} {' '.join(cmd[2:-2])} OUTPUT_DIR <tmp>` "
        "(datasets generated under a temporary folder: generation included in the wall time). "
        "Its output's end: `quickstart.log`.",
        "",
        "| exit | wall time (s) | bbox AP | AP50 | oLRP |",
        "|---|---|---|---|---|",
        f"| {returncode} | {wall:.1f} | {_fmt(ap)} | {_fmt(ap50)} | {_fmt(olrp)} |",
    ]
    return data, lines, "done" if ok else "failed"


# --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default=os.environ.get("OUT") or tempfile.mkdtemp(prefix="alrp-gpu-")
    )
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="epoch seconds by which to stop (default: 7 minutes from now)",
    )
    parser.add_argument(
        "--build-json", default=None, help="run.sh's record of the install and build"
    )
    parser.add_argument("--sections", default=None, help="comma-separated subset of sections")
    args = parser.parse_args(argv)
    mode = "cpu-dry-run" if args.cpu_dry_run else "gpu"
    os.makedirs(args.out, exist_ok=True)
    report = Report(args.out, mode, args.deadline or time.time() + 420)
    build = None
    if args.build_json and os.path.exists(args.build_json):
        with open(args.build_json) as f:
            build = json.load(f)
    if mode == "gpu":
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-dry-run for the CPU", file=sys.stderr)
            report.section(
                "environment", "error", {"error": "no CUDA device"}, ["No CUDA device."], 0.0
            )
            return 1
        device = torch.device("cuda", 0)
    else:
        device = torch.device("cpu")
    sizes = SIZES[mode]
    # name: (function, extra arguments, seconds it needs at least on a GPU / on the CPU)
    sections = {
        "environment": (section_environment, (device, build), 5),
        "loss_equality": (section_loss_equality, (device, sizes), 10),
        "loss_sync": (section_loss_sync, (device, sizes), 5),
        "training_steps": (section_training_steps, (device, sizes), 30),
        "loss_benchmark": (section_loss_benchmark, (device, sizes), 20),
        "train_benchmark": (section_train_benchmark, (device, sizes), 40),
        "quickstart": (section_quickstart, (device, sizes, args.out), 60 if mode == "gpu" else 20),
    }
    wanted = args.sections.split(",") if args.sections else list(sections)
    unknown = set(wanted) - set(sections)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {list(sections)}")
    print(f"verify.py: {mode}, {device}, report in {args.out}", flush=True)
    ok = True
    for name in wanted:
        fn, extra, need = sections[name]
        ok &= run_section(report, name, fn, need, *extra)
    report.save()
    targets = report.data["targets"]
    print(
        f"verify.py: {sum(t['pass'] for t in targets)} of {len(targets)} targets pass; "
        f"report: {os.path.join(args.out, 'report.md')}",
        flush=True,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
