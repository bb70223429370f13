"""Scheduling on a multi-node local cluster whose nodes advertise GPU resources."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from raysweep.cli import app

REPO = Path(__file__).resolve().parent.parent


def test_cells_hold_one_gpu_and_spread_over_nodes(tmp_path):
    job = tmp_path / "gpu.toml"
    sources = ", ".join(f'"random:3000x32:{seed}"' for seed in range(6))
    job.write_text(f"k = 10\n[[sources]]\nsources = [{sources}]\n")
    completed = subprocess.run(
        [sys.executable, "-m", "tests.support.multinode", str(job), str(tmp_path / "out"), "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])

    assert report["resources"]["num_gpus"] == 1
    cells = report["cells"]
    assert [cell["status"] for cell in cells] == ["ok"] * 6
    for cell in cells:
        assert cell["gpu_ids"] is not None
        assert len(cell["gpu_ids"].split(",")) == 1
        # The nodes advertise GPUs that torch cannot see, so cells fall back to the CPU.
        assert cell["device"].startswith("cpu")
    used_nodes = {cell["ray_node_id"] for cell in cells}
    assert used_nodes <= set(report["gpu_nodes"])
    assert len(used_nodes) == 2


def test_cuda_job_on_cluster_without_gpus_fails_fast(local_ray, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[[sources]]\nsource = "random:100x4"\n')
    result = CliRunner().invoke(app, ["submit", str(job), "--out", str(tmp_path / "out"), "--device", "cuda"])
    assert result.exit_code == 2
    assert "reports no GPU" in result.output
    assert not (tmp_path / "out" / "cells").exists()
