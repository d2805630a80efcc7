"""Where the processes of a run come from: Detectron2's flags, ``torchrun`` or SLURM.

- Under ``torchrun`` (or any torch elastic launcher) the topology is the launcher's:
  processes per node ``LOCAL_WORLD_SIZE``, nodes ``WORLD_SIZE / LOCAL_WORLD_SIZE``.
- Under SLURM with one task per process (``srun``; or one task and no flag asking for
  more processes) it is SLURM's:
  ``SLURM_NTASKS_PER_NODE`` (or ``SLURM_NTASKS / SLURM_NNODES``) per node, ``SLURM_NNODES``
  nodes. Lightning's cluster environments then take the ranks and the master address
  from the environment; ``--dist-url`` is not read.
- Otherwise the flags: ``--num-gpus``/``--devices`` per machine, ``--num-machines``,
  ``--machine-rank`` and ``--dist-url``; a ``MASTER_ADDR``/``MASTER_PORT`` already in the
  environment wins over the default ``--dist-url``, which names the local host.

SLURM's requeue signal (``#SBATCH --signal=USR1@90``): the run saves ``last.ckpt`` at
the next iteration boundary, asks ``scontrol requeue`` for the job and exits; the
requeued job (``SLURM_RESTART_COUNT`` > 0) resumes by itself.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

import torch.distributed
from pytorch_lightning.plugins.environments import SLURMEnvironment

from ..cli import UsageError  # the commands' one error type, raised here too

__all__ = [
    "Topology",
    "UsageError",
    "install_requeue_handler",
    "requeue_slurm_job",
    "resolve_topology",
    "slurm_restarted",
]

logger = logging.getLogger("alrp_d2")


@dataclass(frozen=True)
class Topology:
    devices: int  # processes per node
    num_nodes: int
    launcher: str  # "flags", "torchrun" or "slurm"

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def _slurm_tasks_per_node(ntasks: int, nnodes: int) -> int:
    # SLURM_NTASKS_PER_NODE is set only when --ntasks-per-node was given; it may read "4(x2)".
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    if per_node.isdigit():
        return int(per_node)
    if ntasks % nnodes:
        raise UsageError(
            f"SLURM_NTASKS ({ntasks}) is not a multiple of SLURM_NNODES ({nnodes}):"
            " give every node the same number of tasks (--ntasks-per-node)"
        )
    return ntasks // nnodes


def _check_flags_agree(args, topology: Topology) -> None:
    # Detectron2's --num-gpus defaults to 1: only another value is a request.
    asked = args.devices or (args.num_gpus if args.num_gpus != 1 else None)
    if asked and asked != topology.devices:
        raise UsageError(
            f"{topology.launcher} starts {topology.devices} processes per node, but the flags"
            " ask for"
            f" {asked} (--devices/--num-gpus): drop the flag or make them agree"
        )
    if args.num_machines > 1 and args.num_machines != topology.num_nodes:
        raise UsageError(
            f"{topology.launcher} runs on {topology.num_nodes} nodes, but --num-machines is"
            f" {args.num_machines}"
        )


def resolve_topology(args) -> Topology:
    """Processes per node and nodes, from the launcher or the flags; with the flags,
    sets the rendezvous variables Lightning reads."""
    if torch.distributed.is_torchelastic_launched():
        world, local = _env_int("WORLD_SIZE"), _env_int("LOCAL_WORLD_SIZE")
        if not world or not local or world % local:
            raise UsageError(
                f"torchrun environment incomplete: WORLD_SIZE={world}, LOCAL_WORLD_SIZE={local}"
            )
        topology = Topology(local, world // local, "torchrun")
        _check_flags_agree(args, topology)
        return topology
    ntasks = _env_int("SLURM_NTASKS")
    # One SLURM task asked for several processes by the flags: Lightning starts them.
    flags_ask_more = (args.devices or args.num_gpus or 1) > 1 or args.num_machines > 1
    if SLURMEnvironment.detect() and ntasks and (ntasks > 1 or not flags_ask_more):
        nnodes = _env_int("SLURM_NNODES") or _env_int("SLURM_JOB_NUM_NODES") or 1
        topology = Topology(_slurm_tasks_per_node(ntasks, nnodes), nnodes, "slurm")
        _check_flags_agree(args, topology)
        return topology
    topology = Topology(args.devices or args.num_gpus or 1, args.num_machines, "flags")
    if args.num_machines > 1:
        _rendezvous_from_flags(args)
    return topology


def _rendezvous_from_flags(args) -> None:
    """``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK`` for Lightning from Detectron2's flags.
    Detectron2's default ``--dist-url`` names the local host, which is no rendezvous for
    several machines: a master address in the environment wins over it."""
    url = urlparse(args.dist_url)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise UsageError(
            f"--dist-url must be tcp://HOST:PORT with several machines, got {args.dist_url}"
        )
    local = url.hostname in ("127.0.0.1", "localhost", "::1")
    if local and "MASTER_ADDR" not in os.environ:
        raise UsageError(
            "several machines need the master's address: --dist-url tcp://MASTER:PORT"
            " or MASTER_ADDR/MASTER_PORT in the environment"
        )
    if not local:
        os.environ["MASTER_ADDR"] = url.hostname
        os.environ["MASTER_PORT"] = str(url.port)
    os.environ.setdefault("MASTER_PORT", str(url.port))
    os.environ["NODE_RANK"] = str(args.machine_rank)


def slurm_restarted() -> bool:
    """Whether this is a SLURM job that was requeued (it then resumes by itself)."""
    return SLURMEnvironment.detect() and (_env_int("SLURM_RESTART_COUNT") or 0) > 0


_requeue_requested = False


def install_requeue_handler() -> bool:
    """Under SLURM: SIGUSR1 marks the job for requeueing and is turned into SIGTERM, so
    that Lightning stops every rank at the same iteration boundary, where
    :class:`~alrp_d2.engine.checkpoint.RunCheckpoint` saves the progress. Returns
    whether a handler was installed."""
    if not SLURMEnvironment.detect():
        return False

    def handler(signum, frame):
        global _requeue_requested
        _requeue_requested = True
        logger.warning("Received SIGUSR1 from SLURM: saving a checkpoint and requeueing the job")
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGUSR1, handler)
    return True


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` of this job, if SIGUSR1 asked for it; whether it was asked."""
    if not _requeue_requested:
        return False
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        logger.warning("Requeued SLURM job %s; it will resume from the checkpoint", job)
    else:
        logger.error(
            "scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip()
        )
    return True
