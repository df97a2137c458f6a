"""One circuit-tracer 0.5.0 attribution graph on a random GPT-2 of the bundled size; prints one JSON line.

    benchmarks/peers/.venv/bin/python benchmarks/peers/circuit_tracer_graph.py --prompt-file P.json \
        [--max-feature-nodes 7500 | --no-cap] [--batch-size 256] [--out DIR]

Runs in the peer environment (`make bench-peers`), one graph per process so that the process's peak
RSS is this graph's. The model: a GPT-2-architecture `HookedTransformer` (LayerNorm, learned positions,
GELU) with the bundled target's shape (4 layers, d_model 192, 6 heads of 32, d_mlp 512, vocabulary
4,096, context 256), random weights, and one random single-layer transcoder per layer, as wide as the
bundled decomposition has subcomponents per block (2,400), reading `hook_resid_mid` and writing
`hook_mlp_out`, with a TopK activation so that 5% of its features (120) are active at each position.

Timed: `attribute` (the edge step) and end to end, i.e. `attribute`, `prune_graph` at circuit-tracer's
default thresholds (node 0.8, edge 0.98) and the graph file (`create_nodes`, `create_used_nodes_and_edges`,
`build_model`, written as JSON), as `circuit-tracer attribute --slug … --graph_file_dir …` does it.
Defaults are the CLI's: `max_feature_nodes` 7,500 and `batch_size` 256.
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
TARGET = REPO / "decomposer" / "assets" / "target"
WIDTH_PER_BLOCK = 2400  # configs/bundled-decomposition.yaml: 128 + 128 + 256 + 256 + 512 + 512 + 608
ACTIVE_FRACTION = 0.05


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def build_model(seed: int = 0):
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.transcoder.activation_functions import TopK
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
    from transformer_lens import HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((TARGET / "config.json").read_text())
    # The bundled tokenizer's config names a transformers 5 class; this transformers reads its tokenizer.json.
    # TransformerLens reloads a tokenizer by its folder, so it is saved to one first.
    folder = tempfile.mkdtemp(prefix="ct-tokenizer-")
    PreTrainedTokenizerFast(
        tokenizer_file=str(TARGET / "tokenizer.json"), bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    ).save_pretrained(folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    d_model, n_layers = spec["hidden_size"], spec["num_hidden_layers"]
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=spec["num_attention_heads"],
        d_head=spec["head_dim"],
        d_mlp=spec["intermediate_size"],
        d_vocab=spec["vocab_size"],
        n_ctx=spec["max_position_embeddings"],
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        model_name="random-gpt2-bundled-shape",
        tokenizer_prepends_bos=False,
        default_prepend_bos=False,
        seed=seed,
        device="cpu",
        dtype=torch.float32,
    )
    generator = torch.Generator().manual_seed(seed)
    k = round(ACTIVE_FRACTION * WIDTH_PER_BLOCK)
    transcoders = {}
    for layer in range(n_layers):
        tc = SingleLayerTranscoder(
            d_model, WIDTH_PER_BLOCK, TopK(k), layer, device=torch.device("cpu"), dtype=torch.float32
        )
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(WIDTH_PER_BLOCK, d_model, generator=generator) / d_model**0.5)
            tc.W_dec.copy_(torch.randn(WIDTH_PER_BLOCK, d_model, generator=generator) / WIDTH_PER_BLOCK**0.5)
        transcoders[layer] = tc
    tset = TranscoderSet(
        transcoders, feature_input_hook="hook_resid_mid", feature_output_hook="hook_mlp_out", scan="random"
    )
    model = TransformerLensReplacementModel.from_config(cfg, tset, tokenizer=tokenizer)
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-file", type=Path, required=True, help="JSON with the prompt's token ids")
    parser.add_argument("--max-feature-nodes", type=int, default=7500)
    parser.add_argument("--no-cap", action="store_true", help="every active feature becomes a node")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="where to write the graph file (default: a temp dir)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    from circuit_tracer import attribute
    from circuit_tracer.graph import prune_graph
    from circuit_tracer.utils.create_graph_files import build_model as build_file_model
    from circuit_tracer.utils.create_graph_files import create_nodes, create_used_nodes_and_edges

    ids = torch.tensor(json.loads(args.prompt_file.read_text())["ids"])
    model, tokenizer = build_model()
    setup_rss = _rss_gb()

    start, cpu_start = time.perf_counter(), time.process_time()
    graph = attribute(
        ids,
        model,
        max_feature_nodes=None if args.no_cap else args.max_feature_nodes,
        batch_size=args.batch_size,
    )
    t_edges = time.perf_counter() - start
    full_nodes = graph.adjacency_matrix.shape[0]
    full_edges = int((graph.adjacency_matrix != 0).sum())
    active = int(graph.active_features.shape[0])

    node_mask, edge_mask, cumulative = prune_graph(graph, 0.8, 0.98)
    nodes = create_nodes(graph, node_mask, tokenizer, cumulative)
    used_nodes, used_edges = create_used_nodes_and_edges(graph, nodes, edge_mask)
    file_model = build_file_model(graph, used_nodes, used_edges, "peer", "random", 0.8, tokenizer)
    out = args.out or Path(tempfile.mkdtemp(prefix="ct-graph-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer.json").write_text(file_model.model_dump_json())
    t_total, t_cpu = time.perf_counter() - start, time.process_time() - cpu_start

    result = {
        "side": "circuit-tracer",
        "tokens": int(ids.numel()),
        "cap": None if args.no_cap else args.max_feature_nodes,
        "active_features": active,
        "edge_s": t_edges,
        "total_s": t_total,
        "total_cpu_s": t_cpu,
        "full_nodes": full_nodes,
        "full_edges": full_edges,
        "pruned_nodes": len(used_nodes),
        "pruned_edges": len(used_edges),
        "setup_rss_gb": setup_rss,
        "peak_rss_gb": _rss_gb(),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__},
    }
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
