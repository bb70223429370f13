"""Find the token-embedding tensor among the keys of a checkpoint."""

from __future__ import annotations

import re
from collections.abc import Iterable

MATRICES = ("input", "output")

# Input (token) embeddings by architecture. Each pattern matches a whole key.
INPUT_PATTERNS = (
    r"gpt_neox\.embed_in\.weight",  # GPT-NeoX, Pythia
    r"(model\.)?embed_tokens\.weight",  # Llama, Mistral, Qwen, OLMo, Gemma
    r"model\.decoder\.embed_tokens\.weight",  # OPT
    r"(transformer\.)?wte\.weight",  # GPT-2, GPT-J
    r"(transformer\.)?word_embeddings\.weight",  # BLOOM
    r"([a-z_]+\.)?embeddings\.word_embeddings\.weight",  # BERT, RoBERTa, with or without prefix
)

# Output (unembedding) matrices. Absent from the file when tied to the input.
OUTPUT_PATTERNS = (
    r"embed_out\.weight",  # GPT-NeoX, Pythia (untied)
    r"lm_head\.weight",  # Llama-style, GPT-2, OPT when stored
)


class EmbeddingKeyError(KeyError):
    """The checkpoint has no embedding key for the requested matrix, or several."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def find_embedding_key(keys: Iterable[str], matrix: str = "input") -> str:
    """Return the key of the input or output embedding among a checkpoint's keys.

    Raises:
        ValueError: for a matrix other than "input" or "output".
        EmbeddingKeyError: when no key or more than one key matches; the
            message lists the candidate keys found.

    Example:
        >>> find_embedding_key(["gpt_neox.embed_in.weight", "embed_out.weight"], "output")
        'embed_out.weight'
    """
    if matrix not in MATRICES:
        raise ValueError(f"matrix {matrix!r} is unknown; use 'input' or 'output'")
    keys = sorted(set(keys))
    patterns = INPUT_PATTERNS if matrix == "input" else OUTPUT_PATTERNS
    matches = [key for key in keys if any(re.fullmatch(p, key) for p in patterns)]

    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise EmbeddingKeyError(
            f"several {matrix} embedding keys match: {matches}; the checkpoint is ambiguous, "
            "so pass the tensor name explicitly (key = \"...\" in the job, --key on the CLI)"
        )
    hint = _keys_hint(keys)
    if matrix == "output":
        raise EmbeddingKeyError(
            f"no output embedding key found ({hint}); models with tied embeddings store only "
            "the input matrix, so use --matrix input, or --key to name the tensor"
        )
    raise EmbeddingKeyError(
        f"no input embedding key of a known architecture found ({hint}); "
        "use --key to name the tensor"
    )


def _keys_hint(keys: list[str]) -> str:
    embeddingish = [key for key in keys if "emb" in key or "wte" in key or "lm_head" in key]
    shown = embeddingish or keys[:20]
    more = "" if embeddingish or len(keys) <= 20 else f", and {len(keys) - 20} more"
    return f"{len(keys)} keys, including {shown}{more}"
