"""Install Detectron2 from its official repository when it is not importable yet, and
the LVIS API (``lvis``) that its LVIS evaluator and loader import.

    python -m alrp_d2.install_detectron2 [--commit SHA] [--strict]

Detectron2 is not published on PyPI; it is built from source against the installed
torch (``--no-build-isolation``).  Where the repository cannot be reached, this
prints what to do and exits 0 (``--strict``: exits 1), so that a set-up command that
chains it does not fail: everything else of alrp_d2 works, and the tests that need
Detectron2 are skipped with that reason.

``lvis`` comes from PyPI without its dependencies (:data:`LVIS_PACKAGE`): it requires
``opencv-python``, whose ``cv2`` would overwrite that of the ``opencv-python-headless``
this project installs and needs the X11 and OpenGL libraries that servers often lack;
what ``lvis`` imports (numpy, matplotlib, pycocotools, cv2) is among this project's
dependencies. Where it cannot be installed, LVIS datasets cannot be read or evaluated
(their tests are skipped), the rest works.
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
# The LVIS API, PyPI's latest (also in docker/Dockerfile), installed with --no-deps.
LVIS_PACKAGE = "lvis==0.5.3"
LVIS_INSTALL = f'python -m pip install --no-deps "{LVIS_PACKAGE}"'


def detectron2_importable() -> bool:
    if importlib.util.find_spec("detectron2") is None:
        return False
    probe = "import detectron2, detectron2._C"  # the C++ ops, which broken forks lack
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def lvis_importable() -> bool:
    return importlib.util.find_spec("lvis") is not None


def install_lvis() -> bool:
    """``lvis`` from PyPI without its dependencies (module docstring) unless importable;
    whether it is importable afterwards (a warning saying how to install it if not)."""
    if lvis_importable():
        print("lvis is already installed; nothing to do.")
        return True
    print(f"Installing {LVIS_PACKAGE} without its dependencies ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", LVIS_PACKAGE]
    if subprocess.run(cmd).returncode == 0 and lvis_importable():
        print("lvis installed.")
        return True
    print(
        f"WARNING: {LVIS_PACKAGE} could not be installed: LVIS datasets cannot be read or"
        f" evaluated (their tests are skipped). Install it later with: {LVIS_INSTALL}",
        file=sys.stderr,
    )
    return False


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
    detectron2 = install_detectron2(args.commit)
    lvis = install_lvis()
    return 1 if args.strict and not (detectron2 and lvis) else 0


def install_detectron2(commit: str) -> bool:
    """Detectron2 at ``commit`` unless importable; whether it is importable afterwards
    (a warning saying how to install it if not)."""
    if detectron2_importable():
        print("detectron2 is already installed and importable; nothing to do.")
        return True
    url = f"git+{REPOSITORY}@{commit}"
    if reachable(REPOSITORY):
        print(f"Building detectron2 from {url} (a few minutes on CPU) ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", url]
        installed = subprocess.run(cmd).returncode == 0 and detectron2_importable()
    else:
        installed = False
    if installed:
        print("detectron2 installed.")
        return True
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
    return False


if __name__ == "__main__":
    sys.exit(main())
