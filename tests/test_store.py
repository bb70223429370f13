"""Store: explicit schema, atomic cell files, corrupt-file detection, union."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysweep import store


def make_row(cell_key: str, status: str = "ok", **values) -> dict:
    row = dict.fromkeys(store.COLUMNS)
    row.update(cell_key=cell_key, status=status, label=cell_key, id_mle=3.0,
               finished_at=datetime(2026, 1, 1, tzinfo=timezone.utc), **values)
    return row


def make_tokens(cell_key: str) -> pa.Table:
    return store.tokens_table(cell_key, [0, 1, 2], ["a", "b", None], [1.0, 2.0, float("inf")])


def test_write_and_read_cell(tmp_path):
    store.write_cell(tmp_path, make_row("abc"), make_tokens("abc"))
    assert store.read_cell(tmp_path, "abc")["id_mle"] == 3.0
    assert store.is_finished(tmp_path, "abc")
    tokens = pq.read_table(store.tokens_path(tmp_path, "abc"))
    assert tokens.schema == store.TOKENS_SCHEMA
    assert tokens.column("token").to_pylist() == ["a", "b", None]


def test_all_null_columns_keep_their_types(tmp_path):
    # Every optional column is null here; an inferred schema would type them as null.
    store.write_cell(tmp_path, make_row("nulls", status="failed", error="boom"))
    table = pq.read_table(store.cell_path(tmp_path, "nulls"))
    assert table.schema == store.ID_TABLE_SCHEMA


def test_failed_cell_is_not_finished(tmp_path):
    store.write_cell(tmp_path, make_row("bad", status="failed", error="x"))
    assert not store.is_finished(tmp_path, "bad")


def test_truncated_cell_file_detected(tmp_path):
    store.write_cell(tmp_path, make_row("cut"), make_tokens("cut"))
    path = store.cell_path(tmp_path, "cut")
    path.write_bytes(path.read_bytes()[:-20])
    assert store.read_cell(tmp_path, "cut") is None
    assert not store.is_finished(tmp_path, "cut")


def test_missing_tokens_file_means_unfinished(tmp_path):
    store.write_cell(tmp_path, make_row("half"), make_tokens("half"))
    store.tokens_path(tmp_path, "half").unlink()
    assert not store.is_finished(tmp_path, "half")


def test_row_must_match_schema(tmp_path):
    row = make_row("x")
    del row["id_mle"]
    with pytest.raises(ValueError, match=r"missing \['id_mle'\]"):
        store.write_cell(tmp_path, row)
    with pytest.raises(ValueError, match="status 'done' is not one of"):
        store.write_cell(tmp_path, make_row("x", status="done"))
    assert not store.cell_path(tmp_path, "x").exists()


def test_failed_write_leaves_no_file(tmp_path):
    row = make_row("typed", k="twenty")  # not an int32
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        store.write_cell(tmp_path, row)
    assert not store.cell_path(tmp_path, "typed").exists()
    assert list(tmp_path.rglob("*.tmp")) == []


def test_union_skips_corrupt_files(tmp_path):
    for key in ("a", "b", "c"):
        store.write_cell(tmp_path, make_row(key), make_tokens(key))
    store.cell_path(tmp_path, "b").write_bytes(b"PAR1 not parquet")
    union = pq.read_table(store.write_union(tmp_path))
    assert sorted(union.column("cell_key").to_pylist()) == ["a", "c"]
    assert union.schema == store.ID_TABLE_SCHEMA


def test_no_temporary_files_left(tmp_path):
    store.write_cell(tmp_path, make_row("t"), make_tokens("t"))
    store.write_union(tmp_path)
    leftovers = [path.name for path in tmp_path.rglob("*.tmp")]
    assert leftovers == []


def test_result_files_readable_by_others(tmp_path):
    import os
    import stat

    store.write_cell(tmp_path, make_row("mode"), make_tokens("mode"))
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(store.cell_path(tmp_path, "mode").stat().st_mode) == expected
    assert stat.S_IMODE(store.tokens_path(tmp_path, "mode").stat().st_mode) == expected
