"""CI functions of docs/method.md §5: shapes, the per-component `mlp`, bidirectional RoPE attention, init."""

from __future__ import annotations

import math

import pytest
import torch

from decomposer.errors import VpdError
from decomposer.vpd.ci import GlobalCITransformer, build_ci_function, causal_importance
from decomposer.vpd.components import LinearComponents
from decomposer.vpd.config import CIConfig

DIMS = {"h.0.attn.q": (6, 5), "h.0.mlp.up": (4, 3)}  # different d_in and C per matrix
KINDS = ["global_transformer", "mlp", "vector_mlp", "shared_mlp"]
TINY = {"hidden": 4, "d_model": 8, "n_blocks": 2, "n_heads": 2, "d_mlp": 12}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _components() -> dict[str, LinearComponents]:
    return {p: LinearComponents(torch.randn(7, d_in), None, C, generator=_gen(1)) for p, (d_in, C) in DIMS.items()}


def _inputs(lead: tuple[int, ...], comps: dict[str, LinearComponents]) -> tuple[dict, dict]:
    xs = {p: torch.randn(*lead, d_in) for p, (d_in, _) in DIMS.items()}
    return xs, {p: comps[p].component_acts(x) for p, x in xs.items()}


def _transformer(**overrides) -> GlobalCITransformer:
    ci = build_ci_function(CIConfig(kind="global_transformer", **{**TINY, **overrides}), DIMS, generator=_gen())
    assert isinstance(ci, GlobalCITransformer)
    return ci.double()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lead", [(2, 3), (2,)], ids=["seq", "toy"])
def test_output_shapes(kind, lead):
    ci = build_ci_function(CIConfig(kind=kind, **TINY), DIMS, generator=_gen())
    xs, acts = _inputs(lead, _components())
    z = ci(xs, acts)
    assert list(z) == list(DIMS) == ci.input_order
    for path, (_, C) in DIMS.items():
        assert z[path].shape == (*lead, C)
    g, g_up = causal_importance(ci, xs, acts)
    assert all(g[p].shape == z[p].shape and g_up[p].shape == z[p].shape for p in DIMS)
    assert all(0 <= g[p].min() and g[p].max() <= 1 for p in DIMS)


def test_mlp_kind_trains_V_through_acts():
    comps = _components()
    ci = build_ci_function(CIConfig(kind="mlp", hidden=4), DIMS, generator=_gen())
    xs, acts = _inputs((2, 3), comps)
    sum(z.square().sum() for z in ci(xs, acts).values()).backward()
    for comp in comps.values():
        assert comp.V.grad is not None and comp.V.grad.abs().sum() > 0


def test_mlp_kind_is_independent_per_component():
    ci = build_ci_function(CIConfig(kind="mlp", hidden=4), DIMS, generator=_gen()).double()
    path, C = "h.0.attn.q", DIMS["h.0.attn.q"][1]
    xs = {p: torch.randn(2, 3, d_in, dtype=torch.float64) for p, (d_in, _) in DIMS.items()}
    acts = {p: torch.randn(2, 3, c, dtype=torch.float64) for p, (_, c) in DIMS.items()}
    z = ci(xs, acts)[path]
    for c in range(C):
        bumped = acts[path].clone()
        bumped[..., c] += 1.5
        dz = (ci(xs, {**acts, path: bumped})[path] - z).abs()
        assert (dz[..., c] > 0).all()
        assert torch.equal(dz[..., [i for i in range(C) if i != c]], torch.zeros(2, 3, C - 1, dtype=torch.float64))


def _seq_inputs(T: int = 4) -> dict[str, torch.Tensor]:
    return {p: torch.randn(2, T, d_in, dtype=torch.float64) for p, (d_in, _) in DIMS.items()}


def test_transformer_is_bidirectional():
    ci, xs = _transformer(), _seq_inputs()
    z = ci(xs, {})
    late = {p: x.clone() for p, x in xs.items()}
    late["h.0.mlp.up"][:, -1] += 1.0
    z_late = ci(late, {})
    for p in DIMS:
        assert (z_late[p][:, 0] - z[p][:, 0]).abs().max() > 1e-6


def test_transformer_is_position_sensitive_through_rope():
    ci, xs = _transformer(), _seq_inputs()
    z = ci(xs, {})
    order = [1, 0, 2, 3]
    z_swapped = ci({p: x[:, order] for p, x in xs.items()}, {})
    # Without positions, bidirectional attention is permutation-equivariant and this difference would be 0.
    diff = max((z_swapped[p] - z[p][:, order]).abs().max().item() for p in DIMS)
    assert diff > 1e-6


def test_input_rms_norm_has_no_parameters():
    ci, xs = _transformer(), _seq_inputs()
    z = ci(xs, {})
    z_scaled = ci({**xs, "h.0.attn.q": 7 * xs["h.0.attn.q"]}, {})
    for p in DIMS:
        torch.testing.assert_close(z_scaled[p], z[p], atol=1e-5, rtol=0)


def test_init_statistics():
    dims = {"a": (200, 3), "b": (56, 5)}  # D = 256
    ci = build_ci_function(CIConfig(d_model=256, n_blocks=1, n_heads=4, d_mlp=8), dims, generator=_gen())
    assert isinstance(ci, GlobalCITransformer)
    std = ci.in_proj.weight.std().item()
    assert abs(std / math.sqrt(2 / 256) - 1) < 0.1  # Kaiming, ReLU gain, fan_in 256
    head_std = ci.out_proj.weight.std().item()
    assert abs(head_std / math.sqrt(1 / 256) - 1) < 0.1  # linear gain on the output head
    for kind in KINDS:
        net = build_ci_function(CIConfig(kind=kind, **TINY), DIMS, generator=_gen())
        biases = [t for n, t in net.named_parameters() if n.split(".")[-1] in ("bias", "b_in", "b_out")]
        assert biases and all(torch.equal(b, torch.zeros_like(b)) for b in biases)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_parameters(kind):
    def params(seed):
        return build_ci_function(CIConfig(kind=kind, **TINY), DIMS, generator=_gen(seed)).state_dict()

    a, b, c = params(3), params(3), params(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bad_heads_raise():
    with pytest.raises(VpdError, match=r"`ci\.n_heads`"):
        build_ci_function(CIConfig(d_model=30, n_heads=4), DIMS)
    with pytest.raises(VpdError, match="RoPE"):
        build_ci_function(CIConfig(d_model=30, n_heads=2), DIMS)


def test_ci_hidden_per_matrix_round_trips(tmp_path):
    """A pattern's `ci_hidden` widens only its matrices' CI networks, and the saved run loads back with them."""
    from decomposer.vpd.config import DecomposeConfig
    from decomposer.vpd.run import Decomposition, load_decomposition, save_state
    from decomposer.vpd.toys import TMS

    target = TMS(5, 2, hidden_layers=1)
    config = DecomposeConfig(
        target="tms",
        modules=[
            {"pattern": "W_in", "C": 8},
            {"pattern": "hidden.*", "C": 6, "ci_hidden": 16},
            {"pattern": "W_out", "C": 8},
        ],
        ci={"kind": "mlp", "hidden": 1},
    )
    d = Decomposition.create(config, target)
    widths = {name: mlp.hidden for name, mlp in d.ci_fn.mlps.items()}
    assert sorted(widths.values()) == [1, 1, 16]
    assert d.ci_fn.mlps[next(k for k in d.ci_fn.mlps if k.startswith("hidden"))].w_in.shape == (6, 1, 16)
    save_state(tmp_path, d, step=0, target_name="tms", train_state={"step": torch.zeros(1)})
    loaded, _, _ = load_decomposition(tmp_path, target)
    for key, tensor in d.tensors().items():
        assert torch.equal(loaded.tensors()[key], tensor), key


def test_ci_hidden_is_refused_for_the_global_transformer():
    from pydantic import ValidationError

    from decomposer.vpd.config import DecomposeConfig

    with pytest.raises(ValidationError, match=r"modules.0.ci_hidden .* global_transformer"):
        DecomposeConfig(modules=[{"pattern": "*.q_proj", "C": 4, "ci_hidden": 8}], ci={"kind": "global_transformer"})
