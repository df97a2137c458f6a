"""Open a run by folder or `bundled`: its decomposition on its own target, the tokenizer, the metadata."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from decomposer.vpd.report import resolve_run
from decomposer.vpd.run import Decomposition, load_decomposition, read_metadata


def load_run(run: str | Path) -> tuple[Decomposition, PreTrainedTokenizerBase, dict]:
    """(decomposition, tokenizer, metadata) of a run folder or of `bundled`, on the CPU in float32.

    Raises:
        VpdError: The folder does not exist or holds no decomposition, or its target cannot be loaded.
    """
    from decomposer.target.loading import load_target

    run_dir = resolve_run(run)
    _, meta = read_metadata(run_dir)
    target, tokenizer = load_target(meta["target"]["name"])
    d, meta, _ = load_decomposition(run_dir, target)
    d.ci_fn.eval()
    return d, tokenizer, meta
