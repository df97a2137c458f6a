"""ComponentKey: the one string form of a subcomponent, `{block}.{part}.{matrix}:{c}[@{t}]`."""

from __future__ import annotations

import pytest

from attrgraph.labels import component_key
from attrgraph.nodes import ComponentKey, NodeId, resolve_component, short_label
from decomposer.errors import VpdError

Q1 = "model.layers.1.self_attn.q_proj"
DOWN2 = "model.layers.2.mlp.down_proj"
CS = {Q1: 8, DOWN2: 16}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("2.mlp.down:17", ComponentKey("2.mlp.down", 17)),
        ("2.mlp.down:17@3", ComponentKey("2.mlp.down", 17, 3)),
        ("1.attn.q:0@0", ComponentKey("1.attn.q", 0, 0)),
        (f"{DOWN2}:5", ComponentKey(DOWN2, 5)),
        ("enc:2", ComponentKey("enc", 2)),  # a plain torch module outside the registry
    ],
)
def test_parse_is_the_inverse_of_str(text, key):
    assert ComponentKey.parse(text) == key and str(key) == text


def test_of_uses_the_registrys_short_name_else_the_module_path():
    assert ComponentKey.of(DOWN2, 17, 3) == ComponentKey("2.mlp.down", 17, 3)
    assert ComponentKey.of("transformer.h.1.mlp.c_fc", 4).matrix == "1.mlp.up"
    assert ComponentKey.of("enc", 2) == ComponentKey("enc", 2)
    assert component_key(Q1, 31) == "1.attn.q:31"


def test_a_graph_label_reads_back_as_the_nodes_key():
    node = NodeId.comp(Q1, 31, 4)
    assert short_label(node) == "1.attn.q:31@4"
    assert ComponentKey.parse(short_label(node)) == ComponentKey.of(node.module, node.index, node.pos)


def test_the_old_label_form_is_refused_with_the_new_one():
    with pytest.raises(VpdError, match=r"puts the position before the index.*write 2\.mlp\.down:17@3 ") as err:
        ComponentKey.parse("2.mlp.down:3:17")
    assert str(err.value).count(". ") == 0  # one sentence


@pytest.mark.parametrize("text", ["2.mlp.down", "2.mlp.down:", "2.mlp.down:017", "2.mlp.down:1@", "a/b:1", "x:-1", ""])
def test_malformed_keys_are_refused(text):
    with pytest.raises(VpdError, match=r"is not a subcomponent key; write block\.part\.matrix:c"):
        ComponentKey.parse(text)


def test_fields_are_checked():
    with pytest.raises(VpdError, match="`index` of a component key must be an int >= 0"):
        ComponentKey("1.attn.q", -1)
    with pytest.raises(VpdError, match="`matrix` of a component key"):
        ComponentKey("1.attn.q:3", 1)


def test_resolve_by_short_name_or_path_and_refuse_what_is_not_decomposed():
    assert ComponentKey.parse("2.mlp.down:15").resolve(CS) == DOWN2
    assert resolve_component(CS, f"{Q1}:7") == (Q1, 7)
    with pytest.raises(VpdError, match=r"`component` '2\.mlp\.down:16' has index 16, but 2\.mlp\.down has C=16"):
        resolve_component(CS, "2.mlp.down:16")
    with pytest.raises(VpdError, match=r"names no decomposed matrix; use one of 2\.mlp\.down"):
        resolve_component(CS, "2.mlp.up:1")
    with pytest.raises(VpdError, match=r"names one position, .* write 2\.mlp\.down:1\.$"):
        resolve_component(CS, "2.mlp.down:1@4")
