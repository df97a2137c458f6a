"""Traced layer pairs (docs/attribution-graphs.md §2.3) on a 2-block tiny Llama."""

from __future__ import annotations

import pytest
import torch

from attrgraph.reference import trace_layer_pairs
from tests.conftest import float64_decomposition, tiny_llama

MODULES = [
    {"pattern": "model.layers.*.self_attn.*_proj", "C": 3},
    {"pattern": "model.layers.*.mlp.*_proj", "C": 3},
]


def _p(b: int, name: str) -> str:
    sub = "mlp" if name in ("gate", "up", "down") else "self_attn"
    return f"model.layers.{b}.{sub}.{name}_proj"


def _d(b: int, name: str) -> str:
    return f"delta/{_p(b, name)}"


# §2.3 adapted to SwiGLU: gate and up both play the "up" role.
EXPECTED: dict[str, set[str]] = {
    # block 0
    _p(0, "q"): {"emb"},
    _p(0, "k"): {"emb"},
    _p(0, "v"): {"emb"},
    _p(0, "o"): {_p(0, "q"), _p(0, "k"), _p(0, "v"), _d(0, "q"), _d(0, "k"), _d(0, "v")},
    _p(0, "gate"): {"emb", _p(0, "o"), _d(0, "o")},
    _p(0, "up"): {"emb", _p(0, "o"), _d(0, "o")},
    _p(0, "down"): {_p(0, "gate"), _p(0, "up"), _d(0, "gate"), _d(0, "up")},
    # block 1
    _p(1, "q"): {"emb", _p(0, "o"), _p(0, "down"), _d(0, "o"), _d(0, "down")},
    _p(1, "k"): {"emb", _p(0, "o"), _p(0, "down"), _d(0, "o"), _d(0, "down")},
    _p(1, "v"): {"emb", _p(0, "o"), _p(0, "down"), _d(0, "o"), _d(0, "down")},
    _p(1, "o"): {_p(1, "q"), _p(1, "k"), _p(1, "v"), _d(1, "q"), _d(1, "k"), _d(1, "v")},
    _p(1, "gate"): {"emb", _p(0, "o"), _p(0, "down"), _p(1, "o"), _d(0, "o"), _d(0, "down"), _d(1, "o")},
    _p(1, "up"): {"emb", _p(0, "o"), _p(0, "down"), _p(1, "o"), _d(0, "o"), _d(0, "down"), _d(1, "o")},
    _p(1, "down"): {_p(1, "gate"), _p(1, "up"), _d(1, "gate"), _d(1, "up")},
    # read-out
    "logit": {
        "emb",
        _p(0, "o"),
        _p(0, "down"),
        _p(1, "o"),
        _p(1, "down"),
        _d(0, "o"),
        _d(0, "down"),
        _d(1, "o"),
        _d(1, "down"),
    },
}


@pytest.fixture(scope="module")
def pairs() -> dict[str, set[str]]:
    torch.manual_seed(0)
    d = float64_decomposition(tiny_llama(vocab=16, hidden=8, intermediate=16, context=8), MODULES)
    assert sorted(d.module_paths) == sorted(k for k in EXPECTED if k != "logit")
    return trace_layer_pairs(d)


def test_pairs_match_table(pairs: dict[str, set[str]]) -> None:
    assert pairs == EXPECTED


def test_no_q_to_up_and_no_emb_to_o(pairs: dict[str, set[str]]) -> None:
    for b in range(2):
        for mlp_in in ("gate", "up"):
            assert _p(b, "q") not in pairs[_p(b, mlp_in)]
            assert _d(b, "q") not in pairs[_p(b, mlp_in)]
        assert "emb" not in pairs[_p(b, "o")]
