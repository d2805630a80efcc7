"""The compose file's commands parse with train_net.py's arguments and name existing configs."""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import tempfile

import pytest
import yaml
from runs import ROOT

COMPOSE = os.path.join(ROOT, "docker", "docker-compose.yml")


def with_defaults(text, env=None):
    """Compose's ${VAR:-default} substitution, from ``env`` or the defaults."""
    env = env or {}
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), text)


def services():
    with open(COMPOSE) as f:
        return yaml.safe_load(f)["services"]


def test_services_reserve_all_gpus_and_share_memory():
    for name, service in services().items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == "all", name
        assert service["ipc"] == "host" and service["network_mode"] == "host", name
        assert any(v.endswith(":/datasets:ro") for v in service["volumes"]), name
        # Passed through only when the caller sets them: no interface name imposed.
        for name in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
            assert name in service["environment"] and service["environment"][name] is None, name
        assert service["stop_grace_period"]  # time to write the checkpoint after SIGTERM


ENTRYPOINT = os.path.join(ROOT, "docker", "entrypoint.sh")


def test_dockerfile_runs_train_net_through_the_entrypoint():
    with open(os.path.join(ROOT, "docker", "Dockerfile")) as f:
        text = f.read()
    assert "COPY docker/entrypoint.sh /usr/local/bin/alrp-entrypoint" in text
    assert 'ENTRYPOINT ["/usr/local/bin/alrp-entrypoint", "python", "train_net.py"]' in text


@pytest.fixture()
def open_dir():
    """A folder other users can traverse (pytest's own temporary folders are private)."""
    path = tempfile.mkdtemp(prefix="alrp-entrypoint-")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path)


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv"
)
def test_entrypoint_makes_a_missing_output_folder_writable_for_the_training_user(open_dir):
    output = open_dir / "host" / "output"  # does not exist yet, as a fresh bind mount's host path
    script = 'id -u; touch "$ALRP_OUTPUT/written"'
    run = subprocess.run(
        [ENTRYPOINT, "sh", "-c", script],
        env=dict(os.environ, ALRP_OUTPUT=str(output)),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["1000"]  # not root
    assert (output / "written").stat().st_uid == 1000


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv"
)
def test_entrypoint_writes_as_the_owner_of_an_existing_output_folder(open_dir):
    output = open_dir / "output"
    output.mkdir()
    os.chown(output, 1234, 1234)
    run = subprocess.run(
        [ENTRYPOINT, "sh", "-c", 'id -u; touch "$ALRP_OUTPUT/written"'],
        env=dict(os.environ, ALRP_OUTPUT=str(output)),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["1234"]
    assert (output / "written").stat().st_uid == 1234


@pytest.mark.detectron2
@pytest.mark.parametrize(
    "env",
    [
        {},
        {
            "NUM_MACHINES": "2",
            "MACHINE_RANK": "1",
            "MASTER_ADDR": "10.1.2.3",
            "RESUME": "--resume",
            "OPTS": "SOLVER.IMS_PER_BATCH 16",
        },
    ],
)
def test_compose_commands_parse_with_train_net(env):
    from alrp_d2.engine.launch import argument_parser, setup_cfg

    parsed = {}
    for name, service in services().items():
        args = argument_parser().parse_args(shlex.split(with_defaults(service["command"], env)))
        config = os.path.join(ROOT, args.config_file)
        assert os.path.isfile(config), config
        args.config_file = config
        cfg = setup_cfg(args)  # every override is a real config key
        assert cfg.OUTPUT_DIR.startswith("/output")
        parsed[name] = args
    train = parsed["train"]
    assert train.num_gpus == 4 and not train.eval_only  # the COCO configs assume 4 processes
    assert train.num_machines == int(env.get("NUM_MACHINES", 1))
    assert train.machine_rank == int(env.get("MACHINE_RANK", 0))
    assert train.dist_url == f"tcp://{env.get('MASTER_ADDR', '127.0.0.1')}:29500"
    assert train.resume == ("RESUME" in env)
    assert parsed["evaluate"].eval_only
