"""The compose file's commands parse with train_net.py's arguments and name existing configs."""

import os
import re
import shlex

import pytest
import yaml


ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
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
        assert "NCCL_SOCKET_IFNAME" in service["environment"] and "GLOO_SOCKET_IFNAME" in service["environment"]


@pytest.mark.detectron2
@pytest.mark.parametrize("env", [{}, {"NUM_MACHINES": "2", "MACHINE_RANK": "1", "MASTER_ADDR": "10.1.2.3",
                                      "RESUME": "--resume", "OPTS": "SOLVER.IMS_PER_BATCH 16"}])
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
    assert train.num_gpus == 8 and not train.eval_only
    assert train.num_machines == int(env.get("NUM_MACHINES", 1))
    assert train.machine_rank == int(env.get("MACHINE_RANK", 0))
    assert train.dist_url == f"tcp://{env.get('MASTER_ADDR', '127.0.0.1')}:29500"
    assert train.resume == ("RESUME" in env)
    assert parsed["evaluate"].eval_only
