"""Read word-vector files: GloVe and fastText text, word2vec binary.

Formats, each optionally gzip-compressed (`.gz`):

- GloVe text (`.txt`): one row per line, `TOKEN v1 v2 ... vD`, no header.
  The dimension D is the most common count of trailing numeric fields in the
  first `DIM_SAMPLE_LINES` lines.
- fastText text (`.vec`, or any text file whose first line is `COUNT DIM`):
  the same rows after a header. The header's DIM is used; its COUNT may
  disagree with the rows that follow, which is logged as a warning.
- word2vec binary (`.bin` whose first line is `COUNT DIM`): per row, the
  token's bytes up to a space, then DIM little-endian float32 values,
  optionally followed by a newline.

Rules for text rows (fields are separated by ASCII spaces only):

- The last DIM fields are the vector and everything before them is the
  token, so tokens may contain spaces, tabs or NBSP.
- A row with fewer than DIM + 1 fields, an empty token, or a vector field
  that is not a number is malformed: it is skipped and counted, never
  shifted into another row's columns. Blank lines are ignored.

Tokens are decoded as UTF-8. A token that is not valid UTF-8 (word2vec's
Google News vectors contain tokens cut inside a multi-byte sequence) is kept
with its undecodable bytes written as backslash escapes (`\\xc3`), and the
rows with such tokens are counted.
"""

from __future__ import annotations

import gzip
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".vec")
BINARY_SUFFIXES = (".bin",)
# Lines sampled to infer the dimension of a GloVe file without a header.
DIM_SAMPLE_LINES = 1000
# A word2vec binary token longer than this is taken as a sign of a corrupt file.
MAX_BINARY_TOKEN_BYTES = 10_000
_HEADER_PATTERN = re.compile(rb"^\s*(\d+)\s+(\d+)\s*$")


class WordVectorError(ValueError):
    """A word-vector file that cannot be read."""


@dataclass(frozen=True)
class WordVectors:
    """The rows of a word-vector file and what was skipped.

    Attributes:
        matrix: (rows, dim) float32.
        tokens: token string of each row.
        format: "glove-text", "fasttext-text" or "word2vec-binary".
        malformed_rows: rows skipped by the rules in the module documentation.
        header_rows: the row count the header states, None without a header.
        undecodable_tokens: rows kept whose token is not valid UTF-8.
    """

    matrix: np.ndarray
    tokens: list[str]
    format: str
    malformed_rows: int
    header_rows: int | None
    undecodable_tokens: int


def is_word_vector_file(path: Path) -> bool:
    """Return True for a text word-vector file, or a `.bin` that starts with a word2vec header.

    A `.bin` that is a torch checkpoint starts with a zip or pickle signature
    instead, so the first line distinguishes the two kinds of `.bin`.
    """
    suffix = _inner_suffix(path)
    if suffix in TEXT_SUFFIXES:
        return True
    if suffix in BINARY_SUFFIXES:
        with _open(path) as stream:
            return _HEADER_PATTERN.match(stream.readline(256)) is not None
    return False


def read_word_vectors(path: Path) -> WordVectors:
    """Read a GloVe, fastText or word2vec binary file; see the module documentation.

    Raises:
        WordVectorError: no valid row, or the dimension cannot be determined.
    """
    with _open(path) as stream:
        first = stream.readline()
        header = _HEADER_PATTERN.match(first)
        if _inner_suffix(path) in BINARY_SUFFIXES:
            if header is None:
                raise WordVectorError(f"{path} does not start with a word2vec header line 'COUNT DIM'")
            vectors = _read_binary(stream, int(header[1]), int(header[2]), path)
        elif header is not None:
            vectors = _read_text(_lines(stream), int(header[2]), int(header[1]), "fasttext-text", path)
        else:
            sample = [first] + [stream.readline() for _ in range(DIM_SAMPLE_LINES - 1)]
            dim = _infer_dimension(sample, path)
            vectors = _read_text(_chain(sample, _lines(stream)), dim, None, "glove-text", path)

    _log_counts(vectors, path)
    if not vectors.tokens:
        raise WordVectorError(
            f"{path} has no valid {vectors.format} rows ({vectors.malformed_rows} malformed); "
            "check that the file is a word-vector file of the expected format"
        )
    return vectors


def _read_text(lines: Iterator[bytes], dim: int, header_rows: int | None, format: str, path: Path) -> WordVectors:
    if dim < 1:
        raise WordVectorError(f"{path}: dimension {dim} is invalid")
    values = bytearray()
    tokens: list[str] = []
    malformed = 0
    undecodable = 0
    for line in lines:
        line = line.rstrip(b"\r\n").rstrip(b" ")
        if not line.strip():
            continue
        parts = line.rsplit(b" ", dim)
        if len(parts) != dim + 1 or not parts[0]:
            malformed += 1
            continue
        try:
            vector = np.array(parts[1:], dtype=np.float32)
        except ValueError:
            malformed += 1
            continue
        token, valid = _decode(parts[0])
        undecodable += not valid
        tokens.append(token)
        values += vector.tobytes()
    matrix = np.frombuffer(values, dtype=np.float32).reshape(-1, dim)
    return WordVectors(matrix, tokens, format, malformed, header_rows, undecodable)


def _read_binary(stream: BinaryIO, count: int, dim: int, path: Path) -> WordVectors:
    if dim < 1:
        raise WordVectorError(f"{path}: dimension {dim} in the header is invalid")
    row_bytes = 4 * dim
    values = bytearray()
    tokens: list[str] = []
    malformed = 0
    undecodable = 0
    buffer = _StreamBuffer(stream)
    while True:
        buffer.skip(b"\n")
        if buffer.at_end():
            break
        token_bytes = buffer.read_until(b" ", MAX_BINARY_TOKEN_BYTES)
        if token_bytes is None:
            # No space within the limit, or the file ends inside a token: no
            # row boundary can be trusted after this point.
            malformed += 1
            logger.warning("%s: stopped at byte %d, where no token ends within %d bytes",
                           path, buffer.position, MAX_BINARY_TOKEN_BYTES)
            break
        vector = buffer.read(row_bytes)
        if len(vector) < row_bytes:
            malformed += 1  # the file ends inside this row's vector
            break
        token, valid = _decode(token_bytes)
        undecodable += not valid
        tokens.append(token)
        values += vector
    matrix = np.frombuffer(values, dtype="<f4").astype(np.float32, copy=False).reshape(-1, dim)
    return WordVectors(matrix, tokens, "word2vec-binary", malformed, count, undecodable)


class _StreamBuffer:
    """Forward-only reader over a binary stream with token scanning."""

    CHUNK = 1 << 20

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._data = b""
        self._offset = 0
        self.position = 0

    def _fill(self, needed: int) -> bool:
        """Make `needed` bytes available from the current offset; return False at end of file."""
        while len(self._data) - self._offset < needed:
            chunk = self._stream.read(max(self.CHUNK, needed))
            if not chunk:
                return False
            self._data = self._data[self._offset:] + chunk
            self._offset = 0
        return True

    def at_end(self) -> bool:
        return not self._fill(1)

    def skip(self, byte: bytes) -> None:
        while self._fill(1) and self._data[self._offset: self._offset + 1] == byte:
            self._offset += 1
            self.position += 1

    def read(self, size: int) -> bytes:
        self._fill(size)
        data = self._data[self._offset: self._offset + size]
        self._offset += len(data)
        self.position += len(data)
        return data

    def read_until(self, separator: bytes, limit: int) -> bytes | None:
        """Return the bytes before `separator` and consume both, or None when not found within `limit`."""
        searched = 0
        while True:
            end = self._data.find(separator, self._offset + searched)
            if end >= 0 and end - self._offset <= limit:
                token = self._data[self._offset: end]
                self.position += end + 1 - self._offset
                self._offset = end + 1
                return token
            available = len(self._data) - self._offset
            if available > limit or not self._fill(available + 1):
                return None
            searched = available


def _infer_dimension(sample: list[bytes], path: Path) -> int:
    """Return the most common count of trailing numeric fields among sampled lines."""
    counts = Counter()
    for line in sample:
        fields = line.rstrip(b"\r\n").rstrip(b" ").split(b" ")
        if len(fields) < 2:
            continue
        numeric = 0
        for field in reversed(fields[1:]):
            try:
                float(field)
            except ValueError:
                break
            numeric += 1
        counts[numeric] += 1
    counts.pop(0, None)
    if not counts:
        raise WordVectorError(
            f"{path} has no header and no line of the form 'TOKEN v1 ... vD' in its first "
            f"{len(sample)} lines, so it is not a GloVe text file"
        )
    dim, _ = counts.most_common(1)[0]
    return dim


def _log_counts(vectors: WordVectors, path: Path) -> None:
    rows = len(vectors.tokens)
    if vectors.header_rows is not None and vectors.header_rows != rows + vectors.malformed_rows:
        logger.warning("%s: the header states %d rows, but the file has %d valid and %d malformed rows",
                       path, vectors.header_rows, rows, vectors.malformed_rows)
    if vectors.malformed_rows:
        logger.warning("%s: skipped %d malformed rows (fewer than %d fields, an empty token or a non-numeric "
                       "value)", path, vectors.malformed_rows, vectors.matrix.shape[1] + 1)
    if vectors.undecodable_tokens:
        logger.info("%s: %d tokens are not valid UTF-8 and are kept with backslash escapes",
                    path, vectors.undecodable_tokens)


def _decode(token: bytes) -> tuple[str, bool]:
    try:
        return token.decode("utf-8"), True
    except UnicodeDecodeError:
        return token.decode("utf-8", errors="backslashreplace"), False


def _lines(stream: BinaryIO) -> Iterator[bytes]:
    yield from stream


def _chain(first: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from first
    yield from rest


def _open(path: Path) -> BinaryIO:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rb")
    return path.open("rb")


def _inner_suffix(path: Path) -> str:
    """Return the suffix that names the format, looking through a `.gz` suffix."""
    if path.suffix.lower() == ".gz":
        return Path(path.stem).suffix.lower()
    return path.suffix.lower()
