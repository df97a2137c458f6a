"""The adversaries of docs/method.md §8.3 and §10: source → mask maps, PPGD's Adam ascent and state, fresh PGD."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from decomposer.errors import VpdError
from decomposer.vpd.adversary import PersistentPGD, fresh_pgd, sources_to_masks
from decomposer.vpd.components import ComponentModel
from decomposer.vpd.config import AdversaryConfig
from decomposer.vpd.losses import mse_output_loss
from decomposer.vpd.targets import ModuleSpec

B, C = 4, 3


def make_toy(paths: tuple[str, ...] = ("0", "2")):
    """A 6 → 5 → 4 MLP with `paths` masked (C = 3 each), its Cs, g = 0 and an MSE loss of the masked output.

    g = 0 gives the adversary the whole box. With only "2" masked the output is affine in the sources, so
    the MSE is convex in them and any step that agrees in sign with the gradient cannot lower it.
    """
    gen = torch.Generator().manual_seed(0)
    target = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    model = ComponentModel(target, [ModuleSpec(pattern="0", C=C), ModuleSpec(pattern="2", C=C)], generator=gen)
    x = torch.randn(B, 6, generator=gen)
    y_star = target(x).detach()
    Cs = {p: model.components(p).C for p in paths}
    g = {p: torch.zeros(B, C) for p in Cs}

    def loss_fn(masks, delta_masks):
        return mse_output_loss(y_star, model(x, masks=masks, delta_masks=delta_masks))

    return Cs, g, loss_fn


@pytest.fixture
def toy():
    return make_toy()


def config(**kw) -> AdversaryConfig:
    return AdversaryConfig(**{"lr": 0.05, "warmup_frac": 0.0, **kw})


def test_sources_to_masks_pins_and_frees():
    s = torch.rand(2, 5, C + 1)
    masks, deltas = sources_to_masks({"a": torch.ones(2, 5, C), "b": torch.zeros(2, 5, C)}, {"a": s, "b": s})
    assert torch.equal(masks["a"], torch.ones(2, 5, C))  # g = 1 pins the mask at 1
    assert torch.equal(masks["b"], s[..., :C])  # g = 0 leaves it at the source
    assert torch.equal(deltas["a"], s[..., C]) and torch.equal(deltas["b"], s[..., C])
    shared = torch.rand(1, 1, C + 1)
    masks, deltas = sources_to_masks({"a": torch.full((2, 5, C), 0.5)}, {"a": shared})
    assert masks["a"].shape == (2, 5, C) and torch.allclose(masks["a"], 0.5 + 0.5 * shared[..., :C].expand(2, 5, C))
    assert deltas["a"].shape == (2, 5) and torch.all(deltas["a"] == shared[0, 0, C])
    with pytest.raises(VpdError, match="does not fit"):
        sources_to_masks({"a": torch.zeros(2, 5, C)}, {"a": torch.rand(2, 5, C)})
    with pytest.raises(VpdError, match="does not fit"):  # (1, 1, C+1) would turn a (B, C) toy batch into (1, B, C)
        sources_to_masks({"a": torch.zeros(2, C)}, {"a": shared})


def test_adam_ascent_matches_hand_computation_and_clamps():
    cfg = config(lr=0.01)
    ppgd = PersistentPGD({"a": C}, cfg, total_steps=10)
    ppgd.ensure_sources((2,), "cpu")
    with torch.no_grad():
        ppgd.sources["a"].fill_(0.5)
    g1, g2 = torch.randn(2, C + 1) * 1e-3, torch.randn(2, C + 1) * 1e-3
    ppgd.ascend({"a": g1}, step=0)
    # First step: m̂ = g and v̂ = g², so Δs = lr·g/(|g| + eps), about ±lr.
    expected = 0.5 + 0.01 * g1 / (g1.abs() + 1e-8)
    assert torch.allclose(ppgd.sources["a"], expected, rtol=1e-6, atol=1e-7)
    ppgd.ascend([g2], step=1)
    (b1, b2), t = cfg.betas, 2
    m = (1 - b1) * (b1 * g1 + g2)
    v = (1 - b2) * (b2 * g1**2 + g2**2)
    expected = expected + 0.01 * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + 1e-8)
    assert torch.allclose(ppgd.sources["a"], expected, rtol=1e-6, atol=1e-7)
    assert ppgd.t == 2
    big = PersistentPGD({"a": C}, config(lr=10.0), total_steps=10)
    big.ensure_sources((2,), "cpu")
    big.ascend([torch.randn(2, C + 1)], step=0)
    s = big.sources["a"]
    assert ((s == 0) | (s == 1)).all()  # an lr of 10 overshoots the box everywhere; the clamp holds it


def test_lr_schedule_warms_up_linearly_then_holds():
    ppgd = PersistentPGD({"a": C}, AdversaryConfig(lr=0.01, warmup_frac=0.1), total_steps=100)
    assert [ppgd.lr_at(s) for s in (0, 5, 10, 50, 99)] == pytest.approx([0.0, 0.005, 0.01, 0.01, 0.01])
    assert PersistentPGD({"a": C}, config(lr=0.01), total_steps=5).lr_at(0) == 0.01
    with pytest.raises(VpdError):
        ppgd.lr_at(100)


def test_ppgd_warmup_ascends_and_persists(toy):
    Cs, g, loss_fn = toy
    ppgd = PersistentPGD(Cs, config(warmup_ascents=5), total_steps=10, generator=torch.Generator().manual_seed(1))
    before = loss_fn(*ppgd.masks(g)).item()
    sources = ppgd.source_list()
    initial = [s.detach().clone() for s in sources]
    assert all(s.shape == (B, C + 1) and s.requires_grad for s in sources)
    last = ppgd.warmup(loss_fn, g, step=0)
    after = loss_fn(*ppgd.masks(g)).item()
    assert last is not None and after > before
    assert all(a is b for a, b in zip(ppgd.source_list(), sources, strict=True))  # the same tensors, moved
    assert not all(torch.equal(a, b) for a, b in zip(sources, initial, strict=True))
    assert all(((s >= 0) & (s <= 1)).all() for s in sources)
    assert ppgd.t == 5
    ppgd.warmup(loss_fn, g, step=1)
    assert all(a is b for a, b in zip(ppgd.source_list(), sources, strict=True)) and ppgd.t == 10
    with pytest.raises(VpdError, match="never re-initialised"):
        ppgd.masks({p: gl[:3] for p, gl in g.items()})
    assert PersistentPGD(Cs, config(warmup_ascents=0), total_steps=1).warmup(loss_fn, g, step=0) is None


def test_ppgd_state_round_trip_is_bit_exact(toy):
    Cs, g, loss_fn = toy
    ppgd = PersistentPGD(Cs, config(warmup_ascents=2), total_steps=10, generator=torch.Generator().manual_seed(2))
    ppgd.warmup(loss_fn, g, step=0)
    state = {k: v.clone() for k, v in ppgd.state_tensors().items()}
    assert set(state) == {"t"} | {f"{k}.{p}" for k in ("sources", "exp_avg", "exp_avg_sq") for p in Cs}
    resumed = PersistentPGD(Cs, config(warmup_ascents=2), total_steps=10)
    resumed.load_state_tensors(state)
    for step in (1, 2):
        ppgd.warmup(loss_fn, g, step=step)
        resumed.warmup(loss_fn, g, step=step)
    for a, b in zip(ppgd.source_list(), resumed.source_list(), strict=True):
        assert torch.equal(a, b)
    assert resumed.t == ppgd.t == 6
    with pytest.raises(VpdError, match="missing keys"):
        resumed.load_state_tensors({k: v for k, v in state.items() if not k.startswith("exp_avg.")})


def test_fresh_pgd_one_unit_step_reaches_vertices():
    Cs, g, loss_fn = make_toy(("2",))
    seen: list[torch.Tensor] = []

    def record(grad):
        seen.append(grad.clone())
        return grad

    gen = torch.Generator().manual_seed(3)
    initial = {p: torch.rand(1, C + 1, generator=gen) for p in Cs}
    before = loss_fn(*sources_to_masks(g, initial)).item()
    kept = {p: s.clone() for p, s in initial.items()}
    masks, deltas, final = fresh_pgd(loss_fn, g, Cs, n_steps=1, step_size=1.0, sources=initial, reduce_grad=record)
    assert all(torch.equal(initial[p], kept[p]) for p in Cs)  # the caller's sources are left alone
    assert len(seen) == len(Cs) and all((grad != 0).any() for grad in seen)  # once per source per step
    for p, grad in zip(Cs, seen, strict=True):
        s = torch.cat([masks[p][:1], deltas[p][:1, None]], dim=-1)  # g = 0, so row 0 holds the shared sources
        assert (((s == 0) | (s == 1)) | (grad == 0)).all(), p
    assert final >= before  # convex toy: a step that agrees in sign with the gradient cannot lower it
    assert final == pytest.approx(loss_fn(masks, deltas).item())


def test_fresh_pgd_probe_stays_in_box_and_is_reproducible(toy):
    Cs, g, loss_fn = toy
    calls = []

    def reduce(grad):
        calls.append(1)
        return grad

    def probe(**kw):
        return fresh_pgd(loss_fn, g, Cs, n_steps=3, step_size=0.1, generator=torch.Generator().manual_seed(4), **kw)

    runs = [probe(reduce_grad=reduce) for _ in range(2)]
    assert len(calls) == 2 * 3 * len(Cs)
    (m1, d1, l1), (m2, d2, l2) = runs
    assert l1 == l2 and all(torch.equal(m1[p], m2[p]) and torch.equal(d1[p], d2[p]) for p in Cs)
    assert all(((m >= 0) & (m <= 1)).all() for m in [*m1.values(), *d1.values()])
    assert all(m.shape == (B, C) for m in m1.values()) and all(d.shape == (B,) for d in d1.values())
    with torch.no_grad():  # the eval probe runs under no_grad; the ascent must still get gradients
        _, _, l3 = probe()
    assert l3 == l1


def test_fresh_pgd_records_every_iterate_so_one_run_answers_shorter_ones(toy):
    """`vpd eval` reads 20, 40 and 80 steps from one run: iterate n equals an n-step run from the same draw."""
    Cs, g, loss_fn = toy

    def run(n, **kw):
        return fresh_pgd(loss_fn, g, Cs, n_steps=n, step_size=0.1, generator=torch.Generator().manual_seed(4), **kw)

    losses: list[float] = []
    _, _, final = run(5, losses=losses)
    assert len(losses) == 6 and losses[-1] == final
    for n in (0, 2, 3):
        assert losses[n] == pytest.approx(run(n)[2], rel=1e-6)


def test_training_step_ascends_along_the_adversarial_loss_gradient(monkeypatch):
    """The step's single backward hands PPGD exactly ∂L_adv/∂s, as a separate autograd pass would."""
    import copy

    from decomposer.vpd.config import DecomposeConfig
    from decomposer.vpd.run import Decomposition
    from decomposer.vpd.step import Trainer, output_of

    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 6))
    cfg = DecomposeConfig.model_validate(
        {
            "target": "toy",
            "modules": [{"pattern": "0", "C": 5}, {"pattern": "2", "C": 3}],
            "ci": {"kind": "mlp", "hidden": 4},
            "loss": {"output_loss": "mse", "faithfulness": 1.0, "adversarial": 0.3},
            "adversary": {"kind": "ppgd", "warmup_frac": 0.0},
            "optim": {"steps": 4, "batch_size": 8, "lr": 1e-2},
        }
    )
    d = Decomposition.create(cfg, target)
    trainer = Trainer(d, n_ref=8, generator=torch.Generator().manual_seed(0))
    batch = torch.rand(8, 6)
    seen = {}
    step_opt = trainer.opt.step

    def snapshot_then_step(*args, **kwargs):
        # State the adversarial loss was evaluated at: parameters before the update, sources before the ascent.
        seen["d"] = copy.deepcopy(d)
        seen["sources"] = {p: s.detach().clone() for p, s in trainer.ppgd.sources.items()}
        return step_opt(*args, **kwargs)

    ascend = trainer.ppgd.ascend

    def spy(grads, step):
        seen["grads"] = [g.clone() for g in grads]
        return ascend(grads, step)

    monkeypatch.setattr(trainer.opt, "step", snapshot_then_step)
    monkeypatch.setattr(trainer.ppgd, "ascend", spy)
    trainer.step(batch, 1)

    ref = seen["d"]
    out, xs = ref.model.forward_with_inputs(batch)
    g, _ = ref.causal_importance(xs)
    sources = {p: s.clone().requires_grad_(True) for p, s in seen["sources"].items()}
    masks, delta_masks = sources_to_masks(g, sources)
    l_adv = mse_output_loss(output_of(out).detach(), output_of(ref.model(batch, masks=masks, delta_masks=delta_masks)))
    expected = torch.autograd.grad(l_adv, [sources[p] for p in ref.module_paths])
    assert any(e.abs().max() > 1e-4 for e in expected)
    for got, want in zip(seen["grads"], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
