"""What the project's commands share: one error type for bad input (exit status 2, one line,
before anything is written), the config read from its file and ``KEY VALUE`` overrides
without Lightning, and the run of a command.

The commands, each also a console script of the installed package:

    python train_net.py ...              alrp-d2-train ...     (alrp_d2.engine.launch)
    python -m alrp_d2.predict ...        alrp-d2-predict ...
    python -m alrp_d2.plot ...           alrp-d2-plot ...
    python -m alrp_d2.evaluation.lrp ... alrp-d2-lrp ...

No torch, Detectron2 or Lightning at import: ``plot`` runs without them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

__all__ = [
    "EXIT_USAGE",
    "UsageError",
    "add_config_file",
    "add_dataset_flag",
    "add_overrides",
    "load_config",
    "run_command",
]

EXIT_USAGE = 2  # argparse's own status for bad arguments


class UsageError(Exception):
    """Bad command-line input (a missing file, a malformed config or override, weights of
    another model): reported in one line, exit status 2, before anything is written."""


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)``'s exit status; a :class:`UsageError` is printed as ``error: ...`` on
    stderr and gives :data:`EXIT_USAGE`."""
    try:
        return run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


def add_config_file(parser: argparse.ArgumentParser, help: str) -> None:
    """``--config-file FILE``, as Detectron2's ``default_argument_parser`` names it."""
    parser.add_argument("--config-file", required=True, metavar="FILE", help=help)


def add_dataset_flag(parser: argparse.ArgumentParser, help: str) -> None:
    """``--dataset NAME JSON IMAGE_ROOT`` (repeatable): a COCO- or LVIS-format dataset to
    register."""
    parser.add_argument(
        "--dataset",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help=help,
    )


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """The trailing ``KEY VALUE`` config overrides (``opts``), as Detectron2's; add it last."""
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="KEY VALUE config overrides (last, after every flag)",
    )


def load_config(config_file: str, opts: Sequence[str]):
    """The project's config (:func:`alrp_d2.config.get_cfg`) from ``config_file`` and then
    the ``KEY VALUE`` pairs of ``opts``; every problem raises :class:`UsageError` naming it."""
    from .config import get_cfg

    opts = list(opts)
    if not config_file:
        raise UsageError("--config-file is required")
    if not os.path.isfile(config_file):
        raise UsageError(f"config file not found: {config_file}")
    cfg = get_cfg()
    try:
        cfg.merge_from_file(config_file)
    except KeyError as err:
        raise UsageError(f"{config_file}: {err.args[0] if err.args else err}") from None
    except Exception as err:  # yaml syntax, wrong value types
        raise UsageError(f"{config_file}: {err}") from None
    flags = [o for o in opts[::2] if o.startswith("--")]
    if flags:
        raise UsageError(
            f"{flags[0]} comes after the KEY VALUE overrides: flags go first,"
            f" overrides last (got the overrides {opts})"
        )
    if len(opts) % 2:
        raise UsageError(f"overrides must come in KEY VALUE pairs, got {opts}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError) as err:
        raise UsageError(f"bad override: {err.args[0] if err.args else err}") from None
    except Exception as err:
        raise UsageError(f"bad override: {err}") from None
    return cfg
