"""Reviving dead subcomponents (decomposer/vpd/revive.py): schedule, the piece and CI it sets, what it leaves alone."""

from __future__ import annotations

import pytest
import torch

from decomposer.errors import VpdError
from decomposer.vpd import train as train_module
from decomposer.vpd.config import DecomposeConfig, ReviveConfig
from decomposer.vpd.revive import candidate_rows, revival_due, revive_dead
from decomposer.vpd.run import Decomposition
from decomposer.vpd.toys import TMS
from decomposer.vpd.train import decompose
from tests.conftest import toy_batches, toy_config, toy_target

ALIVE = (0, 1, 2)  # W_in subcomponents forced on for every row; the rest are forced dead


def _decomposition(kind: str = "mlp") -> Decomposition:
    torch.manual_seed(0)
    target = TMS(8, 3)
    config = DecomposeConfig(
        target="tms",
        modules=[{"pattern": "W_in", "C": 12}, {"pattern": "W_out", "C": 12}],
        ci={"kind": kind, "hidden": 2},
        revive={"every": 1, "per_matrix": 3},
    )
    d = Decomposition.create(config, target, seed=0)
    with torch.no_grad():
        for path in d.module_paths:
            net = d.ci_fn.network(path)
            net.b_out.fill_(-10.0)  # z ≪ 0: CI 0 on every row
            if path == "W_in":
                net.b_out[list(ALIVE)] = 10.0  # z ≫ 1: CI 1 on every row
    return d


def _batch(n: int = 64) -> torch.Tensor:
    # Dense rows, so no two share a direction and each revived subcomponent names its row.
    return torch.rand(n, 8, generator=torch.Generator().manual_seed(1))


def test_revival_schedule():
    cfg = ReviveConfig(every=250, start=300, until_frac=0.6)
    due = [s for s in range(3000) if revival_due(cfg, s, 3000)]
    assert due == list(range(300, 1801, 250))
    assert not any(revival_due(ReviveConfig(every=0), s, 3000) for s in range(3000))


def test_candidate_rows_skip_rows_the_on_subcomponents_explain():
    W = torch.randn(4, 6)
    x = torch.randn(5, 6)
    x[3] *= 10  # a large input
    on_out = x @ W.T
    on_out[1] = 0.0  # nothing on: all of W x unexplained
    on_out[3] *= 0.5  # half of it, but of ten times the size: ranked first
    on_out[4] *= 0.95  # 5%: under the threshold
    assert candidate_rows(x, W, on_out, 0.1).tolist() == [3, 1]


@pytest.mark.parametrize("kind", ["mlp", "vector_mlp"])
def test_a_revived_subcomponent_is_W_on_its_rows_direction_and_on_only_there(kind):
    d = _decomposition(kind)
    batch = _batch()
    before = {p: (d.model.components(p).V.clone(), d.model.components(p).U.clone()) for p in d.module_paths}
    _, xs = d.model.forward_with_inputs(batch)
    assert revive_dead(d, batch, d.config.revive) == 6  # 3 per matrix
    for path in d.module_paths:
        comp = d.model.components(path)
        changed = [c for c in range(comp.C) if not torch.equal(comp.V[:, c], before[path][0][:, c])]
        assert len(changed) == 3 and not set(changed) & (set(ALIVE) if path == "W_in" else set())
        x = xs[path]
        x_hat = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        reads = []
        for c in changed:
            v = comp.V[:, c]
            row = int((x_hat @ v).abs().argmax())
            xr = x_hat[row]
            assert torch.allclose(v / v.norm(), xr, atol=1e-5)  # reads the row's own direction
            piece = torch.outer(comp.U[c], comp.V[:, c])  # (d_out, d_in), this subcomponent alone
            assert torch.allclose(piece, comp.weight @ torch.outer(xr, xr), atol=1e-5)
            reads.append(xr)
            # CI 1 at the row's input, 0 at half of it and at zero.
            probe = torch.stack([x[row], 0.5 * x[row], torch.zeros_like(x[row])])
            z = d.ci_fn.network(path)(probe, comp.component_acts(probe))[:, c]
            assert z[0].item() == pytest.approx(1.0, abs=1e-5) and z[1].item() <= 1e-6 and abs(z[2].item()) < 1e-2
        cos = torch.stack(reads) @ torch.stack(reads).T
        assert (cos - torch.eye(3)).abs().max() <= 0.9  # three distinct directions
    comp = d.model.components("W_in")
    for c in ALIVE:  # alive subcomponents are untouched
        assert torch.equal(comp.V[:, c], before["W_in"][0][:, c]) and torch.equal(comp.U[c], before["W_in"][1][c])


def test_only_the_matrices_the_patterns_match_are_revived():
    d = _decomposition()
    before = d.model.components("W_in").V.clone()
    assert revive_dead(d, _batch(), ReviveConfig(every=1, per_matrix=3, patterns=("W_o*",))) == 3
    assert torch.equal(d.model.components("W_in").V, before)


def test_revival_restarts_the_moments_of_the_revived_entries_only():
    d = _decomposition()
    uv, ci_params = d.trainable_parameters()
    opt = torch.optim.AdamW(uv + ci_params, lr=1e-3)
    for p in uv + ci_params:
        p.grad = torch.randn_like(p)
    opt.step()
    V = d.model.components("W_in").V
    m_before = opt.state[V]["exp_avg"].clone()
    revive_dead(d, _batch(), d.config.revive, opt)
    m = opt.state[V]["exp_avg"]
    zeroed = [c for c in range(V.shape[1]) if torch.all(m[:, c] == 0)]
    assert len(zeroed) == 3 and not set(zeroed) & set(ALIVE)
    kept = [c for c in range(V.shape[1]) if c not in zeroed]
    assert torch.equal(m[:, kept], m_before[:, kept])
    assert torch.all(opt.state[V]["exp_avg_sq"][:, zeroed] > 0)


def test_revival_is_refused_for_a_shared_ci_network_and_across_ranks(tmp_path, monkeypatch):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"revive.every .* shared_mlp"):
        DecomposeConfig(modules=[{"pattern": "W_in", "C": 4}], ci={"kind": "shared_mlp"}, revive={"every": 10})
    monkeypatch.setattr(train_module, "_world", lambda: (0, 2))
    config = toy_config().model_copy(update={"revive": ReviveConfig(every=2)})
    with pytest.raises(VpdError, match=r"`revive.every` .* one process"):
        decompose(config, tmp_path, target=toy_target(), batches=toy_batches)
