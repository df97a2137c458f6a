"""The component model: module selection, Conv1D reading, and the masked-forward invariants of docs/method.md §4."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from decomposer.errors import VpdError
from decomposer.vpd.components import ComponentModel, LinearComponents
from decomposer.vpd.targets import ModuleSpec, read_weight, select_modules

B, T, VOCAB = 2, 7, 64
_IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "attn_implementation": "eager"}


def tiny_llama() -> nn.Module:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        **_IDS,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> nn.Module:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, **_IDS)
    return GPT2LMHeadModel(cfg).eval()


def tiny_neox() -> nn.Module:
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        **_IDS,
    )
    return GPTNeoXForCausalLM(cfg).eval()


# Every block matrix of each family. The NeoX patterns also match the activation and rotary embedding,
# which select_modules skips because they are not linear.
FAMILIES = {
    "llama": (tiny_llama, [ModuleSpec(pattern="model.layers.*.self_attn.*", C=24), ModuleSpec(pattern="*mlp.*", C=40)]),
    "gpt2": (
        tiny_gpt2,
        [
            ModuleSpec(pattern="transformer.h.*.attn.c_attn", C=40),
            ModuleSpec(pattern="transformer.h.*.attn.c_proj", C=16),
            ModuleSpec(pattern="transformer.h.*.mlp.c_*", C=48),
        ],
    ),
    "neox": (tiny_neox, [ModuleSpec(pattern="*.attention.*", C=24), ModuleSpec(pattern="*.mlp.*", C=40)]),
}
N_MATRICES = {"llama": 14, "gpt2": 8, "neox": 8}


def build(family: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, ComponentModel, torch.Tensor]:
    make, specs = FAMILIES[family]
    target = make().to(dtype)
    cm = ComponentModel(target, specs, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, VOCAB, (B, T))
    return target, cm, ids


def full(cm: ComponentModel, value: float, lead: tuple[int, ...] = (B, T)) -> dict[str, torch.Tensor]:
    return {p: torch.full((*lead, cm.components(p).C), value, dtype=cm.components(p).V.dtype) for p in cm.module_paths}


def ones_delta(cm: ComponentModel, lead: tuple[int, ...] = (B, T)) -> dict[str, torch.Tensor]:
    return {p: torch.ones(lead, dtype=cm.components(p).V.dtype) for p in cm.module_paths}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_ones_masks_plus_delta_reproduce_target(family: str) -> None:
    target, cm, ids = build(family)
    assert len(cm.module_paths) == N_MATRICES[family]
    want = target(ids).logits
    got = cm(ids, masks=full(cm, 1.0), delta_masks=ones_delta(cm)).logits
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)
    # Without the delta the random U, V are far from W, so the check above is not vacuous.
    assert not torch.allclose(cm(ids, masks=full(cm, 1.0)).logits, want, atol=1e-3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_ones_masks_plus_delta_reproduce_target_float32(family: str) -> None:
    target, cm, ids = build(family, torch.float32)
    got = cm(ids, masks=full(cm, 1.0), delta_masks=ones_delta(cm)).logits
    assert torch.allclose(got, target(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_delta_plus_weight_hat_is_weight(family: str) -> None:
    target, cm, _ = build(family)
    for path in cm.module_paths:
        comp = cm.components(path)
        w, bias = read_weight(target.get_submodule(path))
        assert torch.equal(comp.weight, w)
        assert (comp.bias is None and bias is None) or torch.equal(comp.bias, bias)
        assert torch.allclose(comp.delta() + comp.weight_hat(), comp.weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_zero_masks_with_delta_equal_delta_only_model(family: str) -> None:
    target, cm, ids = build(family)
    reference = copy.deepcopy(target)
    with torch.no_grad():
        for path in cm.module_paths:
            module, delta = reference.get_submodule(path), cm.components(path).delta()
            module.weight.copy_(delta.T if isinstance(module, Conv1D) else delta)
    got = cm(ids, masks=full(cm, 0.0), delta_masks=ones_delta(cm)).logits
    assert torch.allclose(got, reference(ids).logits, rtol=1e-10, atol=1e-13)


def test_masked_forward_matches_hand_computation() -> None:
    # One matrix, generic leading shape: out = (xV * m) U + m_Δ (x Δᵀ) + b.
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(5, 3).double()
    comp = LinearComponents(lin.weight, lin.bias, 4, generator=gen)
    x, m, md = torch.randn(2, 3, 5, dtype=torch.float64), torch.rand(2, 3, 4, dtype=torch.float64), torch.rand(2, 3)
    want = (x @ comp.V * m) @ comp.U + md[..., None].double() * (x @ comp.delta().T) + lin.bias
    assert torch.allclose(comp(x, m, md), want, rtol=1e-12, atol=1e-14)
    assert torch.allclose(comp(x), x @ comp.weight_hat().T + lin.bias, rtol=1e-12, atol=1e-14)
    assert torch.equal(comp.component_acts(x), x @ comp.V)


def test_init_scales_and_generator() -> None:
    w = torch.zeros(300, 400)
    comp = LinearComponents(w, None, 500, generator=torch.Generator().manual_seed(0))
    assert comp.V.shape == (400, 500) and comp.U.shape == (500, 300)
    assert abs(comp.V.std().item() * 400**0.5 - 1) < 0.02  # std 1/√d_in
    assert abs(comp.U.std().item() * 500**0.5 - 1) < 0.02  # std 1/√C
    again = LinearComponents(w, None, 500, generator=torch.Generator().manual_seed(0))
    assert torch.equal(comp.V, again.V) and torch.equal(comp.U, again.U)
    assert set(comp.state_dict()) == {"V", "U"}


def test_routing_leaves_earlier_positions_of_causal_lm_untouched() -> None:
    target, cm, ids = build("llama")
    first = torch.tensor([3, 5])  # first routed position per row
    routed = torch.arange(T)[None, :] >= first[:, None]  # (B, T)
    want = target(ids).logits
    got = cm(ids, masks=full(cm, 0.0), routing=dict.fromkeys(cm.module_paths, routed)).logits
    for b in range(B):
        assert torch.equal(got[b, : first[b]], want[b, : first[b]])
        assert not torch.allclose(got[b, first[b] :], want[b, first[b] :], atol=1e-3)


def toy_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).double()


def test_routing_on_toy_mlp_is_exact_at_unrouted_rows() -> None:
    target = toy_mlp()
    cm = ComponentModel(target, [ModuleSpec(pattern="*", C=8)], generator=torch.Generator().manual_seed(0))
    assert cm.module_paths == ["0", "2", "4"]
    x = torch.randn(10, 6, dtype=torch.float64)
    want = target(x)
    # A row is untouched only when no module routes it; rows 0-3 are unrouted everywhere.
    routing = {p: torch.rand(10) < 0.5 for p in cm.module_paths}
    for rho in routing.values():
        rho[:4] = False
    routing["2"][4] = True
    masks = {p: torch.zeros(10, 8, dtype=torch.float64) for p in cm.module_paths}
    got = cm(x, masks=masks, routing=routing)
    untouched = ~torch.stack(list(routing.values())).any(0)
    assert torch.equal(got[untouched], want[untouched])
    assert not torch.allclose(got[4], want[4])


def test_gpt2_conv1d_read_weight_and_component_forward() -> None:
    conv = tiny_gpt2().double().get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(conv, Conv1D)
    w, bias = read_weight(conv)
    assert w.shape == (96, 32)  # fused q, k, v: d_out = 3 · d_model
    assert torch.equal(w, conv.weight.T) and torch.equal(bias, conv.bias)
    comp = LinearComponents(w, bias, 12, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    want = conv(x)
    got = comp(x, torch.ones(2, 5, 12, dtype=torch.float64), torch.ones(2, 5, dtype=torch.float64))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    assert torch.allclose(comp(x, routing=torch.zeros(2, 5, dtype=torch.bool)), want, rtol=1e-12, atol=1e-14)


def test_select_modules_glob_order_and_c() -> None:
    model = tiny_llama()
    assert select_modules(model, [ModuleSpec(pattern="model.layers.*.self_attn.q_proj", C=8)]) == {
        "model.layers.0.self_attn.q_proj": 8,
        "model.layers.1.self_attn.q_proj": 8,
    }
    # Module order, not spec order.
    got = select_modules(model, [ModuleSpec(pattern="*.down_proj", C=5), ModuleSpec(pattern="*.q_proj", C=3)])
    assert list(got.items()) == [
        ("model.layers.0.self_attn.q_proj", 3),
        ("model.layers.0.mlp.down_proj", 5),
        ("model.layers.1.self_attn.q_proj", 3),
        ("model.layers.1.mlp.down_proj", 5),
    ]


def test_select_modules_errors() -> None:
    gpt2, llama = tiny_gpt2(), tiny_llama()
    specs = [ModuleSpec(pattern="*.c_attn", C=4), ModuleSpec(pattern="*.c_proj", C=4)]
    with pytest.raises(VpdError) as err:
        select_modules(gpt2, [*specs, ModuleSpec(pattern="h.*.mlp.fc", C=4)])
    msg = str(err.value)
    assert msg.startswith("`modules[2].pattern` 'h.*.mlp.fc' matched no module. Did you mean one of: ")
    assert "transformer.h.0.mlp.c_fc" in msg and msg.count(",") <= 5

    with pytest.raises(VpdError, match=r"`modules\[0\].pattern` '\*.q_proj' and `modules\[1\].pattern`"):
        select_modules(llama, [ModuleSpec(pattern="*.q_proj", C=4), ModuleSpec(pattern="model.layers.0.*", C=4)])
    with pytest.raises(VpdError, match=r"`modules\[0\].pattern` '\*.input_layernorm' matched only modules that"):
        select_modules(llama, [ModuleSpec(pattern="*.input_layernorm", C=4)])
    with pytest.raises(VpdError, match="`modules` is empty"):
        select_modules(llama, [])
    with pytest.raises(ValidationError):
        ModuleSpec(pattern="*", C=0)
    with pytest.raises(ValidationError):
        ModuleSpec(pattern="*", C=4, n_components=4)


def test_mask_argument_errors() -> None:
    _, cm, ids = build("llama")
    q = "model.layers.0.self_attn.q_proj"
    with pytest.raises(VpdError, match=r"`masks` names 'model.layers.0.q_proj'.*Use one of: .*q_proj"):
        cm(ids, masks={"model.layers.0.q_proj": torch.ones(B, T, 24)})
    with pytest.raises(VpdError, match=r"has C=24\. Pass a mask of shape \(\.\.\., 24\)"):
        cm(ids, masks={q: torch.ones(B, T, 5)})
    with pytest.raises(VpdError, match="`delta_masks` has an entry"):
        cm(ids, masks={}, delta_masks={q: torch.ones(B, T)})
    with pytest.raises(VpdError, match="Pass a bool tensor"):
        cm(ids, masks={q: torch.ones(B, T, 24)}, routing={q: torch.ones(B, T)})


def test_target_unchanged_after_component_forward() -> None:
    target, cm, ids = build("gpt2")
    want = target(ids).logits
    cm(ids, masks=full(cm, 0.0), delta_masks=ones_delta(cm))
    # A forward that fails inside a hook (mask batch size 3 vs 2) must also remove the hooks.
    with pytest.raises(RuntimeError):
        cm(ids, masks=full(cm, 1.0, lead=(3, T)))
    assert all(not m._forward_hooks for m in target.modules())
    assert torch.equal(target(ids).logits, want)


def test_forward_with_inputs_caches_module_inputs_and_gradients_reach_u_v() -> None:
    target, cm, ids = build("llama")
    out, xs = cm.forward_with_inputs(ids)
    assert list(xs) == cm.module_paths
    assert torch.equal(out.logits, target(ids).logits)
    # q, k and v read the same normed residual; every cached input has no graph.
    layer = "model.layers.1.self_attn."
    assert torch.equal(xs[layer + "q_proj"], xs[layer + "v_proj"])
    assert all(not x.requires_grad and x.shape == (B, T, cm.components(p).d_in) for p, x in xs.items())
    down = "model.layers.0.mlp.down_proj"
    assert xs[down].shape == (B, T, 48)

    masks = {p: m.requires_grad_() for p, m in full(cm, 0.5).items()}
    cm(ids, masks=masks, delta_masks=ones_delta(cm)).logits.square().sum().backward()
    comp = cm.components(down)
    assert comp.V.grad is not None and comp.U.grad is not None and masks[down].grad is not None
    assert all(p.grad is None for p in target.parameters())
