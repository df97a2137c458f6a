"""Interventions on a model without a decomposition: attention heads and MLP neurons.

A *unit* is one attention head or one MLP neuron of one block, at every position or at one position t:

| unit                          | what is scaled                                                            |
|-------------------------------|---------------------------------------------------------------------------|
| `{block}.attn.head:{h}[@t]`   | head h's slice of the attention output matrix's input (o_proj's x): the  |
|                               | head's whole contribution to the residual stream                          |
| `{block}.mlp.neuron:{i}[@t]`  | hidden unit i, the input of the MLP output matrix (down_proj's x)         |

Kinds: `zero` (factor 0) and `scale` (factor s). The matrices come from the family's adapter
(`decomposer.architectures`: role `o` and role `down`), so every supported family works; a forward
pre-hook multiplies the selected columns of the matrix's input, so plain calls, `generate` and a KV cache
all see the intervention (positions are absolute, read from the cache length as in `circuits.interventions`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from circuits.interventions import _cache_length, logits_of
from circuits.readout import InterventionResult, intervention_result
from decomposer.architectures import architecture_of, attention_spec
from decomposer.errors import VpdError
from decomposer.vpd.components import as_token_grid, token_shape

UNIT_KINDS = ("zero", "scale")
_UNIT = re.compile(r"(\d+)\.(attn\.head|mlp\.neuron):(\d+)(?:@(\d+))?")


class Unit(NamedTuple):
    """Column `index` of the input of the matrix at `path` (a head is a run of d_head columns)."""

    path: str
    columns: slice
    pos: int | None
    name: str


def _matrices(model: nn.Module) -> dict[tuple[int, str], str]:
    arch = architecture_of(model)
    found = {}
    for path, _ in model.named_modules():
        role = arch.role(path)
        if role is not None and role[1] in ("o", "down"):
            found[role] = path
    return found


def resolve_units(model: nn.Module, names: Sequence[str], *, seq_len: int | None = None) -> list[Unit]:
    """Parse `3.attn.head:5`, `12.mlp.neuron:100@2` against the model's blocks, heads and MLP width.

    Raises:
        VpdError: A malformed name, a block, head, neuron or position out of range, or a unit listed twice.
    """
    matrices = _matrices(model)
    heads = attention_spec(model).heads
    blocks = 1 + max(b for b, _ in matrices)
    units, seen = [], set()
    for name in names:
        m = _UNIT.fullmatch(str(name))
        if m is None:
            raise VpdError(
                f"`--nodes` entry {name!r} is not a head or a neuron; write block.attn.head:h or "
                "block.mlp.neuron:i, optionally @position, e.g. 3.attn.head:5 or 12.mlp.neuron:100@2."
            )
        block, part, index = int(m.group(1)), m.group(2), int(m.group(3))
        pos = None if m.group(4) is None else int(m.group(4))
        role = "o" if part == "attn.head" else "down"
        if (block, role) not in matrices:
            raise VpdError(f"`--nodes` entry {name!r} names block {block}; the model has blocks 0..{blocks - 1}.")
        path = matrices[(block, role)]
        width = heads.n_heads if role == "o" else _in_features(model.get_submodule(path))
        if index >= width:
            what = "heads" if role == "o" else "MLP neurons"
            raise VpdError(f"`--nodes` entry {name!r}: block {block} has {width} {what}; use 0..{width - 1}.")
        if pos is not None and seq_len is not None and pos >= seq_len:
            raise VpdError(f"`--nodes` entry {name!r} has position {pos}, but the prompt has {seq_len} tokens.")
        cols = slice(index * heads.d_head, (index + 1) * heads.d_head) if role == "o" else slice(index, index + 1)
        if (path, cols.start, pos) in seen:
            raise VpdError(f"`--nodes` lists {name!r} twice; list each unit once.")
        seen.add((path, cols.start, pos))
        units.append(Unit(path, cols, pos, str(name)))
    return units


def _in_features(module: nn.Module) -> int:
    w = getattr(module, "weight", None)
    if w is None:
        raise VpdError(f"The MLP output matrix {type(module).__name__} has no weight; neurons cannot be found.")
    # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out) and has `nf` = out.
    return int(w.shape[0]) if hasattr(module, "nf") else int(w.shape[1])


@contextmanager
def scale_units(model: nn.Module, units: Sequence[Unit], factor: float) -> Iterator[None]:
    """Multiply each unit's columns of its matrix's input by `factor` inside the block (hooks removed on exit)."""
    state: dict[str, Any] = {"offset": 0}
    handles = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state["offset"] = _cache_length(args, kwargs)

    def make(path: str) -> Any:
        mine = [u for u in units if u.path == path]

        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            grid = as_token_grid(x, state["seen"]["tokens"])
            T = grid.shape[-2]
            positions = torch.arange(T, device=x.device) + state["offset"]
            keep = torch.ones(T, grid.shape[-1], dtype=x.dtype, device=x.device)
            for u in mine:
                rows = slice(None) if u.pos is None else positions == u.pos
                keep[rows, u.columns] = factor
            return ((grid * keep).reshape(x.shape), *args[1:])

        return hook

    with token_shape(model) as state["seen"]:
        try:
            handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
            for path in dict.fromkeys(u.path for u in units):
                handles.append(model.get_submodule(path).register_forward_pre_hook(make(path)))
            yield
        finally:
            for h in handles:
                h.remove()


def _factor(kind: str, scale: float | None) -> float:
    if kind not in UNIT_KINDS:
        raise VpdError(
            f"`--kind` {kind!r} needs a decomposition's held-out data; on heads and neurons use zero or scale, "
            "or pass `--run`."
        )
    return 0.0 if kind == "zero" else float(scale)


def ablate_units(
    model: nn.Module,
    ids: Tensor,
    names: Sequence[str],
    kind: str = "zero",
    *,
    scale: float | None = None,
    target_pos: int | None = None,
    target_token: int | None = None,
) -> InterventionResult:
    """The model's logits with the listed heads or neurons zeroed or scaled, beside its clean logits.

    Raises:
        VpdError: Bad units or a kind other than zero and scale.
    """
    factor = _factor(kind, scale)
    units = resolve_units(model, names, seq_len=ids.shape[1])
    with torch.no_grad():
        clean = logits_of(model(ids))
        with scale_units(model, units, factor):
            logits = logits_of(model(ids))
    return intervention_result(clean, logits, target_pos, target_token)


def generate_units(
    model: nn.Module, tokenizer: Any, prompt: str, names: Sequence[str], kind: str, scale: float | None, n: int
) -> str:
    """Greedy continuation of `prompt` for `n` tokens with the listed units zeroed or scaled (none: plain)."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    units = resolve_units(model, names) if names else []
    with torch.no_grad(), scale_units(model, units, _factor(kind, scale) if names else 1.0):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :].tolist())
