"""Attribution-graph speed: batched edges against the one-backward-per-node reference.

    python benchmarks/graph.py [--run RUN] [--tokens 16] [--ci-threshold 0.5] [--batch-size 32]

Builds the edges of one prompt on the bundled target twice in one process, with `attribute` and
`attribute_reference`, checks that they agree, and prints the node count, both times and their
ratio. `attribute` packs one target per position and one o target per block into each prompt copy
of a backward (`attrgraph.edges._Rows`); the reference runs one backward per target node. Without
`--run` it uses a freshly initialised decomposition from `configs/smoke.yaml`, whose CI is dense, so
`--ci-threshold` keeps only the subcomponents above that CI. Last, it times `attribute_prompt` end
to end on the same prompt (the CI network's own g > 0 picks the nodes there, no threshold; edges,
pruning and q/k pairs, no files), as `vpd graph` runs it.
"""

from __future__ import annotations

import argparse
import time

import torch

from attrgraph.edges import attribute
from attrgraph.pipeline import attribute_prompt
from attrgraph.reference import attribute_reference
from decomposer.target.loading import load_target
from decomposer.vpd.config import load_decompose_config
from decomposer.vpd.run import Decomposition, load_decomposition

PROMPT = "The princess lost her crown. She looked for it in the garden and then she went home to the castle"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="a decomposition run folder (default: fresh smoke config)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--ci-threshold", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    torch.manual_seed(0)
    target, tokenizer = load_target("bundled")
    if args.run:
        d, _, _ = load_decomposition(args.run, target)
    else:
        d = Decomposition.create(load_decompose_config("configs/smoke.yaml"), target)
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"][:, : args.tokens]
    g = d.network_ci(ids)
    ci = {p: torch.where(v[0] > args.ci_threshold, v[0], torch.zeros_like(v[0])) for p, v in g.items()}

    attribute(d, ids, ci=ci, batch_size=args.batch_size)  # warm-up: first-call allocations and dispatch

    def timed(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - wall, time.process_time() - cpu

    batched, t_batched, c_batched = timed(lambda: attribute(d, ids, ci=ci, batch_size=args.batch_size))
    reference, t_loop, c_loop = timed(lambda: attribute_reference(d, ids, ci=ci))
    torch.testing.assert_close(batched.A, reference.A, rtol=1e-4, atol=1e-6)

    n = len(batched.nodes)
    print(f"prompt tokens {ids.shape[1]}, nodes {n:,}, nonzero edges {int((batched.A != 0).sum()):,}")
    print(
        f"batched (K={args.batch_size}) {t_batched:.2f} s wall, {c_batched:.2f} s CPU; per-node loop {t_loop:.2f} s "
        f"wall, {c_loop:.2f} s CPU; ratio {t_loop / t_batched:.1f}x wall, {c_loop / c_batched:.1f}x CPU"
    )

    prompt = tokenizer.decode(ids[0])
    graph, t_graph, c_graph = timed(lambda: attribute_prompt(d, tokenizer, prompt))
    s = graph.summary()
    print(
        f"attribute_prompt end to end: {t_graph:.2f} s wall, {c_graph:.2f} s CPU ({s['nodes']:,} nodes, "
        f"{s['edges']:,} edges; pruned {s['pruned_nodes']:,} nodes, {s['pruned_edges']:,} edges)"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")


if __name__ == "__main__":
    main()
