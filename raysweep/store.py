"""Parquet storage of results: one file per finished cell, written atomically.

Layout of a results folder:

    OUT/cells/<cell_key>.parquet    one row of the ID table per cell
    OUT/tokens/<cell_key>.parquet   per-token LIDs of that cell
    OUT/id_table.parquet            union of the cell rows, rewritten after a run
    OUT/lora/<cell_key>.parquet     one row per rank of a LoRA rank sweep
    OUT/lora_table.parquet          union of the LoRA rows, rewritten after a run

A cell counts as finished when its cell file has a valid Parquet footer and
status "ok", and its tokens file is readable too. The tokens file is written
first, so a cell file never points at per-token data that is not there.
A LoRA rank counts as finished when its file has a valid footer and status "ok".
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

STATUSES = ("ok", "failed", "missing")

# Fixed schema: an inferred one would type an all-null column as null and
# break appends and unions.
ID_TABLE_SCHEMA = pa.schema(
    [
        ("job", pa.string()),
        ("cell_key", pa.string()),
        ("label", pa.string()),
        ("source", pa.string()),
        ("revision", pa.string()),
        ("step", pa.int64()),
        ("matrix", pa.string()),
        ("k", pa.int32()),
        ("k_min", pa.int32()),
        ("metric", pa.string()),
        ("duplicate_policy", pa.string()),
        ("row_policy", pa.string()),
        ("rows_in_matrix", pa.int64()),
        ("tokenizer_rows", pa.int64()),
        ("rows_used", pa.int64()),
        ("duplicate_rows", pa.int64()),
        ("malformed_rows", pa.int64()),
        ("hidden_size", pa.int64()),
        ("id_mle", pa.float64()),
        ("id_mean", pa.float64()),
        ("id_median", pa.float64()),
        ("redundancy", pa.float64()),
        ("nonfinite_lid", pa.int64()),
        ("rescanned_rows", pa.int64()),
        ("tensor_key", pa.string()),
        ("tensor_sha256", pa.string()),
        ("duplicate_of", pa.string()),
        ("weights_file", pa.string()),
        ("weights_format", pa.string()),
        ("dtype", pa.string()),
        ("resolved_revision", pa.string()),
        ("device", pa.string()),
        ("ray_node_id", pa.string()),
        ("gpu_ids", pa.string()),
        ("fetched_bytes", pa.int64()),
        ("seconds", pa.float64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("raysweep_version", pa.string()),
        ("estimator_version", pa.string()),
        ("torch_version", pa.string()),
        ("ray_version", pa.string()),
        ("python_version", pa.string()),
        ("hostname", pa.string()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)

TOKENS_SCHEMA = pa.schema(
    [
        ("cell_key", pa.string()),
        ("row", pa.int64()),
        ("token", pa.string()),
        ("lid", pa.float64()),
    ]
)

COLUMNS = tuple(ID_TABLE_SCHEMA.names)


def cell_path(out: Path, cell_key: str) -> Path:
    return Path(out) / "cells" / f"{cell_key}.parquet"


def tokens_path(out: Path, cell_key: str) -> Path:
    return Path(out) / "tokens" / f"{cell_key}.parquet"


def write_cell(out: Path, row: dict, tokens: pa.Table | None = None) -> None:
    """Write one cell's row (and its per-token table) atomically.

    Raises:
        ValueError: if the row misses a column, has an unknown one, or a value
            does not fit the schema.
    """
    missing = set(COLUMNS) - set(row)
    extra = set(row) - set(COLUMNS)
    if missing or extra:
        raise ValueError(f"cell row does not match the schema: missing {sorted(missing)}, unknown {sorted(extra)}")
    if row["status"] not in STATUSES:
        raise ValueError(f"status {row['status']!r} is not one of {STATUSES}")
    table = pa.Table.from_pylist([row], schema=ID_TABLE_SCHEMA)
    if tokens is not None:
        _write_atomic(tokens.cast(TOKENS_SCHEMA), tokens_path(out, row["cell_key"]))
    _write_atomic(table, cell_path(out, row["cell_key"]))


def tokens_table(cell_key: str, rows, tokens, lids) -> pa.Table:
    """Build the per-token table of one cell."""
    count = len(lids)
    return pa.table(
        {
            "cell_key": pa.array([cell_key] * count, pa.string()),
            "row": pa.array(rows, pa.int64()),
            "token": pa.array(tokens if tokens is not None else [None] * count, pa.string()),
            "lid": pa.array(lids, pa.float64()),
        },
        schema=TOKENS_SCHEMA,
    )


def read_cell(out: Path, cell_key: str) -> dict | None:
    """Return a cell's row, or None when the file is absent or corrupt."""
    path = cell_path(out, cell_key)
    if not path.exists():
        return None
    try:
        table = pq.read_table(path, schema=ID_TABLE_SCHEMA)
    except (pa.ArrowInvalid, OSError) as error:
        logger.warning("ignoring unreadable result %s (%s); the cell will be recomputed", path, error)
        return None
    if table.num_rows != 1:
        logger.warning("ignoring %s: %d rows instead of 1; the cell will be recomputed", path, table.num_rows)
        return None
    return table.to_pylist()[0]


def is_finished(out: Path, cell_key: str) -> bool:
    """Return True when a cell has a valid "ok" row and readable per-token LIDs."""
    row = read_cell(out, cell_key)
    if row is None or row["status"] != "ok":
        return False
    try:
        pq.read_metadata(tokens_path(out, cell_key))
    except (pa.ArrowInvalid, OSError):
        return False
    return True


def read_table(out: Path) -> pa.Table:
    """Return the union of all readable cell rows under a results folder."""
    rows = []
    for path in sorted((Path(out) / "cells").glob("*.parquet")):
        row = read_cell(out, path.stem)
        if row is not None:
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=ID_TABLE_SCHEMA)


def write_union(out: Path) -> Path:
    """Rewrite OUT/id_table.parquet from the cell files; return its path."""
    path = Path(out) / "id_table.parquet"
    _write_atomic(read_table(out), path)
    return path


def _write_atomic(table: pa.Table, path: Path) -> None:
    """Write to a temporary name in the same folder, flush to disk, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            pq.write_table(table, stream)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates the file readable by its owner only; give it the
        # mode a plain open() would, so results on a shared disk are readable.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# One row per rank of a LoRA rank sweep (raysweep.lora_train). Perplexities
# are exp of the mean next-token loss over the evaluation blocks.
LORA_SCHEMA = pa.schema(
    [
        ("job", pa.string()),
        ("cell_key", pa.string()),
        ("label", pa.string()),
        ("model", pa.string()),
        ("revision", pa.string()),
        ("resolved_revision", pa.string()),
        ("mode", pa.string()),
        ("rank", pa.int64()),
        ("lora_alpha", pa.float64()),
        ("rslora", pa.bool_()),
        ("target_module", pa.string()),
        ("initial_model", pa.string()),
        ("initial_revision", pa.string()),
        ("initial_sha256", pa.string()),
        ("embedding_rows", pa.int64()),
        ("hidden_size", pa.int64()),
        ("tied_embeddings", pa.bool_()),
        ("trainable_parameters", pa.int64()),
        ("steps", pa.int64()),
        ("learning_rate", pa.float64()),
        ("warmup_steps", pa.int64()),
        ("batch_size", pa.int64()),
        ("sequence_length", pa.int64()),
        ("seed", pa.int64()),
        ("data", pa.string()),
        ("train_tokens", pa.int64()),
        ("eval_tokens", pa.int64()),
        ("data_sha256", pa.string()),
        ("baseline_perplexity", pa.float64()),
        ("start_perplexity", pa.float64()),
        ("perplexity", pa.float64()),
        ("eval_loss", pa.float64()),
        ("train_loss_first", pa.float64()),
        ("train_loss", pa.float64()),
        ("device", pa.string()),
        ("ray_node_id", pa.string()),
        ("gpu_ids", pa.string()),
        ("train_seconds", pa.float64()),
        ("seconds", pa.float64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("raysweep_version", pa.string()),
        ("lora_version", pa.string()),
        ("torch_version", pa.string()),
        ("transformers_version", pa.string()),
        ("peft_version", pa.string()),
        ("ray_version", pa.string()),
        ("python_version", pa.string()),
        ("hostname", pa.string()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)

LORA_COLUMNS = tuple(LORA_SCHEMA.names)
LORA_TABLE_NAME = "lora_table.parquet"


def lora_path(out: Path, cell_key: str) -> Path:
    return Path(out) / "lora" / f"{cell_key}.parquet"


def write_lora_result(out: Path, row: dict) -> None:
    """Write one LoRA rank's row atomically to OUT/lora/KEY.parquet.

    Raises:
        ValueError: if the row misses a column, has an unknown one, has an
            unknown status, or a value does not fit the schema.
    """
    missing = set(LORA_COLUMNS) - set(row)
    extra = set(row) - set(LORA_COLUMNS)
    if missing or extra:
        raise ValueError(f"LoRA row does not match the schema: missing {sorted(missing)}, unknown {sorted(extra)}")
    if row["status"] not in STATUSES:
        raise ValueError(f"status {row['status']!r} is not one of {STATUSES}")
    _write_atomic(pa.Table.from_pylist([row], schema=LORA_SCHEMA), lora_path(out, row["cell_key"]))


def read_lora_result(out: Path, cell_key: str) -> dict | None:
    """Return a LoRA rank's row, or None when its file is absent or unreadable."""
    path = lora_path(out, cell_key)
    if not path.exists():
        return None
    try:
        table = pq.read_table(path, schema=LORA_SCHEMA)
    except (pa.ArrowInvalid, OSError) as error:
        logger.warning("ignoring unreadable result %s (%s); the rank will be trained again", path, error)
        return None
    if table.num_rows != 1:
        logger.warning("ignoring %s: %d rows instead of 1; the rank will be trained again", path, table.num_rows)
        return None
    return table.to_pylist()[0]


def is_lora_finished(out: Path, cell_key: str) -> bool:
    """Return True when a LoRA rank has a readable row with status "ok"."""
    row = read_lora_result(out, cell_key)
    return row is not None and row["status"] == "ok"


def read_lora_table(out: Path) -> pa.Table:
    """Return the union of all readable LoRA rows under a results folder."""
    rows = []
    for path in sorted((Path(out) / "lora").glob("*.parquet")):
        row = read_lora_result(out, path.stem)
        if row is not None:
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=LORA_SCHEMA)


def write_lora_union(out: Path) -> Path:
    """Rewrite OUT/lora_table.parquet from the LoRA rank files; return its path."""
    path = Path(out) / LORA_TABLE_NAME
    _write_atomic(read_lora_table(out), path)
    return path
