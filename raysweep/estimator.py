"""Levina-Bickel local intrinsic dimension and its MacKay-Ghahramani aggregate.

For a row x with neighbour distances T_1 <= ... <= T_k (the row itself
excluded by index):

    S_k(x)   = sum_{j=1}^{k-1} ln(T_k / T_j)
    LID_k(x) = (k - 1) / S_k(x)
    ID_k     = (k - 1) * n / sum_x S_k(x)        (inverse of the mean of 1/LID)

ID_k sums exactly across vocabulary chunks, and a row with S = 0 (all
neighbours equidistant) contributes without producing inf. With a k range
k_min..k, the reported ID is the mean of ID_k over the range, as Levina and
Bickel (2005) average over k, and each row's LID is the mean of its LID_k.

The work is split in three steps so that it can run on one device or over
many Ray tasks: `prepare` validates and deduplicates, `partial_statistics`
handles one range of query rows, and `reduce` combines the partials.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from raysweep import kernel

logger = logging.getLogger(__name__)

DUPLICATE_POLICIES = ("drop", "error")
DEFAULT_K = 20  # the default of scikit-dimension's MLE; the ID paper does not state its k


@dataclass(frozen=True)
class EstimatorSettings:
    """Settings that change the computed numbers, so they are part of a cell's key.

    Attributes:
        k: neighbours per row (the largest k when k_min is set).
        k_min: smallest k of a Levina-Bickel k range; None for a single k.
        duplicates: "drop" keeps the first copy of each distinct row and
            counts the others; "error" rejects a matrix with repeated rows.
            Keeping repeats would give T_1 = 0 and a global ID of exactly 0.
        margin: extra float32 candidates per row for the exact recomputation.
    """

    k: int = DEFAULT_K
    k_min: int | None = None
    duplicates: str = "drop"
    margin: int = 8

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError(
                f"k = {self.k} is too small: the estimate needs k >= 2 neighbours "
                "because LID = (k - 1) / S; the usual choice is k = 20"
            )
        if self.k_min is not None and not 2 <= self.k_min <= self.k:
            raise ValueError(f"k_min = {self.k_min} must satisfy 2 <= k_min <= k = {self.k}")
        if self.duplicates not in DUPLICATE_POLICIES:
            raise ValueError(
                f"duplicate policy {self.duplicates!r} is unknown; use one of {DUPLICATE_POLICIES}"
            )
        if self.margin < 0:
            raise ValueError(f"margin = {self.margin} must be >= 0")

    @property
    def k_values(self) -> tuple[int, ...]:
        first = self.k if self.k_min is None else self.k_min
        return tuple(range(first, self.k + 1))


@dataclass(frozen=True)
class PreparedMatrix:
    """A validated matrix with repeated rows removed, ready for the kernel.

    Attributes:
        rows: (rows_used, d) float64 distinct rows, in their original order.
        row_ids: (rows_used,) int64 index of each kept row in the input matrix.
        rows_in_matrix: rows of the input matrix.
        duplicate_rows: rows dropped because an earlier row had equal values.
    """

    rows: np.ndarray
    row_ids: np.ndarray
    rows_in_matrix: int
    duplicate_rows: int

    @property
    def hidden_size(self) -> int:
        return int(self.rows.shape[1])


@dataclass(frozen=True)
class PartialStatistics:
    """Contribution of one range of query rows to the global estimate.

    Attributes:
        start, stop: the query rows of the prepared matrix.
        k_values: the k of each entry in sum_log_ratios.
        sum_log_ratios: sum over the rows of S_k(x), per k (math.fsum).
        lids: (stop - start,) float64 per-row LID (mean over the k range).
        rescanned_rows: rows the kernel searched again in float64.
    """

    start: int
    stop: int
    k_values: tuple[int, ...]
    sum_log_ratios: tuple[float, ...]
    lids: np.ndarray
    rescanned_rows: int = 0


@dataclass(frozen=True)
class Estimate:
    """The global intrinsic dimension of one matrix and its per-token LIDs."""

    rows_in_matrix: int
    rows_used: int
    duplicate_rows: int
    hidden_size: int
    k: int
    k_min: int
    id_mle: float
    id_mean: float
    id_median: float
    redundancy: float
    nonfinite_lid: int
    rescanned_rows: int
    row_ids: np.ndarray = field(repr=False)
    lids: np.ndarray = field(repr=False)


def prepare(matrix: np.ndarray | torch.Tensor, settings: EstimatorSettings) -> PreparedMatrix:
    """Validate a matrix, apply the duplicate policy and check k against the rows.

    Raises:
        ValueError: for a matrix that is not 2-D, has non-finite rows (their
            ids are listed), repeats under the "error" policy, or too few
            distinct rows for k.
    """
    values = _as_float64(matrix)
    if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(f"expected a non-empty 2-D matrix (rows x hidden size), got shape {values.shape}")

    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        shown = ", ".join(str(i) for i in bad[:10])
        more = f" and {bad.size - 10} more" if bad.size > 10 else ""
        raise ValueError(
            f"{bad.size} rows contain NaN or inf (rows {shown}{more}); the checkpoint "
            "is corrupt or diverged, so no distances were computed"
        )

    row_ids = _first_distinct_rows(values)
    duplicates = values.shape[0] - row_ids.size
    if duplicates and settings.duplicates == "error":
        raise ValueError(
            f"{duplicates} rows repeat an earlier row; use the 'drop' duplicate policy "
            "to keep one copy of each distinct row"
        )
    if duplicates:
        logger.info("dropped %d repeated rows of %d", duplicates, values.shape[0])

    if settings.k + 1 > row_ids.size:
        raise ValueError(
            f"k + 1 = {settings.k + 1} exceeds the {row_ids.size} distinct rows of the "
            f"matrix ({values.shape[0]} rows, {duplicates} repeats); choose k <= {row_ids.size - 1}"
        )
    return PreparedMatrix(
        rows=np.ascontiguousarray(values if duplicates == 0 else values[row_ids]),
        row_ids=row_ids,
        rows_in_matrix=int(values.shape[0]),
        duplicate_rows=int(duplicates),
    )


def partial_statistics(
    centred: torch.Tensor,
    settings: EstimatorSettings,
    start: int,
    stop: int,
    budget_bytes: int | None = None,
) -> PartialStatistics:
    """Run the kernel on query rows start:stop and return their statistics.

    Args:
        centred: the prepared rows after `kernel.centre`, on the compute device.
    """
    table = kernel.nearest_neighbours(
        centred,
        settings.k,
        query_start=start,
        query_stop=stop,
        margin=settings.margin,
        budget_bytes=budget_bytes,
    )
    distances = table.distances.cpu().numpy()
    sums, lids = local_statistics(distances, settings.k_values)
    return PartialStatistics(start, stop, settings.k_values, sums, lids, table.rescanned_rows)


def local_statistics(
    distances: np.ndarray, k_values: tuple[int, ...]
) -> tuple[tuple[float, ...], np.ndarray]:
    """Return sum_x S_k(x) per k and the per-row LID averaged over k.

    Args:
        distances: (rows, >= max(k_values)) ascending neighbour distances, all > 0.
    """
    sums = []
    lids = np.zeros(distances.shape[0], dtype=np.float64)
    for k in k_values:
        # ln(T_k / T_j) for j < k, as a ratio to avoid cancellation.
        log_ratios = np.log(distances[:, k - 1 : k] / distances[:, : k - 1])  # (rows, k - 1)
        s = log_ratios.sum(axis=1)
        sums.append(math.fsum(s))
        with np.errstate(divide="ignore"):
            lids += (k - 1) / s
    return tuple(sums), lids / len(k_values)


def reduce(
    prepared: PreparedMatrix, settings: EstimatorSettings, partials: list[PartialStatistics]
) -> Estimate:
    """Combine partial statistics that cover every prepared row exactly once.

    Raises:
        ValueError: if the partials leave a gap, overlap, or used other k.
    """
    partials = sorted(partials, key=lambda part: part.start)
    expected = 0
    for part in partials:
        if part.start != expected:
            raise ValueError(f"partial statistics cover rows from {part.start}, expected {expected}")
        if part.k_values != settings.k_values:
            raise ValueError(f"partial statistics used k {part.k_values}, expected {settings.k_values}")
        expected = part.stop
    rows_used = prepared.rows.shape[0]
    if expected != rows_used:
        raise ValueError(f"partial statistics cover {expected} rows, expected {rows_used}")

    per_k_ids = []
    for position, k in enumerate(settings.k_values):
        total = math.fsum(part.sum_log_ratios[position] for part in partials)
        per_k_ids.append((k - 1) * rows_used / total if total > 0 else math.inf)
    id_mle = float(np.mean(per_k_ids))

    lids = np.concatenate([part.lids for part in partials])
    finite = lids[np.isfinite(lids)]
    hidden = prepared.hidden_size
    return Estimate(
        rows_in_matrix=prepared.rows_in_matrix,
        rows_used=rows_used,
        duplicate_rows=prepared.duplicate_rows,
        hidden_size=hidden,
        k=settings.k,
        k_min=settings.k_values[0],
        id_mle=id_mle,
        id_mean=float(finite.mean()) if finite.size else math.nan,
        id_median=float(np.median(finite)) if finite.size else math.nan,
        redundancy=1.0 - id_mle / hidden,
        nonfinite_lid=int(lids.size - finite.size),
        rescanned_rows=sum(part.rescanned_rows for part in partials),
        row_ids=prepared.row_ids,
        lids=lids,
    )


def estimate(
    matrix: np.ndarray | torch.Tensor,
    settings: EstimatorSettings | None = None,
    *,
    device: str = "auto",
    shards: int = 1,
    budget_bytes: int | None = None,
) -> Estimate:
    """Estimate the intrinsic dimension of the rows of one matrix, in this process.

    Args:
        matrix: (rows, hidden size) array of any float dtype; half precision is
            upcast before any distance is computed.
        settings: estimator settings; the defaults use k = 20.
        device: "auto", "cpu", "cuda" or "cuda:N".
        shards: number of query-row ranges to compute separately and reduce;
            the result does not depend on it.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> plane = rng.random((2000, 2)) @ rng.standard_normal((2, 16))
        >>> round(estimate(plane).id_mle)
        2
    """
    settings = settings or EstimatorSettings()
    started = time.perf_counter()
    prepared = prepare(matrix, settings)
    target = kernel.resolve_device(device)
    centred = kernel.centre(torch.from_numpy(prepared.rows)).to(target)

    rows = prepared.rows.shape[0]
    bounds = np.linspace(0, rows, max(1, shards) + 1).round().astype(int)
    partials = [
        partial_statistics(centred, settings, int(a), int(b), budget_bytes)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    result = reduce(prepared, settings, partials)
    logger.debug("estimated %d x %d on %s in %.1f s", rows, prepared.hidden_size, target,
                 time.perf_counter() - started)
    return result


def _as_float64(matrix: np.ndarray | torch.Tensor) -> np.ndarray:
    """Upcast any float or integer matrix to a float64 numpy array."""
    if isinstance(matrix, torch.Tensor):
        return matrix.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(matrix)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"expected a numeric matrix, got dtype {array.dtype}")
    return array.astype(np.float64, copy=False)


def _first_distinct_rows(values: np.ndarray) -> np.ndarray:
    """Return the sorted indices of the first occurrence of each distinct row.

    Rows are grouped by a 64-bit hash of their bit patterns and equality is
    then checked exactly inside each group, so hash collisions cannot merge
    distinct rows. Sorting whole rows instead took 0.9 s on MiniLM's 30522 x
    384 matrix on a 2-core machine; hashing takes a few tens of milliseconds.
    """
    normalised = np.ascontiguousarray(values)
    if np.any((normalised == 0) & np.signbit(normalised)):
        # Adding 0.0 turns -0.0 into +0.0, so rows that compare equal hash equal.
        normalised = normalised + 0.0
    bits = normalised.view(np.uint64)  # (rows, d)
    multipliers = np.random.default_rng(0x5EED).integers(1, 2**63, size=bits.shape[1], dtype=np.uint64) | 1
    hashes = np.einsum("ij,j->i", bits, multipliers)  # unsigned arithmetic wraps modulo 2^64

    _, first, inverse, counts = np.unique(hashes, return_index=True, return_inverse=True, return_counts=True)
    keep = np.ones(values.shape[0], dtype=bool)
    for group in np.flatnonzero(counts > 1):
        members = np.flatnonzero(inverse == group)
        keep[members] = False
        keep[_first_of_equal_rows(normalised, members)] = True
    keep_ids = np.flatnonzero(keep)
    return keep_ids.astype(np.int64)


def _first_of_equal_rows(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Return, among rows sharing a hash, the first row of each set of equal rows."""
    block = values[members]
    as_bytes = block.view(np.dtype((np.void, block.dtype.itemsize * block.shape[1]))).ravel()
    _, first = np.unique(as_bytes, return_index=True)
    return members[np.sort(first)]
