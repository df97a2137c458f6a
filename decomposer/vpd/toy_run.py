"""Run a toy end to end: train the target, decompose it, score it against its known mechanisms.

A toy config (YAML, `configs/toys/*.yaml`) has three parts: `toy` (the target and how it is trained),
`decompose` (a `DecomposeConfig` dict; its `target` is only a label) and the scoring settings. `run_toy`
runs one seed: the target is trained from `seed`, the decomposition uses `optim.seed = seed` and its own
data stream, and a held-out batch scores it. Each seed's folder holds the run (`decomposition/`,
`metrics.jsonl`), `result.json` (format `toy_result`) and the two figures of `toy_plots`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from decomposer.configio import load_yaml_config
from decomposer.io import atomic_write_json
from decomposer.vpd.config import DecomposeConfig
from decomposer.vpd.toy_score import all_recovered, dense_as_expected, score_toy
from decomposer.vpd.toys import TMS, ResidMLP, sparse_feature_batches, train_resid_mlp, train_tms
from decomposer.vpd.train import decompose

FORMAT = "toy_result"
FORMAT_VERSION = 1
RESULT_FILE = "result.json"
# Data streams: the target trains on stream `seed`, the decomposition on `seed + DECOMPOSE_STREAM` and the
# score on `seed + EVAL_STREAM`, so no batch is seen twice.
DECOMPOSE_STREAM, EVAL_STREAM = 1000, 2000


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrainSpec(_Frozen):
    """How the target is trained."""

    steps: int = Field(1000, gt=0, description="Optimiser steps.")
    batch: int = Field(1024, gt=0, description="Rows per step.")
    lr: float = Field(5e-3, gt=0, description="Learning rate.")


class TMSSpec(_Frozen):
    """A toy model of superposition (see `decomposer.vpd.toys.TMS`)."""

    kind: Literal["tms"] = "tms"
    n_features: int = Field(gt=0)
    n_hidden: int = Field(gt=0)
    hidden_layers: int = Field(0, ge=0, description="Fixed square layers between W_in and W_out.")
    hidden_init: Literal["identity", "random"] = "identity"
    feature_probability: float = Field(0.05, gt=0, le=1)
    train: TrainSpec = Field(default_factory=TrainSpec)


class ResidMLPSpec(_Frozen):
    """The residual MLP (see `decomposer.vpd.toys.ResidMLP`)."""

    kind: Literal["resid_mlp"] = "resid_mlp"
    n_features: int = Field(100, gt=0)
    d_embed: int = Field(1000, gt=0)
    d_mlp: int = Field(50, gt=0)
    n_layers: int = Field(1, gt=0)
    feature_probability: float = Field(0.01, gt=0, le=1)
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(steps=1000, batch=2048, lr=3e-3))


class ToyConfig(_Frozen):
    """One toy experiment: target, decomposition recipe and scoring."""

    toy: Annotated[TMSSpec | ResidMLPSpec, Field(discriminator="kind")]
    decompose: DecomposeConfig
    one_hot_value: float = Field(0.75, gt=0, le=1, description="Value of the lone feature in the one-hot CI check.")
    eval_rows: int = Field(8192, gt=0, description="Held-out rows for MSE and the alive count.")
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1, description="Seeds `vpd toy` runs by default.")


def load_toy_config(path: str | Path) -> ToyConfig:
    """Read a toy YAML; every problem is reported as one `VpdError` sentence."""
    return load_yaml_config(path, ToyConfig, example="configs/toys/tms_5-2.yaml")


def train_target(spec: TMSSpec | ResidMLPSpec, seed: int) -> TMS | ResidMLP:
    """The trained toy target of `spec` for `seed`."""
    t = spec.train
    if spec.kind == "tms":
        return train_tms(
            spec.n_features,
            spec.n_hidden,
            p_active=spec.feature_probability,
            steps=t.steps,
            batch=t.batch,
            lr=t.lr,
            hidden_layers=spec.hidden_layers,
            hidden_init=spec.hidden_init,
            seed=seed,
        )
    return train_resid_mlp(
        spec.n_features,
        spec.d_embed,
        spec.d_mlp,
        spec.n_layers,
        p_active=spec.feature_probability,
        steps=t.steps,
        batch=t.batch,
        lr=t.lr,
        seed=seed,
    )


def toy_batches(spec: TMSSpec | ResidMLPSpec, batch: int, seed: int):
    """The toy's data stream: TMS values in (0, 1), residual-MLP values in (−1, 1)."""
    low = 0.0 if spec.kind == "tms" else -1.0
    return sparse_feature_batches(spec.n_features, batch, spec.feature_probability, seed, low=low)


def run_toy(config: ToyConfig, out: str | Path, seed: int, *, progress: bool = False, plots: bool = True) -> dict:
    """Train the target, decompose it and score it for one seed; write `out/result.json` (and the figures).

    Returns:
        The result: `score_toy`'s dict plus `seed`, `all_recovered` (every feature), `dense_as_expected`, and the
        seconds each phase took.
    """
    out = Path(out)
    began = time.perf_counter()
    target = train_target(config.toy, seed)
    trained = time.perf_counter()
    cfg = config.decompose.model_copy(update={"optim": config.decompose.optim.model_copy(update={"seed": seed})})
    batches = toy_batches(config.toy, cfg.optim.batch_size, seed + DECOMPOSE_STREAM)
    d = decompose(cfg, out, target=target, batches=batches, progress=progress)
    decomposed = time.perf_counter()
    eval_x = toy_batches(config.toy, config.eval_rows, seed + EVAL_STREAM)(0)
    result = score_toy(d, eval_x, one_hot_value=config.one_hot_value)
    result.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        seed=seed,
        all_recovered=all_recovered(result),
        dense_as_expected=dense_as_expected(result),
        seconds={"target": trained - began, "decompose": decomposed - trained},
    )
    if plots:
        from decomposer.vpd.toy_plots import plot_ci_vs_value, plot_pieces

        plot_pieces(d, result, out / "pieces.png")
        plot_ci_vs_value(d, result, out / "ci_vs_value.png", low=0.0 if config.toy.kind == "tms" else -1.0)
    atomic_write_json(out / RESULT_FILE, result)
    return result
