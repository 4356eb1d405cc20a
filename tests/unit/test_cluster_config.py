"""cluster.yaml: accepted by Ray's cluster launcher (its JSON schema and config preparation, run offline: nothing here
calls AWS), worker types that fit the training presets and the Serve config, the package installed on every node,
and no dashboard, MLflow or Serve port reachable from the internet."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"

# Worker type -> the training preset it is sized for.
PRESETS = {
    "t4_worker": REPO / "jobs" / "configs" / "t4_qlora_3b.yaml",
    "a100_worker": REPO / "jobs" / "configs" / "a100_lora_7b.yaml",
}
# Allowed instance families per worker type (the issue: T4 on g4dn, A100 on p4d/p4de).
FAMILIES = {"t4_worker": ("g4dn.",), "a100_worker": ("p4d.", "p4de.")}
# EC2 facts the declared resources are checked against: vCPUs, GPUs, GPU (in the memory planner's names, which the
# presets' scaling.gpu_type uses).
INSTANCES = {
    "m5.xlarge": (4, 0, None),
    "m5.2xlarge": (8, 0, None),
    "m5.4xlarge": (16, 0, None),
    "m6i.2xlarge": (8, 0, None),
    "m6i.4xlarge": (16, 0, None),
    "c6i.4xlarge": (16, 0, None),
    "g4dn.xlarge": (4, 1, "T4"),
    "g4dn.2xlarge": (8, 1, "T4"),
    "g4dn.4xlarge": (16, 1, "T4"),
    "g4dn.12xlarge": (48, 4, "T4"),
    "g4dn.metal": (96, 8, "T4"),
    "p4d.24xlarge": (96, 8, "A100-40"),
    "p4de.24xlarge": (96, 8, "A100-80"),
}
# Planner GPU name -> the accelerator type Ray reports for it (ray.util.accelerators).
RAY_ACCELERATOR = {"T4": "T4", "A100-40": "A100-40G", "A100-80": "A100-80G"}
SERVICE_PORTS = {8265: "Ray dashboard", 5000: "MLflow", 8000: "Serve"}
WORLD = {"0.0.0.0/0", "::/0"}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw: dict) -> dict:
    """The config as `ray up` and the head's autoscaler see it: merged with Ray's AWS defaults."""
    return prepare_config(copy.deepcopy(raw))


def node_types(config: dict) -> dict:
    return config["available_node_types"]


def instance(node_type: dict) -> tuple[str, int, int, str | None]:
    name = node_type["node_config"]["InstanceType"]
    assert name in INSTANCES, f"{name}: add its vCPUs/GPUs to INSTANCES in this test"
    return (name, *INSTANCES[name])


def start_command(commands: list[str]) -> str:
    (command,) = [c for c in commands if "ray start" in c]
    return command


def test_valid_for_rays_cluster_launcher(raw: dict, prepared: dict) -> None:
    # Ray's own check (ray-schema.json plus the node-type cross checks), on the file and on the merged config.
    validate_config(raw)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["cache_stopped_nodes"] is False
    assert prepared["head_node_type"] in node_types(raw)
    # What `ray up` would otherwise take from Ray's AWS defaults (an old AMI, a spot worker type, their commands).
    assert set(node_types(prepared)) == set(node_types(raw))
    for key in ("setup_commands", "head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in raw, f"{key} missing: Ray's AWS defaults would be used"
    for name, node_type in node_types(raw).items():
        assert "ImageId" in node_type["node_config"], f"{name}: no ImageId, Ray would use its years-old default AMI"


def test_schema_check_is_live(raw: dict) -> None:
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["t4_worker"]["max_worker"] = 8  # a typo Ray must reject
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_autoscaler_v2_reads_the_node_types(raw: dict) -> None:
    # Ray >= 2.50 runs autoscaler v2 under `ray up`; this is the class the head's autoscaler builds from the file.
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    configs = AutoscalingConfig(copy.deepcopy(raw), skip_content_hash=True).get_node_type_configs()
    for name, node_type in node_types(raw).items():
        assert configs[name].resources == node_type["resources"]
        if name != raw["head_node_type"]:
            assert configs[name].max_worker_nodes == node_type["max_workers"]


@pytest.mark.parametrize("worker_type", sorted(PRESETS))
def test_worker_type_fits_training_preset(raw: dict, worker_type: str) -> None:
    scaling = yaml.safe_load(PRESETS[worker_type].read_text())["scaling"]
    assert scaling["use_gpu"] is True
    node_type = node_types(raw)[worker_type]
    name, vcpus, gpus, gpu_model = instance(node_type)
    assert name.startswith(FAMILIES[worker_type]), f"{worker_type}: {name} is not one of {FAMILIES[worker_type]}"
    assert gpu_model == scaling["gpu_type"], f"{name} has {gpu_model} GPUs, the preset plans for {scaling['gpu_type']}"

    resources = node_type["resources"]
    # Declared resources are what the autoscaler plans with before a node exists: they must be what the node has.
    assert resources.get("GPU") == gpus >= 1
    assert 0 < resources["CPU"] <= vcpus
    assert resources.get(f"accelerator_type:{RAY_ACCELERATOR[scaling['gpu_type']]}") == 1

    # One GPU and cpus_per_worker CPUs per training worker: how many fit on a node, and how many nodes a run needs.
    per_node = min(resources["GPU"], math.floor(resources["CPU"] / scaling["cpus_per_worker"]))
    assert per_node >= 1, f"{worker_type}: a worker needs {scaling['cpus_per_worker']} CPUs, a node offers {resources}"
    nodes = math.ceil(scaling["num_workers"] / per_node)
    assert node_type.get("min_workers", 0) <= nodes <= node_type["max_workers"]
    assert nodes <= raw["max_workers"]


def test_head_is_a_cpu_node(raw: dict) -> None:
    head = node_types(raw)[raw["head_node_type"]]
    name, _vcpus, gpus, _ = instance(head)
    assert gpus == 0 and name.startswith("m5."), name
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] >= 1  # Serve's ingress replicas and the minimum decoders run here


def test_serve_replicas_fit_a_node_type(raw: dict) -> None:
    serve = yaml.safe_load((REPO / "serve_app" / "config.yaml").read_text())
    assert serve["http_options"]["host"] == "127.0.0.1"  # reached through an SSH tunnel, like the dashboard
    for app in serve["applications"]:
        for deployment in app["deployments"]:
            options = deployment.get("ray_actor_options", {})
            cpus, gpus = options.get("num_cpus", 1), options.get("num_gpus", 0)
            fits = [
                name
                for name, node_type in node_types(raw).items()
                if node_type["resources"].get("CPU", 0) >= cpus
                and node_type["resources"].get("GPU", 0) >= gpus
                and (gpus > 0) == (node_type["resources"].get("GPU", 0) > 0)  # CPU replicas on CPU nodes
            ]
            assert fits, f"Serve deployment {deployment['name']} ({options}) fits no node type"


def test_no_service_port_open_to_the_world(raw: dict) -> None:
    for name, node_type in node_types(raw).items():
        # Ray then uses the group described in provider.security_group; a pre-made group could not be checked here.
        assert "SecurityGroupIds" not in node_type["node_config"], name
        assert "NetworkInterfaces" not in node_type["node_config"], name
    for rule in raw["provider"].get("security_group", {}).get("IpPermissions", []):
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        }
        if not cidrs & WORLD:
            continue
        all_ports = str(rule.get("IpProtocol")) == "-1"
        low, high = rule.get("FromPort", 0), rule.get("ToPort", 65535)
        for port, service in SERVICE_PORTS.items():
            assert not (all_ports or low <= port <= high), f"{service} port {port} open to the world: {rule}"


def test_dashboard_on_loopback_and_mlflow_inside_the_cluster(raw: dict) -> None:
    head_start = start_command(raw["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", head_start), head_start
    assert "--autoscaling-config" in head_start  # without it the head never launches workers

    (mlflow,) = [c for c in raw["head_start_ray_commands"] if "mlflow server" in c]
    assert re.search(r"--port[= ]5000\b", mlflow)
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in mlflow
    assert re.search(r"MLFLOW_ARTIFACTS_DESTINATION=s3://", mlflow)
    assert "MLFLOW_BACKEND_STORE_URI=" in mlflow

    # Rank-0 workers and Serve replicas on other nodes log to and load from MLflow: every node's Ray processes get a
    # tracking URI that names the head, not the node's own loopback.
    worker_start = start_command(raw["worker_start_ray_commands"])
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker_start
    head_uri = re.search(r"MLFLOW_TRACKING_URI=(\S+)", head_start)
    assert head_uri and not re.search(r"127\.0\.0\.1|localhost", head_uri.group(1)), head_start


def test_setup_installs_the_package_on_every_node(raw: dict, prepared: dict) -> None:
    assert raw["file_mounts"].get("~/opsvlm") == "."  # the repository, synced from where `ray up` runs
    # setup_commands run on the head and on every worker (Ray prepends them to head/worker_setup_commands).
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = prepared[key]
        assert any(re.search(r"pip install\b.*\s-e ~/opsvlm\b", c) for c in commands), commands
        assert any("--python 3.11" in c for c in commands), "pyproject requires Python 3.11"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11,<3.12"' in pyproject
