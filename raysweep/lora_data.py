"""Text for LoRA rank sweeps: read files, tokenize, cut into blocks, split off evaluation.

A job's `[data]` table names the text:

    [data]
    train = ["corpus/train.txt"]          # local files, or files of a Hub dataset repo
    eval = ["corpus/valid.txt"]           # optional; else eval_fraction applies
    eval_fraction = 0.1                   # the last 10% of the training blocks
    dataset = "Salesforce/wikitext"       # optional: read the files from this Hub dataset
    dataset_revision = "main"             # optional
    text_column = "text"                  # the column of .parquet and .jsonl files

File formats, by suffix: `.txt` (the whole file is one text), `.jsonl` (one
JSON object a line) and `.parquet`. The rows of one `.jsonl` or `.parquet`
file are joined with a blank line into one text. Each file is tokenized
without special tokens, and the files are joined with the tokenizer's EOS
token where it has one. The token stream is cut into non-overlapping blocks
of the sequence length, and the tail shorter than a block is dropped.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DATA_KEYS = {"train", "eval", "eval_fraction", "dataset", "dataset_revision", "text_column"}
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
DEFAULT_EVAL_FRACTION = 0.1


class DataMissing(FileNotFoundError):
    """A text file, or the Hub dataset or revision that should contain it, does not exist."""


@dataclass(frozen=True)
class TextData:
    """Sources of the training and evaluation text of a LoRA sweep.

    Attributes:
        train: local paths (absolute once parsed from a job), or file names
            inside the Hub dataset repository `dataset`.
        eval: files of the evaluation split; when empty, the last
            `eval_fraction` of the training blocks is held out instead.
        eval_fraction: share of the training blocks held out for evaluation
            when `eval` is empty; None when `eval` is given.
        dataset: Hub dataset repository ("ORG/NAME") that contains the files, or
            None for local files.
        dataset_revision: branch, tag or commit of `dataset`; None means "main".
        text_column: column that contains the text in `.parquet` and `.jsonl` files.
    """

    train: tuple[str, ...]
    eval: tuple[str, ...] = ()
    eval_fraction: float | None = DEFAULT_EVAL_FRACTION
    dataset: str | None = None
    dataset_revision: str | None = None
    text_column: str = "text"

    def describe(self) -> str:
        """Return a one-line summary for logs and tables."""
        where = f"hub dataset {self.dataset}@{self.dataset_revision or 'main'}" if self.dataset else "local files"
        split = f"eval {list(self.eval)}" if self.eval else f"eval = last {self.eval_fraction:g} of train"
        return f"{where}: train {list(self.train)}, {split}"


@dataclass(frozen=True)
class Blocks:
    """Token blocks of the training and evaluation splits.

    Attributes:
        train: int64 array (train blocks, sequence length).
        eval: int64 array (eval blocks, sequence length).
        sha256: hash of both splits' token ids, so two rows that trained and
            evaluated on the same tokens can be recognised.
    """

    train: np.ndarray
    eval: np.ndarray
    sha256: str

    @property
    def train_tokens(self) -> int:
        return int(self.train.size)

    @property
    def eval_tokens(self) -> int:
        return int(self.eval.size)


def parse_text_data(table: dict, where: str, base: Path | None = None) -> TextData:
    """Validate a job's `[data]` table.

    Local paths are made absolute: relative ones are resolved from `base`
    (default: the current directory), because Ray workers may run elsewhere.

    Raises:
        ValueError: unknown keys, no training files, an unsupported suffix, or
            an eval_fraction outside (0, 1) or given together with eval files.
    """
    if not isinstance(table, dict):
        raise ValueError(f"{where}: [data] must be a table with at least `train = [FILES]`")
    unknown = set(table) - DATA_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} in [data]; allowed: {sorted(DATA_KEYS)}")

    dataset = table.get("dataset")
    if dataset is not None and (not isinstance(dataset, str) or dataset.count("/") > 1 or not dataset):
        raise ValueError(f"{where}: dataset = {dataset!r} must be a Hub dataset id such as 'Salesforce/wikitext'")
    train = _file_list(table.get("train"), "train", where, required=True)
    evaluation = _file_list(table.get("eval"), "eval", where, required=False)
    if dataset is None:
        root = Path.cwd() if base is None else base
        train = tuple(str((root / Path(name).expanduser()).resolve()) for name in train)
        evaluation = tuple(str((root / Path(name).expanduser()).resolve()) for name in evaluation)

    fraction = table.get("eval_fraction")
    if evaluation and fraction is not None:
        raise ValueError(f"{where}: give either eval files or eval_fraction in [data], not both")
    if not evaluation:
        fraction = DEFAULT_EVAL_FRACTION if fraction is None else fraction
        if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ValueError(f"{where}: eval_fraction = {fraction!r} must be a number between 0 and 1")
        fraction = float(fraction)

    text_column = table.get("text_column", "text")
    if not isinstance(text_column, str) or not text_column:
        raise ValueError(f"{where}: text_column = {text_column!r} must be a column name")
    revision = table.get("dataset_revision")
    if revision is not None and dataset is None:
        raise ValueError(f"{where}: dataset_revision applies only together with dataset")
    return TextData(train, evaluation, fraction, dataset, None if revision is None else str(revision), text_column)


def load_blocks(data: TextData, tokenizer, sequence_length: int, eval_tokens: int | None = None) -> Blocks:
    """Read, tokenize and cut the training and evaluation text into blocks.

    Args:
        tokenizer: a transformers tokenizer; only `__call__` and `eos_token_id` are used.
        sequence_length: tokens per block.
        eval_tokens: keep only the first blocks of the evaluation split that
            together hold at least this many tokens; None keeps all.

    Raises:
        DataMissing: a file, dataset or revision does not exist.
        ValueError: a split yields no complete block, or a file cannot be parsed.
    """
    train_ids = tokenize(tokenizer, read_texts(data, data.train))
    train = cut_blocks(train_ids, sequence_length)
    if data.eval:
        evaluation = cut_blocks(tokenize(tokenizer, read_texts(data, data.eval)), sequence_length)
    else:
        held_out = max(1, round(len(train) * data.eval_fraction))
        if held_out >= len(train):
            raise ValueError(
                f"the training text gives {len(train)} blocks of {sequence_length} tokens, too few to hold out "
                f"{data.eval_fraction:g} for evaluation; add text or name eval files"
            )
        train, evaluation = train[:-held_out], train[-held_out:]

    if len(train) == 0:
        raise ValueError(f"the training text has {len(train_ids)} tokens, less than one block of {sequence_length}")
    if len(evaluation) == 0:
        raise ValueError(f"the evaluation text has less than one block of {sequence_length} tokens")
    if eval_tokens is not None:
        evaluation = evaluation[: max(1, -(-eval_tokens // sequence_length))]

    digest = hashlib.sha256()
    for split in (train, evaluation):
        digest.update(np.ascontiguousarray(split, dtype=np.int64).tobytes())
    logger.info("text: %d training and %d evaluation blocks of %d tokens", len(train), len(evaluation),
                sequence_length)
    return Blocks(train, evaluation, digest.hexdigest())


def read_texts(data: TextData, files: tuple[str, ...]) -> list[str]:
    """Return one text per file, downloaded from the Hub dataset first when `data.dataset` is set.

    Raises:
        DataMissing: a file, dataset or revision does not exist.
        ValueError: a suffix is not supported, or a file lacks the text column.
    """
    return [_read_text(_local_file(data, name), data.text_column) for name in files]


def tokenize(tokenizer, texts: list[str]) -> np.ndarray:
    """Tokenize texts without special tokens and join them with the EOS token where the tokenizer has one."""
    separator = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    ids: list[int] = []
    for index, text in enumerate(texts):
        if index and separator:
            ids.extend(separator)
        # verbose=False: a whole file is longer than model_max_length on purpose.
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return np.asarray(ids, dtype=np.int64)


def cut_blocks(ids: np.ndarray, sequence_length: int) -> np.ndarray:
    """Cut a token stream into non-overlapping blocks (n, sequence_length), dropping the short tail."""
    if sequence_length < 2:
        raise ValueError(f"sequence length {sequence_length} must be at least 2 (one token predicts the next)")
    count = len(ids) // sequence_length
    return np.asarray(ids[: count * sequence_length], dtype=np.int64).reshape(count, sequence_length)


def _file_list(value, key: str, where: str, required: bool) -> tuple[str, ...]:
    if value is None:
        if required:
            raise ValueError(f"{where}: [data] needs `{key} = [FILES]` with at least one file")
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"{where}: {key} in [data] must be a file name or a list of file names")
    if required and not value:
        raise ValueError(f"{where}: [data] needs `{key} = [FILES]` with at least one file")
    for name in value:
        if not name.lower().endswith(TEXT_SUFFIXES):
            raise ValueError(f"{where}: {key} file {name!r} has an unsupported suffix; use one of {TEXT_SUFFIXES}")
    return tuple(value)


def _local_file(data: TextData, name: str) -> Path:
    if data.dataset is None:
        path = Path(name)
        if not path.is_file():
            raise DataMissing(f"text file {path} does not exist")
        return path
    return _download(data.dataset, name, data.dataset_revision)


def _download(dataset: str, name: str, revision: str | None) -> Path:
    """Download one file of a Hub dataset into the Hub cache (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE apply)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(hf_hub_download(dataset, name, repo_type="dataset", revision=revision))
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as error:
        raise DataMissing(f"{name} of Hub dataset {dataset} at {revision or 'main'} was not found: {error}") from error


def _read_text(path: Path, column: str) -> str:
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    suffix = suffix.lower()
    if suffix == ".parquet":
        return _join_rows(_parquet_column(path, column), path)
    opener = gzip.open if suffix.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as stream:
        if suffix.startswith(".jsonl"):
            return _join_rows(_jsonl_column(stream, column, path), path)
        if suffix.startswith(".txt"):
            return stream.read()
    raise ValueError(f"text file {path} has an unsupported suffix; use one of {TEXT_SUFFIXES}")


def _parquet_column(path: Path, column: str) -> list:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"{path} is not a readable Parquet file: {error}") from error
    if column not in schema.names:
        raise ValueError(f"{path} has no column {column!r}; its columns: {schema.names}; set text_column in [data]")
    return pq.read_table(path, columns=[column]).column(column).to_pylist()


def _jsonl_column(stream, column: str, path: Path) -> list:
    values = []
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: invalid JSON ({error})") from error
        if not isinstance(record, dict) or column not in record:
            raise ValueError(f"{path}, line {number}: no field {column!r}; set text_column in [data]")
        values.append(record[column])
    return values


def _join_rows(values: list, path: Path) -> str:
    texts = [value for value in values if value is not None]
    if not all(isinstance(value, str) for value in texts):
        raise ValueError(f"{path}: the text column contains values that are not strings")
    return "\n\n".join(texts)
