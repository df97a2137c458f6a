"""The peak memory of a decomposition's training, estimated before the first step, and the refusal.

Bytes, fp32 throughout (`Decomposition.create`):

    fixed      = 4 · (target parameters + decomposed W copies)           frozen
               + 16 · (U, V and CI-network parameters)                   parameter, gradient, AdamW's two moments
               + 4 · (U, V and CI-network parameters)                    AdamW's scratch copies during its update
    per token  = 4 · (ACT_PER_C · ΣC + ACT_PER_D · Σ(d_in + d_out) + ACT_PER_VOCAB · vocabulary)
    peak       = fixed + tokens per step (and rank) · per token

ΣC and Σ(d_in + d_out) run over the decomposed matrices. The per-token coefficients count the tensors a step
keeps for its backward pass: each masked forward (stochastic, adversarial) holds x·V, the mask and their
product per subcomponent, the CI network holds g and g_up, and every forward its logits and their
softmax. They were fitted to the peak RSS of SmolLM2-135M with `modules: auto` on the CPU at 64 and 256
tokens per step (15.45 and 20.19 GB measured, 15.49 and 20.52 GB estimated; `benchmarks/smollm2_scale.py`,
docs/benchmarks.md), so the estimate errs a little on the safe side.
"""

from __future__ import annotations

import os

from torch import nn

from decomposer.errors import VpdError

ACT_PER_C = 8.0
ACT_PER_D = 12.0
ACT_PER_VOCAB = 12.0
GB = 1e9


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def estimate_training_bytes(d, tokens_per_step: int) -> dict[str, int]:
    """The parts of the estimate for one process training `d` on `tokens_per_step` tokens per step.

    Args:
        d: A `Decomposition` (U, V, the CI network and the target).
        tokens_per_step: batch_size · seq_len on this rank.
    """
    comps = [d.model.components(p) for p in d.module_paths]
    sum_c = sum(c.C for c in comps)
    sum_dims = sum(c.d_in + c.d_out for c in comps)
    w = sum(c.d_in * c.d_out for c in comps)
    uv = sum(c.C * (c.d_in + c.d_out) for c in comps)
    ci = sum(p.numel() for p in d.ci_fn.parameters() if p.requires_grad)
    target = _count(d.model.target)
    cfg = getattr(d.model.target, "config", None)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    per_token = 4 * (ACT_PER_C * sum_c + ACT_PER_D * sum_dims + ACT_PER_VOCAB * vocab)
    parts = {
        "frozen": 4 * (target + w),
        "training_state": 20 * (uv + ci),
        "activations": int(per_token * tokens_per_step),
    }
    parts["total"] = sum(parts.values())
    return parts


def available_bytes(device: str | None = None) -> int | None:
    """Free memory where the work runs: CUDA's free bytes on a GPU, else Linux MemAvailable (else the free
    physical pages); None if unknown. Training and the graph pipeline both check against it."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_training_memory(d, tokens_per_step: int, *, device: str | None = None, limit: int | None = None) -> dict:
    """Refuse a decomposition whose estimated peak exceeds `limit` (default: what is free on `device` now).

    The model and the decomposition already exist when this runs, so the free memory counts them as used;
    the check compares what is still to come (gradients, AdamW moments, activations) with what is free.

    Raises:
        VpdError: One sentence with the estimate, what is free, and the setting that lowers it:
            `optim.batch_size`/`optim.seq_len` when the activations alone would fit, else `modules`
            (`scale` of `modules: auto`), `ci` and more GPUs with `--shard`.
    """
    parts = estimate_training_bytes(d, tokens_per_step)
    comps = [d.model.components(p) for p in d.module_paths]
    present = 4 * (sum(c.C * (c.d_in + c.d_out) for c in comps) + _count(d.ci_fn))  # already allocated
    if limit is None:
        free = available_bytes(device)
        if free is None or os.environ.get("VPD_SKIP_MEMORY_CHECK") == "1":
            return parts
        limit = free + present + parts["frozen"]
    if parts["total"] <= limit:
        return parts
    fixed = parts["frozen"] + parts["training_state"]
    if fixed < limit:
        per_token = parts["activations"] / max(tokens_per_step, 1)
        fits = int((limit - fixed) / per_token)
        how = (
            f"lower `optim.batch_size` or `optim.seq_len` (batch_size × seq_len per process is {tokens_per_step:,} "
            f"tokens; about {fits:,} fit)"
        )
    else:
        how = (
            "decompose fewer or narrower matrices (`modules: {auto: true, scale: 0.5}` halves C, or list "
            "patterns), or shard the training state over GPUs with `--shard`"
        )
    raise VpdError(
        f"This decomposition needs an estimated {parts['total'] / GB:.1f} GB ({parts['frozen'] / GB:.1f} GB model and "
        f"W copies, {parts['training_state'] / GB:.1f} GB U, V and CI network with gradients and AdamW state, "
        f"{parts['activations'] / GB:.1f} GB activations) but {limit / GB:.1f} GB is available; {how}."
    )
