"""A refactor keeps the numbers: one training step of every config under configs/ gives the
losses and gradients recorded before it (tests/golden_steps.py; float64 to a relative
1e-10, float32 to 1e-5).

A gradient is compared by its sum, norm and a random projection, relative to its norm; a
loss relative to its value. Re-record (python tests/golden_steps.py) only for a change
meant to change the numbers, and say so in the commit.

The numbers depend on the machine too (torch's version, the CPU's vector instructions: a
Rank & Sort label from a float32 IoU one ulp apart moves float64 losses by 1e-9, and float32
rankings of near ties reorder). On another machine than the recording's the comparison is
loose (float64 1e-6, float32 1e-2: a refactor's mistake still shows, rounding does not) and
says so; re-record there before a refactor to compare strictly.
"""

import json
import os

import pytest
from golden_steps import (
    CONFIGS,
    DTYPES,
    GOLDEN,
    STATE_KEYS,
    config_name,
    machine,
    state_dict_keys,
    training_step,
)

pytestmark = pytest.mark.detectron2

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
OTHER_MACHINE_TOLERANCE = {"float64": 1e-6, "float32": 1e-2}


# The fast lane takes the quickstart configs (every dense detector and loss on a small
# backbone) in float64; the full run every config in both precisions.
def fast(name, dtype="float64"):
    return name.startswith("quickstart/") and dtype == "float64"


with open(GOLDEN) as f:
    RECORDED = json.load(f)["configs"]

CASES = [
    pytest.param(
        name,
        dtype,
        marks=[] if fast(name, dtype) else [pytest.mark.slow],
        id=f"{name}-{dtype}",
    )
    for name in sorted(RECORDED)
    for dtype in sorted(DTYPES)
    if dtype in RECORDED[name]
]


def test_every_config_is_recorded():
    assert sorted(config_name(p) for p in CONFIGS) == sorted(RECORDED)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, id=config_name(p), marks=[] if fast(config_name(p)) else pytest.mark.slow)
        for p in CONFIGS
    ],
)
def test_checkpoints_written_before_load(path):
    """Every config's model holds the state_dict keys and shapes recorded before the single
    ranking-loss classes (a checkpoint of then loads strictly now)."""
    with open(STATE_KEYS) as f:
        before = json.load(f)[config_name(path)]
    assert state_dict_keys(path) == before


@pytest.mark.parametrize("name,dtype", CASES)
def test_training_step_keeps_the_recorded_numbers(name, dtype):
    expected = RECORDED[name][dtype]
    path = os.path.join(os.path.dirname(GOLDEN), os.pardir, os.pardir, "configs", name)
    got = training_step(path, DTYPES[dtype])
    tol = TOLERANCE[dtype]
    if RECORDED[name]["machine"] != machine():
        tol = OTHER_MACHINE_TOLERANCE[dtype]
        print(
            f"{name} {dtype}: recorded on {RECORDED[name]['machine']!r}, running on "
            f"{machine()!r}: compared to {tol:g}"
        )
    assert sorted(got["losses"]) == sorted(expected["losses"])
    for key, value in expected["losses"].items():
        assert got["losses"][key] == pytest.approx(value, rel=tol, abs=tol), key
    assert sorted(got["grads"]) == sorted(expected["grads"])
    for key, (total, norm, projection) in expected["grads"].items():
        scale = max(norm, 1e-30)
        g_total, g_norm, g_projection = got["grads"][key]
        assert abs(g_norm - norm) <= tol * scale, (key, g_norm, norm)
        assert abs(g_total - total) <= tol * scale * 10, (key, g_total, total)
        assert abs(g_projection - projection) <= tol * scale * 10, (key, g_projection, projection)
