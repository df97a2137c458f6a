"""`vpd demo`: the princess graph on the bundled model and decomposition, built both ways.

"The princess lost her crown." is read out after " lost", where the model must predict " her". The
CI of that prompt is re-fitted twice (attribution-graphs.md §4): with adversarial pruning (type 1,
λ 0.09) and CI-only (type 2, λ 1.0). Each result gets the faithfulness report of §5, its attribution
graph, influence pruning, labels, q/k pairs, and JSON / HTML / PNG files. The comparison is the
point: the CI-only graph keeps the label only under the one ablation pattern it was fitted to, and
the adversary breaks it.

The paper runs 2,000 optimisation steps at lr 1e-2; the demo runs 150 adversarial steps and 300
CI-only steps at a higher lr so that it finishes in about a minute on two CPU cores.
`vpd graph --optimize adversarial --steps 2000` runs the full schedule.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import networkx as nx

from decomposer.errors import VpdError

PROMPT = "The princess lost her crown."
TARGET = " her"
GRAPH_TYPES = {"adversarial": 0.09, "ci": 1.0}  # graph type → λ_min (paper values, §4)
DEFAULT_STEPS = {"adversarial": 150, "ci": 300}
# CI-only fitting is one forward per step; at lr 5e-2 its 300 steps reach what 1,000 steps at 1e-2 reach.
LR = {"adversarial": 1e-2, "ci": 5e-2}


def position_before(tokenizer, prompt: str, target: str) -> int:
    """The read-out position t* for `target` inside `prompt`: the token just before its first occurrence.

    Raises:
        VpdError: `target` is not one token, or it does not occur in `prompt` after the first token.
    """
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(target_ids) != 1:
        raise VpdError(f"`target` {target!r} is {len(target_ids)} tokens, not one. Pass a single token.")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if target_ids[0] not in ids[1:]:
        raise VpdError(f"`target` {target!r} does not occur in the prompt after its first token; pick another.")
    return ids.index(target_ids[0], 1) - 1


def _graph_for(d, tokenizer, ids, *, graph_type: str, steps: int, target_pos: int, label: int, labels: dict):
    """(full graph, pruned graph, report) for one pruning type."""
    from attrgraph.graph import build_graph
    from attrgraph.optimize import faithfulness, optimize_ci
    from attrgraph.prune import prune_graph
    from attrgraph.qk import add_qk_pairs

    result = optimize_ci(
        d, ids, target_pos=target_pos, target_token=label, mode=graph_type, steps=steps, lr=LR[graph_type],
        l_min=GRAPH_TYPES[graph_type], progress=True,
    )  # fmt: skip
    report = asdict(faithfulness(d, ids, result.g, target_pos=target_pos, target_token=label))
    prompt_ids = ids[:, : target_pos + 1]
    full = build_graph(
        d, tokenizer, PROMPT, target_token=TARGET, target_pos=target_pos, ci=result.g, labels=labels, report=report
    )
    full.graph["settings"].update(optimize=result.settings)
    pruned = add_qk_pairs(prune_graph(full), d, prompt_ids)
    return full, pruned, report


def run_demo(out: str | Path = "vpd-demo", *, run: str = "bundled", steps: dict[str, int] | None = None) -> dict:
    """Build, prune, label and render both princess graphs; returns the summary that `vpd demo` prints.

    Args:
        out: Folder for the graph files; created if missing.
        run: The decomposition (`bundled` or a run folder of the bundled target).
        steps: Graph type → per-prompt optimisation steps (default `DEFAULT_STEPS`).

    Returns:
        A JSON-serialisable dict: prompt, target, read-out position, and per graph type the four
        probabilities, the node count, graph and pruned-graph sizes and the written files.
    """
    from attrgraph.export import save_graph_json
    from attrgraph.graph import resolve_prompt
    from attrgraph.labels import labels_for_run
    from attrgraph.render import render_html, render_png
    from decomposer.vpd.load import load_run
    from decomposer.vpd.report import resolve_run

    start = time.perf_counter()
    steps = {**DEFAULT_STEPS, **(steps or {})}
    d, tokenizer, _ = load_run(run)
    labels = labels_for_run(resolve_run(run))
    target_pos = position_before(tokenizer, PROMPT, TARGET)
    ids, target_pos, label, _ = resolve_prompt(d, tokenizer, PROMPT, TARGET, target_pos)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    graphs: dict[str, tuple[nx.DiGraph, nx.DiGraph, dict]] = {}
    for graph_type in GRAPH_TYPES:
        graphs[graph_type] = _graph_for(
            d, tokenizer, ids, graph_type=graph_type, steps=steps[graph_type], target_pos=target_pos,
            label=label, labels=labels,
        )  # fmt: skip

    summary: dict = {"prompt": PROMPT, "target": TARGET, "target_pos": target_pos, "graphs": {}}
    for graph_type, (full, pruned, report) in graphs.items():
        # Each page also shows the other graph's numbers, so the comparison is one glance away.
        for other, (_, _, other_report) in graphs.items():
            if other != graph_type:
                for mode in ("ci", "stochastic", "adversarial"):
                    pruned.graph["report"][f"{other}-pruned graph: {mode}"] = other_report[mode]
        stem = f"princess.{graph_type}"
        title = f"{PROMPT!r} → {TARGET!r} after ' lost', {graph_type}-pruned"
        files = {
            "graph": save_graph_json(full, out / f"{stem}.json"),
            "pruned": save_graph_json(pruned, out / f"{stem}.pruned.json"),
            "html": render_html(pruned, out / f"{stem}.html", title=title),
            "png": render_png(pruned, out / f"{stem}.png"),
        }
        summary["graphs"][graph_type] = {
            "lambda_min": GRAPH_TYPES[graph_type],
            "steps": steps[graph_type],
            "lr": LR[graph_type],
            "p_target": report["target"],
            "p_ci": report["ci"],
            "p_stochastic": report["stochastic"],
            "p_adversarial": report["adversarial"],
            "ci_nodes": report["n_nodes"],
            "graph_nodes": full.number_of_nodes(),
            "graph_edges": full.number_of_edges(),
            "pruned_nodes": pruned.number_of_nodes(),
            "pruned_edges": pruned.number_of_edges(),
            "qk_pairs": len(pruned.graph.get("qk_pairs", [])),
            "files": {k: str(v) for k, v in files.items()},
        }
    adv, ci = summary["graphs"]["adversarial"]["p_adversarial"], summary["graphs"]["ci"]["p_adversarial"]
    # None when the CI-only graph's probability underflows to 0: no finite ratio to print.
    summary["adversarial_ratio"] = adv / ci if ci > 0 else None
    summary["seconds"] = time.perf_counter() - start
    return summary


def _probability(p: float) -> str:
    """Eight characters: fixed point, or scientific below 1e-3 so a collapsed graph does not print 0.0000."""
    return f"{p:8.4f}" if p >= 1e-3 or p == 0 else f"{p:8.1e}"


def format_summary(summary: dict) -> str:
    lines = [
        f"{summary['prompt']!r}: P({summary['target']!r}) after position {summary['target_pos']}",
        f"{'graph':<18} {'target':>7} {'CI':>7} {'stoch.':>7} {'advers.':>8} {'CI>0':>6} {'pruned':>15}",
    ]
    for name, g in summary["graphs"].items():
        lines.append(
            f"{name + '-pruned':<18} {g['p_target']:7.3f} {g['p_ci']:7.3f} {g['p_stochastic']:7.3f} "
            f"{_probability(g['p_adversarial'])} {g['ci_nodes']:6d} {g['pruned_nodes']:5d} n {g['pruned_edges']:5d} e"
        )
    ratio = summary["adversarial_ratio"]
    if ratio is None:
        lines.append(
            "Under adversarial masks the adversarially pruned graph keeps "
            f"{summary['graphs']['adversarial']['p_adversarial']:.3f}; the CI-only graph keeps nothing "
            "(its probability underflows to 0)."
        )
    else:
        lines.append(
            f"Under adversarial masks the adversarially pruned graph keeps {ratio:.3g}× the probability the "
            "CI-only graph keeps."
        )
    for name, g in summary["graphs"].items():
        lines.append(f"HTML ({name}): {g['files']['html']}")
    lines.append(f"{summary['seconds']:.1f} s")
    return "\n".join(lines)
