"""Which weight matrices of a target are decomposed, and how their weights are read.

Modules are chosen by `fnmatch` glob patterns over the paths that `model.named_modules()` yields,
one C per pattern (docs/method.md §2), or by `auto`: every attention and MLP matrix that the target's
architecture adapter names (`decomposer.architectures`), with C from the paper's ratios to d_model.
A pattern without C also takes its matrices' ratios. Only `nn.Linear` and HF's `Conv1D` (GPT-2) are eligible. `Conv1D`
stores its weight as (d_in, d_out), so `read_weight` transposes it explicitly to the nn.Linear
layout (d_out, d_in) used everywhere else.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from decomposer.architectures import PAPER_C_RATIOS, architecture_of, auto_modules, d_model_of
from decomposer.errors import VpdError

_MAX_SUGGESTIONS = 5


class ModuleSpec(BaseModel):
    """One glob pattern over module paths and the number of subcomponents C of each matched matrix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pattern: str = Field(
        description="fnmatch glob over module paths as `model.named_modules()` gives them, "
        "e.g. 'model.layers.*.self_attn.q_proj'. `*` also matches dots.",
        min_length=1,
    )
    C: int | None = Field(
        None,
        gt=0,
        description="Number of rank-one subcomponents for each matrix the pattern matches; None: the paper's "
        "ratio to d_model for the matrix's role (q, k 0.67×; v, o 1.33×; MLP in 4×; MLP out 4.67×).",
    )
    ci_hidden: int | None = Field(
        None,
        gt=0,
        description="Hidden width of the per-matrix CI network of each matched matrix; None: `ci.hidden`. "
        "Lets one matrix (a dense identity) have a wider CI network than its neighbours.",
    )


class AutoModules(BaseModel):
    """Every attention and MLP matrix of the target, with C from the paper's ratios unless given per role."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    auto: Literal[True] = Field(True, description="Marks this form; write `modules: auto` for the defaults.")
    C: dict[str, Annotated[int, Field(gt=0)]] = Field(
        default_factory=dict, description="Role → C (q, k, v, qkv, o, gate, up, gate_up, down) where it is given."
    )
    scale: float = Field(1.0, gt=0, description="Multiplies every paper ratio (not the given C).")


ModulesSpec = tuple[ModuleSpec, ...] | Literal["auto"] | AutoModules


def is_eligible(module: nn.Module) -> bool:
    """Whether `module` holds a single weight matrix that VPD can decompose."""
    return isinstance(module, nn.Linear | Conv1D)


def nearest_names(pattern: str, candidates: list[str]) -> list[str]:
    """The candidates closest to `pattern`, for a did-you-mean sentence."""
    # Compare the pattern with its wildcards stripped, so 'h.*.mlp.fc' is close to 'transformer.h.0.mlp.c_fc'.
    probe = pattern.replace("*", "").replace("?", "")
    close = difflib.get_close_matches(probe, candidates, n=_MAX_SUGGESTIONS, cutoff=0.0)
    return close or candidates[:_MAX_SUGGESTIONS]


def name_list(candidates: list[str]) -> str:
    """Candidates joined for a sentence, with an ellipsis when the list was cut."""
    more = ", …" if len(candidates) >= _MAX_SUGGESTIONS else ""
    return ", ".join(candidates) + more


def _ratio_C(model: nn.Module, path: str) -> int:
    arch = architecture_of(model)
    hit = arch.role(path)
    if hit is None:
        raise VpdError(
            f"Module {path!r} is not an attention or MLP matrix of {arch.family}, so it has no paper C ratio. "
            "Give its pattern a `C`."
        )
    return max(1, round(PAPER_C_RATIOS[hit[1]] * d_model_of(model.config)))


def select_modules(model: nn.Module, specs: Sequence[ModuleSpec] | Literal["auto"] | AutoModules) -> dict[str, int]:
    """Match `specs` against the modules of `model`.

    A pattern may also match ineligible modules (a `*.mlp.*` pattern matches the activation too);
    those are skipped, as long as it matches at least one eligible module.

    Args:
        model: The target model.
        specs: Patterns with their C (None: the paper's ratio for the matrix's role), each eligible module
            matched by at most one pattern; or `"auto"` / `AutoModules` for every attention and MLP matrix.

    Returns:
        Each matched module path mapped to its C, in the order of `model.named_modules()`.

    Raises:
        VpdError: `specs` is empty, a pattern matches no module or only non-linear ones, or a module is
            matched by two patterns; `auto` or a pattern without C on a family without an adapter.
    """
    if isinstance(specs, str) and specs == "auto":
        return auto_modules(model)
    if isinstance(specs, AutoModules):
        return auto_modules(model, specs.C, scale=specs.scale)
    if isinstance(specs, str):
        raise VpdError(f"`modules` {specs!r} is not a list of patterns; write `modules: auto` or a list.")
    if not specs:
        raise VpdError("`modules` is empty. Pass at least one ModuleSpec, e.g. ModuleSpec(pattern='*.q_proj', C=64).")
    named = list(model.named_modules())
    eligible = [path for path, module in named if path and is_eligible(module)]
    if not eligible:
        raise VpdError(
            f"`model` ({type(model).__name__}) has no nn.Linear or Conv1D module to decompose. "
            "Pass a model whose weight matrices are nn.Linear or transformers' Conv1D."
        )
    eligible_set = set(eligible)

    owner: dict[str, int] = {}  # module path -> index of the spec that matched it
    for i, spec in enumerate(specs):
        matched = [path for path, _ in named if path and fnmatchcase(path, spec.pattern)]
        hits = [path for path in matched if path in eligible_set]
        if not matched:
            raise VpdError(
                f"`modules[{i}].pattern` {spec.pattern!r} matched no module. "
                f"Did you mean one of: {name_list(nearest_names(spec.pattern, eligible))}?"
            )
        if not hits:
            kinds = sorted({type(module).__name__ for path, module in named if path in set(matched)})
            raise VpdError(
                f"`modules[{i}].pattern` {spec.pattern!r} matched only modules that are not linear "
                f"({', '.join(kinds)}: {name_list(matched[:_MAX_SUGGESTIONS])}). "
                f"Point it at nn.Linear or Conv1D modules such as: {name_list(nearest_names(spec.pattern, eligible))}."
            )
        for path in hits:
            if path in owner:
                j = owner[path]
                raise VpdError(
                    f"Module {path!r} is matched by both `modules[{j}].pattern` {specs[j].pattern!r} and "
                    f"`modules[{i}].pattern` {spec.pattern!r}. Narrow one pattern so each module has one C."
                )
            owner[path] = i
    return {
        path: specs[owner[path]].C or _ratio_C(model, path)  # C is never 0, so `or` only replaces None
        for path in eligible
        if path in owner
    }


def ci_hidden_widths(paths: Sequence[str], specs: ModulesSpec) -> dict[str, int]:
    """Path → the `ci_hidden` of the pattern that matched it, for the paths whose pattern sets one.

    `select_modules` has already checked that each path is matched by exactly one pattern.
    """
    if isinstance(specs, str | AutoModules):
        return {}
    widths = {}
    for path in paths:
        spec = next((s for s in specs if fnmatchcase(path, s.pattern)), None)
        if spec is not None and spec.ci_hidden is not None:
            widths[path] = spec.ci_hidden
    return widths


def read_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The weight of an eligible module in nn.Linear layout, and its bias.

    Args:
        module: An `nn.Linear` or HF `Conv1D`.

    Returns:
        `(W, bias)` with W of shape (d_out, d_in) and bias of shape (d_out,) or None. Both are detached
        views of the module's parameters (W is a transposed view for Conv1D); clone them before editing.

    Raises:
        VpdError: `module` is neither nn.Linear nor Conv1D.
    """
    if isinstance(module, nn.Linear):
        weight, d_out, d_in = module.weight, module.out_features, module.in_features
    elif isinstance(module, Conv1D):
        # Conv1D computes x @ weight with weight stored (d_in, d_out) = (nx, nf): the transpose of nn.Linear.
        weight, d_out, d_in = module.weight.T, module.nf, module.nx
    else:
        raise VpdError(
            f"`module` is a {type(module).__name__}, which VPD cannot decompose. Pass an nn.Linear or Conv1D."
        )
    assert weight.shape == (d_out, d_in), f"{type(module).__name__} weight {tuple(weight.shape)} != {(d_out, d_in)}"
    bias = module.bias
    if bias is not None:
        assert bias.shape == (d_out,), f"{type(module).__name__} bias {tuple(bias.shape)} != {(d_out,)}"
        bias = bias.detach()
    return weight.detach(), bias
