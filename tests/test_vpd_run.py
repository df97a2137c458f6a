"""Decomposition runs end to end: artifacts, bit-exact save/load, kill-and-resume, refusals, CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file

from circuits.cli import main
from decomposer.errors import VpdError
from decomposer.vpd.config import DecomposeConfig, ReviveConfig
from decomposer.vpd.run import META_FILE, STATE_DIR, WEIGHTS_FILE, Decomposition, load_decomposition
from decomposer.vpd.train import decompose
from tests.conftest import toy_batches, toy_config, toy_target


def test_network_ci_is_the_ci_function_on_a_clean_forward():
    d = Decomposition.create(toy_config(), toy_target())
    x = toy_batches(0)
    _, xs = d.model.forward_with_inputs(x)
    expected, _ = d.causal_importance(xs)
    got = d.network_ci(x)
    assert set(got) == {"enc", "dec"} and got["enc"].shape == (16, 4) and not got["enc"].requires_grad
    for p in got:
        assert torch.equal(got[p], expected[p]), p


def test_run_folder_layout_and_bit_exact_reload(tmp_path):
    d = decompose(toy_config(), tmp_path, target=toy_target(), batches=toy_batches, eval_batches=[toy_batches(99)])
    meta = json.loads((tmp_path / STATE_DIR / META_FILE).read_text())
    assert meta["format"] == "decomposition" and meta["format_version"] == 1 and meta["step"] == 8
    assert meta["modules"] == {"enc": {"d_in": 6, "d_out": 3, "C": 4}, "dec": {"d_in": 3, "d_out": 6, "C": 5}}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(8))
    assert "eval" in json.loads(lines[3]) and "eval" not in json.loads(lines[2])
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"losses.png", "l0.png", "ci_spectrum.png"}
    reloaded, _, train_state = load_decomposition(tmp_path, toy_target())
    for name, value in d.tensors().items():
        assert torch.equal(value, reloaded.tensors()[name]), name
    assert "rng" in train_state and any(k.startswith("ppgd.sources.") for k in train_state)
    saved = load_file(tmp_path / STATE_DIR / WEIGHTS_FILE)
    assert set(saved) == set(d.tensors())


@pytest.mark.parametrize("revive", [None, {"every": 2, "start": 1, "until_frac": 1.0}], ids=["plain", "revival"])
def test_kill_and_resume_is_bit_identical(tmp_path, revive):
    # With revival on, steps 1, 3, 5 and 7 revive dead subcomponents; 5 and 7 come after the resume from step 4.
    config = toy_config() if revive is None else toy_config().model_copy(update={"revive": ReviveConfig(**revive)})
    whole = decompose(config, tmp_path / "whole", target=toy_target(), batches=toy_batches)

    def kill(log):
        if log.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decompose(config, tmp_path / "killed", target=toy_target(), batches=toy_batches, on_step=kill)
    resumed = decompose(config, tmp_path / "killed", target=toy_target(), batches=toy_batches, resume=True)
    for name, value in whole.tensors().items():
        assert torch.equal(value, resumed.tensors()[name]), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(8))


def test_loading_against_another_target_is_refused(tmp_path):
    decompose(toy_config(steps=2), tmp_path, target=toy_target(), batches=toy_batches)
    other = toy_target()
    with torch.no_grad():
        other.enc.weight.add_(0.1)
    with pytest.raises(VpdError, match="Load it with the model it was trained on"):
        load_decomposition(tmp_path, other)


def test_newer_format_version_is_refused(tmp_path):
    decompose(toy_config(steps=2), tmp_path, target=toy_target(), batches=toy_batches)
    meta_path = tmp_path / STATE_DIR / META_FILE
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 7}))
    with pytest.raises(VpdError, match="version 7, but this release reads"):
        load_decomposition(tmp_path, toy_target())


def test_existing_run_needs_resume(tmp_path):
    decompose(toy_config(steps=2), tmp_path, target=toy_target(), batches=toy_batches)
    with pytest.raises(VpdError, match="already holds a decomposition"):
        decompose(toy_config(steps=2), tmp_path, target=toy_target(), batches=toy_batches)
    with pytest.raises(VpdError, match="different config"):
        decompose(toy_config(steps=3), tmp_path, target=toy_target(), batches=toy_batches, resume=True)


def test_init_from_starts_at_the_earlier_runs_parameters(tmp_path):
    first = decompose(toy_config(), tmp_path / "first", target=toy_target(), batches=toy_batches)
    # One step at a vanishing lr: the second run must start from the first run's U, V and CI weights and skip
    # the faithfulness warm-up (whose lr of 1e-3 would move them by far more than the tolerance).
    config = toy_config(steps=1, lr=1e-12).model_copy(update={"init_from": str(tmp_path / "first")})
    second = decompose(config, tmp_path / "second", target=toy_target(), batches=toy_batches)
    for name, value in first.tensors().items():
        torch.testing.assert_close(second.tensors()[name], value, rtol=0, atol=1e-9, msg=name)
    fresh = decompose(toy_config(steps=1, lr=1e-12), tmp_path / "fresh", target=toy_target(), batches=toy_batches)
    assert not torch.allclose(fresh.tensors()["components.enc.V"], first.tensors()["components.enc.V"])


def test_init_from_a_run_with_other_C_is_refused(tmp_path):
    decompose(toy_config(steps=2), tmp_path / "first", target=toy_target(), batches=toy_batches)
    base = toy_config(steps=2).model_dump()
    base["modules"] = [{"pattern": "enc", "C": 4}, {"pattern": "dec", "C": 7}]
    base["init_from"] = str(tmp_path / "first")
    with pytest.raises(VpdError, match="same `modules` as that run"):
        decompose(DecomposeConfig.model_validate(base), tmp_path / "second", target=toy_target(), batches=toy_batches)


@pytest.fixture(scope="module")
def micro_target(micro_data_dir, tmp_path_factory):
    """A trained 2-layer Llama on the micro corpus, saved with its tokenizer."""
    from decomposer.target import train_target
    from tests.conftest import micro_config

    out = tmp_path_factory.mktemp("target")
    train_target(micro_config(micro_data_dir, steps=4), out)
    return out / "model"


def write_lm_config(path, model_dir, data_dir, **extra):
    config = {
        "target": str(model_dir),
        "data_dir": str(data_dir),
        "modules": [
            {"pattern": "model.layers.*.self_attn.*_proj", "C": 6},
            {"pattern": "model.layers.*.mlp.*_proj", "C": 8},
        ],
        "ci": {"kind": "global_transformer", "d_model": 16, "n_blocks": 1, "n_heads": 2, "d_mlp": 32},
        "optim": {"steps": 4, "batch_size": 2, "seq_len": 16, "faithfulness_warmup_steps": 2, "lr": 1e-3},
        "eval": {"every": 2, "batches": 1, "pgd_steps": [2]},
        "checkpoint_every": 2,
        **extra,
    }
    path.write_text(json.dumps(config))  # JSON is valid YAML
    return path


def test_cli_decompose_then_eval(micro_target, micro_data_dir, tmp_path, capsys):
    config = write_lm_config(tmp_path / "c.yaml", micro_target, micro_data_dir)
    assert main(["decompose", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    assert main(["eval", "--run", str(tmp_path / "run"), "--json", "--pgd-steps", "3", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(report["pgd"]) == ["1", "3"]  # one 3-step run, read after 1 and 3 steps
    assert set(report["modes"]) == {
        "unmasked",
        "stochastic",
        "ci",
        "rounded_0",
        "rounded_0.1",
        "rounded_0.5",
        "zero",
        "random",
    }
    assert report["C_total"] == 2 * (4 * 6 + 3 * 8)
    assert report["modes"]["unmasked"]["with_delta"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "run" / "eval.json").exists()
    assert main(["eval", "--run", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out
    assert "rounded_0.5" in table and "fresh shared-source PGD KL" in table
    assert "2 steps" in table and "20 steps" in table and "80 steps" in table  # the config's and the method's
    assert main(["eval", "--run", str(tmp_path / "run"), "--pgd-steps", "-1"]) == 2
    assert "`--pgd-steps` must be step counts" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"stepz": 1}, "`stepz` in .*Extra inputs are not permitted"),
        ({"modules": [{"pattern": "model.layers.*.self_attn.q_proj", "C": -3}]}, "`modules.0.C`"),
        ({"modules": [{"pattern": "model.layers.*.attn.q", "C": 3}]}, "matched no module. Did you mean"),
        ({"target": "/no/such/model"}, "`--model` '/no/such/model' could not be loaded"),
    ],
)
def test_bad_decompose_configs_give_one_sentence(micro_target, micro_data_dir, tmp_path, capsys, edit, message):
    config = write_lm_config(tmp_path / "c.yaml", micro_target, micro_data_dir, **edit)
    assert main(["decompose", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_eval_of_a_missing_run(capsys):
    assert main(["eval", "--run", "/no/such/run"]) == 2
    assert "`--run` '/no/such/run' does not exist" in capsys.readouterr().err


def test_cli_graph_writes_json_html_png(micro_target, micro_data_dir, tmp_path, capsys):
    config = write_lm_config(tmp_path / "c.yaml", micro_target, micro_data_dir)
    assert main(["decompose", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    args = ["graph", "--run", str(tmp_path / "run"), "--prompt", "The princess lost", "--out", str(tmp_path / "g")]
    assert main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < summary["pruned_nodes"] <= summary["nodes"]
    for name in ("graph.json", "graph.circuit-tracer.json", "graph.html", "graph.png"):
        assert (tmp_path / "g" / name).stat().st_size > 0, name
    assert main([*args[:3], "--prompt", " ", "--out", str(tmp_path / "h")]) == 2
    assert "`prompt` is empty" in capsys.readouterr().err
    assert main(["graph", "--run", "/no/run", "--prompt", "x", "--out", str(tmp_path / "h")]) == 2
    assert "`--run` '/no/run' does not exist" in capsys.readouterr().err


def test_cli_graph_with_per_prompt_optimisation(micro_target, micro_data_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    config = write_lm_config(tmp_path / "c.yaml", micro_target, micro_data_dir)
    assert main(["decompose", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    tok = AutoTokenizer.from_pretrained(micro_target)
    target = tok.decode(tok(" her", add_special_tokens=False)["input_ids"][:1])
    capsys.readouterr()
    args = [
        "graph",
        "--run",
        str(tmp_path / "run"),
        "--prompt",
        "The princess lost",
        "--target",
        target,
        "--optimize",
        "adversarial",
        "--steps",
        "5",
        "--out",
        str(tmp_path / "g"),
        "--json",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["report"]
    assert set(report) >= {"target", "ci", "stochastic", "adversarial", "n_nodes"}
    assert 0 <= report["adversarial"] <= 1 and 0 < report["target"] < 1
    assert main([*args[:5], "--optimize", "ci", "--out", str(tmp_path / "h")]) == 2
    assert "`--target` is required with `--optimize`" in capsys.readouterr().err
