"""LoRA rank sweeps in a report: perplexity-against-rank curves and the ID measured for the same model.

Reads OUT/lora/KEY.parquet (or OUT/lora_table.parquet) as written by
`raysweep.lora_runner` and imports neither torch nor ray. Rows are grouped
into curves: one model, revision, mode and training setting across ranks.
Each curve gets the ID-table row of the same model, when one exists: the
same revision if measured, else the model's finished revision with the
highest training step.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raysweep import store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraCurve:
    """The ranks of one LoRA sweep setting, and the measured ID of its model.

    Attributes:
        name: display name, unique within a report.
        rows: the rows of `store.LORA_SCHEMA`, ordered by rank.
        id_row: the ID-table row marked on the plot, or None when the ID
            table has no finished input-matrix row for the model.
    """

    name: str
    model: str
    revision: str | None
    mode: str
    rows: tuple[dict, ...]
    id_row: dict | None = None

    @property
    def ok_rows(self) -> list[dict]:
        return [row for row in self.rows if row["status"] == "ok"]

    @property
    def baseline_perplexity(self) -> float | None:
        """Perplexity of the unmodified model, from the first finished rank."""
        return next((row["baseline_perplexity"] for row in self.ok_rows), None)

    @property
    def start_perplexity(self) -> float | None:
        """Perplexity before training: the unmodified model, or the one with the initial embedding."""
        return next((row["start_perplexity"] for row in self.ok_rows), None)

    def count(self, status: str) -> int:
        return sum(1 for row in self.rows if row["status"] == status)


def load_lora_rows(folder: Path) -> tuple[list[dict], list[str]]:
    """Return the LoRA rows of a results folder and the files that could not be read.

    The rank files are read first, because OUT/lora_table.parquet is rewritten
    only at the end of a run. Rows of the table without a rank file are added.
    """
    folder = Path(folder)
    rows, unreadable = [], []
    keys = set()
    for path in sorted((folder / "lora").glob("*.parquet")):
        row = store.read_lora_result(folder, path.stem)
        if row is None:
            unreadable.append(str(path))
            continue
        rows.append(row)
        keys.add(row["cell_key"])

    union = folder / store.LORA_TABLE_NAME
    if union.exists():
        try:
            table = pq.read_table(union)
        except (pa.ArrowInvalid, OSError) as error:
            logger.warning("skipping unreadable LoRA table %s (%s)", union, error)
            unreadable.append(f"{union}: {error}")
        else:
            for row in table.to_pylist():
                if row.get("cell_key") not in keys:
                    rows.append({**dict.fromkeys(store.LORA_COLUMNS), **row})
    return rows, unreadable


def group_curves(rows: list[dict], id_rows: list[dict]) -> tuple[LoraCurve, ...]:
    """Group LoRA rows into curves and attach each model's ID row."""
    members: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        members[_curve_key(row)].append(row)

    names = _curve_names(list(members))
    curves = []
    for key, group in members.items():
        first = group[0]
        curves.append(LoraCurve(
            name=names[key],
            model=first["model"],
            revision=first["revision"],
            mode=first["mode"],
            rows=tuple(sorted(group, key=lambda row: row["rank"])),
            id_row=find_id_row(id_rows, first["model"], first["revision"]),
        ))
    return tuple(sorted(curves, key=lambda curve: (curve.model, curve.revision or "", curve.mode, curve.name)))


def find_id_row(id_rows: list[dict], model: str, revision: str | None) -> dict | None:
    """Return the ID-table row of a model: the same revision, else its finished revision with the highest step.

    Only finished rows of the input matrix that are not flagged as duplicates
    count. A Hub id matches with or without the "hub:" prefix; a local folder
    matches by resolved path.
    """
    wanted = _normalised_source(model)
    candidates = [
        row for row in id_rows
        if row.get("status") == "ok" and (row.get("matrix") or "input") == "input"
        and not row.get("duplicate_of") and _normalised_source(row.get("source") or "") == wanted
    ]
    if not candidates:
        return None
    same = [row for row in candidates if (row.get("revision") or None) == (revision or None)]
    pool = same or candidates
    return max(pool, key=lambda row: (-1 if row.get("step") is None else row["step"], row.get("k") or 0,
                                      row.get("cell_key") or ""))


def _normalised_source(source: str) -> str:
    source = source.removeprefix("hub:")
    path = Path(source).expanduser()
    if path.is_absolute() or path.exists():
        return str(path.resolve())
    return source


def _curve_key(row: dict) -> tuple:
    """Everything of a row's setting except the rank (and lora_alpha where it follows the rank)."""
    alpha = "rank" if row["lora_alpha"] == row["rank"] else row["lora_alpha"]
    return (row["label"] or row["model"], row["model"], row["revision"], row["mode"], row["initial_model"],
            row["initial_revision"], row["target_module"], row["data"], row["steps"], row["learning_rate"],
            row["warmup_steps"], row["batch_size"], row["sequence_length"], row["seed"], alpha, row["rslora"])


# Positions in `_curve_key` and the names shown when they tell two curves apart.
_DISTINGUISHING = ((7, "data"), (8, "steps"), (9, "lr"), (10, "warmup"), (11, "batch"), (12, "length"),
                   (13, "seed"), (14, "alpha"), (15, "rslora"), (4, "initial"))


def _curve_names(keys: list[tuple]) -> dict[tuple, str]:
    """Name each curve "LABEL @ REVISION (MODE)", adding the settings that tell apart curves of one name."""
    base = {key: _base_name(key) for key in keys}
    groups: dict[str, list[tuple]] = defaultdict(list)
    for key in keys:
        groups[base[key]].append(key)

    names = {}
    for name, group in groups.items():
        for key in group:
            details = []
            for position, label in _DISTINGUISHING:
                if len(group) > 1 and len({other[position] for other in group}) > 1:
                    details.append(f"{label}={_short(key[position])}")
            names[key] = f"{name} [{', '.join(details)}]" if details else name
    return names


def _base_name(key: tuple) -> str:
    label, _, revision, mode = key[:4]
    return f"{label} @ {revision} ({mode})" if revision else f"{label} ({mode})"


def _short(value) -> str:
    if isinstance(value, str) and value.startswith("{"):
        data = json.loads(value)
        return ",".join(Path(name).name for name in data.get("train", []))
    return f"{value:g}" if isinstance(value, float) else str(value)
