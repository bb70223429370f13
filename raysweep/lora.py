"""LoRA rank sweeps on the input embedding: job files and the cells they expand into.

A `lora-rank` job trains a LoRA delta on the input embedding of one causal
language model, at each of several ranks, and records the perplexity after
training next to the unmodified model's. Everything but the LoRA delta stays
frozen. Two modes:

- `adapt`: the delta is trained on top of the checkpoint as it is.
- `reconstruct`: the input embedding is first replaced by its initial weights
  (the `step0` revision on the Hub, or `initial_model` for a local model), and
  only the delta is trained. The perplexity then shows how many embedding
  dimensions the trained model needs: the rank at which it returns to the
  trained model's perplexity.

    kind = "lora-rank"
    name = "lora-pythia-160m"
    model = "EleutherAI/pythia-160m"     # Hub id or local checkpoint folder
    revision = "step143000"              # Hub revision of `model`
    modes = ["reconstruct", "adapt"]     # default: both
    ranks = [1, 2, 4, 8]                 # default: 1, 2, 4, ..., 256
    initial_revision = "step0"           # reconstruct: revision with the initial embedding
    # initial_model = "path/to/step0"    # reconstruct: checkpoint with the initial embedding
    steps = 1000
    learning_rate = 2e-4
    batch_size = 8
    sequence_length = 512
    seed = 0

    [data]                               # see raysweep.lora_data
    train = ["corpus/train.txt"]

Each (mode, rank) pair is a cell and runs as one Ray task. A cell's key is a
hash of everything that changes its numbers, so a finished rank is skipped
when the job runs again.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from raysweep.lora_data import TextData, parse_text_data

KIND = "lora-rank"
MODES = ("adapt", "reconstruct")
DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_INITIAL_REVISION = "step0"

# Version of the training and evaluation procedure. It is part of every cell
# key, so a change that alters the numbers must bump it.
LORA_VERSION = "1"

JOB_KEYS = {
    "kind", "name", "description", "model", "revision", "modes", "ranks", "initial_model",
    "initial_revision", "target_module", "steps", "learning_rate", "warmup_steps", "batch_size",
    "eval_batch_size", "sequence_length", "seed", "lora_alpha", "rslora", "eval_tokens", "data", "label",
}


class LoraJobError(ValueError):
    """A lora-rank job file that is missing, unreadable or invalid."""


@dataclass(frozen=True)
class TrainingSettings:
    """Training and evaluation settings of each rank.

    Attributes:
        steps: optimizer steps; each step reads `batch_size` random training blocks.
        learning_rate: peak AdamW learning rate (no weight decay). It rises
            linearly over `warmup_steps`, then follows a cosine to 0.
        batch_size: blocks per training step.
        eval_batch_size: blocks per evaluation forward pass; None uses `batch_size`.
        sequence_length: tokens per block.
        seed: seeds the LoRA initialisation and the order of training blocks.
        lora_alpha: LoRA alpha; None makes it equal to the rank.
        rslora: scale the delta by alpha / sqrt(rank) instead of alpha / rank.
        eval_tokens: evaluate on the first blocks that hold this many tokens;
            None evaluates the whole split.
    """

    steps: int = 1000
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    batch_size: int = 8
    eval_batch_size: int | None = None
    sequence_length: int = 512
    seed: int = 0
    lora_alpha: float | None = None
    rslora: bool = False
    eval_tokens: int | None = None

    def alpha_for(self, rank: int) -> float:
        return float(rank) if self.lora_alpha is None else float(self.lora_alpha)


@dataclass(frozen=True)
class LoraCell:
    """One rank of one mode: a LoRA delta of that rank trained and evaluated once.

    Attributes:
        model: Hub id ("ORG/NAME", optionally "hub:ORG/NAME") or an absolute
            path to a checkpoint folder that transformers can load.
        revision: Hub revision of `model`; None for a local folder or "main".
        initial_model, initial_revision: where `reconstruct` reads the initial
            input embedding; None in `adapt` mode.
        target_module: name of the embedding module that gets the LoRA delta;
            None finds it through `get_input_embeddings()`.
    """

    job: str
    label: str
    model: str
    revision: str | None
    mode: str
    rank: int
    initial_model: str | None
    initial_revision: str | None
    target_module: str | None
    data: TextData
    training: TrainingSettings

    @property
    def cell_key(self) -> str:
        """Stable id of the inputs that change the numbers; the job name and label are left out."""
        identity = {
            "model": self.model,
            "revision": self.revision,
            "mode": self.mode,
            "rank": self.rank,
            "initial_model": self.initial_model,
            "initial_revision": self.initial_revision,
            "target_module": self.target_module,
            "data": asdict(self.data),
            "training": asdict(self.training),
            "lora_version": LORA_VERSION,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return "lora-" + digest[:24]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoraCell:
        text = data["data"]
        text_data = TextData(**{**text, "train": tuple(text["train"]), "eval": tuple(text["eval"])})
        return cls(**{**data, "data": text_data, "training": TrainingSettings(**data["training"])})


@dataclass(frozen=True)
class LoraJob:
    """A parsed lora-rank job file and its cells, ordered by mode, then rank."""

    name: str
    description: str
    path: Path
    cells: tuple[LoraCell, ...]


def load_lora_job(name_or_path: str) -> LoraJob:
    """Parse a lora-rank job file (bundled name or path) and expand it into cells.

    Raises:
        LoraJobError: the file is missing, not valid TOML, not of kind
            "lora-rank", or has unknown or invalid keys; the message names the key.
    """
    from raysweep.jobs import JobError, resolve_job

    try:
        path = resolve_job(name_or_path)
    except JobError as error:
        raise LoraJobError(str(error)) from error
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise LoraJobError(f"{path} is not valid TOML: {error}") from error
    try:
        return parse_lora_job(data, path)
    except ValueError as error:
        raise LoraJobError(str(error)) from error


def parse_lora_job(data: dict, path: Path) -> LoraJob:
    """Validate the keys of a lora-rank job and expand it into cells.

    Relative local paths (model, initial_model, data files) are resolved from
    the current directory and stored as absolute paths.

    Raises:
        ValueError: for any invalid key or value, naming it.
    """
    where = str(path)
    if data.get("kind") != KIND:
        raise ValueError(f"{where}: kind = {data.get('kind')!r}; a LoRA rank sweep needs kind = {KIND!r}")
    unknown = set(data) - JOB_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(JOB_KEYS)}")

    name = _string(data, "name", where, default=path.stem)
    model = _model_reference(_string(data, "model", where), where, "model")
    revision = _optional_string(data, "revision", where)
    if revision is not None and is_local_model(model):
        raise ValueError(f"{where}: revision = {revision!r} applies only to a Hub model, not to the folder {model}")
    modes = _modes(data.get("modes", list(MODES)), where)
    ranks = _ranks(data.get("ranks", list(DEFAULT_RANKS)), where)
    training = _training(data, where)
    text = parse_text_data(data.get("data"), where)
    initial_model, initial_revision = _initial_weights(data, model, where) if "reconstruct" in modes else (None, None)
    target_module = _optional_string(data, "target_module", where)
    default_label = Path(model).name if is_local_model(model) else model.removeprefix("hub:")
    label = _string(data, "label", where, default=default_label)

    cells = [
        LoraCell(
            job=name, label=label, model=model, revision=revision, mode=mode, rank=rank,
            initial_model=initial_model if mode == "reconstruct" else None,
            initial_revision=initial_revision if mode == "reconstruct" else None,
            target_module=target_module, data=text, training=training,
        )
        for mode in modes
        for rank in ranks
    ]
    return LoraJob(name, _string(data, "description", where, default=""), path, tuple(cells))


def limit_cells(job: LoraJob, limit: int | None) -> LoraJob:
    """Return the job with only its first `limit` cells.

    Raises:
        ValueError: limit < 1.
    """
    if limit is None:
        return job
    if limit < 1:
        raise ValueError(f"limit = {limit} must be at least 1")
    return replace(job, cells=job.cells[:limit])


def is_local_model(model: str) -> bool:
    """Return whether a model reference names a local folder rather than a Hub repository."""
    return not model.startswith("hub:") and Path(model).is_absolute()


def _model_reference(value: str, where: str, key: str) -> str:
    """Return a Hub id unchanged and a local path as an absolute path."""
    if value.startswith("hub:"):
        return value
    path = Path(value).expanduser()
    if path.exists() or value.startswith((".", "/", "~")):
        return str(path.resolve())
    if re.fullmatch(r"[\w.-]+/[\w.-]+", value):
        return value
    raise ValueError(f"{where}: {key} = {value!r} is neither an existing folder nor a Hub id (ORG/NAME)")


def _initial_weights(data: dict, model: str, where: str) -> tuple[str, str | None]:
    initial_model = data.get("initial_model")
    initial_revision = _optional_string(data, "initial_revision", where)
    if initial_model is None:
        if is_local_model(model):
            raise ValueError(
                f"{where}: reconstruct mode on the local model {model} needs initial_model = PATH, "
                "a checkpoint whose input embedding holds the initial weights"
            )
        return model, initial_revision or DEFAULT_INITIAL_REVISION
    initial_model = _model_reference(str(initial_model), where, "initial_model")
    if initial_revision is not None and is_local_model(initial_model):
        raise ValueError(f"{where}: initial_revision applies only to a Hub initial_model, not to {initial_model}")
    if initial_revision is None and not is_local_model(initial_model):
        initial_revision = DEFAULT_INITIAL_REVISION
    return initial_model, initial_revision


def _modes(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or any(mode not in MODES for mode in value):
        raise ValueError(f"{where}: modes = {value!r} is invalid; use a list of {list(MODES)}")
    if len(set(value)) != len(value):
        raise ValueError(f"{where}: modes = {value!r} names a mode twice")
    return tuple(value)


def _ranks(value, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: ranks must be a non-empty list of positive integers")
    if not all(isinstance(rank, int) and not isinstance(rank, bool) and rank > 0 for rank in value):
        raise ValueError(f"{where}: ranks = {value!r} must contain only positive integers")
    if len(set(value)) != len(value):
        raise ValueError(f"{where}: ranks = {value!r} names a rank twice")
    return tuple(sorted(value))


def _training(data: dict, where: str) -> TrainingSettings:
    values = {}
    for spec in fields(TrainingSettings):
        if spec.name in data:
            values[spec.name] = data[spec.name]
    settings = TrainingSettings(**values)

    positive = {"steps": settings.steps, "batch_size": settings.batch_size}
    if settings.eval_batch_size is not None:
        positive["eval_batch_size"] = settings.eval_batch_size
    if settings.eval_tokens is not None:
        positive["eval_tokens"] = settings.eval_tokens
    for name, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {name} = {value!r} must be a positive integer")
    if not isinstance(settings.sequence_length, int) or settings.sequence_length < 2:
        raise ValueError(f"{where}: sequence_length = {settings.sequence_length!r} must be an integer of at least 2")
    if not isinstance(settings.warmup_steps, int) or not 0 <= settings.warmup_steps < settings.steps:
        raise ValueError(f"{where}: warmup_steps = {settings.warmup_steps!r} must be an integer in [0, steps)")
    if not isinstance(settings.seed, int) or isinstance(settings.seed, bool):
        raise ValueError(f"{where}: seed = {settings.seed!r} must be an integer")
    if not isinstance(settings.learning_rate, (int, float)) or not settings.learning_rate > 0:
        raise ValueError(f"{where}: learning_rate = {settings.learning_rate!r} must be a positive number")
    if settings.lora_alpha is not None and (not isinstance(settings.lora_alpha, (int, float))
                                            or not settings.lora_alpha > 0):
        raise ValueError(f"{where}: lora_alpha = {settings.lora_alpha!r} must be a positive number")
    if not isinstance(settings.rslora, bool):
        raise ValueError(f"{where}: rslora = {settings.rslora!r} must be true or false")
    return replace(settings, learning_rate=float(settings.learning_rate),
                   lora_alpha=None if settings.lora_alpha is None else float(settings.lora_alpha))


def _string(data: dict, key: str, where: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or (not value and default is None):
        raise ValueError(f"{where}: {key} must be a non-empty string (got {value!r})")
    return value


def _optional_string(data: dict, key: str, where: str) -> str | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{where}: {key} must be a non-empty string (got {value!r})")
    return value
