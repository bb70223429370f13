"""Synthetic results folders shaped like real sweeps, for report tests.

`pythia_sweep_rows` builds the ID table of a full all-pythia sweep (10 models
x 154 checkpoints) with the exact `store.ID_TABLE_SCHEMA` columns, smooth
made-up ID values, and a few cells missing, failed or flagged as duplicates.
The values are not measurements: they only have the shape of real ones.
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysweep import store
from raysweep.schedules import PYTHIA_MODELS, SCHEDULES, step_of

JOB = "all-pythia"

# (model, revision) pairs; chosen to cover step 0, the log-spaced steps, the
# 1000-step grid and the last step.
MISSING = {
    ("EleutherAI/pythia-160m", "step3000"),
    ("EleutherAI/pythia-1b", "step0"),
    ("EleutherAI/pythia-6.9b", "step143000"),
}
FAILED = {
    ("EleutherAI/pythia-410m", "step64"),
    ("EleutherAI/pythia-2.8b", "step98000"),
}
# Flagged revision -> the later revision whose embedding it repeats, as
# raysweep.integrity sets `duplicate_of`: branches that serve the final model.
DUPLICATES = {
    ("EleutherAI/pythia-2.8b", "step40000"): "step143000",
    ("EleutherAI/pythia-2.8b", "step41000"): "step143000",
    ("EleutherAI/pythia-12b", "step58000"): "step143000",
}


def pythia_sweep_rows(
    missing: set = MISSING,
    failed: set = FAILED,
    duplicates: dict = DUPLICATES,
    models=PYTHIA_MODELS,
    revisions=SCHEDULES["pythia"],
) -> list[dict]:
    """Return the ID-table rows of a synthetic all-pythia sweep, one per (model, revision)."""
    rows = []
    for model in models:
        values = {revision: _synthetic_values(model.hidden_size, step_of(revision)) for revision in revisions}
        for revision in revisions:
            pair = (model.repo_id, revision)
            row = sweep_row(model.repo_id, revision, model.hidden_size, model.embedding_rows)
            if pair in missing:
                row.update(status="missing", error=f"SourceMissing: revision {revision!r} not found on the Hub")
            elif pair in failed:
                row.update(status="failed", error="RuntimeError: CUDA out of memory\nTraceback line two")
            else:
                reference = duplicates.get(pair)
                source_revision = reference or revision
                row.update(_ok_values(model.hidden_size, values[source_revision]))
                row["tensor_sha256"] = _digest(model.repo_id, source_revision)
                if "duplicate_of" in row:
                    row["duplicate_of"] = reference
            rows.append(row)
    return rows


def sweep_row(source: str, revision: str | None, hidden_size: int, rows_in_matrix: int, job: str = JOB,
              label: str | None = None, k: int = 20) -> dict:
    """Return a row with every schema column, identity filled, and values null."""
    row = dict.fromkeys(store.COLUMNS)
    row.update(
        job=job,
        cell_key=_digest(job, source, revision, k)[:24],
        label=label or source,
        source=source,
        revision=revision,
        step=step_of(revision),
        matrix="input",
        k=k,
        k_min=k,
        metric="euclidean",
        duplicate_policy="drop",
        row_policy="tokenizer",
        rows_in_matrix=rows_in_matrix,
        hidden_size=hidden_size,
        tensor_key="gpt_neox.embed_in.weight",
        weights_format="safetensors",
        status="ok",
        finished_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
    )
    return {name: value for name, value in row.items() if name in store.COLUMNS}


def synthetic_tokens(row: dict, count: int, seed: int = 0) -> pa.Table:
    """Return a per-token table whose LIDs scatter around the row's id_mle, with two infinite ones."""
    rng = np.random.default_rng(seed)
    lids = rng.gamma(shape=8.0, scale=row["id_mle"] / 8.0, size=count)
    lids[[3, 7]] = np.inf
    tokens = [f"tok{index}" for index in range(count)]
    return store.tokens_table(row["cell_key"], np.arange(count), tokens, lids)


def write_results(out: Path, rows: list[dict], *, cell_files: bool = True, union: bool = True,
                  tokens: dict[str, pa.Table] | None = None, schema: pa.Schema = store.ID_TABLE_SCHEMA) -> Path:
    """Write rows as a results folder: cell files and/or id_table.parquet, plus per-token files.

    Files are written directly, without the store's fsync, because fixtures
    with 1540 cells would otherwise spend seconds flushing.
    """
    out = Path(out)
    if cell_files:
        (out / "cells").mkdir(parents=True, exist_ok=True)
        for row in rows:
            pq.write_table(pa.Table.from_pylist([row], schema=schema), store.cell_path(out, row["cell_key"]))
    if union:
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "id_table.parquet")
    for cell_key, table in (tokens or {}).items():
        path = store.tokens_path(out, cell_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    return out


def _synthetic_values(hidden_size: int, step: int) -> float:
    """Return an ID that starts near a Gaussian's at step 0 and settles lower as training goes on."""
    start = min(0.45 * hidden_size, 250.0)
    final = 12.0 + 9.0 * math.log2(hidden_size / 64)
    return final + (start - final) * math.exp(-step / 15_000)


def _ok_values(hidden_size: int, id_mle: float) -> dict:
    values = {
        "rows_used": 50277,
        "tokenizer_rows": 50277,
        "duplicate_rows": 0,
        "id_mle": id_mle,
        "id_mean": id_mle * 1.3,
        "id_median": id_mle * 1.2,
        "redundancy": 1.0 - id_mle / hidden_size,
        "nonfinite_lid": 0,
        "rescanned_rows": 0,
        "seconds": 1.0,
    }
    return {name: value for name, value in values.items() if name in store.COLUMNS}


def _digest(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def measured_cell(out: Path, label: str, matrix: np.ndarray, tokens: list[str] | None, k: int = 10,
                  job: str = "tiny") -> dict:
    """Estimate one small matrix for real and store it as a finished cell with its per-token LIDs."""
    from raysweep.estimator import EstimatorSettings, estimate

    result = estimate(matrix, EstimatorSettings(k=k), device="cpu")
    row = sweep_row(f"{label}.npy", None, matrix.shape[1], matrix.shape[0], job=job, label=label, k=k)
    row.update(
        tensor_key=None,
        weights_format="npy",
        row_policy="all",
        rows_used=result.rows_used,
        duplicate_rows=result.duplicate_rows,
        hidden_size=result.hidden_size,
        id_mle=result.id_mle,
        id_mean=result.id_mean,
        id_median=result.id_median,
        redundancy=result.redundancy,
        nonfinite_lid=result.nonfinite_lid,
        rescanned_rows=result.rescanned_rows,
    )
    strings = None if tokens is None else [tokens[index] for index in result.row_ids]
    store.write_cell(out, row, store.tokens_table(row["cell_key"], result.row_ids, strings, result.lids))
    return row
