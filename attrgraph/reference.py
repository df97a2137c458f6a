"""Which decomposed layer pairs connect (attribution-graphs.md §2.3), found by tracing.

One tiny dummy forward is run through `direct_effect_leaves` with every (t, c) entry alive, so each is
a leaf; for every target (one element of each decomposed module's a = xV, and one logit)
`autograd.grad` is taken with respect to every leaf with `allow_unused=True`. A non-None, nonzero
gradient means the target depends directly on that source.

Source names: the module path for component leaves, ``delta/{path}`` for delta leaves and ``"emb"``
for the embedding leaf. Target names: the module path, or ``"logit"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attrgraph.leaves import direct_effect_leaves
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition

__all__ = ["EMB", "LOGIT", "delta_name", "trace_layer_pairs"]

EMB = "emb"
LOGIT = "logit"


def delta_name(path: str) -> str:
    """Source name of a module's delta leaf."""
    return f"delta/{path}"


def trace_layer_pairs(d: Decomposition, n_tokens: int = 2) -> dict[str, set[str]]:
    """Target → set of sources it directly depends on, for every decomposed module and the logits.

    The element traced for each target sits at the last position, so sources at earlier positions
    (k/v → o inside one attention layer) are found too.

    Args:
        d: The decomposition whose component model is traced.
        n_tokens: Length of the dummy prompt (token ids 0, 1, ...; distinct tokens keep q and k from
            dropping out of o through identical values at every position).

    Returns:
        Target name (module path or ``"logit"``) → source names.

    Raises:
        VpdError: If `n_tokens` is below 1.
    """
    if n_tokens < 1:
        raise VpdError(f"`n_tokens` must be >= 1; got {n_tokens}.")
    vocab = d.model.target.get_input_embeddings().num_embeddings
    tokens = (torch.arange(n_tokens, device=d.model_device) % vocab)[None]
    # alive=None: every entry is a leaf, so no source can hide behind a dead (constant) entry.
    with torch.enable_grad(), direct_effect_leaves(d.model, alive=None) as rec:
        logits = d.model.target(tokens).logits
    leaves = rec.leaves()
    names = [EMB, *rec.comp_leaves, *(delta_name(p) for p in rec.delta_leaves)]

    def sources(scalar: Tensor) -> set[str]:
        if not scalar.requires_grad:
            return set()
        grads = torch.autograd.grad(scalar, leaves, allow_unused=True, retain_graph=True)
        return {name for name, g in zip(names, grads, strict=True) if g is not None and bool(g.ne(0).any())}

    pairs = {path: sources(rec.acts[path][0, -1, 0]) for path in d.module_paths}
    # The largest logit, not token 0: a padding token's tied embedding row is zero, so its logit reads nothing.
    pairs[LOGIT] = sources(logits[0, -1, int(logits[0, -1].detach().abs().argmax())])
    return pairs
