"""Labels kept beside a run (`labels.json`) win over harvest labels and reach graph nodes."""

from __future__ import annotations

import json

from attrgraph.labels import label_for, labels_for_run
from attrgraph.nodes import NodeId


def test_run_labels_file(tmp_path):
    assert labels_for_run(tmp_path) == {}
    (tmp_path / "labels.json").write_text(json.dumps({"1.attn.q:3": "previous-token query", "2.mlp.down:7": ""}))
    labels = labels_for_run(tmp_path)
    assert labels == {"1.attn.q:3": "previous-token query"}  # empty labels are dropped
    node = NodeId.comp("model.layers.1.self_attn.q_proj", 3, 4)
    assert label_for(labels, node) == "previous-token query"
    assert label_for(labels, NodeId.comp("model.layers.1.self_attn.q_proj", 4, 4)) is None
