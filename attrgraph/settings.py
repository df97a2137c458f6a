"""Every default of a prompt's attribution graph, in one frozen model (docs/attribution-graphs.md §3–§6).

`GraphSettings` is what `attrgraph.attribute_prompt` takes and what a graph stores under
`G.graph["settings"]`. `OptimizeSettings` is what `attrgraph.optimize.optimize_ci` takes; the graph's
settings hand theirs over with `GraphSettings.optimize_settings()`. λ_min defaults to the paper's value
for the optimisation mode (`L_MIN`). Build settings from user input with `graph_settings(**values)` or
`optimize_settings(**values)`, which report a bad value as one sentence naming the setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from decomposer.errors import VpdError

L_MIN = {"adversarial": 0.09, "ci": 1.0, "stochastic": 0.09}  # paper values (docs/attribution-graphs.md §4)
DEFAULT_MAX_NODES = 7500  # subcomponent nodes whose inputs are computed; circuit-tracer's default feature cap


class OptimizeSettings(BaseModel):
    """How one prompt's CI is re-optimised (docs/attribution-graphs.md §4).

    Attributes:
        mode: Which loss: "adversarial" (type 1), "ci" (type 2) or "stochastic".
        steps: Optimisation steps.
        lr: Peak AdamW lr (weight decay 0), cosine-decayed to `FINAL_LR_FRAC`·lr after a linear warm-up.
        warmup_frac: Warm-up length as a fraction of `steps` (rounded up).
        l_min: Coefficient of the minimality loss; None takes `L_MIN[mode]`.
        p: Exponent of the minimality loss.
        eps: Added to g̃_up before the power.
        pgd_steps: Sign-ascent steps of the adversary per optimisation step.
        pgd_step_size: Size of each sign step.
        seed: Seeds the one generator behind every random draw.
        log_every: Log the loss every this many steps.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["adversarial", "ci", "stochastic"] = "adversarial"
    steps: int = Field(2000, ge=1)
    lr: float = Field(1e-2, gt=0)
    warmup_frac: float = Field(0.01, ge=0, le=1)
    l_min: float | None = Field(None, ge=0)
    p: float = Field(0.3, gt=0)
    eps: float = Field(1e-6, ge=0)
    pgd_steps: int = Field(4, ge=0)
    pgd_step_size: float = Field(1.0, gt=0)
    seed: int = 0
    log_every: int = Field(50, ge=1)

    @property
    def lambda_min(self) -> float:
        """The minimality coefficient in effect: `l_min`, else the paper's value for `mode`."""
        return self.l_min if self.l_min is not None else L_MIN[self.mode]


def _default(field: str) -> object:
    return OptimizeSettings.model_fields[field].default


class GraphSettings(BaseModel):
    """How one prompt's graph is built, pruned and checked.

    Attributes:
        optimize: Re-fit the prompt's CI first ("adversarial", "ci", "stochastic") or use the CI network's
            ("none").
        steps: Steps of the per-prompt optimisation.
        lr: Its peak learning rate.
        l_min: Its minimality coefficient; None takes `L_MIN[optimize]`.
        pgd_steps: PGD steps of the adversary, in the optimisation and in the faithfulness report.
        n_samples: Stochastic draws of the faithfulness report.
        restarts: PGD restarts of the faithfulness report.
        seed: Seeds the optimisation and the report.
        report: Compute the faithfulness report (always on when `optimize` is not "none").
        max_nodes: Subcomponent nodes whose incoming edges are computed, chosen by estimated influence on the
            logits (embedding, delta and logit nodes are always kept); None computes every node's edges.
        batch_size: Target nodes per backward pass (prompt copies per forward).
        weight_by_source_ci: Multiply edges from a subcomponent by its CI (the paper's form).
        max_logits: Logit nodes at most: the label, then the likeliest tokens ...
        logit_prob: ... until their cumulative probability reaches this.
        node_threshold: Influence share of the nodes kept by pruning.
        edge_threshold: Score share of the edges kept by pruning.
        qk_top: q/k pairs kept per o node of the pruned graph (0: none).
        max_memory_gb: Refuse a graph whose estimated peak memory exceeds this; None: the memory available now.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    optimize: Literal["none", "adversarial", "ci", "stochastic"] = "none"
    steps: int = Field(_default("steps"), ge=1)
    lr: float = Field(_default("lr"), gt=0)
    l_min: float | None = Field(None, ge=0)
    pgd_steps: int = Field(_default("pgd_steps"), ge=0)
    n_samples: int = Field(64, ge=64)
    restarts: int = Field(4, ge=1)
    seed: int = 0
    report: bool = False
    max_nodes: int | None = Field(DEFAULT_MAX_NODES, ge=1, strict=True)
    batch_size: int = Field(16, ge=1, strict=True)
    weight_by_source_ci: bool = True
    max_logits: int = Field(10, ge=1)
    logit_prob: float = Field(0.95, gt=0, le=1)
    node_threshold: float = Field(0.8, ge=0, le=1)
    edge_threshold: float = Field(0.98, ge=0, le=1)
    qk_top: int = Field(5, ge=0)
    max_memory_gb: float | None = Field(None, gt=0)

    @property
    def lambda_min(self) -> float | None:
        """The minimality coefficient in effect: `l_min`, else the paper's value for `optimize`."""
        return self.l_min if self.l_min is not None else L_MIN.get(self.optimize)

    def optimize_settings(self) -> OptimizeSettings:
        """The settings of the per-prompt optimisation; only when `optimize` is not "none"."""
        return OptimizeSettings(
            mode=self.optimize, steps=self.steps, lr=self.lr, l_min=self.l_min, pgd_steps=self.pgd_steps, seed=self.seed
        )


DEFAULTS = GraphSettings()  # every default in one instance, for the functions below `attribute_prompt`


def optimize_settings(base: OptimizeSettings | None = None, **values: object) -> OptimizeSettings:
    """`OptimizeSettings` with `values` over `base` (default: the defaults).

    Raises:
        VpdError: A value of the wrong type or out of range, named with the fix.
    """
    try:
        return OptimizeSettings.model_validate({**(base.model_dump() if base else {}), **values})
    except ValidationError as err:
        raise VpdError(_first_error(err)) from None


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    name = ".".join(str(p) for p in first["loc"]) or "settings"
    return f"`{name}`: {first['msg'].lower()} (got {first.get('input')!r})."


def graph_settings(base: GraphSettings | None = None, **values: object) -> GraphSettings:
    """`GraphSettings` with `values` over `base` (default: the defaults).

    Raises:
        VpdError: A value of the wrong type or out of range, named with the fix.
    """
    try:
        return GraphSettings.model_validate({**(base.model_dump() if base else {}), **values})
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "settings"
        if name in ("max_nodes", "batch_size"):
            none = " (or none for no budget)" if name == "max_nodes" else ""
            raise VpdError(
                f"`{name}` must be a positive integer{none}; got {first.get('input')!r}. Pass e.g. "
                f"{getattr(DEFAULTS, name)}."
            ) from None
        raise VpdError(_first_error(err)) from None
