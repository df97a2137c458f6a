"""Phase 1 of `attrgraph.pipeline` and the candidate nodes of phase 4, before any edge is computed.

The prompt's checks (`check_prompt`, `check_model_prompt`, `resolve_prompt`: empty, context, one-token target,
position), the checked inputs (`check_tokens`, `prepare_inputs`: token ids, read-out position, CI), the logit
tokens (`choose_logit_tokens`), and the node table of every emb, alive comp, delta and logit node with the
index tensors that turn leaf gradients into rows of A (`CandidateNodes`, `attrgraph.edges` steps 1–2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from attrgraph.leaves import LeafRecord
from attrgraph.nodes import KINDS
from attrgraph.settings import DEFAULTS, GraphSettings
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition


def check_tokens(d: Decomposition, tokens: Tensor, target_pos: int | None) -> tuple[Tensor, int]:
    """A prompt's token ids and read-out position, checked: (tokens (1, t* + 1) on the model's device, t*).

    The ids are cut after t*, since later tokens cannot affect it; a missing t* is the last position.
    Both the edge pass (`prepare_inputs`) and the per-prompt CI fit (`attrgraph.optimize`) check through here.

    Raises:
        VpdError: `tokens` is not a non-empty integer tensor of shape (T,) or (1, T), or t* is outside it.
    """
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] != 1 or tokens.shape[1] == 0 or tokens.is_floating_point():
        raise VpdError(f"`tokens` must be an integer tensor of shape (T,) or (1, T); got {tuple(tokens.shape)}.")
    T = tokens.shape[1]
    target_pos = T - 1 if target_pos is None else target_pos
    if not 0 <= target_pos < T:
        raise VpdError(f"`target_pos` must be in [0, {T - 1}] for a {T}-token prompt; got {target_pos}.")
    return tokens[:, : target_pos + 1].to(d.model_device), target_pos


def prepare_inputs(
    d: Decomposition, tokens: Tensor, target_pos: int | None, logit_tokens: Sequence[int] | None, ci: Any
) -> tuple[Tensor, int, list[int] | None, dict[str, Tensor], Tensor | None]:
    """Checked (tokens, t*, logit tokens, CI, P(· at t*)); runs the model only when the CI or the tokens are missing."""
    tokens, target_pos = check_tokens(d, tokens, target_pos)
    probs = None
    if ci is None or logit_tokens is None:
        with torch.no_grad():
            out, xs = d.model.forward_with_inputs(tokens)
            probs = out.logits[0, target_pos].double().softmax(-1)
            if ci is None:
                ci = {p: g[0] for p, g in d.causal_importance(xs)[0].items()}
        if logit_tokens is None:
            logit_tokens = choose_logit_tokens(probs)
    if set(ci) != set(d.module_paths):
        raise VpdError(f"`ci` must have one entry per decomposed module, {d.module_paths}; got {sorted(ci)}.")
    ci = {p: (g[0] if g.ndim == 3 else g)[: target_pos + 1].detach().to(d.model_device) for p, g in ci.items()}
    for p, g in ci.items():
        if g.shape != (target_pos + 1, d.Cs[p]):
            raise VpdError(f"`ci[{p!r}]` must be (T, {d.Cs[p]}) or (1, T, {d.Cs[p]}); got {tuple(g.shape)}.")
    return tokens, target_pos, list(logit_tokens), ci, probs


def choose_logit_tokens(probs: Tensor, label: int | None = None, settings: GraphSettings = DEFAULTS) -> list[int]:
    """The logit nodes' tokens: the label (default: the likeliest token) first, then the likeliest tokens until
    their cumulative probability reaches `settings.logit_prob`, `settings.max_logits` at most."""
    label = int(probs.argmax()) if label is None else label
    tokens, mass = [label], 0.0
    for tok in probs.argsort(descending=True).tolist():
        if len(tokens) >= settings.max_logits or mass >= settings.logit_prob:
            break
        mass += float(probs[tok])
        if tok != label:
            tokens.append(tok)
    return tokens


class CandidateNodes:
    """Node table of every candidate node plus the index tensors that turn leaf gradients into rows of A."""

    def __init__(self, d: Decomposition, T: int, target_pos: int, logit_tokens: list[int], ci: dict[str, Tensor]):
        self.paths = d.module_paths
        device = d.model_device
        ar = torch.arange(T, device=device)
        neg = torch.full((T,), -1, dtype=torch.long, device=device)
        kinds, pos, module, index = [torch.zeros(T, dtype=torch.int8, device=device)], [ar], [neg], [neg]
        self.comp_idx: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # path → (t, c, node index)
        n = T
        for j, p in enumerate(self.paths):
            t_idx, c_idx = (ci[p] > 0).nonzero(as_tuple=True)
            self.comp_idx[p] = (t_idx, c_idx, torch.arange(n, n + len(t_idx), device=device))
            n += len(t_idx)
            kinds.append(torch.full_like(t_idx, KINDS.index("comp"), dtype=torch.int8))
            pos.append(t_idx)
            module.append(torch.full_like(t_idx, j))
            index.append(c_idx)
        self.delta_start = {}
        for j, p in enumerate(self.paths):
            self.delta_start[p] = n
            n += T
            kinds.append(torch.full((T,), KINDS.index("delta"), dtype=torch.int8, device=device))
            pos.append(ar)
            module.append(torch.full((T,), j, dtype=torch.long, device=device))
            index.append(neg)
        self.logit_start = n
        L = len(logit_tokens)
        kinds.append(torch.full((L,), KINDS.index("logit"), dtype=torch.int8, device=device))
        pos.append(torch.full((L,), target_pos, dtype=torch.long, device=device))
        module.append(torch.full((L,), -1, dtype=torch.long, device=device))
        index.append(torch.tensor(logit_tokens, dtype=torch.long, device=device))
        self.kind, self.pos, self.module, self.index = (torch.cat(x) for x in (kinds, pos, module, index))
        self.n = n + L
        self.T, self.target_pos, self.logit_tokens, self.ci = T, target_pos, logit_tokens, ci

    def comp_nodes(self) -> Tensor:
        return (self.kind == KINDS.index("comp")).nonzero().squeeze(1)

    def logit_nodes(self) -> Tensor:
        return torch.arange(self.logit_start, self.n, device=self.kind.device)

    def alive(self) -> dict[str, Tensor]:
        """Path → (T, C) mask of the comp nodes; leaf columns then follow the node order of `comp_idx`."""
        return {p: self.ci[p] > 0 for p in self.paths}

    def bind(self, rec: LeafRecord, weight_by_ci: bool) -> None:
        """Find each comp node's column in its module's leaf and its edge factor a_s (· g_s), once per forward."""
        self.cols: dict[str, Tensor | None] = {}
        self.weight: dict[str, Tensor] = {}
        for p in self.paths:
            t_idx, c_idx, _ = self.comp_idx[p]
            leaf_t, leaf_c = rec.comp_index[p]
            col_of = torch.full(self.ci[p].shape, -1, dtype=torch.long, device=leaf_t.device)
            col_of[leaf_t, leaf_c] = torch.arange(len(leaf_t), device=leaf_t.device)
            cols = col_of[t_idx, c_idx]
            if bool((cols < 0).any()):  # cannot happen for leaves made from `alive()` or for alive=None
                raise RuntimeError(f"the leaves of {p!r} lack some comp nodes of the graph")
            weight = rec.comp_leaves[p][0, cols].detach()
            self.weight[p] = weight * self.ci[p][t_idx, c_idx].to(weight) if weight_by_ci else weight
            # Leaves made from the graph's own alive masks hold exactly its comp nodes, in order.
            same = len(cols) == len(leaf_t) and torch.equal(cols, torch.arange(len(cols), device=cols.device))
            self.cols[p] = None if same else cols

    def source_rows(self, rec: LeafRecord, grads: Sequence[Tensor | None], out: Tensor) -> None:
        """Write the edge weights from every source node for the targets of copies 0..k-1 into `out` (k, n).

        `bind` must have run on `rec`. `out` must hold zeros: a leaf the targets do not reach has no gradient
        (None) and is skipped.
        """
        k = out.shape[0]
        grad_of = {id(leaf): g for leaf, g in zip(rec.leaves(), grads, strict=True)}
        if (g := grad_of[id(rec.emb)]) is not None:
            out[:, : self.T] = (g[:k] * rec.emb[0].detach()).sum(-1)
        for p in self.paths:
            ids, cols = self.comp_idx[p][2], self.cols[p]
            if (g := grad_of[id(rec.comp_leaves[p])]) is not None and len(ids):
                g = g[:k] if cols is None else g[:k, cols]
                out[:, int(ids[0]) : int(ids[-1]) + 1] = g * self.weight[p]  # a path's comp nodes are consecutive
            delta = rec.delta_leaves[p]
            if (g := grad_of[id(delta)]) is not None:
                out[:, self.delta_start[p] : self.delta_start[p] + self.T] = (g[:k] * delta[0].detach()).sum(-1)

    def activation_and_ci(self, rec: LeafRecord, logits: Tensor) -> tuple[Tensor, Tensor]:
        act = logits.new_zeros(self.n)
        ci = logits.new_ones(self.n)
        act[: self.T] = rec.emb[0].detach().norm(dim=-1)
        for p in self.paths:
            t_idx, c_idx, ids = self.comp_idx[p]
            act[ids] = rec.acts[p][0, t_idx, c_idx].detach()
            ci[ids] = self.ci[p][t_idx, c_idx].to(ci)
            act[self.delta_start[p] : self.delta_start[p] + self.T] = rec.delta_leaves[p][0].detach().norm(dim=-1)
        act[self.logit_start :] = logits[0, -1, self.logit_tokens].detach()  # -1 is t*: the prompt ends there
        return act, ci


def check_prompt(
    d: Decomposition,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target_token: str | None,
    target_pos: int | None,
) -> tuple[Tensor, int, int | None]:
    """Check a prompt and its read-out without running the model: (token ids (1, T), t*, label id or None).

    Raises:
        VpdError: An empty prompt, a prompt longer than the context, a target that is not one token, or a
            position out of range.
    """
    return check_model_prompt(d.model.target, tokenizer, prompt, target_token, target_pos)


def check_model_prompt(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target_token: str | None,
    target_pos: int | None,
) -> tuple[Tensor, int, int | None]:
    """`check_prompt` against a model without a decomposition (its config gives the context)."""
    if not prompt.strip():
        raise VpdError("`prompt` is empty. Pass the text to explain, e.g. 'The princess lost her'.")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    T = ids.shape[1]
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and T > context:
        raise VpdError(
            f"`prompt` is {T} tokens, longer than the model's context of {context}; shorten it to {context} tokens."
        )
    if target_pos is None:
        target_pos = T - 1
    if not -T <= target_pos < T:
        raise VpdError(f"`target_pos` {target_pos} is out of range for a {T}-token prompt; use 0..{T - 1}.")
    target_pos %= T
    label_id = None
    if target_token is not None:
        label_ids = tokenizer(target_token, add_special_tokens=False)["input_ids"]
        if len(label_ids) != 1:
            raise VpdError(
                f"`target_token` {target_token!r} is {len(label_ids)} tokens, not one. Pass a single token "
                "such as ' her' (mind the leading space)."
            )
        label_id = label_ids[0]
    return ids, target_pos, label_id


def resolve_prompt(
    d: Decomposition,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target_token: str | None,
    target_pos: int | None,
) -> tuple[Tensor, int, int, Tensor]:
    """Check a prompt and its read-out: (token ids (1, T), t*, label id, P(next token) at t* under the target).

    Raises:
        VpdError: As `check_prompt`.
    """
    ids, target_pos, label_id = check_prompt(d, tokenizer, prompt, target_token, target_pos)
    with torch.no_grad():
        logits = d.model.target(ids[:, : target_pos + 1].to(d.model_device)).logits[0, target_pos]
    probs = torch.softmax(logits.double(), -1).cpu()
    return ids, target_pos, int(probs.argmax()) if label_id is None else label_id, probs
