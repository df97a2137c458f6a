"""Configuration of a VPD decomposition run. Paper values are the `paper` preset (docs/method.md §3, §8, §9)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from decomposer.configio import load_yaml_config
from decomposer.vpd.targets import AutoModules, ModuleSpec

if TYPE_CHECKING:
    from torch import nn

PositiveInt = Annotated[int, Field(gt=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CIConfig(_Frozen):
    """The causal-importance function (docs/method.md §5)."""

    kind: Literal["global_transformer", "mlp", "vector_mlp", "shared_mlp"] = Field(
        "global_transformer", description="Global bidirectional transformer [VPD] or a per-matrix MLP [SPD]."
    )
    hidden: PositiveInt = Field(16, description="Hidden width of the per-matrix MLP kinds.")
    d_model: PositiveInt = Field(256, description="Residual width of the global CI transformer.")
    n_blocks: PositiveInt = Field(2, description="Blocks of the global CI transformer.")
    n_heads: PositiveInt = Field(4, description="Attention heads of the global CI transformer.")
    d_mlp: PositiveInt = Field(1024, description="MLP hidden width of the global CI transformer.")
    rope_base: float = Field(10_000.0, gt=0, description="RoPE base of the global CI transformer.")
    sigmoid: Literal["vpd", "spd"] = Field("vpd", description="σ_lower: straight-through leak [VPD] or forward leak.")
    alpha: float = Field(0.01, ge=0, description="Leak slope of both hard sigmoids.")


class LossConfig(_Frozen):
    """Loss coefficients and minimality settings (docs/method.md §8)."""

    faithfulness: NonNegative = Field(1e7, description="Coefficient of L_Δ, the MSE of W − Ŵ.")
    stochastic: NonNegative = Field(0.5, description="Coefficient of the stochastic subset reconstruction.")
    adversarial: NonNegative = Field(0.5, description="Coefficient of the adversarial (PPGD) reconstruction.")
    importance: NonNegative = Field(2e-4, description="Coefficient of importance minimality.")
    frequency_beta: NonNegative = Field(0.5, description="β: frequency coefficient = β × importance coefficient.")
    p_start: float = Field(2.0, gt=0, description="Minimality exponent p at the anneal start.")
    p_end: float | None = Field(0.4, gt=0, description="p at the anneal end; None keeps p constant.")
    p_anneal_start_frac: Probability = Field(0.0, description="Fraction of training where p starts to fall.")
    p_anneal_end_frac: Probability = Field(1.0, description="Fraction of training where p reaches p_end.")
    eps: float = Field(1e-6, gt=0, description="ε inside (g_up + ε)^p; the paper used 1e-12.")
    n_ref: PositiveInt | None = Field(None, description="Tokens per step for the frequency term; None = global batch.")
    routing: Literal["uniform_k", "all"] = Field("uniform_k", description="Routing of the stochastic loss.")
    mask_samples: PositiveInt = Field(1, description="Stochastic mask draws per step (S).")
    sources: Literal["uniform", "binomial"] = Field("uniform", description="Stochastic sources: U(0,1) or coin.")
    output_loss: Literal["kl", "mse"] = Field("kl", description="KL for language models, MSE for regression toys.")


class AdversaryConfig(_Frozen):
    """The adversary of the adversarial reconstruction loss (docs/method.md §8.3)."""

    kind: Literal["ppgd", "fresh_pgd", "none"] = Field("ppgd", description="Persistent PGD [VPD] or fresh PGD [SPD].")
    lr: float = Field(0.01, gt=0, description="PPGD Adam ascent lr after warm-up.")
    warmup_frac: Probability = Field(0.025, description="Fraction of training for the linear PPGD lr warm-up.")
    betas: tuple[float, float] = Field((0.5, 0.99), description="PPGD Adam betas.")
    eps: float = Field(1e-8, gt=0, description="PPGD Adam epsilon.")
    warmup_ascents: int = Field(2, ge=0, description="Ascent steps on the current batch before the loss.")
    routing: Literal["all", "uniform_k"] = Field("all", description="Routing of the adversarial loss (§12 item 5).")
    fresh_steps: PositiveInt = Field(1, description="Sign-ascent steps of fresh PGD.")
    fresh_step_size: float = Field(1.0, gt=0, description="Sign-ascent step of fresh PGD.")


class OptimConfig(_Frozen):
    """AdamW over U, V and the CI function (docs/method.md §9)."""

    steps: PositiveInt = Field(1000, description="Main optimisation steps.")
    batch_size: PositiveInt = Field(32, description="Global batch (sequences); divided across ranks.")
    seq_len: PositiveInt = Field(128, description="Tokens per sequence.")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate.")
    lr_final_frac: Probability = Field(0.1, description="Cosine decays to this fraction of lr.")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear lr warm-up steps.")
    weight_decay: NonNegative = Field(0.0, description="AdamW weight decay.")
    clip_uv: float | None = Field(0.01, gt=0, description="Gradient-norm clip on U and V; None disables.")
    faithfulness_warmup_steps: int = Field(400, ge=0, description="Steps minimising only L_Δ before the main loop.")
    faithfulness_warmup_lr: float = Field(1e-3, gt=0, description="lr of the faithfulness warm-up.")
    seed: int = Field(0, description="Seeds initialisation, data order, masks and routing.")
    bf16: bool = Field(True, description="bf16 autocast on CUDA (KL stays fp32); ignored on CPU.")


class ReviveConfig(_Frozen):
    """Reviving dead subcomponents during training (revive.py); off unless `every` > 0. Toy recipes use it."""

    every: int = Field(0, ge=0, description="Steps between revivals; 0 turns revival off.")
    patterns: tuple[str, ...] = Field(("*",), min_length=1, description="fnmatch globs of the matrices revived.")
    start: int = Field(300, ge=0, description="Step of the first revival.")
    until_frac: Probability = Field(0.6, description="No revival after this fraction of the steps.")
    per_matrix: PositiveInt = Field(4, description="At most this many subcomponents revived per matrix each time.")
    dead_below: float = Field(1e-3, gt=0, description="Dead: CI below this on every row of the batch.")
    unexplained: Probability = Field(
        0.1, description="A row qualifies when the subcomponents its CI turns on leave this fraction of W x out."
    )


class EvalConfig(_Frozen):
    """Evaluation cadence and the fresh shared-source PGD probe (docs/method.md §10)."""

    every: PositiveInt = Field(200, description="Steps between evaluations.")
    batches: PositiveInt = Field(4, description="Held-out batches per evaluation.")
    pgd_steps: tuple[int, ...] = Field((20, 40, 80), description="Step counts of the PGD probe.")
    pgd_step_size: float = Field(0.1, gt=0, description="Sign-ascent step of the PGD probe.")


_MODULE_LIST = TypeAdapter(tuple[ModuleSpec, ...])


class DecomposeConfig(_Frozen):
    """A VPD run: the target, which matrices to decompose with which C, and how to train."""

    target: str = Field("bundled", description="`bundled`, `smollm2-135m`, a local model folder, or a hub id.")
    modules: tuple[ModuleSpec, ...] | Literal["auto"] | AutoModules = Field(
        description="Glob patterns over module paths, each with its C; or `auto` (every attention and MLP "
        "matrix, C from the paper's ratios to d_model), optionally `{auto: true, C: {role: C}, scale: s}`."
    )
    ci: CIConfig = Field(default_factory=CIConfig, description="Causal-importance function.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Losses.")
    adversary: AdversaryConfig = Field(default_factory=AdversaryConfig, description="Adversary.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimisation.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    revive: ReviveConfig = Field(default_factory=ReviveConfig, description="Reviving dead subcomponents.")
    checkpoint_every: PositiveInt = Field(500, description="Steps between atomic checkpoints.")
    data_dir: str | None = Field(None, description="Data directory of the corpus; None means the default.")
    init_from: str | None = Field(
        None,
        description="A run folder (or `bundled`) whose U, V and CI parameters start this run, which then skips "
        "the faithfulness warm-up; its target, modules, C and CI network must match. Continues a finished run "
        "under a new schedule.",
    )

    @field_validator("modules", mode="wrap")
    @classmethod
    def _one_form(cls, value: object, handler: object) -> object:
        # Validate against the one form the value is written in, so an error names `modules.0.C`, not a union member.
        if isinstance(value, str):
            if value != "auto":
                raise ValueError("write `modules: auto` or a list of {pattern, C} entries")
            return value
        if isinstance(value, dict | AutoModules):
            return AutoModules.model_validate(value)
        return _MODULE_LIST.validate_python(value)

    @model_validator(mode="after")
    def _consistent(self) -> DecomposeConfig:
        if not self.modules:
            raise ValueError("at least one module pattern is needed")
        if self.ci.kind == "global_transformer" and isinstance(self.modules, tuple):
            widths = [i for i, spec in enumerate(self.modules) if spec.ci_hidden is not None]
            if widths:
                raise ValueError(
                    f"modules.{widths[0]}.ci_hidden sets a per-matrix CI width, but `ci.kind` is "
                    "global_transformer, which has one network for all matrices; drop it or use a per-matrix kind"
                )
        if self.revive.every and self.ci.kind not in ("mlp", "vector_mlp"):
            raise ValueError(
                f"revive.every turns on reviving dead subcomponents, which sets one subcomponent's own CI network, "
                f"but `ci.kind` is {self.ci.kind}, whose network is shared; use `mlp` or `vector_mlp`, or set "
                "revive.every to 0"
            )
        if self.loss.p_anneal_end_frac < self.loss.p_anneal_start_frac:
            raise ValueError("p_anneal_end_frac must not be below p_anneal_start_frac")
        return self


def paper_preset(**overrides) -> dict:
    """The paper run's settings (docs/method.md §3, §8, §9) as a config dict, for a GPT-style 4-layer target."""
    C = {"q_proj": 512, "k_proj": 512, "v_proj": 1024, "o_proj": 1024, "up_proj": 3072, "down_proj": 3584}
    config = {
        "modules": [{"pattern": f"model.layers.*.*.{name}", "C": c} for name, c in C.items()],
        "ci": {"kind": "global_transformer", "d_model": 2048, "n_blocks": 8, "n_heads": 16, "d_mlp": 8192},
        "loss": {"eps": 1e-12},
        "optim": {"steps": 400_000, "batch_size": 64, "seq_len": 512, "lr": 5e-5},
    }
    config.update(overrides)
    return config


def paper_target(vocab_size: int = 4096) -> nn.Module:
    """A random-weight target of the paper's shape (4 layers, d_model 768, MLP 3072, 12 heads), for benchmarks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=4,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def load_decompose_config(path: str | Path) -> DecomposeConfig:
    """Read a YAML config; every problem is reported as one `VpdError` sentence."""
    return load_yaml_config(path, DecomposeConfig, example="configs/smoke.yaml")
