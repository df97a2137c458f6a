"""Node ids, labels and grid rows; influence pruning on a hand-solved 8-node graph; the networkx filters."""

from __future__ import annotations

import copy

import networkx as nx
import pytest
import torch

from attrgraph.nodes import NodeId, module_short_name, node_row, short_label
from attrgraph.prune import ci_threshold, prune_coo, prune_graph, remove_dangling, top_k_edges
from attrgraph.reference import influence, influence_prune, normalized_abs
from decomposer.errors import VpdError

# ---------------------------------------------------------------------------------------------------
# Node ids

NODES = [
    NodeId.comp("model.layers.3.self_attn.o_proj", 281, 2),
    NodeId.comp("base_model.model.model.layers.11.mlp.down_proj", 0, 0),
    NodeId.emb(0),
    NodeId.emb(17),
    NodeId.logit(50256, 5),
    NodeId.delta("transformer.h.1.mlp.c_fc", 3),
    NodeId.delta("gpt_neox.layers.0.attention.query_key_value", 0),
]


@pytest.mark.parametrize("node", NODES, ids=str)
def test_node_id_round_trip(node: NodeId) -> None:
    assert NodeId.parse(str(node)) == node
    assert hash(NodeId.parse(str(node))) == hash(node)


def test_node_id_canonical_strings() -> None:
    assert str(NODES[0]) == "comp/model.layers.3.self_attn.o_proj/281@2"
    assert str(NodeId.emb(4)) == "emb@4"
    assert str(NodeId.logit(1234, 5)) == "logit/1234@5"
    assert str(NodeId.delta("transformer.h.1.mlp.c_fc", 3)) == "delta/transformer.h.1.mlp.c_fc@3"
    assert sorted(NODES) == sorted(reversed(NODES))  # one total order, no None-vs-value comparisons


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "emb",
        "emb@",
        "emb@-1",
        "emb@01",
        "emb@1x",
        "comp/m/1",
        "comp//1@0",
        "comp/a/b/1@0",
        "logit/x@1",
        "logit/1@",
        "delta/m",
        "delta/m@1@2",
        "error/m@1",
        " emb@1",
        "emb@1\n",
    ],
)
def test_node_id_parse_rejects(bad: str) -> None:
    with pytest.raises(VpdError, match=r"is not a canonical id; expected one of comp/\{module\}"):
        NodeId.parse(bad)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("comp", 0, None, 1), "`module` of a comp node"),
        (("comp", 0, "a/b", 1), "`module` of a comp node"),
        (("comp", 0, "m", -1), "`index` of a comp node"),
        (("comp", -1, "m", 0), "`pos` of a comp node"),
        (("emb", 0, "m"), "`module` must be None for a emb node"),
        (("logit", 0), "`index` of a logit node"),
        (("delta", 0, "m", 3), "`index` must be None for a delta node"),
        (("error", 0), "`kind` must be one of"),
    ],
)
def test_node_id_validation(args: tuple, match: str) -> None:
    with pytest.raises(VpdError, match=match):
        NodeId(*args)


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("model.layers.3.self_attn.q_proj", (3, "attn", "q")),
        ("model.layers.3.self_attn.k_proj", (3, "attn", "k")),
        ("model.layers.3.self_attn.v_proj", (3, "attn", "v")),
        ("model.layers.3.self_attn.o_proj", (3, "attn", "o")),
        ("model.layers.12.mlp.gate_proj", (12, "mlp", "gate")),
        ("model.layers.0.mlp.up_proj", (0, "mlp", "up")),
        ("model.layers.0.mlp.down_proj", (0, "mlp", "down")),
        ("transformer.h.1.attn.c_attn", (1, "attn", "qkv")),
        ("transformer.h.1.attn.c_proj", (1, "attn", "o")),
        ("transformer.h.1.mlp.c_fc", (1, "mlp", "up")),
        ("transformer.h.1.mlp.c_proj", (1, "mlp", "down")),
        ("gpt_neox.layers.0.attention.query_key_value", (0, "attn", "qkv")),
        ("gpt_neox.layers.0.attention.dense", (0, "attn", "o")),
        ("gpt_neox.layers.5.mlp.dense_h_to_4h", (5, "mlp", "up")),
        ("gpt_neox.layers.5.mlp.dense_4h_to_h", (5, "mlp", "down")),
    ],
)
def test_module_short_name(module: str, expected: tuple[int, str, str]) -> None:
    assert module_short_name(module) == expected


@pytest.mark.parametrize(
    "module", ["model.layers.3.self_attn", "model.layers.x.mlp.up_proj", "lm_head", "model.layers.3.mlp.up_proj.lora"]
)
def test_module_short_name_rejects(module: str) -> None:
    with pytest.raises(VpdError, match=r"`module` .* is not an attention or MLP matrix of a supported family"):
        module_short_name(module)


def test_short_label_and_rows() -> None:
    assert short_label(NodeId.comp("model.layers.3.self_attn.o_proj", 281, 2)) == "3.attn.o:281@2"
    assert short_label(NodeId.delta("transformer.h.2.mlp.c_proj", 4)) == "2.mlp.down:delta@4"
    assert short_label(NodeId.emb(1)) == "emb:1"
    assert short_label(NodeId.logit(42, 6)) == "logit:42@6"
    # Block b spans rows 1 + 4b (q/k/v/qkv), 2 + 4b (o), 3 + 4b (gate/up), 4 + 4b (down).
    assert node_row(NodeId.emb(3)) == 0
    assert node_row(NodeId.comp("model.layers.0.self_attn.k_proj", 0, 0)) == 1
    assert node_row(NodeId.comp("transformer.h.0.attn.c_attn", 0, 0)) == 1
    assert node_row(NodeId.delta("model.layers.1.self_attn.o_proj", 0)) == 6
    assert node_row(NodeId.comp("model.layers.1.mlp.gate_proj", 0, 0)) == 7
    assert node_row(NodeId.comp("model.layers.1.mlp.up_proj", 0, 0)) == 7
    assert node_row(NodeId.comp("model.layers.1.mlp.down_proj", 0, 0)) == 8
    assert node_row(NodeId.logit(7, 2), n_blocks=2) == 9
    with pytest.raises(VpdError, match="`n_blocks` must be an int >= 0"):
        node_row(NodeId.logit(7, 2))


# ---------------------------------------------------------------------------------------------------
# The hand-solved graph. Node order and weights (source -> target: signed weight):
#
#   0 emb0, 1 emb1, 2 c2, 3 c3, 4 c4 (comp), 5 d5 (delta), 6 c6 (comp), 7 L7 (logit, p = 1/2)
#   emb0->c2 3, emb1->c2 -1, emb1->c3 2, c3->c4 3, emb0->c4 1, c2->c6 3, c4->c6 -1, d5->c6 1/2,
#   c2->L7 2, c6->L7 4, c4->L7 1, d5->L7 1/2
#
# Step 1, Â rows (|A| / row sum): c2 = emb0 3/4, emb1 1/4; c3 = emb1 1; c4 = c3 3/4, emb0 1/4;
#   c6 (sum 9/2) = c2 2/3, c4 2/9, d5 1/9; L7 (sum 15/2) = c2 4/15, c6 8/15, c4 2/15, d5 1/15.
# Step 2, for a DAG w(Â + Â² + …) satisfies infl_s = Σ_t (infl_t + w_t) Â[t, s]; top down:
#   c6 = 1/2·8/15 = 4/15;  c2 = 1/2·4/15 + 4/15·2/3 = 14/45;  c4 = 1/2·2/15 + 4/15·2/9 = 17/135;
#   d5 = 1/2·1/15 + 4/15·1/9 = 17/270;  c3 = 17/135·3/4 = 17/180;
#   emb0 = 14/45·3/4 + 17/135·1/4 = 143/540;  emb1 = 14/45·1/4 + 17/180 = 31/180;  L7 = 0.
# Step 3, in units of 1/540, sorted: c2 168, c6 144, emb0 143, emb1 93, c4 68, c3 51, d5 34 (total 701);
#   cumulative shares .240 .445 .649 .782 .879 .951 1. node_threshold 0.9 is first reached at c3,
#   so every node except d5 is kept.
# Step 4, Â' without d5: c6 = c2 3/4, c4 1/4; L7 = c2 2/7, c6 4/7, c4 1/7 (other rows unchanged).
#   Pruned influence: c6 2/7, c2 1/2·2/7 + 2/7·3/4 = 5/14, c4 1/2·1/7 + 2/7·1/4 = 1/7, c3 3/28.
# Step 5, scores Â'[t, s]·(infl'_t + w_t) in units of 1/56, sorted: c6->L7 16, emb0->c2 15, c2->c6 12,
#   c2->L7 8, emb1->c3 6, c3->c4 6, emb1->c2 5, c4->c6 4, c4->L7 4, emb0->c4 2 (total 78); cumulative
#   shares … .731 .808 .872 .923 …; edge_threshold 0.85 is first reached at emb1->c2, so the last three
#   edges go.
# Step 6: c4 has no kept output -> dropped; then c3->c4 goes and c3 has no output -> dropped. emb1 is
#   an embedding and stays even though emb1->c3 went with c3.
NAMES = ["emb0", "emb1", "c2", "c3", "c4", "d5", "c6", "L7"]
KINDS = ["emb", "emb", "comp", "comp", "comp", "delta", "comp", "logit"]
EDGES = {
    ("emb0", "c2"): 3.0,
    ("emb1", "c2"): -1.0,
    ("emb1", "c3"): 2.0,
    ("c3", "c4"): 3.0,
    ("emb0", "c4"): 1.0,
    ("c2", "c6"): 3.0,
    ("c4", "c6"): -1.0,
    ("d5", "c6"): 0.5,
    ("c2", "L7"): 2.0,
    ("c6", "L7"): 4.0,
    ("c4", "L7"): 1.0,
    ("d5", "L7"): 0.5,
}
INFLUENCE = [143 / 540, 31 / 180, 14 / 45, 17 / 180, 17 / 135, 17 / 270, 4 / 15, 0.0]
IDX = {name: i for i, name in enumerate(NAMES)}


def _adjacency() -> torch.Tensor:
    A = torch.zeros(8, 8, dtype=torch.float64)
    for (s, t), weight in EDGES.items():
        A[IDX[t], IDX[s]] = weight
    return A


def _graph() -> nx.DiGraph:
    G = nx.DiGraph(prompt="hand-built")
    for name, kind in zip(NAMES, KINDS, strict=True):
        G.add_node(
            name, kind=kind, **({"prob": 0.5} if kind == "logit" else {}), **({"ci": 0.5} if kind == "comp" else {})
        )
    for (s, t), weight in EDGES.items():
        G.add_edge(s, t, weight=weight)
    return G


def _snapshot(G: nx.DiGraph) -> tuple:
    return copy.deepcopy((list(G.nodes(data=True)), list(G.edges(data=True)), dict(G.graph)))


def test_normalized_abs_rows() -> None:
    A_hat = normalized_abs(_adjacency())
    expected = {("c6", "c2"): 2 / 3, ("c6", "c4"): 2 / 9, ("c6", "d5"): 1 / 9, ("L7", "c4"): 2 / 15}
    for (t, s), value in expected.items():
        assert A_hat[IDX[t], IDX[s]].item() == pytest.approx(value, abs=1e-15)
    row_sums = A_hat.sum(dim=1)
    assert torch.equal(row_sums[[0, 1, 5]], torch.zeros(3, dtype=torch.float64))  # no inputs: stays zero
    torch.testing.assert_close(row_sums[[2, 3, 4, 6, 7]], torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-15)


def test_influence_matches_hand_values() -> None:
    w = torch.zeros(8, dtype=torch.float64)
    w[IDX["L7"]] = 0.5
    torch.testing.assert_close(
        influence(_adjacency(), w), torch.tensor(INFLUENCE, dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_influence_prune_hand_graph() -> None:
    A = _adjacency()
    before = A.clone()
    masks = influence_prune(A, KINDS, torch.tensor([0.5], dtype=torch.float64), node_threshold=0.9, edge_threshold=0.85)
    assert torch.equal(A, before)
    kept_nodes = {"emb0", "emb1", "c2", "c6", "L7"}
    assert masks.node_mask.tolist() == [name in kept_nodes for name in NAMES]
    kept_edges = {("emb0", "c2"), ("emb1", "c2"), ("c2", "c6"), ("c2", "L7"), ("c6", "L7")}
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for s, t in kept_edges:
        expected[IDX[t], IDX[s]] = True
    assert torch.equal(masks.edge_mask, expected)
    torch.testing.assert_close(masks.influence, torch.tensor(INFLUENCE, dtype=torch.float64), rtol=0, atol=1e-12)


def test_influence_prune_keep_everything() -> None:
    masks = influence_prune(
        _adjacency(), KINDS, torch.tensor([0.5], dtype=torch.float64), node_threshold=1.0, edge_threshold=1.0
    )
    assert masks.node_mask.all()
    assert torch.equal(masks.edge_mask, _adjacency() != 0)


def test_influence_prune_always_keeps_embeddings_and_logits() -> None:
    # At threshold 0 only the top node (c2) passes the influence cut and only the top edge (c2 -> L7,
    # score 1·1/2 against 3/8 and 1/8 for its inputs) passes the edge cut; c2 then has no kept input, so
    # only the embeddings and the logit remain.
    masks = influence_prune(
        _adjacency(), KINDS, torch.tensor([0.5], dtype=torch.float64), node_threshold=0.0, edge_threshold=0.0
    )
    assert masks.node_mask.tolist() == [kind in ("emb", "logit") for kind in KINDS]
    assert not masks.edge_mask.any()


def test_cycle_raises() -> None:
    A = torch.zeros(3, 3, dtype=torch.float64)
    A[1, 0] = A[2, 1] = A[1, 2] = 1.0  # 0 -> 1 -> 2 -> 1
    w = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    with pytest.raises(VpdError, match="did not vanish after 1000 products, so `A` has a cycle"):
        influence(A, w)


@pytest.mark.parametrize("name", ["node_threshold", "edge_threshold"])
@pytest.mark.parametrize("value", [80, -0.1, 1.5])
def test_threshold_range(name: str, value: float) -> None:
    message = f"`{name}` must be in \\[0, 1\\]; got {value}. Pass a fraction such as 0.8."
    with pytest.raises(VpdError, match=message):
        influence_prune(_adjacency(), KINDS, torch.tensor([0.5], dtype=torch.float64), **{name: value})
    with pytest.raises(VpdError, match=message):
        prune_graph(_graph(), **{name: value})


def test_bad_inputs() -> None:
    probs = torch.tensor([0.5], dtype=torch.float64)
    with pytest.raises(VpdError, match="`kinds` must have one entry per node"):
        influence_prune(_adjacency(), KINDS[:-1], probs)
    with pytest.raises(VpdError, match="`kinds` holds error"):
        influence_prune(_adjacency(), [*KINDS[:-1], "error"], probs)
    with pytest.raises(VpdError, match=r"`logit_probs` must have shape \(1,\)"):
        influence_prune(_adjacency(), KINDS, torch.tensor([0.5, 0.5]))
    with pytest.raises(VpdError, match="`A` must be a dense square float tensor"):
        influence_prune(torch.zeros(8, 7), KINDS, probs)


def test_prune_graph_matches_masks_and_leaves_input_alone() -> None:
    G = _graph()
    before = _snapshot(G)
    H = prune_graph(G, node_threshold=0.9, edge_threshold=0.85)
    assert _snapshot(G) == before
    assert "influence" not in G.nodes["c2"]
    assert list(H.nodes) == ["emb0", "emb1", "c2", "c6", "L7"]
    assert set(H.edges) == {("emb0", "c2"), ("emb1", "c2"), ("c2", "c6"), ("c2", "L7"), ("c6", "L7")}
    assert H.edges["emb1", "c2"]["weight"] == -1.0
    assert H.graph == {"prompt": "hand-built"}
    for name in H.nodes:
        assert H.nodes[name]["influence"] == pytest.approx(INFLUENCE[IDX[name]], abs=1e-12)


def test_ci_threshold_and_top_k_leave_input_alone() -> None:
    G = _graph()
    G.nodes["c3"]["ci"] = 0.1
    before = _snapshot(G)
    H = ci_threshold(G, 0.1)
    # c3 goes (ci <= tau is dropped); c4 keeps its input emb0 -> c4, so nothing else dangles.
    assert set(H.nodes) == set(NAMES) - {"c3"}
    K = top_k_edges(G, 2)
    assert set(K.edges) == {("c6", "L7"), ("emb0", "c2")} and set(K.nodes) == set(NAMES)
    assert _snapshot(G) == before
    with pytest.raises(VpdError, match=r"`tau` must be in \[0, 1\]"):
        ci_threshold(G, 2)
    with pytest.raises(VpdError, match="`k` must be an int >= 0"):
        top_k_edges(G, -1)


def test_remove_dangling_cascades() -> None:
    # emb -> a -> b -> c (no output) and d (no input) -> logit; x is a delta with no output.
    G = nx.DiGraph()
    kinds = {"emb": "emb", "a": "comp", "b": "comp", "c": "comp", "d": "comp", "x": "delta", "out": "logit"}
    G.add_nodes_from((name, {"kind": kind}) for name, kind in kinds.items())
    G.add_edges_from([("emb", "a"), ("a", "b"), ("b", "c"), ("a", "out"), ("d", "out")])
    before = _snapshot(G)
    H = remove_dangling(G)
    assert set(H.nodes) == {"emb", "a", "out"}
    assert set(H.edges) == {("emb", "a"), ("a", "out")}
    assert _snapshot(G) == before


# ---------------------------------------------------------------------------------------------------
# Pruning on COO edges


def _random_dag(seed: int, n: int = 60, density: float = 0.15) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """A random layered DAG in node order: emb first, logits last, edges only from earlier to later nodes."""
    gen = torch.Generator().manual_seed(seed)
    kinds = ["emb"] * 5 + [("comp", "delta")[int(torch.rand(1, generator=gen) < 0.2)] for _ in range(n - 8)]
    kinds += ["logit"] * 3
    A = torch.randn(n, n, generator=gen, dtype=torch.float64) * (torch.rand(n, n, generator=gen) < density)
    A = torch.tril(A, diagonal=-1)  # A[target, source] with source < target
    for i, k in enumerate(kinds):
        if k in ("emb", "delta"):
            A[i] = 0  # sources only
        if k == "logit":
            A[:, i] = 0  # targets only
    probs = torch.rand(3, generator=gen, dtype=torch.float64)
    return A, kinds, probs / probs.sum()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("node_threshold", "edge_threshold"), [(0.8, 0.98), (0.5, 0.7), (1.0, 1.0)])
def test_prune_coo_equals_the_dense_algorithm(seed: int, node_threshold: float, edge_threshold: float) -> None:
    A, kinds, probs = _random_dag(seed)
    dense = influence_prune(A, kinds, probs, node_threshold=node_threshold, edge_threshold=edge_threshold)
    targets, sources = A.nonzero(as_tuple=True)
    w = torch.zeros(len(kinds), dtype=torch.float64)
    w[[i for i, k in enumerate(kinds) if k == "logit"]] = probs
    coo = prune_coo(
        len(kinds),
        targets,
        sources,
        A[targets, sources],
        kinds,
        w,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )
    torch.testing.assert_close(coo.influence, dense.influence, rtol=1e-12, atol=1e-15)
    assert torch.equal(coo.node_mask, dense.node_mask)
    assert torch.equal(coo.edge_mask, dense.edge_mask[targets, sources])
    assert int(dense.edge_mask.sum()) == int(coo.edge_mask.sum())  # no kept edge outside the nonzeros


def test_prune_coo_rejects_a_cycle_and_misaligned_edges() -> None:
    kinds = ["emb", "comp", "comp", "logit"]
    w = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    t, s = torch.tensor([1, 2, 1, 3]), torch.tensor([0, 1, 2, 2])  # 1 → 2 → 1 is a cycle
    with pytest.raises(VpdError, match="cycle"):
        prune_coo(4, t, s, torch.ones(4, dtype=torch.float64), kinds, w)
    with pytest.raises(VpdError, match="one length"):
        prune_coo(4, t, s[:3], torch.ones(4, dtype=torch.float64), kinds, w)
