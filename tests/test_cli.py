"""CLI commands through typer's CliRunner, as a user would type them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from raysweep.cli import app
from raysweep.estimator import estimate

runner = CliRunner()


@pytest.fixture
def plane_file(tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.random((900, 2)) @ rng.standard_normal((2, 10))).astype(np.float32)
    path = tmp_path / "plane.npy"
    np.save(path, data)
    return path, data


def test_help_lists_commands_and_examples():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("submit", "estimate", "jobs"):
        assert command in result.output
    assert "raysweep submit quickstart" in result.output


def test_help_does_not_import_torch_or_ray():
    code = "import sys; from raysweep.cli import app; print('torch' in sys.modules, 'ray' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.split() == ["False", "False"]


def test_jobs_lists_bundled_jobs():
    result = runner.invoke(app, ["jobs"])
    assert result.exit_code == 0
    assert "quickstart" in result.output
    assert "all-pythia" in result.output
    assert "1540" in result.output


def test_estimate_json_has_table_fields(plane_file):
    path, data = plane_file
    result = runner.invoke(app, ["estimate", str(path), "--k", "10", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    from raysweep.store import COLUMNS

    assert set(row) == set(COLUMNS)
    assert row["status"] == "ok"
    assert row["k"] == 10
    from raysweep.estimator import EstimatorSettings

    assert row["id_mle"] == pytest.approx(estimate(data, EstimatorSettings(k=10)).id_mle, rel=1e-12)


def test_estimate_table_output(plane_file):
    path, _ = plane_file
    result = runner.invoke(app, ["estimate", str(path), "--k", "10"])
    assert result.exit_code == 0, result.output
    assert "id_mle" in result.output
    assert "ok" in result.output


def test_estimate_missing_source_exits_with_status(tmp_path):
    result = runner.invoke(app, ["estimate", str(tmp_path / "nothing.npy")])
    assert result.exit_code == 3
    assert "is not an existing path" in result.output


def test_estimate_bad_k_is_usage_error(plane_file):
    path, _ = plane_file
    result = runner.invoke(app, ["estimate", str(path), "--k", "1"])
    assert result.exit_code == 2
    assert "k >= 2" in result.output


def test_estimate_json_failure_is_still_json(tmp_path):
    np.save(tmp_path / "nan.npy", np.array([[np.nan, 1.0], [0.0, 1.0], [2.0, 2.0]]))
    result = runner.invoke(app, ["estimate", str(tmp_path / "nan.npy"), "--k", "2", "--json"])
    assert result.exit_code == 1
    row = json.loads(result.stdout)
    assert row["status"] == "failed"
    assert "rows 0" in row["error"]


def test_submit_small_job_then_rerun(local_ray, plane_file, tmp_path):
    path, _ = plane_file
    job = tmp_path / "job.toml"
    job.write_text(f'name = "cli"\nk = 10\n[[sources]]\nlabel = "plane"\nsource = "{path}"\n')
    out = tmp_path / "out"

    first = runner.invoke(app, ["submit", str(job), "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "1 computed, 0 already finished" in first.output
    table = pq.read_table(out / "id_table.parquet").to_pylist()
    assert [row["status"] for row in table] == ["ok"]

    again = runner.invoke(app, ["submit", str(job), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "0 computed, 1 already finished" in again.output


def test_submit_k_override(local_ray, plane_file, tmp_path):
    path, _ = plane_file
    job = tmp_path / "job.toml"
    job.write_text(f'[[sources]]\nsource = "{path}"\n')
    result = runner.invoke(app, ["submit", str(job), "--out", str(tmp_path / "out"), "--k", "7"])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "out" / "id_table.parquet").column("k").to_pylist() == [7]


def test_submit_reports_failed_cells(local_ray, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('k = 10\n[[sources]]\nsource = "random:5x3"\n')
    result = runner.invoke(app, ["submit", str(job), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "exceeds the 5 distinct rows" in result.output


def test_submit_unknown_job():
    result = runner.invoke(app, ["submit", "no-such-job"])
    assert result.exit_code == 2
    assert "raysweep jobs" in " ".join(result.output.split())


def test_error_keeps_bracketed_text(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('name = "x"\n')
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 2
    assert "[[sources]]" in result.output


def test_estimate_unknown_device_is_clear(plane_file):
    path, _ = plane_file
    result = runner.invoke(app, ["estimate", str(path), "--device", "tpu", "--json"])
    assert result.exit_code == 1
    assert "device 'tpu' is" in json.loads(result.stdout)["error"]


def test_status_of_missing_folder(tmp_path):
    result = runner.invoke(app, ["status", str(tmp_path / "nowhere"), "--job", "quickstart"])
    assert result.exit_code == 2
    assert "does not exist" in result.output
