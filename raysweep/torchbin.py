"""Locate one tensor in a `torch.save` zip checkpoint without running pickled code.

Since torch 1.6, `torch.save` writes an uncompressed zip archive:

    PREFIX/data.pkl       the pickled object; each tensor is a call to
                          torch._utils._rebuild_tensor_v2 whose storage is a
                          persistent id ("storage", torch.FloatStorage, "0", "cpu", numel)
    PREFIX/byteorder      "little" or "big" (absent in files from older torch)
    PREFIX/data/0, 1, ... the raw bytes of each storage

`locate_torch_bin` reads the zip's central directory (at the end of the file)
and `data.pkl` (near the start), unpickles `data.pkl` with `SafeUnpickler`,
and returns the byte range of the one storage record that contains the tensor.

`SafeUnpickler` resolves only the globals in `ALLOWED_GLOBALS`, and each
resolves to a local stand-in that records its arguments, so no torch function
or other code runs during unpickling. A pickle that names any other global is
rejected before the global is imported.
"""

from __future__ import annotations

import io
import logging
import pickle
import struct
import zipfile
from dataclasses import dataclass

import torch

from raysweep.formats import ByteReader, FormatError, TensorLocation, choose_key

logger = logging.getLogger(__name__)

# Bytes read from the end of the file before opening the zip directory: the
# end-of-directory records and, for checkpoints of a few hundred tensors,
# the whole central directory, in one request.
DIRECTORY_PREFETCH = 16 * 1024
# Larger data.pkl records are rejected; Pythia-12b's first shard needs about 30 KB.
MAX_PICKLE_BYTES = 64 * 1024 * 1024

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"

STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
DTYPE_NAMES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


class UnsafePickleError(FormatError):
    """A checkpoint's pickle references something other than tensor rebuilding."""


@dataclass(frozen=True)
class StorageType:
    """Stand-in for a torch storage class such as torch.FloatStorage."""

    dtype: torch.dtype


@dataclass(frozen=True)
class StorageRef:
    """A storage record of the archive, as a persistent id names it."""

    dtype: torch.dtype
    record: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor as `_rebuild_tensor_v2` would build it, without building it."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


class StateDict(dict):
    """Stand-in for collections.OrderedDict; accepts the `_metadata` attribute of state dicts."""


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> TensorRef:
    return _tensor_ref(storage, storage_offset, size, stride, storage.dtype if isinstance(storage, StorageRef) else None)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None) -> TensorRef:
    if not isinstance(dtype, torch.dtype):
        raise UnsafePickleError(f"_rebuild_tensor_v3 received dtype {dtype!r}, expected a torch dtype")
    return _tensor_ref(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None) -> TensorRef:
    if not isinstance(data, TensorRef):
        raise UnsafePickleError(f"_rebuild_parameter received {type(data).__name__}, expected a tensor")
    return data


def _tensor_ref(storage, offset, size, stride, dtype) -> TensorRef:
    valid = (
        isinstance(storage, StorageRef)
        and isinstance(offset, int) and offset >= 0
        and isinstance(size, tuple) and all(isinstance(value, int) and value >= 0 for value in size)
        and isinstance(stride, tuple) and len(stride) == len(size)
        and all(isinstance(value, int) and value >= 0 for value in stride)
    )
    if not valid:
        raise UnsafePickleError(
            f"a tensor in the pickle has invalid rebuild arguments "
            f"(storage {type(storage).__name__}, offset {offset!r}, size {size!r}, stride {stride!r})"
        )
    return TensorRef(storage, offset, size, stride, dtype)


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    **{("torch", name): StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): StorageType(torch.uint8),
    **{("torch", name): dtype for name, dtype in DTYPE_NAMES.items()},
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `ALLOWED_GLOBALS`, each to an inert stand-in."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"the pickle references {module}.{name}, which rebuilding tensors does not need; "
                "it was not imported and nothing in the pickle was run"
            ) from None

    def persistent_load(self, pid):
        valid = (
            isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], StorageType) and isinstance(pid[2], str)
            and isinstance(pid[4], int) and pid[4] >= 0
        )
        if not valid:
            raise UnsafePickleError(f"the pickle contains the persistent id {pid!r}, expected a tensor storage")
        return StorageRef(pid[1].dtype, pid[2], pid[4])


def unpickle_state(data: bytes) -> dict:
    """Unpickle a checkpoint's data.pkl into a dict of `TensorRef` (and plain values).

    Raises:
        UnsafePickleError: the pickle names a global outside `ALLOWED_GLOBALS`
            or is not a dict.
        FormatError: the pickle is malformed.
    """
    try:
        state = SafeUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except Exception as error:  # a malformed pickle raises any of several types
        raise FormatError(f"data.pkl is not a valid pickle: {type(error).__name__}: {error}") from error
    if not isinstance(state, dict):
        raise UnsafePickleError(f"data.pkl contains a {type(state).__name__}, expected a state dict of tensors")
    return state


class _ReaderFile(io.RawIOBase):
    """Seekable read-only file over a `ByteReader`, for `zipfile`."""

    def __init__(self, read: ByteReader, size: int) -> None:
        self._read = read
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer) -> int:
        stop = min(self._size, self._position + len(buffer))
        if stop <= self._position:
            return 0
        data = self._read(self._position, stop)
        buffer[: len(data)] = data
        self._position = stop
        return len(data)


def locate_torch_bin(read: ByteReader, size: int, matrix: str, key: str | None, where: str,
                     prefetch=None) -> TensorLocation:
    """Return the location of the embedding tensor in a torch zip checkpoint.

    Args:
        read: reader of the file's byte ranges.
        size: file size in bytes.
        prefetch: optional callable(start, stop) that warms the reader's cache;
            used to fetch the end of the file in one request.

    Raises:
        UnsafePickleError: data.pkl references anything but tensor rebuilding.
        FormatError: the file is not a zip checkpoint or is inconsistent.
    """
    if size >= 4 and read(0, 4) != _LOCAL_HEADER_SIGNATURE:
        raise FormatError(
            f"{where} is not a zip-format torch checkpoint; files written by torch < 1.6 "
            "(or with _use_new_zipfile_serialization=False) are not supported, re-save them with torch.save"
        )
    if prefetch is not None:
        prefetch(max(0, size - DIRECTORY_PREFETCH), size)
    try:
        archive = zipfile.ZipFile(_ReaderFile(read, size))
    except zipfile.BadZipFile as error:
        raise FormatError(f"{where} is not a valid zip archive: {error}") from error
    records = {info.filename: info for info in archive.infolist()}

    pickles = [name for name in records if name.endswith("data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise FormatError(f"{where} has {len(pickles)} top-level data.pkl records, expected 1")
    prefix = pickles[0].removesuffix("data.pkl")
    pickle_info = records[pickles[0]]
    if pickle_info.file_size > MAX_PICKLE_BYTES:
        raise FormatError(f"{where}: data.pkl has {pickle_info.file_size} bytes, more than {MAX_PICKLE_BYTES}")

    start, stop = _record_span(read, pickle_info, where)
    try:
        state = unpickle_state(read(start, stop))
    except FormatError as error:
        raise type(error)(f"{where} could not be loaded as a weights-only torch checkpoint: {error}") from error
    tensors = {name: value for name, value in state.items() if isinstance(value, TensorRef)}
    tensor_key = choose_key(tensors, matrix, key, where)
    tensor = tensors[tensor_key]

    byteorder = "little"
    if f"{prefix}byteorder" in records:
        order_start, order_stop = _record_span(read, records[f"{prefix}byteorder"], where)
        byteorder = read(order_start, order_stop).decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise FormatError(f"{where}: byteorder record is {byteorder!r}, expected little or big")

    record_name = f"{prefix}data/{tensor.storage.record}"
    if record_name not in records:
        raise FormatError(f"{where}: tensor {tensor_key!r} refers to storage record {record_name}, which is absent")
    return _tensor_location(read, tensor_key, tensor, records[record_name], byteorder, where)


def _record_span(read: ByteReader, info: zipfile.ZipInfo, where: str) -> tuple[int, int]:
    """Return the byte range of a stored (uncompressed) zip record's content."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise FormatError(f"{where}: record {info.filename} is compressed; torch checkpoints store records uncompressed")
    if info.flag_bits & 0x1:
        raise FormatError(f"{where}: record {info.filename} is encrypted")
    header = read(info.header_offset, info.header_offset + _LOCAL_HEADER.size)
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != _LOCAL_HEADER_SIGNATURE:
        raise FormatError(f"{where}: no local file header at offset {info.header_offset} for {info.filename}")
    name_length, extra_length = fields[-2], fields[-1]
    start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    return start, start + info.file_size


def _tensor_location(read, tensor_key: str, tensor: TensorRef, info: zipfile.ZipInfo, byteorder: str,
                     where: str) -> TensorLocation:
    itemsize = torch.empty(0, dtype=tensor.dtype).element_size()
    record_start, record_stop = _record_span(read, info, where)
    storage_bytes = tensor.storage.numel * torch.empty(0, dtype=tensor.storage.dtype).element_size()
    if storage_bytes != info.file_size:
        raise FormatError(
            f"{where}: storage {info.filename} should have {storage_bytes} bytes "
            f"({tensor.storage.numel} x {tensor.storage.dtype}) but the record has {info.file_size}"
        )

    if any(extent == 0 for extent in tensor.shape):
        span_elements = 0
    else:
        span_elements = 1 + sum((extent - 1) * step for extent, step in zip(tensor.shape, tensor.stride))
    start = record_start + tensor.offset * itemsize
    stop = start + span_elements * itemsize
    if stop > record_stop:
        raise FormatError(
            f"{where}: tensor {tensor_key!r} (offset {tensor.offset}, shape {list(tensor.shape)}, "
            f"stride {list(tensor.stride)}) reaches past the end of its storage {info.filename}"
        )

    contiguous = _contiguous_strides(tensor.shape)
    stride = None if tensor.stride == contiguous or span_elements == 0 else tensor.stride
    whole_record = start == record_start and stop == record_stop
    return TensorLocation(
        key=tensor_key,
        dtype=tensor.dtype,
        shape=tensor.shape,
        start=start,
        stop=stop,
        stride=stride,
        byteorder=byteorder,
        crc32=info.CRC if whole_record else None,
    )


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for extent in reversed(shape):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))
