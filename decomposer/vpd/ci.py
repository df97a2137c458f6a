"""Causal-importance (CI) functions: networks that map clean module inputs to CI pre-activations z.

Every CI function is a `CIFunction`: `forward(xs, acts)` takes, per decomposed module path, that
module's input x from the clean target forward ((batch, seq, d_in), or (batch, d_in) for toy models)
and its subcomponent activations a = x V, and returns path → z of shape (..., C). The caller
computes `acts` with gradient into V; only the [SPD] `mlp` kind reads them (docs/method.md §5).

- `PerMatrixCI` [SPD] (§5.1): one `PerMatrixMLP` per matrix, of kind `mlp`, `vector_mlp` or `shared_mlp`.
- `GlobalCITransformer` [VPD] (§5.2): one bidirectional transformer over the concatenation of all
  RMS-normed module inputs, in the order `input_order`.

`causal_importance` turns z into g (masks) and g_up (minimality) with the hard sigmoids of §5.3.
All linears use the initialisation of §4: Kaiming-normal with ReLU gain √2 (fan_in) for input
projections and hidden layers, linear gain for output heads, zero biases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decomposer.errors import VpdError
from decomposer.vpd.config import CIConfig
from decomposer.vpd.sigmoids import DEFAULT_ALPHA, sigmoid_lower, sigmoid_lower_spd, sigmoid_upper

RELU_GAIN = math.sqrt(2.0)
LINEAR_GAIN = 1.0


def _key(path: str) -> str:
    # nn.ModuleDict keys may not contain '.', which every nested module path has.
    return path.replace(".", "-")


def _kaiming_(param: Tensor, fan_in: int, gain: float, generator: torch.Generator | None) -> None:
    """Fill `param` with N(0, (gain/√fan_in)²); explicit fan_in because batched weights are 3-D."""
    # Draw on the generator's device, then copy, so a CPU generator gives the same numbers anywhere.
    device = generator.device if generator is not None else param.device
    sample = torch.randn(param.shape, generator=generator, device=device, dtype=param.dtype)
    with torch.no_grad():
        param.copy_(sample * (gain / math.sqrt(fan_in)))


def _linear(d_in: int, d_out: int, gain: float, generator: torch.Generator | None, *, bias: bool = True) -> nn.Linear:
    # skip_init avoids nn.Linear's own init, which would be thrown away (and is costly at paper size).
    layer = nn.utils.skip_init(nn.Linear, d_in, d_out, bias=bias)
    _kaiming_(layer.weight, d_in, gain, generator)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _rms(x: Tensor) -> Tensor:
    """Parameter-free RMS norm over the last dimension."""
    return F.rms_norm(x, (x.shape[-1],))


def _require(name: str, mapping: Mapping[str, Tensor], paths: list[str]) -> None:
    missing = [p for p in paths if p not in mapping]
    if missing:
        raise VpdError(f"`{name}` has no entry for {', '.join(missing[:5])}. Pass one tensor per decomposed module.")


class CIFunction(nn.Module):
    """Interface of every CI function: path → clean input x (and acts a = x V) in, path → z out.

    Attributes:
        input_order: The decomposed module paths, in the fixed order the function reads and returns them.
    """

    input_order: list[str]

    def forward(self, xs: Mapping[str, Tensor], acts: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError


class PerMatrixMLP(nn.Module):
    """[SPD] CI network of one matrix (docs/method.md §5.1), with GELU hidden activations.

    - `mlp`: a scalar MLP 1 → h → 1 per component on a_c; w_in (C, 1, h), w_out (C, h, 1).
    - `vector_mlp`: an MLP d_in → h → 1 per component on x; w_in (C, d_in, h), w_out (C, h, 1).
    - `shared_mlp`: one MLP d_in → h → C on x; w_in (d_in, h), w_out (h, C).

    Args:
        kind: Which of the three networks.
        d_in: Input width of the matrix.
        C: Number of subcomponents.
        hidden: Hidden width h.
        generator: Random source for the initialisation; None uses torch's global generator.
    """

    def __init__(
        self,
        kind: Literal["mlp", "vector_mlp", "shared_mlp"],
        d_in: int,
        C: int,
        hidden: int,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        assert kind in ("mlp", "vector_mlp", "shared_mlp"), f"unknown per-matrix CI kind {kind!r}"
        self.kind, self.d_in, self.C, self.hidden = kind, d_in, C, hidden
        if kind == "shared_mlp":
            shapes = {"w_in": (d_in, hidden), "b_in": (hidden,), "w_out": (hidden, C), "b_out": (C,)}
        else:
            fan = 1 if kind == "mlp" else d_in
            shapes = {"w_in": (C, fan, hidden), "b_in": (C, hidden), "w_out": (C, hidden, 1), "b_out": (C, 1)}
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))
        _kaiming_(self.w_in, self.w_in.shape[-2], RELU_GAIN, generator)
        _kaiming_(self.w_out, hidden, LINEAR_GAIN, generator)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, d_in={self.d_in}, C={self.C}, hidden={self.hidden}"

    def forward(self, x: Tensor, a: Tensor | None = None) -> Tensor:
        """z (..., C) from the input x (..., d_in), or from the activations a (..., C) for the `mlp` kind."""
        if self.kind == "shared_mlp":
            return F.gelu(x @ self.w_in + self.b_in) @ self.w_out + self.b_out
        if self.kind == "mlp":
            assert a is not None, "the `mlp` CI kind reads the component activations"
            pre = torch.einsum("...c,ch->...ch", a, self.w_in[:, 0])  # (..., C, h)
        else:
            pre = torch.einsum("...d,cdh->...ch", x, self.w_in)  # (..., C, h)
        hid = F.gelu(pre + self.b_in)
        return torch.einsum("...ch,ch->...c", hid, self.w_out[..., 0]) + self.b_out[:, 0]  # (..., C)


class PerMatrixCI(CIFunction):
    """[SPD] One `PerMatrixMLP` per decomposed matrix (docs/method.md §5.1).

    Args:
        kind: The per-matrix network, see `PerMatrixMLP`.
        dims: Path → (d_in, C), in model order.
        hidden: Hidden width of every network, or path → width of each.
        generator: Random source for the initialisation; None uses torch's global generator.
    """

    def __init__(
        self,
        kind: Literal["mlp", "vector_mlp", "shared_mlp"],
        dims: Mapping[str, tuple[int, int]],
        *,
        hidden: int | Mapping[str, int],
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.input_order = list(dims)
        widths = hidden if isinstance(hidden, Mapping) else dict.fromkeys(dims, hidden)
        self.mlps = nn.ModuleDict(
            {_key(p): PerMatrixMLP(kind, d_in, C, widths[p], generator=generator) for p, (d_in, C) in dims.items()}
        )
        assert len(self.mlps) == len(self.input_order), "two module paths map to one key"

    def network(self, path: str) -> PerMatrixMLP:
        """The CI network of the matrix at `path`."""
        return self.mlps[_key(path)]

    def forward(self, xs: Mapping[str, Tensor], acts: Mapping[str, Tensor]) -> dict[str, Tensor]:
        _require("xs", xs, self.input_order)
        if self.kind == "mlp":
            _require("acts", acts, self.input_order)
        out = {}
        for path in self.input_order:
            mlp = self.mlps[_key(path)]
            out[path] = mlp(xs[path].to(mlp.w_in.dtype), acts.get(path))
        return out


def _rope_tables(T: int, head_dim: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotate-half RoPE, each (T, head_dim)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq  # (T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class _Block(nn.Module):
    """Pre-norm block: h += Attn(rms(h)); h += MLP(rms(h)), bidirectional attention with RoPE."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int, generator: torch.Generator | None) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q, self.k, self.v, self.o = (_linear(d_model, d_model, RELU_GAIN, generator, bias=False) for _ in range(4))
        self.fc_in = _linear(d_model, d_mlp, RELU_GAIN, generator)
        self.fc_out = _linear(d_mlp, d_model, RELU_GAIN, generator)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, D = h.shape
        x = _rms(h)
        q, k, v = (lin(x).view(B, T, self.n_heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin  # (B, H, T, hd)
        # No mask: CI at position t may read later tokens (docs/method.md §5.2).
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # (B, H, T, hd)
        h = h + self.o(y.transpose(1, 2).reshape(B, T, D))
        return h + self.fc_out(F.gelu(self.fc_in(_rms(h))))


class GlobalCITransformer(CIFunction):
    """[VPD] One bidirectional transformer predicting z for every matrix at every position (docs/method.md §5.2).

    Each module input is RMS-normed separately (no parameters), the results are concatenated in
    `input_order` (width D = Σ d_in), projected to d_model, run through `n_blocks` pre-norm blocks, and
    a final linear head (no norm before it) gives Σ C values per position, split per matrix.
    Inputs of shape (batch, d_in) are treated as sequences of length 1.

    Args:
        dims: Path → (d_in, C); its order becomes `input_order`.
        d_model: Residual width.
        n_blocks: Number of blocks.
        n_heads: Attention heads; d_model / n_heads must be an even integer for RoPE.
        d_mlp: MLP hidden width.
        rope_base: RoPE base.
        generator: Random source for the initialisation; None uses torch's global generator.

    Raises:
        VpdError: d_model is not divisible by n_heads, or the head dimension is odd.
    """

    def __init__(
        self,
        dims: Mapping[str, tuple[int, int]],
        *,
        d_model: int,
        n_blocks: int,
        n_heads: int,
        d_mlp: int,
        rope_base: float,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise VpdError(
                f"`ci.d_model`={d_model} is not divisible by `ci.n_heads`={n_heads}. "
                "Choose n_heads that divides d_model, e.g. d_model 256 with n_heads 4."
            )
        if (d_model // n_heads) % 2:
            raise VpdError(
                f"`ci.d_model`/`ci.n_heads` = {d_model}/{n_heads} gives an odd head dimension, but RoPE needs "
                "an even one. Change `ci.n_heads` or `ci.d_model`."
            )
        self.input_order = list(dims)
        self.d_ins = [d_in for d_in, _ in dims.values()]
        self.Cs = [C for _, C in dims.values()]
        self.head_dim, self.rope_base = d_model // n_heads, rope_base
        self.in_proj = _linear(sum(self.d_ins), d_model, RELU_GAIN, generator)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, d_mlp, generator) for _ in range(n_blocks))
        self.out_proj = _linear(d_model, sum(self.Cs), LINEAR_GAIN, generator)

    def _check_inputs(self, xs: Mapping[str, Tensor]) -> None:
        _require("xs", xs, self.input_order)
        lead = xs[self.input_order[0]].shape[:-1]
        for path, d_in in zip(self.input_order, self.d_ins, strict=True):
            x = xs[path]
            if x.ndim not in (2, 3) or x.shape[:-1] != lead or x.shape[-1] != d_in:
                raise VpdError(
                    f"`xs[{path!r}]` has shape {tuple(x.shape)}; expected {(*lead, d_in)}. Pass every module "
                    "input as (batch, seq, d_in) or (batch, d_in), with the same batch and seq."
                )

    def forward(self, xs: Mapping[str, Tensor], acts: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self._check_inputs(xs)
        x = torch.cat([_rms(xs[p]) for p in self.input_order], dim=-1).to(self.in_proj.weight.dtype)  # (..., D)
        toy = x.ndim == 2
        if toy:
            x = x[:, None, :]  # (B, 1, D)
        h = self.in_proj(x)  # (B, T, d_model)
        cos, sin = _rope_tables(h.shape[1], self.head_dim, self.rope_base, h.device)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        for block in self.blocks:
            h = block(h, cos, sin)
        z = self.out_proj(h)  # (B, T, ΣC)
        if toy:
            z = z[:, 0]
        return dict(zip(self.input_order, z.split(self.Cs, dim=-1), strict=True))


def build_ci_function(
    config: CIConfig,
    dims: Mapping[str, tuple[int, int]],
    *,
    generator: torch.Generator | None = None,
    hidden: Mapping[str, int] | None = None,
) -> CIFunction:
    """The CI function that `config` describes, for the matrices in `dims`.

    Args:
        config: The `ci` section of the run config.
        dims: Path → (d_in, C) of every decomposed matrix, in model order.
        generator: Random source for the initialisation; None uses torch's global generator.
        hidden: Path → hidden width for the matrices whose per-matrix network differs from `config.hidden`.

    Returns:
        A `GlobalCITransformer` or a `PerMatrixCI`, on the CPU in float32.

    Raises:
        VpdError: `dims` is empty, or the transformer's heads do not fit d_model.
    """
    if not dims:
        raise VpdError("`dims` is empty, so there is nothing to predict CI for. Pass path → (d_in, C).")
    if config.kind == "global_transformer":
        return GlobalCITransformer(
            dims,
            d_model=config.d_model,
            n_blocks=config.n_blocks,
            n_heads=config.n_heads,
            d_mlp=config.d_mlp,
            rope_base=config.rope_base,
            generator=generator,
        )
    widths = {path: (hidden or {}).get(path, config.hidden) for path in dims}
    return PerMatrixCI(config.kind, dims, hidden=widths, generator=generator)


class CausalImportance(NamedTuple):
    """Per path: g = σ_lower(z) for the masks and g_up = σ_upper(z) for the minimality losses."""

    g: dict[str, Tensor]
    g_up: dict[str, Tensor]


def causal_importance(
    ci_fn: CIFunction,
    xs: Mapping[str, Tensor],
    acts: Mapping[str, Tensor],
    *,
    sigmoid: Literal["vpd", "spd"] = "vpd",
    alpha: float = DEFAULT_ALPHA,
) -> CausalImportance:
    """Run `ci_fn` and apply both hard sigmoids of docs/method.md §5.3 to each z.

    Args:
        ci_fn: A CI function.
        xs: Path → clean module input.
        acts: Path → component activations x V (read only by the `mlp` kind; may be empty otherwise).
        sigmoid: σ_lower variant: `vpd` (straight-through leak) or `spd` (leak in the forward too).
        alpha: Leak slope of both sigmoids.

    Returns:
        g and g_up, each path → (..., C).

    Raises:
        VpdError: `sigmoid` is unknown, `alpha` is outside [0, 1), or an input is missing or misshapen.
    """
    lowers = {"vpd": sigmoid_lower, "spd": sigmoid_lower_spd}
    if sigmoid not in lowers:
        raise VpdError(f"`sigmoid` must be 'vpd' or 'spd'; got {sigmoid!r}.")
    z = ci_fn(xs, acts)
    lower = lowers[sigmoid]
    return CausalImportance(
        g={p: lower(zp, alpha) for p, zp in z.items()},
        g_up={p: sigmoid_upper(zp, alpha) for p, zp in z.items()},
    )
