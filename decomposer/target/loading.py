"""Resolve a target model by name: `bundled`, a local folder, or a hub id."""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from decomposer.errors import VpdError

logger = logging.getLogger(__name__)

BUNDLED = "bundled"
SMOLLM2 = "smollm2-135m"
NAMED = (BUNDLED, SMOLLM2)  # target names that are not paths or hub ids


def bundled_target_path() -> Path:
    """Folder of the target model shipped inside the package (`save_pretrained` layout)."""
    return Path(str(files("decomposer") / "assets" / "target"))


def resolve_target_path(name: str) -> str:
    """`bundled` → the shipped folder; `smollm2-135m` → its converted folder in the data directory (fetched
    and converted the first time, `decomposer.target.smollm2`); an existing folder → itself; anything else is
    a hub id.

    Raises:
        VpdError: `smollm2-135m` is not cached and cannot be fetched or converted.
    """
    if name == BUNDLED:
        return str(bundled_target_path())
    if name == SMOLLM2:
        from decomposer.target.smollm2 import smollm2_path

        return str(smollm2_path())
    return name


def load_target(name: str = BUNDLED) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode, on the CPU, in float32.

    Raises:
        VpdError: The name is neither a folder with a model nor a reachable hub id, or not a causal LM.
    """
    path = resolve_target_path(name)
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise VpdError(
            f"`--model` {name!r} is a folder without config.json. Pass a folder written by `save_pretrained`."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VpdError(
            f"`--model` {name!r} could not be loaded ({first}). Pass `bundled`, `smollm2-135m`, a local folder "
            f"written by `save_pretrained`, or a hub id that is reachable from this machine."
        ) from None
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        from decomposer.architectures import supported_families

        raise VpdError(
            f"`--model` {name!r} is not a decoder-only causal LM (transformers has no causal-LM class for its "
            f"config). Pass a model of a supported family: {supported_families()}."
        ) from None
    model.eval()
    return model, tokenizer
