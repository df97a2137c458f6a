"""The shipped target model: loadable offline by name and by path, small, and good enough."""

import os
import subprocess
import sys

import numpy as np
import pytest

from decomposer.target import bundled_target_path, load_target, measure_quality
from decomposer.target.bundle import DOCUMENT_SEPARATOR, HELDOUT_SAMPLE
from decomposer.target.quality import EMOTICON_PROMPT, MOUTHS, token_probability, top_predictions


@pytest.fixture(scope="module")
def bundled():
    return load_target("bundled")


def test_bundled_folder_is_small_and_complete():
    path = bundled_target_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training.json", HELDOUT_SAMPLE):
        assert (path / name).is_file(), name
    assert sum(f.stat().st_size for f in path.iterdir()) <= 25 * 2**20


def test_loads_with_plain_transformers_offline():
    code = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer; import sys; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "print(m.config.model_type, m.config.num_hidden_layers, len(t))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(bundled_target_path())], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["llama", "4", "4096"]


def test_pronoun_probes(bundled):
    model, tok = bundled
    p_her = token_probability(model, tok, "The princess lost", " her")
    p_his = token_probability(model, tok, "The princess lost", " his")
    assert p_her > 0.3 and p_her > p_his
    p_his = token_probability(model, tok, "The prince lost", " his")
    p_her = token_probability(model, tok, "The prince lost", " her")
    assert p_his > 0.3 and p_his > p_her


def test_emoticon_probe(bundled):
    model, tok = bundled
    (top,) = top_predictions(model, tok, EMOTICON_PROMPT, k=1)
    assert top.token in MOUTHS


def test_heldout_ce_is_1_5_nats_below_unigram_entropy(bundled):
    """On the shipped held-out sample (public-domain and generated documents only)."""
    model, tok = bundled
    text = (bundled_target_path() / HELDOUT_SAMPLE).read_text()
    docs = [d for d in text.split(DOCUMENT_SEPARATOR) if d.strip()]
    ids = [i for d in docs for i in [*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    tokens = np.asarray(ids, dtype=np.uint16)
    assert len(tokens) > 20_000
    report = measure_quality(model, tok, tokens)
    assert report.ce_below_unigram >= 1.5, report
    assert report.passes, report


def test_heldout_windows_are_the_evaluation_windows(bundled, tmp_path):
    """Every analysis reads the same held-out windows as `vpd eval`, rounded up to whole windows."""
    import torch

    from decomposer.errors import VpdError
    from decomposer.vpd.batches import heldout_seq_len, lm_eval_batches, run_heldout_tokens, run_heldout_windows
    from decomposer.vpd.config import DecomposeConfig

    _, tokenizer = bundled
    config = DecomposeConfig.model_validate(
        {"modules": [{"pattern": "model.layers.*.mlp.down_proj", "C": 4}], "data_dir": str(tmp_path)}
    )  # no corpus in tmp_path: the shipped held-out sample
    held = run_heldout_tokens(config, tokenizer)
    model, _ = bundled  # context 256: longer run windows are cut to it, shorter ones kept
    windows = run_heldout_windows(config, tokenizer, target=model, n_tokens=5 * 128 + 1)
    assert windows.shape == (6, 128)
    eval_windows = torch.cat(lm_eval_batches(held, batch_size=3, seq_len=128, n_batches=2))
    assert torch.equal(windows, eval_windows)
    assert torch.equal(windows[0], torch.from_numpy(held[:128].astype("int64")))
    with pytest.raises(VpdError, match="`--tokens` must be at least 1"):
        run_heldout_windows(config, tokenizer, target=model, n_tokens=0)
    assert torch.equal(run_heldout_windows(config, tokenizer, target=model, n_windows=6), windows)

    assert heldout_seq_len(config, model) == config.optim.seq_len == 128
    long = config.model_copy(update={"optim": config.optim.model_copy(update={"seq_len": 1024})})
    assert heldout_seq_len(long, model) == model.config.max_position_embeddings == 256
    capped = run_heldout_windows(long, tokenizer, target=model, n_tokens=600)
    assert capped.shape == (3, 256) and torch.equal(capped[0], torch.from_numpy(held[:256].astype("int64")))
