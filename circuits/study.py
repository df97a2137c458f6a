"""Scripted studies: many prompts, each explained by several kinds of attribution graph, in one table.

For every prompt and every graph type, `run_study`

1. resolves the read-out: t* is the last token, y* the given target or else the target model's top token;
2. chooses the graph's CI (docs/attribution-graphs.md §4):
   - "ci": per-prompt CI-only optimisation (the paper's type 2, λ_min 1.0);
   - "adversarial": per-prompt adversarial optimisation (type 1, λ_min 0.09);
   - "network": the CI network's own values, no optimisation;
3. builds the attribution graph on that CI and influence-prunes it (§6);
4. reports P(y*) under the target and under the CI, stochastic and adversarial masks on that CI (§5);
5. for prompts in a pair, counts the subcomponents both graphs of the same type use.

Prompts file format (`read_prompts`), one prompt per line:

    # Lines starting with '#' are comments; blank lines are ignored.
    The king said that
    # pair
    The princess lost<TAB> her
    The prince lost<TAB> his

- A tab separates the prompt from its optional target, which must be one token. Everything after
  the tab is the target verbatim, so ` her` keeps its leading space; the prompt loses trailing spaces.
- A line `# pair` makes the next two prompts a minimal pair (e.g. princess/prince).

Columns of the table (one row per prompt × graph type, in prompt order, then graph-type order):

| column | meaning |
|---|---|
| prompt | the prompt text |
| target | y* as text |
| target_pos | t* (the last token) |
| graph_type | "ci", "adversarial" or "network" |
| p_target | P(y*) under the target model |
| p_ci, p_stochastic, p_adversarial | P(y*) under the three mask modes on the graph's CI |
| n_nodes, n_edges | subcomponent nodes (CI > 0) and edges (all kinds) of the graph |
| n_nodes_pruned, n_edges_pruned | the same after influence pruning |
| pair_id | index of the prompt's pair in the file, empty when unpaired |
| shared_nodes | component keys (`1.attn.q:31`, positions ignored) in both graphs of the pair, same type |
| seconds | wall time of this row: optimisation, graph, pruning and faithfulness |
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import networkx as nx
import pandas as pd
from transformers import PreTrainedTokenizerBase

from attrgraph.labels import component_key
from attrgraph.nodes import KINDS
from attrgraph.pipeline import PromptGraph
from attrgraph.settings import L_MIN, GraphSettings
from decomposer.errors import VpdError
from decomposer.vpd.distributed import gather_shares, my_share, rank_and_world
from decomposer.vpd.run import Decomposition

logger = logging.getLogger(__name__)

GRAPH_TYPES = ("ci", "adversarial", "network")
COLUMNS = (
    "prompt",
    "target",
    "target_pos",
    "graph_type",
    "p_target",
    "p_ci",
    "p_stochastic",
    "p_adversarial",
    "n_nodes",
    "n_edges",
    "n_nodes_pruned",
    "n_edges_pruned",
    "pair_id",
    "shared_nodes",
    "seconds",
)
CSV_FILE = "study.csv"
PNG_FILE = "study.png"
_PAIR_MARK = "# pair"


class PromptSet(NamedTuple):
    """Prompts read from a prompts file: texts, optional targets, and pairs as (index, index)."""

    prompts: list[str]
    targets: list[str | None]
    pairs: list[tuple[int, int]]


def parse_prompts(text: str, *, source: str = "the prompts file") -> PromptSet:
    """Parse the prompts format of the module docstring.

    Raises:
        VpdError: No prompts, an empty prompt or target, more than one tab, or a `# pair` not followed by
            two prompts.
    """
    prompts: list[str] = []
    targets: list[str | None] = []
    pairs: list[tuple[int, int]] = []
    open_pair: list[int] | None = None
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if line.strip().lower() == _PAIR_MARK:
            if open_pair is not None:
                raise VpdError(f"Line {n} of {source} starts a `# pair` before the previous one has two prompts.")
            open_pair = []
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.count("\t") > 1:
            raise VpdError(f"Line {n} of {source} has more than one tab; write `prompt<TAB>target`.")
        prompt, _, target = line.partition("\t")
        prompt = prompt.rstrip()
        if not prompt.strip():
            raise VpdError(f"Line {n} of {source} has an empty prompt before the tab; write `prompt<TAB>target`.")
        if "\t" in line and not target:
            raise VpdError(f"Line {n} of {source} has a tab but no target after it; remove the tab or add a token.")
        prompts.append(prompt)
        targets.append(target if "\t" in line else None)
        if open_pair is not None:
            open_pair.append(len(prompts) - 1)
            if len(open_pair) == 2:
                pairs.append((open_pair[0], open_pair[1]))
                open_pair = None
    if open_pair is not None:
        raise VpdError(f"{source} ends inside a `# pair`; a pair needs two prompts after the `# pair` line.")
    if not prompts:
        raise VpdError(f"{source} holds no prompts; write one prompt per line, optionally `prompt<TAB>target`.")
    return PromptSet(prompts, targets, pairs)


def read_prompts(path: str | Path) -> PromptSet:
    """`parse_prompts` on a file.

    Raises:
        VpdError: The file does not exist, or its content is invalid (see `parse_prompts`).
    """
    path = Path(path)
    if not path.is_file():
        raise VpdError(f"Prompts file {str(path)!r} does not exist. Pass a text file with one prompt per line.")
    return parse_prompts(path.read_text(encoding="utf-8"), source=f"Prompts file {str(path)!r}")


def parse_graph_types(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Graph types from a comma-separated string or a sequence, checked against `GRAPH_TYPES`.

    Raises:
        VpdError: An unknown or repeated type, or none at all.
    """
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    names = [s for s in names if s]
    bad = [s for s in names if s not in GRAPH_TYPES]
    if bad:
        raise VpdError(f"`graph_types` holds unknown type {bad[0]!r}; choose from {', '.join(GRAPH_TYPES)}.")
    if not names or len(set(names)) != len(names):
        raise VpdError(f"`graph_types` must name each type at most once and at least one; got {names}.")
    return tuple(names)


@dataclass(frozen=True)
class StudyGraph:
    """One prompt's graph of one type (`attrgraph.PromptGraph`), the faithfulness report and the read-out."""

    prompt_graph: PromptGraph
    report: dict
    target: str
    target_pos: int
    seconds: float

    @property
    def graph(self) -> nx.DiGraph:
        """The full graph as networkx (built on each access)."""
        return self.prompt_graph.full_networkx()

    @property
    def pruned(self) -> nx.DiGraph:
        return self.prompt_graph.pruned

    def component_keys(self) -> set[str]:
        """The component keys (`1.attn.q:31`) of the graph's subcomponent nodes, from its node table."""
        table = self.prompt_graph.table
        comp = (table.kind == KINDS.index("comp")).nonzero().squeeze(1).tolist()
        module, index = table.module.tolist(), table.index.tolist()
        return {component_key(table.module_paths[module[i]], index[i]) for i in comp}

    def n_comp(self) -> int:
        return int((self.prompt_graph.table.kind == KINDS.index("comp")).sum())


def component_keys(G: nx.DiGraph) -> set[str]:
    """The component keys (`1.attn.q:31`) of a graph's subcomponent nodes, positions ignored."""
    return {component_key(a["module"], a["index"]) for _, a in G.nodes(data=True) if a.get("kind") == "comp"}


def _n_comp(G: nx.DiGraph) -> int:
    return sum(1 for _, kind in G.nodes(data="kind") if kind == "comp")


def study_prompt(
    d: Decomposition,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    graph_type: str,
    *,
    target: str | None = None,
    settings: GraphSettings | None = None,
) -> StudyGraph:
    """Steps 1–4 of the module docstring for one prompt and one graph type.

    Args:
        d: The decomposition.
        tokenizer: The target's tokenizer.
        prompt: The prompt; read out at its last token.
        graph_type: "ci", "adversarial" or "network".
        target: y*, one token; default the target model's top next token.
        settings: Optimisation, pruning and report settings (`GraphSettings`, its defaults by default); the graph
            type sets `optimize`, the report is always computed and no q/k pairs are searched.

    Raises:
        VpdError: Bad prompt, target or graph type.
    """
    from attrgraph.pipeline import attribute_prompt

    (graph_type,) = parse_graph_types([graph_type])
    start = time.perf_counter()
    settings = (settings or GraphSettings()).model_copy(
        update={"optimize": "none" if graph_type == "network" else graph_type, "report": True, "qk_top": 0}
    )
    graph = attribute_prompt(d, tokenizer, prompt, target=target, settings=settings)
    rep = graph.report
    report = {
        "target": rep["target"],
        "ci": rep["ci"],
        "stochastic": rep["stochastic"],
        "adversarial": rep["adversarial"],
    }
    report.update(pgd_steps=rep["pgd_steps"], restarts=rep["restarts"], graph_type=graph_type)
    return StudyGraph(
        prompt_graph=graph,
        report=report,
        target=graph.target_text,
        target_pos=graph.target_pos,
        seconds=time.perf_counter() - start,
    )


def _check_inputs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str | None] | None,
    pairs: Sequence[tuple[int, int]] | None,
) -> tuple[list[str | None], dict[int, int]]:
    """Targets (one per prompt) and prompt index → pair id, checked before any slow work starts."""
    if not prompts:
        raise VpdError("`prompts` is empty; pass at least one prompt.")
    targets = list(targets) if targets is not None else [None] * len(prompts)
    if len(targets) != len(prompts):
        raise VpdError(f"`targets` must have one entry per prompt ({len(prompts)}); got {len(targets)}.")
    for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        if not prompt.strip():
            raise VpdError(f"Prompt {i + 1} is empty; every prompt needs text.")
        if target is not None:
            n = len(tokenizer(target, add_special_tokens=False)["input_ids"])
            if n != 1:
                raise VpdError(
                    f"Target {target!r} of prompt {i + 1} ({prompt!r}) is {n} tokens, not one; pass a single token "
                    "such as ' her' (mind the leading space)."
                )
    pair_of: dict[int, int] = {}
    for k, pair in enumerate(pairs or []):
        if len(pair) != 2 or any(not 0 <= i < len(prompts) for i in pair) or pair[0] == pair[1]:
            raise VpdError(f"`pairs[{k}]` {pair!r} must be two different prompt indices in [0, {len(prompts)}).")
        for i in pair:
            if i in pair_of:
                raise VpdError(
                    f"Prompt {i + 1} is in pairs {pair_of[i]} and {k}; a prompt belongs to one pair at most."
                )
            pair_of[i] = k
    return targets, pair_of


def run_study(
    d: Decomposition,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    targets: Sequence[str | None] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    graph_types: Sequence[str] = GRAPH_TYPES,
    settings: GraphSettings | None = None,
    l_min: dict[str, float] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """The study table of the module docstring: one row per prompt × graph type.

    Args:
        d: The decomposition.
        tokenizer: The target's tokenizer.
        prompts: Prompt texts, each read out at its last token.
        targets: y* per prompt (one token, or None for the target model's top token).
        pairs: Minimal pairs as (prompt index, prompt index); a prompt is in one pair at most.
        graph_types: Which of "ci", "adversarial", "network" to build, in this order.
        settings: Steps, PGD, report draws, pruning thresholds and seed of every graph (`GraphSettings`; its
            defaults, the paper's 2000 steps among them, by default).
        l_min: Graph type → minimality coefficient, overriding `L_MIN` (and `settings.l_min`).
        out: If given, write `study.csv` and `study.png` there (`save_study`).
        progress: Show a tqdm bar over prompts.

    Returns:
        The table, with exactly the columns `COLUMNS`; pair_id and shared_nodes are nullable integers.

    Raises:
        VpdError: Bad prompts, targets, pairs or graph types; checked before any optimisation.
    """
    from tqdm.auto import tqdm

    graph_types = parse_graph_types(graph_types)
    targets, pair_of = _check_inputs(tokenizer, prompts, targets, pairs)
    settings = settings or GraphSettings()
    context = getattr(d.model.target.config, "max_position_embeddings", None)
    for i, prompt in enumerate(prompts):
        T = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if context is not None and T > context:
            raise VpdError(f"Prompt {i + 1} is {T} tokens, longer than the model's context of {context}. Shorten it.")
    l_min = {**L_MIN, **({} if settings.l_min is None else dict.fromkeys(L_MIN, settings.l_min)), **(l_min or {})}
    done: list[tuple[int, str, dict, set[str]]] = []
    # Under torchrun each rank studies its share of the prompts; every prompt is seeded alike on its own,
    # so the gathered rows equal one process's.
    for i in tqdm(my_share(range(len(prompts))), desc="study", disable=not progress or rank_and_world()[0] != 0):
        prompt = prompts[i]
        for graph_type in graph_types:
            graph_settings = settings.model_copy(update={"l_min": l_min.get(graph_type)})
            res = study_prompt(d, tokenizer, prompt, graph_type, target=targets[i], settings=graph_settings)
            done.append(
                (
                    i,
                    graph_type,
                    {
                        "prompt": prompt,
                        "target": res.target,
                        "target_pos": res.target_pos,
                        "graph_type": graph_type,
                        "p_target": res.report["target"],
                        "p_ci": res.report["ci"],
                        "p_stochastic": res.report["stochastic"],
                        "p_adversarial": res.report["adversarial"],
                        "n_nodes": res.n_comp(),
                        "n_edges": int(res.prompt_graph.table.targets.numel()),
                        "n_nodes_pruned": _n_comp(res.pruned),
                        "n_edges_pruned": res.pruned.number_of_edges(),
                        "pair_id": pair_of.get(i),
                        "shared_nodes": None,
                        "seconds": res.seconds,
                    },
                    res.component_keys(),
                )
            )
            logger.info("study: %r %s: %d nodes, %.1f s", prompt, graph_type, done[-1][2]["n_nodes"], res.seconds)
    done = gather_shares(done)
    rows = [row for _, _, row, _ in done]
    keys = {(i, graph_type): k for i, graph_type, _, k in done}
    order = [(i, graph_type) for i, graph_type, _, _ in done]
    by_pair = {k: pair for k, pair in enumerate(pairs or [])}
    for row, (_, graph_type) in zip(rows, order, strict=True):
        if row["pair_id"] is not None:
            a, b = by_pair[row["pair_id"]]
            row["shared_nodes"] = len(keys[a, graph_type] & keys[b, graph_type])
    table = _typed(pd.DataFrame(rows, columns=list(COLUMNS)))
    if out is not None and rank_and_world()[0] == 0:
        save_study(table, out)
    return table


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    """The column dtypes of a study table: strings, ints, floats, and nullable ints for the pair columns."""
    types = {"prompt": str, "target": str, "graph_type": str, "target_pos": "int64", "n_nodes": "int64"}
    types.update({c: "int64" for c in ("n_edges", "n_nodes_pruned", "n_edges_pruned")})
    types.update({c: "float64" for c in ("p_target", "p_ci", "p_stochastic", "p_adversarial", "seconds")})
    types.update(pair_id="Int64", shared_nodes="Int64")
    return table.astype(types)


def save_study(table: pd.DataFrame, out: str | Path) -> dict[str, Path]:
    """Write `study.csv` (atomically) and the bar chart `study.png` into `out`; return their paths."""
    from decomposer.io import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "csv": atomic_write_text(out / CSV_FILE, table.to_csv(index=False)),
        "png": plot_study(table, out / PNG_FILE),
    }


def load_study(path: str | Path) -> pd.DataFrame:
    """Read a `study.csv` back with the dtypes `run_study` returns (targets such as ' NA' stay text).

    Raises:
        VpdError: The file does not exist or lacks a column of `COLUMNS`.
    """
    path = Path(path)
    if not path.is_file():
        raise VpdError(f"Study table {str(path)!r} does not exist. Write one with `vpd study`.")
    table = pd.read_csv(path, keep_default_na=False, na_values={"pair_id": [""], "shared_nodes": [""]})
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise VpdError(f"Study table {str(path)!r} lacks columns {missing}; it was not written by `vpd study`.")
    return _typed(table[list(COLUMNS)])


def plot_study(table: pd.DataFrame, path: str | Path) -> Path:
    """PNG: one panel per graph type, bars of P(target) per prompt under the target and the three masks."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from decomposer.io import atomic_write_bytes

    types = list(dict.fromkeys(table["graph_type"]))
    modes = [("p_target", "target"), ("p_ci", "CI"), ("p_stochastic", "stochastic"), ("p_adversarial", "adversarial")]
    n_prompts = table["prompt"].nunique()
    fig, axes = plt.subplots(
        len(types), 1, figsize=(max(6.0, 1.2 * n_prompts + 2), 2.8 * len(types)), squeeze=False, sharey=True
    )
    width = 0.8 / len(modes)
    for ax, graph_type in zip(axes[:, 0], types, strict=True):
        part = table[table["graph_type"] == graph_type].reset_index(drop=True)
        for k, (column, name) in enumerate(modes):
            ax.bar([x + (k - 1.5) * width for x in range(len(part))], part[column], width, label=name)
        labels = [f"{p[-24:]!r}\n→ {t!r}" for p, t in zip(part["prompt"], part["target"], strict=True)]
        ax.set_xticks(range(len(part)), labels, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("P(target)")
        ax.set_title(f"{graph_type} graphs")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, ncols=4, loc="upper center")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (2.8 * len(types))))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
