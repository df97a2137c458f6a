"""Per-prompt CI optimisation and the faithfulness report (docs/attribution-graphs.md §4, §5)."""

from __future__ import annotations

import pytest
import torch

from attrgraph.optimize import _base_z, faithfulness, optimize_ci, pgd_sources, uniform_sources
from attrgraph.settings import optimize_settings as _opt
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition
from tests.conftest import float64_decomposition, tiny_llama

T, VOCAB, C = 5, 40, 6
POS, TOK = T - 1, 7
MODULES = [{"pattern": "model.layers.*.self_attn.*_proj", "C": C}, {"pattern": "model.layers.*.mlp.*_proj", "C": C}]


@pytest.fixture(scope="module")
def setup() -> tuple[Decomposition, torch.Tensor]:
    torch.manual_seed(0)
    d = float64_decomposition(tiny_llama(vocab=VOCAB), MODULES)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, (1, T + 2), generator=gen)  # longer than t* + 1: truncation is exercised
    return d, tokens


def _n_nonzero(g: dict[str, torch.Tensor]) -> int:
    return sum(int((v > 0).sum()) for v in g.values())


def test_base_alive_set_is_mixed(setup):
    # The tests below only mean something if the CI network leaves some entries dead and some alive.
    d, tokens = setup
    z = _base_z(d, tokens[:, : POS + 1])
    n_alive, n_all = sum(int((v > 0).sum()) for v in z.values()), sum(v.numel() for v in z.values())
    assert 0 < n_alive < n_all


@pytest.mark.parametrize("mode", ["adversarial", "ci", "stochastic"])
def test_non_alive_stay_zero(setup, mode):
    d, tokens = setup
    res = optimize_ci(
        d, tokens, target_pos=POS, target_token=TOK, settings=_opt(mode=mode, steps=12, lr=0.1, log_every=4)
    )
    z = _base_z(d, tokens[:, : POS + 1])
    assert set(res.g) == set(d.module_paths)
    for path, g in res.g.items():
        assert g.shape == (POS + 1, C) and not g.requires_grad
        assert torch.equal(res.alive[path], z[path] > 0)
        assert (g[~res.alive[path]] == 0).all()
        assert not ((g > 0) & ~res.alive[path]).any()  # result's alive set ⊆ base alive set
        assert ((g >= 0) & (g <= 1)).all()
    assert len(res.losses) == 4 and res.settings["mode"] == mode and res.settings["warmup_steps"] == 1
    # Only φ is optimised: no gradient lands on the decomposition's own parameters.
    assert all(t.grad is None for t in [*d.model.parameters(), *d.ci_fn.parameters()])


def test_ci_mode_minimality_prunes_and_ce_decreases(setup):
    d, tokens = setup
    n_base = _n_nonzero(_base_z(d, tokens[:, : POS + 1]))
    sparse = optimize_ci(
        d, tokens, target_pos=POS, target_token=TOK, settings=_opt(mode="ci", steps=40, lr=0.1, l_min=10.0)
    )
    assert _n_nonzero(sparse.g) < 0.5 * n_base
    ce_only = optimize_ci(
        d, tokens, target_pos=POS, target_token=TOK, settings=_opt(mode="ci", steps=40, lr=0.1, l_min=0.0, log_every=1)
    )
    assert len(ce_only.losses) == 40
    assert ce_only.losses[-1] < ce_only.losses[0] - 1e-3


def test_adversary_moves_only_alive_entries(setup):
    d, tokens = setup
    toks = tokens[:, : POS + 1]
    gen = torch.Generator().manual_seed(3)
    g = {p: torch.rand(POS + 1, C, generator=gen, dtype=torch.float64) for p in d.module_paths}
    g = {p: torch.where(v < 0.4, 0.0, v) for p, v in g.items()}
    alive = {p: v > 0 for p, v in g.items()}
    draw = uniform_sources(g, gen)
    r, delta = draw.r, draw.delta
    r0, delta0 = {p: v.clone() for p, v in r.items()}, {p: v.clone() for p, v in delta.items()}
    end, worst = pgd_sources(d, toks, g, alive, draw, target_pos=POS, target_token=TOK, n_steps=3, step_size=1.0)
    s = end.r
    moved = 0
    for p in d.module_paths:
        assert torch.equal(r[p], r0[p]) and torch.equal(delta[p], delta0[p])  # inputs untouched
        assert torch.equal(end.delta[p], delta0[p])  # delta is held fixed
        assert torch.equal(s[p][0][~alive[p]], r0[p][0][~alive[p]])
        assert ((s[p] >= 0) & (s[p] <= 1)).all()
        moved += int((s[p][0][alive[p]] != r0[p][0][alive[p]]).sum())
    assert moved > 0
    assert worst > 0


def test_faithfulness_all_ones(setup):
    d, tokens = setup
    toks = tokens[:, : POS + 1]
    ones = {p: torch.ones(T + 2, C, dtype=torch.float64) for p in d.module_paths}  # extra rows are ignored
    rep = faithfulness(d, tokens, ones, target_pos=POS, target_token=TOK, n_samples=64, restarts=2)
    with torch.no_grad():
        masks = {p: torch.ones(1, POS + 1, C, dtype=torch.float64) for p in d.module_paths}
        p_ci = d.model(toks, masks=masks).logits[0, POS].softmax(-1)[TOK]
        p_target = d.model.target(toks).logits[0, POS].softmax(-1)[TOK]
        gen = torch.Generator().manual_seed(123)
        direct = []
        for _ in range(128):  # m pinned at 1, only Δ is random
            deltas = {p: torch.rand(1, POS + 1, generator=gen, dtype=torch.float64) for p in d.module_paths}
            direct.append(float(d.model(toks, masks=masks, delta_masks=deltas).logits[0, POS].softmax(-1)[TOK]))
    assert rep.ci == pytest.approx(float(p_ci), rel=1e-10)
    assert rep.target == pytest.approx(float(p_target), rel=1e-10)
    assert min(direct) <= rep.stochastic <= max(direct)
    assert min(direct) - 1e-9 <= rep.adversarial <= max(direct) + 1e-9  # no room to move: also only Δ noise
    assert rep.n_nodes == len(d.module_paths) * (POS + 1) * C and rep.pgd_steps == 4 and rep.restarts == 2


def test_faithfulness_adversarial_below_stochastic_and_deterministic(setup):
    d, tokens = setup
    gen = torch.Generator().manual_seed(5)
    g = {p: torch.rand(POS + 1, C, generator=gen, dtype=torch.float64) for p in d.module_paths}
    g = {p: torch.where(v < 0.5, 0.0, v) for p, v in g.items()}
    rep = faithfulness(d, tokens, g, target_pos=POS, target_token=TOK, restarts=2, seed=1)
    assert 0 < rep.adversarial <= rep.stochastic
    assert rep.n_nodes == _n_nonzero(g)
    assert faithfulness(d, tokens, g, target_pos=POS, target_token=TOK, restarts=2, seed=1) == rep


def test_faithfulness_adversary_moves_every_base_alive_entry(setup):
    """As during the optimisation, the adversary may re-insert what a graph pruned away (§4, §5)."""
    from decomposer.vpd.sigmoids import sigmoid_lower

    d, tokens = setup
    base = {p: sigmoid_lower(z, d.config.ci.alpha) > 0 for p, z in _base_z(d, tokens[:, : POS + 1]).items()}
    assert sum(int(b.sum()) for b in base.values()) > 0
    empty = {p: torch.zeros(POS + 1, C, dtype=torch.float64) for p in d.module_paths}  # a graph with no node
    kw = dict(target_pos=POS, target_token=TOK, restarts=2, seed=3)
    default = faithfulness(d, tokens, empty, **kw)
    assert default == faithfulness(d, tokens, empty, alive=base, **kw)
    still = faithfulness(d, tokens, empty, alive={p: torch.zeros_like(b) for p, b in base.items()}, **kw)
    # Same seed, same starting draws: ascending from them can only lower P(y*), and here it does.
    assert default.adversarial < still.adversarial
    assert default.n_nodes == still.n_nodes == 0


def test_optimize_is_deterministic(setup):
    d, tokens = setup
    kw = {"target_pos": POS, "target_token": TOK, "settings": _opt(steps=5, lr=0.1, log_every=1)}
    a, b = optimize_ci(d, tokens, **kw), optimize_ci(d, tokens, **kw)
    assert a.losses == b.losses
    assert all(torch.equal(a.g[p], b.g[p]) for p in a.g)


def test_errors(setup):
    d, tokens = setup
    kw = {"target_pos": POS, "target_token": TOK}
    with pytest.raises(VpdError, match="target_pos"):
        optimize_ci(d, tokens, target_pos=T + 2, target_token=TOK, settings=_opt(steps=1))
    with pytest.raises(VpdError, match="target_pos"):
        optimize_ci(d, tokens, target_pos=-1, target_token=TOK, settings=_opt(steps=1))
    with pytest.raises(VpdError, match="target_token"):
        optimize_ci(d, tokens, target_pos=POS, target_token=VOCAB, settings=_opt(steps=1))
    with pytest.raises(VpdError, match="steps"):
        _opt(steps=0)
    with pytest.raises(VpdError, match="mode"):
        _opt(mode="kl", steps=1)
    with pytest.raises(VpdError, match="tokens"):
        optimize_ci(d, tokens[0], **kw, settings=_opt(steps=1))
    g = {p: torch.ones(POS + 1, C, dtype=torch.float64) for p in d.module_paths}
    with pytest.raises(VpdError, match="target_token"):
        faithfulness(d, tokens, g, target_pos=POS, target_token=-1)
    with pytest.raises(VpdError, match="target_pos"):
        faithfulness(d, tokens, g, target_pos=T + 2, target_token=TOK)
    with pytest.raises(VpdError, match="`g`"):
        faithfulness(d, tokens, {}, **kw)
    with pytest.raises(VpdError, match="n_samples"):
        faithfulness(d, tokens, g, **kw, n_samples=8)
