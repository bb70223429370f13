"""LoRA rank sweeps: job files, text data, training, storage, Ray runs through the CLI, reports.

The end-to-end test builds a tiny GPT-NeoX whose trained input embedding is
its initial one plus a rank-4 update (tests/support/lora_models.py), samples
a corpus from it, and checks that reconstructing it needs rank 4.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from raysweep import jobs, lora_runner, plots, store
from raysweep import report as reports
from raysweep.cli import app
from raysweep.lora import (DEFAULT_RANKS, KIND, LoraCell, LoraJobError, TrainingSettings, load_lora_job,
                           parse_lora_job)
from raysweep.lora_data import DataMissing, TextData, cut_blocks, load_blocks, parse_text_data, read_texts
from raysweep.lora_report import find_id_row
from raysweep.lora_train import (attach_lora, base_lora_row, compute_lora_cell, finish_row, learning_rate_factor,
                                 replace_input_embedding)
from tests.support.checkpoints import EMBEDDING_NAME, publish, save_tokenizer, tiny_gpt_neox
from tests.support.lora_models import SEQUENCE_LENGTH, VOCAB_SIZE, build_rank_setup

cli = CliRunner()

RANKS = [1, 2, 4, 8, 16]


@pytest.fixture(scope="module")
def rank_setup(tmp_path_factory):
    return build_rank_setup(tmp_path_factory.mktemp("rank-setup"))


def write_job(path, body: str):
    path.write_text(textwrap.dedent(body))
    return path


def reconstruct_job(path, setup, ranks=RANKS, steps=300, name="tiny-reconstruct"):
    return write_job(path, f"""
        kind = "lora-rank"
        name = "{name}"
        model = "{setup.final}"
        initial_model = "{setup.step0}"
        modes = ["reconstruct"]
        ranks = {list(ranks)}
        steps = {steps}
        learning_rate = 1e-2
        batch_size = 32
        sequence_length = {SEQUENCE_LENGTH}
        seed = 0

        [data]
        train = ["{setup.train}"]
        eval = ["{setup.eval}"]
    """)


# Job files.


def test_hub_job_defaults():
    job = parse_lora_job({"kind": KIND, "model": "EleutherAI/pythia-160m", "revision": "step143000",
                          "data": {"train": ["train.parquet"], "dataset": "Salesforce/wikitext"}},
                         Path("job.toml"))
    assert len(job.cells) == 2 * len(DEFAULT_RANKS)
    assert [cell.mode for cell in job.cells[:2]] == ["adapt", "adapt"]
    assert [cell.rank for cell in job.cells if cell.mode == "adapt"] == list(DEFAULT_RANKS)
    reconstruct = [cell for cell in job.cells if cell.mode == "reconstruct"]
    assert {(cell.initial_model, cell.initial_revision) for cell in reconstruct} == {
        ("EleutherAI/pythia-160m", "step0")}
    assert all(cell.initial_model is None for cell in job.cells if cell.mode == "adapt")
    assert len({cell.cell_key for cell in job.cells}) == len(job.cells)
    assert job.cells[0].data.train == ("train.parquet",)
    assert job.cells[0].data.eval_fraction == 0.1
    assert job.cells[0].label == "EleutherAI/pythia-160m"


def test_bundled_pythia_job():
    job = load_lora_job("lora-pythia-160m")
    assert job.name == "lora-pythia-160m"
    assert len(job.cells) == 18
    assert {cell.model for cell in job.cells} == {"EleutherAI/pythia-160m"}
    assert {cell.revision for cell in job.cells} == {"step143000"}
    assert max(cell.rank for cell in job.cells) == 256
    cell = job.cells[0]
    assert cell.data.dataset == "Salesforce/wikitext"
    assert cell.data.eval == ("wikitext-2-raw-v1/validation-00000-of-00001.parquet",)
    assert cell.training.rslora is True


def test_job_kinds():
    assert jobs.LORA_KIND == KIND
    assert jobs.job_kind("lora-pythia-160m") == KIND
    assert jobs.job_kind("quickstart") == jobs.ID_KIND
    with pytest.raises(jobs.JobError, match="is a lora-rank job"):
        jobs.load_job("lora-pythia-160m")


def test_unknown_kind_rejected(tmp_path):
    path = write_job(tmp_path / "odd.toml", 'kind = "finetune"\n[[sources]]\nsource = "random:10x3"\n')
    with pytest.raises(jobs.JobError, match="kind = 'finetune' is unknown"):
        jobs.load_job(str(path))


def test_id_job_with_explicit_kind(tmp_path):
    path = write_job(tmp_path / "id.toml", 'kind = "intrinsic-dimension"\n[[sources]]\nsource = "random:10x3"\n')
    assert len(jobs.load_job(str(path)).cells) == 1


@pytest.mark.parametrize("change, message", [
    ({"ranks": [0, 2]}, "must contain only positive integers"),
    ({"ranks": [2, 2]}, "names a rank twice"),
    ({"modes": ["finetune"]}, "modes = ['finetune'] is invalid"),
    ({"steps": 0}, "steps = 0 must be a positive integer"),
    ({"learning_rate": -1.0}, "learning_rate = -1.0 must be a positive number"),
    ({"warmup_steps": 10, "steps": 10}, "warmup_steps = 10 must be an integer in [0, steps)"),
    ({"sequence_length": 1}, "sequence_length = 1 must be an integer of at least 2"),
    ({"epochs": 3}, "unknown top-level keys ['epochs']"),
    ({"data": None}, "[data] must be a table"),
    ({"data": {"train": []}}, "needs `train = [FILES]`"),
    ({"data": {"train": ["a.csv"]}}, "unsupported suffix"),
    ({"data": {"train": ["a.txt"], "eval": ["b.txt"], "eval_fraction": 0.2}}, "not both"),
    ({"data": {"train": ["a.txt"], "eval_fraction": 1.5}}, "eval_fraction = 1.5"),
    ({"data": {"train": ["a.txt"], "dataset_revision": "main"}}, "only together with dataset"),
    ({"kind": "intrinsic-dimension"}, "needs kind = 'lora-rank'"),
    ({"model": "not a model"}, "neither an existing folder nor a Hub id"),
])
def test_invalid_job_values(tmp_path, change, message):
    data = {"kind": KIND, "model": "EleutherAI/pythia-70m", "data": {"train": ["a.txt"]}}
    data.update(change)
    data = {key: value for key, value in data.items() if value is not None}
    with pytest.raises(ValueError) as raised:
        parse_lora_job(data, tmp_path / "job.toml")
    assert message in str(raised.value)


def test_local_reconstruct_needs_initial_model(tmp_path):
    data = {"kind": KIND, "model": str(tmp_path), "modes": ["reconstruct"], "data": {"train": ["a.txt"]}}
    with pytest.raises(ValueError, match="needs initial_model = PATH"):
        parse_lora_job(data, tmp_path / "job.toml")
    with pytest.raises(ValueError, match="applies only to a Hub model"):
        parse_lora_job({**data, "modes": ["adapt"], "revision": "step0"}, tmp_path / "job.toml")


def test_load_lora_job_errors(tmp_path):
    with pytest.raises(LoraJobError, match="does not exist"):
        load_lora_job(str(tmp_path / "missing.toml"))
    bad = write_job(tmp_path / "bad.toml", "kind = [\n")
    with pytest.raises(LoraJobError, match="not valid TOML"):
        load_lora_job(str(bad))


def test_cell_key_follows_numbers_only(tmp_path):
    base = {"kind": KIND, "model": "EleutherAI/pythia-70m", "modes": ["adapt"], "ranks": [4],
            "data": {"train": ["a.txt"]}}
    key = parse_lora_job(base, tmp_path / "a.toml").cells[0].cell_key
    renamed = parse_lora_job({**base, "name": "other", "label": "x"}, tmp_path / "b.toml").cells[0].cell_key
    longer = parse_lora_job({**base, "steps": 7}, tmp_path / "a.toml").cells[0].cell_key
    other_data = parse_lora_job({**base, "data": {"train": ["b.txt"]}}, tmp_path / "a.toml").cells[0].cell_key
    assert key == renamed
    assert key != longer
    assert key != other_data
    assert key.startswith("lora-")


def test_cell_round_trips_through_dict(rank_setup, tmp_path):
    job = load_lora_job(str(reconstruct_job(tmp_path / "job.toml", rank_setup)))
    cell = job.cells[2]
    again = LoraCell.from_dict(json.loads(json.dumps(cell.to_dict())))
    assert again == cell
    assert again.cell_key == cell.cell_key


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    job = parse_lora_job({"kind": KIND, "model": "./model", "modes": ["adapt"], "ranks": [1],
                          "data": {"train": ["corpus/a.txt"]}}, tmp_path / "job.toml")
    cell = job.cells[0]
    assert cell.model == str(tmp_path / "model")
    assert cell.data.train == (str(tmp_path / "corpus" / "a.txt"),)
    assert cell.label == "model"


# Text data.


@pytest.fixture
def word_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path / "tokenizer", num_tokens=40)
    return AutoTokenizer.from_pretrained(tmp_path / "tokenizer")


def test_blocks_hold_out_last_fraction(tmp_path, word_tokenizer):
    words = " ".join(f"w{index % 30}" for index in range(100))
    (tmp_path / "a.txt").write_text(words)
    data = parse_text_data({"train": ["a.txt"], "eval_fraction": 0.25}, "test", base=tmp_path)
    blocks = load_blocks(data, word_tokenizer, sequence_length=10)
    stream = np.array([2 + index % 30 for index in range(100)])
    assert blocks.train.shape == (8, 10)
    assert blocks.eval.shape == (2, 10)
    assert np.array_equal(blocks.train.ravel(), stream[:80])
    assert np.array_equal(blocks.eval.ravel(), stream[80:])
    assert blocks.train_tokens == 80
    assert load_blocks(data, word_tokenizer, sequence_length=10).sha256 == blocks.sha256


def test_files_joined_with_eos_and_tail_dropped(tmp_path, word_tokenizer):
    (tmp_path / "a.txt").write_text("w1 w2 w3")
    (tmp_path / "b.txt").write_text("w4 w5")
    (tmp_path / "eval.txt").write_text("w6 w7 w8 w9 w10")
    data = parse_text_data({"train": ["a.txt", "b.txt"], "eval": ["eval.txt"]}, "test", base=tmp_path)
    blocks = load_blocks(data, word_tokenizer, sequence_length=2, eval_tokens=3)
    # <|endoftext|> is id 0 and separates the files.
    assert blocks.train.tolist() == [[3, 4], [5, 0], [6, 7]]
    assert blocks.eval.tolist() == [[8, 9], [10, 11]]


def test_parquet_and_jsonl_columns(tmp_path):
    pq.write_table(pa.table({"text": ["first", None, "second"], "id": [1, 2, 3]}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"body": "one"}\n\n{"body": "two"}\n')
    parquet = TextData((str(tmp_path / "a.parquet"),))
    assert read_texts(parquet, parquet.train) == ["first\n\nsecond"]
    jsonl = TextData((str(tmp_path / "b.jsonl"),), text_column="body")
    assert read_texts(jsonl, jsonl.train) == ["one\n\ntwo"]
    with pytest.raises(ValueError, match="has no column 'body'"):
        read_texts(TextData(parquet.train, text_column="body"), parquet.train)
    with pytest.raises(ValueError, match="line 1: no field 'text'"):
        read_texts(TextData(jsonl.train), jsonl.train)


def test_missing_text_file(tmp_path):
    data = TextData((str(tmp_path / "absent.txt"),))
    with pytest.raises(DataMissing, match="does not exist"):
        read_texts(data, data.train)


def test_too_little_text_for_a_block(tmp_path, word_tokenizer):
    (tmp_path / "a.txt").write_text("w1 w2 w3")
    data = parse_text_data({"train": ["a.txt"]}, "test", base=tmp_path)
    with pytest.raises(ValueError, match="too few to hold out"):
        load_blocks(data, word_tokenizer, sequence_length=4)
    with pytest.raises(ValueError, match="at least 2"):
        cut_blocks(np.arange(5), 1)


def test_hub_dataset_files(fake_hub):
    # The fake Hub routes /datasets/NAME/resolve/... to its repo "datasets/NAME",
    # which is where huggingface_hub sends a one-part dataset id.
    fake_hub.add_file("datasets/tinytext", "main", "train.txt", b"w1 w2 w3\n")
    data = parse_text_data({"dataset": "tinytext", "train": ["train.txt"]}, "test")
    assert data.train == ("train.txt",)
    assert read_texts(data, data.train) == ["w1 w2 w3\n"]
    with pytest.raises(DataMissing, match="was not found"):
        read_texts(data, ("absent.txt",))


# Training pieces.


def test_learning_rate_schedule():
    settings = TrainingSettings(steps=10, warmup_steps=2)
    factors = [learning_rate_factor(step, settings) for step in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == 1.0
    assert all(later <= earlier for earlier, later in zip(factors[2:], factors[3:]))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_lora_trains_only_the_embedding_delta(tmp_path):
    model = tiny_gpt_neox(vocab_size=50)
    ids = torch.randint(0, 50, (2, 8))
    before = model(ids).logits
    cell = LoraCell("j", "m", "org/m", None, "adapt", 3, None, None, None, TextData(("a.txt",)),
                    TrainingSettings())
    wrapped, target = attach_lora(model, cell)
    assert target == EMBEDDING_NAME.removesuffix(".weight")
    trained = {name: parameter.numel() for name, parameter in wrapped.named_parameters() if parameter.requires_grad}
    assert sorted(name.rsplit(".", 2)[-2] for name in trained) == ["lora_embedding_A", "lora_embedding_B"]
    assert sum(trained.values()) == 3 * (50 + 32)
    # peft starts the embedding's A matrix at zero, so nothing changes before training.
    assert torch.equal(wrapped(ids).logits, before)


def test_lora_target_must_be_embedding():
    model = tiny_gpt_neox(vocab_size=50)
    cell = LoraCell("j", "m", "org/m", None, "adapt", 2, None, None, "lm_head", TextData(("a.txt",)),
                    TrainingSettings())
    with pytest.raises(ValueError, match="must name the input embedding"):
        attach_lora(model, cell)


def test_replace_embedding_unties_output():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    trained = model.get_input_embeddings().weight.detach().clone()
    initial = torch.zeros_like(trained)
    assert replace_input_embedding(model, initial) is True
    assert torch.equal(model.get_input_embeddings().weight, initial)
    assert torch.equal(model.get_output_embeddings().weight, trained)
    with pytest.raises(ValueError, match="has shape"):
        replace_input_embedding(model, torch.zeros(31, 16))


# Storage.


def test_lora_rows_stored_atomically(tmp_path):
    cell = LoraCell("j", "m", "org/m", None, "adapt", 2, None, None, None, TextData(("a.txt",)), TrainingSettings())
    row = finish_row({**base_lora_row(cell), "perplexity": 12.5}, 0.0, "ok", None)
    store.write_lora_result(tmp_path, row)
    assert store.is_lora_finished(tmp_path, cell.cell_key)
    assert store.read_lora_result(tmp_path, cell.cell_key)["perplexity"] == 12.5
    assert store.write_lora_union(tmp_path) == tmp_path / "lora_table.parquet"
    assert pq.read_table(tmp_path / "lora_table.parquet").schema == store.LORA_SCHEMA
    assert [path.name for path in (tmp_path / "lora").iterdir()] == [f"{cell.cell_key}.parquet"]

    failed = finish_row(base_lora_row(cell), 0.0, "failed", RuntimeError("boom"))
    store.write_lora_result(tmp_path, failed)
    assert not store.is_lora_finished(tmp_path, cell.cell_key)
    with pytest.raises(ValueError, match="unknown \\['extra'\\]"):
        store.write_lora_result(tmp_path, {**row, "extra": 1})
    with pytest.raises(ValueError, match="status 'done'"):
        store.write_lora_result(tmp_path, {**row, "status": "done"})

    path = store.lora_path(tmp_path, cell.cell_key)
    path.write_bytes(path.read_bytes()[:50])
    assert store.read_lora_result(tmp_path, cell.cell_key) is None


# One rank in this process: the Hub path and failures.


def test_reconstruct_from_hub_revisions(fake_hub, rank_setup, tmp_path):
    from raysweep.sources import load_matrix

    publish(fake_hub, "org/tiny", "step0", rank_setup.step0)
    commit = publish(fake_hub, "org/tiny", "step100", rank_setup.final)
    job = write_job(tmp_path / "hub.toml", f"""
        kind = "lora-rank"
        model = "org/tiny"
        revision = "step100"
        modes = ["reconstruct"]
        ranks = [4]
        steps = 5
        batch_size = 4
        sequence_length = {SEQUENCE_LENGTH}
        [data]
        train = ["{rank_setup.train}"]
        eval = ["{rank_setup.eval}"]
    """)
    cell = load_lora_job(str(job)).cells[0]
    assert (cell.initial_model, cell.initial_revision) == ("org/tiny", "step0")

    row = compute_lora_cell(cell, "cpu")
    assert row["status"] == "ok", row["error"]
    assert row["resolved_revision"] == commit
    assert row["initial_sha256"] == load_matrix(str(rank_setup.step0)).tensor_sha256
    assert row["start_perplexity"] > 5 * row["baseline_perplexity"]
    assert row["embedding_rows"] == VOCAB_SIZE
    assert row["trainable_parameters"] == 4 * (VOCAB_SIZE + 32)
    assert row["peft_version"] and row["transformers_version"] and row["torch_version"]


def test_missing_hub_revision_recorded(fake_hub, rank_setup, tmp_path):
    publish(fake_hub, "org/tiny", "main", rank_setup.final)
    data = {"kind": KIND, "model": "org/tiny", "revision": "step999", "modes": ["adapt"], "ranks": [1],
            "data": {"train": [str(rank_setup.train)]}}
    row = compute_lora_cell(parse_lora_job(data, tmp_path / "job.toml").cells[0], "cpu")
    assert row["status"] == "missing"
    assert "step999" in row["error"]


# Ray runs.


def test_adapt_and_failures_recorded(local_ray, rank_setup, tmp_path):
    (tmp_path / "short.txt").write_text("w1 w2 w3\n")
    adapt = write_job(tmp_path / "adapt.toml", f"""
        kind = "lora-rank"
        model = "{rank_setup.final}"
        modes = ["adapt"]
        ranks = [1, 2]
        steps = 10
        batch_size = 8
        sequence_length = {SEQUENCE_LENGTH}
        [data]
        train = ["{rank_setup.train}"]
        eval = ["{rank_setup.eval}"]
    """)
    summary = lora_runner.run_lora_job(load_lora_job(str(adapt)), tmp_path / "out", cpus_per_task=1)
    assert [row["status"] for row in summary.rows] == ["ok", "ok"]
    for row in summary.rows:
        assert row["start_perplexity"] == row["baseline_perplexity"]
        assert row["perplexity"] < 1.05 * row["baseline_perplexity"]
        assert row["device"].startswith("cpu")
        assert row["ray_node_id"]
        assert row["train_tokens"] == 256 * SEQUENCE_LENGTH
        assert row["eval_tokens"] == 64 * SEQUENCE_LENGTH

    broken = write_job(tmp_path / "broken.toml", f"""
        kind = "lora-rank"
        model = "{rank_setup.final}"
        modes = ["adapt"]
        ranks = [1]
        steps = 2
        sequence_length = {SEQUENCE_LENGTH}
        [data]
        train = ["{rank_setup.train}"]
        eval = ["{tmp_path / 'short.txt'}"]
    """)
    failed = lora_runner.run_lora_job(load_lora_job(str(broken)), tmp_path / "out", cpus_per_task=1)
    assert failed.rows[0]["status"] == "failed"
    assert "less than one block" in failed.rows[0]["error"]

    absent = write_job(tmp_path / "absent.toml", f"""
        kind = "lora-rank"
        model = "{tmp_path / 'no-model'}"
        modes = ["adapt"]
        ranks = [1]
        [data]
        train = ["{rank_setup.train}"]
    """)
    missing = lora_runner.run_lora_job(load_lora_job(str(absent)), tmp_path / "out", cpus_per_task=1)
    assert missing.rows[0]["status"] == "missing"
    assert "does not exist" in missing.rows[0]["error"]

    table = pq.read_table(tmp_path / "out" / "lora_table.parquet")
    assert sorted(table.column("status").to_pylist()) == ["failed", "missing", "ok", "ok"]


def test_reconstruct_sweep_finds_true_rank(local_ray, rank_setup, tmp_path):
    """Through `raysweep submit`: perplexity falls with rank and returns to the trained model's at rank 4.

    The final checkpoint's input embedding is step0's plus a rank-4 update,
    so LoRA ranks below 4 cannot reconstruct it and ranks from 4 on can.
    "Sharpest drop" is measured on the excess log-perplexity over the
    trained model, log(perplexity / baseline): it shrinks by the largest
    factor from rank 2 to rank 4.
    """
    job = reconstruct_job(tmp_path / "job.toml", rank_setup)
    out = tmp_path / "out"
    result = cli.invoke(app, ["submit", str(job), "--out", str(out), "--cpus-per-task", "1"])
    assert result.exit_code == 0, result.output
    assert "5 ranks trained, 0 already finished" in " ".join(result.output.split())

    rows = sorted(pq.read_table(out / "lora_table.parquet").to_pylist(), key=lambda row: row["rank"])
    assert [row["rank"] for row in rows] == RANKS
    assert {row["status"] for row in rows} == {"ok"}
    perplexity = {row["rank"]: row["perplexity"] for row in rows}
    baseline = rows[0]["baseline_perplexity"]
    start = rows[0]["start_perplexity"]
    print("perplexity by rank:", {rank: round(value, 3) for rank, value in perplexity.items()},
          f"trained model {baseline:.3f}, step0 embedding {start:.3f}")

    true_rank = rank_setup.true_rank
    assert start > 10 * baseline
    for smaller, larger in zip(RANKS, RANKS[1:]):
        assert perplexity[larger] <= 1.02 * perplexity[smaller], (smaller, larger)
    for rank in RANKS:
        if rank >= true_rank:
            assert perplexity[rank] < 1.03 * baseline, rank
        else:
            assert perplexity[rank] > 1.5 * baseline, rank

    excess = {rank: math.log(value / baseline) for rank, value in perplexity.items()}
    shrink = {larger: excess[smaller] / max(excess[larger], 1e-6) for smaller, larger in zip(RANKS, RANKS[1:])}
    assert max(shrink, key=shrink.get) == true_rank
    drops = {larger: math.log(perplexity[smaller] / perplexity[larger]) for smaller, larger in zip(RANKS, RANKS[1:])}
    assert drops[true_rank] > max(drops[rank] for rank in RANKS if rank > true_rank)

    again = cli.invoke(app, ["submit", str(job), "--out", str(out), "--cpus-per-task", "1"])
    assert again.exit_code == 0, again.output
    assert "0 ranks trained, 5 already finished" in " ".join(again.output.split())

    # The ID measured for the final checkpoint in the same folder is marked on the report's plot.
    id_job = write_job(tmp_path / "id.toml", f"""
        name = "tiny-id"
        k = 10
        [[sources]]
        source = "{rank_setup.final}"
    """)
    measured = cli.invoke(app, ["submit", str(id_job), "--out", str(out)])
    assert measured.exit_code == 0, measured.output
    reported = cli.invoke(app, ["report", str(out)])
    assert reported.exit_code == 0, reported.output
    built = reports.build_report(out)
    assert [curve.mode for curve in built.lora] == ["reconstruct"]
    id_mle = pq.read_table(out / "id_table.parquet").column("id_mle")[0].as_py()
    assert built.lora[0].id_row["id_mle"] == id_mle
    text = (out / "report" / "report.md").read_text()
    assert "## Perplexity against LoRA rank" in text
    assert f"measured ID (MLE) {id_mle:.2f}" in text
    assert (out / "report" / plots.LORA_FIGURE).exists()


def test_submit_rejects_id_options_for_lora(rank_setup, tmp_path):
    job = reconstruct_job(tmp_path / "job.toml", rank_setup)
    result = cli.invoke(app, ["submit", str(job), "--k", "10", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "--k apply only to ID sweeps" in " ".join(result.output.split())


def test_submit_dry_run_lists_ranks(rank_setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = reconstruct_job(tmp_path / "job.toml", rank_setup)
    result = cli.invoke(app, ["submit", str(job), "--dry-run", "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert "2 LoRA ranks" in result.output
    assert not (tmp_path / "results").exists()


# Reports.


def lora_row(rank, perplexity, model="EleutherAI/pythia-70m", revision="step143000", mode="reconstruct",
             status="ok"):
    cell = LoraCell("sweep", model, model, revision, mode, rank, model, "step0", None, TextData(("a.txt",)),
                    TrainingSettings(steps=100))
    row = base_lora_row(cell)
    if status == "ok":
        row.update(perplexity=perplexity, baseline_perplexity=20.0, start_perplexity=500.0,
                   train_loss=math.log(perplexity), hidden_size=512)
    return finish_row(row, 0.0, status, None if status == "ok" else RuntimeError("out of memory"))


def id_row(revision, step, id_mle, source="EleutherAI/pythia-70m"):
    from raysweep.cell import base_row
    from raysweep.estimator import EstimatorSettings
    from raysweep.jobs import Cell

    row = base_row(Cell("ids", source, source, revision, "input", None, EstimatorSettings(k=20)))
    row.update(status="ok", id_mle=id_mle, hidden_size=512, step=step, finished_at=None, seconds=1.0)
    return row


def test_id_row_prefers_same_revision():
    rows = [id_row("step1000", 1000, 30.0), id_row("step143000", 143000, 40.0), id_row("step512", 512, 50.0)]
    assert find_id_row(rows, "EleutherAI/pythia-70m", "step1000")["id_mle"] == 30.0
    assert find_id_row(rows, "hub:EleutherAI/pythia-70m", "step7")["id_mle"] == 40.0
    assert find_id_row(rows, "EleutherAI/pythia-160m", "step1000") is None


def test_report_on_lora_only_folder(tmp_path):
    for rank, value in ((1, 60.0), (2, 40.0), (4, 21.0), (8, 20.5)):
        store.write_lora_result(tmp_path, lora_row(rank, value))
    store.write_lora_result(tmp_path, lora_row(16, 0.0, status="failed"))
    store.write_lora_result(tmp_path, lora_row(1, 21.0, mode="adapt"))

    ids = tmp_path / "ids"
    store.write_cell(ids, id_row("step143000", 143000, 5.5))
    built = reports.build_report(tmp_path, id_table=ids)
    assert built.series == ()
    assert [curve.name for curve in built.lora] == ["EleutherAI/pythia-70m @ step143000 (adapt)",
                                                    "EleutherAI/pythia-70m @ step143000 (reconstruct)"]
    reconstruct = built.lora[1]
    assert [row["rank"] for row in reconstruct.rows] == [1, 2, 4, 8, 16]
    assert reconstruct.count("failed") == 1
    assert reconstruct.id_row["id_mle"] == 5.5

    figure = plots.lora_figure(built.lora)
    axis = figure.axes[0]
    lines = {line.get_gid(): line for line in axis.get_lines()}
    curve = lines["lora:EleutherAI/pythia-70m @ step143000 (reconstruct)"]
    assert list(curve.get_xdata()) == [1, 2, 4, 8]
    assert list(curve.get_ydata()) == [60.0, 40.0, 21.0, 20.5]
    assert list(lines["lora-id:EleutherAI/pythia-70m"].get_xdata()) == [5.5, 5.5]
    assert list(lines["lora-baseline"].get_ydata()) == [20.0, 20.0]
    assert "lora-failed:EleutherAI/pythia-70m @ step143000 (reconstruct)" in lines
    assert axis.get_xscale() == "log"
    assert axis.get_yscale() == "log"

    written = reports.write_report(built, tmp_path / "report")
    assert tmp_path / "report" / plots.LORA_FIGURE in written
    text = (tmp_path / "report" / "report.md").read_text()
    assert "measured ID (MLE) 5.50 with k=20 at revision step143000" in text
    assert "1 LoRA rank failed" in text
    html = (tmp_path / "report" / "report.html").read_text()
    assert 'id="lora"' in html


def test_report_without_id_row_says_so(tmp_path):
    store.write_lora_result(tmp_path, lora_row(1, 30.0))
    result = cli.invoke(app, ["report", str(tmp_path), "--format", "md"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "has no finished input-embedding row for EleutherAI/pythia-70m" in text
    assert "Perplexity against LoRA rank" in text


def test_cli_report_id_table_option(tmp_path):
    store.write_lora_result(tmp_path / "lora-out", lora_row(2, 30.0))
    store.write_cell(tmp_path / "ids", id_row("step143000", 143000, 7.25))
    store.write_union(tmp_path / "ids")
    result = cli.invoke(app, ["report", str(tmp_path / "lora-out"), "--id-table",
                              str(tmp_path / "ids" / "id_table.parquet"), "--format", "md"])
    assert result.exit_code == 0, result.output
    assert "measured ID (MLE) 7.25" in (tmp_path / "lora-out" / "report" / "report.md").read_text()
