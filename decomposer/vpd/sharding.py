"""U, V and the CI network sharded across ranks with FSDP2 (`fully_shard`), and their sharded checkpoint.

Every rank still processes its own slice of the batch (data parallelism); what changes is that each rank
holds only 1/world of every V, U and CI parameter and of their AdamW state. Each `LinearComponents` is one
FSDP unit, all-gathered when it runs and resharded after; the CI network is one unit per child module
(each block and projection of the global transformer, each per-matrix MLP). `component_acts`, `delta` and
`weight_hat` are registered as forward methods, so they gather V and U like the masked forward does.
Gradients are reduce-scattered (averaged) by FSDP, so the explicit all-reduce of plain data parallelism is
not used. The frozen target is not sharded.

Sharded checkpoint (resumable only with the same number of ranks):

    runs/NAME/sharded/            written atomically as one directory
      sharded.json                format, format_version, world, step, config, target_weights_sha256
      rank<R>.safetensors         rank R's local shards of V, U, CI parameters and AdamW state,
                                  its PPGD sources and state, and its RNG state

The full `decomposition/` folder that every other command reads is written alongside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from decomposer.errors import ArtifactFormatError, VpdError
from decomposer.io import atomic_write_dir, atomic_write_json, resolve_atomic_dir
from decomposer.vpd.dtensors import is_dtensor, local_tensor
from decomposer.vpd.run import weights_sha256

FORMAT = "sharded_train_state"
FORMAT_VERSION = 1
SHARDED_DIR = "sharded"
META_FILE = "sharded.json"
STAGING_DIR = ".sharded.staging"


def shard_decomposition(d, mesh=None) -> None:
    """Shard every V, U and CI parameter of `d` over `mesh` (default: all ranks, 1-D), in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not (dist.is_available() and dist.is_initialized()):
        raise VpdError("`shard` needs a process group: launch with `torchrun --nproc-per-node N`, or drop `--shard`.")
    if mesh is None:
        mesh = init_device_mesh(d.model_device.type, (dist.get_world_size(),))
    for path in d.module_paths:
        comp = d.model.components(path)
        fully_shard(comp, mesh=mesh)
        for method in ("component_acts", "delta", "weight_hat"):
            register_fsdp_forward_method(comp, method)
    # The CI network is gathered one part at a time: each block of the global transformer, its in- and
    # out-projections (at Llama scale each is larger than a block), or each per-matrix MLP.
    for unit in _ci_units(d.ci_fn):
        fully_shard(unit, mesh=mesh)
    fully_shard(d.ci_fn, mesh=mesh)


def _ci_units(ci_fn: nn.Module) -> list[nn.Module]:
    units = []
    for child in ci_fn.children():
        parts = list(child.children()) if isinstance(child, nn.ModuleList | nn.ModuleDict) else [child]
        units.extend(p for p in parts if any(True for _ in p.parameters()))
    return units


def _parameters(d) -> dict[str, nn.Parameter]:
    out = {}
    for path in d.module_paths:
        comp = d.model.components(path)
        out[f"components.{path}.V"], out[f"components.{path}.U"] = comp.V, comp.U
    out.update({f"ci.{name}": p for name, p in d.ci_fn.named_parameters()})
    return out


def local_state(d, train_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """This rank's shards of the parameters plus `train_state` (optimizer, PPGD, RNG) as local tensors."""
    state = {name: local_tensor(p) for name, p in _parameters(d).items()}
    state.update({k: local_tensor(v) for k, v in train_state.items()})
    return state


def save_sharded_state(run_dir: str | Path, d, *, step: int, state: dict[str, Tensor]) -> None:
    """Write every rank's `state` into one atomic `sharded/` folder (a collective: every rank must call it)."""
    run_dir = Path(run_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    staging = run_dir / STAGING_DIR
    if rank == 0:
        staging.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    tmp = staging / f".rank{rank}.safetensors.tmp"
    save_file(state, tmp)
    os.replace(tmp, staging / f"rank{rank}.safetensors")
    dist.barrier()
    if rank == 0:

        def fill(folder: Path) -> None:
            for r in range(world):
                os.replace(staging / f"rank{r}.safetensors", folder / f"rank{r}.safetensors")
            meta = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "world": world,
                "step": step,
                "config": d.config.model_dump(mode="json"),
                "target_weights_sha256": weights_sha256(d.model),
            }
            atomic_write_json(folder / META_FILE, meta)

        atomic_write_dir(run_dir / SHARDED_DIR, fill)
        staging.rmdir()
    dist.barrier()


def read_sharded_state(run_dir: str | Path) -> tuple[dict, dict[str, Tensor]] | None:
    """(metadata, this rank's tensors) of a run's sharded checkpoint, or None if it has none.

    Raises:
        VpdError: The checkpoint was written by another number of ranks.
        ArtifactFormatError: It has another format or version.
    """
    folder = resolve_atomic_dir(Path(run_dir) / SHARDED_DIR)
    if folder is None:
        return None
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactFormatError(
            f"{folder / META_FILE} has format {meta.get('format')!r} version {meta.get('format_version')!r}, "
            f"but this release reads {FORMAT!r} version {FORMAT_VERSION}. Upgrade the package."
        )
    world = dist.get_world_size()
    if meta["world"] != world:
        raise VpdError(
            f"The sharded checkpoint in {run_dir} was written by {meta['world']} ranks, but {world} are running. "
            f"Resume with `torchrun --nproc-per-node {meta['world']}` (nodes × processes = {meta['world']})."
        )
    return meta, load_file(folder / f"rank{dist.get_rank()}.safetensors")


def load_local_parameters(d, state: dict[str, Tensor]) -> None:
    """Copy this rank's saved shards into the sharded parameters of `d`."""
    with torch.no_grad():
        for name, p in _parameters(d).items():
            (p.to_local() if is_dtensor(p) else p).copy_(state[name])


def optimizer_state_as_params(opt: torch.optim.Optimizer, flat: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Saved local optimizer tensors turned back into tensors shaped like their (sharded) parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for group in opt.param_groups for p in group["params"]]
    out = {}
    for name, value in flat.items():
        if not name.startswith(prefix):
            continue
        idx, _ = name[len(prefix) :].split(".", 1)
        p = params[int(idx)]
        if is_dtensor(p) and value.ndim > 0:
            value = DTensor.from_local(
                value.to(p.device), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
        out[name] = value
    return out
