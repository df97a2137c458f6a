"""Toy models with known mechanisms, for checking that a decomposition recovers them.

`TMS` is the toy model of superposition (Elhage et al. 2022) that the SPD paper decomposes first:
n_features sparse features are squeezed through n_hidden < n_features dimensions and read
back with a ReLU, y = ReLU(W_out(H(W_in x))), with H an optional fixed square hidden layer (the papers'
identity variant; a fixed random one is also offered). Its ground-truth mechanisms are the features:
W_in is the sum of the n_features rank-one matrices W_in[:, i] e_iᵀ and W_out the sum of e_i W_out[i, :],
and on sparse data only the active features' matrices matter.

`ResidMLP` is the SPD paper's residual MLP: features embedded in a wide residual stream by a fixed random
W_E (unit rows, W_U = W_Eᵀ), 1–3 ReLU MLP blocks, trained so that output i is x_i + ReLU(x_i). Each
`mlp_in` has one mechanism per feature (it reads W_E[i]); each `mlp_out` one per neuron.

- `TMS`, `ResidMLP`: the models; every decomposable matrix is its own `nn.Linear`.
- `sparse_feature_batches`: a `step → batch` function of sparse feature vectors, for `decompose`.
- `train_tms`, `train_resid_mlp`: train the targets (seconds to a minute of Adam on CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decomposer.errors import VpdError

HIDDEN_KINDS = ("identity", "random")


class TMS(nn.Module):
    """Toy model of superposition: y = ReLU(W_out(H(W_in x))), H the optional fixed hidden layers.

    Args:
        n_features: Input and output width.
        n_hidden: Bottleneck width.
        hidden_layers: Number of square (n_hidden × n_hidden) layers between W_in and W_out.
        hidden_init: `identity` (the SPD paper's "-id" toys) or `random` (orthogonal); either stays fixed
            in `train_tms`.

    Attributes:
        W_in: `nn.Linear(n_features, n_hidden, bias=False)`; column i of its weight embeds feature i.
        hidden: `nn.ModuleList` of `nn.Linear(n_hidden, n_hidden, bias=False)` (`hidden.0`, …).
        W_out: `nn.Linear(n_hidden, n_features)` with bias; row i of its weight reads feature i back.

    Raises:
        VpdError: A width is not positive, `hidden_layers` is negative, or `hidden_init` is unknown.
    """

    def __init__(
        self, n_features: int = 5, n_hidden: int = 2, hidden_layers: int = 0, hidden_init: str = "identity"
    ) -> None:
        super().__init__()
        if n_features < 1 or n_hidden < 1:
            raise VpdError(
                f"`n_features` and `n_hidden` must be ≥ 1; got {n_features} and {n_hidden}. Pass e.g. 5 and 2."
            )
        if hidden_layers < 0 or hidden_init not in HIDDEN_KINDS:
            raise VpdError(
                f"`hidden_layers` must be ≥ 0 and `hidden_init` one of {', '.join(HIDDEN_KINDS)}; "
                f"got {hidden_layers} and {hidden_init!r}. Pass e.g. 1 and 'identity'."
            )
        self.n_features, self.n_hidden = n_features, n_hidden
        self.W_in = nn.Linear(n_features, n_hidden, bias=False)
        self.hidden = nn.ModuleList(nn.Linear(n_hidden, n_hidden, bias=False) for _ in range(hidden_layers))
        self.W_out = nn.Linear(n_hidden, n_features)
        with torch.no_grad():
            for k, layer in enumerate(self.hidden):
                if hidden_init == "identity":
                    layer.weight.copy_(torch.eye(n_hidden))
                else:
                    generator = torch.Generator().manual_seed(10_007 + k)
                    nn.init.orthogonal_(layer.weight, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        """(..., n_features) → (..., n_features)."""
        h = self.W_in(x)
        for layer in self.hidden:
            h = layer(h)
        return torch.relu(self.W_out(h))


def sparse_feature_batches(
    n_features: int, batch: int, p_active: float, seed: int, *, low: float = 0.0
) -> Callable[[int], Tensor]:
    """`step → (batch, n_features)`: each feature active independently with probability `p_active`, value U(low, 1).

    The batch of a step depends only on (seed, step), as `decompose` requires for exact resumes.
    Rows with no active feature are kept, as in the SPD paper's toy data ("at least zero active").

    Args:
        n_features: Features per row.
        batch: Rows per batch.
        p_active: Probability that a feature is active, in (0, 1].
        seed: Seeds the data; different seeds give independent streams.
        low: Lower end of an active feature's value: 0 for TMS, −1 for the residual MLP.

    Returns:
        The batch function.

    Raises:
        VpdError: A non-positive size, `p_active` outside (0, 1], or `low` not below 1.
    """
    if n_features < 1 or batch < 1:
        raise VpdError(f"`n_features` and `batch` must be ≥ 1; got {n_features} and {batch}. Pass e.g. 5 and 1024.")
    if not 0.0 < p_active <= 1.0:
        raise VpdError(f"`p_active` must be in (0, 1]; got {p_active}. Pass a feature probability such as 0.05.")
    if not low < 1.0:
        raise VpdError(f"`low` must be below 1; got {low}. Pass 0 for TMS data or -1 for residual-MLP data.")

    def batch_of(step: int) -> Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        active = torch.rand(batch, n_features, generator=generator) < p_active
        values = torch.rand(batch, n_features, generator=generator)
        if low != 0.0:
            values = low + (1.0 - low) * values
        return values * active

    return batch_of


def train_tms(
    n_features: int = 5,
    n_hidden: int = 2,
    *,
    p_active: float = 0.05,
    steps: int = 1000,
    batch: int = 1024,
    lr: float = 5e-3,
    tied: bool = True,
    hidden_layers: int = 0,
    hidden_init: str = "identity",
    seed: int = 0,
) -> TMS:
    """Train a `TMS` to reconstruct sparse features (MSE of y against x) with Adam at a constant lr.

    With the defaults (5 features, 2 hidden dimensions, p_active 0.05, tied) the trained model stores all five
    features in superposition as a regular pentagon of W_in columns of norm ≈ 1.13, and an output bias ≈ −0.24
    filters the interference for feature values up to about 0.6. Training starts tied with a zero bias whatever
    `tied` says, so that no feature starts dead behind the ReLU.

    Args:
        n_features: Input and output width.
        n_hidden: Bottleneck width.
        p_active: Feature probability of the training data.
        steps: Adam steps.
        batch: Rows per step.
        lr: Adam learning rate.
        tied: Train with W_out.weight = W_in.weightᵀ (the original TMS); the trained W_out is still a separate
            copy, so both matrices stay decomposable. Untied, the scale of each feature can move freely between
            W_in and W_out, and the W_in columns come out of very unequal norms.
        hidden_layers: Fixed square layers between W_in and W_out (see `TMS`); they are not trained.
        hidden_init: `identity` or `random` (see `TMS`).
        seed: Seeds the initialisation and the data.

    Returns:
        The trained model in eval mode, with gradients off.

    Raises:
        VpdError: A bad size, `p_active`, `steps`, `lr` or hidden layer.
    """
    if steps < 1 or lr <= 0:
        raise VpdError(f"`steps` must be ≥ 1 and `lr` > 0; got {steps} and {lr}. Pass e.g. 1000 and 5e-3.")
    data = sparse_feature_batches(n_features, batch, p_active, seed)
    model = TMS(n_features, n_hidden, hidden_layers, hidden_init)
    with torch.no_grad():
        # Start tied with a zero bias: then every feature's own output is |W_in[:, i]|² ≥ 0 at init, so no
        # feature starts dead behind the ReLU (the default init loses one or two of five features).
        nn.init.xavier_normal_(model.W_in.weight, generator=torch.Generator().manual_seed(seed))
        model.W_out.weight.copy_(model.W_in.weight.T)
        model.W_out.bias.zero_()
    params = [model.W_in.weight, model.W_out.bias] if tied else list(model.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        x = data(step)  # (batch, n_features)
        if tied:
            h = model.W_in(x)
            for layer in model.hidden:
                h = layer(h)
            y = torch.relu(F.linear(h, model.W_in.weight.T, model.W_out.bias))
        else:
            y = model(x)
        loss = (y - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if tied:
        with torch.no_grad():
            model.W_out.weight.copy_(model.W_in.weight.T)
    return model.eval().requires_grad_(False)


class ResidMLPBlock(nn.Module):
    """One residual MLP block without biases: out = mlp_out(ReLU(mlp_in(r)))."""

    def __init__(self, d_embed: int, d_mlp: int) -> None:
        super().__init__()
        self.mlp_in = nn.Linear(d_embed, d_mlp, bias=False)
        self.mlp_out = nn.Linear(d_mlp, d_embed, bias=False)

    def forward(self, r: Tensor) -> Tensor:
        return self.mlp_out(torch.relu(self.mlp_in(r)))


class ResidMLP(nn.Module):
    """The SPD paper's residual MLP: r = x W_E, r += block(r) per layer, y = r W_Eᵀ.

    Args:
        n_features: Input and output width.
        d_embed: Residual width; W_E has unit rows drawn at random from `seed` and is never trained.
        d_mlp: Neurons per block.
        n_layers: Number of blocks (`layers.0`, …), each with `mlp_in` and `mlp_out`.
        seed: Seeds W_E and the block initialisation.

    Raises:
        VpdError: A size is not positive.
    """

    def __init__(self, n_features: int = 100, d_embed: int = 1000, d_mlp: int = 50, n_layers: int = 1, *, seed=0):
        super().__init__()
        if min(n_features, d_embed, d_mlp, n_layers) < 1:
            raise VpdError(
                f"`n_features`, `d_embed`, `d_mlp` and `n_layers` must be ≥ 1; got {n_features}, {d_embed}, "
                f"{d_mlp} and {n_layers}. Pass e.g. 100, 1000, 50 and 1."
            )
        generator = torch.Generator().manual_seed(seed)
        W_E = torch.randn(n_features, d_embed, generator=generator)
        self.register_buffer("W_E", W_E / W_E.norm(dim=1, keepdim=True))  # (n_features, d_embed), fixed
        self.layers = nn.ModuleList(ResidMLPBlock(d_embed, d_mlp) for _ in range(n_layers))
        with torch.no_grad():
            for block in self.layers:
                for linear in (block.mlp_in, block.mlp_out):
                    bound = linear.in_features**-0.5  # nn.Linear's default range, drawn from our generator
                    linear.weight.uniform_(-bound, bound, generator=generator)
        self.n_features = n_features

    def forward(self, x: Tensor) -> Tensor:
        """(..., n_features) → (..., n_features)."""
        r = x @ self.W_E  # (..., d_embed)
        for block in self.layers:
            r = r + block(r)
        return r @ self.W_E.T


def resid_mlp_labels(x: Tensor) -> Tensor:
    """The residual MLP's task: y_i = x_i + ReLU(x_i) (the SPD paper's "act_plus_resid" with unit coefficients)."""
    return x + torch.relu(x)


def train_resid_mlp(
    n_features: int = 100,
    d_embed: int = 1000,
    d_mlp: int = 50,
    n_layers: int = 1,
    *,
    p_active: float = 0.01,
    steps: int = 1000,
    batch: int = 2048,
    lr: float = 3e-3,
    seed: int = 0,
) -> ResidMLP:
    """Train a `ResidMLP` on `resid_mlp_labels` (MSE), AdamW (weight decay 0.01) with a cosine lr down to 0.

    The SPD paper's targets: 100 features (102 for 3 layers), d_embed 1000, d_mlp 50 / 25 / 17 for 1 / 2 / 3
    layers, p 0.01, batch 2048, lr 3e-3, 1,000 steps (10,000 for 3 layers).

    Args:
        n_features, d_embed, d_mlp, n_layers: The model's sizes (see `ResidMLP`).
        p_active: Feature probability; active values are U(−1, 1).
        steps: AdamW steps.
        batch: Rows per step.
        lr: Peak learning rate.
        seed: Seeds W_E, the initialisation and the data.

    Returns:
        The trained model in eval mode, with gradients off.

    Raises:
        VpdError: A bad size, `p_active`, `steps` or `lr`.
    """
    if steps < 1 or lr <= 0:
        raise VpdError(f"`steps` must be ≥ 1 and `lr` > 0; got {steps} and {lr}. Pass e.g. 1000 and 3e-3.")
    model = ResidMLP(n_features, d_embed, d_mlp, n_layers, seed=seed)
    data = sparse_feature_batches(n_features, batch, p_active, seed, low=-1.0)
    opt = torch.optim.AdamW(model.layers.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    for step in range(steps):
        x = data(step)  # (batch, n_features)
        loss = (model(x) - resid_mlp_labels(x)).pow(2).mean()
        loss.backward()
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
    return model.eval().requires_grad_(False)
