"""The paper's princess/prince pair on SmolLM2-135M-Instruct, as far as interventions on the model go.

    python notebooks/smollm2_princess_prince.py     # a few minutes on a 2-core CPU with the model cached

A script, not a notebook: CI runs every notebook in this folder top to bottom, and this one needs the 93 MB
model (`vpd predict --model smollm2-135m "The princess lost"` fetches and converts it once, into the data
directory). Everything here works on the model alone, without a decomposition:

1. P(" her") and P(" his") after "The princess lost" and "The prince lost", and the logit difference.
2. Activation patching: the residual stream at the subject's position, copied from the prince prompt into
   the princess prompt after each block — from which block on does the swapped subject flip the pronoun?
3. Every attention head (30 × 9) zeroed at every position: which heads carry the pronoun choice?
4. The MLP neurons of the last position ranked by gradient × activation on the logit difference, then
   each of the top ones zeroed (an intervention, not the linear estimate).
5. Greedy continuations with the strongest heads zeroed (`vpd ablate --model smollm2-135m ... --generate`).

What this does not do: read the circuit in the model's *parameters*. A VPD decomposition of this model with
`modules: auto` has 210 matrices, 288,060 subcomponents per position and 529M U, V parameters; training it
holds about 13 GB of parameters, gradients and AdamW state before activations
(`decomposer.vpd.memory`, printed at the end) and takes about 50 s per 256-token step on a 2-core CPU
against a projected 12 ms on one H100 (docs/smollm2.md). **Decomposing this model needs a GPU.** With a
decomposition, `vpd graph --run RUN --prompt "The princess lost" --target " her"` gives the graph the
paper draws.
"""

from __future__ import annotations

import time

import torch

from circuits.model_interventions import ablate_units, generate_units, resolve_units, scale_units
from decomposer.target import load_target

PRINCESS, PRINCE = "The princess lost", "The prince lost"
TOP = 8


def main() -> None:
    start = time.perf_counter()
    model, tok = load_target("smollm2-135m")
    her, his = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" her", " his"))
    ids = {p: tok(p, return_tensors="pt")["input_ids"] for p in (PRINCESS, PRINCE)}
    assert ids[PRINCESS].shape == ids[PRINCE].shape, "the pair must have the same number of tokens"
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads

    def diff(logits: torch.Tensor) -> float:
        """logit(" her") − logit(" his") at the last position."""
        return float(logits[0, -1, her] - logits[0, -1, his])

    # 1. The two predictions -------------------------------------------------------------------------
    print("1. Predictions")
    clean = {}
    with torch.no_grad():
        for p in (PRINCESS, PRINCE):
            logits = model(ids[p]).logits
            clean[p] = diff(logits)
            probs = logits[0, -1].double().softmax(-1)
            top = ", ".join(f"{tok.decode([int(i)])!r} {float(v):.3f}" for v, i in zip(*probs.topk(5), strict=True))
            print(f"  {p!r}: P(' her') {float(probs[her]):.3f}, P(' his') {float(probs[his]):.3f}; top-5 {top}")
            print(f"    logit difference her − his {clean[p]:+.2f}")

    # 2. Activation patching of the subject's residual stream ----------------------------------------
    print("\n2. The prince's residual stream at ' prince' patched into the princess prompt after block L")
    subject = 1  # "The", " princess"/" prince", " lost"
    saved: dict[int, torch.Tensor] = {}

    def save(i):
        def hook(module, args, output):
            saved[i] = (output[0] if isinstance(output, tuple) else output)[:, subject].clone()

        return hook

    def patch(i):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[:, subject] = saved[i]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    blocks = model.model.layers
    with torch.no_grad():
        handles = [b.register_forward_hook(save(i)) for i, b in enumerate(blocks)]
        model(ids[PRINCE])
        for h in handles:
            h.remove()
        row = []
        for i, b in enumerate(blocks):
            h = b.register_forward_hook(patch(i))
            row.append(diff(model(ids[PRINCESS]).logits))
            h.remove()
    shown = "  ".join(f"{i}:{v:+.1f}" for i, v in enumerate(row))
    print(f"  her − his after patching at block: {shown}")
    last_flip = max((i for i, v in enumerate(row) if v < 0), default=None)
    if last_flip is None:
        print("  the patched subject never flips the pronoun")
    else:
        print(
            f"  patched after blocks 0..{last_flip} the pronoun follows the prince (her − his < 0); patched later it "
            f"stays ' her': by block {last_flip + 1} the subject has been read out of its position"
        )

    # 3. Every head zeroed ---------------------------------------------------------------------------
    print(f"\n3. Each of the {layers * heads} heads zeroed at every position: change of her − his")
    effects = []
    for layer in range(layers):
        for h in range(heads):
            name = f"{layer}.attn.head:{h}"
            d_princess = diff(ablate_units(model, ids[PRINCESS], [name], "zero").logits) - clean[PRINCESS]
            d_prince = diff(ablate_units(model, ids[PRINCE], [name], "zero").logits) - clean[PRINCE]
            effects.append((name, d_princess, d_prince))
    # A head that carries the choice pulls both prompts towards each other: her − his falls for the
    # princess and rises for the prince.
    effects.sort(key=lambda e: e[2] - e[1], reverse=True)
    for name, a, b in effects[:TOP]:
        print(f"  {name:<16} princess {a:+.2f}   prince {b:+.2f}")
    top_heads = [e[0] for e in effects[:3]]

    # 4. Neurons of the last position ----------------------------------------------------------------
    print("\n4. MLP neurons at ' lost' on the princess prompt: gradient × activation, then each zeroed there")
    acts: dict[int, torch.Tensor] = {}
    handles = []
    for i in range(layers):
        down = model.get_submodule(f"model.layers.{i}.mlp.down_proj")

        def keep(module, args, i=i):
            args[0].retain_grad()
            acts[i] = args[0]

        handles.append(down.register_forward_pre_hook(keep))
    logits = model(ids[PRINCESS]).logits
    (logits[0, -1, her] - logits[0, -1, his]).backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    scores = torch.stack([(acts[i] * acts[i].grad)[0, -1].detach() for i in range(layers)])  # (layers, d_mlp)
    flat = scores.flatten().abs().topk(TOP).indices
    last = ids[PRINCESS].shape[1] - 1
    for f in flat.tolist():
        layer, n = divmod(f, scores.shape[1])
        name = f"{layer}.mlp.neuron:{n}@{last}"
        real = diff(ablate_units(model, ids[PRINCESS], [name], "zero").logits) - clean[PRINCESS]
        print(f"  {name:<22} estimate {-float(scores[layer, n]):+.3f}   zeroed {real:+.3f}")

    # 5. Continuations -------------------------------------------------------------------------------
    print(f"\n5. Greedy continuations, 8 tokens, without and with heads {', '.join(top_heads)} zeroed")
    for p in (PRINCESS, PRINCE):
        plain = generate_units(model, tok, p, [], "zero", None, 8)
        ablated = generate_units(model, tok, p, top_heads, "zero", None, 8)
        print(f"  {p!r} → {plain!r}")
        print(f"  {'':{len(p) + 2}}   {ablated!r}   (heads zeroed)")
    with torch.no_grad(), scale_units(model, resolve_units(model, top_heads), 0.0):
        probs = model(ids[PRINCESS]).logits[0, -1].double().softmax(-1)
    print(f"  P(' her' | {PRINCESS!r}) with those heads zeroed: {float(probs[her]):.3f}")

    # What a decomposition would need --------------------------------------------------------------
    from decomposer.vpd.config import DecomposeConfig
    from decomposer.vpd.memory import estimate_training_bytes
    from decomposer.vpd.run import Decomposition

    cfg = DecomposeConfig.model_validate({"target": "smollm2-135m", "modules": "auto"})
    d = Decomposition.create(cfg, model)
    est = estimate_training_bytes(d, cfg.optim.batch_size * cfg.optim.seq_len)
    print(
        f"\nA decomposition with `modules: auto` ({len(d.module_paths)} matrices, {sum(d.Cs.values()):,} "
        f"subcomponents per position) at the default batch of {cfg.optim.batch_size} × {cfg.optim.seq_len} "
        f"tokens: about {est['total'] / 1e9:.0f} GB ({est['training_state'] / 1e9:.1f} GB training state, "
        f"{est['activations'] / 1e9:.0f} GB activations). Decomposing this model needs a GPU."
    )
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
