"""Every supported family on a random tiny model: the registry, `modules: auto`, exact masks, edges and q/k pairs.

Models are built from transformers config classes (nothing is downloaded) and run in float64. Several HF
families cast to float32 inside norms and the eager softmax; `float64_throughout` keeps float64 so that
finite differences are clean to ~1e-8.
"""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import pytest
import torch
import transformers as tf
from torch import nn

from attrgraph.attention import attention_pattern, qk_unavailable
from attrgraph.edge_table import Attribution
from attrgraph.edges import attribute
from attrgraph.nodes import NodeId, module_short_name
from attrgraph.qk import add_qk_pairs, score_decomposition, score_terms
from decomposer.architectures import (
    PAPER_C_RATIOS,
    architecture_of,
    attention_spec,
    auto_modules,
    matrix_role,
    supported_families,
)
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition
from decomposer.vpd.targets import AutoModules, ModuleSpec, select_modules
from tests.conftest import EDGE_KINDS, finite_difference_edge, float64_decomposition, float64_throughout

VOCAB, T, D = 40, 5, 16
_IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "attn_implementation": "eager"}
_LLAMA = {"hidden_size": D, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}

# family → (config class, model class, config kwargs, expected (position kind, residual, fused qkv)).
_GQA = {**_LLAMA, "num_key_value_heads": 2}
_ROPE, _LEARNED = ("rope", "sequential", False), ("learned", "sequential", False)
FAMILIES: dict[str, tuple[type, type, dict, tuple[str, str, bool]]] = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, _GQA, _ROPE),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, _GQA, _ROPE),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, _GQA, _ROPE),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {**_GQA, "head_dim": 4}, _ROPE),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {**_GQA, "head_dim": 4, "attn_logit_softcapping": 0.5}, _ROPE),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {**_GQA, "head_dim": 4}, _ROPE),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, _GQA, _ROPE),
    "gpt2": (
        tf.GPT2Config,
        tf.GPT2LMHeadModel,
        {"n_embd": D, "n_layer": 2, "n_head": 2, "n_positions": 32},
        ("learned", "sequential", True),
    ),
    "gpt_neox": (
        tf.GPTNeoXConfig,
        tf.GPTNeoXForCausalLM,
        {
            "hidden_size": D,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "rotary_pct": 0.5,
        },
        ("rope", "parallel", True),
    ),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {**_GQA, "partial_rotary_factor": 0.5}, ("rope", "sequential", True)),
    "opt": (
        tf.OPTConfig,
        tf.OPTForCausalLM,
        {"hidden_size": D, "ffn_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "word_embed_proj_dim": D},
        _LEARNED,
    ),
    "gptj": (
        tf.GPTJConfig,
        tf.GPTJForCausalLM,
        {"n_embd": D, "n_layer": 2, "n_head": 2, "rotary_dim": 4, "n_positions": 32},
        ("rope_interleaved", "parallel", False),
    ),
    "falcon": (
        tf.FalconConfig,
        tf.FalconForCausalLM,
        {"hidden_size": D, "num_hidden_layers": 2, "num_attention_heads": 4},
        ("rope", "parallel", True),
    ),
    "falcon_alibi": (
        tf.FalconConfig,
        tf.FalconForCausalLM,
        {
            "hidden_size": D,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_kv_heads": 2,
            "new_decoder_architecture": True,
            "alibi": True,
        },
        ("alibi", "parallel", True),
    ),
    "falcon_rw": (  # Falcon-RW: q, k, v interleaved per head, ALiBi, sequential residual
        tf.FalconConfig,
        tf.FalconForCausalLM,
        {
            "hidden_size": D,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "multi_query": False,
            "parallel_attn": False,
            "alibi": True,
        },
        ("alibi", "sequential", True),
    ),
}
QK_NORM = {"qwen3", "gemma3", "olmo2"}
AUTO = {"auto": True, "scale": 0.25}  # the paper's ratios at a quarter: C from 3 (q, k) to 19 (down)


def build(name: str, **extra) -> nn.Module:
    config_cls, model_cls, kwargs, _ = FAMILIES[name]
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=VOCAB, max_position_embeddings=32, **_IDS, **kwargs, **extra)
    if hasattr(cfg, "initializer_range"):
        cfg.initializer_range = 0.2  # O(1) attention scores, so the q/k checks are not trivially uniform
    return model_cls(cfg).eval()


# --- float64 everywhere ---------------------------------------------------------------------------


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> tuple[str, Decomposition, torch.Tensor, dict[str, torch.Tensor]]:
    name = request.param
    with float64_throughout():
        d = float64_decomposition(build(name), AUTO)
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(1, VOCAB, (1, T), generator=gen)
        ci = {}
        for p in d.module_paths:
            g = torch.rand(T, d.Cs[p], generator=gen, dtype=torch.float64)
            ci[p] = torch.where(g < 0.5, 0.0, g)  # half dead: the gating is exercised and the graph stays small
    return name, d, tokens, ci


# --- the registry and `modules: auto` -------------------------------------------------------------


def test_registry_describes_each_family(family):
    name, d, _, _ = family
    kind, residual, fused = FAMILIES[name][3]
    spec = attention_spec(d.model.target)
    assert (spec.positions.kind, spec.residual, spec.qkv_columns is not None) == (kind, residual, fused)
    assert spec.arch.qk_norm == (name in QK_NORM)
    roles = {module_short_name(p)[2] for p in d.module_paths}
    attn = {"qkv", "o"} if fused else {"q", "k", "v", "o"}
    assert attn <= roles and "down" in roles and roles & {"up", "gate_up"}
    if spec.qkv_columns is not None:  # the q, k and v columns tile the fused output exactly once
        cols = torch.cat(list(spec.qkv_columns.values())).sort().values
        qkv = next(p for p in d.module_paths if module_short_name(p)[2] == "qkv")
        assert torch.equal(cols, torch.arange(d.model.components(qkv).d_out))


def test_auto_modules_take_every_matrix_with_the_papers_ratios(family):
    _, d, _, _ = family
    target = d.model.target
    chosen = auto_modules(target)
    blocks = {module_short_name(p)[0] for p in chosen}
    assert blocks == {0, 1} and "lm_head" not in chosen
    for path, C in chosen.items():
        assert C == round(PAPER_C_RATIOS[matrix_role(path)[2]] * D)
    # The config forms: `auto`, per-role overrides with a scale, and a pattern without C.
    assert select_modules(target, "auto") == chosen
    role = matrix_role(next(iter(chosen)))[2]
    scaled = select_modules(target, AutoModules(C={role: 7}, scale=0.5))
    for path, C in scaled.items():
        r = matrix_role(path)[2]
        assert C == (7 if r == role else max(1, round(PAPER_C_RATIOS[r] * 0.5 * D))), path
    first = next(iter(chosen))
    assert select_modules(target, [ModuleSpec(pattern=first)]) == {first: chosen[first]}


def test_unsupported_models_and_paths_get_one_sentence():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(3, 3)

    with pytest.raises(VpdError, match=r"no architecture adapter covers \(supported: Llama, .*GPT-J, Falcon\)"):
        select_modules(Toy(), "auto")
    with pytest.raises(VpdError, match=r"no architecture adapter"):
        select_modules(Toy(), [ModuleSpec(pattern="enc")])
    with pytest.raises(VpdError, match=r"`modules.C` names \['gate'\], which GPT-2 does not have"):
        auto_modules(build("gpt2"), {"gate": 4})
    with pytest.raises(VpdError, match="not an attention or MLP matrix of a supported family"):
        matrix_role("transformer.wte")
    assert "Falcon" in supported_families() and "GPT-NeoX/Pythia" in supported_families()
    assert architecture_of(build("llama")).family == "Llama"


def test_a_model_that_is_not_a_causal_lm_is_refused_by_path(tmp_path):
    from decomposer.target.loading import load_target

    tf.T5Config(d_model=8, d_ff=16, num_layers=1, num_heads=2, vocab_size=VOCAB).save_pretrained(tmp_path)
    with pytest.raises(VpdError, match=r"is not a decoder-only causal LM .* supported family: Llama, .*Falcon\."):
        load_target(str(tmp_path))


@pytest.mark.parametrize(
    ("modules", "expected"),
    [
        ("auto", "auto"),
        ("{auto: true, C: {q: 8}, scale: 0.5}", AutoModules(C={"q": 8}, scale=0.5)),
        ("[{pattern: 'model.layers.*.mlp.up_proj'}]", (ModuleSpec(pattern="model.layers.*.mlp.up_proj"),)),
        ("automatic", "`modules` in .*write `modules: auto` or a list of \\{pattern, C\\} entries"),
        ("{auto: true, C: {q: 0}}", "`modules.C.q` in .*greater than 0"),
        ("[{pattern: a, C: -3}]", "`modules.0.C` in .*greater than 0"),
    ],
)
def test_module_config_forms(modules, expected, tmp_path):
    from decomposer.vpd.config import load_decompose_config

    path = tmp_path / "c.yaml"
    path.write_text(f"modules: {modules}\n")
    if isinstance(expected, str) and expected != "auto":
        with pytest.raises(VpdError, match=expected):
            load_decompose_config(path)
    else:
        assert load_decompose_config(path).modules == expected


# --- exactness ------------------------------------------------------------------------------------


def test_all_ones_masks_plus_delta_reproduce_the_logits(family):
    _, d, tokens, _ = family
    with float64_throughout(), torch.no_grad():
        clean = d.model.target(tokens).logits
        masks = {p: torch.ones(1, T, d.Cs[p], dtype=torch.float64) for p in d.module_paths}
        deltas = {p: torch.ones(1, T, dtype=torch.float64) for p in d.module_paths}
        masked = d.model(tokens, masks=masks, delta_masks=deltas).logits
        without = d.model(tokens, masks=masks).logits
    assert clean.abs().max() > 0.1
    torch.testing.assert_close(masked, clean, rtol=0, atol=1e-10)
    assert not torch.allclose(without, clean, atol=1e-4)  # a random decomposition needs its Δ


def test_ablating_a_subcomponent_equals_the_masked_forward(family):
    """`circuits.intervene` on the MLP-in matrix (OPT's arrives flattened to (B·T, d)) matches the mask."""
    from circuits.interventions import Intervention, intervene

    _, d, tokens, _ = family
    path = next(p for p in d.module_paths if module_short_name(p)[2] in ("up", "gate_up"))
    key = ".".join(map(str, module_short_name(path)))
    batch = torch.cat([tokens, tokens.flip(-1)])  # two rows, so a (B·T, d) input is not a (T, d) one
    with float64_throughout(), torch.no_grad():
        with intervene(d, Intervention(nodes=(f"{key}:1", f"{key}:2@3"), kind="zero")):
            ablated = d.model.target(batch).logits
        mask = torch.ones(2, T, d.Cs[path], dtype=torch.float64)
        mask[:, :, 1] = 0
        mask[:, 3, 2] = 0
        masked = d.model(batch, masks={path: mask}, delta_masks={path: torch.ones(2, T, dtype=torch.float64)}).logits
        clean = d.model.target(batch).logits
    torch.testing.assert_close(ablated, masked, rtol=0, atol=1e-10)
    assert not torch.allclose(ablated, clean, atol=1e-6)


def test_sampled_edges_of_every_kind_equal_interventions(family):
    _, d, tokens, ci = family
    with float64_throughout():
        att = attribute(d, tokens, ci=ci)
        nz = att.A.nonzero().tolist()
        for kind, pick in EDGE_KINDS.items():
            candidates = [(t, s) for t, s in nz if pick(att.nodes[s], att.nodes[t])]
            assert candidates, f"no nonzero {kind} edge"
            tgt, src = max(candidates, key=lambda ts: abs(float(att.A[ts[0], ts[1]])))  # the strongest of its kind
            expected = finite_difference_edge(d, tokens, att, tgt, src)
            stored = float(att.A[tgt, src])
            assert stored == pytest.approx(expected, rel=1e-6, abs=1e-9), f"{kind}: {att.nodes[src]} → {att.nodes[tgt]}"


# --- q/k pairs ------------------------------------------------------------------------------------


def test_qk_scores_follow_the_position_scheme(family):
    name, d, tokens, _ = family
    if name in QK_NORM:
        assert "normalises q and k" in qk_unavailable(d)
        with pytest.raises(VpdError, match="normalises q and k"):
            score_terms(d, tokens, 0)
        return
    assert qk_unavailable(d) is None
    positions = attention_spec(d.model.target).positions
    for layer in (0, 1):
        terms = score_terms(d, tokens, layer)
        # The split reproduces the model's own attention, which applies the family's rotation or bias.
        model = attention_pattern(d, tokens, layer)[0].double()
        torch.testing.assert_close(terms.attention(), model, rtol=0, atol=1e-6)
        assert model[:, 1:].max() < 0.999  # not one-hot past t = 0, so a wrong rotation could not hide
        for t, t_key in ((T - 1, 0), (2, 1)):
            parts = score_decomposition(terms, t, t_key)
            total = sum(p.flatten(1).sum(1) if p.ndim > 1 else p for p in parts.values())
            torch.testing.assert_close(total, terms.scores()[:, t, t_key], rtol=0, atol=1e-9)
            assert ("position" in parts) == (positions.kind == "alibi")
    # One subcomponent's write direction at each position, R_t u / ‖u‖ up to the sign of its activation.
    q = terms.q_comp[:, 0, 0] / terms.q_comp[:, 0, 0].norm(dim=-1, keepdim=True)
    k = terms.k_comp[:, 0, 0] / terms.k_comp[:, 0, 0].norm(dim=-1, keepdim=True)
    if positions.rotary:  # (R_t u)·(R_t′ w) depends on t − t′ only (GPT-J's angles are float32), and does depend on it
        assert float((q[3] @ k[1]).abs()) == pytest.approx(float((q[4] @ k[2]).abs()), abs=1e-7)
        assert float((q[3] @ k[1]).abs()) != pytest.approx(float((q[3] @ k[2]).abs()), abs=1e-4)
        if positions.rotary_dim is not None:  # partial rotary: each head's tail never rotates
            rot = positions.rotary_dim
            assert torch.allclose(q[0, rot:].abs(), q[4, rot:].abs())
            assert not torch.allclose(q[0, :rot].abs(), q[4, :rot].abs())
    else:  # learned positions and ALiBi: R_t = I
        assert torch.allclose(q[0].abs(), q[4].abs()) and torch.allclose(k[0].abs(), k[3].abs())


def test_static_strengths_agree_with_the_prompts_pairs(family):
    """`vpd qk`'s static S(c, c′, τ, h) is the prompt's DD with the activations divided out, for every scheme."""
    from circuits.qk.static import qk_layers, static_strength

    name, d, tokens, _ = family
    assert qk_layers(d) == ([] if name in QK_NORM else [0, 1])
    if name in QK_NORM:
        return
    t, tau = T - 1, 2
    terms = score_terms(d, tokens, 1)
    lay = terms.layout
    S = static_strength(d, 1, max_offset=tau).S[:, tau]  # (H, C_Q, C_K)
    with torch.no_grad():
        _, xs = d.model.forward_with_inputs(tokens)
    q, k = d.model.components(lay.q_path), d.model.components(lay.k_path)
    a_q = xs[lay.q_path][0, t].double() @ q.V.double() / q.V.double().norm(dim=0)  # a / ‖v‖
    a_k = xs[lay.k_path][0, t - tau].double() @ k.V.double() / k.V.double().norm(dim=0)
    expected = S * a_q[None, :, None] * a_k[None, None, :]
    dd = score_decomposition(terms, t, t - tau)["comp·comp"]
    assert dd.abs().max() > 1e-3
    torch.testing.assert_close(dd, expected, rtol=1e-6, atol=1e-9)


def test_traced_layer_pairs_follow_the_blocks(family):
    """Which layers feed which (`trace_layer_pairs`): v → o inside a block, MLP in → out, the last writers → logits."""
    from attrgraph.reference import EMB, LOGIT, trace_layer_pairs

    name, d, _, _ = family
    with float64_throughout():
        pairs = trace_layer_pairs(d, n_tokens=3)
    by_role = {(module_short_name(p)[0], module_short_name(p)[2]): p for p in d.module_paths}
    fused = FAMILIES[name][3][2]
    for block in (0, 1):
        assert by_role[(block, "qkv" if fused else "v")] in pairs[by_role[(block, "o")]]
        mlp_in = next(by_role[(block, r)] for r in ("up", "gate_up") if (block, r) in by_role)
        assert mlp_in in pairs[by_role[(block, "down")]]
    assert EMB in pairs[by_role[(0, "qkv" if fused else "q")]]
    assert by_role[(1, "down")] in pairs[LOGIT] and by_role[(1, "o")] in pairs[LOGIT]
    # Nothing reads a later block: block 0's matrices never depend on block 1.
    assert not any(
        module_short_name(s)[0] == 1
        for p, srcs in pairs.items()
        if p != LOGIT
        for s in srcs
        if s != EMB and not s.startswith("delta/") and module_short_name(p)[0] == 0
    )


def _o_graph(att: Attribution) -> nx.DiGraph:
    """The o nodes of an attribution as a graph, with the attributes `qk_pairs_for_o` reads."""
    G = nx.DiGraph()
    for n in att.nodes:
        if n.kind == "comp" and module_short_name(n.module)[2] == "o":
            G.add_node(str(n), kind="comp", sublayer="o", pos=n.pos, module=n.module, index=n.index)
    return G


def test_qk_pairs_in_the_graph_or_the_reason_why_not(family):
    name, d, tokens, ci = family
    with float64_throughout():
        G = _o_graph(attribute(d, tokens, ci=ci))
    H = add_qk_pairs(G, d, tokens)
    json.dumps(H.graph)
    if name in QK_NORM:
        assert H.graph["qk_pairs"] == [] and "normalises q and k" in H.graph["qk_note"]
        return
    assert "qk_note" not in H.graph and H.graph["qk_pairs"]
    fused = FAMILIES[name][3][2]
    for pair in H.graph["qk_pairs"]:
        q, k = NodeId.parse(pair["q_node"]), NodeId.parse(pair["k_node"])
        assert (q.module == k.module) == fused and pair["key_pos"] <= pair["query_pos"]
        assert module_short_name(q.module)[0] == module_short_name(NodeId.parse(pair["o_node"]).module)[0]


def test_a_decomposition_without_q_and_k_has_no_pairs_and_says_why():
    d = float64_decomposition(build("gpt2"), [{"pattern": "transformer.h.*.mlp.c_*", "C": 3}])
    assert "No block has the fused qkv matrix decomposed" in qk_unavailable(d)
    H = add_qk_pairs(nx.DiGraph(), d, torch.tensor([[1, 2]]))
    assert H.graph["qk_pairs"] == [] and "modules: auto" in H.graph["qk_note"]


# --- `vpd decompose` then `vpd graph`, the target loaded by path ----------------------------------


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # untrained models predict control tokens
def test_decompose_then_graph_on_a_saved_model(name, micro_data_dir, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    from circuits.cli import main
    from decomposer.data.corpus import corpus_paths

    # The run's loss plots and the graph's PNG are the same for every family and take most of the time; they
    # are tested elsewhere.
    monkeypatch.setattr("decomposer.vpd.plots.plot_run", lambda *args, **kwargs: [])
    monkeypatch.setattr("attrgraph.render.render_png", lambda G, path, **kwargs: Path(path), raising=False)

    tokenizer = PreTrainedTokenizerFast.from_pretrained(corpus_paths(micro_data_dir).tokenizer)
    config_cls, model_cls, kwargs, _ = FAMILIES[name]
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=len(tokenizer), max_position_embeddings=32, **{**_IDS, "pad_token_id": 1}, **kwargs)
    model_dir = tmp_path / "model"
    model_cls(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = {
        "target": str(model_dir),  # a folder, resolved exactly as a hub id would be
        "data_dir": str(micro_data_dir),
        "modules": "auto",
        "ci": {"kind": "global_transformer", "d_model": 16, "n_blocks": 1, "n_heads": 2, "d_mlp": 32},
        "optim": {"steps": 2, "batch_size": 2, "seq_len": 16, "faithfulness_warmup_steps": 1, "lr": 1e-3},
        "eval": {"every": 2, "batches": 1, "pgd_steps": [1]},
    }
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    run = tmp_path / "run"
    assert main(["decompose", "--config", str(tmp_path / "c.yaml"), "--out", str(run)]) == 0
    meta = json.loads((run / "decomposition" / "decomposition.json").read_text())
    assert {matrix_role(p)[2] for p in meta["modules"]} >= {"o", "down"}
    capsys.readouterr()
    out = tmp_path / "graph"
    args = ["graph", "--run", str(run), "--prompt", "the cat sat on the", "--out", str(out), "--json"]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["nodes"] > 0 and summary["edges"] > 0
    pruned = json.loads(Path(summary["files"]["pruned"]).read_text())
    graph_attrs = pruned.get("graph", {})
    if name in QK_NORM:
        assert "normalises q and k" in graph_attrs["qk_note"] and graph_attrs["qk_pairs"] == []
        assert "normalises q and k after the projection" in Path(summary["files"]["html"]).read_text()  # the panel
    else:
        assert "qk_note" not in graph_attrs


def test_readme_lists_every_family_and_its_add_a_family_example_works(monkeypatch, request):
    import re
    from types import SimpleNamespace

    import decomposer.architectures as registry

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Supported models", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1) for m in re.finditer(r"^\| [^|]+ \| `([a-z0-9_]+)` \|", section, re.M)}
    assert rows - {"model_type"} == {t for a in registry.architectures() for t in a.model_types}
    # The README's adapter, run as written, makes a new family decomposable with `modules: auto`.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    request.addfinalizer(registry._matrix_role.cache_clear)  # no role of the example outlives the test
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(example, {})

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.ModuleDict({n: nn.Linear(8, 8) for n in ("wq", "wk", "wv", "wo")})
            self.ffn = nn.ModuleDict({"w1": nn.Linear(8, 32), "w2": nn.Linear(32, 8)})

    class MyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(model_type="mylm", hidden_size=8, num_attention_heads=2)
            self.model = nn.Module()
            self.model.blocks = nn.ModuleList([Block(), Block()])

    chosen = select_modules(MyLM(), "auto")
    assert len(chosen) == 12 and chosen["model.blocks.1.ffn.w2"] == round(4.67 * 8)
    assert matrix_role("model.blocks.1.attn.wk") == (1, "attn", "k")


def test_register_refuses_a_model_type_taken_by_another_family():
    import dataclasses

    from decomposer.architectures import architectures, register

    llama = next(a for a in architectures() if "llama" in a.model_types)
    clone = dataclasses.replace(llama, family="Llama again")
    with pytest.raises(VpdError, match="registered already"):
        register(clone)
    assert register(llama) is llama  # the same family object again is harmless
