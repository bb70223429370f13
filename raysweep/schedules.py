"""Model families and checkpoint schedules, kept as data.

Pythia (Biderman et al., 2023, "Pythia: A Suite for Analyzing Large Language
Models Across Training and Scaling") publishes 154 checkpoints per model as
Hub branches: step0, ten log-spaced steps 1, 2, 4, ..., 512, and every 1000
steps from 1000 to 143000. The `main` branch contains the same weights as
step143000.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """One model of a family: Hub id, parameter count, embedding shape."""

    repo_id: str
    parameters: int
    hidden_size: int
    embedding_rows: int


# Total parameter counts as the Pythia model cards' naming table lists them;
# hidden sizes from the same cards. Embedding rows are padded beyond the 50277 tokenizer entries to a multiple
# that suits tensor parallelism: 50304 for most sizes, 50432 for 6.9b and
# 50688 for 12b.
PYTHIA_MODELS = (
    ModelInfo("EleutherAI/pythia-14m", 14_067_712, 128, 50304),
    ModelInfo("EleutherAI/pythia-31m", 30_494_720, 256, 50304),
    ModelInfo("EleutherAI/pythia-70m", 70_426_624, 512, 50304),
    ModelInfo("EleutherAI/pythia-160m", 162_322_944, 768, 50304),
    ModelInfo("EleutherAI/pythia-410m", 405_334_016, 1024, 50304),
    ModelInfo("EleutherAI/pythia-1b", 1_011_781_632, 2048, 50304),
    ModelInfo("EleutherAI/pythia-1.4b", 1_414_647_808, 2048, 50304),
    ModelInfo("EleutherAI/pythia-2.8b", 2_775_208_960, 2560, 50304),
    ModelInfo("EleutherAI/pythia-6.9b", 6_857_302_016, 4096, 50432),
    ModelInfo("EleutherAI/pythia-12b", 11_846_072_320, 5120, 50688),
)

PYTHIA_TOKENIZER_ENTRIES = 50277

PYTHIA_STEPS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512) + tuple(range(1000, 143_001, 1000))

SCHEDULES = {
    "pythia": tuple(f"step{step}" for step in PYTHIA_STEPS),
}

FAMILIES = {
    "pythia": PYTHIA_MODELS,
}


def step_of(revision: str | None) -> int | None:
    """Return the training step a revision name like "step1000" stands for."""
    if revision and revision.startswith("step") and revision[4:].isdigit():
        return int(revision[4:])
    return None
