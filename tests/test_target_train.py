import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from decomposer.errors import VpdError
from decomposer.target import load_target_config, train_target
from decomposer.target.config import TrainSettings
from decomposer.target.train import lr_at
from tests.conftest import micro_config


def test_lr_schedule_endpoints():
    t = TrainSettings(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(109, t) == pytest.approx(0.1)
    assert lr_at(60, t) == pytest.approx(0.55, abs=0.01)


def test_training_lowers_heldout_ce_and_saves_an_hf_model(micro_data_dir, tmp_path, monkeypatch):
    record = train_target(micro_config(micro_data_dir, steps=30, eval_every=10, checkpoint_every=10), tmp_path)
    ces = [h["heldout_ce"] for h in record["history"]]
    # A uniform guess scores ln(400) = 5.99 nats.
    assert len(ces) == 3 and ces[0] > ces[1] > ces[2] and ces[-1] < math.log(400) - 0.4
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    saved = json.loads((tmp_path / "model" / "training.json").read_text())
    assert saved["quality"]["heldout_ce"] == pytest.approx(record["quality"]["heldout_ce"])


def test_kill_and_resume_equals_uninterrupted(micro_data_dir, tmp_path):
    config = micro_config(micro_data_dir)
    train_target(config, tmp_path / "whole")

    def kill_after_step_6(log):
        if log.step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_target(config, tmp_path / "killed", on_step=kill_after_step_6)
    state = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4
    train_target(config, tmp_path / "killed", resume=True)
    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_run_folder_guards(micro_data_dir, tmp_path):
    config = micro_config(micro_data_dir, steps=4)
    with pytest.raises(VpdError, match="has no checkpoint"):
        train_target(config, tmp_path, resume=True)
    train_target(config, tmp_path)
    with pytest.raises(VpdError, match="already holds a training run"):
        train_target(config, tmp_path)
    with pytest.raises(VpdError, match="different config"):
        train_target(micro_config(micro_data_dir, steps=5), tmp_path, resume=True)
    with pytest.raises(VpdError, match=r"`model.vocab_size` is 4096"):
        bad = config.model_copy(update={"model": config.model.model_copy(update={"vocab_size": 4096})})
        train_target(bad, tmp_path / "other")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: {stepz: 3}\n", "`train.stepz` in .*Extra inputs are not permitted"),
        ("model: {d_model: -4}\n", "`model.d_model` in .*greater than 0"),
        ("model: {d_model: 30, n_heads: 4}\n", "divisible by n_heads"),
        ("model: [1, 2\n", "is not valid YAML"),
    ],
)
def test_bad_configs_give_one_sentence(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(VpdError, match=message):
        load_target_config(path)


def test_shipped_config_is_valid():
    config = load_target_config("configs/target-bundled.yaml")
    assert config.model.n_layers == 4 and 128 <= config.model.d_model <= 192
