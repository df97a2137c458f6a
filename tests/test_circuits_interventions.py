"""Interventions on a decomposition (docs/attribution-graphs.md §3, §5): each checked against a direct computation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from attrgraph.nodes import NodeId
from attrgraph.optimize import faithfulness
from circuits.cli import main
from circuits.faithfulness import circuit_faithfulness
from circuits.interventions import (
    Intervention,
    Site,
    ablate,
    generate,
    generate_ids,
    intervene,
    keep_only,
    resolve_sites,
)
from decomposer.errors import VpdError
from tests.conftest import float64_decomposition, tiny_llama

VOCAB, C, T = 40, 8, 6
MODULES = [{"pattern": "model.layers.*.self_attn.*_proj", "C": C}, {"pattern": "model.layers.*.mlp.*_proj", "C": C}]
Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
DOWN0, DOWN1 = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"


def _target(seed: int = 0) -> nn.Module:
    """A tiny Llama with weights large enough that interventions move the logits visibly."""
    torch.manual_seed(seed)
    target = tiny_llama(vocab=VOCAB)
    with torch.no_grad():
        for p in target.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.4)
    target.generation_config.eos_token_id = None  # greedy runs of a fixed length, for exact comparisons
    target.generation_config.pad_token_id = 0
    return target


@pytest.fixture(scope="module")
def d():
    return float64_decomposition(_target(), MODULES)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _edited(d, edit) -> nn.Module:
    """A deep copy of the target with `edit(path, linear)` applied to decomposed modules."""
    target = copy.deepcopy(d.model.target)
    for path in d.module_paths:
        edit(path, target.get_submodule(path))
    return target


def _key(path: str, c: int, pos: int | None = None) -> str:
    block = path.split(".")[2]
    part, short = ("attn", path.split(".")[-1][0]) if "self_attn" in path else ("mlp", path.split(".")[-1][:-5])
    return f"{block}.{part}.{short}:{c}" + ("" if pos is None else f"@{pos}")


def _hooks_empty(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------- sites ------------------------------------


def test_site_forms_resolve_to_the_same_subcomponent(d):
    forms = ["1.attn.q:3@2", f"{Q1}:3@2", f"comp/{Q1}/3@2", NodeId.comp(Q1, 3, 2)]
    assert resolve_sites(d, forms, seq_len=T) == [Site(Q1, 3, 2)] * 4
    assert resolve_sites(d, ["0.mlp.down:7", "emb@0", f"delta/{Q0}@1", "logit/5@2"]) == [Site(DOWN0, 7, None)]


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ("9.attn.q:1", "names no decomposed matrix; use one of"),
        ("0.attn.q:8", "has index 8, but 0.attn.q has C=8"),
        ("0.attn.q:1@6", "has position 6, but the prompt has 6 tokens"),
        ("0.attn.q", "is not a subcomponent key"),
        ("0.attn.q:1:2@3", "is not a subcomponent key"),
        ("1.attn.q:2:3", r"puts the position before the index, a form no longer read; write 1\.attn\.q:3@2 "),
        ("comp/model.layers.0.mlp.nope/1@0", "is not decomposed"),
    ],
)
def test_bad_sites_raise_one_sentence(d, ids, node, message):
    with pytest.raises(VpdError, match=message):
        ablate(d, ids, [node])


def test_overlapping_sites_and_bad_arguments_are_refused(d, ids):
    with pytest.raises(VpdError, match="listed twice"):
        ablate(d, ids, ["0.attn.q:1", "0.attn.q:1@2"])
    with pytest.raises(VpdError, match="`scale` is required"):
        ablate(d, ids, ["0.attn.q:1"], "scale")
    with pytest.raises(VpdError, match="`reference` must be"):
        ablate(d, ids, ["0.attn.q:1"], "mean")
    with pytest.raises(VpdError, match="`ids` must be"):
        ablate(d, ids[0], ["0.attn.q:1"])
    with pytest.raises(VpdError, match="`drop_delta` entry"):
        ablate(d, ids, ["0.attn.q:1"], drop_delta=["7.attn.q"])
    with pytest.raises(VpdError, match="`target_pos` must be in"):
        ablate(d, ids, ["0.attn.q:1"], target_pos=T)
    with pytest.raises(VpdError, match="`ci` must map every decomposed path"):
        circuit_faithfulness(d, ids, [], T - 1, 3, ci={Q0: torch.ones(2, T, C)})
    with pytest.raises(VpdError, match="`n_samples` ≥ 1"):
        circuit_faithfulness(d, ids, [], T - 1, 3, n_samples=0)


# ---------------------------------------------------------------- ablate / keep_only ------------------------


def test_ablating_a_whole_matrix_without_delta_zeroes_it(d, ids):
    for path in (Q1, DOWN0):
        res = ablate(d, ids, [_key(path, c) for c in range(C)], drop_delta=[path])
        zeroed = _edited(d, lambda p, m, path=path: m.weight.data.zero_() if p == path else None)
        expected = _logits(zeroed, ids)
        assert res.logits.dtype == torch.float64
        torch.testing.assert_close(res.logits, expected, rtol=0, atol=1e-10)
        assert res.kl.shape == (2, T) and res.kl.min() >= -1e-12 and res.kl.max() > 1e-3  # it matters


def test_identities_scale_one_and_all_ones_keep_only_with_delta(d, ids):
    clean = _logits(d.model.target, ids)
    every = [_key(p, c) for p in d.module_paths for c in range(C)]
    for res in (ablate(d, ids, every, "scale", scale=1.0), keep_only(d, ids, every, keep_delta=True)):
        torch.testing.assert_close(res.logits, clean, rtol=0, atol=1e-10)
        assert res.kl.abs().max() < 1e-12
    # Without the delta, keeping everything runs Ŵ = Σ_c u_c v_cᵀ in place of every W.
    hat = _edited(d, lambda p, m: m.weight.data.copy_(d.model.components(p).weight_hat()))
    torch.testing.assert_close(keep_only(d, ids, every).logits, _logits(hat, ids), rtol=0, atol=1e-10)


def test_keep_only_matches_a_model_built_from_the_kept_subcomponents(d, ids):
    kept = {Q0: [1, 4], DOWN0: [0]}
    nodes = [_key(p, c) for p, cs in kept.items() for c in cs]

    def edit(path, module):
        comp = d.model.components(path)
        module.weight.data.zero_()
        for c in kept.get(path, []):
            module.weight.data += torch.outer(comp.U[c], comp.V[:, c]).detach()

    res = keep_only(d, ids, nodes, target_pos=T - 1, target_token=5)
    expected = _logits(_edited(d, edit), ids)
    torch.testing.assert_close(res.logits, expected, rtol=0, atol=1e-10)
    p = expected[:, T - 1].softmax(-1)[:, 5]
    torch.testing.assert_close(res.p_intervened, p, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.p_target, res.target_logits[:, T - 1].softmax(-1)[:, 5], rtol=0, atol=1e-12)


def test_scale_at_one_position_matches_a_direct_edit_of_that_row(d, ids):
    s, c, pos = 2.5, 3, 4
    res = ablate(d, ids, [_key(Q1, c, pos)], "scale", scale=s, target_pos=pos)
    comp = d.model.components(Q1)

    def hook(module, args, output):  # add (s − 1)·a_c·u_c at position `pos` only, by hand
        extra = torch.zeros_like(output)
        extra[:, pos] = (s - 1) * (args[0][:, pos] @ comp.V[:, c])[:, None] * comp.U[c]
        return output + extra.detach()

    handle = d.model.target.get_submodule(Q1).register_forward_hook(hook)
    try:
        expected = _logits(d.model.target, ids)
    finally:
        handle.remove()
    torch.testing.assert_close(res.logits, expected, rtol=0, atol=1e-10)
    # A last-layer query at one position changes that position's prediction only.
    others = torch.cat([res.kl[:, :pos], res.kl[:, pos + 1 :]], 1)
    assert others.abs().max() < 1e-12 and res.kl[:, pos].min() > 1e-6
    assert torch.equal(res.target_token, res.target_logits[:, pos].argmax(-1))  # default label: the top token


def test_mean_ablation_is_a_rank_one_weight_edit_plus_a_bias(d, ids):
    reference = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    cs = [2, 5]
    res = ablate(d, ids, [_key(Q1, c) for c in cs], "mean", reference=reference)
    comp = d.model.components(Q1)
    with torch.no_grad():
        _, xs = d.model.forward_with_inputs(reference)
        mean = (xs[Q1] @ comp.V).reshape(-1, C).mean(0)

    def edit(path, module):  # W x + Σ_c (ā_c − v_cᵀx) u_c = (W − Σ_c u_c v_cᵀ) x + Σ_c ā_c u_c
        if path == Q1:
            for c in cs:
                module.weight.data -= torch.outer(comp.U[c], comp.V[:, c]).detach()
            module.bias = nn.Parameter(sum(mean[c] * comp.U[c] for c in cs).detach())

    torch.testing.assert_close(res.logits, _logits(_edited(d, edit), ids), rtol=0, atol=1e-10)
    assert res.kl.max() > 1e-4


def test_mean_over_a_constant_reference_prompt_is_the_identity(d):
    # Layer-0 inputs depend on the token only, so a prompt repeating one token has constant activations.
    prompt = torch.full((1, 5), 7, dtype=torch.long)
    res = ablate(d, prompt, [_key(Q0, c) for c in range(C)], "mean", reference=prompt)
    torch.testing.assert_close(res.logits, res.target_logits, rtol=0, atol=1e-10)


def test_resample_takes_every_activation_from_one_reference_token(d, ids):
    reference = torch.randint(1, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    comp = d.model.components(Q0)
    with torch.no_grad():
        _, xs = d.model.forward_with_inputs(reference)
        ref_acts = (xs[Q0] @ comp.V).reshape(-1, C)  # (8, C), layer 0: one row per reference token
    seen = {}
    handle = None
    with intervene(d, Intervention([_key(Q0, c) for c in range(C)], "resample", reference=reference, seed=4)):
        # Registered after the intervention's hook, so it sees the corrected output Δx + Σ_c a'_c u_c.
        handle = d.model.target.get_submodule(Q0).register_forward_hook(
            lambda m, a, out: seen.update(x=a[0].detach(), out=out.detach())
        )
        intervened = _logits(d.model.target, ids)
    handle.remove()
    acts = (seen["out"] - seen["x"] @ comp.delta().detach().T) @ torch.linalg.pinv(comp.U.detach())  # (B, T, C)
    dist = torch.cdist(acts.reshape(-1, C), ref_acts)  # each row equals one reference token's activations
    assert dist.min(-1).values.max() < 1e-8
    assert len(set(dist.argmin(-1).tolist())) > 1
    again = ablate(d, ids, [_key(Q0, c) for c in range(C)], "resample", reference=reference, seed=4)
    torch.testing.assert_close(again.logits, intervened, rtol=0, atol=1e-10)  # draws depend on (seed, row, t)
    other = ablate(d, ids, [_key(Q0, c) for c in range(C)], "resample", reference=reference, seed=5)
    assert (other.logits - intervened).abs().max() > 1e-6


# ---------------------------------------------------------------- intervene / generate ----------------------


@pytest.mark.parametrize(("kind", "scale"), [("zero", None), ("scale", -0.5)])
def test_hooks_agree_with_the_masked_forward(d, ids, kind, scale):
    nodes = ["1.attn.q:3", "0.mlp.down:2@4", "1.mlp.up:6@0"]
    res = ablate(d, ids, nodes, kind, scale=scale)
    with intervene(d, Intervention(nodes, kind, scale)):
        hooked = _logits(d.model.target, ids)
    torch.testing.assert_close(hooked, res.logits, rtol=0, atol=1e-10)
    assert res.kl.max() > 1e-3


def test_intervene_cleans_up_also_after_an_exception(d, ids):
    clean = _logits(d.model.target, ids)
    weights = {k: v.clone() for k, v in d.model.target.state_dict().items()}
    iv = Intervention(["1.attn.q:3", "0.mlp.down:2"])
    with intervene(d, iv):
        assert not _hooks_empty(d.model.target)
        assert (_logits(d.model.target, ids) - clean).abs().max() > 1e-4
    assert _hooks_empty(d.model.target)
    with pytest.raises(RuntimeError, match="inside"), intervene(d, iv):
        raise RuntimeError("inside")
    assert _hooks_empty(d.model.target)
    assert torch.equal(_logits(d.model.target, ids), clean)
    assert all(torch.equal(v, weights[k]) for k, v in d.model.target.state_dict().items())


def test_generate_under_a_no_op_equals_plain_greedy(d, ids):
    with torch.no_grad():
        plain = d.model.target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    for noop in ((), Intervention(["1.attn.q:3", "0.mlp.down:1@2"], "scale", scale=1.0)):
        assert torch.equal(generate_ids(d, ids, noop, max_new_tokens=6), plain)


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("kind", ["zero", "scale", "mean", "resample"])
def test_generate_with_a_kv_cache_equals_full_forwards(d, ids, kind, use_cache):
    # Sites at a generated position and at every position: the KV cache must not shift positions.
    reference = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    nodes = [_key(Q1, 3), _key(Q0, 5, 1), *(_key(DOWN1, c, t) for c in range(C) for t in (T - 1, T + 1, T + 2))]
    extra = {"reference": reference} if kind in ("mean", "resample") else {"scale": -2.0} if kind == "scale" else {}
    iv = Intervention(nodes, kind, **extra)
    out = generate_ids(d, ids, iv, max_new_tokens=4, use_cache=use_cache)
    seq = ids
    for _ in range(4):
        logits = ablate(
            d, seq, [n for n in nodes if "@" not in n or int(n.split("@")[1]) < seq.shape[1]], kind, **extra
        )
        seq = torch.cat([seq, logits.logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    # The intervention is not a no-op on the generated text: it moves the logits at every step.
    assert logits.kl[:, T - 1 :].min() > 1e-6


def test_generate_text_round_trip(d):
    class Tok:  # the two tokenizer calls `generate` makes
        def __call__(self, text, return_tensors, add_special_tokens):
            return {"input_ids": torch.tensor([[ord(ch) % VOCAB for ch in text]])}

        def decode(self, ids):
            return ",".join(map(str, ids))

    text = generate(d, Tok(), "abc", (), 3)
    ids = torch.tensor([[ord(ch) % VOCAB for ch in "abc"]])
    assert text == ",".join(map(str, generate_ids(d, ids, max_new_tokens=3)[0, 3:].tolist()))
    with pytest.raises(VpdError, match="`prompt` is empty"):
        generate(d, Tok(), "  ", (), 3)


# ---------------------------------------------------------------- circuit faithfulness ---------------------


def _exact(d_shape_seed: int = 0):
    """A float64 decomposition with C = rank and U, V from the SVD, so Δ = 0 and masks of ones give the target."""
    d = float64_decomposition(_target(d_shape_seed), [{"pattern": "model.layers.*.*.*_proj", "C": 16}])
    with torch.no_grad():
        for path in d.module_paths:
            comp = d.model.components(path)
            u, s, vh = torch.linalg.svd(comp.weight, full_matrices=False)  # W = u diag(s) vh, rank 16
            comp.V.copy_(vh.T)
            comp.U.copy_(s[:, None] * u.T)
            assert comp.delta().abs().max() < 1e-12
    return d


def test_whole_circuit_on_an_exact_decomposition_reproduces_the_target():
    d = _exact()
    ids = torch.randint(1, VOCAB, (1, T), generator=torch.Generator().manual_seed(7))
    ones = {p: torch.ones(T, 16, dtype=torch.float64) for p in d.module_paths}
    every = [_key(p, c) for p in d.module_paths for c in range(16)]
    res = circuit_faithfulness(d, ids, every, T - 1, 3, ci=ones, n_samples=4, restarts=2)
    for mode in ("ci", "stochastic", "adversarial"):
        assert getattr(res.kl, mode).abs().max() < 1e-10
        torch.testing.assert_close(getattr(res.p, mode), res.target, rtol=1e-9, atol=0)
        torch.testing.assert_close(getattr(res.faithfulness, mode), torch.ones(1, dtype=torch.float64))
    # An empty circuit under CI masks zeroes every decomposed matrix (m = 0, Δ off).
    empty = circuit_faithfulness(d, ids, [], T - 1, 3, ci=ones, n_samples=4, restarts=1)
    zeroed = _logits(_edited(d, lambda p, m: m.weight.data.zero_()), ids)[0, T - 1].softmax(-1)[3]
    torch.testing.assert_close(empty.p.ci[0], zeroed, rtol=1e-9, atol=0)
    torch.testing.assert_close(empty.graph.ci, res.target, rtol=1e-9, atol=0)
    assert int(empty.n_circuit) == 0 and int(empty.n_alive) == T * 16 * len(d.module_paths)


def _network_ci(d, tokens):
    """Path → (T, C) CI of the CI network on one (1, T) prompt."""
    return {p: v[0] for p, v in d.network_ci(tokens).items()}


def test_whole_alive_set_matches_the_graph_report(d, ids):
    tokens = ids[:1]
    g = _network_ci(d, tokens)
    alive = [str(NodeId.comp(p, c, t)) for p, v in g.items() for t, c in (v > 0).nonzero().tolist()]
    assert 0 < len(alive) < T * C * len(d.module_paths)  # a mixed alive set
    res = circuit_faithfulness(d, tokens, [*alive, "emb@0", f"logit/3@{T - 1}"], T - 1, 3, n_samples=16)
    report = faithfulness(d, tokens, g, target_pos=T - 1, target_token=3)
    assert res.p.ci.item() == pytest.approx(report.ci, rel=1e-12)
    assert res.target.item() == pytest.approx(report.target, rel=1e-12)
    for mode in ("ci", "stochastic", "adversarial"):
        assert getattr(res.faithfulness, mode).item() == pytest.approx(1.0, rel=1e-12)
    assert int(res.n_circuit) == int(res.n_alive) == len(alive)
    direct = keep_only(d, tokens, [], target_pos=T - 1, target_token=3)  # KL under m = g, computed by hand
    with torch.no_grad():
        lq = d.model(tokens, masks={p: v[None] for p, v in g.items()}).logits[0, T - 1].log_softmax(-1)
    lp = direct.target_logits[0, T - 1].log_softmax(-1)
    assert res.kl.ci.item() == pytest.approx(float((lp.exp() * (lp - lq)).sum()), rel=1e-10)


def test_every_alive_entry_as_a_circuit_reports_the_graph_numbers_in_all_three_modes(d, ids):
    """Same seed, same draw order: the circuit of the whole alive set is scored exactly as `faithfulness`."""
    tokens = ids[:1]
    g = _network_ci(d, tokens)
    alive = [str(NodeId.comp(p, c, t)) for p, v in g.items() for t, c in (v > 0).nonzero().tolist()]
    res = circuit_faithfulness(d, tokens, alive, T - 1, 3, n_samples=64, restarts=2, seed=5)
    report = faithfulness(d, tokens, g, target_pos=T - 1, target_token=3, n_samples=64, restarts=2, seed=5)
    for mode in ("ci", "stochastic", "adversarial"):
        assert getattr(res.p, mode).item() == pytest.approx(getattr(report, mode), rel=1e-12)
        assert getattr(res.graph, mode).item() == pytest.approx(getattr(report, mode), rel=1e-12)


def test_adversary_reaches_base_alive_entries_that_a_given_ci_dropped(d, ids):
    """With a given CI that zeroes an entry alive under the CI network, the adversary still moves that entry."""
    tokens = ids[:1]
    assert any(v.any() for v in _network_ci(d, tokens).values())  # entries alive under the CI network exist
    dropped = {p: torch.zeros(T, c, dtype=torch.float64) for p, c in d.Cs.items()}  # every entry pruned
    kwargs = {"n_samples": 16, "restarts": 2, "seed": 1, "pgd_step_size": 0.1}
    passive = circuit_faithfulness(d, tokens, [], T - 1, 3, ci=dropped, pgd_steps=0, **kwargs)
    attacked = circuit_faithfulness(d, tokens, [], T - 1, 3, ci=dropped, pgd_steps=4, **kwargs)
    assert int(attacked.n_alive) == 0
    assert attacked.p.adversarial.item() < passive.p.adversarial.item() - 1e-6


def test_adversary_lowers_a_partial_circuit_and_rows_are_independent(d, ids):
    circuit = ["0.attn.q:1", "1.attn.o:2", "0.mlp.down:4@5", "1.mlp.up:0"]
    kwargs = {"n_samples": 16, "restarts": 2, "seed": 3}
    passive = circuit_faithfulness(d, ids, circuit, [T - 1, T - 2], [3, 9], pgd_steps=0, **kwargs)
    attacked = circuit_faithfulness(d, ids, circuit, [T - 1, T - 2], [3, 9], pgd_steps=4, **kwargs)
    # Same draws (the generator is consumed identically); the attack can only lower P.
    assert torch.equal(passive.p.ci, attacked.p.ci) and torch.equal(passive.p.stochastic, attacked.p.stochastic)
    assert (attacked.p.adversarial <= passive.p.adversarial + 1e-12).all()
    assert (attacked.p.adversarial < passive.p.adversarial - 1e-6).any()
    assert (attacked.n_circuit < attacked.n_alive).all()
    single = circuit_faithfulness(d, ids[1:], circuit, T - 2, 9, **kwargs)  # CI numbers use no draws
    assert single.p.ci.item() == pytest.approx(attacked.p.ci[1].item(), rel=1e-12)
    assert single.kl.ci.item() == pytest.approx(attacked.kl.ci[1].item(), rel=1e-12)
    json.dumps(attacked.as_dict())


# ---------------------------------------------------------------- CLI --------------------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A tiny Llama with its own BPE tokenizer, saved as a target folder, and a saved decomposition of it."""
    from decomposer.tokenizer import train_tokenizer
    from decomposer.vpd.config import DecomposeConfig
    from decomposer.vpd.run import Decomposition, save_state

    root = tmp_path_factory.mktemp("ablate-run")
    text = ["The princess lost her crown. The prince lost his way. see you soon :) " * 4] * 8
    tokenizer = train_tokenizer(text, vocab_size=300)
    torch.manual_seed(0)
    target = tiny_llama(vocab=len(tokenizer))
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    config = DecomposeConfig.model_validate(
        {"target": str(root / "target"), "modules": MODULES, "ci": {"kind": "mlp", "hidden": 4}}
    )
    d = Decomposition.create(config, target)
    save_state(root / "run", d, step=0, target_name=str(root / "target"), train_state={})
    return root / "run", tokenizer


def test_cli_reports_before_and_after(saved_run, capsys):
    from decomposer.vpd.load import load_run

    run, tokenizer = saved_run
    argv = ["ablate", "--run", str(run), "--prompt", "The princess lost", "--nodes", "1.attn.q:3", "0.mlp.down:2@1"]
    assert main([*argv, "--target", " her", "--generate", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    d, _, _ = load_run(run)
    ids = tokenizer("The princess lost", return_tensors="pt", add_special_tokens=False)["input_ids"]
    label = tokenizer(" her", add_special_tokens=False)["input_ids"][0]
    res = ablate(d, ids, ["1.attn.q:3", "0.mlp.down:2@1"], target_token=label)
    assert out["p_before"] == pytest.approx(res.p_target.item()) and out["p_after"] == pytest.approx(
        res.p_intervened.item()
    )
    assert out["kl_after"] == pytest.approx(res.kl[0, -1].item()) and out["target_pos"] == ids.shape[1] - 1
    assert [x["id"] for x in out["top_before"]] == res.target_logits[0, -1].topk(5).indices.tolist()
    assert out["generation"]["without"] == generate(d, tokenizer, "The princess lost", (), 3)
    assert main([*argv, "--kind", "scale", "--scale", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "before" in text and "after" in text and "top-5" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--nodes", "7.attn.q:1"], "`--nodes` entry '7.attn.q:1' names no decomposed matrix"),
        (["--nodes", "0.attn.q:8"], "`--nodes` entry '0.attn.q:8' has index 8, but 0.attn.q has C=8"),
        (["--nodes", "0.attn.q:1@40"], "has position 40, but the prompt has"),
        (["--nodes", "0.attn.q:1", "--kind", "scale"], "`--scale` goes with `--kind scale`"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(saved_run, capsys, extra, message):
    run, _ = saved_run
    assert main(["ablate", "--run", str(run), "--prompt", "The princess lost", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
