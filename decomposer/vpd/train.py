"""Train a VPD decomposition: `decompose(config, out)` (docs/method.md §4–§9, §11).

1. Load the target and build V, U per selected matrix and the CI function (same on every rank).
2. Seed the per-rank RNG (masks, routing, adversary) as seed·world + rank.
3. Unless resuming, run the faithfulness warm-up.
4. Each step takes the batch of that step (a pure function of the step), runs `Trainer.step`, logs
   the scalars to metrics.jsonl, evaluates every `eval.every` steps, and checkpoints atomically
   every `checkpoint_every` steps: U, V, CI parameters, optimizer, PPGD state and RNG state, so a
   resumed run ends bit-identical to an uninterrupted one.
5. At the end: the final checkpoint and PNG plots.

With `shard=True` (sharding.py) U, V, the CI network and their AdamW state are sharded across the ranks
with FSDP2, each checkpoint is also written per rank into `sharded/`, and a resume reads it back.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from decomposer.errors import VpdError
from decomposer.io import resolve_atomic_dir
from decomposer.optim_state import load_optimizer_tensors, optimizer_tensors
from decomposer.vpd.batches import BatchFn, lm_train_batches, run_eval_batches, train_tokens
from decomposer.vpd.config import DecomposeConfig
from decomposer.vpd.run import (
    METRICS_FILE,
    STATE_DIR,
    Decomposition,
    load_decomposition,
    save_state,
    weights_sha256,
)
from decomposer.vpd.sharding import (
    SHARDED_DIR,
    load_local_parameters,
    local_state,
    optimizer_state_as_params,
    read_sharded_state,
    save_sharded_state,
    shard_decomposition,
)
from decomposer.vpd.step import StepLog, Trainer, faithfulness_warmup

logger = logging.getLogger(__name__)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_mean(tensors: list[Tensor]) -> None:
    world = dist.get_world_size()
    for t in tensors:
        if t.grad is not None:
            dist.all_reduce(t.grad, op=dist.ReduceOp.SUM)
            t.grad /= world


def _reduce_mean(t: Tensor) -> Tensor:
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def _init_from(d: Decomposition, run: str, target: nn.Module) -> None:
    """Copy U, V and the CI parameters of a finished run into the fresh decomposition `d`."""
    from decomposer.vpd.report import resolve_run

    source, meta, _ = load_decomposition(resolve_run(run), target)
    if source.Cs != d.Cs:
        raise VpdError(
            f"`init_from` {run!r} decomposes {len(source.Cs)} matrices with other C than this config's modules. "
            "Give the new config the same `modules` as that run."
        )
    if source.config.ci != d.config.ci:
        raise VpdError(f"`init_from` {run!r} has another CI network. Copy its `ci` section into the new config.")
    d.load_tensors(source.tensors())
    logger.info("decompose: started from %s at its step %d", run, meta["step"])


def _train_state(trainer: Trainer) -> dict[str, Tensor]:
    state = optimizer_tensors(trainer.opt, prefix="optimizer.")
    if trainer.ppgd is not None and trainer.ppgd.leading_shape is not None:
        state.update({f"ppgd.{k}": v for k, v in trainer.ppgd.state_tensors().items()})
    state["rng"] = trainer.generator.get_state()
    return state


def _load_train_state(trainer: Trainer, state: dict[str, Tensor]) -> None:
    load_optimizer_tensors(trainer.opt, state, prefix="optimizer.")
    ppgd = {k[5:]: v for k, v in state.items() if k.startswith("ppgd.")}
    if trainer.ppgd is not None and ppgd:
        trainer.ppgd.load_state_tensors(ppgd, device=trainer.d.model_device)
    trainer.generator.set_state(state["rng"])


def _truncate_metrics(path: Path, after_step: int) -> None:
    """Drop metric lines past the checkpoint a run resumes from, so the file reads as one run."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < after_step]
        path.write_text("".join(ln + "\n" for ln in lines))


def _target_and_data(
    cfg: DecomposeConfig,
    target: nn.Module | None,
    batches: BatchFn | None,
    eval_batches: list[Tensor] | None,
    rank: int,
    world: int,
) -> tuple[nn.Module, BatchFn, list[Tensor] | None, int]:
    """(target, step → batch, held-out batches, n_ref): the configured target and corpus unless given."""
    if target is None:
        from decomposer.target.loading import load_target

        target, tokenizer = load_target(cfg.target)
        if batches is None:
            tokens = train_tokens(tokenizer, cfg.data_dir)
            batches = lm_train_batches(
                tokens,
                batch_size=cfg.optim.batch_size,
                seq_len=cfg.optim.seq_len,
                seed=cfg.optim.seed,
                rank=rank,
                world_size=world,
            )
        if eval_batches is None:
            eval_batches = run_eval_batches(cfg, tokenizer)
        n_ref = cfg.optim.batch_size * cfg.optim.seq_len
    else:
        if batches is None:
            raise VpdError("`batches` is required with a custom `target`: pass a function step → batch.")
        n_ref = cfg.optim.batch_size
    return target, batches, eval_batches, n_ref


def _starting_point(
    cfg: DecomposeConfig, out: Path, target: nn.Module, *, resume: bool, shard: bool
) -> tuple[Decomposition, dict, int]:
    """(decomposition, saved training state, first step): a checkpoint's when resuming, else a fresh one.

    Raises:
        VpdError: A resume without a checkpoint (or of the other kind), a checkpoint from another config or
            target, or a new run over an existing one.
    """
    existing = resolve_atomic_dir(out / STATE_DIR) or resolve_atomic_dir(out / SHARDED_DIR)
    if resume and shard:
        found = read_sharded_state(out)
        if found is None:
            raise VpdError(f"`--resume` was given but {out} has no sharded checkpoint. Drop `--resume` or `--shard`.")
        meta, state = found
        if meta["config"] != cfg.model_dump(mode="json"):
            raise VpdError(f"The checkpoint in {out} was written with a different config. Use a new `--out` folder.")
        d, start = Decomposition.create(cfg, target), meta["step"]
        if weights_sha256(d.model) != meta["target_weights_sha256"]:
            raise VpdError(f"The sharded checkpoint in {out} decomposes another target. Resume with the same model.")
    elif resume:
        if resolve_atomic_dir(out / SHARDED_DIR) is not None:
            raise VpdError(f"The run in {out} was trained sharded. Resume it with `--shard` and the same ranks.")
        if existing is None:
            raise VpdError(f"`--resume` was given but {out} has no checkpoint. Drop `--resume` to start a new run.")
        d, meta, state = load_decomposition(out, target)
        if meta["config"] != cfg.model_dump(mode="json"):
            raise VpdError(f"The checkpoint in {out} was written with a different config. Use a new `--out` folder.")
        start = meta["step"]
    else:
        if existing is not None:
            raise VpdError(
                f"{out} already holds a decomposition. Pass `--resume` to continue it, or choose a new `--out`."
            )
        d, state, start = Decomposition.create(cfg, target), {}, 0
        if cfg.init_from is not None:
            _init_from(d, cfg.init_from, target)
    return d, state, start


def decompose(
    config: DecomposeConfig,
    out: str | Path,
    *,
    target: nn.Module | None = None,
    batches: BatchFn | None = None,
    eval_batches: list[Tensor] | None = None,
    resume: bool = False,
    progress: bool = False,
    on_step: Callable[[StepLog], None] | None = None,
    device: str | torch.device | None = None,
    shard: bool = False,
) -> Decomposition:
    """Train a decomposition as configured and write it to the run folder `out`.

    Args:
        config: The run's settings.
        out: Run folder; created if missing.
        target: A plain torch module to decompose instead of loading `config.target` (toy models).
        batches: `step → batch` (the global batch of a step, or this rank's slice); required with `target`.
        eval_batches: Held-out batches for evaluation; by default the corpus's held-out windows.
        resume: Continue from the run folder's checkpoint.
        progress: Show tqdm bars.
        on_step: Called with every step's `StepLog`.
        device: Where to train; by default CUDA when available (this rank's device under DDP), else CPU.
        shard: Shard U, V, the CI network and their optimizer state across the ranks with FSDP2
            (sharding.py) instead of replicating them; checkpoints are then sharded too.

    Raises:
        VpdError: Inconsistent arguments, a run folder that already holds a run (without `resume`),
            or a checkpoint from another config or target.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    rank, world = _world()
    if shard and not (dist.is_available() and dist.is_initialized()):
        raise VpdError("`shard` needs a process group: launch with `torchrun --nproc-per-node N`, or drop `--shard`.")
    cfg = config
    if cfg.revive.every and (world > 1 or shard):
        raise VpdError(
            "`revive.every` revives subcomponents from each rank's own rows, which would split the replicas; "
            "set it to 0 or train on one process."
        )
    target, batches, eval_batches, n_ref = _target_and_data(cfg, target, batches, eval_batches, rank, world)
    target_name = cfg.target
    d, state, start = _starting_point(cfg, out, target, resume=resume, shard=shard)

    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    d.model.to(device)
    d.ci_fn.to(device)
    if not shard:  # sharded state is split over the ranks; the estimate is of one whole copy
        from decomposer.vpd.memory import check_training_memory

        check_training_memory(d, max(n_ref // world, 1), device=str(device))
    if shard:
        shard_decomposition(d)
        if resume:
            load_local_parameters(d, state)
    generator = torch.Generator().manual_seed(cfg.optim.seed * world + rank)
    distributed = world > 1
    trainer = Trainer(
        d,
        n_ref=n_ref,
        generator=generator,
        # FSDP reduce-scatters (averages) the gradients of sharded parameters itself.
        reduce_grads=_all_reduce_mean if distributed and not shard else None,
        reduce_source_grad=_reduce_mean if distributed else None,
        broadcast=(lambda t: dist.broadcast(t, src=0)) if distributed else None,
    )
    metrics_path = out / METRICS_FILE
    if resume:
        if shard:
            state = {**state, **optimizer_state_as_params(trainer.opt, state, "optimizer.")}
        _load_train_state(trainer, state)
        _truncate_metrics(metrics_path, start)
    else:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
        if cfg.optim.faithfulness_warmup_steps and cfg.init_from is None:
            loss = faithfulness_warmup(
                d, steps=cfg.optim.faithfulness_warmup_steps, lr=cfg.optim.faithfulness_warmup_lr, progress=progress
            )
            logger.info("decompose: faithfulness warm-up ended at L_Δ = %.3g", loss)

    from decomposer.vpd.evaluate import quick_eval

    began = time.perf_counter()
    bar = tqdm(
        range(start, cfg.optim.steps),
        desc="decompose",
        initial=start,
        total=cfg.optim.steps,
        disable=not progress or rank != 0,
    )
    for step in bar:
        log = trainer.step(batches(step).to(device), step)
        record = asdict(log)
        done = step + 1
        if eval_batches and (done % cfg.eval.every == 0 or done == cfg.optim.steps):
            record["eval"] = quick_eval(d, eval_batches)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix(stoch=f"{log.stochastic:.3f}", adv=f"{log.adversarial:.3f}", l0=f"{log.l0:.1f}")
        if on_step is not None:
            on_step(log)
        if done % cfg.checkpoint_every == 0 or done == cfg.optim.steps:
            if shard:
                save_sharded_state(out, d, step=done, state=local_state(d, _train_state(trainer)))
                tensors = d.tensors()  # gathered on every rank; rank 0 writes the whole decomposition
                if rank == 0:
                    save_state(out, d, step=done, target_name=target_name, train_state={}, tensors=tensors)
            elif rank == 0:
                save_state(out, d, step=done, target_name=target_name, train_state=_train_state(trainer))
            if distributed:
                dist.barrier()
    logger.info("decompose: %d steps in %.1f s", cfg.optim.steps - start, time.perf_counter() - began)
    if rank == 0:
        from decomposer.vpd.plots import plot_run

        # The CI spectrum runs the model, which a sharded run can only do on every rank at once.
        plot_run(out, d, None if shard else eval_batches)
    return d
