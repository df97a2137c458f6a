"""U, V and the CI network sharded with FSDP2 on CPU with gloo: equal to one rank, and a bit-exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from decomposer.errors import VpdError
from decomposer.vpd.run import STATE_DIR, WEIGHTS_FILE
from decomposer.vpd.train import decompose
from tests.conftest import toy_batches, toy_config, toy_target
from tests.ranks import rank_slice, run_ranks


def test_sharding_without_a_process_group_is_refused(tmp_path):
    with pytest.raises(VpdError, match="launch with `torchrun"):
        decompose(toy_config(steps=1), tmp_path, target=toy_target(), batches=toy_batches, shard=True)


class _Stop(Exception):
    pass


def deterministic_config():
    # Only deterministic losses: masks, routing and adversaries are drawn per rank (docs/method.md §11).
    cfg = toy_config(steps=4)
    return cfg.model_copy(
        update={
            "loss": cfg.loss.model_copy(update={"stochastic": 0.0, "adversarial": 0.0, "frequency_beta": 0.0}),
            "adversary": cfg.adversary.model_copy(update={"kind": "none"}),
        }
    )


def _sharded_run(rank, world, run_dir, config_json, *, resume=False, kill_at=None):
    from decomposer.vpd.config import DecomposeConfig

    def kill(log):
        if log.step == kill_at:
            raise _Stop

    d = decompose(
        DecomposeConfig.model_validate_json(config_json),
        run_dir,
        target=toy_target(),
        batches=rank_slice(toy_batches, rank, world),
        shard=True,
        resume=resume,
        on_step=kill if kill_at is not None else None,
    )
    tensors = d.tensors()  # gathers the shards: every rank takes part
    if rank == 0:
        save_file(tensors, f"{run_dir}/final.safetensors")


def resume_config():
    # Every stochastic part stays on: per-rank masks, routing, PPGD sources and RNG all live in the shards.
    # The global CI transformer is sharded block by block and projection by projection.
    cfg = toy_config()
    ci = {"kind": "global_transformer", "d_model": 8, "n_heads": 2, "d_mlp": 16, "n_blocks": 2}
    return cfg.model_copy(update={"ci": cfg.ci.model_copy(update=ci)})


def _worker(rank, world, out, equal_json, resume_json):
    from torch.distributed.tensor import DTensor

    from decomposer.vpd.config import DecomposeConfig
    from decomposer.vpd.run import Decomposition
    from decomposer.vpd.sharding import shard_decomposition

    probe = Decomposition.create(DecomposeConfig.model_validate_json(equal_json), toy_target())
    shard_decomposition(probe)
    local = probe.model.components("enc").V
    assert isinstance(local, DTensor) and local.to_local().shape[0] < local.shape[0]
    _sharded_run(rank, world, f"{out}/sharded", equal_json)

    _sharded_run(rank, world, f"{out}/whole", resume_json)
    try:
        _sharded_run(rank, world, f"{out}/killed", resume_json, kill_at=5)
    except _Stop:
        pass
    _sharded_run(rank, world, f"{out}/killed", resume_json, resume=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One group of 2 sharded ranks for both tests (spawning one costs more than the runs themselves)."""
    out = tmp_path_factory.mktemp("sharded")
    run_ranks(
        _worker, 2, out / "group", str(out), deterministic_config().model_dump_json(), resume_config().model_dump_json()
    )
    return out


@pytest.mark.slow
def test_two_sharded_ranks_equal_one_rank(tmp_path, runs):
    single = decompose(deterministic_config(), tmp_path / "single", target=toy_target(), batches=toy_batches)
    sharded = load_file(runs / "sharded" / "final.safetensors")
    for name, value in single.tensors().items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-6)
    # The whole decomposition every other command reads is written too, and equals the gathered shards.
    written = load_file(runs / "sharded" / STATE_DIR / WEIGHTS_FILE)
    assert written.keys() == sharded.keys()
    assert all(torch.equal(written[k], v) for k, v in sharded.items())


@pytest.mark.slow
def test_sharded_checkpoint_resumes_bit_exactly(runs):
    whole = load_file(runs / "whole" / "final.safetensors")
    resumed = load_file(runs / "killed" / "final.safetensors")
    assert whole.keys() == resumed.keys()
    for name, value in whole.items():
        assert torch.equal(value, resumed[name]), name
    lines = (runs / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(8))
    assert (runs / "killed" / "sharded" / "rank1.safetensors").is_file()
