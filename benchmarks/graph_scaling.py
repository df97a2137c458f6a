"""Attribution graphs against prompt length: wall time and peak memory, one process per measurement.

    python benchmarks/graph_scaling.py [--lengths 16,64,128,256] [--paper-lengths 64,512] [--device cpu]

Two cases:

- `bundled`: `vpd graph --run bundled` end to end on the first T tokens of the README (interpreter start,
  imports, loading, CI, edges under the default node budget, pruning, q/k pairs and every file), as a
  user runs it. Wall time is measured around the process, peak memory is the process's max RSS.
- `paper`: a random-weight 4-layer Llama of the paper's shape (d_model 768, MLP 3072, 12 heads) with the
  paper's C per matrix (38,912 subcomponents), CI drawn at random so that `--alive-frac` of each
  matrix's subcomponents are alive at every position; the edge step (`attribute_edges` under the node
  budget) and pruning (`prune_coo`), timed inside the process after a warm-up forward. On CUDA the peak is
  `torch.cuda.max_memory_allocated`; on the CPU the process's max RSS.

Each row runs in a fresh process, so peak memory is that measurement's own. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _bundled_prompt(n: int) -> str:
    from decomposer.target.loading import load_target

    _, tokenizer = load_target("bundled")
    ids = tokenizer((ROOT / "README.md").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"README.md has only {len(ids)} tokens; ask for at most that many.")
    return tokenizer.decode(ids[:n])


def _child_bundled(args: argparse.Namespace) -> dict:
    from circuits.cli import main

    prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as out:
        argv = ["graph", "--run", "bundled", "--prompt", prompt, "--out", out, "--json"]
        if args.max_nodes:
            argv += ["--max-nodes", args.max_nodes]
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(argv)
        summary = json.loads(buf.getvalue().strip().splitlines()[-1]) if rc == 0 else {}
    return {
        "rc": rc,
        "nodes": summary.get("nodes"),
        "edges": summary.get("edges"),
        "candidates": summary.get("candidates"),
        "pruned_nodes": summary.get("pruned_nodes"),
    }


def _child_paper(args: argparse.Namespace) -> dict:
    import torch

    from attrgraph.edges import attribute_edges
    from attrgraph.prune import prune_coo
    from decomposer.vpd.config import DecomposeConfig, paper_preset, paper_target
    from decomposer.vpd.run import Decomposition

    torch.manual_seed(0)
    device = torch.device(args.device)
    target = paper_target().eval()
    # The CI comes from the draw below, so a small CI function stands in for the paper's CI transformer.
    cfg = DecomposeConfig.model_validate(paper_preset(ci={"kind": "mlp", "hidden": 4}))
    d = Decomposition.create(cfg, target)
    d.model.to(device)
    T = args.tokens
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 4096, (1, T), generator=gen)
    ci = {}
    for p, C in d.Cs.items():
        k = max(1, round(args.alive_frac * C))
        alive = torch.rand(T, C, generator=gen).argsort(-1)[:, :k]
        g = torch.zeros(T, C)
        g.scatter_(1, alive, torch.rand(T, k, generator=gen) * 0.9 + 0.1)
        ci[p] = g.to(device)
    with torch.no_grad():
        d.model.target(ids.to(device))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    max_nodes = None if args.max_nodes == "none" else int(args.max_nodes or 7500)
    table = attribute_edges(d, ids, ci=ci, batch_size=args.batch_size, max_nodes=max_nodes)
    masks = prune_coo(table.n, table.targets, table.sources, table.weights, table.kind_masks(), table.logit_weights())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {
        "seconds": seconds,
        "gpu_gb": peak,
        "nodes": table.n,
        "edges": int(table.targets.numel()),
        "candidates": table.n_candidates,
        "pruned_nodes": int(masks.node_mask.sum()),
    }


def _measure(argv: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0], "wall": wall}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="16,64,128,256", help="bundled prompt lengths (empty: none)")
    parser.add_argument("--paper-lengths", default="64,512", help="paper-shape prompt lengths (empty: none)")
    parser.add_argument("--alive-frac", type=float, default=0.01, help="paper shape: alive share per matrix")
    parser.add_argument("--batch-size", type=int, default=16, help="paper shape: prompt copies per forward")
    parser.add_argument("--max-nodes", default=None, help="node budget (default 7500; `none`: every node)")
    parser.add_argument("--device", default=None, help="paper shape: cpu or cuda (default: cuda when present)")
    parser.add_argument("--child", choices=("bundled", "paper"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = _child_bundled(args) if args.child == "bundled" else _child_paper(args)
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        result.update(rss_gb=_rss_gb(), cpu_s=cpu.ru_utime + cpu.ru_stime)
        print(json.dumps(result))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    budget = ["--max-nodes", args.max_nodes] if args.max_nodes else []
    rows = []
    for n in [int(x) for x in args.lengths.split(",") if x]:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(_bundled_prompt(n))
        try:
            r = _measure(["--child", "bundled", "--prompt-file", f.name, *budget])
        finally:
            os.unlink(f.name)
        rows.append(("bundled, vpd graph end to end", n, "cpu", r))
        print(rows[-1], flush=True)
    for n in [int(x) for x in args.paper_lengths.split(",") if x]:
        r = _measure(
            [
                "--child",
                "paper",
                "--tokens",
                str(n),
                "--alive-frac",
                str(args.alive_frac),
                "--device",
                device,
                "--batch-size",
                str(args.batch_size),
                *budget,
            ]
        )
        rows.append((f"paper shape, edges + pruning, {args.alive_frac:.0%} alive", n, device, r))
        print(rows[-1], flush=True)

    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(
        "| case | tokens | device | wall | in-process | CPU time | peak RSS | peak GPU | alive | nodes | edges "
        "| pruned |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case, n, dev, r in rows:
        if "error" in r:
            print(f"| {case} | {n} | {dev} | {r['wall']:.1f} s | | | | | | | | {r['error']} |")
            continue
        inner = f"{r['seconds']:.2f} s" if "seconds" in r else ""
        gpu = f"{r['gpu_gb']:.2f} GB" if r.get("gpu_gb") is not None else ""
        print(
            f"| {case} | {n} | {dev} | {r['wall']:.1f} s | {inner} | {r['cpu_s']:.1f} s | {r['rss_gb']:.2f} GB | "
            f"{gpu} | {r['candidates']:,} | {r['nodes']:,} | {r['edges']:,} | {r['pruned_nodes']:,} |"
        )


if __name__ == "__main__":
    main()
