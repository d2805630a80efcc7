"""The warm start of the tests' commands (tests/warm_start.py) gives a command what a fresh
interpreter gives it: arguments, working directory, environment, import path, ``__main__``,
output, exit status, its own session and fresh random seeds."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import warm_start

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warm_probe.py")


@pytest.fixture()
def probe(tmp_path):
    """The probe copied outside the project (a command the tests' interpreter starts as
    ``python`` does, never warm)."""
    shutil.copy(PROBE, tmp_path / "probe.py")
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
    seen.pop("pid"), expected.pop("pid")
    assert expected.pop("executable") == sys.executable
    # Its commands run through the server's interpreter script (test_the_interpreter...).
    assert seen.pop("executable") == interpreter() or warm_start.cold()
    assert seen == expected
    assert seen["spec"] is None and seen["name"] == "__main__" and seen["home"] is None
    assert seen["path0"] == str(probe) and seen["only_here"] == "yes"


def test_a_module_run_with_dash_m_sees_its_spec_and_the_working_directory(probe):
    warm, fresh = both(["-m", "probe", "x"], cwd=probe)
    assert warm.returncode == fresh.returncode == 0, warm.stderr
    seen, expected = json.loads(warm.stdout), json.loads(fresh.stdout)
    for key in ("pid", "executable"):
        seen.pop(key), expected.pop(key)
    assert seen == expected and seen["spec"] == "probe"


@pytest.mark.parametrize(
    "end,printed", [("raise", "ValueError: the probe's error"), ("a message", "a message")]
)
def test_an_uncaught_error_or_an_exit_message_exits_1_and_prints_it(probe, end, printed):
    warm, fresh = both([probe / "probe.py"], cwd=probe, EXIT_WITH=end)
    assert warm.returncode == fresh.returncode == 1
    assert printed in warm.stderr and printed in fresh.stderr


def test_two_commands_draw_different_seeds(probe):
    """Not the server's seed, which they would share."""
    argv, seed = [probe / "probe.py"], env(SEED="1")
    seeds = {
        json.loads(warm_start.run(argv, cwd=probe, env=seed, timeout=60).stdout)["seed"]
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
    assert not warm_start.can_start(env(PYTHONHASHSEED="7"))
    assert not warm_start.can_start(dict(env(), PYTHONWARNINGS="default"))
    if os.environ.get("PYTHONPATH"):  # the server's, replaced
        assert not warm_start.can_start(env(PYTHONPATH="/elsewhere"))


def test_the_server_ends_with_the_process_that_started_it(tmp_path):
    """Even when that process ends without its atexit functions (as a pytest-xdist worker
    may): no server left behind after the tests."""
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); import warm_start; "
        "warm_start.server(); print(warm_start._server['process'].pid, flush=True); os._exit(0)"
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        [sys.executable, "-c", code, tests],
        env=dict(os.environ, WARM_START_PRELOAD=""),  # a quick server
        capture_output=True,
        text=True,
        timeout=120,
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


def interpreter():
    if warm_start.cold():
        pytest.skip("ALRP_TESTS_COLD: no warm start")
    return warm_start.interpreter_path(warm_start.server())


def test_the_interpreter_of_warm_commands_starts_the_projects_commands_warm(probe):
    """What Lightning's DDP launcher starts as ``sys.executable SCRIPT ARGS`` (the other
    ranks) starts warm when it is the project's; anything else runs the interpreter."""
    python = interpreter()
    done = subprocess.run(
        [python, PROBE, "an argument"], env=env(ONLY_HERE="yes"), capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stderr.strip().endswith("to stderr"), done.stderr
    seen = json.loads(done.stdout)
    assert seen["executable"] == python  # started by the server
    assert seen["argv"] == [PROBE, "an argument"] and seen["only_here"] == "yes"
    outside = subprocess.run(
        [python, probe / "probe.py"], env=env(), capture_output=True, text=True
    )
    assert json.loads(outside.stdout)["executable"] == sys.executable
    code = subprocess.run(
        [python, "-u", "-c", "import sys; print(sys.executable, sys.stdout.write_through)"],
        capture_output=True,
        text=True,
    )
    assert code.stdout.split() == [sys.executable, "True"]  # -u kept


def test_a_pythonpath_in_front_and_dash_u_as_a_fresh_interpreter_takes_them(tmp_path):
    """As ``PYTHONPATH=FOLDER:... python -u SCRIPT`` (what torchrun and the GPU check's
    run.sh start); a folder that holds a package the server imported starts fresh."""
    python = interpreter()
    front = tmp_path / "front"
    front.mkdir()
    path = os.pathsep.join(filter(None, [str(front), os.environ.get("PYTHONPATH")]))
    runs = [
        subprocess.run([exe, "-u", PROBE], env=env(PYTHONPATH=path), capture_output=True, text=True)
        for exe in (python, sys.executable)
    ]
    seen, expected = (json.loads(done.stdout) for done in runs)
    assert seen.pop("executable") == python and expected.pop("executable") == sys.executable
    seen.pop("pid"), expected.pop("pid")
    assert seen == expected
    assert seen["path1"] == str(front) and seen["write_through"]
    assert warm_start.can_start(env(PYTHONPATH=path))
    (front / "torch").mkdir()
    assert not warm_start.can_start(env(PYTHONPATH=path))


def test_the_interpreter_passes_on_exit_codes_signals_and_its_own_death():
    python = interpreter()
    exited = subprocess.run([python, PROBE], env=env(EXIT_WITH="3"), capture_output=True)
    assert exited.returncode == 3
    killed = subprocess.run([python, PROBE], env=env(EXIT_WITH="kill"), capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    for signum in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(
            [python, PROBE], env=env(EXIT_WITH="sleep"), stdout=subprocess.PIPE, text=True
        )
        command = json.loads(proc.stdout.readline())["pid"]
        assert command != proc.pid  # the command is the server's child
        proc.send_signal(signum)  # SIGTERM passed on; SIGKILL seen by the server
        assert proc.wait(30) == -signum
        proc.stdout.close()
        deadline = time.time() + 30
        while True:
            try:
                os.kill(command, 0)
            except ProcessLookupError:
                break
            assert time.time() < deadline, f"the command {command} outlived its interpreter"
            time.sleep(0.05)
