"""One intervention on one prompt, summarised: what `vpd ablate` prints and `vpd serve`'s /api/intervene returns.

`ablation_summary` resolves the prompt and the read-out, checks the nodes, intervenes (`circuits.interventions`)
and reports P(target) and the top tokens before and after, the KL at the read-out, and optionally greedy text
with and without the intervention. Both front ends call it, so they print and serve the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TOP_K = 5


def top_tokens(probs: Any, tokenizer: Any, k: int = TOP_K) -> list[dict[str, Any]]:
    """The `k` likeliest tokens of a probability vector: token text, id and probability."""
    values, ids = probs.topk(k)
    return [
        {"token": tokenizer.decode([i]), "id": i, "probability": v}
        for v, i in zip(values.tolist(), ids.tolist(), strict=True)
    ]


def result_summary(result: Any, tokenizer: Any, pos: int, label: int) -> dict[str, Any]:
    """The numbers of an `AblationResult` at read-out position `pos` for token `label`."""
    before = result.target_logits[0, pos].double().softmax(-1)
    after = result.logits[0, pos].double().softmax(-1)
    return {
        "target_token": tokenizer.decode([label]),
        "target_pos": pos,
        "p_before": float(result.p_target[0]),
        "p_after": float(result.p_intervened[0]),
        "kl_before": 0.0,
        "kl_after": float(result.kl[0, pos]),
        "kl_mean_over_positions": float(result.kl[0].mean()),
        "top_before": top_tokens(before, tokenizer),
        "top_after": top_tokens(after, tokenizer),
        "generation": None,
    }


def ablation_summary(
    d: Any,
    tokenizer: Any,
    prompt: str,
    nodes: Sequence[str],
    *,
    kind: str = "zero",
    scale: float | None = None,
    target: str | None = None,
    position: int | None = None,
    generate_tokens: int = 0,
    reference: Any = None,
    seed: int = 0,
    name: str = "--nodes",
) -> dict[str, Any]:
    """Intervene on `nodes` (component keys, `key@t`, or node ids) of `prompt` and summarise the effect.

    Args:
        d: The decomposition.
        tokenizer: Its tokenizer.
        prompt: The text.
        nodes: What to intervene on.
        kind: zero, mean, resample or scale.
        scale: The factor of `scale`.
        target: The token to report (default: the target model's top token at the read-out).
        position: The read-out position (default: the last token).
        generate_tokens: Also continue greedily for this many tokens, with and without.
        reference: Held-out windows for `mean` and `resample`.
        seed: Seeds `resample`.
        name: The argument named in error messages.

    Raises:
        VpdError: A bad prompt, read-out or node.
    """
    from attrgraph.candidates import resolve_prompt
    from circuits.interventions import Intervention, ablate, generate, resolve_sites

    ids, pos, label, _ = resolve_prompt(d, tokenizer, prompt, target, position)
    resolve_sites(d, nodes, seq_len=ids.shape[1], name=name)
    result = ablate(
        d,
        ids,
        list(nodes),
        kind,
        scale=scale,
        reference=reference,
        seed=seed,
        target_pos=pos,
        target_token=label,
    )
    summary = {"prompt": prompt, "nodes": list(nodes), "kind": kind, "scale": scale}
    summary |= result_summary(result, tokenizer, pos, label)
    if generate_tokens:
        iv = Intervention(tuple(nodes), kind, scale, reference, seed)
        summary["generation"] = {
            "tokens": generate_tokens,
            "without": generate(d, tokenizer, prompt, (), generate_tokens),
            "with": generate(d, tokenizer, prompt, iv, generate_tokens),
        }
    return summary
