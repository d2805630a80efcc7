"""A command for tests/test_warm_start.py: prints what it was given (one JSON line) and a
line to stderr, then ends as ``EXIT_WITH`` says: an exit code or message, ``raise``, ``sleep`` (a
minute) or ``kill`` (SIGKILL to itself). Its torch seed only with ``SEED`` set: torch is
imported then, which takes seconds in a fresh interpreter."""

import json
import os
import signal
import sys
import time

import __main__

print(
    json.dumps(
        {
            "argv": sys.argv,
            "cwd": os.getcwd(),
            "path0": sys.path[0],
            "path1": sys.path[1],
            "write_through": sys.stdout.write_through,
            "only_here": os.environ.get("ONLY_HERE"),
            "home": os.environ.get("HOME"),
            "name": __name__,
            "spec": getattr(__main__.__spec__, "name", None),
            "seed": __import__("torch").initial_seed() if os.environ.get("SEED") else None,
            "executable": sys.executable,
            "pid": os.getpid(),
        }
    ),
    flush=True,
)
print("to stderr", file=sys.stderr, flush=True)
code = os.environ.get("EXIT_WITH")
if code == "raise":
    raise ValueError("the probe's error")
if code == "sleep":
    time.sleep(60)
if code == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(code) if code and code.isdigit() else code)  # a message exits 1
