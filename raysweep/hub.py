"""Read one tensor from a Hugging Face Hub checkpoint with HTTP range requests, and cache it.

URLs, authentication and the endpoint come from huggingface_hub itself
(`hf_hub_url`, `get_hf_file_metadata`, `build_hf_headers` and its HTTP
session), so `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` behave as the
client defines them. The bytes read are:

- safetensors: the 8-byte header length, the JSON header, then the tensor;
- sharded checkpoints: the index JSON, then the same from the one shard that
  contains the tensor;
- `pytorch_model.bin`: the zip directory at the end of the file, `data.pkl`,
  then the one storage record that contains the tensor (see `raysweep.torchbin`).

Extracted tensors are cached beside the Hub client's own files, inside the
repository's folder of the Hub cache (`HF_HUB_CACHE`):

    models--ORG--NAME/refs/REVISION                          commit of a branch or tag (the client's own format)
    models--ORG--NAME/raysweep/located/COMMIT/REQUEST.json   file, ETag and key of the matrix at a commit
    models--ORG--NAME/raysweep/tensors/ETAG/KEY.safetensors  the tensor in its stored dtype

REQUEST is "input", "output" or "key=NAME". A tensor is stored under its
file's ETag (the sha256 of an LFS file), so revisions that serve the same
file share one cached copy. A rerun online sends HEAD requests only; offline
(`HF_HUB_OFFLINE=1`) it reads the refs and the cache and sends nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import torch

from raysweep.formats import (
    WEIGHT_FILES,
    FormatError,
    TensorLocation,
    choose_key,
    decode_tensor,
    locate_safetensors,
)
from raysweep.torchbin import locate_torch_bin

logger = logging.getLogger(__name__)

# Reads smaller than this are extended forward to this size and cached, so a
# zip local header and the record after it cost one request. Larger reads go
# straight into the caller's buffer.
READAHEAD = 4 * 1024
# Attempts to continue a range read after the connection breaks mid-body.
RESUME_ATTEMPTS = 5
COMMIT_PATTERN = re.compile(r"^[0-9a-f]{40}$")


class HubMissing(LookupError):
    """The repository, revision or file does not exist, or is not in the cache while offline."""


class HubError(RuntimeError):
    """The Hub returned something unusable: access denied, a bad response, an invalid file."""


@dataclass(frozen=True)
class HubTensor:
    """A tensor read from the Hub, with its provenance.

    Attributes:
        tensor: the tensor in its stored dtype, on CPU.
        tensor_key: name of the tensor in the checkpoint.
        weights_file: repo-relative name of the file that contains it.
        weights_format: "safetensors" or "pytorch-bin".
        commit: the commit the revision resolved to.
        fetched_bytes: response body bytes received for this tensor (0 when cached).
        sha256: sha256 of the tensor's bytes in the stored dtype, row-major.
    """

    tensor: torch.Tensor
    tensor_key: str
    weights_file: str
    weights_format: str
    commit: str
    fetched_bytes: int
    sha256: str


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repository at a commit, as its HEAD response describes it."""

    name: str
    commit: str | None
    etag: str
    size: int
    url: str
    headers: dict[str, str] = field(repr=False)


def fetch_tensor(repo_id: str, revision: str, matrix: str = "input", key: str | None = None) -> HubTensor:
    """Return the embedding tensor of a Hub repository at a revision, from the cache or by range reads.

    Args:
        revision: branch, tag or commit sha.
        matrix: "input" or "output", used when `key` is None.
        key: tensor name, overriding the search for a known architecture.

    Raises:
        HubMissing: the repository, revision or weights are absent, or not
            cached while offline.
        HubError: access was denied or a response or file is invalid.
        EmbeddingKeyError: no embedding key, or several, in the checkpoint.
    """
    from huggingface_hub import constants

    cache = TensorCache(repo_id)
    request = matrix if key is None else f"key={key}"
    if constants.HF_HUB_OFFLINE:
        return cache.load_offline(revision, request)

    session = HubSession(repo_id, revision)
    if session.commit is not None:  # a commit sha: its files never change, so the cache suffices
        cached = cache.load(session.commit, request)
        if cached is not None:
            return cached
    for name in WEIGHT_FILES:
        known_commit = session.commit
        remote = session.head(name)
        if known_commit is None and session.commit is not None:
            cached = cache.load(session.commit, request)
            if cached is not None:
                cache.write_ref(revision, session.commit)
                return cached
        if remote is None:
            continue

        weights, tensor_key = remote, key
        if name.endswith(".index.json"):
            weight_map = _read_weight_map(session, remote)
            tensor_key = choose_key(weight_map, matrix, key, f"{repo_id}@{revision}/{name}")
            weights = session.head(weight_map[tensor_key])
            if weights is None:
                raise HubMissing(f"{repo_id}@{revision}: {name} maps {tensor_key!r} to {weight_map[tensor_key]}, "
                                 "which does not exist at this revision")

        commit = session.commit or revision
        extracted = _read_remote_tensor(session, cache, weights, matrix, tensor_key, f"{repo_id}@{revision}")
        cache.write_located(commit, request, weights, extracted.tensor_key)
        cache.write_ref(revision, commit)
        return HubTensor(extracted.tensor, extracted.tensor_key, weights.name, _format_of(weights.name), commit,
                         session.fetched_bytes, extracted.sha256)

    raise HubMissing(f"{repo_id}@{revision} has none of the weight files {list(WEIGHT_FILES)}")


@dataclass(frozen=True)
class _Extracted:
    tensor: torch.Tensor
    tensor_key: str
    sha256: str


def _read_weight_map(session: HubSession, remote: RemoteFile) -> dict[str, str]:
    raw = session.read(remote, 0, remote.size)
    try:
        weight_map = json.loads(raw)["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise HubError(f"{session.repo_id}: {remote.name} is not a valid index (no weight_map): {error}") from error
    if not isinstance(weight_map, dict) or not all(isinstance(value, str) for value in weight_map.values()):
        raise HubError(f"{session.repo_id}: weight_map in {remote.name} must map tensor names to file names")
    return weight_map


def _read_remote_tensor(session: HubSession, cache: TensorCache, remote: RemoteFile, matrix: str,
                        key: str | None, where: str) -> _Extracted:
    """Locate the tensor in a remote weights file, then take it from the cache or read only its byte range."""
    where = f"{where}/{remote.name}"

    def read(start: int, stop: int) -> bytes:
        return session.read(remote, start, stop)

    def prefetch(start: int, stop: int) -> None:
        session.read(remote, start, stop, cache=True)

    if key is not None:
        cached = cache.load_tensor(remote.etag, key)
        if cached is not None:
            return cached
    try:
        if remote.name.endswith(".safetensors"):
            location = locate_safetensors(read, remote.size, matrix, key, where)
        else:
            location = locate_torch_bin(read, remote.size, matrix, key, where, prefetch=prefetch)
        # Another revision may have served the same file (same ETag) before.
        cached = cache.load_tensor(remote.etag, location.key)
        if cached is not None:
            return cached
        raw = session.read(remote, location.start, location.stop)
        _check_crc(location, raw, where)
        tensor = decode_tensor(location, raw)
    except FormatError as error:
        raise HubError(str(error)) from error
    extracted = _Extracted(tensor, location.key, sha256_of(tensor))
    cache.store_tensor(remote, extracted, session.repo_id, session.commit or session.revision)
    return extracted


def _check_crc(location: TensorLocation, raw: bytearray, where: str) -> None:
    if location.crc32 is not None and zlib.crc32(raw) != location.crc32:
        raise FormatError(
            f"{where}: the bytes of {location.key!r} fail the zip record's CRC-32 check; "
            "the download is corrupt or the file changed while it was read"
        )


def sha256_of(tensor: torch.Tensor) -> str:
    """Return the sha256 of a tensor's bytes in its dtype, row-major."""
    raw = tensor.contiguous().view(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(raw)).hexdigest()


def _format_of(name: str) -> str:
    return "safetensors" if name.endswith(".safetensors") else "pytorch-bin"


class HubSession:
    """HEAD and range-GET requests for one repository, pinned to one commit once known.

    The first response fixes the commit (its X-Repo-Commit header), and later
    requests name that commit instead of the branch, so a branch that moves
    during the read cannot mix two commits' files. `fetched_bytes` counts the
    response body bytes received.
    """

    def __init__(self, repo_id: str, revision: str) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.commit: str | None = revision if COMMIT_PATTERN.match(revision) else None
        self.fetched_bytes = 0
        self._chunks: dict[str, list[tuple[int, bytes]]] = {}

    def head(self, name: str) -> RemoteFile | None:
        """Return a file's metadata, or None when the revision has no such file."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(self.repo_id, name, revision=self.commit or self.revision)
        try:
            metadata = get_hf_file_metadata(url, retry_on_errors=True)
        except RemoteEntryNotFoundError as error:
            self._pin(error.response.headers.get("X-Repo-Commit") if error.response is not None else None)
            return None
        except GatedRepoError as error:
            raise HubError(
                f"{self.repo_id} is a gated repository and the request was not authorised: accept its "
                "terms on the Hub and set HF_TOKEN to a token of that account"
            ) from error
        except RepositoryNotFoundError as error:
            raise HubMissing(
                f"Hub repository {self.repo_id!r} not found (or not accessible with HF_TOKEN)"
            ) from error
        except RevisionNotFoundError as error:
            raise HubMissing(f"revision {self.revision!r} of {self.repo_id} not found on the Hub") from error
        except HfHubHTTPError as error:
            raise HubError(f"{self.repo_id}@{self.revision}: HEAD {name} failed: {error}") from error

        self._pin(metadata.commit_hash)
        if metadata.etag is None or metadata.size is None:
            raise HubError(f"{url}: the response has no ETag or size, so it is not a Hub file endpoint")
        headers = build_hf_headers()
        headers["Accept-Encoding"] = "identity"
        if urlsplit(metadata.location).netloc != urlsplit(url).netloc:
            # A CDN or storage host: as hf_hub_download does, send no token there.
            headers.pop("authorization", None)
            headers.pop("Authorization", None)
        return RemoteFile(name, metadata.commit_hash, metadata.etag, metadata.size, metadata.location, headers)

    def _pin(self, commit: str | None) -> None:
        if self.commit is None and commit:
            self.commit = commit

    def read(self, remote: RemoteFile, start: int, stop: int, cache: bool = False) -> bytearray:
        """Return bytes [start, stop) of a remote file, taking the parts it has already fetched from memory.

        Gaps below `READAHEAD` bytes, and all gaps with `cache=True`, are
        fetched with read-ahead and kept for later reads of the same file.
        Larger gaps stream straight into the returned buffer.
        """
        stop = min(stop, remote.size)
        if start >= stop:
            return bytearray()
        chunks = self._chunks.setdefault(remote.url, [])
        output = bytearray(stop - start)
        view = memoryview(output)
        position = start
        for chunk_start, chunk in sorted(chunks):
            chunk_stop = chunk_start + len(chunk)
            if chunk_stop <= position or chunk_start >= stop:
                continue
            if chunk_start > position:
                self._fill(remote, view[position - start: chunk_start - start], position, chunks, cache)
                position = chunk_start
            overlap_stop = min(stop, chunk_stop)
            view[position - start: overlap_stop - start] = chunk[position - chunk_start: overlap_stop - chunk_start]
            position = overlap_stop
            if position >= stop:
                break
        if position < stop:
            self._fill(remote, view[position - start:], position, chunks, cache)
        return output

    def _fill(self, remote: RemoteFile, target: memoryview, start: int, chunks: list, cache: bool) -> None:
        """Fetch the bytes of `target`, which starts at file offset `start`."""
        stop = start + len(target)
        if not cache and len(target) >= READAHEAD:
            self._fetch(remote, start, target)
            return
        following = [chunk_start for chunk_start, _ in chunks if chunk_start >= stop]
        fetch_stop = min(remote.size, max(stop, start + READAHEAD), min(following, default=remote.size))
        data = bytearray(fetch_stop - start)
        self._fetch(remote, start, memoryview(data))
        chunks.append((start, bytes(data)))
        target[:] = data[: len(target)]

    def _fetch(self, remote: RemoteFile, start: int, target: memoryview) -> None:
        """Fetch bytes starting at `start` into `target` with range requests, resuming broken transfers."""
        import httpx2

        received = [0]  # updated in place by _stream_range, so progress survives an exception
        attempts = 0
        while received[0] < len(target):
            try:
                self._stream_range(remote, start, target, received)
            except httpx2.TransportError as error:
                attempts += 1
                if attempts > RESUME_ATTEMPTS:
                    raise HubError(
                        f"{self.repo_id}: reading {remote.name} bytes {start}..{start + len(target)} failed "
                        f"after {RESUME_ATTEMPTS} resumed attempts: {error}"
                    ) from error
                logger.warning("%s: reading %s bytes %d..%d broke after %d bytes (%s); resuming",
                               self.repo_id, remote.name, start, start + len(target), received[0], error)

    def _stream_range(self, remote: RemoteFile, start: int, target: memoryview, received: list[int]) -> None:
        """Stream one range request into target[received[0]:], advancing received[0] per chunk."""
        from huggingface_hub import constants
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

        first = start + received[0]
        last = start + len(target) - 1
        headers = {**remote.headers, "Range": f"bytes={first}-{last}"}
        # Connection errors are not retried here: the caller resumes at the
        # bytes already received.
        with http_stream_backoff("GET", remote.url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
                                 retry_on_exceptions=()) as response:
            try:
                hf_raise_for_status(response)
            except HfHubHTTPError as error:
                raise HubError(f"{self.repo_id}: GET {remote.name} bytes {first}..{last} failed: {error}") from error
            skip = self._check_range_response(response, remote, first, last)
            # Chunks as they arrive, so a broken transfer resumes after the last byte received.
            for chunk in response.iter_bytes():
                self.fetched_bytes += len(chunk)
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                take = min(len(chunk), len(target) - received[0])
                target[received[0]: received[0] + take] = chunk[:take]
                received[0] += take
                if received[0] == len(target):
                    break

    def _check_range_response(self, response, remote: RemoteFile, first: int, last: int) -> int:
        """Validate a range response; return how many leading body bytes to skip."""
        if response.status_code == 200:
            # The server ignored Range and sends the whole file: skip to `first`.
            logger.warning("%s: the server ignored the Range header for %s; reading from the start of the file",
                           self.repo_id, remote.name)
            return first
        if response.status_code != 206:
            raise HubError(f"{self.repo_id}: GET {remote.name} returned HTTP {response.status_code}, expected 206")
        content_range = response.headers.get("Content-Range", "")
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
        if match is None or int(match[1]) != first or int(match[2]) != last:
            raise HubError(
                f"{self.repo_id}: GET {remote.name} bytes {first}..{last} returned Content-Range "
                f"{content_range!r}"
            )
        if match[3] != "*" and int(match[3]) != remote.size:
            raise HubError(
                f"{self.repo_id}: {remote.name} has {match[3]} bytes now but {remote.size} when its "
                "metadata was read; the file changed during the read"
            )
        return 0


class TensorCache:
    """Extracted tensors of one repository in the Hub cache; see the module documentation for the layout."""

    def __init__(self, repo_id: str) -> None:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        self.repo_id = repo_id
        self.folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")

    def load_offline(self, revision: str, request: str) -> HubTensor:
        """Return a cached tensor without network access, resolving the revision through refs/."""
        commit = revision if COMMIT_PATTERN.match(revision) else self.read_ref(revision)
        cached = self.load(commit, request) if commit else None
        if cached is None:
            raise HubMissing(
                f"{self.repo_id}@{revision}: the {request} matrix is not in the local Hub cache "
                f"({self.folder}) and the Hub cannot be reached (HF_HUB_OFFLINE is set); "
                "run once online to cache it"
            )
        return cached

    def load(self, commit: str, request: str) -> HubTensor | None:
        """Return the tensor cached for a request at a commit, or None."""
        located_path = self._located_path(commit, request)
        try:
            located = json.loads(located_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        extracted = self.load_tensor(located["etag"], located["tensor_key"])
        if extracted is None:
            return None
        return HubTensor(extracted.tensor, extracted.tensor_key, located["weights_file"],
                         _format_of(located["weights_file"]), commit, 0, extracted.sha256)

    def load_tensor(self, etag: str, tensor_key: str) -> _Extracted | None:
        """Return a cached tensor after checking its sha256, or None when absent or corrupt."""
        from safetensors import SafetensorError, safe_open

        path = self._tensor_path(etag, tensor_key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                expected = handle.metadata()["sha256"]
                tensor = handle.get_tensor("tensor")
        except (SafetensorError, OSError, KeyError) as error:
            logger.warning("ignoring unreadable cached tensor %s (%s); it will be fetched again", path, error)
            return None
        actual = sha256_of(tensor)
        if actual != expected:
            logger.warning("ignoring cached tensor %s: its sha256 is %s, expected %s; it will be fetched again",
                           path, actual, expected)
            return None
        return _Extracted(tensor, tensor_key, actual)

    def store_tensor(self, remote: RemoteFile, extracted: _Extracted, repo_id: str, commit: str) -> None:
        from safetensors.torch import save_file

        metadata = {
            "repo_id": repo_id,
            "commit": commit,
            "weights_file": remote.name,
            "etag": remote.etag,
            "tensor_key": extracted.tensor_key,
            "sha256": extracted.sha256,
        }
        path = self._tensor_path(remote.etag, extracted.tensor_key)
        _write_atomic(path, lambda temporary: save_file({"tensor": extracted.tensor.contiguous()}, temporary,
                                                        metadata=metadata))

    def write_located(self, commit: str, request: str, remote: RemoteFile, tensor_key: str) -> None:
        record = {"weights_file": remote.name, "etag": remote.etag, "tensor_key": tensor_key}
        text = json.dumps(record, sort_keys=True)
        _write_atomic(self._located_path(commit, request), lambda temporary: Path(temporary).write_text(text))

    def write_ref(self, revision: str, commit: str) -> None:
        """Record which commit a branch or tag pointed to, as the Hub client does in refs/."""
        if revision == commit or COMMIT_PATTERN.match(revision):
            return
        path = self.folder / "refs" / revision
        if path.is_file() and path.read_text() == commit:
            return
        _write_atomic(path, lambda temporary: Path(temporary).write_text(commit))
        # The client's cache scanner treats a repository folder without snapshots/ as corrupt.
        (self.folder / "snapshots").mkdir(parents=True, exist_ok=True)

    def read_ref(self, revision: str) -> str | None:
        try:
            return (self.folder / "refs" / revision).read_text().strip() or None
        except OSError:
            return None

    def _located_path(self, commit: str, request: str) -> Path:
        return self.folder / "raysweep" / "located" / commit / f"{quote(request, safe='=')}.json"

    def _tensor_path(self, etag: str, tensor_key: str) -> Path:
        return self.folder / "raysweep" / "tensors" / quote(etag, safe="") / f"{quote(tensor_key, safe='')}.safetensors"


def _write_atomic(path: Path, write) -> None:
    """Call write(temporary_path) on a file in the target folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
