"""Weights and checkpoints from elsewhere cannot run code (issue 25).

Each malicious file is a pickle whose loading would write a marker file (shown by
loading it with full pickle once: the payload is real). Given to ``predict --weights``,
``train_net.py --eval-only``, ``MODEL.WEIGHTS`` of a training or ``--resume``, it leaves no
marker, exits 2 naming the reason, and every file of the folder stays as it was. Every
checkpoint the project writes still loads in every path.
"""

import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from runs import TINY, TRAINING, VAL, python_module, train_net

# Slow: train_net.py and predict processes (the fast lane, -m "not slow", leaves them out).
pytestmark = [pytest.mark.detectron2, pytest.mark.slow]


class Payload:
    """Runs ``open(marker, 'w')`` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def folder_state(folder):
    """Every file under ``folder`` with its content's hash (the folder as it is)."""
    state = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                state[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return state


@pytest.fixture(scope="module")
def evil(trained_run, tmp_path_factory):
    """Malicious files beside the run's good weights: ``ckpt`` (the run's last.ckpt with a
    payload among its callbacks' state), ``pth`` (model_final.pth's weights with a payload
    as an extra entry), and the ``marker`` their payloads would write."""
    folder = tmp_path_factory.mktemp("evil")
    marker = folder / "marker"
    checkpoint = torch.load(trained_run.out / "last.ckpt", map_location="cpu", weights_only=False)
    checkpoint["callbacks"]["payload"] = Payload(marker)
    torch.save(checkpoint, folder / "evil.ckpt")
    weights = torch.load(trained_run.out / "model_final.pth", map_location="cpu")
    weights["note"] = Payload(marker)
    torch.save(weights, folder / "evil.pth")
    # The payload is real: full pickle runs it.
    torch.load(folder / "evil.pth", weights_only=False)
    assert marker.exists()
    marker.unlink()
    return {"ckpt": folder / "evil.ckpt", "pth": folder / "evil.pth", "marker": marker}


def assert_refused(done, evil, path):
    assert done.returncode == 2, done.stderr[-3000:]
    assert not evil["marker"].exists(), "the payload ran"
    assert "reading it would run code" in done.stderr, done.stderr[-3000:]
    assert "Python object io.open" in done.stderr and os.path.basename(path) in done.stderr


@pytest.mark.parametrize("kind", ["ckpt", "pth"])
def test_predict_refuses_weights_that_would_run_code(trained_run, evil, kind, tmp_path):
    image = trained_run.data / "alrp_synthetic" / "tiny_val" / "00000.png"
    output = tmp_path / "predictions"
    done = python_module(
        "alrp_d2.predict",
        "--config-file",
        trained_run.out / "config.yaml",
        "--weights",
        evil[kind],
        "--input",
        image,
        "--output",
        output,
        "--device",
        "cpu",
    )
    assert_refused(done, evil, evil[kind])
    assert not output.exists()


@pytest.mark.parametrize("kind", ["ckpt", "pth"])
def test_eval_only_refuses_weights_that_would_run_code(trained_run, evil, kind):
    before = folder_state(trained_run.out)
    done = train_net(
        "--config-file",
        TINY,
        "--eval-only",
        "MODEL.WEIGHTS",
        evil[kind],
        "OUTPUT_DIR",
        trained_run.out,
        env_root=trained_run.data,
    )
    assert_refused(done, evil, evil[kind])
    assert folder_state(trained_run.out) == before


@pytest.mark.parametrize("kind", ["ckpt", "pth"])
def test_training_refuses_initial_weights_that_would_run_code(trained_run, evil, kind, tmp_path):
    out = tmp_path / "out"
    done = train_net(
        "--config-file",
        TINY,
        "--accelerator",
        "cpu",
        "DATASETS.TEST",
        "()",
        "MODEL.WEIGHTS",
        evil[kind],
        "OUTPUT_DIR",
        out,
        env_root=trained_run.data,
    )
    assert_refused(done, evil, evil[kind])
    assert not out.exists()


def test_resume_refuses_a_checkpoint_that_would_run_code(trained_run, evil, tmp_path):
    """A planted last.ckpt in a shared run folder: refused, not skipped for an older one."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.yaml", "last.prev.ckpt"):
        (out / name).write_bytes((trained_run.out / name).read_bytes())
    (out / "last.ckpt").write_bytes(evil["ckpt"].read_bytes())
    before = folder_state(out)
    done = train_net(
        "--config-file",
        TINY,
        "--accelerator",
        "cpu",
        "--resume",
        "--logger",
        "csv",
        *TRAINING,
        "OUTPUT_DIR",
        out,
        env_root=trained_run.data,
    )
    assert_refused(done, evil, out / "last.ckpt")
    assert "--resume" in done.stderr
    assert folder_state(out) == before


def test_lightning_reads_a_resumed_checkpoint_without_pickle(trained_run, evil):
    """What trainer.fit(ckpt_path=...) calls: the run's CheckpointIO, even when Lightning
    asks for full pickle."""
    from alrp_d2.engine.checkpoint import AtomicCheckpointIO
    from alrp_d2.io import UnsafeFileError

    io = AtomicCheckpointIO()
    state = io.load_checkpoint(trained_run.out / "last.ckpt", weights_only=False)
    assert {"state_dict", "loops", "optimizer_states", "alrp_d2"} <= set(state)
    with pytest.raises(UnsafeFileError, match="io.open"):
        io.load_checkpoint(evil["ckpt"], weights_only=False)
    assert not evil["marker"].exists()


def test_every_checkpoint_the_project_writes_loads_strictly(trained_run):
    from detectron2.modeling import build_model

    from alrp_d2.config import get_cfg
    from alrp_d2.weights import load_weights

    cfg = get_cfg()
    cfg.merge_from_file(str(trained_run.out / "config.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    final = torch.load(trained_run.out / "model_final.pth", map_location="cpu")["model"]
    files = ["model_final.pth", "model_best.pth", "last.ckpt", "last.prev.ckpt"]
    for name in files:
        model = build_model(cfg)
        extra = load_weights(model, str(trained_run.out / name), strict=True)
        if name == "model_best.pth":
            assert VAL in extra["lrp_thresholds"]
        if name in ("model_final.pth", "last.ckpt"):
            for key, value in model.state_dict().items():
                assert torch.equal(value, final[key].to(value.dtype)), (name, key)


def test_detectron2_pickles_still_load(tmp_path):
    """Detectron2's model-zoo format (.pkl, numpy arrays): read by Detectron2 as before."""
    from detectron2.modeling import build_model

    from alrp_d2.config import get_cfg
    from alrp_d2.weights import load_weights

    cfg = get_cfg()
    cfg.merge_from_file(TINY)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    arrays = {
        k: np.array(v.detach().numpy() + 1.0)
        for k, v in model.state_dict().items()
        if v.dtype == torch.float32
    }
    path = tmp_path / "zoo.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "test"}, f)
    fresh = build_model(cfg)
    load_weights(fresh, str(path), strict=False)
    for key, array in arrays.items():
        assert np.array_equal(fresh.state_dict()[key].numpy(), array), key


def test_a_checkpoint_in_a_newer_pickle_protocol_is_refused_not_skipped(trained_run, tmp_path):
    """Protocol 4 instructions the weights-only reader does not take (and that may name
    objects): refused as unsafe, so --resume stops instead of taking an older checkpoint."""
    from alrp_d2.engine.resume import find_resume_checkpoint
    from alrp_d2.io import UnsafeFileError, safe_load

    marker = tmp_path / "marker"
    checkpoint = torch.load(trained_run.out / "last.ckpt", map_location="cpu", weights_only=False)
    checkpoint["callbacks"]["payload"] = Payload(marker)
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.prev.ckpt").write_bytes((trained_run.out / "last.prev.ckpt").read_bytes())
    torch.save(checkpoint, out / "last.ckpt", pickle_protocol=4)
    with pytest.raises(UnsafeFileError, match="could run code"):
        safe_load(out / "last.ckpt")
    with pytest.raises(UnsafeFileError):
        find_resume_checkpoint(str(out))
    assert not marker.exists()


def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path):
    from alrp_d2.io import UnsafeFileError, safe_load

    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(pickle.UnpicklingError, match="not a file that torch.save wrote") as err:
        safe_load(path)
    assert not isinstance(err.value, UnsafeFileError)
