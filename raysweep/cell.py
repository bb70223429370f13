"""Compute one cell: load the matrix, estimate its ID, build the result row."""

from __future__ import annotations

import logging
import platform
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa

from raysweep import ESTIMATOR_VERSION, __version__, kernel, store
from raysweep.estimator import estimate
from raysweep.jobs import Cell
from raysweep.keys import EmbeddingKeyError
from raysweep.sources import SourceError, SourceMissing, load_matrix, select_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CellResult:
    """The ID-table row of a cell and, when it succeeded, its per-token LIDs."""

    row: dict
    tokens: pa.Table | None


def compute_cell(cell: Cell, device: str = "auto", estimate_fn=estimate) -> CellResult:
    """Compute one cell; errors become a row with status "failed" or "missing".

    Every exception (a missing revision, an unknown layout, non-finite rows,
    k too large) is caught at this boundary, so one bad cell cannot stop a sweep.

    Args:
        estimate_fn: called as estimate_fn(matrix, settings, device=...) and
            returning an `Estimate`; the runner passes one that shards the
            work over Ray tasks.
    """
    started = time.perf_counter()
    row = base_row(cell)
    try:
        target = kernel.resolve_device(device)
        loaded = load_matrix(cell.source, cell.revision, cell.matrix, cell.key)
        rows, row_policy = select_rows(loaded, cell.row_policy)
        row.update(
            row_policy=row_policy,
            tokenizer_rows=loaded.tokenizer_rows,
            malformed_rows=loaded.malformed_rows,
            tensor_key=loaded.tensor_key,
            tensor_sha256=loaded.tensor_sha256,
            weights_file=loaded.weights_file,
            weights_format=loaded.weights_format,
            dtype=loaded.dtype,
            resolved_revision=loaded.resolved_revision,
            fetched_bytes=loaded.fetched_bytes,
            rows_in_matrix=int(loaded.matrix.shape[0]),
            hidden_size=int(loaded.matrix.shape[1]),
            device=describe_device(target),
        )
        result = estimate_fn(rows, cell.settings, device=str(target))
    except SourceMissing as error:
        return _finish(row, started, "missing", error)
    except (SourceError, EmbeddingKeyError, ValueError) as error:
        return _finish(row, started, "failed", error)
    except Exception as error:  # the cell boundary: record anything and let the sweep go on
        logger.exception("cell %s (%s @ %s) failed", cell.cell_key, cell.source, cell.revision)
        return _finish(row, started, "failed", error)

    # rows_in_matrix stays the stored matrix's count, which the row policy may exceed.
    row.update(
        rows_used=result.rows_used,
        duplicate_rows=result.duplicate_rows,
        hidden_size=result.hidden_size,
        id_mle=result.id_mle,
        id_mean=result.id_mean,
        id_median=result.id_median,
        redundancy=result.redundancy,
        nonfinite_lid=result.nonfinite_lid,
        rescanned_rows=result.rescanned_rows,
    )
    token_strings = None
    if loaded.tokens is not None:
        token_strings = [loaded.tokens[i] for i in result.row_ids]
    tokens = store.tokens_table(cell.cell_key, result.row_ids, token_strings, result.lids)
    return CellResult(_finish(row, started, "ok", None).row, tokens)


def base_row(cell: Cell) -> dict:
    """Return a row with the cell's identity and provenance, other values null."""
    row = dict.fromkeys(store.COLUMNS)
    row.update(
        job=cell.job,
        cell_key=cell.cell_key,
        label=cell.label,
        source=cell.source,
        revision=cell.revision,
        step=cell.step,
        matrix=cell.matrix,
        k=cell.settings.k,
        k_min=cell.settings.k_values[0],
        metric="euclidean",
        duplicate_policy=cell.settings.duplicates,
        row_policy=cell.row_policy,
        **versions(),
    )
    return row


def versions() -> dict:
    """Return the software versions and host recorded in every row."""
    import ray
    import torch

    return {
        "raysweep_version": __version__,
        "estimator_version": ESTIMATOR_VERSION,
        "torch_version": torch.__version__,
        "ray_version": ray.__version__,
        "python_version": platform.python_version(),
        "hostname": socket.gethostname(),
    }


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _finish(row: dict, started: float, status: str, error: Exception | None) -> CellResult:
    row["status"] = status
    row["error"] = None if error is None else f"{type(error).__name__}: {error}"
    row["seconds"] = time.perf_counter() - started
    row["finished_at"] = datetime.now(timezone.utc)
    if error is not None:
        logger.warning("cell %s: %s", row["cell_key"], row["error"])
    return CellResult(row, None)

