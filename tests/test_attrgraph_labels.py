"""Labels: their sources and precedence in a run folder, and the offline label read from a card."""

from __future__ import annotations

import json

import pytest

from attrgraph.labels import label_for, labels_for_run
from attrgraph.nodes import NodeId
from decomposer.errors import VpdError


def test_run_labels_file(tmp_path):
    assert labels_for_run(tmp_path) == {}
    (tmp_path / "labels.json").write_text(json.dumps({"1.attn.q:3": "previous-token query", "2.mlp.down:7": ""}))
    labels = labels_for_run(tmp_path)
    assert labels == {"1.attn.q:3": "previous-token query"}  # empty labels are dropped
    node = NodeId.comp("model.layers.1.self_attn.q_proj", 3, 4)
    assert label_for(labels, node) == "previous-token query"
    assert label_for(labels, NodeId.comp("model.layers.1.self_attn.q_proj", 4, 4)) is None


def _tok(i, token, **scores):
    return {"id": i, "token": token, **scores}


def test_card_label_names_precision_words_and_what_it_writes():
    from attrgraph.labels import card_label

    card = {
        "density": 0.01,
        "inputs": [_tok(1, "ou", precision=0.84, recall=0.6), _tok(2, " so", precision=0.5, recall=0.4)],
        "words": [["could", 0.4], ["the", 0.2], ["would", 0.1], ["should", 0.02]],
        "outputs": [_tok(5, " be", pmi=1.2), _tok(6, " have", pmi=1.0), _tok(7, " x", pmi=-0.1)],
    }
    # Words that do not hold the token ("the") or are too rare ("should") are left out.
    assert card_label(card) == "fires on 84% of 'ou' in could, would, also ' so' → next ' be' ' have'"
    # A second token far below the first (F1 under half) is not named; a rare precision reads <1%.
    far = [_tok(1, "ou", precision=0.004, recall=0.9), _tok(2, " so", precision=0.002, recall=0.001)]
    weak = {**card, "inputs": far}
    assert card_label(weak).startswith("fires on <1% of 'ou' in could, would →")
    # The lens is named only where the model does predict its top tokens more at the firings.
    lens = {"promotes": [_tok(9, "cial"), _tok(5, " be")], "suppresses": [_tok(8, " his")]}
    assert card_label({**card, **lens}).endswith("→ promotes ' be', suppresses ' his'")
    assert card_label({**card, **lens, "outputs": [_tok(6, " have", pmi=1.0)]}).endswith("→ next ' have'")
    assert card_label({"density": 0.35, "inputs": [_tok(3, ".", precision=0.99, recall=0.2)]}) == (
        "broad (35% of tokens), fires on 99% of '.'"
    )
    assert card_label({"density": 0.35}) == "fires on 35% of tokens"
    assert card_label({}) == ""


def test_labels_for_run_layers_sources(tmp_path):
    from attrgraph.labels import label_source, read_label_file

    (tmp_path / "harvest.json").write_text(
        json.dumps(
            {
                "format": "harvest",
                "format_version": 1,
                "components": {
                    "1.attn.q:3": {"input_precision": [_tok(1, " a", precision=0.5)]},
                    "1.attn.q:4": {"input_precision": [_tok(2, " b", precision=0.5)]},
                    "1.attn.q:5": {"input_precision": [_tok(3, " c", precision=0.5)]},
                },
            }
        )
    )
    (tmp_path / "labels.json").write_text(json.dumps({"1.attn.q:4": "mine"}))
    (tmp_path / "autointerp").mkdir()
    llm = {"format": "vpd-labels", "format_version": 1, "source": "llm", "model": "m", "labels": {"1.attn.q:5": "x"}}
    (tmp_path / "autointerp" / "labels.json").write_text(json.dumps(llm))
    labels = labels_for_run(tmp_path)
    assert labels == {"1.attn.q:3": "fires on ' a'", "1.attn.q:4": "mine", "1.attn.q:5": "x"}
    assert [label_source(labels[k]) for k in sorted(labels)] == ["stats", "user", "llm"]
    assert label_source("plain") == "user" and label_source(None) is None
    assert read_label_file(tmp_path / "autointerp" / "labels.json")["1.attn.q:5"].source == "llm"
    for bad, message in (
        ({**llm, "format_version": 7}, "format_version 7"),
        ({**llm, "source": "oracle"}, "needs a `source` among stats, llm, user"),
    ):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(VpdError, match=message):
            read_label_file(tmp_path / "bad.json")
