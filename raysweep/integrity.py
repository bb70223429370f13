"""Flag revisions whose embedding equals another revision's of the same model.

The Hub has served some Pythia step branches with another revision's weights.
Public reports name several pythia-2.8b branches that serve the final model,
and pythia-12b step50000 and step58000, which serve the final first shard.
Training changes the embedding at every step, so two revisions of one model
with the same `tensor_sha256` point at such a defect.

Within each source, matrix and tensor key, the revisions of equal sha256 form
a group. The latest training step of the group is its reference. The known defect is
an early branch serving later weights (pythia-12b step50000 serves the final
model), and saved weights cannot come from a step later than their own. A group without step revisions takes the first name.
Every other revision gets `duplicate_of` = the reference and a logged warning. Not flagged: `main` when
it equals the source's last step, which is where `main` points, and two
revisions that resolved to the same commit.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from raysweep import store

logger = logging.getLogger(__name__)


def duplicate_flags(rows: list[dict]) -> dict[str, str | None]:
    """Return the `duplicate_of` value of every "ok" row with a sha256, by cell key."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok" and row.get("tensor_sha256"):
            groups[(row["source"], row["matrix"], row["tensor_key"])].append(row)

    flags: dict[str, str | None] = {}
    for (source, matrix, _), members in groups.items():
        last_step = max((row["step"] for row in members if row["step"] is not None), default=None)
        last_sha = {row["tensor_sha256"] for row in members if last_step is not None and row["step"] == last_step}
        by_sha: dict[str, list[dict]] = defaultdict(list)
        for row in members:
            flags[row["cell_key"]] = None
            by_sha[row["tensor_sha256"]].append(row)

        for sha, equal in by_sha.items():
            revisions = sorted({row["revision"] or "" for row in equal}, key=_revision_order(equal))
            if len(revisions) < 2:
                continue
            steps = {row["revision"] or "": row["step"] for row in equal if row["step"] is not None}
            reference = max(steps, key=steps.get) if steps else revisions[0]
            reference_commits = {row["resolved_revision"] for row in equal if (row["revision"] or "") == reference}
            for row in equal:
                revision = row["revision"] or ""
                if revision == reference:
                    continue
                if revision == "main" and sha in last_sha:
                    continue
                if row["resolved_revision"] is not None and row["resolved_revision"] in reference_commits:
                    continue
                flags[row["cell_key"]] = reference
    return flags


def flag_duplicate_revisions(out: Path) -> dict[str, dict]:
    """Set `duplicate_of` in the cell files of a results folder and log a warning per flagged revision.

    Compares every finished cell in the folder, not only one job's, and
    rewrites only the cell files whose flag changed.

    Returns:
        The rewritten rows by cell key.
    """
    rows = store.read_table(out).to_pylist()
    flags = duplicate_flags(rows)
    changed: dict[str, dict] = {}
    warned: set[tuple] = set()
    for row in rows:
        if row["cell_key"] not in flags:
            continue
        flag = flags[row["cell_key"]]
        if flag is not None and (row["source"], row["revision"], row["matrix"]) not in warned:
            warned.add((row["source"], row["revision"], row["matrix"]))
            logger.warning(
                "%s @ %s: the %s embedding equals that of %s (sha256 %s); the Hub may serve one of "
                "these revisions with another revision's weights",
                row["source"], row["revision"], row["matrix"], flag, row["tensor_sha256"][:16],
            )
        if row.get("duplicate_of") != flag:
            row["duplicate_of"] = flag
            store.write_cell(out, row)
            changed[row["cell_key"]] = row
    return changed


def _revision_order(rows: list[dict]):
    steps = {row["revision"] or "": row["step"] for row in rows}

    def key(revision: str) -> tuple:
        step = steps.get(revision)
        return (0, step, "") if step is not None else (1, 0, revision)

    return key
