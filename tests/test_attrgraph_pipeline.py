"""`attribute_prompt`: one prompt through the tensor pipeline, its node budget, artifacts and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from attrgraph.artifact import load_full_graph, tensors_path
from attrgraph.edges import attribute
from attrgraph.nodes import KINDS
from attrgraph.pipeline import FILES, PHASES, attribute_prompt
from attrgraph.prune import prune_graph
from attrgraph.reference import build_graph, influence_prune
from attrgraph.settings import L_MIN, GraphSettings, graph_settings
from circuits.cli import main
from decomposer.errors import ArtifactFormatError, VpdError

PROMPT = "The princess lost her crown and the prince"


@pytest.fixture(scope="module")
def bundled():
    from decomposer.vpd.load import load_run

    d, tokenizer, _ = load_run("bundled")
    return d, tokenizer


@pytest.fixture(scope="module")
def unbudgeted(bundled):
    d, tok = bundled
    return attribute_prompt(d, tok, PROMPT, settings=GraphSettings(max_nodes=None, qk_top=0))


def _edges(table, keep=None) -> dict[tuple[str, str], float]:
    names = [str(n) for n in table.nodes()]
    t, s, w = table.targets.tolist(), table.sources.tolist(), table.weights.tolist()
    keep = [True] * len(t) if keep is None else keep.tolist()
    return {(names[si], names[ti]): wi for ti, si, wi, k in zip(t, s, w, keep, strict=True) if k}


def test_unbudgeted_graph_equals_the_dense_reference(bundled, unbudgeted):
    """No budget (or one that does not bind) gives exactly the dense `attribute` graph and its dense pruning."""
    d, tok = bundled
    g = unbudgeted
    with torch.no_grad():
        _, xs = d.model.forward_with_inputs(g.tokens)
        ci = {p: v[0] for p, v in d.causal_importance(xs)[0].items()}
    logit_tokens = g.table.logit_tokens
    dense = attribute(d, g.tokens, ci=ci, logit_tokens=logit_tokens)
    assert [str(n) for n in dense.nodes] == [str(n) for n in g.table.nodes()]
    torch.testing.assert_close(g.table.dense(), dense.A, rtol=0, atol=0)

    kinds = [n.kind for n in dense.nodes]
    ref = influence_prune(dense.A.double(), kinds, g.probs[logit_tokens])
    assert torch.equal(ref.node_mask.cpu(), g.masks.node_mask.cpu())
    kept_edges = ref.edge_mask[g.table.targets, g.table.sources]
    assert torch.equal(kept_edges.cpu(), g.masks.edge_mask.cpu())
    torch.testing.assert_close(g.masks.influence, ref.influence, rtol=1e-12, atol=1e-15)
    # The networkx path of earlier releases (full graph, then prune_graph) agrees node for node.
    old = prune_graph(build_graph(d, tok, PROMPT))
    assert set(old.nodes) == set(g.pruned.nodes) and set(old.edges) == set(g.pruned.edges)

    loose = attribute_prompt(d, tok, PROMPT, settings=GraphSettings(max_nodes=g.table.n_candidates, qk_top=0))
    assert set(loose.pruned.nodes) == set(g.pruned.nodes) and set(loose.pruned.edges) == set(g.pruned.edges)


def test_binding_budget_keeps_exact_edges_into_its_nodes(bundled, unbudgeted):
    d, tok = bundled
    full = unbudgeted
    budget = full.table.n_candidates // 10
    g = attribute_prompt(d, tok, PROMPT, settings=GraphSettings(max_nodes=budget, qk_top=0))
    is_comp = g.table.kind == KINDS.index("comp")
    assert int(is_comp.sum()) == budget and g.table.n_candidates == full.table.n_candidates
    assert int((g.table.kind != KINDS.index("comp")).sum()) == int((full.table.kind != KINDS.index("comp")).sum())
    mine, every = _edges(g.table), _edges(full.table)
    kept = {str(n) for n in g.table.nodes()}
    among_kept = {e: w for e, w in every.items() if e[0] in kept and e[1] in kept}
    assert mine == among_kept  # every edge between kept nodes, with the unbudgeted (exact) weight
    # The budget goes to influential nodes: those chosen carry nearly the influence of the best possible choice.
    full_names = [str(n) for n in full.table.nodes()]
    influence = dict(zip(full_names, full.masks.influence.tolist(), strict=True))
    comp_names = [n for n, k in zip(full_names, full.table.kind.tolist(), strict=True) if KINDS[k] == "comp"]
    chosen = sum(influence[n] for n in comp_names if n in kept)
    best = sum(sorted((influence[n] for n in comp_names), reverse=True)[:budget])
    assert chosen >= 0.95 * best


def test_save_writes_every_file_and_the_full_graph_reads_back(unbudgeted, tmp_path):
    g = unbudgeted
    paths = g.save(tmp_path, stem="princess")
    assert set(paths) == {"graph", "pruned", "circuit_tracer", "html", "png"}
    for kind, path in paths.items():
        assert path.name == FILES[kind].format(stem="princess") and path.stat().st_size > 0
    table, meta, influence = load_full_graph(paths["graph"])
    for name in ("kind", "pos", "module", "index", "activation", "ci", "targets", "sources", "weights"):
        assert torch.equal(getattr(table, name), getattr(g.table, name).cpu()), name
    assert torch.equal(influence, g.masks.influence.cpu()) and table.logit_tokens == g.table.logit_tokens
    assert meta["prompt"] == PROMPT and meta["settings"]["max_nodes"] is None

    data = json.loads(paths["graph"].read_text())
    paths["graph"].write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(ArtifactFormatError, match="version 99"):
        load_full_graph(paths["graph"])
    tensors_path(paths["graph"]).unlink()
    with pytest.raises(ArtifactFormatError, match="must both exist"):
        load_full_graph(paths["graph"])


def test_memory_estimate_refuses_with_the_setting_that_lowers_it(bundled):
    d, tok = bundled
    with pytest.raises(VpdError, match=r"needs about .* GB.*`batch_size`.*`max_nodes`"):
        attribute_prompt(d, tok, PROMPT, settings=GraphSettings(max_memory_gb=1e-4))


def test_settings_hold_the_defaults_and_refuse_bad_values():
    s = GraphSettings()
    assert s.lambda_min is None and graph_settings(optimize="ci").lambda_min == L_MIN["ci"] == 1.0
    assert graph_settings(optimize="adversarial").lambda_min == 0.09 and graph_settings(l_min=0.5).l_min == 0.5
    with pytest.raises(Exception, match="frozen"):
        s.max_nodes = 3
    for bad in (0, -2, 2.5, "many", True):
        with pytest.raises(VpdError, match=r"`max_nodes` must be a positive integer"):
            graph_settings(max_nodes=bad)
    with pytest.raises(VpdError, match="node_threshold"):
        graph_settings(node_threshold=1.5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-nodes", "0"], "`max_nodes` must be a positive integer"),
        (["--max-nodes", "lots"], "`max_nodes` must be a positive integer"),
        (["--batch-size", "0"], "`batch_size` must be a positive integer"),
    ],
)
def test_cli_bad_budget_is_one_sentence_and_exit_2(extra, message, tmp_path, capsys):
    assert main(["graph", "--run", "bundled", "--prompt", PROMPT, "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_prompt_past_the_context_is_one_sentence_and_exit_2(bundled, tmp_path, capsys):
    d, _ = bundled
    context = d.model.target.config.max_position_embeddings
    assert main(["graph", "--run", "bundled", "--prompt", "the " * (context + 8), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"longer than the model's context of {context}" in err and len(err.splitlines()) == 1


def test_each_phase_is_timed_and_logged(bundled, caplog):
    d, tok = bundled
    with caplog.at_level("INFO", logger="attrgraph.pipeline"):
        g = attribute_prompt(d, tok, "The princess lost", settings=GraphSettings(qk_top=0))
    assert list(g.timings) == list(PHASES) and all(t >= 0 for t in g.timings.values())
    logged = [r.getMessage() for r in caplog.records if r.name == "attrgraph.pipeline"]
    assert [m.split(":")[0] for m in logged] == [f"phase {p}" for p in PHASES]
