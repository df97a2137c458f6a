"""`vpd demo` on the shipped model and decomposition: the princess graphs, both pruning types."""

from __future__ import annotations

import pytest

from attrgraph.export import load_graph_json
from decomposer.target.loading import load_target
from decomposer.target.quality import token_probability

pytestmark = pytest.mark.slow


def test_demo_json_and_adversarial_beats_ci_only(demo_run):
    summary, tmp_path = demo_run
    adv, ci = summary["graphs"]["adversarial"], summary["graphs"]["ci"]

    model, tokenizer = load_target("bundled")
    expected = token_probability(model, tokenizer, "The princess lost", " her")
    for g in (adv, ci):
        assert g["p_target"] == pytest.approx(expected, rel=1e-5)
        assert 0 < g["pruned_nodes"] <= g["graph_nodes"]
        for name in ("graph", "pruned", "html", "png"):
            assert (tmp_path / g["files"][name].rsplit("/", 1)[-1]).is_file()
        pruned = load_graph_json(g["files"]["pruned"])
        assert pruned.number_of_nodes() == g["pruned_nodes"]
        assert pruned.number_of_edges() == g["pruned_edges"]
        html = (tmp_path / g["files"]["html"].rsplit("/", 1)[-1]).read_text()
        assert "http://" not in html and "https://" not in html
        assert all(n in html for n in pruned.nodes)

    # Under adversarial masks the adversarially pruned graph keeps P(" her") at least 5x higher than the
    # CI-only graph, whose nodes only work under the one ablation pattern it was fit to.
    assert adv["p_adversarial"] > 0.1 and adv["p_adversarial"] >= 5 * ci["p_adversarial"]
    if ci["p_adversarial"] > 0:
        assert summary["adversarial_ratio"] == pytest.approx(adv["p_adversarial"] / ci["p_adversarial"])
    else:
        assert summary["adversarial_ratio"] is None
    assert adv["ci_nodes"] > ci["ci_nodes"]
