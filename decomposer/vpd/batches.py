"""Batches for a decomposition run: language-model windows from the corpus, or a user's callable.

A batch source is a callable `step -> batch`, so that the batch of a step never depends on where
a run was resumed. Each rank of a distributed run takes its slice of the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from decomposer.data.corpus import corpus_paths
from decomposer.data.tokens import contiguous_windows, random_windows, split_tokens
from decomposer.errors import VpdError

BatchFn = Callable[[int], torch.Tensor]


def lm_train_batches(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
) -> BatchFn:
    """Global batches of random windows seeded by (seed, step); each rank keeps its contiguous slice."""
    if batch_size % world_size:
        raise VpdError(f"`optim.batch_size` {batch_size} must be divisible by the world size {world_size}.")
    local = batch_size // world_size

    def batch(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        windows = random_windows(tokens, batch_size=batch_size, seq_len=seq_len - 1, generator=generator)
        return windows[rank * local : (rank + 1) * local]

    return batch


def heldout_tokens(tokenizer: PreTrainedTokenizerBase, data_dir: str | Path | None, *, bundled: bool) -> np.ndarray:
    """Held-out token stream: the corpus split if it is built, else the bundled model's shipped sample."""
    if corpus_paths(data_dir).manifest.exists():
        return split_tokens("heldout", tokenizer, data_dir)
    if bundled:
        from decomposer.target.bundle import DOCUMENT_SEPARATOR, HELDOUT_SAMPLE
        from decomposer.target.loading import bundled_target_path

        text = (bundled_target_path() / HELDOUT_SAMPLE).read_text()
        docs = [d for d in text.split(DOCUMENT_SEPARATOR) if d.strip()]
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        return np.asarray([t for doc in ids for t in [*doc, tokenizer.eos_token_id]], dtype=np.uint16)
    raise VpdError(
        f"No corpus at {corpus_paths(data_dir).root} for held-out batches. Build it with `vpd corpus build` "
        "or pass `data_dir` pointing to one."
    )


def run_heldout_tokens(config, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """The held-out tokens of a run's `DecomposeConfig`: its corpus split, or the shipped sample for `bundled`."""
    from decomposer.target.loading import BUNDLED

    return heldout_tokens(tokenizer, config.data_dir, bundled=config.target == BUNDLED)


def heldout_seq_len(config, target) -> int:
    """The run's `optim.seq_len`, capped at the target's context (`config.max_position_embeddings`) when it has one."""
    context = getattr(getattr(target, "config", None), "max_position_embeddings", None)
    return min(config.optim.seq_len, context) if context else config.optim.seq_len


def run_heldout_windows(
    config,
    tokenizer: PreTrainedTokenizerBase,
    *,
    target,
    n_tokens: int | None = None,
    n_windows: int | None = None,
) -> torch.Tensor:
    """The first non-overlapping held-out windows of a run, (N, seq_len), seq_len = `heldout_seq_len`.

    Every analysis cuts its held-out text here, so two commands asked for the same amount read the same
    windows (and those of `vpd eval`, which starts at the same place), never longer than the target's context.
    Fewer windows come back when the held-out text runs out.

    Args:
        config: The run's `DecomposeConfig`.
        tokenizer: The target's tokenizer.
        target: The target model, whose context caps the window length.
        n_tokens: Tokens wanted, rounded up to whole windows; or
        n_windows: Windows wanted. Pass exactly one of the two.

    Raises:
        VpdError: `n_tokens` or `n_windows` below 1, or held-out text shorter than one window.
    """
    if (n_tokens is None) == (n_windows is None):
        raise VpdError("Pass exactly one of `n_tokens` and `n_windows` to `run_heldout_windows`.")
    if n_tokens is not None and n_tokens < 1:
        raise VpdError(f"`--tokens` must be at least 1; got {n_tokens}.")
    if n_windows is not None and n_windows < 1:
        raise VpdError(f"`n_windows` must be at least 1; got {n_windows}.")
    seq_len = heldout_seq_len(config, target)
    held = run_heldout_tokens(config, tokenizer)
    max_windows = n_windows if n_windows is not None else -(-n_tokens // seq_len)
    windows = contiguous_windows(held, seq_len=seq_len - 1, max_windows=max_windows)
    if len(windows) == 0:
        raise VpdError(
            f"The held-out text has {len(held)} tokens, fewer than one window of {seq_len}; build a larger corpus."
        )
    return windows


def train_tokens(tokenizer: PreTrainedTokenizerBase, data_dir: str | Path | None) -> np.ndarray:
    if not corpus_paths(data_dir).manifest.exists():
        raise VpdError(
            f"No corpus at {corpus_paths(data_dir).root} to train on. Build it with `vpd corpus build` "
            "or set `data_dir` in the config."
        )
    return split_tokens("train", tokenizer, data_dir)


def lm_eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int, n_batches: int) -> list[torch.Tensor]:
    """The first `n_batches` batches of non-overlapping held-out windows of `seq_len` tokens."""
    windows = contiguous_windows(tokens, seq_len=seq_len - 1, max_windows=batch_size * n_batches)
    return [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]


def run_eval_batches(config, tokenizer: PreTrainedTokenizerBase, n_batches: int | None = None) -> list[torch.Tensor]:
    """A run's evaluation batches: held-out windows of `optim.seq_len`, `eval.batches` of them by default."""
    return lm_eval_batches(
        run_heldout_tokens(config, tokenizer),
        batch_size=config.optim.batch_size,
        seq_len=config.optim.seq_len,
        n_batches=n_batches or config.eval.batches,
    )
