"""Runner: cells as Ray tasks on a local instance, resume, failures, resources."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysweep import runner, store
from raysweep.jobs import load_job


@pytest.fixture
def small_job(tmp_path):
    rng = np.random.default_rng(0)
    plane = rng.random((800, 2)) @ rng.standard_normal((2, 12))
    np.save(tmp_path / "plane.npy", plane.astype(np.float32))
    path = tmp_path / "small.toml"
    path.write_text(f"""
name = "small"
k = 10
[[sources]]
label = "plane"
source = "{tmp_path / 'plane.npy'}"
[[sources]]
label = "noise"
source = "random:600x8:1"
""")
    return load_job(str(path))


def test_job_runs_and_resumes(local_ray, small_job, tmp_path):
    out = tmp_path / "out"
    first = runner.run_job(small_job, out)
    assert first.computed == 2 and first.skipped == 0
    assert [row["status"] for row in first.rows] == ["ok", "ok"]
    plane = first.rows[0]
    assert abs(plane["id_mle"] - 2) < 0.2
    assert plane["rows_used"] == 800 and plane["hidden_size"] == 12
    assert plane["device"].startswith("cpu")
    assert plane["ray_version"] and plane["torch_version"] and plane["tensor_sha256"]

    table = pq.read_table(out / "id_table.parquet")
    assert table.schema == store.ID_TABLE_SCHEMA
    assert table.num_rows == 2
    tokens = pq.read_table(store.tokens_path(out, plane["cell_key"]))
    assert tokens.num_rows == 800

    again = runner.run_job(small_job, out)
    assert again.computed == 0 and again.skipped == 2
    assert [row["id_mle"] for row in again.rows] == [row["id_mle"] for row in first.rows]


def test_truncated_result_is_recomputed(local_ray, small_job, tmp_path):
    out = tmp_path / "out"
    first = runner.run_job(small_job, out)
    path = store.cell_path(out, first.rows[1]["cell_key"])
    path.write_bytes(path.read_bytes()[:100])
    again = runner.run_job(small_job, out)
    assert again.computed == 1
    assert again.rows[1]["id_mle"] == first.rows[1]["id_mle"]


def test_bad_cells_recorded_and_others_finish(local_ray, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(f"""
name = "bad"
k = 10
[[sources]]
source = "random:200x4"
[[sources]]
source = "random:8x4"
[[sources]]
source = "{tmp_path / 'absent.npy'}"
""")
    summary = runner.run_job(load_job(str(path)), tmp_path / "out")
    statuses = [row["status"] for row in summary.rows]
    assert statuses == ["ok", "failed", "missing"]
    assert "k + 1 = 11 exceeds the 8 distinct rows" in summary.rows[1]["error"]
    assert "is not an existing path" in summary.rows[2]["error"]
    union = pq.read_table(tmp_path / "out" / "id_table.parquet")
    assert sorted(union.column("status").to_pylist()) == ["failed", "missing", "ok"]


def test_gpu_requested_only_when_cluster_has_gpus():
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}}]
    with_gpus = runner.task_resources({"CPU": 8.0, "GPU": 2.0}, nodes, "auto", None)
    assert (with_gpus.num_gpus, with_gpus.num_cpus, with_gpus.device) == (1, 1, "cuda")

    cpu_nodes = [{"Alive": True, "Resources": {"CPU": 4.0}}, {"Alive": True, "Resources": {"CPU": 16.0}}]
    without = runner.task_resources({"CPU": 20.0}, cpu_nodes, "auto", None)
    assert (without.num_gpus, without.num_cpus, without.device) == (0, 16.0, "cpu")

    forced_cpu = runner.task_resources({"CPU": 8.0, "GPU": 2.0}, nodes, "cpu", 2)
    assert (forced_cpu.num_gpus, forced_cpu.num_cpus) == (0, 2)


def test_cuda_on_cluster_without_gpus_fails_fast():
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}]
    with pytest.raises(ValueError, match="reports no GPU"):
        runner.task_resources({"CPU": 2.0}, nodes, "cuda", None)
    with pytest.raises(ValueError, match="largest node has 2"):
        runner.task_resources({"CPU": 2.0}, nodes, "cpu", 4)


def test_hub_settings_forwarded_to_tasks(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", "/tmp/hf")
    assert runner.forwarded_environment(local=True)["HF_HOME"] == "/tmp/hf"
    remote = runner.forwarded_environment(local=False)
    assert remote["HF_ENDPOINT"] == "http://127.0.0.1:9"
    assert "HF_HOME" not in remote


@pytest.mark.parametrize("shards", [2, 4])
def test_sharded_cell_equals_single_task(local_ray, tmp_path, shards):
    rng = np.random.default_rng(3)
    np.save(tmp_path / "cube.npy", rng.random((3000, 3)))
    single_job = tmp_path / "single.toml"
    single_job.write_text(f'[[sources]]\nsource = "{tmp_path / "cube.npy"}"\n')
    sharded_job = tmp_path / "sharded.toml"
    sharded_job.write_text(f'shards = {shards}\n[[sources]]\nsource = "{tmp_path / "cube.npy"}"\n')

    single = runner.run_job(load_job(str(single_job)), tmp_path / "single")
    sharded = runner.run_job(load_job(str(sharded_job)), tmp_path / "sharded")
    one, many = single.rows[0], sharded.rows[0]
    assert many["status"] == "ok"
    assert many["cell_key"] == one["cell_key"]
    assert many["id_mle"] == pytest.approx(one["id_mle"], rel=1e-12)
    assert many["id_median"] == one["id_median"]
    single_lids = pq.read_table(store.tokens_path(tmp_path / "single", one["cell_key"])).column("lid")
    sharded_lids = pq.read_table(store.tokens_path(tmp_path / "sharded", many["cell_key"])).column("lid")
    assert single_lids.to_pylist() == sharded_lids.to_pylist()


def test_shard_bounds_cover_rows_once():
    assert runner.shard_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert runner.shard_bounds(2, 5) == [(0, 1), (1, 2)]
    assert runner.shard_bounds(7, 1) == [(0, 7)]
