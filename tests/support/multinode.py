"""Run a job on a local multi-node Ray cluster whose worker nodes advertise GPUs.

Runs as a script in its own process, because it starts its own Ray cluster:

    python -m tests.support.multinode JOB_TOML OUT_DIR GPU_NODES

Prints one JSON list with, per cell, its status, device, Ray node and GPU ids,
then the id of every node that advertises a GPU.
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

from raysweep import runner
from raysweep.jobs import load_job


def main(job_path: str, out: str, gpu_nodes: int) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    gpu_node_ids = [cluster.add_node(num_cpus=1, num_gpus=1).node_id for _ in range(gpu_nodes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        summary = runner.run_job(load_job(job_path), out)
        fields = ("status", "device", "ray_node_id", "gpu_ids", "error")
        cells = [{name: row[name] for name in fields} for row in summary.rows]
        print(json.dumps({"cells": cells, "gpu_nodes": gpu_node_ids, "resources": summary.resources}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
