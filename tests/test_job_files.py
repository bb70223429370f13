"""The bundled modern-llms and word-embeddings jobs."""

from __future__ import annotations

from raysweep.cell import compute_cell
from raysweep.jobs import load_job


def test_modern_llms_job():
    job = load_job("modern-llms")
    sources = [cell.source for cell in job.cells]
    assert len(sources) == 7
    assert "meta-llama/Llama-3.2-1B" in sources
    assert "Qwen/Qwen2.5-0.5B" in sources
    assert all(cell.revision is None for cell in job.cells)
    assert all(cell.row_policy == "tokenizer" for cell in job.cells)
    assert {cell.source: cell.shards for cell in job.cells}["google/gemma-2-2b"] == 4


def test_word_embeddings_job_missing_files(tmp_path, monkeypatch):
    job = load_job("word-embeddings")
    assert [cell.label for cell in job.cells] == [
        "word2vec-GoogleNews-300", "glove-840B-300", "fasttext-crawl-300d-2M"]
    assert all(cell.source.startswith("word-vectors/") for cell in job.cells)

    monkeypatch.chdir(tmp_path)
    row = compute_cell(job.cells[0]).row
    assert row["status"] == "missing"
    assert "word-vectors/GoogleNews-vectors-negative300.bin.gz" in row["error"]
