"""One vpd-circuits attribution graph on a random target of the bundled size; prints one JSON line.

    .venv/bin/python benchmarks/peers/vpd_graph.py --prompt-file P.json [--max-nodes 7500 | --no-cap] [--out DIR]

Runs in the package's own environment, one graph per process so that the process's peak RSS is this
graph's. The shape is circuit-tracer's side's (`circuit_tracer_graph.py`): the bundled target's
architecture (4 layers, d_model 192, d_mlp 512, vocabulary 4,096) with random weights, and a random
decomposition of every q/k/v/o/gate/up/down matrix with the bundled C (2,400 subcomponents per block).
The CI is random: at each position after the first, 5% of each matrix's subcomponents are alive (120 per
block, as many as the peer's active transcoder features), with CI drawn from U(0.2, 1); position 0 has
none, as circuit-tracer zeroes the features of the first token.

Timed through the public API, `attrgraph.attribute_prompt` at its default `GraphSettings` (budget
`max_nodes` 7,500, influence pruning at node 0.8 / edge 0.98, q/k pairs): the edge step
(`attribute_edges`, the call inside it) and end to end (`attribute_prompt` plus the pruned graph written
as circuit-tracer JSON, the file the peer's side writes).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
ACTIVE_FRACTION = 0.05


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def build(seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from decomposer.target.loading import resolve_target_path
    from decomposer.vpd.config import load_decompose_config
    from decomposer.vpd.run import Decomposition

    path = resolve_target_path("bundled")
    torch.manual_seed(seed)
    target = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = load_decompose_config(REPO / "configs" / "bundled-decomposition.yaml")
    return Decomposition.create(config, target, seed=seed), tokenizer


def random_ci(d, T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Exactly round(5% of C) alive subcomponents per matrix at every position after the first."""
    generator = torch.Generator().manual_seed(seed)
    ci = {}
    for path, C in d.Cs.items():
        k = round(ACTIVE_FRACTION * C)
        g = torch.zeros(T, C)
        alive = torch.rand(T, C, generator=generator).argsort(dim=1)[:, :k]
        g.scatter_(1, alive, 0.2 + 0.8 * torch.rand(T, k, generator=generator))
        g[0] = 0.0
        ci[path] = g
    return ci


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-file", type=Path, required=True, help="JSON with the prompt's token ids")
    parser.add_argument("--max-nodes", type=int, default=None, help="default: GraphSettings' max_nodes")
    parser.add_argument("--no-cap", action="store_true", help="every alive subcomponent gets its inputs")
    parser.add_argument("--out", type=Path, default=None, help="where to write the graph file (default: a temp dir)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    from attrgraph.export import to_circuit_tracer
    from attrgraph.pipeline import PHASES, attribute_prompt
    from attrgraph.settings import GraphSettings
    from decomposer.io import atomic_write_json

    ids = json.loads(args.prompt_file.read_text())["ids"]
    d, tokenizer = build()
    prompt = tokenizer.decode(ids)
    if tokenizer(prompt, add_special_tokens=False)["input_ids"] != ids:
        raise SystemExit("the prompt's ids do not survive decode and encode; pick another prompt")
    ci = random_ci(d, len(ids))
    settings = GraphSettings()
    if args.no_cap or args.max_nodes is not None:
        settings = settings.model_copy(update={"max_nodes": None if args.no_cap else args.max_nodes})
    setup_rss = _rss_gb()

    start, cpu_start = time.perf_counter(), time.process_time()
    pg = attribute_prompt(d, tokenizer, prompt, settings=settings, ci=ci)
    out = args.out or Path(tempfile.mkdtemp(prefix="vpd-graph-"))
    atomic_write_json(out / "graph.circuit-tracer.json", to_circuit_tracer(pg.pruned, slug="vpd", node_threshold=0.8))
    t_total, t_cpu = time.perf_counter() - start, time.process_time() - cpu_start

    alive = sum(int((g > 0).sum()) for g in ci.values())
    result = {
        "side": "vpd",
        "tokens": len(ids),
        "cap": settings.max_nodes,
        "active_features": alive,
        "edge_s": pg.timings[PHASES[3]],  # the edge phase, as attribute_prompt records it
        "total_s": t_total,
        "total_cpu_s": t_cpu,
        "full_nodes": pg.table.n,
        "full_edges": int(pg.table.targets.numel()),
        "pruned_nodes": pg.pruned.number_of_nodes(),
        "pruned_edges": pg.pruned.number_of_edges(),
        "setup_rss_gb": setup_rss,
        "peak_rss_gb": _rss_gb(),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__},
    }
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
