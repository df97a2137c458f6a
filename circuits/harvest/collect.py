"""Component interpretation statistics in one streamed pass over held-out tokens (docs/attribution-graphs.md §10).

Subcomponents carry a flat index: the C subcomponents of `module_paths[0]`, then those of
`module_paths[1]`, and so on. Over N tokens, with g the CI network's output on the clean target forward:

1. c fires at a token when g > τ_fire. F_c counts its firings; density = F_c / N; mean CI = Σ g / N.
2. Input tokens: n_cv counts firings whose current token is v, and T_v counts v. recall = n_cv / F_c,
   precision = n_cv / T_v, lift = precision / (F_c / N), PMI = log(n_cv N / (F_c T_v)).
3. Output tokens: the same formulas with n_cv = Σ over firing positions of p_target(next = v) and
   T_v = Σ over all positions of p_target(next = v).
4. Co-firing among alive subcomponents (F_c > 0): c_ij counts the tokens where both fire; precision
   c_ij/c_i, recall c_ij/c_j, Jaccard c_ij/(c_i + c_j − c_ij), PMI log(c_ij N/(c_i c_j)).
5. Top examples: the `top_k` highest-CI firings of each subcomponent [ours: ties go to the larger
   |a·‖u_c‖|, then to the earlier token], each with ±`window` tokens of CI and a·‖u_c‖ (a = v_cᵀ x).
6. Random examples: a per-subcomponent reservoir (Algorithm R) of capacity `reservoir`. Each batch
   offers at most `per_batch` of a subcomponent's firings, chosen uniformly (upstream's rule: one long
   document cannot fill a reservoir).

Memory [ours]. State that grows with the vocabulary or with C_total lives only in rows of
subcomponents that have fired, allocated on the first firing: output mass rows × vocab (float32),
co-firing rows × rows (int32), top examples rows × top_k × (2·window + 1), reservoir rows × reservoir.
Input-token counts are sparse (subcomponent, token) pairs. The tokens are kept (int32, N of them), so
example windows are cut from them afterwards rather than stored with every example.

Artifact: `<run>/harvest/` (written atomically) holds `harvest.safetensors` (every count tensor) and
`harvest.json` (settings, throughput and a per-component summary of the alive subcomponents).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from attrgraph.harvest_format import (
    HARVEST_DAMAGED_FIX,
    HARVEST_DIR,
    HARVEST_FORMAT,
    HARVEST_FORMAT_VERSION,
    HARVEST_META,
    HARVEST_TENSORS,
    harvest_meta_path,
    read_harvest_meta,
)
from circuits.harvest.accumulate import _Accumulator
from circuits.harvest.stats import CoFiring, Example, Harvest, TokenStats
from decomposer.errors import ArtifactFormatError, VpdError
from decomposer.integrity import check_sha256, load_safetensors, record_sha256
from decomposer.io import atomic_write_dir, atomic_write_text
from decomposer.vpd.distributed import rank_and_world
from decomposer.vpd.run import Decomposition

__all__ = ["CoFiring", "Example", "Harvest", "TokenStats", "harvest", "load_harvest", "save_harvest"]

logger = logging.getLogger(__name__)


def _check_settings(tau_fire: float, top_k: int, window: int, reservoir: int, per_batch: int) -> None:
    if not (isinstance(tau_fire, int | float) and 0 <= tau_fire < 1):
        raise VpdError(f"`tau_fire` must be in [0, 1); got {tau_fire!r}. Pass a CI threshold such as 0.1.")
    for name, value, low in (
        ("top_k", top_k, 1),
        ("window", window, 0),
        ("reservoir", reservoir, 1),
        ("per_batch", per_batch, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise VpdError(f"`{name}` must be an int >= {low}; got {value!r}.")


def _vocab_strings(tokenizer: Any, V: int) -> tuple[str, ...]:
    n = len(tokenizer)
    return tuple(tokenizer.decode([i]) if i < n else f"<{i}>" for i in range(V))


def _check_batch(i: int, batch: Any, V: int) -> None:
    if not isinstance(batch, Tensor) or batch.ndim != 2 or batch.is_floating_point() or batch.numel() == 0:
        got = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
        raise VpdError(f"`token_batches[{i}]` must be a non-empty (batch, seq) integer tensor; got {got}.")
    if int(batch.min()) < 0 or int(batch.max()) >= V:
        raise VpdError(f"`token_batches[{i}]` holds token ids outside [0, {V}); tokenize with the run's tokenizer.")


def _batch_statistics(d: Decomposition, paths: list[str], u_norm: Tensor, tokens: Tensor) -> tuple[Tensor, ...]:
    """(g, scaled activations, next-token probabilities) of one batch: what the accumulator reads."""
    out, xs = d.model.forward_with_inputs(tokens)
    g, _ = d.causal_importance(xs)
    g_all = torch.cat([g[p] for p in paths], dim=-1)
    acts = torch.cat([d.model.components(p).component_acts(xs[p]) for p in paths], dim=-1) * u_norm
    return g_all, acts, torch.softmax(out.logits.float(), dim=-1)


def _accumulate_across_ranks(
    d: Decomposition,
    paths: list[str],
    u_norm: Tensor,
    batches: list[Tensor],
    acc: _Accumulator,
    rank: int,
    world: int,
    *,
    progress: bool,
) -> None:
    """Under torchrun: rank r runs the forwards of batches r, r + world, …; rank 0 accumulates them in order.

    The accumulator's reservoirs draw from one generator in batch order and its sums round in that order, so
    it runs on one rank over the batches in their original order: the counts equal one process's exactly,
    while the target and CI forwards, the bulk of the work, are spread over the ranks.
    """
    import torch.distributed as dist
    from tqdm.auto import tqdm

    device = d.model_device
    bar = tqdm(total=len(batches), desc="harvest", unit="batch", disable=not progress or rank != 0)
    for first in range(0, len(batches), world):
        mine = first + rank
        own = None
        if mine < len(batches):
            own = _batch_statistics(d, paths, u_norm, batches[mine].to(device=device, dtype=torch.long))
            if rank != 0:
                for t in own:
                    dist.send(t.contiguous(), dst=0)
        if rank != 0:
            continue
        for r in range(min(world, len(batches) - first)):
            tokens = batches[first + r].to(device=device, dtype=torch.long)
            stats = own
            if r > 0:  # same dtypes as rank 0's own batch, shaped by this batch's (B, T)
                stats = [torch.empty((*tokens.shape, t.shape[-1]), dtype=t.dtype, device=device) for t in own]
                for t in stats:
                    dist.recv(t, src=r)
            acc.update(tokens, *stats)
            bar.update(1)
    bar.close()


@torch.no_grad()
def harvest(
    d: Decomposition,
    token_batches: Iterable[Tensor],
    *,
    tokenizer: Any = None,
    tau_fire: float = 0.1,
    top_k: int = 20,
    window: int = 20,
    reservoir: int = 1000,
    per_batch: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> Harvest | None:
    """Count component statistics over `token_batches` in one pass, on the decomposition's device.

    Args:
        d: The decomposition; its CI network gives g on the clean target forward.
        token_batches: (batch, seq) integer token tensors; each row is one sequence.
        tokenizer: Decodes token ids into the strings shown in summaries, cards and labels (optional).
        tau_fire: A subcomponent fires where g > tau_fire.
        top_k: Top examples kept per subcomponent.
        window: Tokens kept either side of an example's firing token.
        reservoir: Capacity of each subcomponent's uniform reservoir of firings.
        per_batch: Firings of one subcomponent offered to its reservoir per batch, at most.
        seed: Seeds the reservoir's random choices.
        progress: Show a tqdm bar.

    Under torchrun the ranks share the forwards and rank 0 accumulates (`_accumulate_across_ranks`): every
    rank must call this with the same batches, and the counts, equal to one process's, come back on rank 0.

    Returns:
        The counts, on the CPU, with the pass's wall time (`tokens_per_s`); None on ranks other than 0.

    Raises:
        VpdError: A setting is out of range, a batch is not a 2-D integer tensor of valid ids, or there
            are no tokens.
    """
    from tqdm.auto import tqdm

    _check_settings(tau_fire, top_k, window, reservoir, per_batch)
    device, paths = d.model_device, list(d.module_paths)
    V = d.model.target.get_output_embeddings().weight.shape[0]
    u_norm = torch.cat([d.model.components(p).U.detach().norm(dim=1) for p in paths])
    acc = _Accumulator(
        sum(d.Cs.values()),
        V,
        tau=tau_fire,
        top_k=top_k,
        window=window,
        reservoir=reservoir,
        per_batch=per_batch,
        seed=seed,
        device=device,
    )
    rank, world = rank_and_world()
    if world > 1:
        token_batches = list(token_batches)
        for i, batch in enumerate(token_batches):  # every rank checks every batch, so all refuse alike
            _check_batch(i, batch, V)
    total = len(token_batches) if hasattr(token_batches, "__len__") else None
    start = time.perf_counter()
    if world > 1:
        _accumulate_across_ranks(d, paths, u_norm, token_batches, acc, rank, world, progress=progress)
    bar = tqdm(token_batches if world == 1 else [], total=total, desc="harvest", unit="batch", disable=not progress)
    for i, batch in enumerate(bar):
        _check_batch(i, batch, V)
        tokens = batch.to(device=device, dtype=torch.long)
        acc.update(tokens, *_batch_statistics(d, paths, u_norm, tokens))
        bar.set_postfix(tok_s=f"{acc.n_tokens / max(time.perf_counter() - start, 1e-9):,.0f}")
    if rank != 0:
        return None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if acc.n_tokens == 0:
        raise VpdError("`token_batches` is empty; pass at least one (batch, seq) tensor of token ids.")
    logger.info(
        "harvest: %d tokens in %.1f s (%.0f tokens/s), %d alive",
        acc.n_tokens,
        seconds,
        acc.n_tokens / seconds,
        acc.n_rows,
    )
    return acc.finish(
        module_paths=tuple(paths),
        Cs=tuple(d.Cs[p] for p in paths),
        tau_fire=float(tau_fire),
        window=window,
        top_k=top_k,
        reservoir=reservoir,
        per_batch=per_batch,
        seed=seed,
        seconds=seconds,
        vocab=_vocab_strings(tokenizer, V) if tokenizer is not None else None,
        u_norm=u_norm.float().cpu(),
    )


# ---------------------------------------------------------------------------------------------------
# Artifact

_SETTINGS = ("tau_fire", "window", "top_k", "reservoir", "per_batch", "seed", "n_tokens", "seconds")
_TENSORS = tuple(f.name for f in fields(Harvest) if f.type == "Tensor")


def _upper(n: int) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool).triu()


def save_harvest(
    h: Harvest, run_dir: str | Path, *, list_size: int = 10, n_examples: int = 3, progress: bool = False
) -> Path:
    """Write `<run_dir>/harvest/` atomically: `harvest.safetensors` and `harvest.json`; return the folder.

    Args:
        h: The harvest.
        run_dir: The run folder (or any writable folder) that receives `harvest/`.
        list_size: Tokens (and co-firing partners) per ranked list in the JSON summaries.
        n_examples: Top and random examples per subcomponent in the JSON summaries (all are in the tensors).
        progress: Show a tqdm bar over the summaries.
    """
    from tqdm.auto import tqdm

    alive = tqdm(h.alive.tolist(), desc="summaries", unit="component", disable=not progress)
    meta = {
        "format": HARVEST_FORMAT,
        "format_version": HARVEST_FORMAT_VERSION,
        **{name: getattr(h, name) for name in _SETTINGS},
        "tokens_per_s": h.tokens_per_s,
        "n_sequences": len(h.seq_starts) - 1,
        "modules": [{"path": p, "C": C} for p, C in zip(h.module_paths, h.Cs, strict=True)],
        "C_total": h.C_total,
        "alive": len(h.alive),
        "summary_settings": {"list_size": list_size, "n_examples": n_examples},
        "vocab": list(h.vocab) if h.vocab is not None else None,
        "components": {h.key(flat): h.summary(flat, list_size=list_size, n_examples=n_examples) for flat in alive},
    }

    def fill(tmp: Path) -> None:
        tensors = {name: getattr(h, name).contiguous() for name in _TENSORS}
        # Co-firing is symmetric: store its upper triangle (diagonal included), row-major.
        tensors["cofire"] = h.cofire[_upper(len(h.alive))]
        assert h.n_tokens < 2**31, f"{h.n_tokens} tokens overflow the int32 token index"
        for name in ("top_loc", "res_loc"):
            tensors[name] = tensors[name].to(torch.int32)
        save_file(
            tensors,
            tmp / HARVEST_TENSORS,
            metadata={"format": HARVEST_FORMAT, "format_version": str(HARVEST_FORMAT_VERSION)},
        )
        meta["files"] = record_sha256(tmp, [HARVEST_TENSORS])
        # Compact separators: with indentation the per-component windows would triple the file.
        atomic_write_text(tmp / HARVEST_META, json.dumps(meta, separators=(",", ":")) + "\n")

    return atomic_write_dir(Path(run_dir) / HARVEST_DIR, fill)


def load_harvest(path: str | Path) -> Harvest:
    """Read a harvest from a run folder (holding `harvest/`) or from the harvest folder itself.

    Raises:
        VpdError: There is no harvest there (run `vpd harvest` first).
        ArtifactFormatError: Its format version is one this release cannot read.
        DamagedArtifactError: Its tensors file differs from the sha256 recorded when it was written.
    """
    meta_path = harvest_meta_path(path)
    if meta_path is None:
        raise VpdError(f"No harvest in {str(path)!r}; run `vpd harvest --run RUN` first (or pass `--harvest DIR`).")
    meta = read_harvest_meta(meta_path)
    tensor_path = meta_path.parent / HARVEST_TENSORS
    if not tensor_path.is_file():
        raise ArtifactFormatError(f"{meta_path.parent} lacks {HARVEST_TENSORS}; run `vpd harvest` again.")
    check_sha256(meta_path.parent, meta.get("files", {}), fix=HARVEST_DAMAGED_FIX)
    tensors = load_safetensors(tensor_path, fix=HARVEST_DAMAGED_FIX)
    missing = [name for name in _TENSORS if name not in tensors]
    if missing:
        raise ArtifactFormatError(f"{tensor_path} lacks tensors {', '.join(missing[:5])}; run `vpd harvest` again.")
    n_alive = len(tensors["alive"])
    cofire = torch.zeros(n_alive, n_alive, dtype=tensors["cofire"].dtype)
    upper = _upper(n_alive)
    cofire[upper] = tensors["cofire"]
    tensors["cofire"] = torch.where(upper, cofire, cofire.T)
    for name in ("top_loc", "res_loc"):
        tensors[name] = tensors[name].long()
    return Harvest(
        module_paths=tuple(m["path"] for m in meta["modules"]),
        Cs=tuple(int(m["C"]) for m in meta["modules"]),
        vocab=tuple(meta["vocab"]) if meta.get("vocab") is not None else None,
        **{name: meta[name] for name in _SETTINGS},
        **{name: tensors[name] for name in _TENSORS},
    )
