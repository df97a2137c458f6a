"""The training-memory estimate and the refusal before the first step (`decomposer.vpd.memory`)."""

from __future__ import annotations

import pytest

from decomposer.errors import VpdError
from decomposer.vpd import memory
from decomposer.vpd.run import Decomposition
from decomposer.vpd.train import decompose
from tests.conftest import tiny_llama, toy_batches, toy_config, toy_target

AUTO = {"modules": "auto", "ci": {"kind": "mlp", "hidden": 4}}


def _llama_decomposition():
    from decomposer.vpd.config import DecomposeConfig

    return Decomposition.create(DecomposeConfig.model_validate(AUTO), tiny_llama())


def test_the_estimate_counts_state_and_grows_with_tokens():
    d = _llama_decomposition()
    one, two = memory.estimate_training_bytes(d, 64), memory.estimate_training_bytes(d, 128)
    uv = sum(p.numel() for p in d.model.parameters() if p.requires_grad)
    ci = sum(p.numel() for p in d.ci_fn.parameters())
    assert one["training_state"] == 20 * (uv + ci)  # parameter, gradient, two moments, optimizer scratch
    assert two["activations"] == 2 * one["activations"] > 0
    assert one["total"] == one["frozen"] + one["training_state"] + one["activations"]


def test_too_many_tokens_names_the_batch_settings():
    d = _llama_decomposition()
    parts = memory.estimate_training_bytes(d, 4096)
    limit = parts["frozen"] + parts["training_state"] + parts["activations"] // 2
    with pytest.raises(VpdError, match=r"lower `optim.batch_size` or `optim.seq_len` .*about 2,0\d\d fit"):
        memory.check_training_memory(d, 4096, limit=limit)
    assert memory.check_training_memory(d, 1024, limit=limit)["total"] <= limit


def test_too_large_a_decomposition_names_the_modules_setting():
    d = _llama_decomposition()
    with pytest.raises(VpdError, match=r"`modules: \{auto: true, scale: 0.5\}` halves C.*`--shard`"):
        memory.check_training_memory(d, 1, limit=1000)


def test_decompose_refuses_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 0)
    with pytest.raises(VpdError, match=r"needs an estimated .* GB .* available"):
        decompose(toy_config(), tmp_path / "run", target=toy_target(), batches=toy_batches)
    assert not (tmp_path / "run" / "decomposition").exists()
