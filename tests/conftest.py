import importlib.util
import os
import sys

import pytest
from runs import tiny_training

# The naive reference implementations live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
DETECTRON2_MISSING = "detectron2 is missing (install it: python -m alrp_d2.install_detectron2)"
_skipped_for_detectron2 = []


def pytest_configure(config):
    config.addinivalue_line("markers", "detectron2: the test needs detectron2 installed")
    config.addinivalue_line("markers", "slow: left out of the fast lane (pytest -m 'not slow')")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by mark
def pytest_collection_modifyitems(config, items):
    for item in items:
        # A test of the trained run waits for a training (``trained_run``): not fast.
        if "trained_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    if HAS_DETECTRON2:
        return
    skip = pytest.mark.skip(reason=DETECTRON2_MISSING)
    for item in items:
        if "detectron2" in item.keywords:
            item.add_marker(skip)
            _skipped_for_detectron2.append(item.nodeid)


def pytest_terminal_summary(terminalreporter):
    count = len(_skipped_for_detectron2)
    line = f"SKIPPED BECAUSE DETECTRON2 IS MISSING: {count} tests"
    if count:
        terminalreporter.write_sep("!", line, red=True, bold=True)
    else:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The tiny training (tests/runs.py ``tiny_training``), once per session, shared by
    every test that reads a trained run's folder; a test must not change its files."""
    run = tiny_training(tmp_path_factory.mktemp("trained"))
    assert run.done.returncode == 0, run.done.stderr[-3000:]
    return run
