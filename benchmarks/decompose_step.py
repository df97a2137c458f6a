"""VPD training-step speed: the package's step against the same step run plainly, in one process.

    python benchmarks/decompose_step.py [--shape bundled|paper|both] [--steps 6] [--batch-size B] [--seq-len T]

"ours" is `Trainer.step` as shipped. "eager" is the same step with the three shortcuts it takes written
back out as docs/method.md states them plainly:
- each masked module computes a·m·U + δ·x(W − (VU)ᵀ)ᵀ, forming Δ and multiplying by it in every masked
  forward (stochastic, each PPGD ascent, adversarial) while the hooked module's own x Wᵀ goes unused;
  ours computes a·(m − δ)·U + δ·xWᵀ, so Δ is formed once per step (for L_Δ);
- the adversarial pass routes every position through a `where` against all-true routing masks; ours
  passes no routing there;
- PPGD's ∂L_adv/∂s comes from its own `autograd.grad` pass before the main backward; ours reads it from
  the sources' `.grad` after the one backward.
Both variants run interleaved (eager, ours, eager, ours, ...) after warm-up steps, so machine noise
hits both; the script prints median step time, tokens/s and the ratio.

Shapes: `bundled` is the bundled target with `configs/bundled-decomposition.yaml` (its C per
matrix and CI transformer); `paper` is a random-weight 4-layer Llama with d_model 768 and MLP 3072
with the paper's C per matrix and global CI transformer (docs/method.md §3). On CUDA it also prints model
FLOPs utilisation: FLOPs of one step counted by `torch.utils.flop_counter` over the median step
time, against a measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from decomposer.target.loading import load_target
from decomposer.vpd import step as step_module
from decomposer.vpd.components import LinearComponents
from decomposer.vpd.config import DecomposeConfig, load_decompose_config, paper_preset, paper_target
from decomposer.vpd.run import Decomposition
from decomposer.vpd.step import Trainer
from decomposer.vpd.step import routing_masks as _routing_masks

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _bundled(args: argparse.Namespace) -> tuple[torch.nn.Module, DecomposeConfig, int]:
    target, _ = load_target("bundled")
    cfg = load_decompose_config(ROOT / "configs" / "bundled-decomposition.yaml")
    return target, cfg, target.config.vocab_size


def _paper(args: argparse.Namespace) -> tuple[torch.nn.Module, DecomposeConfig, int]:
    target = paper_target()
    return target, DecomposeConfig.model_validate(paper_preset()), target.config.vocab_size


def _time_steps(trainer: Trainer, batches: list[torch.Tensor], device: torch.device, first_step: int) -> list[float]:
    times = []
    for i, batch in enumerate(batches):
        _sync(device)
        start = time.perf_counter()
        trainer.step(batch, first_step + i)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _bf16_peak(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _step_flops(trainer: Trainer, batch: torch.Tensor, step: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.step(batch, step)
    return float(counter.get_total_flops())


def run_shape(name: str, args: argparse.Namespace, device: torch.device) -> None:
    target, cfg, vocab = _bundled(args) if name == "bundled" else _paper(args)
    B = args.batch_size or (cfg.optim.batch_size if device.type == "cuda" else 4)
    T = args.seq_len or (cfg.optim.seq_len if device.type == "cuda" else 64)
    torch.manual_seed(0)
    d = Decomposition.create(cfg, target.to(device))
    d.model.to(device)
    d.ci_fn.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    trainer = Trainer(d, n_ref=B * T, generator=gen)
    batches = [torch.randint(0, vocab, (B, T), device=device) for _ in range(args.warmup + args.steps)]

    variants = {"eager": _eager, "ours": _no_patch}
    times: dict[str, list[float]] = {k: [] for k in variants}
    step = 0
    for patch in variants.values():  # warm-up: allocator, autotuning, first-call costs
        with patch():
            _time_steps(trainer, batches[: args.warmup], device, step)
            step += args.warmup
    for i in range(args.steps):
        for variant, patch in variants.items():
            with patch():
                times[variant] += _time_steps(trainer, batches[args.warmup + i : args.warmup + i + 1], device, step)
            step += 1

    tokens = B * T
    total_c = sum(d.Cs.values())
    print(f"\n{name}: {len(d.module_paths)} matrices, total C {total_c:,}, batch {B} x {T} = {tokens:,} tokens")
    med = {k: statistics.median(v) for k, v in times.items()}
    for variant, t in med.items():
        n = len(times[variant])
        print(f"  {variant:5s}  median step {t * 1e3:9.1f} ms   {tokens / t:11,.0f} tokens/s   ({n} steps)")
    print(f"  ratio eager/ours: {med['eager'] / med['ours']:.2f}x")
    if device.type == "cuda":
        flops = _step_flops(trainer, batches[0], step)
        peak = _bf16_peak(device)
        print(f"  step FLOPs {flops / 1e12:.2f} T; measured bf16 peak {peak / 1e12:.0f} TFLOP/s")
        print(f"  MFU ours {flops / med['ours'] / peak:.1%}, eager {flops / med['eager'] / peak:.1%}")


def _plain_forward(self, x, mask=None, delta_mask=None, routing=None, *, target_out=None):
    """docs/method.md §4 written out directly: form Δ and multiply by it in every forward."""
    a = self.component_acts(x)
    if mask is not None:
        a = a * mask
    out = a @ self.U
    if delta_mask is not None:
        out = out + delta_mask[..., None] * F.linear(x, self.weight - (self.V @ self.U).T)
    if self.bias is not None:
        out = out + self.bias
    if routing is not None:
        out = torch.where(
            routing[..., None], out, target_out if target_out is not None else F.linear(x, self.weight, self.bias)
        )
    return out


def _plain_routing(d, kind, leading, generator):
    """Routing masks as tensors even when every position is routed."""
    if kind != "all":
        return _routing_masks(d, kind, leading, generator)
    return {p: torch.ones(leading, dtype=torch.bool, device=d.model_device) for p in d.module_paths}


def _plain_backward(self, total, l_adv):
    """∂L_adv/∂s by its own autograd pass, then the main backward."""
    grads = None
    if self.ppgd is not None and self.d.config.loss.adversarial > 0:
        grads = list(torch.autograd.grad(l_adv, self.ppgd.source_list(), retain_graph=True))
    total.backward()
    return grads


@contextlib.contextmanager
def _eager():
    with (
        mock.patch.object(LinearComponents, "forward", _plain_forward),
        mock.patch.object(step_module, "routing_masks", _plain_routing),
        mock.patch.object(Trainer, "_backward", _plain_backward),
    ):
        yield


def _no_patch():
    return contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("bundled", "paper", "both"), default=None)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's on CUDA, 4 on CPU")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the config's on CUDA, 64 on CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = args.shape or ("both" if device.type == "cuda" else "bundled")
    print(f"torch {torch.__version__}, {device.type}, {torch.get_num_threads()} threads")
    for name in ("bundled", "paper") if shape == "both" else (shape,):
        run_shape(name, args, device)


if __name__ == "__main__":
    main()
