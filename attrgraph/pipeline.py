"""One prompt's attribution graph, end to end: `attribute_prompt` → `PromptGraph`.

Each phase is timed, logged (logger `attrgraph.pipeline`, INFO) and recorded in `PromptGraph.timings`
under the names in `PHASES`. Each names the module that implements it.

1. Resolve the prompt once (`attrgraph.candidates`: `check_prompt`, `choose_logit_tokens`): tokens (checked
   against the context), t*, y*, and one forward of the target that gives P(· at t*) and, unless a CI is
   given or optimised, the CI network's g.
2. Refuse a graph whose estimated peak memory exceeds `max_memory_gb` (default: what is free now), naming
   the setting that lowers it (here: `estimate_peak_bytes`, `check_memory`).
3. Optionally re-fit the CI on the prompt (docs/attribution-graphs.md §4) and report faithfulness (§5)
   (`attrgraph.optimize`: `optimize_ci`, `faithfulness`).
4. Edges as tensors (`attrgraph.edges.attribute_edges`, on the candidate nodes of `attrgraph.candidates` and
   the direct-effect cut of `attrgraph.leaves`, into an `attrgraph.edge_table.EdgeTable`): with `max_nodes`,
   only the subcomponents of largest estimated influence get their incoming edges computed.
5. Influence pruning on the tensors (`attrgraph.prune.prune_coo`), then networkx for the pruned graph only
   (`attrgraph.to_networkx.table_to_networkx`), and its q/k pairs (`attrgraph.qk.add_qk_pairs`).

Every default lives in `GraphSettings`; every file name in `FILES`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from attrgraph.edge_table import EdgeTable
from attrgraph.edges import attribute_edges
from attrgraph.nodes import KINDS
from attrgraph.prune import CooPruneMasks, prune_coo
from attrgraph.settings import GraphSettings
from decomposer.errors import VpdError
from decomposer.vpd.memory import available_bytes
from decomposer.vpd.run import Decomposition

# File kind → name, `{stem}` replaced by `PromptGraph.save`'s stem.
FILES = {
    "graph": "{stem}.json",  # the full graph's metadata; its tensors are `{stem}.safetensors`
    "pruned": "{stem}.pruned.json",
    "circuit_tracer": "{stem}.circuit-tracer.json",
    "html": "{stem}.html",
    "png": "{stem}.png",
    "full_json": "{stem}.full.json",  # node-link JSON of the full graph, on request only
}


def _config_int(config: Any, *names: str, default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def estimate_peak_bytes(d: Decomposition, T: int, n_comp: int, settings: GraphSettings) -> int:
    """Rough peak memory of the edge step for a T-token prompt with `n_comp` alive subcomponents.

    Counted: the model's weights, the `batch_size`-copy forward kept for the backward passes (residual,
    MLP and attention activations per layer, the leaves of every decomposed module), one backward's
    gradients, the rows of one batch, and the COO edges of the computed rows (about one position's
    subcomponents plus the prompt's deltas each, 16 bytes an edge).
    """
    config = d.model.target.config
    width = _config_int(config, "hidden_size", "n_embd", "d_model", default=768)
    layers = _config_int(config, "num_hidden_layers", "n_layer", default=len(d.module_paths))
    heads = _config_int(config, "num_attention_heads", "n_head", default=max(width // 64, 1))
    ff = _config_int(config, "intermediate_size", "n_inner", default=4 * width)
    K = settings.batch_size
    elem = 4 if d.model.components(d.module_paths[0]).V.dtype != torch.float64 else 8
    weights = sum(p.numel() for p in d.model.parameters()) * elem
    per_layer = K * T * (8 * width + 4 * ff + 2 * heads * T)
    leaves = K * T * sum(d.model.components(p).U.shape[-1] for p in d.module_paths) * 3
    forward = (layers * per_layer + leaves) * elem * 2  # kept for backward, plus one backward's gradients
    n_nodes = n_comp + T * (len(d.module_paths) + 1) + settings.max_logits
    rows = min(n_comp, settings.max_nodes or n_comp) + settings.max_logits
    per_row = n_comp / max(T, 1) + T * len(d.module_paths) / 4 + T
    edges = int(rows * per_row * 16 * 2)  # pieces and their concatenation
    return int(weights + forward + 4 * K * n_nodes * elem + edges)


def check_memory(d: Decomposition, T: int, n_comp: int, settings: GraphSettings) -> int:
    """The estimate of `estimate_peak_bytes`; refuses one above `max_memory_gb` or the memory free now (on
    the model's GPU when it has one).

    Raises:
        VpdError: The estimate exceeds the limit; the message names `batch_size` and `max_nodes`.
    """
    need = estimate_peak_bytes(d, T, n_comp, settings)
    if settings.max_memory_gb is not None:
        limit = settings.max_memory_gb * 2**30
    else:
        limit = available_bytes(str(d.model_device))  # on a GPU, its free memory: the edge step's tensors live there
    if limit is not None and need > limit:
        raise VpdError(
            f"The graph of this {T}-token prompt ({n_comp:,} alive subcomponents) needs about {need / 2**30:.2g} GB, "
            f"more than the {limit / 2**30:.2g} GB allowed; lower `batch_size` (now {settings.batch_size}, "
            f"--batch-size) or `max_nodes` (now {settings.max_nodes}, --max-nodes), or shorten the prompt."
        )
    return need


log = logging.getLogger(__name__)

# The phases of `attribute_prompt`, numbered as in the module docstring; `PromptGraph.timings` keys.
PHASES = ("1 resolve", "2 memory", "3 ci", "4 edges", "5 prune")


@contextmanager
def _phase(timings: dict[str, float], name: str) -> Iterator[None]:
    """Time one phase into `timings` and log it (logger `attrgraph.pipeline`, level INFO)."""
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    log.info("phase %s: %.3f s", name, timings[name])


@dataclass(frozen=True)
class GraphContext:
    """What turns the node table into labelled networkx nodes and graph attributes (`table_to_networkx`'s keywords).

    Attributes:
        prompt: The text.
        prompt_tokens: Each token as text.
        token_text: Logit token id → its text.
        n_blocks: Blocks of the target, for row numbers.
        labels: Node id or component key → label (with its source), or None.
        settings: The graph settings as stored in the files (with the optimisation's record, if any).
        report: The faithfulness report, as in `PromptGraph.report`.
    """

    prompt: str
    prompt_tokens: list[str]
    token_text: dict[int, str]
    n_blocks: int
    labels: Mapping[str, str] | None
    settings: dict[str, Any]
    report: dict[str, Any]

    def as_kwargs(self) -> dict[str, Any]:
        """The fields as `table_to_networkx` keywords (no copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class PromptGraph:
    """One prompt's graph: the read-out, its CI, the faithfulness report, the edge tensors and the pruned graph.

    Attributes:
        prompt: The text.
        tokens: (1, t* + 1) token ids, truncated after the read-out.
        prompt_tokens: Each token as text.
        target_pos: t*.
        target_token: y*'s id; `target_text` its text.
        probs: (vocab,) float64 P(· at t*) under the target model.
        ci: Path → (t* + 1, C) the CI the graph was built on.
        report: Faithfulness numbers (P(target) under the target, CI, stochastic and adversarial masks, node
            count, PGD settings; empty when not computed).
        table: Every node and edge, as tensors.
        masks: What influence pruning kept (over `table`), with every node's influence.
        pruned: The pruned graph as a networkx DiGraph (the `attrgraph.export` convention).
        settings: The settings used.
        memory_estimate: The estimated peak bytes checked before the edges.
        timings: Seconds spent in each phase (`PHASES`), as also logged.
        context: What labels the nodes of `pruned` and `full_networkx()`.
    """

    prompt: str
    tokens: Tensor
    prompt_tokens: list[str]
    target_pos: int
    target_token: int
    target_text: str
    probs: Tensor
    ci: dict[str, Tensor]
    report: dict[str, Any]
    table: EdgeTable
    masks: CooPruneMasks
    pruned: nx.DiGraph
    settings: GraphSettings
    memory_estimate: int
    context: GraphContext
    timings: dict[str, float] = field(default_factory=dict)

    def full_networkx(self) -> nx.DiGraph:
        """The unpruned graph as a DiGraph (large for long prompts); every node gets its `influence`."""
        from attrgraph.to_networkx import table_to_networkx

        return table_to_networkx(self.table, influence=self.masks.influence, **self.context.as_kwargs())

    def summary(self) -> dict:
        return {
            "prompt": self.prompt,
            "target_token": self.target_text,
            "target_pos": self.target_pos,
            "candidates": self.table.n_candidates,
            "subcomponents": int((self.table.kind == KINDS.index("comp")).sum()),
            "nodes": self.table.n,
            "edges": int(self.table.targets.numel()),
            "pruned_nodes": self.pruned.number_of_nodes(),
            "pruned_edges": self.pruned.number_of_edges(),
            "report": self.report,
        }

    def save(
        self,
        out: str | Path,
        *,
        stem: str = "graph",
        title: str | None = None,
        full_json: bool = False,
        harvest: Any = None,
    ) -> dict[str, Path]:
        """Write the full graph (safetensors + JSON), the pruned graph (node-link JSON, circuit-tracer JSON, HTML,
        PNG) and, with `full_json`, the full graph as node-link JSON; returns kind → path (`FILES`).

        `harvest` (a run or harvest folder, or what `render_html` accepts) fills the explorer's hover cards with
        densities, top tokens and activating examples."""
        from attrgraph.artifact import save_full_graph
        from attrgraph.export import save_graph_json, to_circuit_tracer
        from attrgraph.render import render_html, render_png
        from decomposer.io import atomic_write_json

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        name = {k: out / v.format(stem=stem) for k, v in FILES.items()}
        meta = {k: v for k, v in self.pruned.graph.items() if k != "qk_pairs"}
        paths = {
            "graph": save_full_graph(self.table, name["graph"], meta, influence=self.masks.influence),
            "pruned": save_graph_json(self.pruned, name["pruned"]),
            "circuit_tracer": atomic_write_json(
                name["circuit_tracer"],
                to_circuit_tracer(
                    self.pruned,
                    slug=stem if stem != "graph" else out.name,
                    node_threshold=self.settings.node_threshold,
                ),
            ),
            "html": render_html(self.pruned, name["html"], title=title or self.prompt, harvest=harvest),
            "png": render_png(self.pruned, name["png"]),
        }
        if full_json:
            paths["full_json"] = save_graph_json(self.full_networkx(), name["full_json"])
        return paths


def _fit_ci(
    d: Decomposition,
    ids: Tensor,
    pos: int,
    label: int,
    ci: Mapping[str, Tensor],
    settings: GraphSettings,
    progress: bool | Callable[[int, int], None],
) -> tuple[Mapping[str, Tensor], dict | None, dict]:
    """(CI the edges use, the optimisation's record or None, the faithfulness report or {}) per `settings`."""
    from attrgraph.optimize import faithfulness, optimize_ci

    optimize_settings, report = None, {}
    if settings.optimize != "none":
        result = optimize_ci(
            d, ids, target_pos=pos, target_token=label, settings=settings.optimize_settings(), progress=progress
        )
        ci, optimize_settings = result.g, result.settings
    if settings.optimize != "none" or settings.report:
        rep = faithfulness(
            d,
            ids,
            ci,
            target_pos=pos,
            target_token=label,
            n_samples=settings.n_samples,
            pgd_steps=settings.pgd_steps,
            restarts=settings.restarts,
            seed=settings.seed,
        )
        report = {k: float(v) if isinstance(v, float) else v for k, v in asdict(rep).items()}
    return ci, optimize_settings, report


def attribute_prompt(
    d: Decomposition,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    target: str | None = None,
    position: int | None = None,
    settings: GraphSettings = GraphSettings(),  # noqa: B008 (frozen, so one shared default is safe)
    ci: Mapping[str, Tensor] | None = None,
    labels: Mapping[str, str] | None = None,
    progress: bool | Callable[[int, int], None] = False,
) -> PromptGraph:
    """The attribution graph of `prompt` read out at `position` (default: its last token), steps 1–5 above.

    Args:
        d: The decomposition.
        tokenizer: The target's tokenizer.
        prompt: Text, tokenized without special tokens.
        target: y*, one token; default the target model's likeliest next token.
        position: t*; negative values count from the end. Later tokens are dropped.
        settings: Every knob; see `GraphSettings`.
        ci: Path → (T, C) CI to build the graph on instead of the CI network's (ignored with `optimize`).
        labels: Node id or `block.part.matrix:c` → label.
        progress: Show tqdm bars for the optimisation and the edges (True), or call `progress(steps_done,
            steps)` after each optimisation step (e.g. a server reporting to its page).

    Raises:
        VpdError: An empty prompt, one past the model's context, a target that is not one token, a position
            out of range, or a graph whose estimated memory exceeds the limit.
    """
    from attrgraph.candidates import check_prompt, choose_logit_tokens
    from attrgraph.qk import add_qk_pairs

    timings: dict[str, float] = {}
    with _phase(timings, PHASES[0]):
        ids, pos, label = check_prompt(d, tokenizer, prompt, target, position)
        ids = ids[:, : pos + 1].to(d.model_device)
        with torch.no_grad():
            out, xs = d.model.forward_with_inputs(ids)
            probs = out.logits[0, pos].double().softmax(-1).cpu()
            network = {p: g[0] for p, g in d.causal_importance(xs)[0].items()}
        del out, xs
    if ci is None or settings.optimize != "none":
        ci = network  # an optimised CI is alive only where the network's is, so the estimate below bounds it
    with _phase(timings, PHASES[1]):
        need = check_memory(d, pos + 1, sum(int((g[: pos + 1] > 0).sum()) for g in ci.values()), settings)
    if label is None:
        label = int(probs.argmax())
    with _phase(timings, PHASES[2]):
        ci, optimize_settings, report = _fit_ci(d, ids, pos, label, ci, settings, progress)
    readout = choose_logit_tokens(probs, label, settings)
    with _phase(timings, PHASES[3]):
        table = _edges(d, ids, pos, readout, probs, ci, settings, progress is True)
    with _phase(timings, PHASES[4]):
        masks, pruned, context = _prune(
            d, tokenizer, prompt, ids, readout, table, settings, optimize_settings, report, labels
        )
        if settings.qk_top > 0:
            pruned = add_qk_pairs(pruned, d, ids, top=settings.qk_top)
    return PromptGraph(
        prompt=prompt,
        tokens=ids.cpu(),
        prompt_tokens=context.prompt_tokens,
        target_pos=pos,
        target_token=label,
        target_text=tokenizer.decode([label]),
        probs=probs,
        ci={p: g.detach() for p, g in ci.items()},
        report=report,
        table=table,
        masks=masks,
        pruned=pruned,
        settings=settings,
        memory_estimate=need,
        context=context,
        timings=timings,
    )


def _edges(
    d: Decomposition,
    ids: Tensor,
    pos: int,
    readout: list[int],
    probs: Tensor,
    ci: Mapping[str, Tensor],
    settings: GraphSettings,
    progress: bool,
) -> EdgeTable:
    """Phase 4: the edges of the chosen nodes, per `settings`."""
    return attribute_edges(
        d,
        ids,
        target_pos=pos,
        logit_tokens=readout,
        logit_probs=probs,
        ci=dict(ci),
        weight_by_source_ci=settings.weight_by_source_ci,
        batch_size=settings.batch_size,
        max_nodes=settings.max_nodes,
        progress=progress,
    )


def _prune(
    d: Decomposition,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    ids: Tensor,
    readout: list[int],
    table: EdgeTable,
    settings: GraphSettings,
    optimize_settings: dict | None,
    report: dict,
    labels: Mapping[str, str] | None,
) -> tuple[CooPruneMasks, nx.DiGraph, GraphContext]:
    """Phase 5: influence pruning on the tensors, then the pruned graph as networkx (and its labels' context)."""
    from attrgraph.to_networkx import count_blocks, table_to_networkx

    masks = prune_coo(
        table.n,
        table.targets,
        table.sources,
        table.weights,
        table.kind_masks(),
        table.logit_weights(),
        node_threshold=settings.node_threshold,
        edge_threshold=settings.edge_threshold,
    )
    stored = settings.model_dump()
    if optimize_settings is not None:
        stored["optimize_settings"] = optimize_settings
    context = GraphContext(
        prompt=prompt,
        prompt_tokens=[tokenizer.decode([i]) for i in ids[0].tolist()],
        token_text={t: tokenizer.decode([t]) for t in readout},
        n_blocks=count_blocks(d),
        labels=labels,
        settings=stored,
        report=report,
    )
    pruned = table_to_networkx(
        table, node_mask=masks.node_mask, edge_mask=masks.edge_mask, influence=masks.influence, **context.as_kwargs()
    )
    return masks, pruned, context


__all__ = ["FILES", "PHASES", "GraphContext", "PromptGraph", "attribute_prompt", "check_memory", "estimate_peak_bytes"]
