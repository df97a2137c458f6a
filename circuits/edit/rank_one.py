"""Model editing through one subcomponent (docs/attribution-graphs.md §11).

1. Find a token-specific subcomponent c of a matrix that writes to the residual stream (an o or down
   projection): it fires (CI > τ) on most occurrences of the trigger tokens and rarely elsewhere
   (`find_token_specific`).
2. σ is the sign of the mean activation a_c = v_cᵀ x over the tokens where c fires (`activation_sign`).
3. Replace its write vector u_c by σ α û, with û = W_U[o]/‖W_U[o]‖ (`unembedding_direction`). In nn.Linear
   layout W′ = W − u_c v_cᵀ + σ α û v_cᵀ (`edit_write_vector`). The result is an ordinary HF model: it acts
   wherever a_c ≠ 0, not only where CI > τ, which is where its off-target effects come from.
4. Measure it (`circuits.edit.metrics`): efficacy P(o) at the firing positions, and KL(p_target ‖ p_edited) on the
   ±window tokens around them (D_KL,Surrounding) and on non-firing tokens across the text (D_KL,Global).

`edit_study` runs the whole recipe on held-out text, with an α sweep and the LoRA baseline of `circuits.edit.lora`.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from attrgraph.labels import component_key
from attrgraph.nodes import module_short_name, resolve_component
from circuits.edit.metrics import EditMetrics, EditPoint, edit_metrics
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition
from decomposer.vpd.targets import read_weight

if TYPE_CHECKING:
    from circuits.edit.lora import LoraPoint, LoraSweep

logger = logging.getLogger(__name__)

RESIDUAL_WRITERS = ("o", "down")


def unembedding_direction(model: nn.Module, token_id: int) -> Tensor:
    """û_o = W_U[o]/‖W_U[o]‖, the unit direction in the residual stream that raises the logit of `token_id`.

    For an o_proj or down_proj subcomponent, whose output is added to the residual stream, this is the
    write direction the paper's edit uses.

    Raises:
        VpdError: `token_id` is outside the vocabulary, or its unembedding row is zero.
    """
    W_U = model.get_output_embeddings().weight.detach()  # (vocab, d_model)
    vocab = W_U.shape[0]
    if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab:
        raise VpdError(f"`token_id` must be an int in 0..{vocab - 1}; got {token_id!r}.")
    row = W_U[token_id]
    norm = row.norm()
    if norm == 0:
        raise VpdError(f"`token_id` {token_id} has a zero unembedding row, so it has no direction; pick another token.")
    return row / norm


def token_id_of(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of `token`, which must encode to exactly one token.

    Raises:
        VpdError: `token` encodes to zero or several tokens.
    """
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise VpdError(
            f"`token` {token!r} is {len(ids)} tokens, not one; pass a single token such as 'o' or ' the' "
            "(mind the leading space)."
        )
    return int(ids[0])


@torch.no_grad()
def component_activity(
    d: Decomposition, path: str, c: int, ids: Tensor, *, batch_size: int = 16
) -> tuple[Tensor, Tensor]:
    """CI g_c and activation a_c = v_cᵀ x of subcomponent c of `path` on `ids` (batch, seq), each (batch, seq)."""
    device = d.model_device
    gs, acts = [], []
    for chunk in ids.split(batch_size):
        _, xs = d.model.forward_with_inputs(chunk.to(device))
        g, _ = d.causal_importance(xs)
        gs.append(g[path][..., c].cpu())
        acts.append(d.model.components(path).component_acts(xs[path])[..., c].cpu())
    return torch.cat(gs), torch.cat(acts)


def activation_sign(acts: Tensor, firing: Tensor) -> int:
    """σ: the sign (+1 or −1) of the mean activation over the firing positions.

    Raises:
        VpdError: No position fires, or the mean activation is exactly 0.
    """
    if not firing.any():
        raise VpdError("The subcomponent fires nowhere in `firing_ids`; pass text where it fires or lower `threshold`.")
    mean = acts[firing].double().mean()
    if mean == 0:
        raise VpdError("The mean activation over the firing tokens is exactly 0, so σ is undefined; pass `sign`.")
    return 1 if mean > 0 else -1


def edit_write_vector(
    d: Decomposition,
    key: str,
    direction: Tensor,
    alpha: float,
    *,
    sign: int | None = None,
    firing_ids: Tensor | None = None,
    threshold: float = 0.1,
    batch_size: int = 16,
) -> nn.Module:
    """A copy of the target whose subcomponent `key` writes σ α û instead of u_c.

    W′ = W − u_c v_cᵀ + σ α û v_cᵀ (nn.Linear layout; a Conv1D weight gets the transpose), û = direction/‖direction‖.
    `d.model.target` is deep-copied and left untouched; the copy saves with `save_pretrained`.

    Args:
        d: The decomposition.
        key: The subcomponent, e.g. `2.mlp.down:17`.
        direction: A vector in the module's output space (d_out,), e.g. `unembedding_direction(...)`.
        alpha: The write scale α ≥ 0 (0 removes the subcomponent).
        sign: σ = ±1, given directly; or
        firing_ids: Token ids (batch, seq) from which σ is computed: the sign of the mean a_c where CI > `threshold`.
        threshold: The firing threshold τ on the CI, for `firing_ids`.
        batch_size: Sequences per forward pass, for `firing_ids`.

    Returns:
        The edited HF model.

    Raises:
        VpdError: An unknown `key`, a `direction` of the wrong shape or zero norm, a non-finite `alpha`, or
            not exactly one of `sign` and `firing_ids`.
    """
    path, c = resolve_component(d.Cs, key)
    comp = d.model.components(path)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise VpdError(f"`alpha` must be a finite number; got {alpha!r}.")
    if not isinstance(direction, Tensor) or direction.shape != (comp.d_out,):
        shape = tuple(direction.shape) if isinstance(direction, Tensor) else type(direction).__name__
        raise VpdError(
            f"`direction` must be a tensor of shape ({comp.d_out},), the output size of {path}; got {shape}."
        )
    norm = direction.detach().double().norm()
    if not torch.isfinite(norm) or norm == 0:
        raise VpdError("`direction` has zero or non-finite norm; pass a nonzero vector such as an unembedding row.")
    if (sign is None) == (firing_ids is None):
        raise VpdError("Pass exactly one of `sign` (±1) and `firing_ids` (token ids from which σ is computed).")
    if firing_ids is not None:
        g, acts = component_activity(d, path, c, firing_ids, batch_size=batch_size)
        sign = activation_sign(acts, g > threshold)
    if sign not in (1, -1):
        raise VpdError(f"`sign` must be +1 or -1; got {sign!r}.")

    edited = copy.deepcopy(d.model.target)
    W, _ = read_weight(edited.get_submodule(path))  # a view of the copy's parameter, (d_out, d_in)
    with torch.no_grad():
        u = comp.U[c].detach().to(W)
        v = comp.V[:, c].detach().to(W)
        u_hat = (direction.detach().double() / norm).to(W)
        W.add_(torch.outer(sign * alpha * u_hat - u, v))
    logger.info("edit: %s:%d, σ=%+d, α=%g", path, c, sign, alpha)
    return edited


@dataclass(frozen=True)
class TokenSpecific:
    """One candidate of `find_token_specific`; statistics follow docs/attribution-graphs.md §10.

    Attributes:
        key: Short key, e.g. `2.mlp.down:17`.
        module: Module path.
        index: Subcomponent index c.
        precision: n_c,trig / T_trig, the fraction of trigger-token positions where c fires.
        recall: n_c,trig / F_c, the fraction of c's firings that are on trigger tokens.
        density: F_c / N.
        n_firing: F_c, firing positions.
        n_trigger_firing: n_c,trig, firing positions whose current token is a trigger.
    """

    key: str
    module: str
    index: int
    precision: float
    recall: float
    density: float
    n_firing: int
    n_trigger_firing: int


def _trigger_ids(tokenizer: PreTrainedTokenizerBase, triggers: Sequence[int | str] | Tensor) -> list[int]:
    if isinstance(triggers, Tensor):
        triggers = triggers.flatten().tolist()
    if isinstance(triggers, (str, int)) or len(triggers) == 0:
        raise VpdError(
            f"`trigger_token_ids` must be a non-empty list of token ids or one-token strings; got {triggers!r}."
        )
    out = []
    for t in triggers:
        if isinstance(t, str):
            out.append(token_id_of(tokenizer, t))
        elif isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(tokenizer):
            out.append(t)
        else:
            raise VpdError(
                f"`trigger_token_ids` holds {t!r}; pass token ids in 0..{len(tokenizer) - 1} or one-token strings."
            )
    return out


@torch.no_grad()
def find_token_specific(
    d: Decomposition,
    tokenizer: PreTrainedTokenizerBase,
    ids: Tensor,
    trigger_token_ids: Sequence[int | str],
    *,
    threshold: float = 0.1,
    max_density: float = 0.05,
    modules: Sequence[str] | None = None,
    top_k: int = 10,
    batch_size: int = 16,
) -> list[TokenSpecific]:
    """Subcomponents that fire on the trigger tokens and rarely elsewhere, from one pass over `ids`.

    Candidates fire at least once on a trigger token and have density ≤ `max_density`; they are ranked by
    precision, then recall, then lower density.

    Args:
        d: The decomposition.
        tokenizer: Its tokenizer, used for string triggers.
        ids: Token ids (batch, seq).
        trigger_token_ids: Token ids, or strings that are one token each.
        threshold: Firing threshold τ on the CI.
        max_density: Largest firing density F_c / N a candidate may have.
        modules: Module paths to search; by default the residual writers (o and down projections).
        top_k: Candidates returned.
        batch_size: Sequences per forward pass.

    Raises:
        VpdError: Bad triggers, triggers that never occur in `ids`, or an unknown module.
    """
    triggers = torch.tensor(_trigger_ids(tokenizer, trigger_token_ids))
    if modules is None:
        modules = [p for p in d.module_paths if module_short_name(p)[2] in RESIDUAL_WRITERS]
    unknown = [p for p in modules if p not in d.module_paths]
    if unknown:
        raise VpdError(f"`modules` names {unknown[0]!r}, which is not decomposed; use paths from `d.module_paths`.")
    is_trigger = torch.isin(ids, triggers)  # (batch, seq)
    n_trigger = int(is_trigger.sum())
    if n_trigger == 0:
        raise VpdError("`trigger_token_ids` never occur in `ids`; pass text that contains them.")
    fired = {p: torch.zeros(d.Cs[p], dtype=torch.long) for p in modules}
    on_trigger = {p: torch.zeros(d.Cs[p], dtype=torch.long) for p in modules}
    for chunk, trig in zip(ids.split(batch_size), is_trigger.split(batch_size), strict=True):
        g = d.network_ci(chunk)
        for p in modules:
            fire = (g[p] > threshold).cpu()  # (batch, seq, C)
            fired[p] += fire.sum((0, 1))
            on_trigger[p] += (fire & trig[..., None]).sum((0, 1))
    N = ids.numel()
    found = []
    for p in modules:
        for c in torch.nonzero(on_trigger[p]).flatten().tolist():
            F_c, n_ct = int(fired[p][c]), int(on_trigger[p][c])
            if F_c / N <= max_density:
                found.append(TokenSpecific(component_key(p, c), p, c, n_ct / n_trigger, n_ct / F_c, F_c / N, F_c, n_ct))
    found.sort(key=lambda s: (-s.precision, -s.recall, s.density, s.key))
    return found[:top_k]


@dataclass
class EditStudy:
    """Everything `edit_study` measured; `model` is the edited model at `alpha`."""

    model: nn.Module
    key: str
    module: str
    index: int
    token: str
    token_id: int
    alpha: float
    sign: int
    mean_activation: float
    metrics: EditMetrics
    sweep: list[EditPoint] = field(default_factory=list)
    lora: list[LoraPoint] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def resolve_edit(d: Decomposition, tokenizer: PreTrainedTokenizerBase, key: str, token: str) -> tuple[str, int, int]:
    """(module path, c, token id) of an unembedding edit, checked before any text is read.

    Raises:
        VpdError: An unknown `key`, a matrix that does not write to the residual stream, or a `token` that is not
            one token.
    """
    path, c = resolve_component(d.Cs, key)
    block, _, short = module_short_name(path)
    if short not in RESIDUAL_WRITERS:
        raise VpdError(
            f"`component` {key!r} is in a {short} matrix, whose output is not the residual stream; pick an o or down "
            f"subcomponent such as {block}.mlp.down:{c}."
        )
    return path, c, token_id_of(tokenizer, token)


def edit_study(
    d: Decomposition,
    tokenizer: PreTrainedTokenizerBase,
    key: str,
    token: str,
    *,
    alpha: float,
    eval_ids: Tensor,
    sweep: Sequence[float] = (),
    threshold: float = 0.1,
    window: int = 20,
    lora_ids: Tensor | None = None,
    lora: LoraSweep | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> EditStudy:
    """Edit subcomponent `key` toward `token` and measure it on held-out `eval_ids` (batch, seq).

    σ comes from the firing positions (CI > `threshold`) of `eval_ids`. With `sweep`, every α in it is measured
    too; with `lora_ids`, LoRA adapters on the same matrix are trained on windows around firings in `lora_ids`
    (every n × λ × rank of `lora`, default `LoraSweep()`; see `circuits.edit.lora.lora_sweep`) and measured on
    `eval_ids`.

    Raises:
        VpdError: An unknown or non-residual `key`, a `token` that is not one token, or a subcomponent that never
            fires in `eval_ids`.
    """
    path, c, token_id = resolve_edit(d, tokenizer, key, token)
    target = d.model.target
    g, acts = component_activity(d, path, c, eval_ids, batch_size=batch_size)
    firing = g > threshold
    if not firing.any():
        raise VpdError(
            f"`component` {key!r} never fires (CI > {threshold}) on the {eval_ids.numel():,} held-out tokens; pick "
            "another subcomponent or lower `threshold`."
        )
    sign = activation_sign(acts, firing)
    u_hat = unembedding_direction(target, token_id)

    def measure(a: float) -> tuple[nn.Module, EditMetrics]:
        edited = edit_write_vector(d, key, u_hat, a, sign=sign)
        return edited, edit_metrics(target, edited, eval_ids, firing, token_id, window, batch_size=batch_size)

    model, metrics = measure(alpha)
    points = [EditPoint(a, metrics if a == alpha else measure(a)[1]) for a in sweep]
    lora_points = []
    if lora_ids is not None:
        from circuits.edit.lora import LoraSweep, lora_sweep

        lora = LoraSweep() if lora is None else lora
        g_train, _ = component_activity(d, path, c, lora_ids, batch_size=batch_size)
        lora_points = lora_sweep(
            lora.ns,
            lora.lambdas,
            target=target,
            module=path,
            train_ids=lora_ids,
            train_firing=g_train > threshold,
            eval_ids=eval_ids,
            eval_firing=firing,
            token_id=token_id,
            ranks=lora.ranks,
            window=window,
            steps=lora.steps,
            progress=progress,
        )
    return EditStudy(
        model=model,
        key=component_key(path, c),
        module=path,
        index=c,
        token=token,
        token_id=token_id,
        alpha=alpha,
        sign=sign,
        mean_activation=float(acts[firing].double().mean()),
        metrics=metrics,
        sweep=points,
        lora=lora_points,
        settings={
            "threshold": threshold,
            "window": window,
            "eval_tokens": eval_ids.numel(),
            "seq_len": eval_ids.shape[1],
        },
    )


def heldout_windows(
    d: Decomposition, tokenizer: PreTrainedTokenizerBase, *, eval_tokens: int = 4096, lora_tokens: int = 0
) -> tuple[Tensor, Tensor | None]:
    """Held-out windows (`run_heldout_windows`): about `eval_tokens` to evaluate on, then the next windows,
    about `lora_tokens`, to cut LoRA training windows from (None when 0); the two parts share no window.

    Raises:
        VpdError: No held-out text is available, or too little is left for the LoRA part.
    """
    from decomposer.vpd.batches import heldout_seq_len, run_heldout_windows

    cfg = d.config
    seq_len = heldout_seq_len(cfg, d.model.target)
    n_eval = max(1, math.ceil(eval_tokens / seq_len))
    n_lora = math.ceil(lora_tokens / seq_len) if lora_tokens > 0 else 0
    windows = run_heldout_windows(cfg, tokenizer, target=d.model.target, n_windows=n_eval + n_lora)
    eval_ids = windows[:n_eval]
    if lora_tokens <= 0:
        return eval_ids, None
    lora_ids = windows[n_eval:]
    if len(lora_ids) == 0:
        raise VpdError(
            f"The held-out text has {windows.numel():,} tokens, all used for evaluation, so none is left for LoRA "
            "training; lower `eval_tokens`."
        )
    return eval_ids, lora_ids
