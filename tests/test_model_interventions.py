"""Heads and neurons of a model without a decomposition (`circuits.model_interventions`, `vpd ablate --model`)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf

from circuits.cli import main
from circuits.model_interventions import ablate_units, resolve_units, scale_units
from decomposer.errors import VpdError
from tests.conftest import tiny_llama


def _gpt2():
    cfg = tf.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32, attn_implementation="eager")
    return tf.GPT2LMHeadModel(cfg).eval()


def _zeroed_weights(model, name: str):
    """A copy of `model` with the unit's input columns of its matrix set to zero: the same intervention."""
    out = copy.deepcopy(model)
    (unit,) = resolve_units(out, [name])
    w = out.get_submodule(unit.path).weight
    with torch.no_grad():
        if isinstance(out, tf.GPT2LMHeadModel):  # Conv1D: (in, out)
            w[unit.columns, :] = 0
        else:
            w[:, unit.columns] = 0
    return out


@pytest.mark.parametrize("build", [lambda: tiny_llama().eval(), _gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("name", ["1.attn.head:1", "0.mlp.neuron:7"])
def test_a_unit_at_every_position_equals_zeroing_its_weights(build, name):
    torch.manual_seed(0)
    model = build()
    ids = torch.randint(1, 40, (2, 6))
    result = ablate_units(model, ids, [name], "zero")
    with torch.no_grad():
        expected = _zeroed_weights(model, name)(ids).logits
    torch.testing.assert_close(result.logits, expected, rtol=0, atol=1e-6)
    assert result.kl.max() > 1e-8


def test_a_position_and_a_kv_cache_act_where_they_should():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = torch.randint(1, 40, (1, 4))
    units = resolve_units(model, ["1.attn.head:0@5", "0.mlp.neuron:3@2"])
    with torch.no_grad(), scale_units(model, units, -2.0):
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        seq = ids
        for _ in range(4):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq)
    with torch.no_grad():
        clean = model(seq).logits
        with scale_units(model, units, -2.0):
            moved = model(seq).logits
    torch.testing.assert_close(moved[:, :2], clean[:, :2])  # nothing before position 2 changes
    assert not torch.allclose(moved[:, 2], clean[:, 2])


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["1.attn.q:3"], "is not a head or a neuron"),
        (["7.attn.head:0"], "names block 7; the model has blocks 0..1"),
        (["0.attn.head:2"], "block 0 has 2 heads; use 0..1"),
        (["0.mlp.neuron:32"], "block 0 has 32 MLP neurons"),
        (["0.mlp.neuron:1", "0.mlp.neuron:1"], "twice"),
    ],
)
def test_bad_units_are_one_sentence(names, message):
    with pytest.raises(VpdError, match=message):
        resolve_units(tiny_llama(), names)


def test_vpd_ablate_on_a_model_without_a_run(capsys):
    argv = ["ablate", "--model", "bundled", "--prompt", "The princess lost", "--nodes", "3.attn.head:1"]
    assert main([*argv, "--generate", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "bundled" and out["p_before"] != out["p_after"] and out["kl_after"] > 0
    assert set(out["generation"]) == {"tokens", "without", "with"}
    assert main([*argv, "--kind", "scale", "--scale", "1.0"]) == 0
    assert "after 0.0000" in capsys.readouterr().out  # scaling by 1 changes nothing
    for bad, message in (
        (["--kind", "mean"], "`--kind mean` needs a decomposition's held-out data"),
        (["--nodes", "3.attn.head:99"], "block 3 has"),
    ):
        assert main([*argv, *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
