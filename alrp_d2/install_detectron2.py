"""Install Detectron2 from its official repository when it is not importable yet.

    python -m alrp_d2.install_detectron2 [--commit SHA] [--strict]

Detectron2 is not published on PyPI; it is built from source against the installed
torch (``--no-build-isolation``).  Where the repository cannot be reached, this
prints what to do and exits 0 (``--strict``: exits 1), so that a set-up command that
chains it does not fail: everything else of alrp_d2 works, and the tests that need
Detectron2 are skipped with that reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import subprocess
import sys
from urllib.parse import urlparse

REPOSITORY = "https://github.com/facebookresearch/detectron2.git"
# The upstream commit this project is tested with (also pinned in docker/Dockerfile).
PINNED_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"


def detectron2_importable() -> bool:
    if importlib.util.find_spec("detectron2") is None:
        return False
    probe = "import detectron2, detectron2._C"  # the C++ ops, which broken forks lack
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def reachable(url: str, timeout: float = 10.0) -> bool:
    """Whether the repository's host accepts a connection (a closed network often
    drops packets rather than refusing them, which would leave git hanging)."""
    host = urlparse(url).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commit", default=PINNED_COMMIT, help="upstream commit or tag to build")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the install fails")
    args = parser.parse_args(argv)

    if detectron2_importable():
        print("detectron2 is already installed and importable; nothing to do.")
        return 0
    url = f"git+{REPOSITORY}@{args.commit}"
    if reachable(REPOSITORY):
        print(f"Building detectron2 from {url} (a few minutes on CPU) ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", url]
        installed = subprocess.run(cmd).returncode == 0 and detectron2_importable()
    else:
        installed = False
    if installed:
        print("detectron2 installed.")
        return 0
    print(
        "\n" + "!" * 78 + "\n"
        "WARNING: detectron2 could not be installed from its official repository\n"
        f"({REPOSITORY} unreachable or the build failed).\n"
        "alrp_d2.losses, alrp_d2.evaluation and the toy example work without it; the\n"
        "models, train_net.py and their tests need it (those tests are skipped).\n"
        "Install it later with:\n"
        f"  python -m pip install --no-build-isolation '{url}'\n"
        "or from a local clone: python -m pip install --no-build-isolation ./detectron2\n"
        + "!"
        * 78,
        file=sys.stderr,
    )
    return 1 if args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
