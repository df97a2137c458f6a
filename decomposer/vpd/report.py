"""`vpd eval`: evaluate a run folder on held-out data, save eval.json, and format the table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from decomposer.errors import VpdError
from decomposer.io import atomic_write_json
from decomposer.vpd.evaluate import MODES, evaluate
from decomposer.vpd.run import EVAL_FILE, load_decomposition, read_metadata


def resolve_run(run: str | Path) -> Path:
    """`bundled` → the decomposition shipped with the package; otherwise the folder itself."""
    if str(run) == "bundled":
        from decomposer.vpd.bundle import bundled_run_path

        path = bundled_run_path()
        if not path.exists():
            raise VpdError("This installation ships no bundled decomposition yet. Pass `--run` with a run folder.")
        return path
    return Path(run)


FINAL_PGD_STEPS = (20, 40, 80)  # docs/method.md's PGD probe; a config may add counts for its in-training evaluations


def evaluate_run(run: str | Path, *, n_batches: int | None = None, pgd_steps: Sequence[int] | None = None) -> dict:
    """Evaluate a saved run against its target on held-out batches; writes `<run>/eval.json` when writable.

    Args:
        run: A run folder, or `bundled`.
        n_batches: Held-out batches; default the config's `eval.batches`.
        pgd_steps: PGD step counts; default 20, 40 and 80 together with the config's `eval.pgd_steps`.

    Raises:
        VpdError: A count below its minimum, or a run that cannot be loaded.
    """
    from decomposer.target.loading import load_target
    from decomposer.vpd.batches import run_eval_batches

    run_dir = resolve_run(run)
    _, meta = read_metadata(run_dir)
    target, tokenizer = load_target(meta["target"]["name"])
    d, meta, _ = load_decomposition(run_dir, target)
    cfg = d.config
    if n_batches is not None and n_batches < 1:
        raise VpdError(f"`--batches` must be at least 1; got {n_batches}.")
    if pgd_steps is not None and (not pgd_steps or min(pgd_steps) < 0):
        raise VpdError(f"`--pgd-steps` must be step counts ≥ 0, e.g. `--pgd-steps 20 40 80`; got {list(pgd_steps)}.")
    steps = sorted(set(pgd_steps) if pgd_steps is not None else {*FINAL_PGD_STEPS, *cfg.eval.pgd_steps})
    batches = run_eval_batches(cfg, tokenizer, n_batches)
    report = evaluate(d, batches, pgd_steps=steps, pgd_step_size=cfg.eval.pgd_step_size)
    report["run"] = str(run_dir)
    report["step"] = meta["step"]
    if str(run) != "bundled":  # the shipped eval.json is the one recorded when the run was bundled
        try:
            atomic_write_json(run_dir / EVAL_FILE, report)
        except OSError:
            pass  # a read-only run folder still prints its evaluation
    return report


def format_eval(report: dict) -> str:
    """The evaluation as a text table: CE and KL per mode with Δ excluded and included, then PGD and sparsity."""
    lines = [f"{report['run']} at step {report['step']}, {report['tokens']:,} held-out positions"]
    if report.get("target_ce") is not None:
        lines.append(f"target CE {report['target_ce']:.4f}")
    header = f"{'mode':<14}{'CE (no Δ)':>11}{'ΔCE':>9}{'KL (no Δ)':>11}{'CE (Δ)':>10}{'KL (Δ)':>10}"
    lines += [header, "-" * len(header)]
    for mode in MODES:
        if mode not in report["modes"]:
            continue
        no_d, with_d = report["modes"][mode]["no_delta"], report["modes"][mode]["with_delta"]
        ce = f"{no_d['ce']:>11.4f}{no_d['ce_difference']:>+9.4f}" if "ce" in no_d else f"{'-':>11}{'-':>9}"
        ce_d = f"{with_d['ce']:>10.4f}" if "ce" in with_d else f"{'-':>10}"
        lines.append(f"{mode:<14}{ce}{no_d['kl']:>11.4f}{ce_d}{with_d['kl']:>10.4f}")
    lines.append(f"stochastic-subset KL (uniform-k, Δ sampled) {report['stochastic_subset_kl']:.4f}")
    pgd = ", ".join(f"{n} steps {v:.4f}" for n, v in report["pgd"].items())
    if pgd:
        lines.append(f"fresh shared-source PGD KL (step {report['pgd_step_size']}, Δ included): {pgd}")
    lines.append(
        f"L0 total {report['l0_total']:.2f}; alive {report['alive_total']:,} of C {report['C_total']:,} "
        f"(L0 = {100 * report['l0_total'] / report['C_total']:.2f}% of C)"
    )
    width = max(len(p) for p in report["l0"])
    lines.append(f"{'matrix':<{width}}  {'C':>6}  {'alive':>6}  {'L0':>8}")
    for p in report["l0"]:
        lines.append(f"{p:<{width}}  {report['C'][p]:>6}  {report['alive'][p]:>6}  {report['l0'][p]:>8.3f}")
    return "\n".join(lines)
