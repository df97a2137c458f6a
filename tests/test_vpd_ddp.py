"""Data parallelism on CPU with gloo: one rank and two ranks train the same parameters."""

import pytest
import torch
import torch.distributed as dist

from decomposer.vpd.train import decompose
from tests.conftest import toy_batches, toy_config, toy_target
from tests.ranks import rank_slice, run_ranks

STEPS = 4


def deterministic_config():
    # Only deterministic losses (docs/method.md §11): masks and routing are drawn per rank, so the stochastic
    # and adversarial terms legitimately differ between one and two ranks.
    cfg = toy_config(steps=STEPS)
    return cfg.model_copy(
        update={
            "loss": cfg.loss.model_copy(update={"stochastic": 0.0, "adversarial": 0.0, "frequency_beta": 0.0}),
            "adversary": cfg.adversary.model_copy(update={"kind": "none"}),
        }
    )


def fresh_pgd_config():
    cfg = toy_config(steps=STEPS)
    fresh = {"kind": "fresh_pgd", "fresh_steps": 3, "fresh_step_size": 0.3}
    return cfg.model_copy(update={"adversary": cfg.adversary.model_copy(update=fresh)})


def _train(rank: int, world: int, out: str, config_json: str) -> None:
    from decomposer.vpd.config import DecomposeConfig

    config = DecomposeConfig.model_validate_json(config_json)
    d = decompose(config, f"{out}/rank{rank}", target=toy_target(), batches=rank_slice(toy_batches, rank, world))
    torch.save({k: v.clone() for k, v in d.tensors().items()}, f"{out}/rank{rank}.pt")


def _fresh_pgd_step(rank: int, world: int, out: str, config_json: str) -> None:
    import decomposer.vpd.step as step_module
    from decomposer.vpd.config import DecomposeConfig
    from decomposer.vpd.run import Decomposition
    from decomposer.vpd.step import Trainer
    from decomposer.vpd.train import _all_reduce_mean, _reduce_mean

    d = Decomposition.create(DecomposeConfig.model_validate_json(config_json), toy_target())
    trainer = Trainer(
        d,
        n_ref=16,
        generator=torch.Generator().manual_seed(rank),
        reduce_grads=_all_reduce_mean,
        reduce_source_grad=_reduce_mean,
        broadcast=lambda t: dist.broadcast(t, src=0),
    )
    seen = []
    original = step_module.fresh_pgd

    def recording(*args, **kwargs):
        masks, delta, loss = original(*args, **kwargs)
        seen.append({k: v.detach().clone() for k, v in delta.items()})
        return masks, delta, loss

    step_module.fresh_pgd = recording
    try:
        trainer.step(rank_slice(toy_batches, rank, world)(0), 0)
    finally:
        step_module.fresh_pgd = original
    torch.save(seen[-1], f"{out}/sources{rank}.pt")


def _worker(rank: int, world: int, out: str, train_json: str, fresh_json: str) -> None:
    _train(rank, world, out, train_json)
    _fresh_pgd_step(rank, world, out, fresh_json)


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory):
    """One group of 2 ranks for both tests (spawning one costs more than what they run)."""
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(
        _worker,
        2,
        out / "group",
        str(out),
        deterministic_config().model_dump_json(),
        fresh_pgd_config().model_dump_json(),
    )
    return out


@pytest.mark.slow
def test_one_rank_equals_two_ranks(tmp_path, ranks_out):
    single = decompose(deterministic_config(), tmp_path / "single", target=toy_target(), batches=toy_batches)
    rank0 = torch.load(ranks_out / "rank0.pt", weights_only=True)
    rank1 = torch.load(ranks_out / "rank1.pt", weights_only=True)
    for name, value in single.tensors().items():
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_shared_pgd_sources_stay_identical_across_ranks(ranks_out):
    a = torch.load(ranks_out / "sources0.pt", weights_only=True)
    b = torch.load(ranks_out / "sources1.pt", weights_only=True)
    # The delta channel of a shared source is one scalar per matrix: equal ranks mean equal sources.
    for name in a:
        assert torch.equal(a[name], b[name]), name
