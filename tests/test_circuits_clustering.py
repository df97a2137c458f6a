"""MDL clustering of subcomponents: the cost, the greedy merges, the export and the grouped graph."""

from __future__ import annotations

import itertools
import json
import math

import networkx as nx
import pytest
import torch

from attrgraph.labels import component_key
from circuits.cli import main
from circuits.cluster.files import load_clusters, plot_clusters, save_clusters
from circuits.cluster.graph import group_graph
from circuits.cluster.mdl import Firing, cluster, description_length, firing_matrix
from decomposer.errors import ArtifactFormatError, VpdError
from tests.conftest import float64_decomposition, tiny_llama

QP, KP, OP = (f"model.layers.0.self_attn.{m}_proj" for m in "qko")


def _firing(rows: list[str], paths: list[str]) -> Firing:
    """Columns from strings of 0/1, one string per token."""
    F = torch.tensor([[ch == "1" for ch in row] for row in rows], dtype=torch.bool)
    return Firing(F, [component_key(p, i) for i, p in enumerate(paths)], paths, tau=0.1)


def _random_firing(seed: int, N: int = 60, n: int = 10) -> Firing:
    """Columns driven by a few shared latent causes plus noise, spread over three matrices."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.rand(N, 4, generator=gen) < 0.3
    loads = torch.rand(4, n, generator=gen) < 0.4
    F = (latent.double() @ loads.double() > 0) & (torch.rand(N, n, generator=gen) < 0.8)
    F |= torch.rand(N, n, generator=gen) < 0.05
    paths = [(QP, KP, OP)[i % 3] for i in range(n)]
    return Firing(F, [component_key(p, i) for i, p in enumerate(paths)], paths, tau=0.1)


def _merged(labels: list[int], a: int, b: int) -> list[int]:
    return [a if label == b else label for label in labels]


def _best_delta(f: Firing, labels: list[int], alpha: float, within: bool, ranks: list[float]) -> float:
    """The most negative ΔL over all allowed pairs, each recomputed from scratch."""
    before = description_length(f.F, labels, ranks, alpha)
    best = math.inf
    for a, b in itertools.combinations(sorted(set(labels)), 2):
        if within and f.paths[labels.index(a)] != f.paths[labels.index(b)]:
            continue
        best = min(best, description_length(f.F, _merged(labels, a, b), ranks, alpha) - before)
    return best


def test_cost_by_hand():
    # Tokens × columns:      t0: 1 1 0   t1: 1 1 0   t2: 0 0 1   t3: 1 0 0
    f = _firing(["110", "110", "001", "100"], [QP, QP, QP])
    # Singletons, α = 0.5: K = 3, s = (3, 2, 1), r = 1 each → 6·log2 3 + 0.5·6 = 9.50978 + 3 = 12.50978.
    assert description_length(f.F, [0, 1, 2], [1, 1, 1], 0.5) == pytest.approx(6 * math.log2(3) + 3.0, abs=1e-12)
    assert cluster(f, alpha=0.5, max_merges=0).cost_initial == pytest.approx(12.509775004326936, abs=1e-12)
    # {0, 1}, {2}: K = 2, s = (3, 1), r = (2, 1) → 3·(1 + 0.5·2) + 1·(1 + 0.5·1) = 6 + 1.5 = 7.5.
    assert description_length(f.F, [0, 0, 2], [1, 1, 1], 0.5) == pytest.approx(7.5, abs=1e-12)
    # Rank costs enter through r_g: ρ = (2, 1, 1) → 3·(1 + 0.5·3) + 1·(1 + 0.5) = 7.5 + 1.5 = 9.
    assert description_length(f.F, [0, 0, 2], [2, 1, 1], 0.5) == pytest.approx(9.0, abs=1e-12)
    # One group: K = 1 names nothing; s = 4, r = 3 → 4·(0 + 0.5·3) = 6.
    assert description_length(f.F, [5, 5, 5], [1, 1, 1], 0.5) == pytest.approx(6.0, abs=1e-12)


@pytest.mark.parametrize("within", [True, False])
@pytest.mark.parametrize(("alpha", "unit_ranks"), [(0.3, True), (1.0, True), (3.0, True), (0.5, False)])
def test_every_merge_delta_is_exact_and_greedy(within, alpha, unit_ranks):
    for seed in range(3):
        f = _random_firing(seed)
        n = len(f.keys)
        ranks = [1.0] * n if unit_ranks else [float(1 + (3 * i) % 4) for i in range(n)]
        res = cluster(f, alpha=alpha, within_matrix=within, rank_costs=None if unit_ranks else ranks)
        assert res.history, "the data should give at least one merge"
        labels = list(range(n))
        assert res.cost_initial == pytest.approx(description_length(f.F, labels, ranks, alpha), abs=1e-9)
        for step in res.history:
            before = description_length(f.F, labels, ranks, alpha)
            best = _best_delta(f, labels, alpha, within, ranks)
            labels = _merged(labels, step.a, step.b)
            after = description_length(f.F, labels, ranks, alpha)
            # ΔL from the co-firing bookkeeping equals the from-scratch difference ...
            assert step.delta == pytest.approx(after - before, abs=1e-9)
            assert step.cost == pytest.approx(after, abs=1e-9)
            assert step.tokens == int(f.F[:, [i for i in range(n) if labels[i] == step.a]].any(1).sum())
            # ... and is the most negative over every allowed pair.
            assert step.delta == pytest.approx(best, abs=1e-9) and step.delta < 0
            if within:
                assert f.paths[step.a] == f.paths[step.b]
        # Stopped because nothing lowers L any more (or nothing is left to merge).
        assert _best_delta(f, labels, alpha, within, ranks) >= 0 or res.stopped in ("no_candidates", "single_cluster")
        assert res.cost == pytest.approx(description_length(f.F, labels, ranks, alpha), abs=1e-9)
        same = [[labels[i] == labels[j] for j in range(n)] for i in range(n)]
        assert same == [[res.labels[i] == res.labels[j] for j in range(n)] for i in range(n)]
        members = res.clusters
        assert res.ranks == [sum(ranks[res.keys.index(k)] for k in members[c]) for c in sorted(members)]


def test_always_together_merge_never_together_do_not():
    # Columns 0 and 1 fire on tokens 0–9 only; column 2 on tokens 10–14; column 3 on 15–19.
    rows = ["1100"] * 10 + ["0010"] * 5 + ["0001"] * 5
    f = _firing(rows, [QP, QP, QP, QP])
    res = cluster(f, alpha=2.0)
    # Merging 0 and 1: ΔL = 30·(log2 3 − 2) − 10·log2 3 = −28.3 < 0. Then, with K = 3 and S = 20,
    # merging 2 and 3: ΔL = 20·(1 − log2 3) + 2·(5 + 5) = 8.3 > 0, and {0,1} with 2 (or 3):
    # 20·(1 − log2 3) + 2·(10·1 + 5·2) = 28.3 > 0.
    assert [(m.a, m.b) for m in res.history] == [(0, 1)]
    assert res.history[0].delta == pytest.approx(30 * (math.log2(3) - 2) - 10 * math.log2(3), abs=1e-9)
    assert res.stopped == "no_gain" and res.labels == [0, 0, 1, 2]
    assert res.tokens == [10, 5, 5] and res.ranks == [2.0, 1.0, 1.0]
    # The greedy answer is also the best of all 15 partitions here.
    best = min(
        description_length(f.F, labels, [1] * 4, 2.0)
        for labels in itertools.product(range(4), repeat=4)
        if labels[0] == 0
    )
    assert res.cost == pytest.approx(best, abs=1e-9)
    # Twins merge at any α: their ΔL has no α term (s_i r_j + s_j r_i − c_ij (r_i + r_j) = 0).
    assert cluster(f, alpha=50.0).labels[:2] == [0, 0]


def test_matrix_restriction_and_max_merges():
    # Columns 0 (q) and 1 (k) always fire together but live in different matrices.
    f = _firing(["110"] * 6 + ["001"] * 3, [QP, KP, KP])
    assert cluster(f, alpha=2.0, within_matrix=True).labels[0] != cluster(f, alpha=2.0, within_matrix=True).labels[1]
    across = cluster(f, alpha=2.0, within_matrix=False)
    assert across.labels[0] == across.labels[1]
    capped = cluster(_random_firing(0), alpha=0.3, within_matrix=False, max_merges=2)
    assert len(capped.history) == 2 and capped.stopped == "max_merges" and len(set(capped.labels)) == 8


def test_save_and_load_clusters(tmp_path):
    f = _firing(["1100"] * 10 + ["0010"] * 5 + ["0001"] * 5, [QP, QP, QP, QP])
    res = cluster(f, alpha=2.0)
    path = save_clusters(res, tmp_path / "clusters.json")
    data = load_clusters(path)
    assert data["format_version"] == 1 and data["mapping"] == {
        "0.attn.q:0": 0,
        "0.attn.q:1": 0,
        "0.attn.q:2": 1,
        "0.attn.q:3": 2,
    }
    assert data["clusters"][0] == {"id": 0, "members": ["0.attn.q:0", "0.attn.q:1"], "tokens": 10, "rank": 2.0}
    assert data["history"][0]["a"] == "0.attn.q:0" and data["history"][0]["b"] == "0.attn.q:1"
    assert data["cost"]["final"] == pytest.approx(res.cost) and data["n_clusters"] == 3
    assert plot_clusters(res, tmp_path / "clusters.png").read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**data, "format_version": 9}))
    with pytest.raises(ArtifactFormatError, match="version 9"):
        load_clusters(bad)


def _comp(module: str, c: int, t: int) -> str:
    return f"comp/{module}/{c}@{t}"


def test_group_graph_sums_weights():
    G = nx.DiGraph(prompt="x")
    q1, q2, q1_late, o5 = _comp(QP, 1, 0), _comp(QP, 2, 0), _comp(QP, 1, 1), _comp(OP, 5, 0)
    for node, ci in [(q1, 0.5), (q2, 0.9), (q1_late, 0.3), (o5, 1.0)]:
        G.add_node(node, kind="comp", pos=int(node[-1]), ci=ci)
    G.add_node("emb@0", kind="emb", pos=0)
    G.add_node("logit/3@1", kind="logit", pos=1, prob=0.4)
    edges = [
        ("emb@0", q1, 1.0),
        ("emb@0", q2, 2.5),
        (q1, o5, 0.5),
        (q2, o5, -0.25),
        (q1, q2, 0.7),
        (q1_late, "logit/3@1", 1.5),
        (o5, "logit/3@1", -2.0),
        ("emb@0", o5, 0.125),
    ]
    G.add_weighted_edges_from(edges)
    before = nx.node_link_data(G, edges="edges")
    H = group_graph(G, {"0.attn.q:1": 7, "0.attn.q:2": 7})
    assert nx.node_link_data(G, edges="edges") == before  # the input is untouched
    assert set(H) == {"cluster/7@0", "cluster/7@1", o5, "emb@0", "logit/3@1"}
    c0 = H.nodes["cluster/7@0"]
    assert c0["kind"] == "cluster" and c0["cluster"] == 7 and sorted(c0["members"]) == sorted([q1, q2])
    assert c0["ci"] == 0.9 and c0["internal_weight"] == pytest.approx(0.7)
    assert H.edges["emb@0", "cluster/7@0"]["weight"] == pytest.approx(3.5)
    assert H.edges["cluster/7@0", o5]["weight"] == pytest.approx(0.25)
    assert H.edges["cluster/7@1", "logit/3@1"]["weight"] == pytest.approx(1.5)
    assert H.edges[o5, "logit/3@1"]["weight"] == pytest.approx(-2.0)  # unmapped nodes keep their edges
    assert H.edges["emb@0", o5]["weight"] == pytest.approx(0.125)
    assert H.number_of_edges() == 5 and H.graph["prompt"] == "x" and H.graph["grouped"]
    # Total weight is conserved: edges between groups plus the weight inside groups.
    total = sum(w for *_, w in H.edges(data="weight")) + sum(H.nodes[n].get("internal_weight", 0.0) for n in H)
    assert total == pytest.approx(sum(w for *_, w in edges))


def test_firing_matrix_matches_direct_ci():
    torch.manual_seed(0)
    d = float64_decomposition(tiny_llama(), [{"pattern": "model.layers.*.self_attn.*_proj", "C": 8}])
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 40, (2, 5), generator=gen) for _ in range(3)]
    tau = 0.3
    f = firing_matrix(d, batches, tau, progress=False)
    with torch.no_grad():
        direct = []
        for batch in batches:
            g = d.network_ci(batch)
            direct.append(torch.cat([g[p].reshape(-1, 8) > tau for p in d.module_paths], dim=1))
    full = torch.cat(direct)
    alive = full.any(0)
    assert 0 < int(alive.sum()) < full.shape[1], "the test needs some dead and some alive subcomponents"
    assert torch.equal(f.F, full[:, alive]) and f.n_total == full.shape[1] == 64 and f.F.shape[0] == 30
    names = [component_key(p, c) for p in d.module_paths for c in range(8)]
    assert f.keys == [k for k, a in zip(names, alive.tolist(), strict=True) if a]
    assert f.keys[0].startswith("0.attn.") and all(p in d.module_paths for p in f.paths)


def test_bad_inputs():
    f = _firing(["11"], [QP, QP])
    with pytest.raises(VpdError, match="`alpha` must be a positive"):
        cluster(f, alpha=0.0)
    with pytest.raises(VpdError, match="`rank_costs`"):
        cluster(f, rank_costs=[1.0])
    with pytest.raises(VpdError, match="`keys` and `paths`"):
        Firing(f.F, ["a"], [QP], 0.1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokens", "0"], "`--tokens` must be at least 1"),
        (["--alpha", "-1"], "`--alpha` must be positive"),
        (["--tau", "1.5"], "`--tau` must be in [0, 1)"),
    ],
)
def test_cluster_cli_bad_input(args, message, capsys, tmp_path):
    assert main(["cluster", "--run", str(tmp_path / "missing"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
