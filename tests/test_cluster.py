"""Launches as users launch them: torchrun, SLURM's srun, Detectron2's flags."""

import os

import pytest
import warm_start
from runs import ROOT, TINY

# Slow: torchrun and SLURM launches (the fast lane, -m "not slow", leaves them out).
pytestmark = [pytest.mark.detectron2, pytest.mark.slow]


CLUSTER_VARS = (
    "TORCHELASTIC_RUN_ID",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "SLURM_NTASKS",
    "SLURM_JOB_NAME",
    "SLURM_NNODES",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_JOB_NUM_NODES",
)


@pytest.fixture()
def env(monkeypatch):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def args_of(*argv):
    from alrp_d2.engine.launch import argument_parser

    return argument_parser().parse_args(["--config-file", TINY, *argv])


def test_torchrun_topology_comes_from_its_environment(env):
    from alrp_d2.engine.cluster import Topology, UsageError, resolve_topology

    env.setenv("TORCHELASTIC_RUN_ID", "job")
    env.setenv("WORLD_SIZE", "16")
    env.setenv("LOCAL_WORLD_SIZE", "8")
    env.setenv("MASTER_ADDR", "10.0.0.7")
    # Detectron2's default --dist-url (127.0.0.1) is not read: the master stays the launcher's.
    assert resolve_topology(args_of()) == Topology(8, 2, "torchrun")
    assert os.environ["MASTER_ADDR"] == "10.0.0.7"
    with pytest.raises(
        UsageError, match="torchrun starts 8 processes per node, but the flags ask for 4"
    ):
        resolve_topology(args_of("--num-gpus", "4"))


def test_srun_topology_comes_from_slurm(env):
    from alrp_d2.engine.cluster import Topology, UsageError, resolve_topology

    env.setenv("SLURM_NTASKS", "8")
    env.setenv("SLURM_JOB_NAME", "alrp")
    env.setenv("SLURM_NNODES", "2")
    assert resolve_topology(args_of()) == Topology(4, 2, "slurm")
    env.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    assert resolve_topology(args_of("--num-gpus", "4", "--num-machines", "2")) == Topology(
        4, 2, "slurm"
    )
    with pytest.raises(UsageError, match="runs on 2 nodes, but --num-machines is 3"):
        resolve_topology(args_of("--num-machines", "3"))
    # One task asking for 8 processes by the flags: Lightning starts them, not SLURM.
    env.setenv("SLURM_NTASKS", "1")
    env.setenv("SLURM_NNODES", "1")
    env.delenv("SLURM_NTASKS_PER_NODE")
    assert resolve_topology(args_of("--num-gpus", "8")) == Topology(8, 1, "flags")


def test_flags_never_let_the_default_dist_url_override_a_cluster_master(env):
    from alrp_d2.engine.cluster import Topology, UsageError, resolve_topology

    with pytest.raises(UsageError, match="several machines need the master's address"):
        resolve_topology(args_of("--num-machines", "2", "--machine-rank", "1"))
    env.setenv("MASTER_ADDR", "10.0.0.9")
    env.setenv("MASTER_PORT", "29400")
    topology = resolve_topology(
        args_of("--num-machines", "2", "--machine-rank", "1", "--num-gpus", "8")
    )
    assert topology == Topology(8, 2, "flags")
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], os.environ["NODE_RANK"]) == (
        "10.0.0.9",
        "29400",
        "1",
    )
    resolve_topology(
        args_of("--num-machines", "2", "--machine-rank", "0", "--dist-url", "tcp://10.0.0.5:23456")
    )
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.5", "23456")


def test_torchrun_launches_two_cpu_processes(tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "data"), PYTHONWARNINGS="ignore")
    for name in CLUSTER_VARS:
        env.pop(name, None)
    out = tmp_path / "out"
    # torchrun (started warm: its workers too, tests/warm_start.py)
    run = warm_start.run(
        [
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            "train_net.py",
            "--config-file",
            TINY,
            "--accelerator",
            "cpu",
            "SOLVER.MAX_EPOCHS",
            "1",
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "Starting with 2 processes" in run.stdout + run.stderr
    assert (out / "model_final.pth").is_file() and (out / "self_balance_rank1.jsonl").is_file()
