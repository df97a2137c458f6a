"""Bytes of U, V, the CI network and their AdamW state for Llama-3.2-1B and Llama-3.1-8B, and GPUs needed.

Pure arithmetic from the model shapes (no download): prints the table that docs/scaling.md quotes.

C per matrix from the paper's ratios to d_model, rounded up to a multiple of 32 (docs/method.md §3):
q, k 0.67×; v, o 1.33×; MLP in (gate and up) 4×; MLP out (down) 4.67×. U and V of a matrix hold
C·(d_in + d_out) parameters. The CI network is the global bidirectional transformer of docs/method.md §5.2:
in-proj D → r (D = Σ d_in over the decomposed matrices), blocks of attention (4r²) and MLP (r → 4r → r),
head r → Σ C. Training keeps fp32 parameters, fp32 gradients and AdamW's two fp32 moments: 16 bytes per
trainable parameter, which FSDP2 shards over the ranks. Every rank also holds the frozen target (bf16) and
the decomposition's fp32 copy of each decomposed W (`LinearComponents.weight`), which are not sharded.

Usage: python benchmarks/scaling_memory.py [--gpu-gb 80] [--reserve-gb 16] [--ci-width 2] [--ci-blocks 4] [--split]
"""

from __future__ import annotations

import argparse
import math

MODELS = {
    # d_model, layers, heads, kv heads, d_mlp, vocab, tied embeddings
    "Llama-3.2-1B": (2048, 16, 32, 8, 8192, 128_256, True),
    "Llama-3.1-8B": (4096, 32, 32, 8, 14_336, 128_256, False),
}
RATIOS = {"q": 0.67, "k": 0.67, "v": 1.33, "o": 1.33, "gate": 4.0, "up": 4.0, "down": 4.67}
GB = 1e9


def up32(x: float) -> int:
    return int(math.ceil(x / 32) * 32)


def sizes(name: str, ci_width: float, ci_blocks: int, split: bool = False) -> dict[str, float]:
    d, layers, heads, kv_heads, d_mlp, vocab, tied = MODELS[name]
    kv = kv_heads * (d // heads)
    shape = {
        "q": (d, d),
        "k": (d, kv),
        "v": (d, kv),
        "o": (d, d),
        "gate": (d, d_mlp),
        "up": (d, d_mlp),
        "down": (d_mlp, d),
    }
    C = {m: up32(r * d) for m, r in RATIOS.items()}
    w = layers * sum(i * o for i, o in shape.values())
    uv = layers * sum(C[m] * (i + o) for m, (i, o) in shape.items())
    D = layers * sum(i for i, _ in shape.values())
    sum_c = layers * sum(C.values())
    r = int(ci_width * d)
    block = 4 * r * r + (r * 4 * r + 4 * r) + (4 * r * r + r)
    ci = (D * r + r) + ci_blocks * block + (r * sum_c + sum_c)
    target = w + vocab * d * (1 if tied else 2)
    # FSDP2 gathers one unit whole: the largest is the CI head (r × ΣC) or in-proj (D × r), or the down matrix.
    # With `split`, in-proj and head are one Linear per decomposed matrix (the same function: the in-proj is a
    # sum over the matrices' inputs and the head's output is split per matrix anyway), so each is its own unit.
    projections = (r * max(C.values()), d_mlp * r) if split else (r * sum_c + sum_c, D * r + r)
    largest = max(*projections, block, C["down"] * (d + d_mlp))
    return {"W": w, "target": target, "uv": uv, "ci": ci, "C_total": sum_c, "D": D, "r": r, "largest": largest, **C}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU, GB (default 80)")
    ap.add_argument("--reserve-gb", type=float, default=16.0, help="per GPU for activations and gathers (default 16)")
    ap.add_argument("--ci-width", type=float, default=2.0, help="CI residual width / d_model (default 2)")
    ap.add_argument("--ci-blocks", type=int, default=4, help="CI transformer blocks (default 4)")
    ap.add_argument("--split", action="store_true", help="CI in-proj and head as one Linear per decomposed matrix")
    args = ap.parse_args()
    for name in MODELS:
        s = sizes(name, args.ci_width, args.ci_blocks, args.split)
        trainable = s["uv"] + s["ci"]
        state = 16 * trainable  # fp32 param + grad + AdamW exp_avg + exp_avg_sq
        replicated = 2 * s["target"] + 4 * s["W"]  # bf16 target + fp32 copies of the decomposed W
        gathered = 8 * s["largest"]  # the largest unit's fp32 parameters and, in backward, its gradient
        room = args.gpu_gb * GB - replicated - gathered - args.reserve_gb * GB
        gpus = math.ceil(state / room) if room > 0 else None
        print(f"{name}: target {s['target'] / 1e9:.2f} B params ({s['W'] / 1e9:.2f} B decomposed)")
        print(
            f"  C per layer: q,k {s['q']}  v,o {s['v']}  gate,up {s['gate']}  down {s['down']}; "
            f"total C {s['C_total']:,}"
        )
        print(f"  U,V {s['uv'] / 1e9:.2f} B params = {4 * s['uv'] / GB:.1f} GB fp32")
        print(
            f"  CI network (D {s['D']:,} → r {s['r']}, {args.ci_blocks} blocks → ΣC) {s['ci'] / 1e9:.2f} B params "
            f"= {4 * s['ci'] / GB:.1f} GB fp32"
        )
        print(
            f"  gradients {4 * trainable / GB:.1f} GB; AdamW moments {8 * trainable / GB:.1f} GB; "
            f"all training state {state / GB:.1f} GB"
        )
        print(
            f"  replicated per GPU: target bf16 {2 * s['target'] / GB:.1f} GB + fp32 W copies "
            f"{4 * s['W'] / GB:.1f} GB = {replicated / GB:.1f} GB"
        )
        print(f"  largest FSDP unit {s['largest'] / 1e9:.2f} B params: {gathered / GB:.1f} GB gathered with its grad")
        print(f"  unsharded (DDP) needs {(state + replicated) / GB + args.reserve_gb:.0f} GB per GPU")
        if gpus is None:
            print(
                f"  FSDP2 alone does not fit {args.gpu_gb:.0f} GB GPUs: the largest unit plus the replicated "
                f"tensors and {args.reserve_gb:.0f} GB reserve exceed one GPU"
            )
        else:
            print(
                f"  FSDP2 on {args.gpu_gb:.0f} GB GPUs with {args.reserve_gb:.0f} GB reserved: {gpus} GPUs "
                f"({state / gpus / GB:.1f} GB of shards each)"
            )


if __name__ == "__main__":
    main()
