"""The warm start of the tests' commands (tests/warm_start.py) gives a command what a fresh
interpreter gives it: arguments, working directory, environment, import path, ``__main__``,
output, exit status, its own session and fresh random seeds."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import warm_start

PROBE = """
import json, os, sys, __main__
import torch
print(json.dumps({
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "path0": sys.path[0],
    "only_here": os.environ.get("ONLY_HERE"),
    "home": os.environ.get("HOME"),
    "name": __name__,
    "spec": getattr(__main__.__spec__, "name", None),
    "seed": torch.initial_seed(),
}))
print("to stderr", file=sys.stderr)
code = os.environ.get("EXIT_WITH")
if code == "raise":
    raise ValueError("the probe's error")
if code == "sleep":
    import time
    time.sleep(60)
sys.exit(int(code or 0))
"""


@pytest.fixture()
def probe(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    return tmp_path


def env(**extra):
    base = {k: v for k, v in os.environ.items() if k != "HOME"}
    return dict(base, PYTHONWARNINGS="ignore", **extra)


def both(argv, cwd, **extra):
    assert warm_start.can_start(env(**extra)) or warm_start.cold()
    warm = warm_start.run(argv, cwd=cwd, env=env(**extra), timeout=60)
    fresh = subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env(**extra), capture_output=True, text=True
    )
    return warm, fresh


def test_a_script_sees_what_a_fresh_interpreter_gives_it(probe, tmp_path):
    argv = [str(probe / "probe.py"), "--flag", "value with spaces"]
    warm, fresh = both(argv, cwd=tmp_path, ONLY_HERE="yes", EXIT_WITH="3")
    assert warm.returncode == fresh.returncode == 3
    assert warm.stderr.strip().endswith("to stderr") and "to stderr" not in warm.stdout
    seen, expected = json.loads(warm.stdout), json.loads(fresh.stdout)
    assert seen.pop("seed") != expected.pop("seed")
    assert seen == expected
    assert seen["spec"] is None and seen["name"] == "__main__" and seen["home"] is None
    assert seen["path0"] == str(probe) and seen["only_here"] == "yes"


def test_a_module_run_with_dash_m_sees_its_spec_and_the_working_directory(probe):
    warm, fresh = both(["-m", "probe", "x"], cwd=probe)
    assert warm.returncode == fresh.returncode == 0, warm.stderr
    seen, expected = json.loads(warm.stdout), json.loads(fresh.stdout)
    seen.pop("seed"), expected.pop("seed")
    assert seen == expected and seen["spec"] == "probe"


def test_an_uncaught_error_exits_1_with_its_traceback(probe):
    warm, fresh = both([probe / "probe.py"], cwd=probe, EXIT_WITH="raise")
    assert warm.returncode == fresh.returncode == 1
    assert "ValueError: the probe's error" in warm.stderr


def test_two_commands_draw_different_seeds(probe):
    seeds = {
        json.loads(warm_start.run([probe / "probe.py"], cwd=probe, env=env(), timeout=60).stdout)[
            "seed"
        ]
        for _ in range(2)
    }
    assert len(seeds) == 2


def test_a_killed_command_reports_the_signal_and_a_timeout_raises(probe):
    if warm_start.cold():
        pytest.skip("ALRP_TESTS_COLD: no warm start")
    log = probe / "log"
    log.write_text("")
    proc = warm_start.start(
        [probe / "probe.py"], cwd=probe, env=env(EXIT_WITH="sleep"), stdout=log, stderr=log
    )
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.5)
    deadline = time.time() + 60
    while "to stderr" not in log.read_text():
        assert time.time() < deadline and proc.poll() is None, log.read_text()
        time.sleep(0.1)
    assert os.getsid(proc.pid) == proc.pid  # its own session
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    with pytest.raises(subprocess.TimeoutExpired):
        warm_start.run([probe / "probe.py"], cwd=probe, env=env(EXIT_WITH="sleep"), timeout=2)


def test_an_environment_the_server_cannot_give_starts_a_fresh_interpreter(probe):
    assert not warm_start.can_start(env(PYTHONPATH="/elsewhere"))
    assert not warm_start.can_start(dict(env(), PYTHONWARNINGS="default"))


def test_the_server_ends_with_the_process_that_started_it(tmp_path):
    """Even when that process ends without its atexit functions (as a pytest-xdist worker
    may): no server left behind after the tests."""
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); import warm_start; "
        "warm_start.server(); print(warm_start._server['process'].pid, flush=True); os._exit(0)"
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        [sys.executable, "-c", code, tests], capture_output=True, text=True, timeout=120
    )
    server_pid = int(done.stdout.split()[0])
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    pytest.fail(f"the warm-start server {server_pid} outlived its parent")
