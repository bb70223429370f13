"""Hub sources against the loopback fake Hub, with tiny real GPT-NeoX checkpoints."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from raysweep.cell import compute_cell
from raysweep.cli import app
from raysweep.estimator import EstimatorSettings
from raysweep.jobs import Cell
from raysweep.sources import SourceMissing, load_matrix
from tests.support.checkpoints import save_checkpoint, save_tokenizer, tiny_gpt_neox
from tests.support.hub_fixtures import set_offline_mode

REPO = "fixture-org/tiny-neox"


@pytest.fixture
def two_branches(fake_hub, tmp_path):
    """Publish seed-0 weights as step0 (safetensors) and seed-1 weights as main (sharded .bin)."""
    models = {"step0": tiny_gpt_neox(seed=0), "main": tiny_gpt_neox(seed=1)}
    formats = {"step0": "safetensors", "main": "sharded-bin"}
    for branch, model in models.items():
        directory = tmp_path / branch
        save_checkpoint(model, directory, formats[branch])
        save_tokenizer(directory, num_tokens=150)
        fake_hub.add_directory(REPO, branch, directory)
    return models


def embedding(model) -> torch.Tensor:
    return model.gpt_neox.embed_in.weight.detach()


def test_each_branch_gives_its_own_matrix(fake_hub, two_branches):
    step0 = load_matrix(f"hub:{REPO}", revision="step0")
    main = load_matrix(REPO, revision="main")
    assert torch.equal(step0.matrix, embedding(two_branches["step0"]))
    assert torch.equal(main.matrix, embedding(two_branches["main"]))
    assert step0.weights_format == "safetensors"
    assert step0.weights_file == "model.safetensors"
    assert main.weights_format == "pytorch-bin"
    assert main.weights_file.startswith("pytorch_model-00001-of-")
    assert step0.resolved_revision == fake_hub.commit_sha(REPO, "step0")
    assert main.resolved_revision == fake_hub.commit_sha(REPO, "main")
    assert step0.fetched_bytes > 0
    # 150 tokenizer entries for 200 rows: the padding rows have no token.
    assert step0.tokens[:2] != ["", ""]
    assert step0.tokens[199] == ""


def test_sharded_bin_reads_only_the_first_shard(fake_hub, two_branches):
    load_matrix(REPO, revision="main")
    shards = {path for (_, _, path), count in fake_hub.bytes_served_by_path().items()
              if path.endswith(".bin") and count > 0}
    assert shards == {"pytorch_model-00001-of-00004.bin"}


def test_output_matrix(fake_hub, two_branches):
    loaded = load_matrix(REPO, revision="step0", matrix="output")
    assert loaded.tensor_key == "embed_out.weight"
    assert torch.equal(loaded.matrix, two_branches["step0"].get_output_embeddings().weight.detach())


def test_second_load_fetches_nothing_and_works_offline(fake_hub, two_branches, monkeypatch):
    load_matrix(REPO, revision="step0")
    served = fake_hub.bytes_served
    again = load_matrix(REPO, revision="step0")
    assert again.fetched_bytes == 0
    assert fake_hub.bytes_served == served

    set_offline_mode(monkeypatch)
    offline = load_matrix(REPO, revision="step0")
    assert torch.equal(offline.matrix, again.matrix)
    with pytest.raises(SourceMissing, match="not in the local Hub cache"):
        load_matrix(REPO, revision="main")


def test_missing_revision_and_repo(fake_hub, two_branches):
    with pytest.raises(SourceMissing, match="revision 'step999' of fixture-org/tiny-neox not found"):
        load_matrix(REPO, revision="step999")
    with pytest.raises(SourceMissing, match="repository 'fixture-org/absent' not found"):
        load_matrix("fixture-org/absent")


def test_token_reaches_the_server(fake_hub, two_branches, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fixture_token")
    load_matrix(REPO, revision="step0")
    assert any(record.authorization == "Bearer hf_fixture_token" for record in fake_hub.requests)


def test_cell_status_missing_for_absent_revision(fake_hub, two_branches):
    cell = Cell("hub", REPO, REPO, "step7", "input", None, EstimatorSettings(k=10))
    row = compute_cell(cell).row
    assert row["status"] == "missing"
    assert "step7" in row["error"]


def test_submit_through_ray_reads_from_fake_hub(local_ray, fake_hub, two_branches, tmp_path):
    job = tmp_path / "hub.toml"
    job.write_text(f'name = "hub"\nk = 10\n[[sources]]\nsource = "{REPO}"\n'
                   'revisions = ["step0", "main", "step5"]\n')
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["submit", str(job), "--out", str(out)])
    assert result.exit_code == 3, result.output  # completed, with a missing cell

    rows = {row["revision"]: row for row in pq.read_table(out / "id_table.parquet").to_pylist()}
    assert rows["step5"]["status"] == "missing"
    for branch in ("step0", "main"):
        row = rows[branch]
        assert row["status"] == "ok"
        assert row["step"] == (0 if branch == "step0" else None)
        assert row["rows_in_matrix"] == 200
        assert row["hidden_size"] == 32
        assert row["resolved_revision"] == fake_hub.commit_sha(REPO, branch)
    assert rows["step0"]["tensor_sha256"] != rows["main"]["tensor_sha256"]

    local = compute_cell(Cell("hub", REPO, REPO, "step0", "input", None, EstimatorSettings(k=10))).row
    assert local["id_mle"] == rows["step0"]["id_mle"]


# Row policy


def test_tokenizer_row_policy_uses_tokenizer_rows(fake_hub, two_branches):
    tokenizer = Cell("hub", REPO, REPO, "step0", "input", None, EstimatorSettings(k=10))
    every = Cell("hub", REPO, REPO, "step0", "input", None, EstimatorSettings(k=10), row_policy="all")

    first = compute_cell(tokenizer)
    second = compute_cell(every)

    assert tokenizer.cell_key != every.cell_key
    assert first.row["row_policy"] == "tokenizer"
    assert first.row["tokenizer_rows"] == 150
    assert first.row["rows_in_matrix"] == 200
    assert first.row["rows_used"] == 150
    assert first.tokens.column("row").to_pylist() == list(range(150))
    assert second.row["row_policy"] == "all"
    assert second.row["rows_used"] == 200
    assert second.row["tokenizer_rows"] == 150
    assert first.row["tensor_sha256"] == second.row["tensor_sha256"]


def test_row_policy_job_and_cli_options(tmp_path):
    from raysweep.jobs import JobError, load_job, with_settings

    path = tmp_path / "job.toml"
    path.write_text('row_policy = "all"\n[[sources]]\nsource = "org/a"\n[[sources]]\nsource = "org/b"\n'
                    'row_policy = "tokenizer"\n')
    job = load_job(str(path))
    assert [cell.row_policy for cell in job.cells] == ["all", "tokenizer"]
    assert [cell.row_policy for cell in with_settings(job, row_policy="all").cells] == ["all", "all"]

    path.write_text('[[sources]]\nsource = "org/a"\nrow_policy = "padding"\n')
    with pytest.raises(JobError, match="row_policy = 'padding' is invalid"):
        load_job(str(path))
    result = CliRunner().invoke(app, ["estimate", "random:10x2", "--row-policy", "some"])
    assert result.exit_code == 2
    assert "--row-policy 'some' is invalid" in result.output


# A scaled all-pythia sweep: 3 models x 4 revisions, one missing, one duplicate


SCALED_MODELS = {"fixture-org/pythia-a": "safetensors", "fixture-org/pythia-b": "bin",
                 "fixture-org/pythia-c": "sharded-bin"}
SCALED_REVISIONS = ["step0", "step1000", "step2000", "main"]


@pytest.fixture
def scaled_pythia(fake_hub, tmp_path):
    """Publish the scaled sweep: main equals step2000 everywhere, pythia-b lacks step1000,
    and pythia-c's step1000 serves the bytes of its step2000."""
    for number, (repo, format) in enumerate(SCALED_MODELS.items()):
        weights = {"step0": 10 * number, "step1000": 10 * number + 1, "step2000": 10 * number + 2}
        weights["main"] = weights["step2000"]
        if repo == "fixture-org/pythia-c":
            weights["step1000"] = weights["step2000"]
        for revision in SCALED_REVISIONS:
            if repo == "fixture-org/pythia-b" and revision == "step1000":
                continue
            directory = tmp_path / "published" / repo / revision
            save_checkpoint(tiny_gpt_neox(seed=weights[revision]), directory, format)
            save_tokenizer(directory, num_tokens=150)
            fake_hub.add_directory(repo, revision, directory)
    job = tmp_path / "scaled-pythia.toml"
    sources = ", ".join(f'"{repo}"' for repo in SCALED_MODELS)
    revisions = ", ".join(f'"{revision}"' for revision in SCALED_REVISIONS)
    job.write_text(f'name = "scaled-pythia"\nk = 10\n[[sources]]\nsources = [{sources}]\nrevisions = [{revisions}]\n')
    return job


def test_scaled_all_pythia_sweep(local_ray, fake_hub, scaled_pythia, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["submit", str(scaled_pythia), "--out", str(out)])
    assert result.exit_code == 3, result.output  # completed, with a missing cell

    table = pq.read_table(out / "id_table.parquet").to_pylist()
    rows = {(row["source"], row["revision"]): row for row in table}
    assert len(rows) == 12
    missing = [key for key, row in rows.items() if row["status"] == "missing"]
    assert missing == [("fixture-org/pythia-b", "step1000")]
    assert "step1000" in rows[missing[0]]["error"]
    flagged = {key: row["duplicate_of"] for key, row in rows.items() if row["duplicate_of"] is not None}
    # step1000 serves step2000's bytes: the earlier branch is the defective one.
    assert flagged == {("fixture-org/pythia-c", "step1000"): "step2000"}

    for key, row in rows.items():
        if key in missing:
            continue
        assert row["status"] == "ok", key
        assert row["row_policy"] == "tokenizer"
        assert row["rows_in_matrix"] == 200
        assert row["tokenizer_rows"] == 150
        assert row["rows_used"] == 150
        assert row["resolved_revision"] == fake_hub.commit_sha(*key)
        assert row["weights_format"] == ("safetensors" if key[0].endswith("-a") else "pytorch-bin")
    assert rows[("fixture-org/pythia-a", "main")]["tensor_sha256"] == rows[("fixture-org/pythia-a", "step2000")][
        "tensor_sha256"]

    fake_hub.reset_counters()
    again = CliRunner().invoke(app, ["submit", str(scaled_pythia), "--out", str(out)])
    assert again.exit_code == 3, again.output
    assert fake_hub.bytes_served == 0
    rerun = {(row["source"], row["revision"]): row for row in pq.read_table(out / "id_table.parquet").to_pylist()}
    assert rerun[("fixture-org/pythia-c", "step1000")]["duplicate_of"] == "step2000"
