"""Reports from a results folder: redundancy tables, token lists, plots, one HTML page.

A report reads what `raysweep submit` wrote (the cell files or the ID table,
and the per-token LIDs; see `raysweep.store`) and recomputes no estimate. It
works on partial results, such as a sweep that is still running or has failed
or missing cells, and lists what it could not show.

The cells are grouped into series: one source, matrix and estimator setting
across its revisions. A series' "final" row is its finished, non-duplicate
revision with the highest training step. The redundancy table, the size plot
and the histograms use that row.

A folder with LoRA rank sweeps (OUT/lora/, see `raysweep.lora_report`) also
gets perplexity against rank, with the ID measured for the same model marked
when the ID table of the folder, or the one passed as `id_table`, has it.

Rendering lives in `raysweep.plots` (PNG figures) and `raysweep.pages`
(Markdown, HTML, terminal table). This module loads the data and writes files.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysweep import integrity, store
from raysweep.lora_report import LoraCurve, group_curves, load_lora_rows
from raysweep.schedules import FAMILIES, ModelInfo, step_of

logger = logging.getLogger(__name__)

REPORT_FORMATS = ("png", "html", "md")
DEFAULT_TOKEN_COUNT = 10

READ_THREADS = 8

MARKDOWN_NAME = "report.md"
HTML_NAME = "report.html"


class ReportError(ValueError):
    """A results folder that cannot be reported on, or invalid report settings."""


@dataclass(frozen=True)
class Results:
    """The rows of a results folder and where they were read from.

    Attributes:
        location: the results folder; per-token LIDs are read from its `tokens/`.
        rows: one dict per cell, with every column of `store.ID_TABLE_SCHEMA`
            (None where the file predates a column) plus any extra columns.
        read_from: what was read, for the report's header.
        unreadable: cell files that could not be read, with the reason.
        duplicate_flags_stored: whether the table has a `duplicate_of`
            column. Without one, duplicates are flagged here from `tensor_sha256`.
    """

    location: Path
    rows: tuple[dict, ...]
    read_from: str
    unreadable: tuple[str, ...] = ()
    duplicate_flags_stored: bool = True


@dataclass(frozen=True)
class Series:
    """The cells of one source, matrix and estimator setting, in training order.

    Attributes:
        name: display name, unique within a report; the label, with the
            setting appended when several series share a label.
        rows: the cells found, ordered by step (revisions without one last).
        absent: revisions expected for this series that have no cell yet.
        family: model family of the source ("pythia"), or None.
        model: the family's entry for the source (parameter count), or None.
    """

    name: str
    label: str
    source: str
    matrix: str
    k: int | None
    k_min: int | None
    duplicate_policy: str | None
    rows: tuple[dict, ...]
    absent: tuple[str, ...] = ()
    family: str | None = None
    model: ModelInfo | None = None

    @property
    def ok_rows(self) -> list[dict]:
        return [row for row in self.rows if row["status"] == "ok"]

    @property
    def duplicate_rows(self) -> list[dict]:
        return [row for row in self.ok_rows if row.get("duplicate_of")]

    @property
    def curve_rows(self) -> list[dict]:
        """Finished, non-duplicate rows with a training step: the points of a training curve."""
        return [row for row in self.ok_rows if row["step"] is not None and not row.get("duplicate_of")]

    @property
    def final_row(self) -> dict | None:
        """The finished, non-duplicate row with the highest step (any such row when none has a step)."""
        candidates = [row for row in self.ok_rows if not row.get("duplicate_of")]
        if not candidates:
            return None
        return max(candidates, key=lambda row: -1 if row["step"] is None else row["step"])

    @property
    def is_final_complete(self) -> bool:
        """Whether the final row is the series' last revision (none after it missing, failed or pending)."""
        final = self.final_row
        if final is None:
            return False
        steps = [row["step"] for row in self.rows if row["step"] is not None]
        steps += [step for step in map(step_of, self.absent) if step is not None]
        return final["step"] is None or final["step"] >= max(steps)

    @property
    def hidden_size(self) -> int | None:
        for row in [self.final_row, *self.rows]:
            if row is not None and row["hidden_size"] is not None:
                return int(row["hidden_size"])
        return self.model.hidden_size if self.model else None

    @property
    def parameters(self) -> int | None:
        return self.model.parameters if self.model else None

    @property
    def revision_count(self) -> int:
        return len(self.rows) + len(self.absent)

    @property
    def is_sweep(self) -> bool:
        """Whether the series spans several training steps, so it has a training curve."""
        steps = {row["step"] for row in self.rows if row["step"] is not None}
        return len(steps) + len(self.absent) >= 2

    def count(self, status: str) -> int:
        return sum(1 for row in self.rows if row["status"] == status)


@dataclass(frozen=True)
class TokenLids:
    """The per-token LIDs of one cell: the one a series' histogram and token lists use.

    Attributes:
        row: the cell's ID-table row.
        row_ids: matrix row of each token (int64, shape (n,)).
        lids: local ID of each token (float64, shape (n,)); inf where all
            k neighbours are at the same distance.
        tokens: token strings aligned with `lids`, or None when the source
            ships no vocabulary.
    """

    series: Series
    row: dict
    row_ids: np.ndarray
    lids: np.ndarray
    tokens: pa.Array | None

    @property
    def finite_lids(self) -> np.ndarray:
        return self.lids[np.isfinite(self.lids)]

    @property
    def is_final(self) -> bool:
        final = self.series.final_row
        return final is not None and final["cell_key"] == self.row["cell_key"]


@dataclass(frozen=True)
class RankedToken:
    """One token of a top or bottom list."""

    row: int
    token: str | None
    lid: float


@dataclass(frozen=True)
class TokenExtremes:
    """The tokens with the highest and lowest finite LID of one cell."""

    lids: TokenLids
    highest: tuple[RankedToken, ...]
    lowest: tuple[RankedToken, ...]
    nonfinite: int


@dataclass(frozen=True)
class Gaps:
    """Cells and files that a report cannot show, grouped by reason.

    Attributes:
        failed, missing: rows with that status (missing: the revision or file
            does not exist at the source).
        duplicates: finished rows whose embedding equals an earlier revision's;
            they are marked on training curves but not used as values.
        absent: (series name, revision) pairs expected but with no cell yet.
        absent_basis: how `absent` was derived: "job" (the job file's cells)
            or "revisions" (the revisions other series of the same job have).
        without_tokens: series with finished cells but no readable per-token
            file, so without histogram and token lists.
        unreadable: cell files that could not be read.
    """

    failed: tuple[dict, ...] = ()
    missing: tuple[dict, ...] = ()
    duplicates: tuple[dict, ...] = ()
    absent: tuple[tuple[str, str], ...] = ()
    absent_basis: str = "revisions"
    without_tokens: tuple[str, ...] = ()
    unreadable: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.failed or self.missing or self.duplicates or self.absent
                    or self.without_tokens or self.unreadable)


@dataclass(frozen=True)
class Report:
    """Everything a report shows, ready to render."""

    results: Results
    series: tuple[Series, ...]
    token_lids: tuple[TokenLids, ...]
    extremes: tuple[TokenExtremes, ...]
    gaps: Gaps
    job: str | None = None
    # PNG bytes by file name once rendered; None before, {} when no figure has data.
    figures: dict[str, bytes] | None = None
    # LoRA rank sweeps in the folder, one curve per model, revision, mode and setting.
    lora: tuple[LoraCurve, ...] = ()
    # Where the IDs marked on the LoRA curves come from, when not from the folder itself.
    id_table: str | None = None

    @property
    def status_counts(self) -> Counter:
        return Counter(row["status"] for row in self.results.rows)


@dataclass(frozen=True)
class ExpectedCell:
    """A cell that a job file defines, for listing the ones without a result."""

    cell_key: str
    label: str
    source: str
    revision: str | None
    matrix: str
    k: int
    k_min: int
    duplicate_policy: str


def load_results(path: Path) -> Results:
    """Read the ID-table rows of a results folder, or of one ID-table Parquet file.

    In a folder, the cell files are read, because `id_table.parquet` is only
    rewritten when a run ends and lags behind a sweep that is still running.
    Rows of `id_table.parquet` whose cell file is gone are added. Unreadable
    cell files (one being written by an older version, a truncated copy) are
    skipped and listed.

    Raises:
        ReportError: when the path does not exist or contains no results.
    """
    path = Path(path)
    if path.is_file():
        return _results(path.parent, [_read_id_table(path)], str(path), ())
    if not path.is_dir():
        raise ReportError(f"results folder {path} does not exist; pass the --out folder of `raysweep submit`")

    tables, unreadable = [], []
    cell_files = sorted((path / "cells").glob("*.parquet"))
    # Threads, because a sweep has one small file per cell and most of the
    # time per file is Arrow's overhead, which runs without the GIL.
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for cell_file, outcome in zip(cell_files, pool.map(_read_cell_file, cell_files)):
            if isinstance(outcome, pa.Table):
                tables.append(outcome)
            else:
                logger.warning("skipping unreadable cell file %s (%s)", cell_file, outcome)
                unreadable.append(f"{cell_file}: {outcome}")
    read_from = f"{len(tables)} cell files in {path / 'cells'}"

    union = path / "id_table.parquet"
    if union.exists() and not tables:
        return _results(path, [_read_id_table(union)], str(union), tuple(unreadable))
    if union.exists():
        outcome = _read_cell_file(union)
        if isinstance(outcome, pa.Table):
            known = {key for part in tables for key in part.column("cell_key").to_pylist()}
            extra = [key not in known for key in outcome.column("cell_key").to_pylist()]
            if any(extra):
                tables.append(outcome.filter(pa.array(extra)))
                read_from += f" and {sum(extra)} rows of {union} without a cell file"
        else:
            logger.warning("skipping unreadable ID table %s (%s)", union, outcome)
            unreadable.append(f"{union}: {outcome}")
    if not tables:
        raise ReportError(f"{path} contains no results: expected {path / 'cells'}/*.parquet or {union}")
    return _results(path, tables, read_from, tuple(unreadable))


def group_series(rows: Iterable[dict], expected: Iterable[ExpectedCell] = ()) -> list[Series]:
    """Group rows into series, and attach expected cells without a row as absent revisions.

    Series of a known model family come first, by parameter count. The others
    follow in the job file's order when `expected` is given, else by label.
    """
    members: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        members[_series_key(row)].append(row)

    expected = list(expected)
    job_order: dict[tuple, int] = {}
    for cell in expected:
        key = (cell.label, cell.source, cell.matrix, cell.k, cell.k_min, cell.duplicate_policy)
        job_order.setdefault(key, len(job_order))

    present = {row["cell_key"] for group in members.values() for row in group}
    absent: dict[tuple, list[str]] = defaultdict(list)
    for cell in expected:
        if cell.cell_key not in present:
            key = (cell.label, cell.source, cell.matrix, cell.k, cell.k_min, cell.duplicate_policy)
            absent[key].append(cell.revision or "")
            members.setdefault(key, [])

    names = _unique_names(list(members))
    series = []
    for key, group in members.items():
        label, source, matrix, k, k_min, duplicate_policy = key
        family, model = find_model(source)
        series.append(Series(
            name=names[key], label=label, source=source, matrix=matrix, k=k, k_min=k_min,
            duplicate_policy=duplicate_policy, rows=tuple(sorted(group, key=_revision_order)),
            absent=tuple(sorted(absent.get(key, []), key=_revision_name_order)), family=family, model=model,
        ))

    def order(item: Series) -> tuple:
        position = job_order.get(_key_of(item), len(job_order))
        return (item.model is None, item.parameters or 0, position, item.name.casefold())

    return sorted(series, key=order)


def infer_absent(series: list[Series]) -> list[Series]:
    """Add, to each sweep series, the revisions that other series of its job have and it lacks.

    Without the job file this is the best guess of what a running sweep still
    has to compute. It assumes that every source of a job shares one revision
    list, which holds for family-and-schedule sweeps such as all-pythia.
    """
    revisions_by_job: dict[str, set[str]] = defaultdict(set)
    for item in series:
        if item.is_sweep:
            revisions_by_job[_job_of(item)].update(row["revision"] or "" for row in item.rows)

    completed = []
    for item in series:
        if not item.is_sweep:
            completed.append(item)
            continue
        have = {row["revision"] or "" for row in item.rows}
        lacking = revisions_by_job[_job_of(item)] - have - set(item.absent)
        absent = sorted([*item.absent, *lacking], key=_revision_name_order)
        completed.append(replace(item, absent=tuple(absent)))
    return completed


def expected_cells(job_name: str) -> tuple[str, list[ExpectedCell]]:
    """Return a job's name and the cells it defines.

    Imports `raysweep.jobs`, which imports torch, so only `--job` pays for it.

    Raises:
        ReportError: when the job cannot be loaded.
    """
    from raysweep import jobs

    try:
        spec = jobs.load_job(job_name)
    except jobs.JobError as error:
        raise ReportError(str(error)) from error
    cells = [
        ExpectedCell(cell.cell_key, cell.label, cell.source, cell.revision, cell.matrix,
                     cell.settings.k, cell.settings.k_values[0], cell.settings.duplicates)
        for cell in spec.cells
    ]
    return spec.name, cells


def find_model(source: str) -> tuple[str | None, ModelInfo | None]:
    """Return the family and entry of a source that names a known model ("EleutherAI/pythia-70m")."""
    repo_id = source.removeprefix("hub:").lower()
    for family, models in FAMILIES.items():
        for model in models:
            if model.repo_id.lower() == repo_id:
                return family, model
    return None, None


def read_token_lids(results: Results, series: Series) -> TokenLids | None:
    """Read the per-token LIDs of a series' final cell, or of its latest finished cell that has them.

    Returns None when no finished, non-duplicate cell of the series has a
    readable per-token file.
    """
    candidates = sorted((row for row in series.ok_rows if not row.get("duplicate_of")),
                        key=_revision_order, reverse=True)
    final = series.final_row
    if final is not None:
        candidates.remove(final)
        candidates.insert(0, final)

    for row in candidates:
        path = store.tokens_path(results.location, row["cell_key"])
        if not path.exists():
            continue
        try:
            table = pq.read_table(path, columns=["row", "token", "lid"])
        except (pa.ArrowInvalid, OSError, KeyError) as error:
            logger.warning("skipping unreadable per-token file %s (%s)", path, error)
            continue
        tokens = table.column("token").combine_chunks()
        return TokenLids(
            series=series,
            row=row,
            row_ids=table.column("row").to_numpy(),
            lids=table.column("lid").to_numpy(zero_copy_only=False).astype(np.float64),
            tokens=None if tokens.null_count == len(tokens) else tokens,
        )
    return None


def token_extremes(lids: TokenLids, count: int = DEFAULT_TOKEN_COUNT) -> TokenExtremes:
    """Return the `count` tokens with the highest and with the lowest finite LID.

    Ties keep the lower matrix row first. Non-finite LIDs are counted apart:
    they mark tokens whose k neighbours are equidistant, not high dimension.
    """
    finite = np.flatnonzero(np.isfinite(lids.lids))
    values = lids.lids[finite]
    rows = lids.row_ids[finite]
    ascending = finite[np.lexsort((rows, values))]
    descending = finite[np.lexsort((rows, -values))]
    return TokenExtremes(
        lids=lids,
        highest=_ranked(lids, descending[:count]),
        lowest=_ranked(lids, ascending[:count]),
        nonfinite=int(len(lids.lids) - len(finite)),
    )


def build_report(path: Path, job: str | None = None, token_count: int = DEFAULT_TOKEN_COUNT,
                 id_table: Path | None = None) -> Report:
    """Load a results folder and collect what its report shows.

    Args:
        path: results folder, or an ID-table Parquet file.
        job: bundled job name or job file whose cells are expected; cells
            without a result are listed as absent. Without it, absent
            revisions are inferred from the revisions the other series have.
        token_count: tokens listed per source with the highest and lowest LID.
        id_table: ID table (file or results folder) whose rows are marked on
            the LoRA curves, in addition to the folder's own ID rows.

    Raises:
        ReportError: for a path without results, an invalid job or count.
    """
    if token_count < 0:
        raise ReportError(f"token count {token_count} is invalid; use 0 or more")
    lora_rows, lora_unreadable = load_lora_rows(path) if Path(path).is_dir() else ([], [])
    try:
        results = load_results(path)
    except ReportError:
        if not lora_rows:
            raise
        # A folder with only LoRA rank sweeps: report those without ID series.
        results = Results(Path(path), (), "no ID cells", ())
    if lora_unreadable:
        results = replace(results, unreadable=results.unreadable + tuple(lora_unreadable))

    id_rows = list(results.rows)
    if id_table is not None:
        id_rows += list(load_results(id_table).rows)
    lora = group_curves(lora_rows, id_rows)

    job_name, expected = (None, [])
    if job is not None:
        job_name, expected = expected_cells(job)
    series = group_series(results.rows, expected)
    if job is None:
        series = infer_absent(series)

    token_lids, without_tokens = [], []
    for item in series:
        if not item.ok_rows:
            continue
        lids = read_token_lids(results, item)
        if lids is None:
            without_tokens.append(item.name)
        else:
            token_lids.append(lids)

    gaps = Gaps(
        failed=tuple(row for item in series for row in item.rows if row["status"] == "failed"),
        missing=tuple(row for item in series for row in item.rows if row["status"] == "missing"),
        duplicates=tuple(row for item in series for row in item.duplicate_rows),
        absent=tuple((item.name, revision) for item in series for revision in item.absent),
        absent_basis="job" if job is not None else "revisions",
        without_tokens=tuple(without_tokens),
        unreadable=results.unreadable,
    )
    extremes = tuple(token_extremes(lids, token_count) for lids in token_lids)
    return Report(results, tuple(series), tuple(token_lids), extremes, gaps, job=job_name, lora=lora,
                  id_table=None if id_table is None else str(id_table))


def write_report(report: Report, dest: Path, formats: Iterable[str] = REPORT_FORMATS) -> list[Path]:
    """Write a report's files into `dest`; return their paths.

    "png" writes one file per figure, "html" one self-contained page with the
    figures embedded, "md" a Markdown page that links the PNG files when they
    are written too. Figures without data (no training sweep, no per-token
    file) are left out, and the pages name each one left out and why.

    Raises:
        ReportError: for an unknown format.
    """
    formats = validate_formats(formats)
    from raysweep import pages, plots

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    figures = plots.render_figures(report) if {"png", "html"} & set(formats) else None
    report = replace(report, figures=figures)

    written = []
    if figures is not None and "png" in formats:
        for name, image in figures.items():
            written.append(_write_bytes(dest / name, image))
    if "md" in formats:
        linked = list(figures) if figures is not None and "png" in formats else []
        written.append(_write_bytes(dest / MARKDOWN_NAME, pages.markdown(report, linked).encode()))
    if "html" in formats:
        written.append(_write_bytes(dest / HTML_NAME, pages.html(report).encode()))
    return written


def validate_formats(formats: Iterable[str]) -> list[str]:
    """Return the requested formats in canonical order; accepts "png,html" as well as separate items.

    Raises:
        ReportError: for an unknown format or an empty list.
    """
    requested = [part.strip().lower() for item in formats for part in item.split(",") if part.strip()]
    unknown = sorted(set(requested) - set(REPORT_FORMATS))
    if unknown:
        raise ReportError(f"report format {', '.join(unknown)} is unknown; use {', '.join(REPORT_FORMATS)}")
    if not requested:
        raise ReportError(f"no report format given; use one or more of {', '.join(REPORT_FORMATS)}")
    return [name for name in REPORT_FORMATS if name in requested]


def _read_id_table(path: Path) -> pa.Table:
    outcome = _read_cell_file(path)
    if isinstance(outcome, Exception):
        raise ReportError(f"ID table {path} is not a readable Parquet file ({outcome})")
    return outcome


def _read_cell_file(path: Path) -> pa.Table | Exception:
    try:
        with pq.ParquetFile(path) as parquet_file:
            return parquet_file.read()
    except (pa.ArrowInvalid, OSError) as error:
        return error


def _results(location: Path, tables: list[pa.Table], read_from: str, unreadable: tuple[str, ...]) -> Results:
    """Combine tables of possibly different schema versions into rows with every known column."""
    has_duplicate_column = all("duplicate_of" in table.column_names for table in tables)
    rows = []
    for table in tables:
        for row in table.to_pylist():
            rows.append({**dict.fromkeys(store.COLUMNS), **row})

    if not has_duplicate_column:
        # Older tables lack the column; derive it the way the runner does.
        flags = integrity.duplicate_flags(rows)
        for row in rows:
            row["duplicate_of"] = flags.get(row["cell_key"])
    return Results(location, tuple(rows), read_from, unreadable, has_duplicate_column)


def _series_key(row: dict) -> tuple:
    # row_policy is left out: a cell records the policy it applied, which can
    # differ by revision from the one requested ("tokenizer" falls back to "all").
    return (row["label"] or row["source"] or row["cell_key"], row["source"] or "", row["matrix"] or "input",
            row["k"], row["k_min"], row["duplicate_policy"])


def _key_of(series: Series) -> tuple:
    return (series.label, series.source, series.matrix, series.k, series.k_min, series.duplicate_policy)


def _unique_names(keys: list[tuple]) -> dict[tuple, str]:
    """Name each series by its label, adding the settings that tell apart series with one label."""
    by_label: dict[str, list[tuple]] = defaultdict(list)
    for key in keys:
        by_label[key[0]].append(key)

    names = {}
    for label, group in by_label.items():
        for key in group:
            if len(group) == 1:
                names[key] = label
                continue
            details = []
            if len({other[1] for other in group}) > 1:
                details.append(key[1])
            if len({other[2] for other in group}) > 1:
                details.append(f"{key[2]} matrix")
            if len({other[3:5] for other in group}) > 1:
                details.append(f"k={format_k(key[3], key[4])}")
            if len({other[5] for other in group}) > 1:
                details.append(f"duplicates={key[5]}")
            names[key] = f"{label} ({', '.join(details)})"
    return names


def format_k(k: int | None, k_min: int | None) -> str:
    """Return "20" for a single k and "10..20" for a Levina-Bickel range."""
    if k is None:
        return "-"
    if k_min is None or k_min == k:
        return str(k)
    return f"{k_min}..{k}"


def _job_of(series: Series) -> str:
    jobs = Counter(row["job"] for row in series.rows)
    return jobs.most_common(1)[0][0] if jobs else ""


def _revision_order(row: dict) -> tuple:
    return _revision_name_order(row["revision"] or "", row["step"])


def _revision_name_order(revision: str, step: int | None = None) -> tuple:
    """Sort step revisions by step, then other names ("main", none) by name."""
    step = step_of(revision) if step is None else step
    return (0, step, "") if step is not None else (1, 0, revision)


def _ranked(lids: TokenLids, indices: np.ndarray) -> tuple[RankedToken, ...]:
    tokens = lids.tokens.take(pa.array(indices)).to_pylist() if lids.tokens is not None else [None] * len(indices)
    return tuple(
        RankedToken(int(lids.row_ids[index]), token, float(lids.lids[index]))
        for index, token in zip(indices, tokens)
    )


def _write_bytes(path: Path, data: bytes) -> Path:
    """Write through a temporary name, so a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    temporary.replace(path)
    return path
