"""Toy models with known mechanisms, for checking that a decomposition recovers them.

`TMS` is the toy model of superposition (Elhage et al. 2022) that the SPD paper decomposes first:
n_features sparse features are squeezed through n_hidden < n_features dimensions and read
back with a ReLU, y = ReLU(W_out(W_in x)). Its ground-truth mechanisms are the features: W_in is the
sum of the n_features rank-one matrices W_in[:, i] e_iᵀ and W_out the sum of e_i W_out[i, :], and
on sparse data only the active features' matrices matter.

- `TMS`: the model, two separate `nn.Linear`s so that both are decomposable matrices.
- `sparse_feature_batches`: a `step → batch` function of sparse feature vectors, for `decompose`.
- `train_tms`: trains a `TMS` to reconstruct its input (a few seconds of Adam on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decomposer.errors import VpdError


class TMS(nn.Module):
    """Toy model of superposition: y = ReLU(W_out(W_in x)).

    Args:
        n_features: Input and output width.
        n_hidden: Bottleneck width.

    Attributes:
        W_in: `nn.Linear(n_features, n_hidden, bias=False)`; column i of its weight embeds feature i.
        W_out: `nn.Linear(n_hidden, n_features)` with bias; row i of its weight reads feature i back.

    Raises:
        VpdError: A width is not positive.
    """

    def __init__(self, n_features: int = 5, n_hidden: int = 2) -> None:
        super().__init__()
        if n_features < 1 or n_hidden < 1:
            raise VpdError(
                f"`n_features` and `n_hidden` must be ≥ 1; got {n_features} and {n_hidden}. Pass e.g. 5 and 2."
            )
        self.n_features, self.n_hidden = n_features, n_hidden
        self.W_in = nn.Linear(n_features, n_hidden, bias=False)
        self.W_out = nn.Linear(n_hidden, n_features)

    def forward(self, x: Tensor) -> Tensor:
        """(..., n_features) → (..., n_features)."""
        return torch.relu(self.W_out(self.W_in(x)))


def sparse_feature_batches(n_features: int, batch: int, p_active: float, seed: int) -> Callable[[int], Tensor]:
    """`step → (batch, n_features)`: each feature active independently with probability `p_active`, value U(0, 1).

    The batch of a step depends only on (seed, step), as `decompose` requires for exact resumes.
    Rows with no active feature are kept, as in the SPD paper's TMS data.

    Args:
        n_features: Features per row.
        batch: Rows per batch.
        p_active: Probability that a feature is active, in (0, 1].
        seed: Seeds the data; different seeds give independent streams.

    Returns:
        The batch function.

    Raises:
        VpdError: A non-positive size or `p_active` outside (0, 1].
    """
    if n_features < 1 or batch < 1:
        raise VpdError(f"`n_features` and `batch` must be ≥ 1; got {n_features} and {batch}. Pass e.g. 5 and 1024.")
    if not 0.0 < p_active <= 1.0:
        raise VpdError(f"`p_active` must be in (0, 1]; got {p_active}. Pass a feature probability such as 0.05.")

    def batch_of(step: int) -> Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        active = torch.rand(batch, n_features, generator=generator) < p_active
        values = torch.rand(batch, n_features, generator=generator)
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
        seed: Seeds the initialisation and the data.

    Returns:
        The trained model in eval mode, with gradients off.

    Raises:
        VpdError: A bad size, `p_active`, `steps` or `lr`.
    """
    if steps < 1 or lr <= 0:
        raise VpdError(f"`steps` must be ≥ 1 and `lr` > 0; got {steps} and {lr}. Pass e.g. 1000 and 5e-3.")
    data = sparse_feature_batches(n_features, batch, p_active, seed)
    model = TMS(n_features, n_hidden)
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
            y = torch.relu(F.linear(model.W_in(x), model.W_in.weight.T, model.W_out.bias))
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
