"""Shared fixtures: fixed seeds, one local Ray instance, the loopback fake Hub."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.support.hub_fixtures import fake_hub  # noqa: F401  (pytest fixture)


@pytest.fixture(autouse=True)
def fixed_seeds():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray instance for the whole session; runs start in seconds then."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (runs where torch.cuda.is_available())")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
