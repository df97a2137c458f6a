"""Interventions on a decomposition: ablate, keep, rescale or replace subcomponents (docs/attribution-graphs.md §3, §5).

A *site* is subcomponent c of one decomposed matrix, at every position or at one position t. Strings name
it by its `ComponentKey`, `{block}.{attn|mlp}.{matrix}:{c}` or `...:{c}@{t}` (e.g. `1.attn.q:31`,
`2.mlp.down:17@3`, the form graph labels show); canonical ids `comp/{module}/{c}@{t}` and `NodeId`s work
too. Other graph nodes (embeddings, logits, deltas) are skipped where a whole graph may be passed.

Kinds of `Intervention`, with a_c = x·v_c the activation and u_c the write vector of subcomponent c:

| kind     | a_c becomes                                                                      |
|----------|----------------------------------------------------------------------------------|
| zero     | 0                                                                                |
| scale    | s·a_c                                                                            |
| mean     | the mean of a_c over every token of a reference batch (clean target forward)     |
| resample | a_c on one reference token, drawn uniformly per (row, position) and shared by    |
|          | every listed subcomponent, so the replacement is one coherent other token        |

Two implementations of one algebra. With masks m, all other masks 1 and Δ on, a matrix outputs
W x + Σ_c (m_c − 1)·a_c·u_c. `ablate` runs zero (m = 0) and scale (m = s) through the masked forward
`d.model(ids, masks=..., delta_masks=...)`, as §3 defines them. A replacement value that is not a multiple
of a_c (mean, resample) cannot be a mask, so it is a forward hook on the target's module that adds
Σ_c (a'_c − a_c)·u_c to its output; `intervene` uses such hooks for every kind, because only hooks work on
a plain HF call (`model(ids)`, `model.generate`, a KV cache). The hooks must not be combined with
`d.model(..., masks=...)`, whose own hooks replace the module output and would drop the correction.

A resample draw depends only on (seed, row, absolute position), so a full forward and incremental
generation with a KV cache replace the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from attrgraph.nodes import ComponentKey, NodeId
from circuits.readout import InterventionResult, intervention_result
from decomposer.errors import VpdError
from decomposer.vpd.components import as_token_grid, token_shape
from decomposer.vpd.run import Decomposition

Kind = Literal["zero", "mean", "resample", "scale"]
KINDS = ("zero", "mean", "resample", "scale")
_DRAW_CHUNK = 1024  # resample draws per (row, chunk of positions); see `_draw_indices`


class Site(NamedTuple):
    """Subcomponent `index` of the matrix at `path`, at position `pos` (None: every position)."""

    path: str
    index: int
    pos: int | None


@dataclass(frozen=True)
class Intervention:
    """What to do to which subcomponents.

    Attributes:
        nodes: Sites as strings (`1.attn.q:31`, `1.attn.q:31@4`, `comp/{module}/{c}@{t}`) or `NodeId`s.
        kind: zero, mean, resample or scale.
        scale: The factor s of kind `scale`.
        reference: (R, T_ref) token ids of the reference batch of kinds `mean` and `resample`.
        seed: Seeds the resample draws.

    Raises:
        VpdError: An unknown kind, a missing or superfluous `scale`, or a missing or malformed `reference`.
    """

    nodes: tuple[str | NodeId, ...]
    kind: Kind = "zero"
    scale: float | None = None
    reference: Tensor | None = field(default=None, repr=False)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", (self.nodes,) if isinstance(self.nodes, str | NodeId) else tuple(self.nodes))
        if self.kind not in KINDS:
            raise VpdError(f"`kind` must be one of {', '.join(KINDS)}; got {self.kind!r}.")
        if (self.kind == "scale") != (self.scale is not None):
            raise VpdError(
                f"`scale` is required with kind 'scale' and only then; got kind {self.kind!r}, scale {self.scale!r}."
            )
        if self.scale is not None and not math.isfinite(self.scale):
            raise VpdError(f"`scale` must be a finite number; got {self.scale!r}.")
        needs_ref = self.kind in ("mean", "resample")
        ref = self.reference
        if needs_ref and (not isinstance(ref, Tensor) or ref.ndim != 2 or ref.dtype != torch.long or ref.numel() == 0):
            got = tuple(ref.shape) if isinstance(ref, Tensor) else type(ref).__name__
            raise VpdError(
                f"`reference` must be a non-empty (R, T) LongTensor of token ids for kind {self.kind!r}; got {got}."
            )
        if not needs_ref and ref is not None:
            raise VpdError(f"`reference` is used by kinds mean and resample only; got it with kind {self.kind!r}.")


def _matrices(d: Decomposition) -> dict[str, str]:
    """Short matrix name (`1.attn.q`) → module path."""
    return {ComponentKey.of(p, 0).matrix: p for p in d.module_paths}


def resolve_sites(
    d: Decomposition, nodes: Iterable[str | NodeId], *, seq_len: int | None = None, name: str = "nodes"
) -> list[Site]:
    """Parse and check sites against the decomposition (and the prompt length, when given).

    Args:
        d: The decomposition.
        nodes: Site strings or `NodeId`s; emb, logit and delta nodes are skipped.
        seq_len: Positions must be below this; None checks against the model's context only.
        name: The argument name used in error messages (e.g. `--nodes`).

    Returns:
        One `Site` per subcomponent node, in input order.

    Raises:
        VpdError: A malformed node, an unknown matrix, an index ≥ C or a position out of range.
    """
    nodes = [nodes] if isinstance(nodes, str | NodeId) else nodes
    matrices = _matrices(d)
    limit = seq_len if seq_len is not None else getattr(d.model.target.config, "max_position_embeddings", None)
    sites = []
    for node in nodes:
        text = str(node)
        if isinstance(node, str) and node.startswith(("comp/", "emb@", "logit/", "delta/")):
            node = NodeId.parse(node)
        if isinstance(node, NodeId):
            if node.kind != "comp":
                continue
            if node.module not in d.Cs:
                raise VpdError(
                    f"`{name}` entry {text!r} names module {node.module!r}, which is not decomposed; "
                    f"use one of {', '.join(list(matrices.values())[:5])} (all of `d.module_paths`)."
                )
            key = ComponentKey.of(node.module, node.index, node.pos)
        else:
            key = ComponentKey.parse(node, subject=f"`{name}` entry {text!r}")
        path, index, pos = key.resolve(d.Cs, subject=f"`{name}` entry {text!r}"), key.index, key.pos
        if pos is not None and limit is not None and pos >= limit:
            where = "the prompt has" if seq_len is not None else "the model's context is"
            raise VpdError(
                f"`{name}` entry {text!r} has position {pos}, but {where} {limit} tokens; use 0..{limit - 1}."
            )
        sites.append(Site(path, index, pos))
    return sites


def check_ids(d: Decomposition, ids: Tensor) -> Tensor:
    """`ids` on the model's device after checking it is a non-empty (B, T) LongTensor in the vocabulary."""
    if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.dtype != torch.long or ids.numel() == 0:
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
        raise VpdError(f"`ids` must be a non-empty (B, T) LongTensor of token ids; got {got}.")
    vocab = d.model.target.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise VpdError(f"`ids` must be token ids in [0, {vocab}); got values in [{int(ids.min())}, {int(ids.max())}].")
    return ids.to(d.model_device)


def _check_overlap(sites: Sequence[Site]) -> None:
    seen: dict[tuple[str, int], set[int | None]] = {}
    for site in sites:
        taken = seen.setdefault((site.path, site.index), set())
        if site.pos in taken or (taken and (site.pos is None or None in taken)):
            raise VpdError(
                f"Subcomponent {site.index} of {site.path} is listed twice at overlapping positions; "
                "list each (subcomponent, position) once."
            )
        taken.add(site.pos)


def logits_of(out: Any) -> Tensor:
    """The logits of an HF output object, or the tensor itself."""
    return out.logits if hasattr(out, "logits") else out


# ---------------------------------------------------------------- hooks -----------------------------------


class _Bound(NamedTuple):
    """An `Intervention` resolved on one decomposition.

    `ref_acts` maps a path to its reference activations: (R·T_ref, C) for resample, their mean (1, C) for mean.
    """

    kind: Kind
    sites: list[Site]
    scale: float | None
    ref_acts: dict[str, Tensor]
    seed: int


def _bind(d: Decomposition, interventions: Intervention | Sequence[Intervention], seq_len: int | None) -> list[_Bound]:
    items = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    bound = []
    for iv in items:
        if not isinstance(iv, Intervention):
            raise VpdError(f"`interventions` must hold `Intervention`s; got {type(iv).__name__}.")
        sites = resolve_sites(d, iv.nodes, seq_len=seq_len)
        ref_acts = {}
        if iv.reference is not None:
            ref = check_ids(d, iv.reference)
            with torch.no_grad():  # the clean target: reference values never see another intervention
                _, xs = d.model.forward_with_inputs(ref)
                for path in {s.path for s in sites}:
                    acts = d.model.components(path).component_acts(xs[path])
                    acts = acts.reshape(-1, acts.shape[-1])  # (R·T_ref, C), one row per reference token
                    ref_acts[path] = acts.mean(0, keepdim=True) if iv.kind == "mean" else acts
        bound.append(_Bound(iv.kind, sites, iv.scale, ref_acts, iv.seed))
    _check_overlap([s for b in bound for s in b.sites])
    return bound


def _draw_indices(seed: int, rows: int, positions: Tensor, n_ref: int) -> Tensor:
    """(rows, T) reference-token indices; entry (b, t) depends only on (seed, b, positions[t]).

    Each (row, block of `_DRAW_CHUNK` positions) has its own generator, so a forward over positions 0..T−1
    and a KV-cached step at position T−1 read the same draw.
    """
    positions = positions.cpu()
    block = positions // _DRAW_CHUNK
    out = torch.empty(rows, len(positions), dtype=torch.long)
    for b in range(rows):
        for j in block.unique().tolist():
            gen = torch.Generator().manual_seed((seed * 1_000_003**2 + b * 1_000_003 + j) % 2**63)
            table = torch.randint(n_ref, (_DRAW_CHUNK,), generator=gen)
            out[b, block == j] = table[positions[block == j] % _DRAW_CHUNK]
    return out


def _cache_length(args: tuple, kwargs: dict) -> int:
    """Tokens already in the KV cache passed to a forward call (0 without one).

    The cache is found by what it is, not by its keyword: transformers < 5.24 passes it as `past_key_values`,
    5.24 and later as `cache`, and older releases also passed `cache_position`, which newer ones dropped.
    """
    for value in (*kwargs.values(), *args):
        if hasattr(value, "get_seq_length"):
            return int(value.get_seq_length())
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    return 0


class _Positions:
    """Absolute positions of the current forward, set by a pre-hook on the target (KV caches shift them)."""

    def __init__(self) -> None:
        self.offset: int | None = None
        self.seen: dict[str, Any] = {"tokens": None}  # (B, T) of the forward, for inputs that arrive flattened

    def pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.offset = _cache_length(args, kwargs)

    def post(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        self.offset = None

    def of(self, T: int, device: torch.device) -> Tensor:
        # A call that bypasses the target's own forward (e.g. its inner model) starts at 0.
        return torch.arange(T, device=device) + (self.offset or 0)


def _make_hook(d: Decomposition, b: _Bound, path: str, state: _Positions) -> Any:
    comp = d.model.components(path)
    sites = [s for s in b.sites if s.path == path]
    cols = torch.tensor([s.index for s in sites], device=comp.V.device)
    at = torch.tensor([-1 if s.pos is None else s.pos for s in sites], device=comp.V.device)

    def hook(module: Any, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        x = as_token_grid(args[0] if args else next(iter(kwargs.values())), state.seen["tokens"])
        T = x.shape[-2]
        positions = state.of(T, x.device)
        a = x.to(comp.V.dtype) @ comp.V[:, cols]  # (..., T, k)
        if b.kind == "zero":
            new = torch.zeros_like(a)
        elif b.kind == "scale":
            new = b.scale * a
        elif b.kind == "mean":
            new = b.ref_acts[path][0, cols].expand_as(a)
        else:
            rows = x.reshape(-1, T, x.shape[-1]).shape[0]
            idx = _draw_indices(b.seed, rows, positions, b.ref_acts[path].shape[0]).to(x.device)
            new = b.ref_acts[path][:, cols][idx].reshape(a.shape)  # (rows, T, k) from one token per (b, t)
        applies = (at < 0) | (positions[:, None] == at[None, :])  # (T, k)
        return output + (((new - a) * applies) @ comp.U[cols]).to(output.dtype).reshape(output.shape)

    return hook


@contextmanager
def intervene(
    d: Decomposition, interventions: Intervention | Sequence[Intervention], *, seq_len: int | None = None
) -> Iterator[None]:
    """Run ordinary calls of `d.model.target` (`model(ids)`, `model.generate`) under the interventions.

    Forward hooks on the decomposed modules add Σ_c (a'_c − a_c)·u_c to their outputs; they are removed on
    exit, also when the body raises. Reference activations are computed once, on entry, from the clean target.

    Args:
        d: The decomposition whose target is hooked.
        interventions: One or several; two may not name the same subcomponent at overlapping positions.
        seq_len: If given, positions of sites must be below it.

    Raises:
        VpdError: Bad sites, overlapping interventions or a bad reference batch.
    """
    bound = _bind(d, interventions, seq_len)
    target, state, handles = d.model.target, _Positions(), []
    with token_shape(target) as state.seen:
        try:
            handles.append(target.register_forward_pre_hook(state.pre, with_kwargs=True))
            handles.append(target.register_forward_hook(state.post, with_kwargs=True))
            for b in bound:
                for path in dict.fromkeys(s.path for s in b.sites):
                    module = target.get_submodule(path)
                    handles.append(module.register_forward_hook(_make_hook(d, b, path, state), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()


def generate_ids(
    d: Decomposition,
    ids: Tensor,
    interventions: Intervention | Sequence[Intervention] = (),
    *,
    max_new_tokens: int,
    **generate_kwargs: Any,
) -> Tensor:
    """Greedy `generate` of the target under `interventions`; returns (B, T + new) token ids.

    Raises:
        VpdError: Bad `ids`, `max_new_tokens` < 1, or bad interventions.
    """
    ids = check_ids(d, ids)
    if max_new_tokens < 1:
        raise VpdError(f"`max_new_tokens` must be at least 1; got {max_new_tokens}.")
    with torch.no_grad(), intervene(d, interventions):
        return d.model.target.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs
        )


def generate(
    d: Decomposition,
    tokenizer: Any,
    prompt: str,
    interventions: Intervention | Sequence[Intervention] = (),
    max_new_tokens: int = 20,
) -> str:
    """The greedy continuation of `prompt` (tokenized without special tokens) under `interventions`.

    Raises:
        VpdError: An empty prompt, `max_new_tokens` < 1, or bad interventions.
    """
    if not prompt.strip():
        raise VpdError("`prompt` is empty. Pass the text to continue, e.g. 'The princess lost'.")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = generate_ids(d, ids, interventions, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, ids.shape[1] :].tolist())


# ---------------------------------------------------------------- ablate / keep_only -----------------------


def _site_masks(d: Decomposition, sites: Sequence[Site], B: int, T: int, fill: float, value: float) -> dict:
    """Path → (B, T, C) masks equal to `fill` except `value` at the sites."""
    dtype, device = d.model.components(d.module_paths[0]).V.dtype, d.model_device
    masks = {p: torch.full((B, T, C), fill, dtype=dtype, device=device) for p, C in d.Cs.items()}
    for s in sites:
        masks[s.path][:, slice(None) if s.pos is None else s.pos, s.index] = value
    return masks


def ablate(
    d: Decomposition,
    ids: Tensor,
    nodes: Iterable[str | NodeId],
    kind: Kind = "zero",
    *,
    scale: float | None = None,
    reference: Tensor | None = None,
    seed: int = 0,
    drop_delta: Iterable[str] = (),
    target_pos: int | Sequence[int] | None = None,
    target_token: int | Sequence[int] | None = None,
) -> InterventionResult:
    """Ablate the listed subcomponents; every other mask is 1 and the delta is on (§3).

    zero and scale run the masked forward (mask 0 or s at the sites); mean and resample run the target
    under `intervene` (see the module docstring).

    Args:
        d: The decomposition.
        ids: (B, T) token ids.
        nodes: Sites; a site without a position acts at every position.
        kind: zero, mean, resample or scale.
        scale: s for kind scale.
        reference: (R, T_ref) token ids for kinds mean and resample.
        seed: Seeds the resample draws.
        drop_delta: Matrices (`1.attn.q` or module paths) whose delta is left out; zero and scale only.
        target_pos: t*, one or one per row; the last position when only `target_token` is given.
        target_token: y*, one or one per row; the target's top token at t* when only `target_pos` is given.

    Returns:
        Logits, the target's logits, KL per position and, with a target, P(y*) before and after.

    Raises:
        VpdError: Bad ids, sites, kind, scale, reference, matrices in `drop_delta`, or read-out.
    """
    ids = check_ids(d, ids)
    B, T = ids.shape
    iv = Intervention(nodes, kind, scale, reference, seed)
    sites = resolve_sites(d, iv.nodes, seq_len=T)
    _check_overlap(sites)
    dropped = set()
    for m in [drop_delta] if isinstance(drop_delta, str) else drop_delta:
        path = m if m in d.Cs else _matrices(d).get(m)
        if path is None:
            raise VpdError(
                f"`drop_delta` entry {m!r} is not a decomposed matrix; use e.g. {', '.join(list(_matrices(d))[:3])}."
            )
        dropped.add(path)
    if dropped and kind in ("mean", "resample"):
        raise VpdError(f"`drop_delta` works with kinds zero and scale (the masked forward), not {kind!r}.")
    with torch.no_grad():
        target_logits = logits_of(d.model.target(ids))
        if kind in ("zero", "scale"):
            masks = _site_masks(d, sites, B, T, 1.0, 0.0 if kind == "zero" else float(scale))
            deltas = {p: torch.ones_like(m[..., 0]) for p, m in masks.items() if p not in dropped}
            logits = logits_of(d.model(ids, masks=masks, delta_masks=deltas))
        else:
            with intervene(d, iv, seq_len=T):
                logits = logits_of(d.model.target(ids))
    return intervention_result(target_logits, logits, target_pos, target_token)


def keep_only(
    d: Decomposition,
    ids: Tensor,
    nodes: Iterable[str | NodeId],
    *,
    keep_delta: bool = False,
    target_pos: int | Sequence[int] | None = None,
    target_token: int | Sequence[int] | None = None,
) -> InterventionResult:
    """Run only the listed subcomponents: their masks are 1, every other mask 0, the delta off (§3).

    Args:
        d: The decomposition.
        ids: (B, T) token ids.
        nodes: Sites; a site without a position is kept at every position.
        keep_delta: Keep every matrix's delta (mask 1), as a check that all sites listed equals the target.
        target_pos: t*, as in `ablate`.
        target_token: y*, as in `ablate`.

    Raises:
        VpdError: Bad ids, sites or read-out.
    """
    ids = check_ids(d, ids)
    B, T = ids.shape
    sites = resolve_sites(d, nodes, seq_len=T)
    with torch.no_grad():
        target_logits = logits_of(d.model.target(ids))
        masks = _site_masks(d, sites, B, T, 0.0, 1.0)
        deltas = {p: torch.ones_like(m[..., 0]) for p, m in masks.items()} if keep_delta else None
        logits = logits_of(d.model(ids, masks=masks, delta_masks=deltas))
    return intervention_result(target_logits, logits, target_pos, target_token)
