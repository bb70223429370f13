"""Job files: bundled jobs, expansion into cells, keys, validation errors."""

from __future__ import annotations

import pytest

from raysweep.estimator import EstimatorSettings
from raysweep.jobs import JobError, bundled_jobs, load_job, with_settings
from raysweep.schedules import PYTHIA_MODELS, PYTHIA_STEPS, SCHEDULES, step_of


def write_job(tmp_path, text: str):
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


def test_bundled_jobs_present():
    assert {"quickstart", "all-pythia"} <= set(bundled_jobs())


def test_quickstart_cells():
    job = load_job("quickstart")
    assert [cell.label for cell in job.cells] == ["all-MiniLM-L6-v2", "glove-6B-50d", "gaussian-30522x384"]
    assert all(cell.settings.k == 20 for cell in job.cells)


def test_all_pythia_has_1540_cells():
    job = load_job("all-pythia")
    assert len(job.cells) == 1540
    assert len({cell.cell_key for cell in job.cells}) == 1540
    models = {cell.source for cell in job.cells}
    assert models == {model.repo_id for model in PYTHIA_MODELS}
    assert len(models) == 10


def test_pythia_schedule():
    assert len(PYTHIA_STEPS) == 154
    assert PYTHIA_STEPS[:11] == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    assert PYTHIA_STEPS[11:13] == (1000, 2000)
    assert PYTHIA_STEPS[-1] == 143000
    assert SCHEDULES["pythia"][0] == "step0"
    assert step_of("step143000") == 143000
    assert step_of("main") is None


def test_cell_key_depends_on_inputs_only(tmp_path):
    first = load_job(write_job(tmp_path, 'name = "a"\n[[sources]]\nsource = "random:10x3"\n')).cells[0]
    renamed = load_job(write_job(tmp_path, 'name = "b"\n[[sources]]\nsource = "random:10x3"\nlabel = "x"\n')).cells[0]
    other_k = load_job(write_job(tmp_path, 'name = "a"\nk = 5\n[[sources]]\nsource = "random:10x3"\n')).cells[0]
    assert first.cell_key == renamed.cell_key
    assert first.cell_key != other_k.cell_key


def test_revisions_and_overrides(tmp_path):
    job = load_job(write_job(tmp_path, """
name = "mixed"
k = 10
[[sources]]
sources = ["org/a", "org/b"]
revisions = ["step0", "step1000"]
matrix = "output"
[[sources]]
source = "random:50x4"
k = 5
k_min = 3
"""))
    assert len(job.cells) == 5
    assert {(cell.source, cell.revision) for cell in job.cells[:4]} == {
        ("org/a", "step0"), ("org/a", "step1000"), ("org/b", "step0"), ("org/b", "step1000")}
    assert job.cells[0].matrix == "output" and job.cells[0].settings.k == 10
    assert job.cells[4].settings == EstimatorSettings(k=5, k_min=3)


def test_cli_overrides_settings(tmp_path):
    job = with_settings(load_job(write_job(tmp_path, '[[sources]]\nsource = "random:10x3"\n')), k=7)
    assert job.cells[0].settings.k == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x"\n', "at least one"),
        ('colour = "red"\n[[sources]]\nsource = "a"\n', "unknown top-level keys"),
        ('[[sources]]\nsource = "a"\nfamily = "pythia"\n', "exactly one of source, sources or family"),
        ('[[sources]]\nfamily = "gpt5"\n', "family 'gpt5' is unknown"),
        ('[[sources]]\nsource = "a"\nschedule = "weekly"\n', "schedule 'weekly' is unknown"),
        ('[[sources]]\nsource = "a"\nrevision = "x"\nrevisions = ["y"]\n', "at most one of revision"),
        ('[[sources]]\nsource = "a"\nmatrix = "middle"\n', "matrix = 'middle' is invalid"),
        ('[[sources]]\nsource = "a"\nk = 1\n', "k >= 2"),
        ('[[sources]]\nsource = "a"\nrevison = "step1"\n', "unknown keys \\['revison'\\]"),
        ('[[sources]]\nsources = ["a", "b"]\nlabel = "x"\n', "label applies to a single source"),
        ('[[sources]]\nsource = "a"\n[[sources]]\nsource = "a"\n', "appears twice"),
        ("[[sources]\n", "not valid TOML"),
        ('k = 20.5\n[[sources]]\nsource = "a"\n', "k = 20.5 must be an integer"),
        ('k = "20"\n[[sources]]\nsource = "a"\n', "k = '20' must be an integer"),
        ('k = true\n[[sources]]\nsource = "a"\n', "k = True must be an integer"),
        ('[[sources]]\nsource = "a"\nlabel = 7\n', "label = 7 must be a string"),
    ],
)
def test_invalid_jobs_rejected(tmp_path, text, message):
    with pytest.raises(JobError, match=message):
        load_job(write_job(tmp_path, text))


def test_unknown_job_name_lists_bundled():
    with pytest.raises(JobError, match="quickstart"):
        load_job("no-such-job")


def test_missing_job_file():
    with pytest.raises(JobError, match="does not exist"):
        load_job("missing/job.toml")
