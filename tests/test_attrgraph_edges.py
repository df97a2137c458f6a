"""Attribution edges (docs/attribution-graphs.md §2): exactness against finite differences, batching, positions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.llama import modeling_llama

from attrgraph.edge_table import Attribution
from attrgraph.edges import attribute
from attrgraph.leaves import direct_effect_leaves
from attrgraph.nodes import NodeId, module_short_name
from attrgraph.reference import attribute_reference
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition
from tests.conftest import finite_difference_edge, float64_decomposition, tiny_llama

T, VOCAB, C = 5, 40, 6
_IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "attn_implementation": "eager"}
LLAMA_MODULES = [
    {"pattern": "model.layers.*.self_attn.*_proj", "C": C},
    {"pattern": "model.layers.*.mlp.*_proj", "C": C},
]
GPT2_MODULES = [{"pattern": "transformer.h.*.attn.c_*", "C": C}, {"pattern": "transformer.h.*.mlp.c_*", "C": C}]
NEOX_MODULES = [
    {"pattern": "gpt_neox.layers.*.attention.*", "C": C},
    {"pattern": "gpt_neox.layers.*.mlp.dense_*", "C": C},
]


def _decomposition(target: torch.nn.Module, modules: list[dict]) -> Decomposition:
    return float64_decomposition(target, modules)


def _setup(d: Decomposition, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (1, T), generator=gen)
    ci = {}
    for p in d.module_paths:
        g = torch.rand(T, C, generator=gen, dtype=torch.float64)
        ci[p] = torch.where(g < 0.3, 0.0, g)  # about a third dead, so CI gating is exercised
    return tokens, ci


def _rms_norm_same_dtype(self: modeling_llama.LlamaRMSNorm, x: torch.Tensor) -> torch.Tensor:
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def _eager_attention_same_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)  # NeoX has no grouped-query attention
    key, value = (modeling_llama.repeat_kv(s, groups) for s in (key, value))
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = scores.softmax(-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@pytest.fixture(scope="module")
def float64_llama() -> Iterator[None]:
    # HF Llama runs RMSNorm and the eager softmax in float32 even for a float64 model, which leaves
    # finite differences with ~1e-7 relative noise; these copies keep the input dtype throughout.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_same_dtype)
        mp.setattr(modeling_llama, "eager_attention_forward", _eager_attention_same_dtype)
        yield


@pytest.fixture(scope="module")
def llama(float64_llama) -> tuple[Decomposition, torch.Tensor, dict[str, torch.Tensor], Attribution]:
    torch.manual_seed(0)
    d = _decomposition(tiny_llama(vocab=VOCAB), LLAMA_MODULES)
    tokens, ci = _setup(d, 1)
    return d, tokens, ci, attribute_reference(d, tokens, ci=ci)


@pytest.fixture(scope="module")
def gpt2() -> tuple[Decomposition, torch.Tensor, dict[str, torch.Tensor], Attribution]:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, **_IDS)
    d = _decomposition(GPT2LMHeadModel(cfg), GPT2_MODULES)
    tokens, ci = _setup(d, 2)
    return d, tokens, ci, attribute_reference(d, tokens, ci=ci)


@pytest.fixture(scope="module")
def neox() -> Iterator[tuple[Decomposition, torch.Tensor, dict[str, torch.Tensor], Attribution]]:
    # Partial rotary (a quarter of each head) and the parallel residual are the NeoX-specific paths.
    # Its eager softmax runs in float32; the patch keeps float64 so finite differences are clean.
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        rotary_pct=0.5,
        use_parallel_residual=True,
        **_IDS,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_gpt_neox, "eager_attention_forward", _eager_attention_same_dtype)
        d = _decomposition(GPTNeoXForCausalLM(cfg), NEOX_MODULES)
        tokens, ci = _setup(d, 3)
        yield d, tokens, ci, attribute_reference(d, tokens, ci=ci)


def _find(att: Attribution, kind: str, pos: int, short: str | None = None, block: int | None = None) -> int:
    """Index of the first node of `kind` at `pos` (and matrix `short` of `block` for comp/delta)."""
    for i, n in enumerate(att.nodes):
        if n.kind != kind or n.pos != pos:
            continue
        if short is not None and module_short_name(n.module)[::2] != (block, short):
            continue
        return i
    raise AssertionError(f"no {kind} node {short} in block {block} at position {pos}")


def _check_exact(d: Decomposition, tokens: torch.Tensor, att: Attribution, pairs: list[tuple[int, int]]) -> None:
    for tgt, src in pairs:
        stored = float(att.A[tgt, src])
        assert stored != 0.0, f"{att.nodes[src]} → {att.nodes[tgt]} is zero; the sample would prove nothing"
        expected = finite_difference_edge(d, tokens, att, tgt, src)
        assert stored == pytest.approx(expected, rel=1e-6, abs=1e-9), f"{att.nodes[src]} → {att.nodes[tgt]}"


def test_llama_edges_equal_intervention_effect(llama):
    d, tokens, _, att = llama
    logit = att.nodes.index(NodeId.logit(att.logit_tokens[0], T - 1))
    f = lambda kind, pos, short=None, block=None: _find(att, kind, pos, short, block)  # noqa: E731
    pairs = [
        (f("comp", 2, "q", 1), f("comp", 2, "o", 0)),  # comp → comp across blocks, same position
        (f("comp", 1, "up", 0), f("comp", 1, "o", 0)),  # o → up inside a block
        (f("comp", 3, "down", 1), f("comp", 3, "up", 1)),
        (f("comp", 3, "down", 1), f("comp", 3, "gate", 1)),
        (f("comp", 3, "o", 0), f("comp", 3, "q", 0)),  # q → o, same position
        (f("comp", 3, "o", 0), f("comp", 1, "k", 0)),  # k → o across positions
        (f("comp", 4, "o", 1), f("comp", 0, "v", 1)),  # v → o across positions
        (f("comp", 2, "q", 0), f("emb", 2)),
        (logit, f("comp", T - 1, "down", 1)),
        (logit, f("emb", T - 1)),
        (f("comp", 2, "k", 1), f("delta", 2, "o", 0)),
        (logit, f("delta", T - 1, "down", 0)),
    ]
    _check_exact(d, tokens, att, pairs)


def test_gpt2_edges_equal_intervention_effect(gpt2):
    d, tokens, _, att = gpt2
    logit = att.nodes.index(NodeId.logit(att.logit_tokens[0], T - 1))
    f = lambda kind, pos, short=None, block=None: _find(att, kind, pos, short, block)  # noqa: E731
    pairs = [
        (f("comp", 3, "o", 0), f("comp", 1, "qkv", 0)),  # fused Conv1D c_attn → c_proj across positions
        (f("comp", 2, "qkv", 1), f("comp", 2, "down", 0)),
        (f("comp", 1, "up", 1), f("delta", 1, "o", 1)),
        (logit, f("emb", T - 1)),
    ]
    _check_exact(d, tokens, att, pairs)


def test_neox_edges_equal_intervention_effect(neox):
    d, tokens, _, att = neox
    logit = att.nodes.index(NodeId.logit(att.logit_tokens[0], T - 1))
    f = lambda kind, pos, short=None, block=None: _find(att, kind, pos, short, block)  # noqa: E731
    pairs = [
        (f("comp", 3, "o", 0), f("comp", 1, "qkv", 0)),  # fused query_key_value → dense across positions
        (f("comp", 2, "o", 1), f("comp", 2, "qkv", 1)),  # same position
        (f("comp", 2, "qkv", 1), f("comp", 2, "down", 0)),
        (f("comp", 3, "up", 1), f("comp", 3, "o", 0)),  # the next block's MLP reads the attention output
        (f("comp", 1, "up", 1), f("delta", 1, "o", 0)),
        (logit, f("comp", T - 1, "down", 1)),
        (logit, f("emb", T - 1)),
    ]
    _check_exact(d, tokens, att, pairs)
    # Parallel residual: a block's MLP reads the block input, never its own attention output.
    o, up = f("comp", 2, "o", 1), f("comp", 2, "up", 1)
    same_block = [
        (i, j)
        for i, t in enumerate(att.nodes)
        for j, s in enumerate(att.nodes)
        if t.kind == "comp"
        and s.kind in ("comp", "delta")
        and t.module == att.nodes[up].module
        and s.module == att.nodes[o].module
    ]
    assert same_block and all(float(att.A[i, j]) == 0.0 for i, j in same_block)


def test_neox_batched_equals_reference(neox):
    d, tokens, ci, ref = neox
    torch.testing.assert_close(attribute(d, tokens, ci=ci, batch_size=5).A, ref.A, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_equals_reference(llama, batch_size):
    # The batched run makes only the alive entries leaves, the reference every (t, c) entry.
    d, tokens, ci, ref = llama
    att = attribute(d, tokens, ci=ci, batch_size=batch_size)
    assert att.nodes == ref.nodes and att.logit_tokens == ref.logit_tokens
    torch.testing.assert_close(att.A, ref.A, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(att.activation, ref.activation, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(att.ci, ref.ci)


def test_module_and_positions_without_alive_entries(llama):
    d, tokens, ci, _ = llama
    paths = d.module_paths
    sparse = {p: g.clone() for p, g in ci.items()}
    sparse[paths[0]].zero_()  # a module with no comp node at all
    sparse[paths[4]][1:4] = 0  # positions with none, next to positions with several
    ref = attribute_reference(d, tokens, ci=sparse)
    att = attribute(d, tokens, ci=sparse, batch_size=4)
    assert not any(n.kind == "comp" and n.module == paths[0] for n in att.nodes)
    assert {n.pos for n in att.nodes if n.kind == "comp" and n.module == paths[4]} <= {0, 4}
    torch.testing.assert_close(att.A, ref.A, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("copies", [False, True])
@pytest.mark.parametrize("all_alive", [False, True])
def test_leaves_keep_the_forward_and_separate_rows(llama, copies, all_alive):
    """Sparse leaves reproduce the target's logits, hold the alive entries only, and rows never mix."""
    d, tokens, ci, _ = llama
    batch = tokens.expand(2, -1) if copies else torch.cat([tokens, tokens.flip(-1)])
    alive = None if all_alive else {p: g > 0 for p, g in ci.items()}
    with torch.enable_grad(), direct_effect_leaves(d.model, alive=alive, copies=copies) as rec:
        logits = d.model.target(batch).logits
    with torch.no_grad():
        plain = d.model.target(batch).logits
    torch.testing.assert_close(logits, plain, rtol=1e-12, atol=1e-12)
    for p in d.module_paths:
        mask = torch.ones(T, C, dtype=torch.bool) if all_alive else alive[p]
        t_idx, c_idx = mask.nonzero(as_tuple=True)
        assert torch.equal(rec.comp_index[p][0], t_idx) and torch.equal(rec.comp_index[p][1], c_idx)
        assert rec.comp_leaves[p].shape == (2, int(mask.sum()))
        torch.testing.assert_close(rec.comp_leaves[p][1].detach(), rec.acts[p][-1, t_idx, c_idx].detach())
    # Row 1's target depends on row 1's leaves only, exactly as in a batch-1 run of that prompt. The comp
    # target is read from the module input (with `copies`, `acts` holds row 0 only).
    last = d.module_paths[-1]
    v = d.model.components(last).V[:, 0].detach()
    # (Direct effects only: leaves such as q's reach neither target and get None.)
    target = rec.inputs[last][1, T - 1] @ v + logits[1, T - 1, 0]
    grads = torch.autograd.grad(target, rec.leaves(), allow_unused=True)
    with torch.enable_grad(), direct_effect_leaves(d.model, alive=alive) as one:
        one_logits = d.model.target(batch[1:]).logits
    one_target = one.inputs[last][0, T - 1] @ v + one_logits[0, T - 1, 0]
    one_grads = torch.autograd.grad(one_target, one.leaves(), allow_unused=True)
    assert [g is None for g in grads] == [g is None for g in one_grads]
    used = [(g, g_one) for g, g_one in zip(grads, one_grads, strict=True) if g is not None]
    assert sum(bool(g[1].ne(0).any()) for g, _ in used) >= 3  # emb, the MLP inputs, deltas, ...
    for g, g_one in used:
        assert not bool(g[0].ne(0).any())
        torch.testing.assert_close(g[1], g_one[0], rtol=1e-10, atol=1e-12)


def test_alive_mask_must_match_the_forward(llama):
    d, tokens, ci, _ = llama
    bad = {p: (g > 0)[:-1] for p, g in ci.items()}
    with pytest.raises(VpdError, match="alive"), direct_effect_leaves(d.model, alive=bad):
        d.model.target(tokens)
    with pytest.raises(VpdError, match="alive"), direct_effect_leaves(d.model, alive={}):
        d.model.target(tokens)


def test_gpt2_batched_equals_reference(gpt2):
    d, tokens, ci, ref = gpt2
    torch.testing.assert_close(attribute(d, tokens, ci=ci, batch_size=7).A, ref.A, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_cross_position_edges_only_from_k_v_to_o(family, request):
    _, _, _, att = request.getfixturevalue(family)
    tgt_idx, src_idx = att.A.nonzero(as_tuple=True)
    n_cross = 0
    for i, j in zip(tgt_idx.tolist(), src_idx.tolist(), strict=True):
        t, s = att.nodes[i], att.nodes[j]
        assert t.kind in ("comp", "logit"), f"{t} is source-only but has an incoming edge"
        if t.pos == s.pos:
            continue
        n_cross += 1
        assert t.kind == "comp" and s.kind in ("comp", "delta"), f"cross-position edge {s} → {t}"
        (tb, _, ts), (sb, _, ss) = module_short_name(t.module), module_short_name(s.module)
        assert ts == "o" and ss in ("k", "v", "qkv") and tb == sb and s.pos < t.pos, f"cross-position edge {s} → {t}"
    assert n_cross > 0


def test_node_set_and_ci_factor(llama):
    d, tokens, ci, ref = llama
    comps = [n for n in ref.nodes if n.kind == "comp"]
    assert len(comps) == sum(int((g > 0).sum()) for g in ci.values())
    assert sum(n.kind == "delta" for n in ref.nodes) == T * len(d.module_paths)
    assert [n for n in ref.nodes if n.kind == "emb"] == [NodeId.emb(t) for t in range(T)]
    with torch.no_grad():  # all masks 1 and the delta on reproduce the target's logits
        logits = d.model.target(tokens).logits[0, T - 1, ref.logit_tokens]
    torch.testing.assert_close(ref.activation[-len(ref.logit_tokens) :], logits, rtol=1e-10, atol=1e-10)
    plain = attribute(d, tokens, ci=ci, weight_by_source_ci=False)
    torch.testing.assert_close(plain.A * ref.ci[None, :], ref.A, rtol=1e-12, atol=1e-14)


def test_default_logit_tokens_and_ci(llama):
    d, tokens, _, _ = llama
    att = attribute(d, tokens[0], target_pos=3)
    with torch.no_grad():
        probs = d.model.target(tokens[:, :4]).logits[0, 3].softmax(-1)
    top = probs.sort(descending=True)
    n = int((top.values.cumsum(0) < 0.95).sum()) + 1
    assert att.logit_tokens == top.indices[: min(n, 10)].tolist() and att.target_pos == 3
    assert max(n.pos for n in att.nodes) == 3 and all(0 < g <= 1 for g in att.ci.tolist())


def test_errors(llama):
    d, tokens, ci, _ = llama
    with pytest.raises(VpdError, match="target_pos"):
        attribute(d, tokens, ci=ci, target_pos=T)
    with pytest.raises(VpdError, match="tokens"):
        attribute(d, tokens.double(), ci=ci)
    with pytest.raises(VpdError, match="one entry per"):
        attribute(d, tokens, ci={})
    with pytest.raises(VpdError, match="batch_size"):
        attribute(d, tokens, ci=ci, batch_size=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_batched_graphs_pack_several_targets_per_copy(family, request):
    """The batched-equals-reference tests above run with packing on: one backward, many targets per copy."""
    from attrgraph.candidates import CandidateNodes, prepare_inputs
    from attrgraph.edges import slot_groups

    d, tokens, ci, _ = request.getfixturevalue(family)
    tokens, target_pos, logit_tokens, ci, _ = prepare_inputs(d, tokens, None, [1, 2], ci)
    keys = slot_groups(d, CandidateNodes(d, T, target_pos, logit_tokens, ci))
    assert keys is not None
    target_key, _, n_keys = keys
    assert n_keys == T + d.model.target.config.num_hidden_layers and int(target_key.max()) < n_keys


def test_attention_without_decomposed_matrices_is_not_packed(float64_llama):
    """With q/k/v/o left whole, attention carries gradients across positions; targets then get a copy each."""
    from attrgraph.candidates import CandidateNodes, prepare_inputs
    from attrgraph.edges import slot_groups

    torch.manual_seed(0)
    d = _decomposition(tiny_llama(vocab=VOCAB), [{"pattern": "model.layers.*.mlp.*_proj", "C": C}])
    tokens, ci = _setup(d, 4)
    _, target_pos, logit_tokens, prepared, _ = prepare_inputs(d, tokens, None, [1], ci)
    assert slot_groups(d, CandidateNodes(d, T, target_pos, logit_tokens, prepared)) is None
    ref = attribute_reference(d, tokens, ci=ci)
    torch.testing.assert_close(attribute(d, tokens, ci=ci, batch_size=4).A, ref.A, rtol=1e-10, atol=1e-10)
