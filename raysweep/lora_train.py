"""Train and evaluate one rank of a LoRA rank sweep: the body of one Ray task.

Steps of `compute_lora_cell`:

1. load the model and its tokenizer through transformers (float32, never
   `trust_remote_code`), and the text as token blocks (raysweep.lora_data);
2. evaluate the unmodified model: `baseline_perplexity`;
3. in `reconstruct` mode, copy the initial input embedding into the model;
   evaluate again: `start_perplexity` (equal to the baseline in `adapt` mode);
4. wrap the input embedding with a peft LoRA delta of the cell's rank, with
   every other weight frozen, and train it with AdamW;
5. evaluate: `perplexity`.

Perplexity is exp of the mean next-token cross-entropy over all evaluation
blocks, each block predicting its tokens 2..L from the tokens before them.
Every error becomes a row with status "failed" (or "missing" for a model,
revision or file that does not exist), so one rank cannot stop a sweep.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import socket
import time
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from raysweep import __version__, store
from raysweep.lora import LORA_VERSION, LoraCell, TrainingSettings, is_local_model
from raysweep.lora_data import Blocks, DataMissing, load_blocks

logger = logging.getLogger(__name__)

# Mean of the last steps' losses is reported as `train_loss`: a tenth of the
# steps, at most this many, so one noisy batch does not decide it.
TRAIN_LOSS_WINDOW = 50


class ModelMissing(FileNotFoundError):
    """The model folder, Hub repository or revision does not exist."""


def compute_lora_cell(cell: LoraCell, device: str = "auto") -> dict:
    """Train and evaluate one rank; return its row of `store.LORA_SCHEMA`.

    Every exception is caught here and recorded in the row, because this is
    the boundary of one rank in a sweep.
    """
    import torch

    from raysweep.cell import describe_device
    from raysweep.kernel import resolve_device
    from raysweep.sources import SourceMissing

    started = time.perf_counter()
    row = base_lora_row(cell)
    model = None
    try:
        target = resolve_device(device)
        row["device"] = describe_device(target)
        model, tokenizer, resolved = load_model(cell.model, cell.revision)
        row["resolved_revision"] = resolved
        blocks = load_blocks(cell.data, tokenizer, cell.training.sequence_length, cell.training.eval_tokens)
        row.update(train_tokens=blocks.train_tokens, eval_tokens=blocks.eval_tokens, data_sha256=blocks.sha256)
        model.to(target)
        _record_shapes(row, model)

        eval_batch = cell.training.eval_batch_size or cell.training.batch_size
        row["baseline_perplexity"] = math.exp(evaluate(model, blocks.eval, eval_batch, target))
        if cell.mode == "reconstruct":
            initial = load_initial_embedding(cell)
            row["initial_sha256"] = initial.tensor_sha256
            row["tied_embeddings"] = replace_input_embedding(model, initial.matrix)
            row["start_perplexity"] = math.exp(evaluate(model, blocks.eval, eval_batch, target))
        else:
            row["start_perplexity"] = row["baseline_perplexity"]

        model, row["target_module"] = attach_lora(model, cell)
        row["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        training_started = time.perf_counter()
        losses = train(model, blocks, cell.training, target)
        row["train_seconds"] = time.perf_counter() - training_started
        window = max(1, min(TRAIN_LOSS_WINDOW, len(losses) // 10))
        row.update(train_loss_first=losses[0], train_loss=sum(losses[-window:]) / window)

        eval_loss = evaluate(model, blocks.eval, eval_batch, target)
        row.update(eval_loss=eval_loss, perplexity=math.exp(eval_loss))
    except (ModelMissing, DataMissing, SourceMissing) as error:
        return finish_row(row, started, "missing", error)
    except Exception as error:  # the rank's boundary: record anything and let the sweep go on
        logger.exception("LoRA %s rank %d of %s failed", cell.mode, cell.rank, cell.model)
        return finish_row(row, started, "failed", error)
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return finish_row(row, started, "ok", None)


def base_lora_row(cell: LoraCell) -> dict:
    """Return a row with the cell's identity, settings and provenance, other values null."""
    settings = cell.training
    row = dict.fromkeys(store.LORA_COLUMNS)
    row.update(
        job=cell.job,
        cell_key=cell.cell_key,
        label=cell.label,
        model=cell.model,
        revision=cell.revision,
        mode=cell.mode,
        rank=cell.rank,
        lora_alpha=settings.alpha_for(cell.rank),
        rslora=settings.rslora,
        target_module=cell.target_module,
        initial_model=cell.initial_model,
        initial_revision=cell.initial_revision,
        steps=settings.steps,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        batch_size=settings.batch_size,
        sequence_length=settings.sequence_length,
        seed=settings.seed,
        data=json.dumps(asdict(cell.data), sort_keys=True),
        **lora_versions(),
    )
    return row


def finish_row(row: dict, started: float, status: str, error: Exception | None) -> dict:
    """Set status, error, seconds and finish time; log a failure."""
    row["status"] = status
    row["error"] = None if error is None else f"{type(error).__name__}: {error}"
    row["seconds"] = time.perf_counter() - started
    row["finished_at"] = datetime.now(timezone.utc)
    if error is not None:
        logger.warning("LoRA %s rank %s (%s): %s", row["mode"], row["rank"], row["cell_key"], row["error"])
    return row


def lora_versions() -> dict:
    """Return the software versions and host recorded in every LoRA row."""
    import peft
    import ray
    import torch
    import transformers

    return {
        "raysweep_version": __version__,
        "lora_version": LORA_VERSION,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
        "ray_version": ray.__version__,
        "python_version": platform.python_version(),
        "hostname": socket.gethostname(),
    }


def load_model(model: str, revision: str | None):
    """Load a causal LM in float32 and its tokenizer; return (model, tokenizer, resolved commit or None).

    Raises:
        ModelMissing: the folder, repository or revision does not exist.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # The "Loading weights" progress bar would fill the Ray driver's log for every rank.
    transformers_logging.disable_progress_bar()
    reference = model.removeprefix("hub:")
    if is_local_model(model) and not Path(reference).is_dir():
        raise ModelMissing(f"model folder {reference} does not exist")
    options = {"revision": revision, "trust_remote_code": False}
    try:
        tokenizer = AutoTokenizer.from_pretrained(reference, **options)
        loaded = AutoModelForCausalLM.from_pretrained(reference, **options, **{_dtype_argument(): torch.float32})
    except OSError as error:
        if _is_not_found(error):
            raise ModelMissing(f"model {reference} at revision {revision or 'main'} was not found: {error}") from error
        raise
    return loaded, tokenizer, None if is_local_model(model) else _resolved_commit(reference, revision)


def _resolved_commit(repo_id: str, revision: str | None) -> str | None:
    """Return the commit that a Hub revision resolved to, from the cached snapshot of its config.json.

    transformers 5.25, the version tested, does not store the commit in the config. The config is
    already in the Hub cache here, so this reads no new file, and it also
    works with HF_HUB_OFFLINE=1.
    """
    from huggingface_hub import hf_hub_download

    path = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    # The cache layout is models--ORG--NAME/snapshots/COMMIT/config.json.
    return path.parent.name if path.parent.parent.name == "snapshots" else None


def load_initial_embedding(cell: LoraCell):
    """Read only the input embedding of the initial checkpoint (see raysweep.sources.load_matrix)."""
    from raysweep.sources import load_matrix

    return load_matrix(cell.initial_model, cell.initial_revision, "input")


def replace_input_embedding(model, weights) -> bool:
    """Copy `weights` into the model's input embedding; return whether input and output were tied.

    A tied output embedding is first given its own copy of the trained
    weights, so that only the input side changes.

    Raises:
        ValueError: the shapes differ.
    """
    import torch

    embedding = model.get_input_embeddings()
    if tuple(weights.shape) != tuple(embedding.weight.shape):
        raise ValueError(
            f"the initial input embedding has shape {tuple(weights.shape)} but the model's has "
            f"{tuple(embedding.weight.shape)}; initial_model must be the same architecture and vocabulary"
        )
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding.weight
    if tied:
        output.weight = torch.nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    with torch.no_grad():
        embedding.weight.copy_(weights.to(embedding.weight.dtype))
    return tied


def attach_lora(model, cell: LoraCell):
    """Wrap the input embedding with a LoRA delta of the cell's rank; return (peft model, module name).

    peft freezes every base weight. The delta starts at zero, because peft
    initialises the embedding's A matrix with zeros, so the wrapped model
    computes exactly what the unwrapped one did.

    Raises:
        ValueError: the target module is not found, or a parameter other
            than the LoRA matrices would be trained.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    target = cell.target_module or input_embedding_name(model)
    config = LoraConfig(
        r=cell.rank,
        lora_alpha=cell.training.alpha_for(cell.rank),
        use_rslora=cell.training.rslora,
        target_modules=[target],
        lora_dropout=0.0,
        bias="none",
    )
    torch.manual_seed(cell.training.seed)
    with warnings.catch_warnings():
        # peft calls a transformers 5 method that transformers itself marks deprecated.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = get_peft_model(model, config)
    trained = [name for name, parameter in wrapped.named_parameters() if parameter.requires_grad]
    outside = [name for name in trained if "lora_embedding_" not in name]
    if not trained or outside:
        raise ValueError(
            f"LoRA on {target!r} would train {outside or 'nothing'}; target_module must name the input "
            "embedding (an nn.Embedding)"
        )
    return wrapped, target


def input_embedding_name(model) -> str:
    """Return the module name of `model.get_input_embeddings()`, such as "gpt_neox.embed_in"."""
    embedding = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embedding:
            return name
    raise ValueError(f"{type(model).__name__}.get_input_embeddings() is not among its modules; set target_module")


def train(model, blocks: Blocks, settings: TrainingSettings, device) -> list[float]:
    """Train the trainable parameters; return the loss of every step.

    Each step draws `batch_size` training blocks uniformly with replacement,
    in an order fixed by the seed.

    Raises:
        FloatingPointError: the loss became NaN or infinite.
    """
    import torch

    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, settings))
    generator = torch.Generator().manual_seed(settings.seed)
    train_blocks = torch.from_numpy(blocks.train)
    losses = torch.empty(settings.steps, dtype=torch.float32, device=device)

    model.train()
    for step in range(settings.steps):
        picked = torch.randint(0, len(train_blocks), (settings.batch_size,), generator=generator)
        batch = train_blocks[picked].to(device)  # (batch_size, sequence_length)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses[step] = loss.detach()
    model.eval()

    values = losses.tolist()
    bad = next((step for step, value in enumerate(values) if not math.isfinite(value)), None)
    if bad is not None:
        raise FloatingPointError(
            f"the training loss became {values[bad]} at step {bad}; lower learning_rate or add warmup_steps"
        )
    return values


def learning_rate_factor(step: int, settings: TrainingSettings) -> float:
    """Return the learning rate of a step as a fraction of the peak: linear warmup, then cosine to 0."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    decay_steps = settings.steps - settings.warmup_steps
    progress = (step - settings.warmup_steps) / decay_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def evaluate(model, blocks, batch_size: int, device) -> float:
    """Return the mean next-token cross-entropy (nats) over all blocks.

    Every block predicts the same number of tokens, so the mean of the
    per-batch means, weighted by batch size, is the mean over all tokens.
    """
    import torch

    model.eval()
    eval_blocks = torch.from_numpy(blocks)
    total = 0.0
    with torch.no_grad():
        for first in range(0, len(eval_blocks), batch_size):
            batch = eval_blocks[first:first + batch_size].to(device)  # (batch, sequence_length)
            total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
    return total / len(eval_blocks)


def _record_shapes(row: dict, model) -> None:
    weight = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    row.update(embedding_rows=int(weight.shape[0]), hidden_size=int(weight.shape[1]),
               tied_embeddings=output is not None and output.weight is weight)


def _dtype_argument() -> str:
    """Return the name of from_pretrained's dtype option: `dtype` from transformers 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _is_not_found(error: BaseException) -> bool:
    """Return whether a from_pretrained error comes from a repository, revision or file that does not exist."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    current: BaseException | None = error
    while current is not None:
        if isinstance(current, GatedRepoError):
            return False
        if isinstance(current, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)):
            return True
        current = current.__cause__ or current.__context__
    return False
