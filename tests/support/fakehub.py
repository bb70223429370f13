"""Loopback fake of the Hugging Face Hub's model download routes, for tests.

`FakeHub` serves in-memory model repos over HTTP on 127.0.0.1 in the Hub's URL
layout. The real ``huggingface_hub`` client (checked against 2.4.0) downloads
from it once ``HF_ENDPOINT``, and the constants that the client reads at
import, point at ``FakeHub.endpoint``. ``tests/support/hub_fixtures.py`` sets
them up.

Routes (``{repo_id}`` is ``name`` or ``org/name``, ``{revision}`` is a branch
name or a commit sha, percent-encoded as the client sends it):

- ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``: file content, with a
  single-range ``Range`` answered by 206 and an unsatisfiable one by 416.
- ``GET /api/models/{repo_id}`` and ``/api/models/{repo_id}/revision/{revision}``:
  repo info (``model_info``, ``repo_info``, ``snapshot_download``).
- ``GET /api/models/{repo_id}/tree/{revision}[/{path}]?recursive=``:
  ``list_repo_tree`` and ``list_repo_files``.
- ``POST /api/models/{repo_id}/paths-info/{revision}``: ``get_paths_info``.
- ``GET /api/models/{repo_id}/refs``: ``list_repo_refs``.

Missing things get a 404 with the ``X-Error-Code`` header that the Hub sends, and
``huggingface_hub.utils.hf_raise_for_status`` (2.4.0) maps each code to an
exception class:

=================  ==============================================================
X-Error-Code       exception raised by hf_hub_download / HfApi
=================  ==============================================================
RepoNotFound       huggingface_hub.errors.RepositoryNotFoundError
RevisionNotFound   huggingface_hub.errors.RevisionNotFoundError
EntryNotFound      huggingface_hub.errors.RemoteEntryNotFoundError, a subclass of
                   both EntryNotFoundError and HfHubHTTPError
=================  ==============================================================

Like the Hub, the server stores weight files, identified by suffix, and files
over 10 MiB as Git LFS objects. Their ``ETag`` and ``X-Linked-Etag`` are
the content's sha256, and ``X-Linked-Size`` is their size. Other files are
plain git blobs whose ``ETag`` is the git blob sha1 and that carry no
``X-Linked-*`` headers. ``add_file(..., lfs=...)`` overrides the choice.

`FakeHub.gate` makes a repo gated: its resolve and API routes then answer 401
with ``X-Error-Code: GatedRepo``, which the client raises as
``huggingface_hub.errors.GatedRepoError``, unless the request carries
``Authorization: Bearer TOKEN`` with the token given to `gate`.

With ``FakeHub(cdn_redirects=True)``, resolve requests for LFS files get a 302
to a second loopback server on another port, as the Hub redirects to its CDN.
The client then stops at the 302 for metadata and drops the ``Authorization``
header when it downloads from the CDN, because the CDN's origin differs.

No response carries ``X-Xet-*`` headers or a ``xet-auth`` link, so the client
always downloads over plain HTTP.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import logging
import re
import socket
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

logger = logging.getLogger(__name__)

# Suffixes of model files that the default .gitattributes of new Hub repos
# routes to Git LFS, plus .gguf and .ckpt.
LFS_SUFFIXES = frozenset(
    {
        ".bin", ".ckpt", ".gguf", ".h5", ".joblib", ".model", ".msgpack", ".npy", ".npz",
        ".onnx", ".ot", ".pb", ".pickle", ".pkl", ".pt", ".pth", ".safetensors", ".tflite", ".zip",
    }
)
# NOTE: the Hub requires LFS for large files. 10 MiB approximates its limit and
# is not taken from Hub code.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

_REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_COMMIT_SHA_PATTERN = re.compile(r"^[0-9a-f]{40}$")
_SINGLE_RANGE_PATTERN = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")
_API_SUBROUTES = frozenset({"revision", "tree", "refs", "paths-info"})
_TRUE_QUERY_VALUES = frozenset({"1", "true", "yes"})
_WRITE_CHUNK_SIZE = 1024 * 1024
# Fixed timestamp for the repo info, so that responses are reproducible.
_LAST_MODIFIED = "2024-01-01T00:00:00.000Z"

FileKey = tuple[str, str, str]
"""(repo_id, revision as written in the request URL, path in repo)."""


class RangeNotSatisfiable(ValueError):
    """Raised when a `Range` header selects no byte of the file."""


def parse_range_header(header: str | None, size: int) -> tuple[int, int] | None:
    """Return the half-open byte span ``(start, stop)`` that a `Range` header selects.

    Accepts one range in the forms ``bytes=a-b``, ``bytes=a-`` and ``bytes=-n``,
    and clips ``b`` and ``n`` to the file size. Returns None, meaning "send the
    whole file with 200", for no header, a malformed header or several ranges,
    which RFC 9110 section 14.2 allows a server to ignore.
    Raises RangeNotSatisfiable when the range starts at or after the end of the
    file, for ``bytes=-0``, and for any range on an empty file.
    """
    if header is None:
        return None
    match = _SINGLE_RANGE_PATTERN.match(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None

    if not first:
        suffix_length = int(last)
        if suffix_length == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(size - suffix_length, 0), size

    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(header)
    stop = min(int(last) + 1, size) if last else size
    return start, stop


@dataclass(frozen=True)
class RequestRecord:
    """One request that a FakeHub server handled.

    The record is logged just before the response is sent. When the client
    disconnects before the whole body is sent, ``bytes`` is corrected afterwards.
    """

    method: str
    path: str
    """Request target as sent, percent-encoded, including the query string."""
    range: str | None
    """Value of the `Range` request header."""
    status: int
    bytes: int
    """Response body bytes sent (0 for HEAD)."""
    authorization: str | None
    """Value of the `Authorization` request header."""
    headers: dict[str, str]
    """All request headers, with lowercase names. A repeated header keeps its last value."""
    origin: str
    """Server that handled the request, ``"hub"`` or ``"cdn"``."""
    file_key: FileKey | None
    """Set when the request addressed a file's content (resolve and CDN routes)."""


@dataclass(frozen=True)
class _Blob:
    data: bytes
    sha256: str
    lfs: bool
    git_oid: str
    """Git blob id of the stored object, which is the LFS pointer for LFS files and the content otherwise."""

    @classmethod
    def from_bytes(cls, data: bytes, lfs: bool) -> _Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        stored = _lfs_pointer(sha256, len(data)) if lfs else data
        return cls(data=data, sha256=sha256, lfs=lfs, git_oid=_git_blob_oid(stored))

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, len(self.data)))


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _is_lfs_path(path: str, size: int) -> bool:
    return PurePosixPath(path).suffix.lower() in LFS_SUFFIXES or size > LFS_SIZE_THRESHOLD


def _validate_repo_id(repo_id: str) -> None:
    if not _REPO_ID_PATTERN.match(repo_id):
        raise ValueError(f"invalid repo_id {repo_id!r}: expected 'name' or 'org/name'")


def _validate_revision(revision: str) -> None:
    if not revision or revision.startswith("/") or revision.endswith("/") or ".." in revision:
        raise ValueError(f"invalid branch name {revision!r}")
    if _COMMIT_SHA_PATTERN.match(revision):
        raise ValueError(f"invalid branch name {revision!r}: a 40-hex name would shadow commit shas")


def _validate_path_in_repo(path: str) -> None:
    parts = path.split("/")
    if not path or "\\" in path or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid path in repo {path!r}: expected a relative POSIX path without '.' or '..'")


def _directories_of(paths: Iterable[str]) -> set[str]:
    directories = set()
    for path in paths:
        parent = PurePosixPath(path).parent
        while str(parent) != ".":
            directories.add(str(parent))
            parent = parent.parent
    return directories


@dataclass
class _Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | memoryview = b""
    file_key: FileKey | None = None


def _json_response(payload: object, status: int = 200) -> _Response:
    body = json.dumps(payload).encode()
    return _Response(status, {"Content-Type": "application/json"}, body)


def _error_response(
    status: int, message: str, error_code: str | None = None, headers: dict[str, str] | None = None
) -> _Response:
    response = _json_response({"error": message}, status)
    response.headers["X-Error-Message"] = message
    if error_code is not None:
        response.headers["X-Error-Code"] = error_code
    response.headers.update(headers or {})
    return response


def _not_found_response(error_code: str, revision: str, headers: dict[str, str] | None = None) -> _Response:
    """Build the Hub's 404 for a missing repo, revision or file, with its message text."""
    messages = {
        "RepoNotFound": "Repository not found",
        "RevisionNotFound": f"Invalid rev id: {revision}",
        "EntryNotFound": "Entry not found",
    }
    return _error_response(404, messages[error_code], error_code, headers)


def _method_not_allowed_response(method: str, allowed_methods: tuple[str, ...]) -> _Response:
    return _error_response(
        405, f"method {method} is not allowed on this route", headers={"Allow": ", ".join(allowed_methods)}
    )


class FakeHub:
    """Loopback HTTP server that serves model repos in the Hugging Face Hub's URL layout.

    Use it as a context manager, or call `start()` and `stop()`. Repos, branches and
    files are created by `add_file` and `add_directory` and may change while the
    server runs. Every change to a branch makes a new commit whose sha is derived
    from the repo id, the branch name and the file listing. Earlier commit shas stay
    resolvable, so a client pinned to a sha keeps seeing the files of that commit.

    The counters and the request log are thread-safe. `bytes_served` counts only
    file content sent by successful GETs (200 and 206) on the resolve and CDN routes.
    """

    def __init__(self, *, cdn_redirects: bool = False) -> None:
        self._cdn_redirects = cdn_redirects
        self._lock = threading.Lock()
        self._branches: dict[str, dict[str, dict[str, _Blob]]] = {}
        self._commits: dict[str, dict[str, dict[str, _Blob]]] = {}
        self._branch_heads: dict[str, dict[str, str]] = {}
        self._commit_branches: dict[str, dict[str, str]] = {}
        self._blobs_by_sha256: dict[str, _Blob] = {}
        self._bytes_served = 0
        self._bytes_by_file: dict[FileKey, int] = {}
        self._records: list[RequestRecord] = []
        self._pending_disconnects: dict[FileKey, list[int]] = {}
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self._gate_tokens: dict[str, str] = {}

    # Lifecycle

    def start(self) -> FakeHub:
        """Start the server threads. Raises RuntimeError if already started."""
        if self._servers:
            raise RuntimeError("FakeHub is already started")
        roles = ["hub", "cdn"] if self._cdn_redirects else ["hub"]
        for role in roles:
            server = _Server(self, role)
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"FakeHub-{role}-{server.server_address[1]}",
                daemon=True,
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        logger.debug("FakeHub started at %s", self.endpoint)
        return self

    def stop(self) -> None:
        """Stop the servers, close open keep-alive connections and join the threads.

        Calling it on a stopped hub does nothing.
        """
        for server in self._servers:
            server.shutdown()
            server.close_connections()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._servers:
            logger.debug("FakeHub stopped at %s", self._servers[0].url)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """Base URL to use as ``HF_ENDPOINT``, such as ``http://127.0.0.1:43127``."""
        return self._server("hub").url

    @property
    def cdn_endpoint(self) -> str:
        """Base URL of the CDN server, which exists only with ``cdn_redirects=True``."""
        return self._server("cdn").url

    def _server(self, role: str) -> _Server:
        for server in self._servers:
            if server.role == role:
                return server
        if not self._servers:
            raise RuntimeError("FakeHub is not started: call start() or use it as a context manager")
        raise RuntimeError(f"FakeHub has no {role!r} server: pass cdn_redirects=True to get one")

    # Repo content

    def add_file(
        self,
        repo_id: str,
        revision: str,
        path: str,
        data: bytes,
        *,
        lfs: bool | None = None,
    ) -> str:
        """Add or replace one file on a branch and return the branch's new commit sha.

        Creates the repo and the branch if needed. ``lfs=None`` stores the file in
        LFS when its suffix is in `LFS_SUFFIXES` or it is larger than 10 MiB.
        """
        _validate_repo_id(repo_id)
        _validate_revision(revision)
        _validate_path_in_repo(path)
        blob = _Blob.from_bytes(bytes(data), _is_lfs_path(path, len(data)) if lfs is None else lfs)
        with self._lock:
            files = dict(self._branches.get(repo_id, {}).get(revision, {}))
            files[path] = blob
            return self._commit_locked(repo_id, revision, files)

    def add_directory(self, repo_id: str, revision: str, directory: str | Path) -> str:
        """Add every file under a local directory to a branch in one commit and return its sha.

        Paths in the repo are relative to ``directory``. LFS storage is chosen as
        in `add_file`. Raises ValueError if the directory contains no file.
        """
        _validate_repo_id(repo_id)
        _validate_revision(revision)
        root = Path(directory)
        local_files = sorted(path for path in root.rglob("*") if path.is_file())
        if not local_files:
            raise ValueError(f"directory {str(root)!r} contains no files to add")

        new_blobs = {}
        for local_path in local_files:
            path = local_path.relative_to(root).as_posix()
            _validate_path_in_repo(path)
            data = local_path.read_bytes()
            new_blobs[path] = _Blob.from_bytes(data, _is_lfs_path(path, len(data)))

        with self._lock:
            files = dict(self._branches.get(repo_id, {}).get(revision, {}))
            files.update(new_blobs)
            return self._commit_locked(repo_id, revision, files)

    def remove_file(self, repo_id: str, revision: str, path: str) -> str:
        """Delete one file from a branch and return the branch's new commit sha.

        Raises KeyError when the repo, branch or file does not exist. The branch
        stays even when its last file is removed.
        """
        with self._lock:
            try:
                files = dict(self._branches[repo_id][revision])
                del files[path]
            except KeyError:
                raise KeyError(f"no file {path!r} on branch {revision!r} of repo {repo_id!r}") from None
            return self._commit_locked(repo_id, revision, files)

    def gate(self, repo_id: str, token: str) -> None:
        """Serve a repo only to requests that send ``Authorization: Bearer <token>``, as a gated Hub repo."""
        with self._lock:
            self._gate_tokens[repo_id] = token

    def _gate_response(self, repo_id: str, authorization: str | None) -> _Response | None:
        """Return the Hub's 401 for a gated repo requested without its token, else None."""
        with self._lock:
            token = self._gate_tokens.get(repo_id)
        if token is None or authorization == f"Bearer {token}":
            return None
        message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
        return _error_response(401, message, "GatedRepo")

    def commit_sha(self, repo_id: str, revision: str) -> str:
        """Return the commit sha that a branch name or commit sha resolves to.

        Raises KeyError when the repo or revision does not exist.
        """
        with self._lock:
            resolved = self._resolve_locked(repo_id, revision)
        if isinstance(resolved, str):
            raise KeyError(f"{resolved}: repo {repo_id!r}, revision {revision!r}")
        return resolved[0]

    def branches(self, repo_id: str) -> dict[str, str]:
        """Return ``{branch name: head commit sha}`` for a repo (empty if the repo does not exist)."""
        with self._lock:
            return dict(self._branch_heads.get(repo_id, {}))

    def _commit_locked(self, repo_id: str, branch: str, files: dict[str, _Blob]) -> str:
        digest = hashlib.sha1(f"{repo_id}\0{branch}\0".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].sha256}\0".encode())
        sha = digest.hexdigest()

        self._branches.setdefault(repo_id, {})[branch] = files
        self._commits.setdefault(repo_id, {})[sha] = files
        self._branch_heads.setdefault(repo_id, {})[branch] = sha
        self._commit_branches.setdefault(repo_id, {})[sha] = branch
        for blob in files.values():
            self._blobs_by_sha256[blob.sha256] = blob
        return sha

    def _resolve_locked(self, repo_id: str, revision: str) -> tuple[str, dict[str, _Blob]] | str:
        """Return ``(commit sha, files)``, or the X-Error-Code when the repo or revision is missing."""
        if repo_id not in self._branches:
            return "RepoNotFound"
        sha = self._branch_heads[repo_id].get(revision, revision)
        files = self._commits[repo_id].get(sha)
        if files is None:
            return "RevisionNotFound"
        return sha, files

    # Fault injection

    def drop_connection_after(self, repo_id: str, revision: str, path: str, after_bytes: int, times: int = 1) -> None:
        """Cut the next ``times`` successful GETs of a file after ``after_bytes`` body bytes.

        The response headers still announce the full length, and the server then
        closes the connection, as when a transfer breaks. ``revision`` must be
        written as the client requests it (branch name or commit sha). Only the
        sent bytes are counted.
        """
        if after_bytes < 0 or times < 1:
            raise ValueError(f"after_bytes must be >= 0 and times >= 1, got {after_bytes} and {times}")
        with self._lock:
            self._pending_disconnects.setdefault((repo_id, revision, path), []).extend([after_bytes] * times)

    def _take_disconnect(self, file_key: FileKey) -> int | None:
        with self._lock:
            pending = self._pending_disconnects.get(file_key)
            if not pending:
                return None
            return pending.pop(0)

    # Accounting

    @property
    def bytes_served(self) -> int:
        """File content bytes sent by GETs on the resolve and CDN routes since the last reset."""
        with self._lock:
            return self._bytes_served

    def bytes_served_by_path(self) -> dict[FileKey, int]:
        """Return a copy of `bytes_served` split by ``(repo_id, revision, path)``.

        The revision is the one written in the request URL, so a file fetched once
        by branch name and once by commit sha has two keys.
        """
        with self._lock:
            return dict(self._bytes_by_file)

    def bytes_served_for_file(self, repo_id: str, path: str, branch: str | None = None) -> int:
        """Return the content bytes sent for one file, however the client named the revision.

        Clients such as transformers resolve a branch to its commit sha first and
        then download by sha, so this sums the requests by branch name and by the
        sha of any commit made on that branch. ``branch=None`` sums all revisions.
        """
        with self._lock:
            commit_branches = self._commit_branches.get(repo_id, {})
            total = 0
            for (key_repo_id, revision, key_path), count in self._bytes_by_file.items():
                if key_repo_id != repo_id or key_path != path:
                    continue
                if branch is None or branch in (revision, commit_branches.get(revision)):
                    total += count
            return total

    @property
    def requests(self) -> list[RequestRecord]:
        """Copy of the request log, oldest first, since the last reset."""
        with self._lock:
            return list(self._records)

    def reset_counters(self) -> None:
        """Zero the byte counters and clear the request log."""
        with self._lock:
            self._bytes_served = 0
            self._bytes_by_file.clear()
            self._records.clear()

    def _record(self, record: RequestRecord, content_bytes: int) -> None:
        with self._lock:
            self._records.append(record)
            self._count_content_locked(record.file_key, content_bytes)

    def _correct_short_write(self, record: RequestRecord, content_bytes: int, bytes_written: int) -> None:
        """Replace a logged record whose body was cut short and uncount the bytes never sent."""
        with self._lock:
            for index, logged in enumerate(self._records):
                if logged is record:
                    self._records[index] = dataclasses.replace(record, bytes=bytes_written)
                    unsent = content_bytes - min(bytes_written, content_bytes)
                    self._count_content_locked(record.file_key, -unsent)
                    break

    def _count_content_locked(self, file_key: FileKey | None, content_bytes: int) -> None:
        if file_key is None or content_bytes == 0:
            return
        self._bytes_served += content_bytes
        self._bytes_by_file[file_key] = self._bytes_by_file.get(file_key, 0) + content_bytes

    # Routes. Each returns the response to send; `_Handler` writes and records it.

    def _route(
        self,
        role: str,
        method: str,
        target: str,
        range_header: str | None,
        body: bytes,
        authorization: str | None = None,
    ) -> _Response:
        split = urlsplit(target)
        segments = split.path.split("/")[1:]
        query = parse_qs(split.query)

        if role == "cdn":
            return self._route_cdn(method, segments, query, range_header)
        if segments[:2] == ["api", "models"]:
            api_segments = segments[2:]
            repo_length = 1 if len(api_segments) == 1 or api_segments[1:2] and api_segments[1] in _API_SUBROUTES else 2
            denied = self._gate_response("/".join(unquote(part) for part in api_segments[:repo_length]), authorization)
            return denied or self._route_api(method, api_segments, query, body)
        for repo_length in (1, 2):
            if len(segments) > repo_length + 2 and segments[repo_length] == "resolve":
                if method not in ("GET", "HEAD"):
                    return _method_not_allowed_response(method, ("GET", "HEAD"))
                repo_id = "/".join(unquote(segment) for segment in segments[:repo_length])
                denied = self._gate_response(repo_id, authorization)
                return denied or self._route_resolve(repo_id, segments[repo_length + 1 :], range_header)
        return _error_response(404, f"no route for {split.path}")

    def _split_revision_locked(self, repo_id: str, segments: list[str]) -> tuple[str, list[str]]:
        """Split URL segments into a revision and the rest.

        The client percent-encodes ``/`` in revisions, so the revision is normally
        the first segment. A revision sent with raw slashes is recognized when it
        names an existing branch.
        """
        for count in range(len(segments), 1, -1):
            candidate = unquote("/".join(segments[:count]))
            if candidate in self._branch_heads.get(repo_id, {}):
                return candidate, segments[count:]
        return unquote(segments[0]), segments[1:]

    def _route_resolve(self, repo_id: str, segments: list[str], range_header: str | None) -> _Response:
        with self._lock:
            revision, path_segments = self._split_revision_locked(repo_id, segments)
            resolved = self._resolve_locked(repo_id, revision)
        path = unquote("/".join(path_segments))
        if isinstance(resolved, str):
            return _not_found_response(resolved, revision)
        sha, files = resolved
        blob = files.get(path)
        if blob is None:
            return _not_found_response("EntryNotFound", revision, {"X-Repo-Commit": sha})

        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.etag}"'}
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(len(blob.data))
        if blob.lfs and self._cdn_redirects:
            query = urlencode({"repo": repo_id, "revision": revision, "path": path})
            headers["Location"] = f"{self.cdn_endpoint}/cdn/{blob.sha256}?{query}"
            return _Response(302, headers)
        return _content_response(blob, headers, range_header, (repo_id, revision, path))

    def _route_cdn(
        self, method: str, segments: list[str], query: dict[str, list[str]], range_header: str | None
    ) -> _Response:
        if method not in ("GET", "HEAD"):
            return _method_not_allowed_response(method, ("GET", "HEAD"))
        if len(segments) != 2 or segments[0] != "cdn":
            return _error_response(404, "no such object")
        with self._lock:
            blob = self._blobs_by_sha256.get(segments[1])
        if blob is None:
            return _error_response(404, "no such object")
        file_key = (query.get("repo", [""])[0], query.get("revision", [""])[0], query.get("path", [""])[0])
        return _content_response(blob, {"ETag": f'"{blob.sha256}"'}, range_header, file_key)

    def _route_api(self, method: str, segments: list[str], query: dict[str, list[str]], body: bytes) -> _Response:
        if not segments or not segments[0]:
            return _error_response(404, "no route for /api/models/")
        repo_length = 1 if len(segments) == 1 or segments[1] in _API_SUBROUTES else 2
        repo_id = "/".join(unquote(segment) for segment in segments[:repo_length])
        subroute = segments[repo_length] if len(segments) > repo_length else None
        arguments = segments[repo_length + 1 :]
        allowed_methods = ("POST",) if subroute == "paths-info" else ("GET", "HEAD")
        if method not in allowed_methods:
            return _method_not_allowed_response(method, allowed_methods)

        with self._lock:
            if repo_id not in self._branches:
                return _not_found_response("RepoNotFound", "")
            if subroute == "refs" and not arguments:
                return self._refs_locked(repo_id, query)
            if subroute is None:
                revision, rest = "main", []
            elif subroute in ("revision", "tree", "paths-info") and arguments:
                revision, rest = self._split_revision_locked(repo_id, arguments)
            else:
                return _error_response(404, f"no route for /api/models/{repo_id}/{'/'.join(segments[repo_length:])}")
            resolved = self._resolve_locked(repo_id, revision)

        if isinstance(resolved, str):
            return _not_found_response(resolved, revision)
        sha, files = resolved
        if subroute == "tree":
            return self._tree(files, unquote("/".join(rest)), _query_flag(query, "recursive"))
        if subroute == "paths-info":
            return self._paths_info(files, body)
        if rest:
            return _error_response(404, f"no route for /api/models/{repo_id}/{'/'.join(segments[repo_length:])}")
        return self._repo_info(repo_id, sha, files, _query_flag(query, "blobs"))

    def _refs_locked(self, repo_id: str, query: dict[str, list[str]]) -> _Response:
        payload: dict[str, object] = {
            "branches": [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                for name, sha in sorted(self._branch_heads[repo_id].items())
            ],
            "converts": [],
            "tags": [],
        }
        if _query_flag(query, "include_prs"):
            payload["pullRequests"] = []
        return _json_response(payload)

    @staticmethod
    def _repo_info(repo_id: str, sha: str, files: dict[str, _Blob], with_blobs: bool) -> _Response:
        siblings = []
        for path in sorted(files):
            sibling: dict[str, object] = {"rfilename": path}
            if with_blobs:
                blob = files[path]
                sibling.update(size=len(blob.data), blobId=blob.git_oid)
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": len(blob.data), "pointerSize": blob.pointer_size}
            siblings.append(sibling)
        return _json_response(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0] if "/" in repo_id else None,
                "sha": sha,
                "lastModified": _LAST_MODIFIED,
                "private": False,
                "gated": False,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
            }
        )

    @staticmethod
    def _tree(files: dict[str, _Blob], base: str, recursive: bool) -> _Response:
        directories = _directories_of(files)
        if base and base not in directories:
            return _error_response(404, f"{base} does not exist on this revision", "EntryNotFound")

        prefix = f"{base}/" if base else ""
        entries = []
        for path in sorted(directories | set(files)):
            if not path.startswith(prefix):
                continue
            if not recursive and "/" in path[len(prefix) :]:
                continue
            entries.append(_tree_entry(path, files))
        # NOTE: the Hub paginates trees at 1000 entries with a `Link: rel="next"`
        # header. This fake sends every entry in one page.
        return _json_response(entries)

    @staticmethod
    def _paths_info(files: dict[str, _Blob], body: bytes) -> _Response:
        try:
            paths = json.loads(body)["paths"]
        except (ValueError, KeyError, TypeError):
            paths = parse_qs(body.decode("utf-8", "replace")).get("paths", [])
        directories = _directories_of(files)
        entries = [_tree_entry(path, files) for path in paths if path in files or path in directories]
        return _json_response(entries)


def _query_flag(query: dict[str, list[str]], name: str) -> bool:
    values = query.get(name)
    return bool(values) and values[-1].lower() in _TRUE_QUERY_VALUES


def _tree_entry(path: str, files: dict[str, _Blob]) -> dict[str, object]:
    blob = files.get(path)
    if blob is None:
        listing = "".join(f"{name}\0{files[name].git_oid}\0" for name in sorted(files) if name.startswith(f"{path}/"))
        return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}
    entry: dict[str, object] = {"type": "file", "oid": blob.git_oid, "size": len(blob.data), "path": path}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": blob.pointer_size}
    return entry


def _content_response(blob: _Blob, headers: dict[str, str], range_header: str | None, file_key: FileKey) -> _Response:
    size = len(blob.data)
    headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    try:
        span = parse_range_header(range_header, size)
    except RangeNotSatisfiable:
        headers["Content-Range"] = f"bytes */{size}"
        return _Response(416, headers, file_key=file_key)
    if span is None:
        return _Response(200, headers, memoryview(blob.data), file_key)
    start, stop = span
    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    return _Response(206, headers, memoryview(blob.data)[start:stop], file_key)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub, role: str) -> None:
        self.hub = hub
        self.role = role
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    # `process_request` runs on the serve_forever thread, so once `shutdown()`
    # returns every accepted connection is in `_connections`.
    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:  # type: ignore[no-untyped-def]
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down open sockets so that handler threads blocked on keep-alive reads exit."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            logger.debug("FakeHub %s: connection from %s dropped: %s", self.role, client_address, error)
        else:
            logger.exception("FakeHub %s: unhandled error while serving %s", self.role, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    # Seconds an idle keep-alive connection stays open.
    timeout = 30
    server: _Server

    def do_GET(self) -> None:
        self._handle(send_body=True)

    def do_HEAD(self) -> None:
        self._handle(send_body=False)

    def do_POST(self) -> None:
        self._handle(send_body=True)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("FakeHub %s: %s - %s", self.server.role, self.address_string(), format % args)

    def _handle(self, send_body: bool) -> None:
        hub = self.server.hub
        length = int(self.headers.get("Content-Length") or 0)
        request_body = self.rfile.read(length) if length > 0 else b""
        range_header = self.headers.get("Range")

        response = hub._route(
            self.server.role, self.command, self.path, range_header, request_body, self.headers.get("Authorization")
        )

        body_size = len(response.body) if send_body else 0
        if self.command == "GET" and response.file_key is not None and response.status in (200, 206):
            cut = hub._take_disconnect(response.file_key)
            if cut is not None and cut < body_size:
                body_size = cut
                self.close_connection = True

        # Record before sending, so that a client that has read the response
        # finds it in the log and the counters.
        content_bytes = body_size if self.command == "GET" and response.status in (200, 206) else 0
        record = RequestRecord(
            method=self.command,
            path=self.path,
            range=range_header,
            status=response.status,
            bytes=body_size,
            authorization=self.headers.get("Authorization"),
            headers={name.lower(): value for name, value in self.headers.items()},
            origin=self.server.role,
            file_key=response.file_key,
        )
        hub._record(record, content_bytes)

        bytes_written = self._write(response, body_size)
        if bytes_written < body_size:
            hub._correct_short_write(record, content_bytes, bytes_written)

    def _write(self, response: _Response, body_size: int) -> int:
        """Send the headers and the first ``body_size`` body bytes, and return how many bytes were sent.

        Content-Length is always the full body length, so a ``body_size`` below it
        sends a truncated response.
        """
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()

        written = 0
        body = memoryview(response.body)[:body_size]
        try:
            while written < len(body):
                chunk = body[written : written + _WRITE_CHUNK_SIZE]
                self.wfile.write(chunk)
                written += len(chunk)
        except (BrokenPipeError, ConnectionResetError) as error:
            logger.debug(
                "FakeHub %s: client closed the connection after %d bytes: %s", self.server.role, written, error
            )
            self.close_connection = True
        return written
