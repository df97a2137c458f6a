"""SmolLM2-135M with `modules: auto` (210 matrices, 288,060 subcomponents per position): memory and time.

    python benchmarks/smollm2_scale.py step  [--batch-size 1,2] [--seq-len 64] [--steps 2]
    python benchmarks/smollm2_scale.py graph [--lengths 64,256] [--alive-frac 0.01]

One fresh process per measurement, so each peak RSS is that measurement's own.

`step`: `Decomposition.create` with the default config (global CI transformer, PPGD adversary) on the
converted model, then training steps (`Trainer.step`) on random token batches: the estimate of
`decomposer.vpd.memory` against the measured peak RSS, the median step time and the step's FLOPs counted by
`torch.utils.flop_counter`. With two batch sizes or more, FLOPs and peak RSS are fitted as a fixed part plus
a part per token, and the step is projected to one H100 (989 TFLOP/s dense bf16) at 40% model FLOPs
utilisation, at the largest batch measured and at the config's default of 32 × 128 tokens. A projection
from counted FLOPs, not a measurement.

`graph`: `attribute_prompt` end to end (the pipeline of `vpd graph`: edges under the default node budget of
7,500 and `--graph-batch` prompt copies per forward, 4 by default, since the default 16 at 256 tokens is
refused by the graph's own memory check at 35 GB; pruning, q/k pairs, every file written) on the first T
tokens of the README, with an untrained decomposition and CI drawn so that `--alive-frac` of each matrix's
subcomponents are alive at every position (as an untrained CI network gives no such sparsity, the CI is passed
in; the CI function itself is a small per-matrix MLP). Wall time of the child process (interpreter, imports,
loading the model, creating the decomposition, the graph, the files) and the graph step alone; peak RSS of
the process.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H100_BF16 = 989e12
MFU = 0.4


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # kB on Linux


def _child_step(args: argparse.Namespace) -> dict:
    import statistics

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from decomposer.target.loading import load_target
    from decomposer.vpd.config import DecomposeConfig
    from decomposer.vpd.memory import estimate_training_bytes
    from decomposer.vpd.run import Decomposition
    from decomposer.vpd.step import Trainer

    torch.manual_seed(0)
    target, _ = load_target("smollm2-135m")
    cfg = DecomposeConfig.model_validate({"target": "smollm2-135m", "modules": "auto"})
    d = Decomposition.create(cfg, target)
    B, T = args.batch_size, args.seq_len
    estimate = estimate_training_bytes(d, B * T)
    trainer = Trainer(d, n_ref=B * T, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, target.config.vocab_size, (B, T), generator=gen) for _ in range(args.steps + 1)]
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        trainer.step(batch, i)
        times.append(time.perf_counter() - start)
    rss = _rss_gb()
    with FlopCounterMode(display=False) as counter:
        trainer.step(batches[0], len(batches))
    flops = float(counter.get_total_flops())
    return {
        "matrices": len(d.module_paths),
        "total_C": sum(d.Cs.values()),
        "uv_params": sum(p.numel() for p in d.model.parameters() if p.requires_grad),
        "ci_params": sum(p.numel() for p in d.ci_fn.parameters()),
        "estimate_gb": {k: v / 1e9 for k, v in estimate.items()},
        "rss_gb": rss,
        "step_s": statistics.median(times[1:]),
        "first_step_s": times[0],
        "flops": flops,
        "tokens": B * T,
    }


def _prompt(tokenizer, n: int) -> str:
    ids = tokenizer((ROOT / "README.md").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:n])


def _child_graph(args: argparse.Namespace) -> dict:
    import torch

    from attrgraph.pipeline import attribute_prompt
    from attrgraph.settings import GraphSettings
    from decomposer.target.loading import load_target
    from decomposer.vpd.config import DecomposeConfig
    from decomposer.vpd.run import Decomposition

    torch.manual_seed(0)
    target, tokenizer = load_target("smollm2-135m")
    cfg = DecomposeConfig.model_validate(
        {"target": "smollm2-135m", "modules": "auto", "ci": {"kind": "mlp", "hidden": 4}}
    )
    d = Decomposition.create(cfg, target)
    prompt = _prompt(tokenizer, args.tokens)
    T = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    gen = torch.Generator().manual_seed(1)
    ci = {}
    for p, C in d.Cs.items():
        k = max(1, round(args.alive_frac * C))
        alive = torch.rand(T, C, generator=gen).argsort(-1)[:, :k]
        g = torch.zeros(T, C)
        g.scatter_(1, alive, torch.rand(T, k, generator=gen) * 0.9 + 0.1)
        ci[p] = g
    start = time.perf_counter()
    graph = attribute_prompt(d, tokenizer, prompt, ci=ci, settings=GraphSettings(batch_size=args.graph_batch))
    with tempfile.TemporaryDirectory() as out:
        graph.save(out)
    seconds = time.perf_counter() - start
    table = graph.table
    return {
        "tokens": T,
        "graph_s": seconds,
        "alive": int(sum(int((g > 0).sum()) for g in ci.values())),
        "nodes": table.n,
        "edges": int(table.targets.numel()),
        "pruned_nodes": graph.pruned.number_of_nodes(),
        "memory_estimate_gb": graph.memory_estimate / 1e9,
    }


def _measure(argv: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:] or ["(no output)"]
        return {"error": " / ".join(tail), "wall": wall}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("step", "graph"))
    parser.add_argument("--batch-size", default="1,2", help="step: sequences per step, one process each")
    parser.add_argument("--seq-len", type=int, default=64, help="step: tokens per sequence")
    parser.add_argument("--steps", type=int, default=2, help="step: timed steps after one warm-up step")
    parser.add_argument("--lengths", default="64,256", help="graph: prompt lengths, one process each")
    parser.add_argument("--alive-frac", type=float, default=0.01, help="graph: alive share per matrix and position")
    parser.add_argument("--graph-batch", type=int, default=4, help="graph: prompt copies per forward (batch_size)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.what == "step":
            args.batch_size = int(args.batch_size)
            result = _child_step(args)
        else:
            result = _child_graph(args)
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        result.update(peak_rss_gb=_rss_gb(), cpu_s=cpu.ru_utime + cpu.ru_stime)
        print(json.dumps(result))
        return

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.what == "step":
        rows = []
        for b in [int(x) for x in args.batch_size.split(",") if x]:
            argv = [
                "step",
                "--child",
                "--batch-size",
                str(b),
                "--seq-len",
                str(args.seq_len),
                "--steps",
                str(args.steps),
            ]
            r = _measure(argv)
            print(json.dumps(r), flush=True)
            if "error" in r:
                continue
            rows.append(r)
            est = r["estimate_gb"]
            print(
                f"{r['tokens']} tokens: estimate {est['total']:.2f} GB (frozen {est['frozen']:.2f}, state "
                f"{est['training_state']:.2f}, activations {est['activations']:.2f}) against peak RSS "
                f"{r['peak_rss_gb']:.2f} GB; step {r['step_s']:.1f} s on this CPU "
                f"({r['flops'] / r['step_s'] / 1e9:.0f} GFLOP/s); {r['flops'] / 1e12:.2f} TFLOP per step",
                flush=True,
            )
        if len(rows) >= 2:  # FLOPs and memory as fixed + per token, from the smallest and largest batch
            lo, hi = rows[0], rows[-1]
            dt = hi["tokens"] - lo["tokens"]
            f_tok = (hi["flops"] - lo["flops"]) / dt
            f_0 = lo["flops"] - f_tok * lo["tokens"]
            m_tok = (hi["peak_rss_gb"] - lo["peak_rss_gb"]) / dt
            m_0 = lo["peak_rss_gb"] - m_tok * lo["tokens"]
            default = 32 * 128
            print(
                f"fit: {f_0 / 1e12:.2f} TFLOP + {f_tok / 1e9:.1f} GFLOP per token per step; peak RSS {m_0:.2f} GB + "
                f"{m_tok * 1e3:.1f} MB per token"
            )
            for tokens in (hi["tokens"], default):
                flops = f_0 + f_tok * tokens
                print(
                    f"  {tokens:,} tokens per step: {flops / 1e12:.1f} TFLOP; one H100 at {MFU:.0%} of "
                    f"{H100_BF16 / 1e12:.0f} TFLOP/s: {flops / (MFU * H100_BF16) * 1e3:.0f} ms per step; memory "
                    f"{m_0 + m_tok * tokens:.0f} GB"
                )
    else:
        for n in [int(x) for x in args.lengths.split(",") if x]:
            argv = ["--tokens", str(n), "--alive-frac", str(args.alive_frac), "--graph-batch", str(args.graph_batch)]
            r = _measure(["graph", "--child", *argv])
            print(json.dumps(r), flush=True)
            if "error" not in r:
                print(
                    f"{r['tokens']} tokens: wall {r['wall']:.1f} s (graph and files {r['graph_s']:.1f} s), CPU "
                    f"{r['cpu_s']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB; alive {r['alive']:,}, nodes "
                    f"{r['nodes']:,}, edges {r['edges']:,}, pruned nodes {r['pruned_nodes']}"
                )


if __name__ == "__main__":
    main()
