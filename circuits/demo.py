"""`vpd demo`: the princess graph on the bundled model and decomposition, built both ways.

"The princess lost her crown." is read out after " lost", where the model must predict " her". The
CI of that prompt is re-fitted twice (docs/attribution-graphs.md §4): with adversarial pruning (type 1,
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
from pathlib import Path

from attrgraph.settings import L_MIN
from decomposer.errors import VpdError

PROMPT = "The princess lost her crown."
TARGET = " her"
GRAPH_TYPES = {t: L_MIN[t] for t in ("adversarial", "ci")}  # graph type → λ_min (paper values, §4)
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


def _graph_for(d, tokenizer, *, graph_type: str, steps: int, target_pos: int, labels: dict):
    """The `PromptGraph` of one pruning type: per-prompt optimisation, faithfulness, edges, pruning, q/k pairs."""
    from attrgraph.pipeline import attribute_prompt
    from attrgraph.settings import GraphSettings

    settings = GraphSettings(optimize=graph_type, steps=steps, lr=LR[graph_type], l_min=GRAPH_TYPES[graph_type])
    return attribute_prompt(
        d, tokenizer, PROMPT, target=TARGET, position=target_pos, settings=settings, labels=labels, progress=True
    )


def run_demo(
    out: str | Path = "vpd-demo",
    *,
    run: str = "bundled",
    steps: dict[str, int] | None = None,
    harvest: str | Path | None = None,
) -> dict:
    """Build, prune, label and render both princess graphs; returns the summary that `vpd demo` prints.

    Args:
        out: Folder for the graph files; created if missing.
        run: The decomposition (`bundled` or a run folder of the bundled target).
        steps: Graph type → per-prompt optimisation steps (default `DEFAULT_STEPS`).
        harvest: A run or `vpd harvest --out` folder whose examples fill the hover cards and dashboards, and
            whose labels (offline or `vpd autointerp`) join the run's (default: the run's own; the bundled run
            ships its examples).

    Returns:
        A JSON-serialisable dict: prompt, target, read-out position, and per graph type the four
        probabilities, the node count, graph and pruned-graph sizes and the written files.
    """
    from attrgraph.examples import card_source
    from attrgraph.labels import labels_for_run, merge_labels
    from decomposer.vpd.load import load_run
    from decomposer.vpd.report import resolve_run

    start = time.perf_counter()
    steps = {**DEFAULT_STEPS, **(steps or {})}
    run_dir = resolve_run(run)
    given = harvest
    harvest = card_source(run_dir, harvest)
    d, tokenizer, _ = load_run(run)
    labels = merge_labels(labels_for_run(run_dir), labels_for_run(given) if given is not None else {})
    target_pos = position_before(tokenizer, PROMPT, TARGET)
    graphs = {
        graph_type: _graph_for(
            d, tokenizer, graph_type=graph_type, steps=steps[graph_type], target_pos=target_pos, labels=labels
        )
        for graph_type in GRAPH_TYPES
    }

    summary: dict = {"prompt": PROMPT, "target": TARGET, "target_pos": target_pos, "graphs": {}}
    for graph_type, graph in graphs.items():
        report, pruned = graph.report, graph.pruned
        # Each page also shows the other graph's numbers, so the comparison is one glance away.
        for other, other_graph in graphs.items():
            if other != graph_type:
                for mode in ("ci", "stochastic", "adversarial"):
                    pruned.graph["report"][f"{other}-pruned graph: {mode}"] = other_graph.report[mode]
        title = f"{PROMPT!r} → {TARGET!r} after ' lost', {graph_type}-pruned"
        files = graph.save(out, stem=f"princess.{graph_type}", title=title, harvest=harvest)
        summary["graphs"][graph_type] = {
            "lambda_min": GRAPH_TYPES[graph_type],
            "steps": steps[graph_type],
            "lr": LR[graph_type],
            "p_target": report["target"],
            "p_ci": report["ci"],
            "p_stochastic": report["stochastic"],
            "p_adversarial": report["adversarial"],
            "ci_nodes": report["n_nodes"],
            "graph_nodes": graph.table.n,
            "graph_edges": int(graph.table.targets.numel()),
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
