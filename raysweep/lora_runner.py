"""Run a lora-rank job's cells as Ray tasks and store each rank's row as it arrives.

Each (mode, rank) cell is one Ray task, with the placement rules of the ID
sweeps (`raysweep.runner.task_resources`): one GPU per task where the cluster
has GPUs, else CPUs. Finished ranks (status "ok") are skipped, so running a
job again resumes it; failed and missing ranks are tried again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from raysweep import store
from raysweep.lora import LoraCell, LoraJob
from raysweep.runner import (RunSummary, TaskResources, _usable_device, _use_assigned_cpus, lost_task_errors,
                             ray_address, run_tasks)

logger = logging.getLogger(__name__)


def pending_lora_cells(job: LoraJob, out: Path) -> list[LoraCell]:
    """Return the cells of a lora-rank job without a finished row under `out`."""
    return [cell for cell in job.cells if not store.is_lora_finished(out, cell.cell_key)]


def run_lora_job(
    job: LoraJob,
    out: Path,
    *,
    address: str | None = None,
    device: str = "auto",
    cpus_per_task: float | None = None,
    local: bool = False,
    on_start: Callable[[int, TaskResources], None] | None = None,
    on_result: Callable[[dict], None] | None = None,
) -> RunSummary:
    """Train and evaluate every unfinished rank of a lora-rank job on Ray.

    The arguments mean what they mean for `raysweep.runner.run_job`. Rows go
    to OUT/lora/KEY.parquet as each task ends, and OUT/lora_table.parquet is
    rewritten at the end.

    Raises:
        ValueError: --local together with an address, or a device the cluster lacks.
    """
    out = Path(out)
    summary = RunSummary()
    pending = pending_lora_cells(job, out)
    summary.skipped = len(job.cells) - len(pending)
    if summary.skipped:
        logger.info("%d of %d ranks are already finished in %s", summary.skipped, len(job.cells), out)

    if pending:

        def store_result(ray, reference, cell: LoraCell) -> dict:
            row = _collect(ray, reference, cell)
            store.write_lora_result(out, row)
            return row

        summary.rows.extend(run_tasks(pending, ray_address(address, local), device, cpus_per_task, summary,
                                      _submit_rank, store_result, on_start, on_result, noun="LoRA ranks"))
    elif on_start is not None:
        on_start(0, TaskResources(0, 0, "none"))

    store.write_lora_union(out)
    finished = {row["cell_key"]: row for row in summary.rows}
    for cell in job.cells:
        if cell.cell_key not in finished:
            row = store.read_lora_result(out, cell.cell_key)
            if row is not None:
                finished[cell.cell_key] = row
    summary.rows = [finished[cell.cell_key] for cell in job.cells if cell.cell_key in finished]
    return summary


def _submit_rank(ray, cell: LoraCell, resources: TaskResources, task_options: dict):
    """Start the task of one rank and return its object reference."""
    # max_calls=0 lets one worker process train several ranks, so torch,
    # transformers and peft are imported once per worker.
    remote = ray.remote(max_calls=0)(_train_remote).options(**task_options)
    return remote.remote(cell.to_dict(), resources.device)


def _collect(ray, reference, cell: LoraCell) -> dict:
    """Return a task's row; a task lost after its retries becomes a failed row."""
    from raysweep.lora_train import base_lora_row, finish_row

    try:
        return ray.get(reference)
    except lost_task_errors(ray) as error:
        logger.error("LoRA %s rank %d (%s) was lost: %s", cell.mode, cell.rank, cell.cell_key, error)
        return finish_row(base_lora_row(cell), time.perf_counter(), "failed", error)


def _train_remote(cell_data: dict, device: str) -> dict:
    """Ray task body: train and evaluate one rank with the resources Ray assigned."""
    import ray

    from raysweep.lora_train import compute_lora_cell

    _use_assigned_cpus()
    row = compute_lora_cell(LoraCell.from_dict(cell_data), _usable_device(device))
    context = ray.get_runtime_context()
    row["ray_node_id"] = context.get_node_id()
    row["gpu_ids"] = ",".join(str(gpu) for gpu in ray.get_gpu_ids()) or None
    return row
