"""Summarise a results folder: finished, failed, missing and not started cells."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from raysweep import store
from raysweep.jobs import Job


@dataclass
class FolderStatus:
    """Cells of a results folder by state, with the rows of those that have one."""

    counts: Counter = field(default_factory=Counter)
    failed: list[dict] = field(default_factory=list)
    missing: list[dict] = field(default_factory=list)
    not_started: list = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def folder_status(out: Path, job: Job | None = None) -> FolderStatus:
    """Read every cell file under `out`; with a job, also list its cells that have none.

    Raises:
        FileNotFoundError: `out` is not a results folder.
    """
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"results folder {out} does not exist; pass the --out folder of a submit")
    if not (out / "cells").is_dir() and job is None:
        raise FileNotFoundError(f"{out} has no cells/ folder; is it a raysweep results folder?")

    status = FolderStatus()
    keys = {path.stem for path in (out / "cells").glob("*.parquet")} if (out / "cells").is_dir() else set()
    if job is not None:
        wanted = {cell.cell_key: cell for cell in job.cells}
        status.not_started = [cell for key, cell in wanted.items() if key not in keys]
        keys &= set(wanted)
        status.counts["not started"] = len(status.not_started)

    for key in sorted(keys):
        row = store.read_cell(out, key)
        if row is None:
            status.unreadable.append(key)
            status.counts["unreadable"] += 1
            continue
        if row["status"] == "ok" and not store.is_finished(out, key):
            status.unreadable.append(key)
            status.counts["unreadable"] += 1
            continue
        status.counts[row["status"]] += 1
        if row["status"] == "failed":
            status.failed.append(row)
        elif row["status"] == "missing":
            status.missing.append(row)
    return status
