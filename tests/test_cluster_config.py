"""cluster.yaml passes Ray's own config preparation and schema validation."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_is_valid(config):
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_gpu_workers_autoscale_from_zero(config):
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0
    assert workers["max_workers"] >= 1


def test_images_match_the_installed_ray(config):
    import ray

    images = [config["docker"]["image"], config["docker"]["worker_image"]]
    for image in images:
        version = re.search(r"rayproject/ray:([\d.]+)-py(\d)(\d+)", image)
        assert version, image
        assert version[1] == ray.__version__
        assert f"{version[2]}.{version[3]}" == "3.11"


def test_setup_installs_raysweep(config):
    installs = [command for command in config["setup_commands"] if "pip install" in command]
    assert any("raysweep" in command for command in installs)


def test_unknown_top_level_key_rejected(config):
    config["worker_count"] = 4
    with pytest.raises(Exception, match="worker_count"):
        validate_config(prepare_config(config))


def test_missing_head_node_type_rejected(config):
    config["head_node_type"] = "cpu_head"
    with pytest.raises(ValueError, match="head_node_type` must be one of `available_node_types"):
        validate_config(prepare_config(config))
