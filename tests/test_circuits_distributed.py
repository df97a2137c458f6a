"""`vpd harvest` and `vpd study` split across gloo ranks on the CPU give what one process gives."""

import json
from dataclasses import fields

import pytest
import torch

from circuits.harvest import harvest, load_harvest, save_harvest
from circuits.study import run_study
from tests.conftest import STUDY_FAST as FAST
from tests.conftest import STUDY_MODULES as MODULES
from tests.conftest import STUDY_VOCAB as VOCAB
from tests.conftest import float64_decomposition, tiny_llama, word_tokenizer
from tests.ranks import run_ranks

PROMPTS = ["the princess lost", "the prince lost", "the king said that"]
PAIRS = [(0, 1)]


def setup():
    torch.manual_seed(0)
    d = float64_decomposition(tiny_llama(vocab=VOCAB), MODULES)
    # Five batches on two ranks: the last round has one batch, so uneven shares are exercised.
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (2, 8), generator=gen) for _ in range(5)]
    return d, batches


def both(d, batches):
    h = harvest(d, batches, tau_fire=0.05, reservoir=4, per_batch=2, progress=False)
    table = run_study(d, word_tokenizer(), PROMPTS, pairs=PAIRS, graph_types=("ci",), **FAST)
    return h, table


def _worker(rank, world, out):
    d, batches = setup()
    h, table = both(d, batches)
    if rank == 0:
        save_harvest(h, f"{out}/ranks")
        table.drop(columns="seconds").to_json(f"{out}/study.json", orient="records", double_precision=15)
    else:
        assert h is None


@pytest.mark.slow
def test_harvest_and_study_across_two_ranks_equal_one_process(tmp_path):
    d, batches = setup()
    single, table = both(d, batches)
    run_ranks(_worker, 2, tmp_path / "group", str(tmp_path))
    split = load_harvest(tmp_path / "ranks")
    for f in fields(single):
        if f.name in ("seconds",):
            continue
        a, b = getattr(single, f.name), getattr(split, f.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), f.name
        else:
            assert a == b, f.name
    assert int(single.firing_count.sum()) > 0 and len(single.alive) > 1
    # Every column but the wall time, rows in prompt order, floats to 15 digits.
    expected = table.drop(columns="seconds").to_json(orient="records", double_precision=15)
    assert json.loads((tmp_path / "study.json").read_text()) == json.loads(expected)
    assert table["shared_nodes"].notna().sum() == 2
