"""Run a job's cells as Ray tasks and store each result as it arrives.

Each cell is one Ray task. The driver requests one GPU per task only when the
cluster reports GPUs, so a CPU-only cluster never waits for a GPU that does
not exist. Finished cells are skipped, so running a job again resumes it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from raysweep import integrity, store
from raysweep.jobs import Cell, Job

logger = logging.getLogger(__name__)

# Worker crashes (killed process, lost node) are retried this many times;
# exceptions inside a cell are recorded in its row instead.
TASK_MAX_RETRIES = 3

# Ray retries a task killed by its memory monitor without limit by default
# (the task_oom_retries setting, -1). A local instance started here bounds
# it; a cluster takes RAY_task_oom_retries from its own start commands.
TASK_OOM_RETRIES = 2

# Hub client settings passed from the driver to the tasks, so that workers
# read from the same endpoint with the same token and offline mode. The cache
# location is passed only to a Ray instance started here, whose workers share
# this machine's disk. NOTE: variables in a runtime environment are visible
# to anyone who can read the Ray dashboard or GCS, HF_TOKEN included.
FORWARDED_VARIABLES = ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET",
                       "HF_HUB_DISABLE_TELEMETRY", "NO_PROXY", "no_proxy")
LOCAL_ONLY_VARIABLES = ("HF_HOME", "HF_HUB_CACHE")


@dataclass
class RunSummary:
    """Counts of skipped and computed cells of a run, and the job's rows."""

    skipped: int = 0
    computed: int = 0
    rows: list[dict] = field(default_factory=list)
    resources: dict = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(1 for row in self.rows if row["status"] == status)


@dataclass(frozen=True)
class TaskResources:
    """Resources that each cell task requests from Ray, and its compute device."""

    num_cpus: float
    num_gpus: float
    device: str


def pending_cells(job: Job, out: Path) -> list[Cell]:
    """Return the cells of a job that have no finished result under `out`."""
    return [cell for cell in job.cells if not store.is_finished(out, cell.cell_key)]


def run_job(
    job: Job,
    out: Path,
    *,
    address: str | None = None,
    device: str = "auto",
    cpus_per_task: float | None = None,
    local: bool = False,
    on_start: Callable[[int, TaskResources], None] | None = None,
    on_result: Callable[[dict], None] | None = None,
) -> RunSummary:
    """Compute every unfinished cell of a job on Ray and write its files.

    Args:
        out: results folder; see `raysweep.store` for its layout.
        address: Ray cluster to connect to ("auto", "ray://host:10001", ...);
            None starts a local Ray instance unless RAY_ADDRESS is set.
        device: "auto" (a GPU per task when the cluster has GPUs, else CPU),
            "cpu", or "cuda" (fails fast when the cluster has no GPU).
        cpus_per_task: CPUs per CPU task; defaults to the CPUs of the largest
            node, so that one cell uses a whole machine's cores.
        local: start a Ray instance on this machine even when RAY_ADDRESS is set.
        on_start: called with the number of pending cells and the resources.
        on_result: called with each cell's row as it is stored.
    """
    out = Path(out)
    summary = RunSummary()
    pending = pending_cells(job, out)
    summary.skipped = len(job.cells) - len(pending)
    if summary.skipped:
        logger.info("%d of %d cells are already finished in %s", summary.skipped, len(job.cells), out)

    if pending:

        def store_result(ray, reference, cell: Cell) -> dict:
            row, tokens = _collect(ray, reference, cell)
            store.write_cell(out, row, tokens)
            return row

        summary.rows.extend(run_tasks(pending, ray_address(address, local), device, cpus_per_task, summary,
                                      _submit_cell, store_result, on_start, on_result, noun="cells"))
    elif on_start is not None:
        on_start(0, TaskResources(0, 0, "none"))

    flagged = integrity.flag_duplicate_revisions(out)
    store.write_union(out)
    finished = {row["cell_key"]: flagged.get(row["cell_key"], row) for row in summary.rows}
    for cell in job.cells:
        if cell.cell_key not in finished:
            row = store.read_cell(out, cell.cell_key)
            if row is not None:
                finished[cell.cell_key] = row
    summary.rows = [finished[cell.cell_key] for cell in job.cells if cell.cell_key in finished]
    return summary


def ray_address(address: str | None, local: bool) -> str | None:
    """Return the address for `_init_ray`; `local` forces a new instance on this machine.

    Raises:
        ValueError: `local` together with an address.
    """
    if local and address is not None:
        raise ValueError(f"--local starts Ray on this machine, so it cannot be combined with --address {address}")
    return LOCAL if local else address


def run_tasks(pending, address, device, cpus_per_task, summary, submit, store_result,
              on_start=None, on_result=None, noun="cells") -> list[dict]:
    """Run one Ray task per pending item and store each result as it arrives.

    Starts Ray here unless it is already initialised (and then shuts it down
    at the end), decides the resources per task, and calls
    `submit(ray, item, resources, task_options)` for each item, which returns
    an object reference, then `store_result(ray, reference, item)`, which
    writes the item's files and returns its row, in order of completion.
    """
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        _init_ray(address)
    try:
        resources = task_resources(ray.cluster_resources(), ray.nodes(), device, cpus_per_task)
        summary.resources = resources.__dict__
        if on_start is not None:
            on_start(len(pending), resources)
        logger.info("running %d %s, each with %s", len(pending), noun, resources)

        task_options = {
            "num_cpus": resources.num_cpus,
            "num_gpus": resources.num_gpus,
            "max_retries": TASK_MAX_RETRIES,
            "runtime_env": {"env_vars": forwarded_environment(local=_is_local(address))},
        }
        waiting = {submit(ray, item, resources, task_options): item for item in pending}
        rows = []
        while waiting:
            done, _ = ray.wait(list(waiting), num_returns=1)
            item = waiting.pop(done[0])
            row = store_result(ray, done[0], item)
            summary.computed += 1
            rows.append(row)
            if on_result is not None:
                on_result(row)
        return rows
    finally:
        if started_here:
            ray.shutdown()


def lost_task_errors(ray) -> tuple[type[BaseException], ...]:
    """Return the Ray errors that mean a task is lost after its retries."""
    return (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError)


def _collect(ray, reference, cell: Cell):
    """Return a task's row and tokens; a task lost after its retries becomes a failed row."""
    from raysweep.cell import CellResult, _finish, base_row

    try:
        result: CellResult = ray.get(reference)
        return result.row, result.tokens
    except lost_task_errors(ray) as error:
        logger.error("cell %s (%s @ %s) was lost: %s", cell.cell_key, cell.source, cell.revision, error)
        return _finish(base_row(cell), time.perf_counter(), "failed", error).row, None


def task_resources(cluster: dict, nodes: list[dict], device: str, cpus_per_task: float | None) -> TaskResources:
    """Decide what each cell task requests.

    Raises:
        ValueError: device "cuda" on a cluster without GPUs, or an unknown device.
    """
    gpus = cluster.get("GPU", 0)
    if device == "cuda" and gpus < 1:
        raise ValueError(
            "device 'cuda' was requested but the Ray cluster reports no GPU; "
            "use --device cpu, or add GPU nodes to the cluster"
        )
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {device!r} is unknown; use auto, cpu or cuda")
    if device != "cpu" and gpus >= 1:
        return TaskResources(num_cpus=1, num_gpus=1, device="cuda")

    largest_node = max((node.get("Resources", {}).get("CPU", 0) for node in nodes if node.get("Alive", True)), default=1)
    cpus = cpus_per_task if cpus_per_task is not None else max(1, largest_node)
    if cpus > largest_node:
        raise ValueError(
            f"{cpus} CPUs per task were requested but the largest node has {largest_node}; "
            "lower --cpus-per-task"
        )
    return TaskResources(num_cpus=cpus, num_gpus=0, device="cpu")


def forwarded_environment(local: bool) -> dict[str, str]:
    """Return the Hub client variables of this process that tasks should see."""
    names = FORWARDED_VARIABLES + (LOCAL_ONLY_VARIABLES if local else ())
    return {name: os.environ[name] for name in names if name in os.environ}


# Address value that makes `_init_ray` start a local instance even when RAY_ADDRESS is set.
LOCAL = "local"


def _is_local(address: str | None) -> bool:
    return address == LOCAL or (address is None and not os.environ.get("RAY_ADDRESS"))


def _init_ray(address: str | None) -> None:
    import ray

    if _is_local(address):
        # address="local" makes ray.init start a new instance even with RAY_ADDRESS set.
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                 _system_config={"task_oom_retries": TASK_OOM_RETRIES})
    else:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)


def _submit_cell(ray, cell: Cell, resources: TaskResources, task_options: dict):
    """Start the task of one cell and return its object reference.

    A sharded cell's task only loads, validates and reduces: it requests one CPU
    and no GPU, because Ray returns a task's CPUs, but not its GPUs, while it
    waits for the shard tasks it started.
    """
    # max_calls=0 lets a worker process run any number of cells, so torch and
    # CUDA start once per worker. Ray's default for GPU tasks is a new
    # process per task, which pays that start-up for every cell.
    remote = ray.remote(max_calls=0)(_compute_remote)
    if cell.shards == 1:
        return remote.options(**task_options).remote(cell.to_dict(), resources.device, None)
    coordinator = {**task_options, "num_cpus": 1, "num_gpus": 0}
    return remote.options(**coordinator).remote(cell.to_dict(), resources.device, task_options)


def _compute_remote(cell_data: dict, device: str, shard_options: dict | None):
    """Ray task body: compute one cell with the CPUs Ray assigned to it."""
    import ray

    from raysweep.cell import compute_cell

    _use_assigned_cpus()
    device = _usable_device(device)
    cell = Cell.from_dict(cell_data)
    if shard_options is None:
        result = compute_cell(cell, device)
    else:
        def estimate_sharded(matrix, settings, device):
            return sharded_estimate(matrix, settings, device, cell.shards, shard_options)

        result = compute_cell(cell, device, estimate_fn=estimate_sharded)

    context = ray.get_runtime_context()
    result.row["ray_node_id"] = context.get_node_id()
    result.row["gpu_ids"] = ",".join(str(gpu) for gpu in ray.get_gpu_ids()) or None
    return result


def _usable_device(device: str) -> str:
    """Fall back to the CPU when Ray granted a GPU that torch cannot see.

    That happens with a CPU-only torch build on a GPU node, or on a test
    cluster whose nodes advertise GPU resources they do not have.
    """
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        logger.warning("Ray assigned a GPU but torch %s sees no CUDA device; computing on the CPU",
                       torch.__version__)
        return "cpu"
    return device


def sharded_estimate(matrix, settings, device: str, shards: int, shard_options: dict):
    """Estimate one matrix with its query rows split over `shards` Ray tasks.

    The prepared matrix goes into the object store once and every shard task
    reads it from there; each returns the partial statistics of its rows,
    which reduce to the same result as one task (see `estimator.reduce`).
    """
    import ray

    from raysweep import estimator

    prepared = estimator.prepare(matrix, settings)
    rows_ref = ray.put(prepared.rows)
    bounds = shard_bounds(prepared.rows.shape[0], shards)
    shard = ray.remote(max_calls=0)(_shard_remote).options(**shard_options)
    references = [shard.remote(rows_ref, settings, first, last, device) for first, last in bounds]
    logger.info("split %d rows over %d shard tasks", prepared.rows.shape[0], len(references))
    return estimator.reduce(prepared, settings, ray.get(references))


def shard_bounds(rows: int, shards: int) -> list[tuple[int, int]]:
    """Split rows 0..rows into at most `shards` contiguous, non-empty ranges."""
    shards = max(1, min(shards, rows))
    edges = [round(i * rows / shards) for i in range(shards + 1)]
    return [(first, last) for first, last in zip(edges[:-1], edges[1:]) if last > first]


def _shard_remote(rows, settings, first: int, last: int, device: str):
    """Ray task body: partial statistics of query rows first..last - 1."""
    import warnings

    import torch

    from raysweep import estimator, kernel

    _use_assigned_cpus()
    with warnings.catch_warnings():
        # Arrays from the object store are read-only; the kernel never writes them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        matrix = torch.from_numpy(rows)
    centred = kernel.centre(matrix).to(kernel.resolve_device(_usable_device(device)))
    return estimator.partial_statistics(centred, settings, first, last)


def _use_assigned_cpus() -> None:
    import ray
    import torch

    assigned = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if assigned:
        torch.set_num_threads(max(1, int(assigned)))
