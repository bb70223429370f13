"""A tiny GPT-NeoX pair whose trained input embedding differs from its initial one by a known rank.

`build_rank_setup` writes two checkpoints and a corpus:

- `step0/`: a `tiny_gpt_neox` whose output embedding reads only an r-dimensional
  subspace Q of the hidden space: row v of it is `OUTPUT_SCALE * code_v @ Q.T`.
- `final/`: the same weights, except that the input embedding gains the
  rank-r update `CODE_SCALE * codes @ Q.T`. The codes are the 2**r corners of
  {-1, +1}**r, each shared by vocab_size / 2**r tokens, so the final model
  predicts the next token's code from the current token's code.
- `train.txt`, `eval.txt`: sequences sampled from `final`, one a line, as the
  words of `save_tokenizer`'s vocabulary.

Reconstructing `final` from `step0`'s input embedding therefore needs a LoRA
delta of rank r: below r, some directions of the code stay unknown. The
final input embedding is 2**r tight clusters of equal codes, so a k-NN
estimate of its ID measures the spread within a cluster, not r.

Both input embeddings also contain one constant row offset of norm
`OFFSET_NORM`, orthogonal to Q and to the all-ones vector. It dominates the
norm that the final layer norm divides by, so a rank below r cannot make up
for a missing direction by rescaling the others.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.support.checkpoints import save_checkpoint, save_tokenizer, tiny_gpt_neox

VOCAB_SIZE = 128
HIDDEN_SIZE = 32
TRUE_RANK = 4
CODE_SCALE = 1.0
OUTPUT_SCALE = 6.0
OFFSET_NORM = 8.0
SEQUENCE_LENGTH = 32
TRAIN_SEQUENCES = 256
EVAL_SEQUENCES = 64
# Ids 0 and 1 are save_tokenizer's <|endoftext|> and <|padding|>, so sampled text uses only the words.
FIRST_WORD_ID = 2


@dataclass(frozen=True)
class RankSetup:
    """Paths written by `build_rank_setup`."""

    step0: Path
    final: Path
    train: Path
    eval: Path
    true_rank: int


def build_rank_setup(root: Path, seed: int = 0, true_rank: int = TRUE_RANK) -> RankSetup:
    """Write the step0 and final checkpoints with tokenizers, and the sampled corpus, under `root`."""
    root = Path(root)
    generator = torch.Generator().manual_seed(1000 + seed)
    codes = _hypercube_codes(VOCAB_SIZE, true_rank, generator)  # (vocab, r)
    subspace, _ = torch.linalg.qr(torch.randn(HIDDEN_SIZE, true_rank, generator=generator))  # (hidden, r)
    offset = _offset_outside(subspace, generator)  # (hidden,)

    step0 = tiny_gpt_neox(seed, vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE)
    with torch.no_grad():
        step0.get_input_embeddings().weight.add_(offset)
        step0.get_output_embeddings().weight.copy_(OUTPUT_SCALE * codes @ subspace.T)
    final = copy.deepcopy(step0)
    with torch.no_grad():
        final.get_input_embeddings().weight.add_(CODE_SCALE * codes @ subspace.T)

    for name, model in (("step0", step0), ("final", final)):
        save_checkpoint(model, root / name)
        save_tokenizer(root / name, num_tokens=VOCAB_SIZE)

    train = root / "train.txt"
    evaluation = root / "eval.txt"
    _write_words(train, sample_sequences(final, TRAIN_SEQUENCES, SEQUENCE_LENGTH, seed=2 + 10 * seed))
    _write_words(evaluation, sample_sequences(final, EVAL_SEQUENCES, SEQUENCE_LENGTH, seed=3 + 10 * seed))
    return RankSetup(root / "step0", root / "final", train, evaluation, true_rank)


def sample_sequences(model, count: int, length: int, seed: int) -> torch.Tensor:
    """Sample `count` sequences of `length` word ids from a causal LM at temperature 1."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_WORD_ID, VOCAB_SIZE, (count, 1), generator=generator)
    with torch.no_grad():
        for _ in range(length - 1):
            logits = model(ids).logits[:, -1].clone()  # (count, vocab)
            logits[:, :FIRST_WORD_ID] = -float("inf")
            following = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            ids = torch.cat([ids, following], dim=1)
    return ids


def _hypercube_codes(vocab_size: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    corners = torch.tensor([[1.0 if (index >> bit) & 1 else -1.0 for bit in range(rank)]
                            for index in range(vocab_size)])
    return corners[torch.randperm(vocab_size, generator=generator)]


def _offset_outside(subspace: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Return a vector of norm OFFSET_NORM orthogonal to `subspace` and to the all-ones vector."""
    hidden = subspace.shape[0]
    basis, _ = torch.linalg.qr(torch.cat([subspace, torch.ones(hidden, 1)], dim=1))
    vector = torch.randn(hidden, generator=generator)
    vector -= basis @ (basis.T @ vector)
    return OFFSET_NORM * vector / vector.norm()


def _write_words(path: Path, ids: torch.Tensor) -> None:
    lines = [" ".join(f"w{token - FIRST_WORD_ID}" for token in row.tolist()) for row in ids]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
