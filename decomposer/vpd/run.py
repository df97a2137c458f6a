"""A decomposition and its run folder: components, CI function, config, and the training state.

runs/NAME/
  decomposition/                 written atomically as one directory
    decomposition.safetensors    components.<path>.V / .U and ci.<param>, fp32
    decomposition.json           format, format_version, target identity and weight hash,
                                 modules {path: {d_in, d_out, C}}, ci_input_order, config, step,
                                 files {name: sha256} of the two safetensors files, checked at load
    train_state.safetensors      optimizer, PPGD sources and Adam state, RNG state
  metrics.jsonl                  one line per logged step
  plots/*.png                    loss curves, L0 per matrix, mean-CI spectra
  eval.json                      the last `vpd eval`
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from decomposer.errors import ArtifactFormatError, VpdError
from decomposer.integrity import check_sha256, load_safetensors, record_sha256
from decomposer.io import atomic_write_dir, atomic_write_json, resolve_atomic_dir
from decomposer.vpd.ci import build_ci_function, causal_importance
from decomposer.vpd.components import ComponentModel
from decomposer.vpd.config import DecomposeConfig
from decomposer.vpd.dtensors import full_tensor, is_dtensor, load_full_into
from decomposer.vpd.targets import ci_hidden_widths

FORMAT = "decomposition"
FORMAT_VERSION = 1
STATE_DIR = "decomposition"
WEIGHTS_FILE = "decomposition.safetensors"
META_FILE = "decomposition.json"
TRAIN_STATE_FILE = "train_state.safetensors"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
PLOTS_DIR = "plots"
DAMAGED_FIX = "copy the run folder again from where it was written, or train it again with `vpd decompose`"


def weights_sha256(model: ComponentModel) -> str:
    """Hash of the decomposed target weights (and biases), in module order: the target's identity."""
    digest = hashlib.sha256()
    for path in model.module_paths:
        comp = model.components(path)
        for t in (comp.weight, comp.bias):
            if t is not None:
                digest.update(path.encode())
                digest.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Decomposition:
    """A target with V, U per decomposed matrix and the CI function that gates them."""

    config: DecomposeConfig
    model: ComponentModel
    ci_fn: nn.Module

    @classmethod
    def create(cls, config: DecomposeConfig, target: nn.Module, *, seed: int | None = None) -> Decomposition:
        generator = torch.Generator().manual_seed(config.optim.seed if seed is None else seed)
        model = ComponentModel(target, config.modules, generator=generator, dtype=torch.float32)
        dims = {p: (model.components(p).d_in, model.components(p).C) for p in model.module_paths}
        widths = ci_hidden_widths(model.module_paths, config.modules)
        ci_fn = build_ci_function(config.ci, dims, generator=generator, hidden=widths)
        return cls(config, model, ci_fn)

    @property
    def model_device(self) -> torch.device:
        return self.model.components(self.module_paths[0]).V.device

    @property
    def module_paths(self) -> list[str]:
        return self.model.module_paths

    @property
    def Cs(self) -> dict[str, int]:
        return {p: self.model.components(p).C for p in self.module_paths}

    def causal_importance(self, xs: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(g, g_up) from the clean module inputs `xs`: g gates masks, g_up feeds minimality."""
        acts = {p: self.model.components(p).component_acts(x) for p, x in xs.items()}
        return causal_importance(self.ci_fn, xs, acts, sigmoid=self.config.ci.sigmoid, alpha=self.config.ci.alpha)

    @torch.no_grad()
    def network_ci(self, inputs: Tensor) -> dict[str, Tensor]:
        """g of the CI network on `inputs` (token ids, or a batch for a plain module): one clean forward that
        records each matrix's input, then the CI function. Path → (..., C), no gradient."""
        _, xs = self.model.forward_with_inputs(inputs.to(self.model_device))
        return self.causal_importance(xs)[0]

    def trainable_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(U and V parameters, CI-function parameters)."""
        uv = [t for p in self.module_paths for t in (self.model.components(p).V, self.model.components(p).U)]
        return uv, list(self.ci_fn.parameters())

    def tensors(self) -> dict[str, Tensor]:
        """Whole V, U and CI tensors; when sharded (sharding.py) this gathers them, so every rank must call it."""
        out = {}
        for p in self.module_paths:
            comp = self.model.components(p)
            out[f"components.{p}.V"] = full_tensor(comp.V).detach().contiguous()
            out[f"components.{p}.U"] = full_tensor(comp.U).detach().contiguous()
        for name, value in self.ci_fn.state_dict().items():
            out[f"ci.{name}"] = full_tensor(value).detach().contiguous()
        return out

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        if is_dtensor(self.model.components(self.module_paths[0]).V):
            for p in self.module_paths:
                comp = self.model.components(p)
                load_full_into(comp.V, tensors[f"components.{p}.V"])
                load_full_into(comp.U, tensors[f"components.{p}.U"])
            for name, value in self.ci_fn.named_parameters():
                load_full_into(value, tensors[f"ci.{name}"])
            return
        with torch.no_grad():
            for p in self.module_paths:
                comp = self.model.components(p)
                comp.V.copy_(tensors[f"components.{p}.V"])
                comp.U.copy_(tensors[f"components.{p}.U"])
        self.ci_fn.load_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("ci.")})

    def metadata(self, *, step: int, target_name: str) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "target": {
                "name": target_name,
                "class": type(self.model.target).__name__,
                "weights_sha256": weights_sha256(self.model),
            },
            "modules": {
                p: {"d_in": c.d_in, "d_out": c.d_out, "C": c.C}
                for p in self.module_paths
                for c in [self.model.components(p)]
            },
            "ci_input_order": list(self.module_paths),
            "config": self.config.model_dump(mode="json"),
            "step": step,
        }


def save_state(
    run_dir: str | Path,
    d: Decomposition,
    *,
    step: int,
    target_name: str,
    train_state: dict,
    tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Write the decomposition (`tensors`, by default `d.tensors()`) and `train_state` as one atomic directory."""
    tensors = d.tensors() if tensors is None else tensors

    def fill(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS_FILE)
        save_file({k: v.contiguous() for k, v in train_state.items()}, tmp / TRAIN_STATE_FILE)
        meta = d.metadata(step=step, target_name=target_name)
        meta["files"] = record_sha256(tmp, [WEIGHTS_FILE, TRAIN_STATE_FILE])
        atomic_write_json(tmp / META_FILE, meta)

    return atomic_write_dir(Path(run_dir) / STATE_DIR, fill)


def read_metadata(run_dir: str | Path) -> tuple[Path, dict]:
    """(state folder, metadata) of a run, with format and version checked before any tensor is read."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise VpdError(
            f"`--run` {str(run_dir)!r} does not exist. Pass a folder written by `vpd decompose`, or `bundled`."
        )
    state = resolve_atomic_dir(run_dir / STATE_DIR)
    if state is None or not (state / META_FILE).is_file():
        raise VpdError(f"`--run` {str(run_dir)!r} holds no decomposition. Pass a folder written by `vpd decompose`.")
    meta = json.loads((state / META_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactFormatError(
            f"{state / META_FILE} has format {meta.get('format')!r} version {meta.get('format_version')!r}, "
            f"but this release reads {FORMAT!r} version {FORMAT_VERSION}. Upgrade the package."
        )
    return state, meta


def load_decomposition(run_dir: str | Path, target: nn.Module) -> tuple[Decomposition, dict, dict[str, Tensor]]:
    """Rebuild a saved decomposition on `target`; returns it, its metadata and the train-state tensors.

    Raises:
        VpdError: The folder holds no decomposition, or `target` is not the model it was trained on.
        DamagedArtifactError: A file differs from the sha256 recorded when it was written, or is unreadable.
    """
    state, meta = read_metadata(run_dir)
    # Runs written before sha256s were recorded have no `files`; an unreadable file is still one sentence. The
    # training state may have been deleted (only `--resume` needs it).
    recorded = meta.get("files", {})
    check_sha256(
        state, {n: h for n, h in recorded.items() if (state / n).exists() or n != TRAIN_STATE_FILE}, fix=DAMAGED_FIX
    )
    config = DecomposeConfig.model_validate(meta["config"])
    d = Decomposition.create(config, target)
    found = weights_sha256(d.model)
    if found != meta["target"]["weights_sha256"]:
        raise VpdError(
            f"The run in {run_dir} decomposes {meta['target']['name']!r} (weights sha256 "
            f"{meta['target']['weights_sha256'][:12]}…), but the given target's weights hash to {found[:12]}…. "
            "Load it with the model it was trained on."
        )
    if list(d.module_paths) != meta["ci_input_order"]:
        raise VpdError(f"The run in {run_dir} was trained on modules {meta['ci_input_order']}, not {d.module_paths}.")
    d.load_tensors(load_safetensors(state / WEIGHTS_FILE, fix=DAMAGED_FIX))
    has_train_state = (state / TRAIN_STATE_FILE).exists()
    train_state = load_safetensors(state / TRAIN_STATE_FILE, fix=DAMAGED_FIX) if has_train_state else {}
    return d, meta, train_state
