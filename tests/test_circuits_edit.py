"""Model editing through one subcomponent, its metrics, the LoRA baseline and `vpd edit`."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from attrgraph.nodes import resolve_component
from circuits.edit.lora import (
    LoraAdapter,
    LoraPoint,
    attached,
    lora_sweep,
    lora_windows,
    merge,
    pareto_plot,
    train_lora,
)
from circuits.edit.metrics import EditPoint, edit_metrics, metrics_from_stats, position_stats, surrounding_mask
from circuits.edit.rank_one import (
    activation_sign,
    component_activity,
    edit_write_vector,
    find_token_specific,
    unembedding_direction,
)
from decomposer.errors import VpdError
from tests.conftest import float64_decomposition, tiny_llama

VOCAB, C = 40, 6
MODULES = [{"pattern": "model.layers.*.self_attn.*_proj", "C": C}, {"pattern": "model.layers.*.mlp.*_proj", "C": C}]
DOWN = "model.layers.1.mlp.down_proj"
KEY, IDX = "1.mlp.down:3", 3


@pytest.fixture(scope="module")
def d():
    torch.manual_seed(0)
    return float64_decomposition(tiny_llama(vocab=VOCAB), MODULES)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- the edit ---------------------------------------------------------------------------------------------------


def test_edit_is_the_rank_one_formula_on_one_matrix_only(d):
    before = _snapshot(d.model.target)
    direction = torch.randn(16, dtype=torch.float64)
    edited = edit_write_vector(d, KEY, direction, 2.5, sign=-1)
    assert edited is not d.model.target
    after, new = _snapshot(d.model.target), _snapshot(edited)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the input model is bit-identical
    changed = [k for k in before if not torch.equal(before[k], new[k])]
    assert changed == [f"{DOWN}.weight"]
    comp = d.model.components(DOWN)
    u, v, u_hat = comp.U[IDX].detach(), comp.V[:, IDX].detach(), direction / direction.norm()
    diff = new[f"{DOWN}.weight"] - before[f"{DOWN}.weight"]
    assert int(torch.linalg.matrix_rank(diff)) == 1
    # W′ = W − u vᵀ + σ α û vᵀ with σ = −1: the paper's W − (u + α û) vᵀ.
    expected = before[f"{DOWN}.weight"] - torch.outer(u + 2.5 * u_hat, v)
    torch.testing.assert_close(new[f"{DOWN}.weight"], expected, rtol=0, atol=1e-13)


def test_alpha_zero_is_the_ablation_of_the_subcomponent(d, ids):
    # α = 0 leaves W − u_c v_cᵀ: the component model with c's mask 0 everywhere and the delta on.
    edited = edit_write_vector(d, KEY, torch.ones(16, dtype=torch.float64), 0.0, sign=1)
    mask = torch.ones(*ids.shape, C, dtype=torch.float64)
    mask[..., IDX] = 0
    ablated = d.model(ids, masks={DOWN: mask}, delta_masks={DOWN: torch.ones(ids.shape, dtype=torch.float64)})
    torch.testing.assert_close(edited(ids).logits, ablated.logits, rtol=1e-10, atol=1e-10)


def test_activation_sign_uses_the_firing_positions_only():
    acts = torch.tensor([[-3.0, 1.0, 5.0], [2.0, -4.0, 0.5]])  # mean over all = +0.25
    firing = torch.tensor([[True, True, False], [False, True, False]])  # mean over firing = (−3 + 1 − 4)/3 = −2
    assert activation_sign(acts, firing) == -1
    assert activation_sign(acts, ~firing) == 1  # (5 + 2 + 0.5)/3 > 0
    with pytest.raises(VpdError, match="fires nowhere"):
        activation_sign(acts, torch.zeros_like(firing))


def test_sign_from_hand_chosen_firing_tokens(d, ids, monkeypatch):
    # Fix the CI by hand so that c fires exactly where its activation is negative: σ must be −1, and +1 for the
    # positive positions. The edit with `firing_ids` then equals the edit with that sign passed directly.
    _, acts = component_activity(d, DOWN, IDX, ids)
    direction = torch.randn(16, dtype=torch.float64)
    for where, sigma in ((acts < 0, -1), (acts > 0, 1)):
        assert where.any() and (~where).any()

        def fake_ci(xs, where=where):
            g = {p: torch.zeros(*x.shape[:-1], d.Cs[p], dtype=x.dtype) for p, x in xs.items()}
            g[DOWN][..., IDX] = where.to(torch.float64)
            return g, g

        monkeypatch.setattr(d, "causal_importance", fake_ci)
        from_data = edit_write_vector(d, KEY, direction, 3.0, firing_ids=ids)
        given = edit_write_vector(d, KEY, direction, 3.0, sign=sigma)
        other = edit_write_vector(d, KEY, direction, 3.0, sign=-sigma)
        assert torch.equal(from_data.get_submodule(DOWN).weight, given.get_submodule(DOWN).weight)
        assert not torch.equal(from_data.get_submodule(DOWN).weight, other.get_submodule(DOWN).weight)


def test_edit_is_invariant_to_flipping_u_and_v(d, ids, monkeypatch):
    # (u_c, v_c) → (−u_c, −v_c) leaves the model unchanged; σ flips with a_c, so the edit is unchanged too. The CI
    # network reads a_c, so it is held fixed here: the same positions fire before and after the flip.
    firing = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.5

    def fixed_ci(xs):
        g = {p: torch.zeros(*x.shape[:-1], d.Cs[p], dtype=x.dtype) for p, x in xs.items()}
        g[DOWN][..., IDX] = firing.to(torch.float64)
        return g, g

    monkeypatch.setattr(d, "causal_importance", fixed_ci)
    direction = torch.randn(16, dtype=torch.float64)
    first = edit_write_vector(d, KEY, direction, 3.0, firing_ids=ids)
    comp = d.model.components(DOWN)
    with torch.no_grad():
        comp.U[IDX].neg_(), comp.V[:, IDX].neg_()
    try:
        flipped = edit_write_vector(d, KEY, direction, 3.0, firing_ids=ids)
    finally:
        with torch.no_grad():
            comp.U[IDX].neg_(), comp.V[:, IDX].neg_()
    torch.testing.assert_close(first.get_submodule(DOWN).weight, flipped.get_submodule(DOWN).weight, rtol=0, atol=1e-14)


def test_save_pretrained_round_trip_gives_identical_logits(d, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    edited = edit_write_vector(d, KEY, torch.randn(16, dtype=torch.float64), 3.0, sign=1)
    edited.save_pretrained(tmp_path)
    # The attention kernel is a load-time choice, not part of the saved model; use the one the edit ran with.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, edited(ids).logits)


def test_bad_edit_arguments_are_one_sentence(d):
    direction = torch.ones(16, dtype=torch.float64)
    cases = [
        ("5.mlp.down:0", direction, 1.0, {"sign": 1}, "names no decomposed matrix"),
        ("1.mlp.down:6", direction, 1.0, {"sign": 1}, "has index 6, but 1.mlp.down has C=6"),
        ("1.mlp.down", direction, 1.0, {"sign": 1}, "is not a subcomponent key"),
        (KEY, torch.ones(5, dtype=torch.float64), 1.0, {"sign": 1}, "must be a tensor of shape \\(16,\\)"),
        (KEY, torch.zeros(16, dtype=torch.float64), 1.0, {"sign": 1}, "zero or non-finite norm"),
        (KEY, direction, float("nan"), {"sign": 1}, "`alpha` must be a finite number"),
        (KEY, direction, 1.0, {}, "exactly one of `sign`"),
        (KEY, direction, 1.0, {"sign": 0}, "`sign` must be \\+1 or -1"),
    ]
    for key, vec, alpha, kw, message in cases:
        with pytest.raises(VpdError, match=message):
            edit_write_vector(d, key, vec, alpha, **kw)
    assert resolve_component(d.Cs, f"{DOWN}:2") == (DOWN, 2)  # a full module path works too


def test_unembedding_direction(d):
    W_U = d.model.target.get_output_embeddings().weight
    u_hat = unembedding_direction(d.model.target, 7)
    torch.testing.assert_close(u_hat.norm(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(u_hat * W_U[7].norm(), W_U[7].detach())
    # Of all unit vectors, û raises logit 7 the most: W_U[7]·û = ‖W_U[7]‖ (Cauchy–Schwarz).
    torch.testing.assert_close((W_U @ u_hat)[7], W_U[7].norm())
    with pytest.raises(VpdError, match=r"`token_id` must be an int in 0\.\.39"):
        unembedding_direction(d.model.target, 40)


# ---- token-specific search ---------------------------------------------------------------------------------------


def test_find_token_specific_matches_brute_force_counts(d, ids):
    triggers = [int(ids[0, 0]), int(ids[1, 3])]
    tok = type("Tok", (), {"__len__": lambda self: VOCAB})()  # integer triggers only need the vocabulary size
    found = find_token_specific(d, tok, ids, triggers, threshold=0.0, max_density=1.0, top_k=1000)
    g = d.network_ci(ids)
    is_trig = torch.isin(ids, torch.tensor(triggers))
    expected = {}
    for p in (q for q in d.module_paths if q.endswith(("o_proj", "down_proj"))):
        for c in range(C):
            fire = g[p][..., c] > 0.0
            n_ct = int((fire & is_trig).sum())
            if n_ct:
                expected[(p, c)] = (n_ct / int(is_trig.sum()), n_ct / int(fire.sum()), int(fire.sum()) / ids.numel())
    assert {(s.module, s.index) for s in found} == set(expected) and len(expected) > 0
    for s in found:
        assert (s.precision, s.recall, s.density) == pytest.approx(expected[(s.module, s.index)])
    keys = [(-s.precision, -s.recall, s.density) for s in found]
    assert keys == sorted(keys)
    dense = find_token_specific(d, tok, ids, triggers, threshold=0.0, max_density=0.3, top_k=1000)
    assert all(s.density <= 0.3 for s in dense) and len(dense) == sum(v[2] <= 0.3 for v in expected.values())


# ---- metrics -----------------------------------------------------------------------------------------------------


class TableModel(nn.Module):
    """Returns fixed logits: token id k at any position stands for row k of a flattened (batch·seq, vocab) table."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.flatten(0, 1), requires_grad=False)

    def forward(self, ids):
        return SimpleNamespace(logits=self.table[ids])


def test_metrics_on_hand_made_distributions():
    # Row 0: the target says (0.5, 0.5) everywhere; c fires at the last position (t = 5), where P_edited(o = 1) = 0.8.
    # KL((½,½) ‖ (¼,¾)) = ½ ln(4/3) =: a; KL((½,½) ‖ (0.9,0.1)) = ln(5/3) =: b.
    # Row 1: the target is (1, 0) (logit −inf), the edited model (½, ½): KL = ln 2 at each of its 6 positions.
    half = [0.5, 0.5]
    p_edit_0 = [half, [0.25, 0.75], [0.9, 0.1], half, [0.75, 0.25], [0.2, 0.8]]
    target = torch.tensor([[half] * 6, [[1.0, 0.0]] * 6], dtype=torch.float64).log()
    edited = torch.tensor([p_edit_0, [half] * 6], dtype=torch.float64).log()
    firing = torch.zeros(2, 6, dtype=torch.bool)
    firing[0, 5] = True
    a, b = 0.5 * math.log(4 / 3), math.log(5 / 3)
    ids = torch.arange(12).reshape(2, 6)
    m = edit_metrics(TableModel(target), TableModel(edited), ids, firing, 1, window=2, batch_size=1)
    assert m.efficacy == pytest.approx(0.8) and m.efficacy_target == pytest.approx(0.5)
    # Surrounding (±2, firing excluded, never across rows): t = 3, 4 of row 0 → (0 + a)/2.
    assert m.kl_surrounding == pytest.approx(a / 2, rel=1e-12) and m.n_surrounding == 2
    # Global: every non-firing position: row 0 gives 0 + a + b + 0 + a, row 1 gives 6 ln 2.
    assert m.kl_global == pytest.approx((2 * a + b + 6 * math.log(2)) / 11, rel=1e-12)
    assert (m.n_firing, m.n_global) == (1, 11)
    kl, _, _ = position_stats(target, edited, 1)
    sampled = metrics_from_stats(kl, kl, kl, firing, window=2, n_global=4, seed=3)
    assert sampled.n_global == 4
    with pytest.raises(VpdError, match="selects no position"):
        metrics_from_stats(kl, kl, kl, torch.zeros_like(firing))


def test_surrounding_mask_matches_brute_force():
    firing = torch.rand(5, 30, generator=torch.Generator().manual_seed(0)) < 0.1
    for window in (0, 1, 3, 40):
        got = surrounding_mask(firing, window)
        want = torch.zeros_like(firing)
        for b, t in firing.nonzero().tolist():
            want[b, max(0, t - window) : t + window + 1] = True
        assert torch.equal(got, want & ~firing), window


# ---- LoRA --------------------------------------------------------------------------------------------------------


def test_lora_at_init_is_the_identity_and_merge_equals_the_hook(d, ids):
    target = d.model.target
    adapter = LoraAdapter(32, 16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        clean = target(ids).logits
        with attached(target, DOWN, adapter):
            assert torch.equal(target(ids).logits, clean)  # B = 0
        adapter.B.normal_()
        with attached(target, DOWN, adapter):
            hooked = target(ids).logits
        assert torch.equal(target(ids).logits, clean)  # the hook is gone
        merged = merge(target, DOWN, adapter)
        torch.testing.assert_close(merged(ids).logits, hooked, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(hooked, clean)
    diff = merged.get_submodule(DOWN).weight - target.get_submodule(DOWN).weight
    assert int(torch.linalg.matrix_rank(diff)) == 2


def test_lora_windows_hold_their_firing_token():
    ids = torch.arange(3 * 50).reshape(3, 50)
    firing = torch.zeros(3, 50, dtype=torch.bool)
    firing[0, 2] = firing[1, 25] = firing[2, 49] = firing[2, 30] = True
    windows, fire = lora_windows(ids, firing, 10, window=5)
    assert windows.shape == (4, 11)  # only 4 firings exist
    for row, mask in zip(windows, fire, strict=True):
        b, t0 = divmod(int(row[0]), 50)
        assert torch.equal(row, ids[b, t0 : t0 + 11])  # a contiguous slice of one row
        assert torch.equal(mask, firing[b, t0 : t0 + 11]) and mask.any()
    assert {int(r[0]) for r in windows} == {0, 50 + 20, 100 + 39, 100 + 25}  # clamped at both ends


def test_lora_training_raises_p_o_at_firing_positions(d, ids):
    target, token = d.model.target, 5
    before = _snapshot(target)
    firing = torch.zeros_like(ids, dtype=torch.bool)
    firing[:, 6] = True
    windows, fire = lora_windows(ids, firing, 4, window=3)
    result = train_lora(target, DOWN, windows, fire, token, rank=2, lam=1.0, steps=20, lr=0.2)
    assert len(result.curve) == 20 and result.curve[-1].ce < result.curve[0].ce
    with torch.no_grad():
        p_before = target(windows).logits.softmax(-1)[..., token][fire]
        p_after = result.model(windows).logits.softmax(-1)[..., token][fire]
    # The random tiny model's final norm caps what one matrix can do to P(o) (about ×1.4 here).
    assert (p_after > p_before).all() and p_after.mean() > 1.3 * p_before.mean()
    assert all(torch.equal(before[k], v) for k, v in _snapshot(target).items())  # the target is untouched
    changed = [k for k, v in _snapshot(result.model).items() if not torch.equal(before[k], v)]
    assert changed == [f"{DOWN}.weight"]
    with pytest.raises(VpdError, match="`rank` must be an int"):
        train_lora(target, DOWN, windows, fire, token, rank=0)
    with pytest.raises(VpdError, match="is not a module of the target"):
        train_lora(target, "model.layers.9.mlp.down_proj", windows, fire, token)


def test_lora_sweep_and_pareto_png(d, ids, tmp_path):
    firing = torch.zeros_like(ids, dtype=torch.bool)
    firing[:, 4] = True
    points = lora_sweep(
        [2, 3],
        [0.0, 1.0],
        target=d.model.target,
        module=DOWN,
        train_ids=ids,
        train_firing=firing,
        eval_ids=ids,
        eval_firing=firing,
        token_id=5,
        window=3,
        steps=2,
    )
    assert [(p.n, p.lam) for p in points] == [(2, 0.0), (2, 1.0), (3, 0.0), (3, 1.0)]
    assert all(isinstance(p, LoraPoint) and p.metrics.n_firing == 4 for p in points)
    edits = [
        EditPoint(a, edit_metrics(d.model.target, edit_write_vector(d, KEY, torch.ones(16), a, sign=1), ids, firing, 5))
        for a in (0.0, 1.0, 3.0)
    ]
    out = pareto_plot(edits, points, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- `vpd edit` --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder on a tiny float32 Llama with the bundled tokenizer, and a down subcomponent that fires."""
    from transformers import AutoTokenizer

    from decomposer.target.loading import bundled_target_path
    from decomposer.vpd.config import DecomposeConfig
    from decomposer.vpd.run import Decomposition, save_state

    root = tmp_path_factory.mktemp("edit-run")
    torch.manual_seed(0)
    model = tiny_llama(vocab=4096, context=64)
    model.save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(bundled_target_path()).save_pretrained(root / "model")
    # The config names `bundled` so that held-out text is the bundled sample; the target is the tiny model.
    config = DecomposeConfig.model_validate(
        {
            "target": "bundled",
            "data_dir": str(root / "no-corpus"),
            "modules": MODULES,
            "ci": {"kind": "mlp", "hidden": 4},
            "optim": {"seq_len": 32},
        }
    )
    d = Decomposition.create(config, model)
    save_state(root / "run", d, step=0, target_name=str(root / "model"), train_state={})
    g = d.network_ci(torch.randint(1, 4096, (4, 32), generator=torch.Generator().manual_seed(0)))
    return root / "run", f"1.mlp.down:{int((g[DOWN] > 0).sum((0, 1)).argmax())}"


def _edit_args(run, out, *extra):
    return ["edit", "--run", str(run), "--component", "1.mlp.down:0", "--token", "o", "--out", str(out), *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--component", "7.mlp.down:0"], "names no decomposed matrix"),
        (["--component", "1.mlp.down:99"], "has index 99, but 1.mlp.down has C=6"),
        (["--component", "1.attn.q:0"], "whose output is not the residual stream"),
        (["--token", "hello world"], "`token` 'hello world' is 3 tokens, not one"),
        (["--alpha", "three"], "`--alpha` 'three' is not a number"),
        (["--sweep", "0,x"], "`--sweep` 'x' is not a number"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, capsys, extra, message):
    from circuits.cli import main

    assert main(_edit_args(tiny_run[0], tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_edit_writes_a_loadable_model_report_and_figure(tiny_run, tmp_path, capsys):
    from circuits.cli import main
    from decomposer.target.loading import load_target
    from decomposer.vpd.load import load_run

    run, key = tiny_run
    out = tmp_path / "edited"
    args = _edit_args(
        run,
        out,
        "--component",
        key,
        "--alpha",
        "2",
        "--threshold",
        "0",
        "--tokens",
        "256",
        "--sweep",
        "0,2",
        "--lora",
        "--lora-ns",
        "2",
        "--lora-lambdas",
        "1",
        "--lora-ranks",
        "1",
        "--lora-steps",
        "2",
        "--lora-tokens",
        "256",
        "--json",
    )
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["format"] == "model_edit" and report["format_version"] == 1 and report["component"] == key
    m = report["metrics"]
    assert m["n_firing"] > 0 and m["n_firing"] + m["n_global"] == 256 == report["settings"]["eval_tokens"]
    assert [p["alpha"] for p in report["sweep"]] == [0.0, 2.0] and report["sweep"][1]["efficacy"] == m["efficacy"]
    assert [(p["rank"], p["n"], p["lam"]) for p in report["lora"]] == [(1, 2, 1.0)]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "edit.json", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "edit.json").read_text()) == report
    # The saved model is the edit itself: same weights as `edit_write_vector` with the reported σ.
    d, tokenizer, _ = load_run(run)
    o = tokenizer("o", add_special_tokens=False)["input_ids"][0]
    expected = edit_write_vector(d, key, unembedding_direction(d.model.target, o), 2.0, sign=report["sign"])
    loaded, _ = load_target(str(out))
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)
    assert main(args) == 2  # the folder now holds a model
    assert "already holds a model; pass --overwrite" in capsys.readouterr().err


def test_cli_overwrite_replaces_atomically(tiny_run, tmp_path, capsys, monkeypatch):
    import numpy as np

    import decomposer.io
    from circuits.cli import main

    # A short random held-out stream keeps this test fast; the text does not matter here.
    fake = np.random.default_rng(0).integers(1, 4096, 600).astype(np.uint16)
    monkeypatch.setattr("decomposer.vpd.batches.heldout_tokens", lambda tokenizer, data_dir, *, bundled: fake)
    run, key = tiny_run
    out = tmp_path / "edited"
    base = _edit_args(run, out, "--component", key, "--threshold", "0", "--tokens", "128")
    assert main([*base, "--alpha", "1"]) == 0
    saved = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(decomposer.io, "atomic_write_json", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        main([*base, "--alpha", "4", "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == saved  # the old model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]  # no temporary folder is left
    monkeypatch.undo()
    monkeypatch.setattr("decomposer.vpd.batches.heldout_tokens", lambda tokenizer, data_dir, *, bundled: fake)
    assert main([*base, "--alpha", "4", "--overwrite", "--json"]) == 0
    assert json.loads((out / "edit.json").read_text())["alpha"] == 4.0
    capsys.readouterr()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main([*base, "--out", str(other), "--overwrite"]) == 2  # a folder of other files is never swapped away
    assert "non-empty folder without a model" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
