"""Locate one tensor inside a checkpoint file and decode its bytes.

Both checkpoint formats are read through a `ByteReader`, a function that
returns the bytes in [start, stop) of the file, so the same code serves local
files and HTTP range requests (`raysweep.hub`):

- safetensors: 8 bytes of little-endian header length, a JSON header that maps
  each key to its dtype, shape and byte offsets, then the tensors' bytes;
- torch zip checkpoints (`pytorch_model.bin`): see `raysweep.torchbin`.

A reader reads the header, picks the tensor, and then reads only that
tensor's byte range.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raysweep.keys import find_embedding_key

# Weight files of a Hub-layout checkpoint, in the order they are looked for.
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
# The safetensors library rejects headers above 100 MB; so does this reader.
SAFETENSORS_MAX_HEADER = 100_000_000

ByteReader = Callable[[int, int], bytes]
"""Return the bytes in [start, stop) of a file."""


class FormatError(ValueError):
    """A checkpoint file whose structure is invalid or unsupported."""


@dataclass(frozen=True)
class TensorLocation:
    """Location of one tensor's bytes in a checkpoint file, and how to decode them.

    Attributes:
        key: name of the tensor in the checkpoint.
        dtype: element type.
        shape: tensor shape.
        start, stop: byte range in the file, stop exclusive.
        stride: element strides of a view that is not row-major contiguous,
            relative to `start`; None for a contiguous tensor.
        byteorder: "little" or "big", the byte order of the stored elements.
        crc32: CRC-32 of [start, stop) as the zip directory records it, when
            the range is a whole zip record; None otherwise.
    """

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int
    stride: tuple[int, ...] | None = None
    byteorder: str = "little"
    crc32: int | None = None

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def choose_key(keys: Iterable[str], matrix: str, key: str | None, where: str) -> str:
    """Return the requested key, or the embedding key of `matrix` among `keys`.

    Raises:
        FormatError: `key` is given but is not among `keys`.
        EmbeddingKeyError: no key, or several, match the matrix.
    """
    keys = list(keys)
    if key is None:
        return find_embedding_key(keys, matrix)
    if key not in keys:
        raise FormatError(f"key {key!r} is not in {where} ({len(keys)} tensors)")
    return key


def locate_safetensors(read: ByteReader, size: int, matrix: str, key: str | None, where: str) -> TensorLocation:
    """Read a safetensors header and return the location of the embedding tensor.

    The header is checked as the safetensors library checks it: the offsets
    of all tensors must tile the data section without gaps or overlaps and end
    at the end of the file. A file that was cut short or that lies about its
    size therefore fails here, before any tensor byte is read.

    Raises:
        FormatError: the header is invalid or the tensor's dtype unsupported.
    """
    if size < 8:
        raise FormatError(f"{where} has {size} bytes, too few for a safetensors file")
    (header_size,) = struct.unpack("<Q", read(0, 8))
    if header_size > SAFETENSORS_MAX_HEADER or 8 + header_size > size:
        raise FormatError(
            f"{where} announces a {header_size}-byte safetensors header in a {size}-byte file; "
            "the file is not safetensors or is truncated"
        )
    try:
        header = json.loads(read(8, 8 + header_size))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{where} has an invalid safetensors header: {error}") from error
    if not isinstance(header, dict):
        raise FormatError(f"{where} has a safetensors header that is not a JSON object")

    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    data_start = 8 + header_size
    _check_safetensors_offsets(entries, size - data_start, where)

    tensor_key = choose_key(entries, matrix, key, where)
    entry = entries[tensor_key]
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise FormatError(
            f"tensor {tensor_key!r} in {where} has dtype {entry['dtype']}; "
            f"supported: {', '.join(SAFETENSORS_DTYPES)}"
        )
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end - begin != _numel(shape) * _itemsize(dtype):
        raise FormatError(
            f"tensor {tensor_key!r} in {where} spans {end - begin} bytes, but shape {list(shape)} "
            f"of {entry['dtype']} needs {_numel(shape) * _itemsize(dtype)}"
        )
    return TensorLocation(tensor_key, dtype, shape, data_start + begin, data_start + end)


def _check_safetensors_offsets(entries: dict, data_size: int, where: str) -> None:
    spans = []
    for name, entry in entries.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        valid = (
            isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(value, int) for value in offsets)
            and isinstance(shape, list) and all(isinstance(value, int) and value >= 0 for value in shape)
            and isinstance(entry.get("dtype"), str)
        )
        if not valid:
            raise FormatError(f"{where}: header entry {name!r} lacks a valid dtype, shape or data_offsets")
        spans.append((offsets[0], offsets[1], name))

    position = 0
    for begin, end, name in sorted(spans):
        if begin != position or end < begin:
            raise FormatError(
                f"{where}: tensor {name!r} occupies bytes {begin}..{end} of the data section, "
                f"expected to start at {position}; the header is corrupt"
            )
        position = end
    if position != data_size:
        raise FormatError(
            f"{where}: the header describes {position} data bytes but the file contains {data_size}; "
            "the file is truncated or not the one the header was written for"
        )


def decode_tensor(location: TensorLocation, raw: bytearray) -> torch.Tensor:
    """Build the tensor that `location` describes from its bytes (no copy when contiguous).

    Raises:
        FormatError: the byte count does not match the location.
    """
    if len(raw) != location.nbytes:
        raise FormatError(f"tensor {location.key!r}: got {len(raw)} bytes, expected {location.nbytes}")
    if location.byteorder != sys.byteorder:
        width = _itemsize(location.dtype)
        swapped = np.frombuffer(raw, dtype=f"u{width}").byteswap()
        raw = bytearray(swapped.tobytes())
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    values = flat.view(location.dtype)
    if location.stride is None:
        return values.reshape(location.shape)
    return values.as_strided(location.shape, location.stride).clone()


def local_reader(path: Path) -> tuple[ByteReader, int]:
    """Return a reader of a local file's byte ranges and the file's size."""
    size = path.stat().st_size

    def read(start: int, stop: int) -> bytes:
        with path.open("rb") as stream:
            stream.seek(start)
            data = stream.read(stop - start)
        if len(data) != stop - start:
            raise FormatError(f"{path}: read {len(data)} bytes at offset {start}, expected {stop - start}")
        return data

    return read, size


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for extent in shape:
        count *= extent
    return count


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()
