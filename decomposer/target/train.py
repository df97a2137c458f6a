"""Train the target language model on the built corpus.

1. Load the corpus tokenizer and the token streams of both splits (cached after the first run).
2. Build the model from the config's shape, seeded.
3. For each step s, draw a batch of random windows from a generator seeded by (seed, s), so the
   batch order does not depend on where a run was resumed.
4. AdamW with linear warm-up then cosine decay to `min_lr_ratio`, gradient-norm clipping.
5. Every `eval_every` steps, measure held-out CE; every `checkpoint_every` steps, write an atomic
   checkpoint (weights, optimiser state, step, metrics) that `resume=True` continues from.
6. At the end, save the model with `save_pretrained`, the tokenizer beside it, and `training.json`
   with the quality report.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import PreTrainedTokenizerFast

from decomposer.data.corpus import corpus_paths, load_manifest
from decomposer.data.tokens import contiguous_windows, random_windows, split_tokens
from decomposer.errors import VpdError
from decomposer.io import atomic_write_dir, atomic_write_json, resolve_atomic_dir
from decomposer.optim_state import load_optimizer_tensors, optimizer_tensors
from decomposer.target.config import TargetConfig, TrainSettings
from decomposer.target.model import build_model
from decomposer.target.quality import cross_entropy, measure_quality

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
TRAINING_JSON = "training.json"


@dataclass(frozen=True)
class StepLog:
    step: int
    loss: float
    lr: float
    tokens_per_s: float
    heldout_ce: float | None = None


def lr_at(step: int, t: TrainSettings) -> float:
    """Linear warm-up from 0, then cosine decay from `lr` to `lr * min_lr_ratio` at the last step."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - 1 - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _optimizer(model: torch.nn.Module, t: TrainSettings) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)


def _save_checkpoint(out: Path, model, opt, step: int, config: TargetConfig, history: list[dict]) -> None:
    def fill(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding
        save_file(optimizer_tensors(opt), tmp / "optimizer.safetensors")
        atomic_write_json(
            tmp / "state.json", {"step": step, "config": config.model_dump(mode="json"), "history": history}
        )

    atomic_write_dir(out / CHECKPOINT_DIR, fill)


def train_target(
    config: TargetConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = False,
    on_step: Callable[[StepLog], None] | None = None,
) -> dict:
    """Train a target model as configured and save it to `<out>/model`; return the training record.

    The loop, evaluation and checkpointing stay in one function so the resume path is visibly the same code.

    Raises:
        VpdError: No corpus is built, `out` holds a run with another config, or `resume` finds
            no checkpoint.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    t = config.train
    if t.threads:
        torch.set_num_threads(t.threads)
    manifest = load_manifest(config.data_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(corpus_paths(config.data_dir).tokenizer)
    if len(tokenizer) != config.model.vocab_size:
        raise VpdError(
            f"`model.vocab_size` is {config.model.vocab_size} but the corpus tokenizer has {len(tokenizer)} "
            f"entries. Set `model.vocab_size: {len(tokenizer)}` or rebuild the corpus with that vocabulary."
        )
    train_tokens = split_tokens("train", tokenizer, config.data_dir)
    heldout_tokens = split_tokens("heldout", tokenizer, config.data_dir)
    eval_windows = contiguous_windows(heldout_tokens, seq_len=t.seq_len, max_windows=t.eval_batches * t.batch_size)

    model = build_model(config.model, seed=t.seed, eos_token_id=tokenizer.eos_token_id)
    opt = _optimizer(model, t)
    start_step, history = 0, []
    checkpoint = resolve_atomic_dir(out / CHECKPOINT_DIR)
    if resume:
        if checkpoint is None:
            raise VpdError(f"`--resume` was given but {out} has no checkpoint. Drop `--resume` to start a new run.")
        state = json.loads((checkpoint / "state.json").read_text())
        if state["config"] != config.model_dump(mode="json"):
            raise VpdError(f"The checkpoint in {out} was trained with a different config. Use a new `--out` folder.")
        load_model(model, str(checkpoint / "model.safetensors"))
        load_optimizer_tensors(opt, load_file(checkpoint / "optimizer.safetensors"))
        start_step, history = state["step"], state["history"]
        logger.info("train-target: resumed from step %d", start_step)
    elif checkpoint is not None:
        raise VpdError(f"{out} already holds a training run. Pass `--resume` to continue it, or choose a new `--out`.")

    model.train()
    began = time.perf_counter()
    bar = tqdm(range(start_step, t.steps), desc="train-target", disable=not progress, initial=start_step, total=t.steps)
    for step in bar:
        tick = time.perf_counter()
        lr = lr_at(step, t)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = random_windows(
            train_tokens,
            batch_size=t.batch_size,
            seq_len=t.seq_len,
            generator=torch.Generator().manual_seed(t.seed * 1_000_003 + step),
        )
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        heldout_ce = None
        if done % t.eval_every == 0 or done == t.steps:
            model.eval()
            heldout_ce = cross_entropy(model, eval_windows)
            model.train()
        log = StepLog(done, loss.item(), lr, batch[:, 1:].numel() / (time.perf_counter() - tick), heldout_ce)
        if heldout_ce is not None:
            history.append({"step": done, "train_loss": log.loss, "heldout_ce": heldout_ce})
        bar.set_postfix(loss=f"{log.loss:.3f}", ce=f"{history[-1]['heldout_ce']:.3f}" if history else "-")
        if on_step is not None:
            on_step(log)
        if done % t.checkpoint_every == 0 or done == t.steps:
            _save_checkpoint(out, model, opt, done, config, history)
    elapsed = time.perf_counter() - began

    model.eval()
    quality = measure_quality(model, tokenizer, heldout_tokens, seq_len=t.seq_len)
    record = {
        "config": config.model_dump(mode="json"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens_seen": t.steps * t.batch_size * t.seq_len,
        "corpus_tokens": manifest["totals"],
        "seconds_this_session": round(elapsed, 1),
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}",
        "torch": torch.__version__,
        "quality": quality.to_dict(),
        "history": history,
    }

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / TRAINING_JSON, record)

    atomic_write_dir(out / MODEL_DIR, fill)
    logger.info("train-target: %d steps in %.0f s, held-out CE %.3f", t.steps - start_step, elapsed, quality.heldout_ce)
    return record
