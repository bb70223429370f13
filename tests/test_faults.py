"""Fault tolerance: killed workers and drivers, exceptions, bounded retries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raysweep import runner, store
from raysweep.jobs import load_job

REPO = Path(__file__).resolve().parent.parent


def worker_pids(title: str) -> list[int]:
    """Return the pids of processes whose command line starts with a Ray process title."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if command.startswith(title):
            pids.append(int(entry.name))
    return pids


def wait_for(condition, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def test_killed_worker_is_retried_once_per_cell(local_ray, tmp_path):
    job_path = tmp_path / "slow.toml"
    job_path.write_text('[[sources]]\nsource = "random:40000x256:1"\n')
    job = load_job(str(job_path))
    out = tmp_path / "out"
    result = {}
    before = set(worker_pids("ray::_compute_remote"))

    thread = threading.Thread(target=lambda: result.update(summary=runner.run_job(job, out)))
    thread.start()
    victims = wait_for(lambda: set(worker_pids("ray::_compute_remote")) - before, timeout=60)
    time.sleep(0.3)  # let the cell get into its computation (about 3 s on 2 cores)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed_at = datetime.now(timezone.utc)
    thread.join(timeout=300)

    summary = result["summary"]
    assert summary.computed == 1
    assert [row["status"] for row in summary.rows] == ["ok"]
    # The stored result was finished after the kill, so a retry produced it.
    assert summary.rows[0]["finished_at"] > killed_at
    table = pq.read_table(out / "id_table.parquet")
    assert table.num_rows == 1
    assert len(list((out / "cells").glob("*.parquet"))) == 1


def test_killed_driver_resumes_unfinished_cells(tmp_path):
    sources = ", ".join(f'"random:9000x64:{seed}"' for seed in range(4))
    job = tmp_path / "four.toml"
    job.write_text(f"[[sources]]\nsources = [{sources}]\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "raysweep.cli", "submit", str(job), "--out", str(out), "--local"]
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}

    driver = subprocess.Popen(command, cwd=REPO, env=environment, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: list((out / "cells").glob("*.parquet")), timeout=180, interval=0.1)
    finally:
        # The whole session: the driver and the Ray instance it started.
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finished = {path.name: path.stat().st_mtime_ns for path in (out / "cells").glob("*.parquet")}
    assert 1 <= len(finished) < 4

    rerun = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{4 - len(finished)} computed, {len(finished)} already finished" in rerun.stdout
    for name, mtime in finished.items():
        assert (out / "cells" / name).stat().st_mtime_ns == mtime
    assert pq.read_table(out / "id_table.parquet").num_rows == 4


def test_local_instance_bounds_out_of_memory_retries():
    assert 0 <= runner.TASK_OOM_RETRIES <= 5
    assert runner.TASK_MAX_RETRIES <= 5


def test_lost_task_becomes_failed_row(local_ray, tmp_path, monkeypatch):
    # A task whose retries are exhausted surfaces as a Ray error in the driver.
    job_path = tmp_path / "job.toml"
    job_path.write_text('[[sources]]\nsource = "random:200x4"\n')
    job = load_job(str(job_path))

    def crash(cell_data, device, shard_options):
        os._exit(1)

    monkeypatch.setattr(runner, "_compute_remote", crash)
    monkeypatch.setattr(runner, "TASK_MAX_RETRIES", 0)
    summary = runner.run_job(job, tmp_path / "out")
    row = summary.rows[0]
    assert row["status"] == "failed"
    assert "WorkerCrashedError" in row["error"] or "died" in row["error"]
    assert store.read_cell(tmp_path / "out", row["cell_key"])["status"] == "failed"
