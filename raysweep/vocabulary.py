"""Token strings and tokenizer sizes from a checkpoint's tokenizer files.

The tokenizer's size decides the rows of the "tokenizer" row policy: models
pad their embedding matrix beyond the tokenizer (Pythia has 50277 tokenizer
entries and 50304, 50432 or 50688 rows), and the padding rows belong to no
token. The size is read from `tokenizer.json` or `vocab.txt` alone, so no
weights are needed for it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Tokenizer files in the order they are looked for.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer's entries by id.

    Attributes:
        size: the largest token id plus one, the rows the tokenizer can address.
        ids: token string by id.
    """

    size: int
    ids: dict[int, str]

    def tokens_for(self, rows: int) -> list[str]:
        """Return the token string of each row id; rows that no token uses get ""."""
        tokens = [""] * rows
        for index, token in self.ids.items():
            if 0 <= index < rows:
                tokens[index] = token
        return tokens


def read_vocabulary(path: Path) -> Vocabulary:
    """Read `tokenizer.json` (Hugging Face tokenizers) or `vocab.txt` (one token per line).

    For tokenizer.json the entries are the model's vocabulary and the added
    tokens, whose ids continue it (Pythia: 50254 + 23 = 50277).

    Raises:
        ValueError: the file is not valid JSON or UTF-8.
    """
    if path.name == "vocab.txt":
        entries = path.read_text(encoding="utf-8").splitlines()
        ids = dict(enumerate(entries))
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        stored = (data.get("model") or {}).get("vocab") or {}
        if isinstance(stored, list):  # unigram models store [token, score] pairs
            ids = {index: entry[0] for index, entry in enumerate(stored)}
        else:
            ids = {int(index): token for token, index in stored.items()}
        for added in data.get("added_tokens", []):
            ids[int(added["id"])] = added["content"]
    size = max(ids, default=-1) + 1
    if len(ids) != size:
        logger.warning("%s: %d token ids in 0..%d, so %d ids below the largest are unused",
                       path, len(ids), size - 1, size - len(ids))
    return Vocabulary(size, ids)


def directory_vocabulary(directory: Path) -> Vocabulary | None:
    """Return the vocabulary of the first tokenizer file in a checkpoint directory, or None."""
    for name in TOKENIZER_FILES:
        path = directory / name
        if path.is_file():
            return read_vocabulary(path)
    return None
