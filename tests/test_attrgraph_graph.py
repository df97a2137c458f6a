"""The graph builder: a prompt becomes a labelled DiGraph that exports and renders."""

import pytest
import torch

from attrgraph.export import from_node_link, to_node_link
from attrgraph.nodes import NodeId, module_short_name
from attrgraph.reference import build_graph
from attrgraph.render import render_html
from decomposer.errors import VpdError
from decomposer.vpd.config import DecomposeConfig
from decomposer.vpd.run import Decomposition

NODE_ATTRS = {"kind", "module", "block", "sublayer", "pos", "index", "row", "ci", "activation", "label", "token"}


@pytest.fixture(scope="module")
def micro(micro_data_dir, tmp_path_factory):
    from decomposer.target import load_target, train_target
    from tests.conftest import micro_config

    out = tmp_path_factory.mktemp("graph-target")
    train_target(micro_config(micro_data_dir, steps=4), out)
    target, tokenizer = load_target(str(out / "model"))
    config = DecomposeConfig.model_validate(
        {
            "target": str(out / "model"),
            "modules": [
                {"pattern": "model.layers.*.self_attn.*_proj", "C": 4},
                {"pattern": "model.layers.*.mlp.*_proj", "C": 4},
            ],
            "ci": {"kind": "mlp", "hidden": 4},
        }
    )
    torch.manual_seed(0)
    return Decomposition.create(config, target), tokenizer


def test_graph_nodes_edges_and_attributes(micro):
    d, tok = micro
    G = build_graph(d, tok, "The princess lost her", target_token=" her")
    assert G.graph["prompt_tokens"] == [tok.decode([i]) for i in tok("The princess lost her")["input_ids"]]
    kinds = {G.nodes[n]["kind"] for n in G}
    assert kinds == {"comp", "emb", "delta", "logit"}
    for n, attrs in G.nodes(data=True):
        node = NodeId.parse(n)
        assert str(node) == n and NODE_ATTRS <= set(attrs), n
        assert (node.kind, node.pos, node.index) == (attrs["kind"], attrs["pos"], attrs["index"]), n
    logits = [n for n in G if G.nodes[n]["kind"] == "logit"]
    target_id = tok(" her", add_special_tokens=False)["input_ids"][0]
    assert logits[0] == str(NodeId.logit(target_id, G.graph["target_pos"]))
    assert G.nodes[logits[0]]["is_target"] and 0 < G.nodes[logits[0]]["prob"] < 1
    assert [G.nodes[n]["logit_token"] for n in logits] == [tok.decode([G.nodes[n]["token_id"]]) for n in logits]
    assert G.number_of_edges() > 0 and all(w != 0 for *_, w in G.edges(data="weight"))
    for u, v, cross in G.edges(data="cross_position"):
        if cross:
            assert G.nodes[u]["sublayer"] in ("k", "v") and G.nodes[v]["sublayer"] == "o", (u, v)
    assert from_node_link(to_node_link(G)).nodes(data=True) == G.nodes(data=True)


def test_graph_renders_and_takes_user_labels(micro, tmp_path):
    d, tok = micro
    first = next(n for n in build_graph(d, tok, "The princess lost") if n.startswith("comp/"))
    node = NodeId.parse(first)
    block, part, short = module_short_name(node.module)
    G = build_graph(d, tok, "The princess lost", labels={f"{block}.{part}.{short}:{node.index}": "my label"})
    named = [n for n in G if n.startswith(f"comp/{node.module}/{node.index}@")]
    assert first in named and all(G.nodes[n]["label"].endswith(" my label") for n in named)
    html = render_html(G, tmp_path / "g.html").read_text()
    assert all(n in html for n in G)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "  "}, "`prompt` is empty"),
        ({"prompt": "The princess", "target_token": " her crown"}, r"is \d+ tokens, not one"),
        ({"prompt": "The princess", "target_pos": 9}, "`target_pos` 9 is out of range"),
        ({"prompt": "the " * 80}, "longer than the model's context of 64"),
    ],
)
def test_bad_graph_inputs(micro, kwargs, message):
    d, tok = micro
    with pytest.raises(VpdError, match=message):
        build_graph(d, tok, **kwargs)
