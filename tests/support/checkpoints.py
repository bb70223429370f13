"""Tiny real GPT-NeoX checkpoints in the file layouts of GPT-NeoX repos on the Hub.

The weights come from `transformers.GPTNeoXForCausalLM` and the files from
transformers' own `save_pretrained` (checked against transformers 5.25). That
version writes only safetensors. The ``.bin`` formats therefore re-save the
tensors that `save_pretrained` wrote, in the ``pytorch_model*.bin`` layout of
older checkpoints: a `torch.save` zip of the state dict per file and, when
sharded, an index with ``metadata.total_size`` and ``weight_map``.
huggingface_hub's `split_torch_state_dict_into_shards` plans the shards.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.utils import logging as transformers_logging

if TYPE_CHECKING:
    from tests.support.fakehub import FakeHub

CHECKPOINT_FORMATS = ("safetensors", "bin", "sharded-bin", "sharded-safetensors")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Name of the input embedding in GPT-NeoX checkpoints, in memory and on disk.
EMBEDDING_NAME = "gpt_neox.embed_in.weight"
# transformers 5 names the output embedding `lm_head.weight` in memory. Its
# conversion_mapping.py renames it from and to `embed_out.weight`, the name in
# GPT-NeoX checkpoints, when loading and saving.
OUTPUT_EMBEDDING_NAME = "embed_out.weight"

# Shard sizes at or above this keep a whole checkpoint in one file.
_UNSHARDED_MAX_SIZE = "50GB"


def tiny_gpt_neox(
    seed: int = 0,
    *,
    vocab_size: int = 200,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
) -> GPTNeoXForCausalLM:
    """Build a randomly initialized GPT-NeoX causal LM in eval mode.

    The same seed gives the same weights and different seeds give different
    weights. The global torch RNG state is left as it was. Input and output
    embeddings are separate tensors (``tie_word_embeddings=False``).
    """
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
    return model.eval()


def checkpoint_state_dict(model: GPTNeoXForCausalLM, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """Return the tensors that `save_checkpoint` writes, under their on-disk names.

    Keys come in the model's parameter order, so the input embedding is first.
    Names that differ on disk, such as `OUTPUT_EMBEDDING_NAME`, come last.
    """
    model = _with_dtype(model, dtype)
    with tempfile.TemporaryDirectory() as staging:
        _save_pretrained(model, Path(staging), _UNSHARDED_MAX_SIZE)
        return _load_in_model_order(model, Path(staging) / "model.safetensors")


def save_checkpoint(
    model: GPTNeoXForCausalLM,
    directory: str | Path,
    format: str = "safetensors",
    *,
    dtype: str | None = None,
    max_shard_size: int | None = None,
) -> list[str]:
    """Write a checkpoint in one of `CHECKPOINT_FORMATS` and return the file names written, sorted.

    Every format also gets ``config.json`` and ``generation_config.json``.
    Existing files with other names in ``directory`` are left alone.
    ``dtype`` is a key of `DTYPES` and converts a copy of the model, so ``model``
    is never changed. ``max_shard_size`` (bytes) applies to the sharded formats.
    It defaults to a third of the checkpoint, which gives four shards for the
    default `tiny_gpt_neox` in every dtype.
    The input embedding lands in the first shard, which tests/test_fakehub.py
    checks for the default size.

    Raises ValueError for an unknown format or dtype, or when ``max_shard_size``
    leaves a sharded format with a single shard.
    """
    if format not in CHECKPOINT_FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}: expected one of {', '.join(CHECKPOINT_FORMATS)}")
    model = _with_dtype(model, dtype)
    if max_shard_size is None:
        total_size = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
        max_shard_size = total_size // 3 + 1

    # Saving into an empty staging directory first keeps save_pretrained from
    # deleting shard files of an earlier save in `directory`.
    with tempfile.TemporaryDirectory() as staging_name:
        staging = Path(staging_name)
        if format == "sharded-safetensors":
            _save_pretrained(model, staging, max_shard_size)
            if not (staging / "model.safetensors.index.json").exists():
                raise ValueError(
                    f"max_shard_size={max_shard_size} bytes keeps the checkpoint in one shard: pass a smaller size"
                )
        else:
            _save_pretrained(model, staging, _UNSHARDED_MAX_SIZE)

        if format in ("bin", "sharded-bin"):
            safetensors_path = staging / "model.safetensors"
            tensors = _load_in_model_order(model, safetensors_path)
            safetensors_path.unlink()
            if format == "bin":
                torch.save(tensors, staging / "pytorch_model.bin")
            else:
                _save_sharded_bin(tensors, staging, max_shard_size)

        names = sorted(path.name for path in staging.iterdir())
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(staging / name, directory / name)
    return names


def save_tokenizer(directory: str | Path, num_tokens: int = 150) -> None:
    """Write a word-level ``tokenizer.json`` and ``tokenizer_config.json`` with ``num_tokens`` entries.

    The vocabulary is ``<|endoftext|>`` (id 0), ``<|padding|>`` (id 1) and the
    words ``w0``, ``w1``, ... split on whitespace. Keep ``num_tokens`` below the
    model's ``vocab_size`` to get embedding rows that no token uses, as in
    checkpoints with a padded vocabulary.
    `transformers.AutoTokenizer.from_pretrained` loads the result.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    if num_tokens < 3:
        raise ValueError(f"num_tokens must be at least 3 (two special tokens and one word), got {num_tokens}")
    tokens = ["<|endoftext|>", "<|padding|>"] + [f"w{index}" for index in range(num_tokens - 2)]
    vocabulary = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token=tokens[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    # GPTNeoXTokenizer would rebuild a BPE model and ignore this vocabulary, so
    # the config names the generic fast tokenizer class.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[0],
        "eos_token": tokens[0],
        "unk_token": tokens[0],
        "pad_token": tokens[1],
        "model_max_length": 64,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def publish(fake_hub: FakeHub, repo_id: str, revision: str, directory: str | Path) -> str:
    """Add every file under ``directory`` to a branch of the fake hub and return the commit sha."""
    return fake_hub.add_directory(repo_id, revision, directory)


def _with_dtype(model: GPTNeoXForCausalLM, dtype: str | None) -> GPTNeoXForCausalLM:
    if dtype is None:
        return model
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return copy.deepcopy(model).to(DTYPES[dtype])


def _load_in_model_order(model: GPTNeoXForCausalLM, path: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(path)
    model_order = {name: index for index, name in enumerate(model.state_dict())}
    ordered_names = sorted(tensors, key=lambda name: (name not in model_order, model_order.get(name, 0), name))
    return {name: tensors[name] for name in ordered_names}


def _save_pretrained(model: GPTNeoXForCausalLM, directory: Path, max_shard_size: int | str) -> None:
    """Call `save_pretrained` without its "Writing model shards" progress bar."""
    progress_bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    finally:
        if progress_bar_was_enabled:
            transformers_logging.enable_progress_bar()


def _save_sharded_bin(tensors: dict[str, torch.Tensor], directory: Path, max_shard_size: int) -> None:
    """Write ``pytorch_model-0000i-of-0000N.bin`` shards and ``pytorch_model.bin.index.json``."""
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=max_shard_size
    )
    if not split.is_sharded:
        raise ValueError(
            f"max_shard_size={max_shard_size} bytes keeps the checkpoint in one shard: pass a smaller size"
        )
    for filename, names in split.filename_to_tensors.items():
        torch.save({name: tensors[name] for name in names}, directory / filename)
    index = {"metadata": {"total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
