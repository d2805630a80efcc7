"""What a run reports and takes from the command line: the iteration lines of log.txt
(SOLVER.LOG_PERIOD), model_best.pth (TEST.BEST_CHECKPOINT), --logger, and own COCO-format
datasets (--dataset, $ALRP_DATASETS).

conftest.py's tiny training (``trained_run``) serves the log and best
checkpoint tests; --dataset trains in this process (1 iteration).
"""

import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import shlex
import types

import pytest
import torch
from runs import EPOCH, ROOT, TINY, TRAINING, VAL

pytestmark = pytest.mark.detectron2


@pytest.fixture(scope="module")
def run(trained_run):
    return trained_run


def training_value(key):
    return TRAINING[TRAINING.index(key) + 1]


def train_net_main(argv):
    """train_net.py's ``main(argv)`` in this process: (exit status, stderr)."""
    from alrp_d2.engine.launch import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, err.getvalue()


# -- iteration lines (alrp_d2.engine.printer) ---------------------------------------------

LINE = re.compile(
    r"^\[\d\d/\d\d \d\d:\d\d:\d\d\] alrp_d2 INFO:  eta: \d+:\d\d:\d\d"
    r"  iter: (?P<iter>\d+)  epoch: (?P<epoch>\d+)"
    r"  total_loss: (?P<total>\S+)  loss_alrp_cls: \S+  loss_alrp_loc: \S+  (?:\S+: \S+  )*"
    r"time: \d+\.\d{4}  last_time: \d+\.\d{4}  data_time: \d+\.\d{4}  last_data_time: \d+\.\d{4}"
    r"  lr: (?P<lr>\S+)$"
)


def schedule_lrs(run, iterations):
    """The learning rate of each iteration (from 1) by Detectron2's schedule of the run."""
    from detectron2.solver import build_lr_scheduler, build_optimizer

    from alrp_d2.config import get_cfg
    from alrp_d2.engine.module import schedule_in_iterations

    cfg = get_cfg()
    cfg.merge_from_file(str(run.out / "config.yaml"))
    solver = schedule_in_iterations(cfg, EPOCH)
    optimizer = build_optimizer(solver, torch.nn.Linear(2, 2))
    scheduler = build_lr_scheduler(solver, optimizer)
    lrs = []
    for _ in range(iterations):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_log_has_a_line_every_log_period_in_detectron2s_format(run):
    period, total = training_value("SOLVER.LOG_PERIOD"), training_value("SOLVER.MAX_EPOCHS") * EPOCH
    lines = [line for line in (run.out / "log.txt").read_text().splitlines() if "  iter: " in line]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), "\n".join(line for line, m in zip(lines, matches) if not m)
    iters = [int(m["iter"]) for m in matches]
    assert (
        iters
        == list(range(period, total + 1, period)) + ([total] if total % period else [])
        == [3, 6, 8]
    )
    assert [int(m["epoch"]) for m in matches] == [(i - 1) // EPOCH for i in iters] == [0, 1, 1]
    assert all(math.isfinite(float(m["total"])) for m in matches)
    assert "eta: 0:00:00" in lines[-1]
    assert "max_mem" not in lines[0]  # GPU memory: on GPU only
    # lr: that of the iteration (the schedule is still warming up, every line's differs)
    lrs = schedule_lrs(run, total)
    assert [float(m["lr"]) for m in matches] == pytest.approx([lrs[i - 1] for i in iters], rel=1e-4)
    # The same lines on the console.
    for line in lines:
        assert line.split(" INFO: ", 1)[1] in run.console


class FakeTrainer(types.SimpleNamespace):
    pass


def fake_trainer(max_steps, device="cpu"):
    optimizer = types.SimpleNamespace(param_groups=[{"lr": 0.5}])
    return FakeTrainer(
        global_step=0,
        max_steps=max_steps,
        estimated_stepping_batches=max_steps,
        current_epoch=0,
        is_global_zero=True,
        callback_metrics={},
        optimizers=[optimizer],
        strategy=types.SimpleNamespace(root_device=torch.device(device)),
    )


@contextlib.contextmanager
def alrp_d2_lines():
    """The messages logged on the ``alrp_d2`` logger (which need not propagate)."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("alrp_d2")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def drive(printer, trainer, steps, monkeypatch, data=2.0, compute=10.0, losses=None):
    """``steps`` iterations: ``data`` seconds waiting for the batch, ``compute`` in the step."""
    from alrp_d2.engine import printer as printer_module

    clock = [100.0]
    monkeypatch.setattr(
        printer_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0])
    )
    printer.on_train_epoch_start(trainer, None)
    for step in range(1, steps + 1):
        clock[0] += data
        printer.on_train_batch_start(trainer, None, None, step - 1)
        clock[0] += compute
        trainer.global_step = step
        trainer.callback_metrics = {
            "total_loss": torch.tensor(float(step if losses is None else losses[step - 1])),
            "loss_cls": torch.tensor(0.25),
            "alrp/num_pos": torch.tensor(7.0),
            "lr": torch.tensor(0.001 * step),
            "bbox/AP": torch.tensor(3.0),
        }
        printer.on_train_batch_end(trainer, None, None, None, step - 1)


def test_printer_lines_unit(monkeypatch):
    from alrp_d2.engine.printer import MetricPrinter

    trainer = fake_trainer(max_steps=5)
    with alrp_d2_lines() as lines:
        drive(MetricPrinter(period=2), trainer, 5, monkeypatch)
    # iterations 2 and 4 (the period) and 5 (the last); medians and means over the last 2
    assert lines == [
        " eta: 0:00:36  iter: 2  epoch: 0  total_loss: 1.5  loss_cls: 0.25  time: 12.0000"
        "  last_time: 12.0000  data_time: 2.0000  last_data_time: 2.0000  lr: 0.002",
        " eta: 0:00:12  iter: 4  epoch: 0  total_loss: 3.5  loss_cls: 0.25  time: 12.0000"
        "  last_time: 12.0000  data_time: 2.0000  last_data_time: 2.0000  lr: 0.004",
        " eta: 0:00:00  iter: 5  epoch: 0  total_loss: 4.5  loss_cls: 0.25  time: 12.0000"
        "  last_time: 12.0000  data_time: 2.0000  last_data_time: 2.0000  lr: 0.005",
    ]


def test_printer_format_line_memory_and_other_ranks(monkeypatch):
    from alrp_d2.engine.printer import MetricPrinter

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 812 * 1024**2)
    trainer = fake_trainer(max_steps=3, device="cuda")
    printer = MetricPrinter(period=3)
    with alrp_d2_lines() as lines:
        drive(printer, trainer, 3, monkeypatch, losses=[4.0, 1.0, 2.0])
    assert len(lines) == 1 and lines[0].endswith("lr: 0.003  max_mem: 812M")
    assert "total_loss: 2  " in lines[0]  # the median
    line = printer.format_line(trainer, 3, 3)
    assert line == lines[0]
    other = fake_trainer(max_steps=3)
    other.is_global_zero = False
    with alrp_d2_lines() as lines:
        drive(MetricPrinter(period=1), other, 3, monkeypatch)
    assert lines == []
    with pytest.raises(ValueError, match="at least 1 iteration"):
        MetricPrinter(period=0)


# -- model_best.pth (alrp_d2.engine.best) --------------------------------------------------


def test_model_best_after_the_evaluation(run):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from alrp_d2.config import get_cfg

    best = torch.load(run.out / "model_best.pth", map_location="cpu", weights_only=False)
    metrics = json.loads((run.out / "final_metrics.json").read_text())
    assert best["metric"] == "bbox/AP" and best["mode"] == "max"
    assert best["value"] == pytest.approx(metrics["bbox/AP"], rel=1e-6)  # the only evaluation
    assert (best["epoch"], best["iteration"]) == (1, 2 * EPOCH)
    with open(run.out / "inference" / VAL / "lrp_thresholds.json") as f:
        assert best["lrp_thresholds"] == {VAL: json.load(f)}
    assert "model_best: bbox/AP = " in (run.out / "log.txt").read_text()
    # Detectron2's checkpointer loads it, every parameter; the weights are the final ones
    # (the self-balance weight is updated after the epoch's evaluation: a training state).
    cfg = get_cfg()
    cfg.merge_from_file(str(run.out / "config.yaml"))
    model = build_model(cfg)
    extra = DetectionCheckpointer(model).load(str(run.out / "model_best.pth"))
    assert extra["value"] == best["value"]
    final = torch.load(run.out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    state = model.state_dict()
    assert state.keys() == final.keys()
    for key, value in final.items():
        if key != "self_balance.weight":
            assert torch.equal(state[key], value), key


class FakeModule(torch.nn.Module):
    def __init__(self, out_dir=None):
        super().__init__()
        self.model = torch.nn.Linear(3, 2)
        if out_dir is not None:
            from alrp_d2.config import get_cfg

            self.cfg = get_cfg()
            self.cfg.DATASETS.TEST = (VAL,)
            self.cfg.OUTPUT_DIR = str(out_dir)


def evaluate(callback, module, value, step, epoch=0, fn="fit", metric=None):
    """What Lightning does after an evaluation that reported ``value``."""
    from pytorch_lightning.trainer.states import TrainerFn

    trainer = types.SimpleNamespace(
        sanity_checking=False,
        global_step=step,
        current_epoch=epoch,
        is_global_zero=True,
        state=types.SimpleNamespace(fn=TrainerFn.FITTING if fn == "fit" else TrainerFn.VALIDATING),
        callback_metrics={} if value is None else {metric or callback.metric: torch.tensor(value)},
    )
    with torch.no_grad():
        module.model.weight.fill_(step)  # which evaluation's weights were saved
    callback.on_validation_end(trainer, module)


def saved(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_best_checkpoint_keeps_the_thresholds_of_its_evaluation(tmp_path):
    """model_best.pth holds the thresholds of the evaluation that chose it (the module's,
    not a file read back): a later, worse evaluation's thresholds do not replace them, and
    no thresholds file is needed."""
    from alrp_d2.engine.best import BestCheckpoint

    callback = BestCheckpoint(str(tmp_path), "bbox/AP")
    module = FakeModule(tmp_path)
    for value, threshold in ((30.0, 0.3), (20.0, 0.2)):
        module.last_lrp_thresholds = {VAL: {"1": {"name": "a", "threshold": threshold}}}
        evaluate(callback, module, value, step=int(value))
    assert saved(tmp_path / "model_best.pth")["lrp_thresholds"] == {
        VAL: {"1": {"name": "a", "threshold": 0.3}}
    }
    assert not (tmp_path / "inference").exists()


@pytest.mark.parametrize(
    "metric,mode,values,best",
    [
        ("bbox/AP", "auto", [10.0, 30.0, 20.0, float("nan")], (30.0, 2)),
        (
            "lrp/oLRP",
            "auto",
            [90.0, 80.0, 85.0, 80.0],
            (80.0, 2),
        ),  # lower is better; a tie does not replace
        ("bbox/AP50", "min", [5.0, 7.0, 4.0, 6.0], (4.0, 3)),
        ("lrp/oLRP", "MAX", [1.0, 2.0, 3.0, 2.5], (3.0, 3)),
    ],
)
def test_best_checkpoint_keeps_the_best_evaluation(tmp_path, metric, mode, values, best):
    from detectron2.checkpoint import DetectionCheckpointer

    from alrp_d2.engine.best import BestCheckpoint

    callback = BestCheckpoint(str(tmp_path), metric, mode)
    module = FakeModule()
    path = tmp_path / "model_best.pth"
    record = None
    for i, value in enumerate(values, start=1):
        before = path.read_bytes() if path.exists() else None
        evaluate(callback, module, value, step=10 * i, epoch=i - 1)
        better = not math.isnan(value) and (
            record is None or (value > record if callback.mode == "max" else value < record)
        )
        assert (path.read_bytes() != before) == better, f"evaluation {i} ({value})"
        record = value if better else record
    data = saved(path)
    assert (data["metric"], data["value"], data["iteration"], data["epoch"]) == (
        metric,
        best[0],
        10 * best[1],
        best[1] - 1,
    )
    assert (
        data["mode"]
        == callback.mode
        == mode.lower().replace("auto", "min" if metric.startswith("lrp/") else "max")
    )
    assert callback.best == best[0]
    fresh = FakeModule()
    extra = DetectionCheckpointer(fresh.model).load(str(path))
    assert extra["value"] == best[0]
    assert torch.all(fresh.model.weight == 10 * best[1])


def test_best_checkpoint_state_survives_a_resume(tmp_path):
    from alrp_d2.engine.best import BestCheckpoint

    first = BestCheckpoint(str(tmp_path / "a"), "lrp/oLRP")
    evaluate(first, FakeModule(), 70.0, step=5)
    state = first.state_dict()
    resumed = BestCheckpoint(str(tmp_path / "b"), "lrp/oLRP")
    resumed.load_state_dict(state)
    evaluate(resumed, FakeModule(), 75.0, step=10)  # worse than before the resume
    assert not (tmp_path / "b" / "model_best.pth").exists()
    evaluate(resumed, FakeModule(), 65.0, step=15)
    assert saved(tmp_path / "b" / "model_best.pth")["value"] == 65.0
    # Another metric or direction: the saved record is not theirs.
    for other in (
        BestCheckpoint(str(tmp_path / "c"), "bbox/AP"),
        BestCheckpoint(str(tmp_path / "c"), "lrp/oLRP", "max"),
    ):
        other.load_state_dict(state)
        assert other.best is None


def test_best_checkpoint_other_cases(tmp_path, monkeypatch):
    from alrp_d2.engine.best import BestCheckpoint, metric_mode

    callback = BestCheckpoint(str(tmp_path), "bbox/AP")
    # An evaluation without training (--eval-only) saves nothing.
    evaluate(callback, FakeModule(), 50.0, step=0, fn="validate")
    assert not (tmp_path / "model_best.pth").exists() and callback.best is None
    # A metric the evaluation does not report: one warning naming what it reports.
    with alrp_d2_lines() as lines:
        evaluate(callback, FakeModule(), 1.0, step=3, metric="bbox/AP50")
        evaluate(callback, FakeModule(), 1.0, step=4, metric="bbox/AP50")
    assert len(lines) == 1 and "reports no 'bbox/AP'" in lines[0] and "bbox/AP50" in lines[0]
    assert not (tmp_path / "model_best.pth").exists()
    # The final evaluation after fit counts the epochs trained: epoch = the last one.
    module = FakeModule(out_dir=tmp_path)
    evaluate(callback, module, 5.0, step=40, epoch=4, fn="validate")
    data = saved(tmp_path / "model_best.pth")
    assert (data["epoch"], data["iteration"]) == (3, 40)
    assert "lrp_thresholds" not in data  # an evaluation without the LRP evaluator
    # Bad modes.
    for mode in ("largest", "", None):
        with pytest.raises(
            ValueError, match="TEST.BEST_CHECKPOINT.MODE must be 'auto', 'max' or 'min'"
        ):
            metric_mode("bbox/AP", mode)
    assert metric_mode("lrp/oLRP") == "min" and metric_mode("bbox/AP") == "max"


def test_train_net_refuses_an_unknown_mode(tmp_path):
    out = tmp_path / "out"
    code, err = train_net_main(
        [
            "--config-file",
            TINY,
            "--accelerator",
            "cpu",
            "DATASETS.TEST",
            "()",
            "TEST.BEST_CHECKPOINT.MODE",
            "largest",
            "OUTPUT_DIR",
            out,
        ]
    )
    assert code == 2
    assert "TEST.BEST_CHECKPOINT.MODE must be 'auto', 'max' or 'min', got 'largest'" in err
    assert not out.exists()


# -- --logger ---------------------------------------------------------------------------------


def test_csv_logger_only(run):
    assert any((run.out / "csv").rglob("metrics.csv"))
    assert not (run.out / "tensorboard").exists()


def test_unknown_logger_is_a_usage_error(tmp_path):
    code, err = train_net_main(
        ["--config-file", TINY, "--logger", "csv,nope", "OUTPUT_DIR", tmp_path / "out"]
    )
    assert code == 2
    assert "unknown logger(s) nope" in err and "tensorboard, csv, wandb, mlflow" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_logger_without_its_package(tmp_path, monkeypatch, name):
    real = importlib.util.find_spec
    if real(name) is not None:  # installed here: as if it were not
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a)
        )
    out = tmp_path / "out"
    code, err = train_net_main(
        [
            "--config-file",
            TINY,
            "--accelerator",
            "cpu",
            "--logger",
            f"csv,{name}",
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            out,
        ]
    )
    assert code == 2
    assert (
        f"--logger {name} needs the package '{name}', which is not installed: pip install {name}"
        in err
    )
    assert not out.exists()


# -- own datasets: --dataset NAME JSON IMAGE_ROOT, $ALRP_DATASETS ------------------------------


@pytest.fixture(scope="module")
def own_data(run, tmp_path_factory):
    """8 annotated images of the tiny training split as a user's COCO json, in a folder
    whose name holds a space; the images stay in their folder."""
    with open(run.data / "alrp_synthetic" / "annotations" / "tiny_train.json") as f:
        coco = json.load(f)
    annotated = sorted({a["image_id"] for a in coco["annotations"] if not a["iscrowd"]})[:8]
    coco["images"] = [im for im in coco["images"] if im["id"] in annotated]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in annotated]
    folder = tmp_path_factory.mktemp("own") / "my data"
    folder.mkdir()
    path = folder / "train.json"
    path.write_text(json.dumps(coco))
    return types.SimpleNamespace(json=path, images=run.data / "alrp_synthetic" / "tiny_train")


def train_on(name, out, extra=()):
    return train_net_main(
        [
            "--config-file",
            TINY,
            "--accelerator",
            "cpu",
            "--logger",
            "csv",
            *extra,
            "DATASETS.TRAIN",
            f'("{name}",)',
            "DATASETS.TEST",
            "()",
            "SOLVER.MAX_EPOCHS",
            1,
            "OUTPUT_DIR",
            out,
        ]
    )


def assert_trained_on(name, out, own_data):
    from detectron2.data import MetadataCatalog

    assert (out / "model_final.pth").is_file()
    meta = MetadataCatalog.get(name)
    assert (meta.json_file, meta.image_root) == (str(own_data.json), str(own_data.images))
    assert f"TRAIN:\n  - {name}\n" in (out / "config.yaml").read_text()
    rows = [
        json.loads(line) for line in (out / "self_balance_rank0.jsonl").read_text().splitlines()
    ]
    # 8 images at batch 8: one iteration (the tiny split itself: 4)
    assert len([r for r in rows if "cls" in r]) == 1


def test_dataset_flag_trains_on_own_data(own_data, tmp_path):
    out = tmp_path / "out"
    code, err = train_on(
        "own_train_flag", out, ["--dataset", "own_train_flag", own_data.json, own_data.images]
    )
    assert code == 0, err[-3000:]
    assert_trained_on("own_train_flag", out, own_data)


def test_environment_variable_trains_on_own_data(own_data, tmp_path, monkeypatch):
    monkeypatch.setenv("ALRP_DATASETS", f'own_train_env "{own_data.json}" {own_data.images}')
    out = tmp_path / "out"
    code, err = train_on("own_train_env", out)
    assert code == 0, err[-3000:]
    assert_trained_on("own_train_env", out, own_data)


def test_compose_passes_own_datasets_to_train_net(own_data, monkeypatch):
    """docker compose: ALRP_DATASETS reaches the container; OPTS names the dataset (its
    quotes protected from compose's shell-like split of the command)."""
    import yaml

    with open(os.path.join(ROOT, "docker", "docker-compose.yml")) as f:
        compose = yaml.safe_load(f)
    for service in compose["services"].values():
        assert (
            "ALRP_DATASETS" in service["environment"]
            and service["environment"]["ALRP_DATASETS"] is None
        )
    from alrp_d2.engine.launch import argument_parser, check_inputs, register_datasets, setup_cfg

    env = {"CONFIG": TINY, "OPTS": "DATASETS.TRAIN \"('own_compose',)\" DATASETS.TEST ()"}
    command = re.sub(
        r"\$\{(\w+):-([^}]*)\}",
        lambda m: env.get(m.group(1), m.group(2)),
        compose["services"]["train"]["command"],
    )
    monkeypatch.setenv("ALRP_DATASETS", f'own_compose "{own_data.json}" "{own_data.images}"')
    args = argument_parser().parse_args(shlex.split(command))
    register_datasets(args)
    cfg = setup_cfg(args)
    assert cfg.DATASETS.TRAIN == ("own_compose",)
    check_inputs(cfg, args)  # the dataset is known


BAD_DATASETS = [
    (
        "missing json",
        lambda d: ["--dataset", "own_a", "no/such.json", d.images],
        None,
        "dataset 'own_a': annotation file not found: no/such.json",
    ),
    (
        "missing folder",
        lambda d: ["--dataset", "own_b", d.json, "no/such/folder"],
        None,
        "dataset 'own_b': image folder not found: no/such/folder",
    ),
    (
        "built-in name",
        lambda d: ["--dataset", "coco_2017_val", d.json, d.images],
        None,
        "dataset name 'coco_2017_val' is already registered",
    ),
    (
        "given twice",
        lambda d: ["--dataset", "own_c", d.json, d.images, "--dataset", "own_c", d.json, d.images],
        None,
        "dataset 'own_c' given twice",
    ),
    (
        "two words",
        lambda d: ["--dataset", "own_d", d.json, "--logger", "csv"],
        None,
        "argument --dataset: expected 3 arguments",
    ),
    (
        "env: four words",
        lambda d: [],
        lambda d: f'own_e "{d.json}" {d.images} extra',
        "$ALRP_DATASETS must hold NAME JSON IMAGE_ROOT triples, got 4 words",
    ),
    (
        "env: missing json",
        lambda d: [],
        lambda d: f"own_f no/such.json {d.images}",
        "dataset 'own_f': annotation file not found: no/such.json",
    ),
    (
        "env: open quote",
        lambda d: [],
        lambda d: f'own_g "{d.json} {d.images}',
        "$ALRP_DATASETS cannot be split",
    ),
]


@pytest.mark.parametrize("case,flags,env,message", BAD_DATASETS, ids=[b[0] for b in BAD_DATASETS])
def test_bad_dataset_exits_2_and_writes_nothing(
    own_data, tmp_path, monkeypatch, case, flags, env, message
):
    if env is not None:
        monkeypatch.setenv("ALRP_DATASETS", env(own_data))
    out = tmp_path / "out"
    code, err = train_on("own_x", out, flags(own_data))
    assert code == 2
    assert message in err, err[-2000:]
    assert not out.exists()
