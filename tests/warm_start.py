"""The project's commands started from a warm process, for the tests that run them.

A test that runs ``python train_net.py ...`` waits 6 to 10 seconds on the 2-core
development machine for torch, torchvision and Lightning to be imported (measured idle)
before the command does anything, and the suite starts about a hundred such commands. The
server here imports those once, then forks a process per command; the child becomes that
command (``python SCRIPT ARGS`` or ``python -m MODULE ARGS``): the test's environment,
working directory, ``PYTHONPATH`` and output files, its own session if asked, the script run
as ``__main__`` (as the interpreter does, so Lightning starts the other DDP processes with
the same command line), then the interpreter's exit: non-daemon threads joined, ``atexit``
functions run, output flushed, the exit status or the signal it died of. The modules are
not torn down (as ``os._exit``): in a forked process that copies every object's page, 2.4 s
of CPU with torch loaded.

The commands a command starts with ``sys.executable`` (Lightning's other DDP ranks,
torchrun's workers, the GPU check's quickstart) start warm too: ``sys.executable`` is the
server's interpreter script, which forwards the project's commands to the server with its
standard streams, passes signals on and exits as the command did (a command it forwards
is killed when it dies), and runs anything else with the real interpreter.

Only modules that read nothing of the environment when imported are preloaded: Detectron2's
``detectron2.data`` registers its datasets under ``DETECTRON2_DATASETS`` at import, so it is
imported by each child, as in a fresh interpreter.

``ALRP_TESTS_COLD=1`` starts every command as a fresh interpreter instead (as a user does).

    python tests/warm_start.py SOCKET        # the server (started by ``server()``)
"""

import atexit
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile

# The modules the server imports (``WARM_START_PRELOAD``, comma-separated, in place of these).
PRELOAD = os.environ.get("WARM_START_PRELOAD", "torch,torchvision,pytorch_lightning")


# ---------------------------------------------------------------- the server and its children


def serve(path):
    """Accept one request per connection and fork a supervisor for it, which forks the
    command's process, sends its pid, waits for it and sends its wait status; the command is
    killed if the connection closes first (its client died). Returns only in a command's
    process, with its request and the standard streams the client sent, if any."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    write_interpreter(path)
    # Ended with the tests' process, even where it could not stop it (a pytest-xdist worker
    # may end without running its atexit functions).
    listener.settimeout(2.0)
    parent = os.getppid()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if os.getppid() != parent:
                sys.exit(0)
            _reap()
            continue
        conn.setblocking(True)
        _reap()
        if os.fork() != 0:
            conn.close()
            continue
        listener.close()  # the supervisor
        _, streams, _, _ = socket.recv_fds(conn, 1, 3)
        request = json.loads(conn.makefile("r").readline())
        pid = os.fork()
        if pid == 0:
            conn.close()
            return request, streams
        for fd in streams:
            os.close(fd)
        conn.sendall(struct.pack("!q", pid))
        _supervise(conn, pid)
        os._exit(0)


def _supervise(conn, pid):
    """Wait for process ``pid`` and send its wait status on ``conn``; kill it if ``conn``
    closes first."""
    try:
        process = os.pidfd_open(pid)  # readable when it ends (Linux 5.3)
    except (AttributeError, OSError):
        process = None  # else looked at every 50 ms
    watched = [conn] + ([process] if process is not None else [])
    while True:
        ready = select.select(watched, [], [], None if process is not None else 0.05)[0]
        if conn in ready:
            try:
                closed = not conn.recv(1)
            except OSError:
                closed = True
            if closed:
                os.kill(pid, signal.SIGKILL)
                watched.remove(conn)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
    try:
        conn.sendall(struct.pack("!q", status))
    except OSError:
        pass  # the client is gone


def _reap():
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def become(request, streams, socket_path):
    """Turn this forked process into ``request["argv"]`` run by a fresh interpreter, its
    standard streams ``streams`` (sent by a client) or else the request's files."""
    if request["new_session"]:
        os.setsid()
    os.chdir(request["cwd"])
    extra_path = added_path(request["env"], os.environ, _imported())
    os.environ.clear()
    os.environ.update(request["env"])
    if not streams:
        streams = [
            os.open(name, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            for fd, name in ((0, os.devnull), (1, request["stdout"]), (2, request["stderr"]))
        ]
    for fd, target in enumerate(streams):
        os.dup2(target, fd)
        os.close(target)
    if os.environ.get("PYTHONUNBUFFERED"):  # as ``python -u``
        import io

        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            raw = io.FileIO(stream.fileno(), "w", closefd=False)
            wrapper = io.TextIOWrapper(raw, stream.encoding, stream.errors, write_through=True)
            setattr(sys, name, wrapper)
    # The command's own commands (the other DDP processes Lightning starts with
    # ``sys.executable``) start warm too, through the server's interpreter script.
    sys.executable = interpreter_path(socket_path)
    # A fresh interpreter draws its generators' seeds anew; Python's random does so at fork.
    import numpy
    import torch

    torch.seed()
    numpy.random.seed()
    argv = request["argv"]
    import runpy

    sys.path[1:1] = extra_path or []  # after the script's folder, as PYTHONPATH's entries go
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy._run_module_as_main(argv[1], alter_argv=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        end(stop.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        end(0, signal.SIGINT)  # as the interpreter does: killed by the SIGINT it did not handle
    except BaseException:
        sys.excepthook(*sys.exc_info())
        end(1)
    end(0)


def end(code, signum=None):
    """End as the interpreter ends (after its non-daemon threads, its ``atexit`` functions,
    with its output flushed; ``code`` as ``sys.exit`` takes it), without tearing its modules
    down: with torch loaded that takes over 2 seconds of CPU in a forked process, whose
    every object's page it copies."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if signum is not None:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    os._exit((code or 0) & 0xFF)


# ---------------------------------------------------------------------------- the client

# The repository (tests/runs.py and the tests take it from here).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a client passes on to its command: what Lightning's launcher and a cluster send.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _imported():
    return {name.partition(".")[0] for name in sys.modules}


def server_modules(socket_path):
    """The packages the server at ``socket_path`` imported."""
    with open(os.path.join(os.path.dirname(socket_path), "modules.json")) as f:
        return json.load(f)


def interpreter_path(socket_path):
    return os.path.join(os.path.dirname(socket_path), "python")


def write_interpreter(socket_path):
    """An executable that runs a command as ``python`` does, warm when it is one of the
    project's: the ``sys.executable`` of the server's commands."""
    path = interpreter_path(socket_path)
    reference = {k: os.environ[k] for k in ("PYTHONPATH", "PYTHONHASHSEED") if k in os.environ}
    with open(os.path.join(os.path.dirname(socket_path), "modules.json"), "w") as f:
        json.dump(sorted(_imported()), f)
    tests = os.path.dirname(os.path.abspath(__file__))
    with open(path, "w") as f:
        f.write(
            f"#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {tests!r})\n"
            f"import warm_start\nwarm_start.forward({socket_path!r}, {sys.executable!r}, "
            f"{reference!r})\n"
        )
    os.chmod(path, 0o755)


def forward(socket_path, python, reference):
    """``python ARGS`` (``sys.argv[1:]``) from the server at ``socket_path`` when it is one
    of the project's commands and the server can give it its environment, with this
    process's standard streams, the signals in ``FORWARDED`` passed on and its exit status
    (or its killing signal) as this process's; else ``python`` itself, exec'ed."""
    argv = given = sys.argv[1:]
    env = dict(os.environ)
    if argv[:1] == ["-u"]:  # as torchrun starts its workers
        argv, env["PYTHONUNBUFFERED"] = argv[1:], "1"
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        modules = server_modules(socket_path)
        if not (_project_command(argv) and can_start(env, reference, modules)):
            raise ConnectionRefusedError
        conn.connect(socket_path)
    except OSError:
        os.execv(python, [python, *given])
    proc = _request(conn, dict(argv=argv, cwd=os.getcwd(), env=env, new_session=False), [0, 1, 2])

    def pass_on(signum, _):
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, pass_on)
    code = proc.wait()
    if code < 0:
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _project_command(argv):
    if argv[:1] == ["-m"]:
        return len(argv) > 1 and argv[1].split(".")[0] == "alrp_d2"
    return bool(argv) and os.path.abspath(argv[0]).startswith(ROOT + os.sep)


class WarmProcess:
    """A command started warm, as much of ``subprocess.Popen`` as the tests use."""

    def __init__(self, conn):
        self._conn = conn
        self.pid = self._read(None)
        self.returncode = None

    def _read(self, timeout):
        self._conn.settimeout(timeout)
        data = b""
        while len(data) < 8:
            chunk = self._conn.recv(8 - len(data))
            if not chunk:
                raise RuntimeError("the warm-start server closed the connection")
            data += chunk
        return struct.unpack("!q", data)[0]

    def wait(self, timeout=None):
        if self.returncode is None:
            try:
                status = self._read(timeout)
            except TimeoutError:
                raise subprocess.TimeoutExpired(f"process {self.pid}", timeout) from None
            self.returncode = os.waitstatus_to_exitcode(status)
            self._conn.close()
        return self.returncode

    def poll(self):
        try:
            return self.wait(0.001)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)


_server = {}


def cold():
    return os.environ.get("ALRP_TESTS_COLD", "") not in ("", "0")


def server():
    """The socket of this process's server, started on first use and ended at exit."""
    if "socket" not in _server:
        folder = tempfile.mkdtemp(prefix="warm-start-")
        path = os.path.join(folder, "socket")
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), path],
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
            stdout=subprocess.PIPE,
            text=True,
        )
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the warm-start server did not start (exit {proc.wait()})")
        atexit.register(_stop, proc, folder)
        _server.update(socket=path, process=proc)
    return _server["socket"]


def _stop(proc, folder):
    proc.terminate()
    proc.wait()
    proc.stdout.close()
    for name in os.listdir(folder):
        os.unlink(os.path.join(folder, name))
    os.rmdir(folder)


def can_start(env, reference=os.environ, modules=None):
    """Whether a command with environment ``env`` can start warm: the interpreter options
    read from the environment at start-up must be the server's (``reference``'s), its
    ``PYTHONPATH`` the server's or folders in front of it (``added_path``)."""
    same = env.get("PYTHONHASHSEED") == reference.get("PYTHONHASHSEED")
    return (
        not cold()
        and same
        and added_path(env, reference, modules) is not None
        and env.get("PYTHONWARNINGS") == "ignore"
    )


def added_path(env, reference, modules=None):
    """The folders ``env``'s PYTHONPATH puts in front of ``reference``'s, where the rest is
    ``reference``'s and none of them holds one of the packages ``modules`` (by default
    the server's: what it imported, a fresh interpreter would take from there); else
    None."""
    theirs, ours = (
        [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p] for e in (env, reference)
    )
    front = theirs[: len(theirs) - len(ours)]
    if theirs[len(front) :] != ours:
        return None
    if front and modules is None:
        modules = server_modules(server())
    for folder in front:
        for module in modules:
            if any(os.path.exists(os.path.join(folder, module + end)) for end in ("", ".py")):
                return None
    return front


def start(argv, *, cwd, env, stdout, stderr, new_session=True, fresh=False):
    """``python ARGV`` (``argv`` as after ``python``: a script or ``-m MODULE``, then its
    arguments), its output appended to the files ``stdout`` and ``stderr``; in its own
    session (as ``Popen(start_new_session=True)``), or else in the process group of the
    server (the tests', which a Ctrl-C reaches). From the warm server where
    ``can_start(env)``, unless ``fresh``; else a fresh interpreter (a ``Popen``)."""
    argv = [str(a) for a in argv]
    if fresh or not can_start(env):
        with open(stdout, "a") as out, open(stderr, "a") as err:
            return subprocess.Popen(
                [sys.executable, *argv],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=new_session,
            )
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(server())
    request = dict(argv=argv, cwd=str(cwd), env=env, stdout=str(stdout), stderr=str(stderr))
    return _request(conn, dict(request, new_session=new_session))


def _request(conn, request, streams=()):
    """Send ``request`` on ``conn`` (connected to the server), with the standard streams
    ``streams`` (file descriptors) or, without them, the files it names (``serve`` reads
    one byte with the descriptors, then the request's line): the started command."""
    socket.send_fds(conn, [b"F" if streams else b"N"], list(streams))
    conn.sendall((json.dumps(request) + "\n").encode())
    return WarmProcess(conn)


def run(argv, *, cwd, env, timeout, fresh=False):
    """As ``subprocess.run([sys.executable, *argv], capture_output=True, text=True)``, the
    process started by :func:`start`."""
    with tempfile.TemporaryDirectory(prefix="warm-run-") as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        proc = start(argv, cwd=cwd, env=env, stdout=out, stderr=err, new_session=False, fresh=fresh)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        with open(out) as f_out, open(err) as f_err:
            stdout, stderr = f_out.read(), f_err.read()
    return subprocess.CompletedProcess([sys.executable, *argv], code, stdout, stderr)


if __name__ == "__main__":
    for module in filter(None, PRELOAD.split(",")):
        __import__(module)
    become(*serve(sys.argv[1]), sys.argv[1])
