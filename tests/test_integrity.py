"""Duplicate-revision flags: which revisions are flagged, and the rewritten cell files."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from raysweep import store
from raysweep.integrity import duplicate_flags, flag_duplicate_revisions
from raysweep.schedules import step_of


def make_row(revision: str, sha: str, source: str = "org/model", commit: str | None = None,
             status: str = "ok", k: int = 20) -> dict:
    row = dict.fromkeys(store.COLUMNS)
    row.update(
        cell_key=f"{source}-{revision}-{k}".replace("/", "_"),
        label=source,
        source=source,
        revision=revision,
        step=step_of(revision),
        matrix="input",
        k=k,
        tensor_key="gpt_neox.embed_in.weight",
        tensor_sha256=sha,
        resolved_revision=commit or f"commit-{revision}",
        status=status,
        finished_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
    )
    return row


def flags_by_revision(rows: list[dict]) -> dict[str, str | None]:
    flags = duplicate_flags(rows)
    return {row["revision"]: flags.get(row["cell_key"]) for row in rows}


def test_earlier_equal_revision_flagged_and_main_expected():
    rows = [make_row("step0", "a"), make_row("step1000", "b"), make_row("step2000", "b"),
            make_row("step3000", "c"), make_row("main", "c")]
    assert flags_by_revision(rows) == {
        "step0": None, "step1000": "step2000", "step2000": None, "step3000": None, "main": None,
    }


def test_branch_serving_final_weights():
    # pythia-12b step50000 served the final first shard: three revisions share one sha256.
    rows = [make_row("step49000", "x"), make_row("step50000", "final"), make_row("step143000", "final"),
            make_row("main", "final")]
    assert flags_by_revision(rows) == {
        "step49000": None, "step50000": "step143000", "step143000": None, "main": None,
    }


def test_main_equal_to_an_earlier_step_flagged():
    rows = [make_row("step1000", "a"), make_row("step2000", "b"), make_row("main", "a")]
    assert flags_by_revision(rows)["main"] == "step1000"


def test_same_commit_not_flagged():
    commit = "0" * 40
    rows = [make_row("step1000", "a", commit=commit), make_row(commit, "a", commit=commit)]
    assert flags_by_revision(rows) == {"step1000": None, commit: None}


def test_other_models_and_settings_not_compared():
    rows = [make_row("step1000", "a", source="org/one"), make_row("step1000", "a", source="org/two"),
            make_row("step2000", "b", k=10), make_row("step2000", "b", k=20),
            make_row("step3000", "b", status="failed")]
    assert set(duplicate_flags(rows).values()) == {None}


def test_flags_written_and_cleared(tmp_path, caplog):
    rows = [make_row("step1000", "a"), make_row("step2000", "a"), make_row("step3000", "c")]
    stale = make_row("step3000", "c")
    stale["duplicate_of"] = "step1000"
    rows[2] = stale
    for row in rows:
        store.write_cell(tmp_path, row)

    with caplog.at_level(logging.WARNING, logger="raysweep.integrity"):
        changed = flag_duplicate_revisions(tmp_path)

    assert set(changed) == {rows[0]["cell_key"], rows[2]["cell_key"]}
    assert store.read_cell(tmp_path, rows[0]["cell_key"])["duplicate_of"] == "step2000"
    assert store.read_cell(tmp_path, rows[1]["cell_key"])["duplicate_of"] is None
    assert store.read_cell(tmp_path, rows[2]["cell_key"])["duplicate_of"] is None
    assert "org/model @ step1000: the input embedding equals that of step2000" in caplog.text
    assert flag_duplicate_revisions(tmp_path) == {}
