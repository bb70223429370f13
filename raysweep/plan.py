"""Plan a job without loading weights: cells, matrix shapes, bytes, FLOPs, time.

Shapes come from what can be read without fetching weights: the model
tables in `raysweep.schedules` for known Hub families, the header of a local
`.npy` or `.safetensors` file, or the `random:` source string. Anything else
is reported as unknown rather than guessed.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from raysweep.jobs import Cell
from raysweep.schedules import FAMILIES

logger = logging.getLogger(__name__)

# Bytes per element of the stored embedding of known Hub families.
# NOTE: Pythia's Hub checkpoints store float16 weights; a step branch in
# another dtype would change the byte count, not the result.
FAMILY_ELEMENT_BYTES = {"pythia": 2}
SAFETENSORS_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class CellPlan:
    """Bytes and work of one cell, as far as they are known before loading."""

    cell: Cell
    rows: int | None
    hidden_size: int | None
    element_bytes: int | None

    @property
    def fetch_bytes(self) -> int | None:
        if self.rows is None or self.hidden_size is None or self.element_bytes is None:
            return None
        return self.rows * self.hidden_size * self.element_bytes

    def gram_flops(self, symmetric: bool) -> int | None:
        """FLOPs of the Gram products: n^2 d when each block pair is computed once, else 2 n^2 d."""
        if self.rows is None or self.hidden_size is None:
            return None
        return (1 if symmetric else 2) * self.rows**2 * self.hidden_size


def plan_cell(cell: Cell) -> CellPlan:
    """Return the shape and stored size of a cell's matrix, reading no weights."""
    rows, hidden, element = _known_shape(cell)
    return CellPlan(cell, rows, hidden, element)


def _known_shape(cell: Cell) -> tuple[int | None, int | None, int | None]:
    for family, models in FAMILIES.items():
        for model in models:
            if cell.source in (model.repo_id, f"hub:{model.repo_id}"):
                return model.embedding_rows, model.hidden_size, FAMILY_ELEMENT_BYTES.get(family)

    match = re.fullmatch(r"random:(\d+)x(\d+)(?::\d+)?", cell.source)
    if match:
        return int(match[1]), int(match[2]), 4

    path = _local_path(cell.source)
    if path is None:
        return None, None, None
    try:
        if path.suffix == ".npy":
            return _npy_shape(path)
        if path.suffix == ".safetensors":
            return _safetensors_shape(path, cell)
    except (OSError, ValueError) as error:
        logger.warning("cannot read the header of %s: %s", path, error)
    return None, None, None


def _local_path(source: str) -> Path | None:
    if source.startswith("package:"):
        from raysweep.sources import SourceError, _package_path

        try:
            path = _package_path(source)
        except SourceError:
            return None
    else:
        path = Path(source).expanduser()
    if path.is_dir():
        single = path / "model.safetensors"
        return single if single.is_file() else None
    return path if path.is_file() else None


def _npy_shape(path: Path) -> tuple[int, int, int]:
    import numpy as np

    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.ndim != 2:
        raise ValueError(f"shape {array.shape} is not 2-D")
    return int(array.shape[0]), int(array.shape[1]), int(array.dtype.itemsize)


def _safetensors_shape(path: Path, cell: Cell) -> tuple[int | None, int | None, int | None]:
    """Read the shape from the safetensors JSON header (the first 8 + N bytes)."""
    from raysweep.keys import find_embedding_key

    with path.open("rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
        header = json.loads(stream.read(length))
    header.pop("__metadata__", None)
    key = cell.key or find_embedding_key(header, cell.matrix)
    entry = header[key]
    rows, hidden = entry["shape"]
    return rows, hidden, SAFETENSORS_ELEMENT_BYTES.get(entry["dtype"])


def format_bytes(count: int | None) -> str:
    if count is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def format_flops(count: int | None) -> str:
    if count is None:
        return "?"
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count:.0f} FLOP"
