"""Shared fixtures: micro copies of every corpus source, a micro corpus, and a micro target run.

Nothing here touches the network: each registry file is rebuilt in the shape of the real one.
"""

from __future__ import annotations

import bz2
import io
import json
import random
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from attrgraph.nodes import NodeId, module_short_name
from attrgraph.settings import GraphSettings
from decomposer.data.sources import SOURCES, Source, sha256_file


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _tgz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _deb(path: Path, members: dict[str, bytes]) -> None:
    """An `ar` archive holding debian-binary, control.tar.xz and data.tar.xz, like a real .deb."""

    def tar_xz(files: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    parts = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", tar_xz({"./control": b"Package: fortunes\n"})),
        ("data.tar.xz", tar_xz(members)),
    ]
    out = bytearray(b"!<arch>\n")
    for name, data in parts:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        assert len(header) == 60
        out += header + data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))


SOTU_TEXT = "Fellow-Citizens of the Senate: The state of the Union is strong. We shall meet again next year."
MOBY_TEXT = (
    "Call me Ishmael. Some years ago, I thought I would sail about a little and see the watery part of the world."
)
BROWN_TAGGED = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.\n\n\n"
    "\tIt/pps did/dod n't/* say/vb so/rb ,/, and/cc it/pps 's/bez over/rb ./.\n"
)
LEE_LINES = "A bushfire forced people from their homes today.\nThe Prime Minister said the economy is growing.\n"
WIKI_XML = (
    '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><page><title>Anarchism</title><revision>'
    "<text>'''Anarchism''' is a [[political philosophy|philosophy]] that rejects rulers.&lt;ref&gt;A cite&lt;/ref&gt; "
    "{{Infobox|a={{nested}}}} It has a long history in [[Europe]] and elsewhere, and many writers have described "
    "it at length in books, pamphlets and letters over several centuries of debate.\n"
    "==History==\nThe term first appeared in the seventeenth century during a civil war.</text></revision></page>"
    "<page><title>Redirect</title><revision><text>#REDIRECT [[Anarchism]]</text></revision></page></mediawiki>"
)
FORTUNES = b"A bachelor is a man who never made the same mistake once.\n%\nHe who laughs last thinks slowest.\n%\n"


def write_fixture_sources(folder: Path) -> tuple[Source, ...]:
    """Write one small file per source, shaped like the real registry file; return matching pins."""
    folder.mkdir(parents=True, exist_ok=True)
    by_name = {s.name: s for s in SOURCES}
    files = {
        "sotu": by_name["sotu"].filename,
        "moby_dick": by_name["moby_dick"].filename,
        "brown": by_name["brown"].filename,
        "gensim": by_name["gensim"].filename,
        "fortunes": by_name["fortunes"].filename,
    }
    _tgz(
        folder / files["sotu"],
        {
            "package/package.json": b"{}",
            **{
                f"package/data/{1790 + i}_george_washington_n.json": json.dumps(
                    {"year": 1790 + i, "text": f"{SOTU_TEXT} Address number {i}."}
                ).encode()
                for i in range(6)
            },
        },
    )
    _tgz(
        folder / files["moby_dick"],
        {
            **{
                f"package/data/chapter_{i}.json": json.dumps(
                    {"chapter": str(i), "title": f"Chapter {i}.", "text": MOBY_TEXT}
                ).encode()
                for i in range(1, 6)
            },
            "package/data/data.json": b"[]",
        },
    )
    _tgz(
        folder / files["brown"],
        {
            "package/package.json": b"{}",
            "package/README": b"readme",
            **{f"package/c{c}0{i}": BROWN_TAGGED.encode() for c in "ab" for i in range(1, 4)},
        },
    )
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("gensim/test/test_data/lee_background.cor", LEE_LINES)
        zf.writestr("gensim/test/test_data/lee.cor", LEE_LINES)
        zf.writestr(
            "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
            bz2.compress(WIKI_XML.encode()),
        )
        zf.writestr("gensim/__init__.py", "")
    (folder / files["gensim"]).write_bytes(wheel.getvalue())
    _deb(
        folder / files["fortunes"],
        {
            "./usr/share/games/fortunes/men-women": FORTUNES,
            "./usr/share/games/fortunes/men-women.dat": b"\x00\x01",
            "./usr/share/games/fortunes/art": b"  /\\_/\\ \n%\n",
            "./usr/share/doc/fortunes/copyright": b"BSD",
        },
    )
    return tuple(replace(by_name[n], sha256=sha256_file(folder / f)) for n, f in files.items())


@pytest.fixture(scope="session")
def micro_data_dir(tmp_path_factory) -> Path:
    """A data directory holding a corpus built from the fixture sources, with a 400-entry tokenizer."""
    from decomposer.data import build_corpus

    root = tmp_path_factory.mktemp("data")
    sources = write_fixture_sources(root / "sources")
    build_corpus(root, sources=sources, vocab_size=400, heldout_fraction=0.2, supplement_fraction=0.5, seed=0)
    return root


def tiny_llama(*, vocab: int = 40, hidden: int = 16, intermediate: int = 32, context: int = 32):
    """A 2-block random Llama with eager attention (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg)


def float64_decomposition(target, modules: list[dict], *, seed: int = 0):
    """A `Decomposition` of `target` built directly in float64 with a per-matrix MLP CI function.

    `Decomposition.create` would copy the weights to float32 and round W, which float64 tests must avoid.
    """
    from decomposer.vpd.ci import build_ci_function
    from decomposer.vpd.components import ComponentModel
    from decomposer.vpd.config import DecomposeConfig
    from decomposer.vpd.run import Decomposition

    config = DecomposeConfig.model_validate({"modules": modules, "ci": {"kind": "mlp", "hidden": 4}})
    gen = torch.Generator().manual_seed(seed)
    model = ComponentModel(target.double().eval(), config.modules, generator=gen, dtype=torch.float64)
    dims = {p: (model.components(p).d_in, model.components(p).C) for p in model.module_paths}
    return Decomposition(config, model, build_ci_function(config.ci, dims, generator=gen).double())


def micro_config(data_dir, **train):
    """A target config for a 2-block model on the micro corpus, a few steps long; `train` overrides settings."""
    from decomposer.target import TargetConfig

    return TargetConfig.model_validate(
        {
            "data_dir": str(data_dir),
            "model": {"vocab_size": 400, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_mlp": 64, "max_seq_len": 64},
            "train": {
                "seq_len": 16,
                "batch_size": 4,
                "steps": 8,
                "eval_every": 4,
                "checkpoint_every": 4,
                "eval_batches": 1,
                "warmup_steps": 2,
                "lr": 1e-2,
                **train,
            },
        }
    )


class Toy(torch.nn.Module):
    """Two linear maps, 6 → 3 → 6: the smallest target with two decomposed matrices."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(6, 3, bias=False)
        self.dec = torch.nn.Linear(3, 6)

    def forward(self, x):
        return torch.relu(self.dec(self.enc(x)))


def toy_batches(step: int) -> torch.Tensor:
    """Sparse non-negative inputs for `Toy`, one fixed batch per step."""
    gen = torch.Generator().manual_seed(step)
    return torch.rand(16, 6, generator=gen) * (torch.rand(16, 6, generator=gen) < 0.3)


def toy_config(**optim):
    from decomposer.vpd.config import DecomposeConfig

    return DecomposeConfig.model_validate(
        {
            "target": "toy",
            "modules": [{"pattern": "enc", "C": 4}, {"pattern": "dec", "C": 5}],
            "ci": {"kind": "mlp", "hidden": 4},
            "loss": {"output_loss": "mse", "faithfulness": 1.0, "importance": 1e-2, "p_end": 0.5},
            "adversary": {"kind": "ppgd", "warmup_frac": 0.2},
            "optim": {"steps": 8, "batch_size": 16, "lr": 1e-2, "faithfulness_warmup_steps": 3, **optim},
            "eval": {"every": 4, "pgd_steps": [2]},
            "checkpoint_every": 4,
        }
    )


def toy_target() -> Toy:
    torch.manual_seed(0)
    return Toy()


ROPE_VOCAB = 40
# Plain RoPE with multi-head attention; and GQA (4 query heads on 2 kv heads) with q/k biases and YaRN,
# whose cos/sin carry a scaling factor ≠ 1.
ROPE_CONFIGS = {
    "mha": {"num_attention_heads": 2, "num_key_value_heads": 2},
    "gqa": {
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "attention_bias": True,
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": 2.0,
            "rope_theta": 100.0,
            "original_max_position_embeddings": 16,
        },
    },
}


def rope_llama(name: str, **extra):
    """A 2-block random Llama with weights large enough that scores are O(1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=ROPE_VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        initializer_range=0.3,
        **{"attn_implementation": "eager", **ROPE_CONFIGS[name], **extra},
    )
    return LlamaForCausalLM(cfg)


def rope_decomposition(name: str, **extra):
    """`rope_llama(name)` in float64 with every attention matrix decomposed (C = 8)."""
    torch.manual_seed(0)
    return float64_decomposition(rope_llama(name, **extra), [{"pattern": "model.layers.*.self_attn.*_proj", "C": 8}])


# The word-level prompts of the study tests, shared with the distributed study test.
STUDY_WORDS = ["<eos>", "the", "princess", "prince", "lost", "her", "his", "crown", "king", "said", "that", "NA"]
STUDY_VOCAB = 40
STUDY_MODULES = [
    {"pattern": "model.layers.*.self_attn.*_proj", "C": 4},
    {"pattern": "model.layers.*.mlp.*_proj", "C": 4},
]
# Few optimisation steps and PGD steps keep each study graph under a second.
STUDY_FAST = {"settings": GraphSettings(steps=3, n_samples=64, pgd_steps=1, restarts=1), "progress": False}


# Hand-built graph nodes in the `attrgraph.export` convention, for the render and pyvis tests.
def graph_node(tokens: list[str], kind: str, pos: int, row: int, label: str, **extra) -> dict:
    """The attributes of one node at position `pos` of `tokens`; `extra` overrides any of them."""
    base = {"module": None, "block": None, "sublayer": None, "index": None, "ci": 1.0, "activation": 1.0}
    return {**base, "kind": kind, "pos": pos, "row": row, "label": label, "token": tokens[pos], **extra}


def graph_comp(
    tokens: list[str], module: str, short: str, c: int, t: int, row: int, ci: float, label: str, **extra
) -> tuple[str, dict]:
    """(node id, attributes) of subcomponent `c` of block 0's `module` at position `t`, influence 0.1 · ci;
    `extra` goes to `graph_node`."""
    attrs = graph_node(tokens, "comp", t, row, label, module=module, block=0, sublayer=short, index=c, **extra)
    return f"comp/{module}/{c}@{t}", {**attrs, "ci": ci, "influence": 0.1 * ci}


def word_tokenizer():
    """A word-level tokenizer over `STUDY_WORDS` (unknown words map to id 0), padded to the model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(STUDY_WORDS + [f"w{i}" for i in range(len(STUDY_WORDS), STUDY_VOCAB)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<eos>", pad_token="<eos>")


# The check of every edge test: an edge equals the finite-difference effect of the intervention it predicts.
def finite_difference_edge(d, tokens: torch.Tensor, att, tgt: int, src: int, eps: float = 1e-6) -> float:
    """Central difference of the target under ±ε on the source leaf, every other leaf held at its clean value.

    `replace` takes each module's full a = xV (alive entries become leaves, dead ones constants), so nudging
    one entry of the clean a moves exactly the source leaf.
    """
    from attrgraph.leaves import direct_effect_leaves

    with torch.no_grad(), direct_effect_leaves(d.model) as rec:
        d.model.target(tokens)
    clean = {p: (rec.acts[p].detach(), rec.delta_leaves[p].detach()) for p in d.module_paths}
    clean_emb = rec.emb.detach()
    s, t = att.nodes[src], att.nodes[tgt]

    def run(sign: float) -> float:
        replace, emb = dict(clean), clean_emb
        if s.kind == "comp":
            a = clean[s.module][0].clone()
            a[0, s.pos, s.index] += sign * eps
            replace[s.module] = (a, clean[s.module][1])
        elif s.kind == "delta":  # shift along δ itself: the derivative is Σ_j ∂/∂δ_j · δ_j
            delta = clean[s.module][1].clone()
            delta[0, s.pos] *= 1 + sign * eps
            replace[s.module] = (clean[s.module][0], delta)
        else:
            emb = clean_emb.clone()
            emb[0, s.pos] *= 1 + sign * eps
        with torch.no_grad(), direct_effect_leaves(d.model, replace=replace, replace_emb=emb) as rec:
            logits = d.model.target(tokens).logits
        if t.kind == "logit":
            return float(logits[0, t.pos, t.index])
        return float(rec.acts[t.module][0, t.pos, t.index])

    slope = (run(1.0) - run(-1.0)) / (2 * eps)
    return slope * float(att.activation[src] * att.ci[src]) if s.kind == "comp" else slope


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`vpd demo --json` run once per session: (its printed summary, its output folder)."""
    import contextlib
    import io
    import json

    from circuits.cli import main

    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--json", "--out", str(out)]) == 0
    return json.loads(printed.getvalue()), out


# --- shared by the per-family tests and the real-scale ones --------------------------------------------


@contextmanager
def float64_throughout() -> Iterator[None]:
    """Turn the float32 casts inside HF norms and eager softmaxes into no-ops for float64 tensors."""
    to, float_, softmax = torch.Tensor.to, torch.Tensor.float, torch.nn.functional.softmax

    def keep_to(self: torch.Tensor, *args, **kwargs):
        if self.dtype == torch.float64:
            if args and args[0] is torch.float32:
                args = (torch.float64, *args[1:])
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        return to(self, *args, **kwargs)

    def keep_float(self: torch.Tensor, *args, **kwargs):
        return self if self.dtype == torch.float64 else float_(self, *args, **kwargs)

    def keep_softmax(x: torch.Tensor, *args, **kwargs):
        if x.dtype == torch.float64:
            kwargs.pop("dtype", None)
        return softmax(x, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "to", keep_to)
        mp.setattr(torch.Tensor, "float", keep_float)
        mp.setattr(torch.nn.functional, "softmax", keep_softmax)
        yield


def _role(n: NodeId) -> tuple[int, str]:
    block, _, role = module_short_name(n.module)
    return block, role


Pick = Callable[[NodeId, NodeId], bool]
KEY = {"q", "k", "qkv"}
EDGE_KINDS: dict[str, Pick] = {
    "emb → comp": lambda s, t: s.kind == "emb" and t.kind == "comp",
    "comp → comp, next block": lambda s, t: s.kind == t.kind == "comp" and _role(t)[0] == _role(s)[0] + 1,
    "k → o across positions": lambda s, t: (
        s.kind == t.kind == "comp" and _role(t) == (_role(s)[0], "o") and _role(s)[1] in KEY - {"q"} and s.pos < t.pos
    ),
    "v → o across positions": lambda s, t: (
        s.kind == t.kind == "comp" and _role(t) == (_role(s)[0], "o") and _role(s)[1] in {"v", "qkv"} and s.pos < t.pos
    ),
    "q → o": lambda s, t: (
        s.kind == t.kind == "comp" and _role(t) == (_role(s)[0], "o") and _role(s)[1] in {"q", "qkv"} and s.pos == t.pos
    ),
    "MLP in → out": lambda s, t: s.kind == t.kind == "comp" and _role(s)[1] in {"up", "gate", "gate_up"},
    "delta → comp": lambda s, t: s.kind == "delta" and t.kind == "comp",
    "comp → logit": lambda s, t: s.kind == "comp" and t.kind == "logit",
    "delta → logit": lambda s, t: s.kind == "delta" and t.kind == "logit",
    "emb → logit": lambda s, t: s.kind == "emb" and t.kind == "logit",
}
