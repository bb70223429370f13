"""Parquet storage of results: one file per finished cell, written atomically.

Layout of a results folder:

    OUT/cells/<cell_key>.parquet    one row of the ID table per cell
    OUT/tokens/<cell_key>.parquet   per-token LIDs of that cell
    OUT/id_table.parquet            union of the cell rows, rewritten after a run

A cell counts as finished when its cell file has a valid Parquet footer and
status "ok", and its tokens file is readable too. The tokens file is written
first, so a cell file never points at per-token data that is not there.
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
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
