import fcntl
import importlib.util
import os
import pickle
import shutil
import sys

import pytest
from runs import tiny_training

# The naive reference implementations live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
DETECTRON2_MISSING = "detectron2 is missing (install it: python -m alrp_d2.install_detectron2)"
_skipped_for_detectron2 = set()


def pytest_configure(config):
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        # A worker of ``pytest -n``: the cores shared between the workers, torch's and the
        # started commands' (OMP_NUM_THREADS) threads too. Oversubscribed, OpenMP's threads
        # spin waiting for each other: the model modules took 624 s on 2 workers, 200 s so.
        import torch

        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    config.addinivalue_line("markers", "detectron2: the test needs detectron2 installed")
    config.addinivalue_line("markers", "slow: left out of the fast lane (pytest -m 'not slow')")


# The longest modules (a minute or more of the full run each), started first: ``pytest -n``
# hands whole modules to its workers (``--dist loadfile``, which keeps a module's fixtures
# in one process) in the order collected, and a long one started last ends the run alone.
LONGEST_FIRST = (
    "test_resume.py",
    "test_golden_steps.py",
    "test_model_e2e.py",
    "test_engine.py",
    "test_models.py",
    "test_own_data.py",
    "test_export.py",
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by mark
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: else as found
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


def pytest_runtest_logreport(report):
    # Counted from the reports, which reach the controller of ``pytest -n`` too (its
    # workers, not it, collect the tests).
    if report.skipped and DETECTRON2_MISSING in str(report.longrepr):
        _skipped_for_detectron2.add(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    count = len(_skipped_for_detectron2)
    line = f"SKIPPED BECAUSE DETECTRON2 IS MISSING: {count} tests"
    if count:
        terminalreporter.write_sep("!", line, red=True, bold=True)
    else:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The tiny training (tests/runs.py ``tiny_training``), once per test run, shared by
    every test that reads a trained run's folder (by every worker of ``pytest -n``); a test
    must not change its files."""
    run = once_per_run(tmp_path_factory, "trained", tiny_training)
    assert run.done.returncode == 0, run.done.stderr[-3000:]
    return run


def once_per_run(tmp_path_factory, name, produce):
    """``produce(folder)`` once in the whole test run, its result kept in ``folder``: with
    pytest-xdist the first worker to ask produces it in the folder the workers share, the
    others wait for it and read it. ``produce`` returns a pickleable result."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return produce(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent  # the run's, above each worker's own
    folder, result = shared / name, shared / f"{name}.pickle"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
        if not result.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed left
            folder.mkdir()
            produced = produce(folder)
            result.write_bytes(pickle.dumps(produced))
            return produced
    return pickle.loads(result.read_bytes())
