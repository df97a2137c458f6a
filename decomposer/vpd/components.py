"""The component model: a frozen target whose selected weight matrices run as V, U and a delta.

For each decomposed module, with input x and weight W (d_out, d_in), the masked forward is
(docs/method.md §4):

    a    = x @ V                                   # (..., C)
    out  = (a * m) @ U                             # (..., d_out)
    out += m_Δ[..., None] * (x @ Δᵀ)               # only when a delta mask is given
    out += bias                                    # frozen, if the target has one
    out  = where(ρ[..., None], out, x @ Wᵀ + bias) # only when a routing mask is given

with Ŵ = (V U)ᵀ and Δ = W − Ŵ recomputed on every call, with gradient to U and V. The target's
modules are left untouched: `ComponentModel.forward` installs forward hooks that replace their outputs
for the length of one call and removes them afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decomposer.errors import VpdError
from decomposer.vpd.targets import ModuleSpec, name_list, nearest_names, read_weight, select_modules


class LinearComponents(nn.Module):
    """C rank-one subcomponents u_c v_cᵀ of one weight matrix, plus the frozen weight they decompose.

    `V` is (d_in, C): column v_c reads from the module input. `U` is stored as (C, d_out): row u_c writes
    to the output. The paper writes the same decomposition as W ≈ U Vᵀ with U of shape (d_out, C), i.e.
    the transpose of the `U` stored here.

    The frozen `weight` (d_out, d_in) and `bias` (d_out,) are non-persistent buffers: they are copies of
    the target's parameters, so a state dict holds only `V` and `U`.

    Args:
        weight: The target weight in nn.Linear layout, (d_out, d_in). It is copied.
        bias: The target bias (d_out,), or None. It is copied.
        C: Number of subcomponents.
        generator: Random source for the initialisation; None uses torch's global generator.
        dtype: Dtype of V, U and the frozen copies; None keeps `weight.dtype`.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        C: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        assert weight.ndim == 2, f"weight must be (d_out, d_in); got {tuple(weight.shape)}"
        assert C > 0, f"C must be positive; got {C}"
        d_out, d_in = weight.shape
        dtype = dtype or weight.dtype
        self.d_in, self.d_out, self.C = d_in, d_out, C
        self.register_buffer("weight", weight.detach().to(dtype=dtype, copy=True).contiguous(), persistent=False)
        bias = None if bias is None else bias.detach().to(dtype=dtype, copy=True)
        self.register_buffer("bias", bias, persistent=False)
        # docs/method.md §4 [VPD] init: V ~ N(0, 1/d_in), U ~ N(0, 1/C). Draw on the generator's device, then move,
        # so a CPU generator gives the same numbers whatever device the target lives on.
        gen_device = generator.device if generator is not None else weight.device
        V = torch.randn(d_in, C, generator=generator, device=gen_device, dtype=dtype) / math.sqrt(d_in)
        U = torch.randn(C, d_out, generator=generator, device=gen_device, dtype=dtype) / math.sqrt(C)
        self.V = nn.Parameter(V.to(weight.device))
        self.U = nn.Parameter(U.to(weight.device))

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, C={self.C}, bias={self.bias is not None}"

    def weight_hat(self) -> Tensor:
        """Ŵ = (V U)ᵀ, the sum of all subcomponents, in nn.Linear layout (d_out, d_in)."""
        return (self.V @ self.U).T

    def delta(self) -> Tensor:
        """Δ = W − Ŵ (d_out, d_in), with gradient to U and V when they require it.

        Without a gradient to track (U and V frozen, or grad mode off) Δ is cached until U, V or W change:
        per-prompt optimisation and evaluation run hundreds of forwards on fixed components, and the
        C-sized product Ŵ dominated each of them.
        """
        if torch.is_grad_enabled() and (self.V.requires_grad or self.U.requires_grad):
            return self.weight - self.weight_hat()
        key = (self.V._version, self.U._version, self.weight._version, self.V.data_ptr(), self.U.data_ptr())
        cached = self.__dict__.get("_delta_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.weight - self.weight_hat())
            self.__dict__["_delta_cache"] = cached
        return cached[1]

    def component_acts(self, x: Tensor) -> Tensor:
        """Subcomponent activations a = x V, shape (..., C) for x of shape (..., d_in)."""
        return x @ self.V

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        delta_mask: Tensor | None = None,
        routing: Tensor | None = None,
        *,
        target_out: Tensor | None = None,
    ) -> Tensor:
        """The masked forward of docs/method.md §4.

        Args:
            x: Module input (..., d_in).
            mask: Subcomponent mask (..., C), broadcastable against the activations; None means all ones.
            delta_mask: Delta mask (...); None leaves the delta out.
            routing: Bool (...); where False the output is the target's, x Wᵀ + bias.
            target_out: The target module's own output for `x` (x Wᵀ + bias), reused for the delta term and at
                unrouted positions instead of recomputing it, so that those match the target bit for bit (HF
                Conv1D adds its bias inside `addmm`, which rounds differently from `F.linear`).

        Returns:
            The module output (..., d_out).
        """
        a = self.component_acts(x)
        if mask is None:
            mask = torch.ones((), dtype=a.dtype, device=a.device)
        if (delta_mask is not None or routing is not None) and target_out is None:
            target_out = F.linear(x, self.weight, self.bias)
        if delta_mask is None:
            out = (a * mask) @ self.U
            if self.bias is not None:
                out = out + self.bias
        else:
            # a·m·U + δ·xΔᵀ with Δ = W − (VU)ᵀ equals a·(m − δ)·U + δ·xWᵀ: the target's own output stands in
            # for the Δ matmul, Δ is never formed, and all-ones masks give the target's output exactly.
            delta = delta_mask[..., None]
            out = (a * (mask - delta)) @ self.U + delta * target_out
            if self.bias is not None:
                out = out + (1 - delta) * self.bias
        if routing is not None:
            out = torch.where(routing[..., None], out, target_out)
        return out


def _key(path: str) -> str:
    # nn.ModuleDict keys may not contain '.', which every nested module path has.
    return path.replace(".", "-")


def _module_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    # nn.Linear names its argument `input` and Conv1D `x`; both take exactly one tensor.
    return args[0] if args else next(iter(kwargs.values()))


def as_token_grid(x: Tensor, tokens: Sequence[int] | None) -> Tensor:
    """`x` as (B, T, d) where the model flattened its tokens to (B·T, d) before the module (OPT's MLP).

    Masks, CI and graph positions are all (B, T, ·), so a flattened input is viewed on that grid; `tokens`
    is (B, T) of the forward (from its embedding output), None when unknown.
    """
    if tokens is not None and len(tokens) == 2 and x.ndim == 2 and x.shape[0] == tokens[0] * tokens[1]:
        return x.view(*tokens, x.shape[-1])
    return x


@contextmanager
def token_shape(target: nn.Module) -> Iterator[dict[str, Any]]:
    """Record (B, T) of a forward from the target's input embedding output (`seen["tokens"]`), if it has one."""
    seen: dict[str, Any] = {"tokens": None}
    get = getattr(target, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Module):
        yield seen
        return

    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        seen["tokens"] = tuple(output.shape[:-1])

    handle = emb.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


class ComponentModel(nn.Module):
    """A frozen target plus one `LinearComponents` per selected weight matrix.

    The target is frozen (`requires_grad_(False)`) and kept in eval mode, also across `.train()`, because
    dropout would make the clean and the masked forwards of one step disagree.

    Args:
        target: The model to decompose, e.g. a HF causal LM. It is frozen in place.
        specs: Glob patterns with their C; see `select_modules`.
        generator: Random source for the U, V initialisation; None uses torch's global generator.
        dtype: Dtype of the components; None keeps each target weight's dtype.

    Raises:
        VpdError: From `select_modules`, when `specs` does not select a clean set of modules.
    """

    def __init__(
        self,
        target: nn.Module,
        specs: Sequence[ModuleSpec],
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.target = target.requires_grad_(False).eval()
        selected = select_modules(target, specs)
        self.module_paths: list[str] = list(selected)
        self.linear_components = nn.ModuleDict()
        for path, C in selected.items():
            weight, bias = read_weight(target.get_submodule(path))
            self.linear_components[_key(path)] = LinearComponents(weight, bias, C, generator=generator, dtype=dtype)
        assert len(self.linear_components) == len(self.module_paths), "two module paths map to one key"

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Stop gradients to U and V inside the block (restored on exit), e.g. while only CI is optimised."""
        params = [t for c in self.linear_components.values() for t in (c.V, c.U)]
        before = [t.requires_grad for t in params]
        try:
            for t in params:
                t.requires_grad_(False)
            yield
        finally:
            for t, flag in zip(params, before, strict=True):
                t.requires_grad_(flag)

    def train(self, mode: bool = True) -> ComponentModel:
        super().train(mode)
        self.target.eval()
        return self

    def components(self, path: str) -> LinearComponents:
        """The components of the module at `path` (a path as `target.named_modules()` gives it).

        Raises:
            VpdError: `path` is not a decomposed module.
        """
        self._check_paths("path", [path])
        return self.linear_components[_key(path)]

    def _check_paths(self, name: str, paths: Sequence[str]) -> None:
        known = set(self.module_paths)
        for path in paths:
            if path not in known:
                raise VpdError(
                    f"`{name}` names {path!r}, which is not a decomposed module. "
                    f"Use one of: {name_list(nearest_names(path, self.module_paths))}."
                )

    def _check_masks(
        self, masks: Mapping[str, Tensor], delta_masks: Mapping[str, Tensor], routing: Mapping[str, Tensor]
    ) -> None:
        self._check_paths("masks", list(masks))
        for name, extra in (("delta_masks", delta_masks), ("routing", routing)):
            for path in extra:
                if path not in masks:
                    raise VpdError(
                        f"`{name}` has an entry for {path!r} but `masks` has none, so that module runs its "
                        f"original weight. Add `masks[{path!r}]` (all ones for the full component sum)."
                    )
        for path, mask in masks.items():
            C = self.components(path).C
            if mask.shape[-1] != C:
                raise VpdError(
                    f"`masks[{path!r}]` has shape {tuple(mask.shape)}, but that module has C={C}. "
                    f"Pass a mask of shape (..., {C})."
                )
        for path, rho in routing.items():
            if rho.dtype != torch.bool:
                raise VpdError(f"`routing[{path!r}]` has dtype {rho.dtype}. Pass a bool tensor, e.g. `rho > 0.5`.")

    @contextmanager
    def _hooks(self, hook_for: Mapping[str, Any]) -> Iterator[None]:
        """Install `hook_for[path]` as a forward hook on each target module, and remove them all on exit."""
        handles = []
        try:
            for path, hook in hook_for.items():
                module = self.target.get_submodule(path)
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(
        self,
        *args: Any,
        masks: Mapping[str, Tensor] | None = None,
        delta_masks: Mapping[str, Tensor] | None = None,
        routing: Mapping[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the target with the modules named in `masks` replaced by their masked component forward.

        Args:
            *args: Positional arguments of the target's forward (e.g. `input_ids`).
            masks: Path → subcomponent mask (..., C), e.g. (batch, seq, C). Modules absent run the target weight.
            delta_masks: Path → delta mask (...); a module absent here runs without its delta.
            routing: Path → bool (...); False positions of that module use the target weight.
            **kwargs: Keyword arguments of the target's forward.

        Returns:
            Whatever the target returns (e.g. a HF `CausalLMOutputWithPast`).

        Raises:
            VpdError: A mask names an unknown module or has the wrong C, a delta or routing mask names a
                module that has no mask, or a routing mask is not bool.
        """
        masks, delta_masks, routing = masks or {}, delta_masks or {}, routing or {}
        self._check_masks(masks, delta_masks, routing)

        def make_hook(path: str) -> Any:
            comp = self.linear_components[_key(path)]

            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Tensor:
                x = as_token_grid(_module_input(args, kwargs), seen["tokens"])
                out = comp(
                    x,
                    masks[path],
                    delta_masks.get(path),
                    routing.get(path),
                    target_out=output.view(*x.shape[:-1], -1),
                )
                return out.reshape(output.shape)

            return hook

        with token_shape(self.target) as seen, self._hooks({path: make_hook(path) for path in masks}):
            return self.target(*args, **kwargs)

    @torch.no_grad()
    def forward_with_inputs(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Tensor]]:
        """A clean target forward that also records each decomposed module's input.

        Args:
            *args: Positional arguments of the target's forward.
            **kwargs: Keyword arguments of the target's forward.

        Returns:
            The target's output and, in `module_paths` order, each path → its input x (..., d_in).

        Raises:
            VpdError: A decomposed module ran more than once, so its input is ambiguous, or not at all.
        """
        cache: dict[str, Tensor] = {}

        def make_hook(path: str) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> None:
                if path in cache:
                    raise VpdError(
                        f"Module {path!r} ran twice in one forward, so its input is ambiguous. "
                        "Decompose modules that run once per forward, or untie the shared module."
                    )
                cache[path] = as_token_grid(_module_input(args, kwargs), seen["tokens"])

            return hook

        with token_shape(self.target) as seen, self._hooks({path: make_hook(path) for path in self.module_paths}):
            output = self.target(*args, **kwargs)
        missing = [path for path in self.module_paths if path not in cache]
        if missing:
            raise VpdError(
                f"Decomposed modules {name_list(missing[:5])} did not run in the target's forward. "
                "Remove them from `modules`, or pass inputs that reach them."
            )
        return output, {path: cache[path] for path in self.module_paths}
