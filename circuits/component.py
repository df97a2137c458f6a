"""One subcomponent's card: its matrix, firing rates, token statistics, co-firing partners and examples.

`component_card` returns the card as a JSON-ready dict and as text; `render_component_html` draws the
dict as a small self-contained HTML page (no scripts, no remote assets; every string escaped), with
each example token shaded by its CI. The page is a disposable view; the harvest is the artifact.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from circuits.harvest import Harvest
from decomposer.errors import VpdError
from decomposer.io import atomic_write_text
from decomposer.vpd.run import Decomposition


class ComponentCard(NamedTuple):
    """A card as a JSON-ready dict (`data`) and as plain text (`text`)."""

    data: dict[str, Any]
    text: str


def _check_same_decomposition(d: Decomposition, h: Harvest) -> None:
    if tuple(d.module_paths) != h.module_paths or tuple(d.Cs[p] for p in d.module_paths) != h.Cs:
        raise VpdError(
            "The harvest was counted on other matrices than this decomposition's "
            f"({len(h.module_paths)} matrices, C_total {h.C_total}, vs {len(d.module_paths)}, "
            f"{sum(d.Cs.values())}); run `vpd harvest` on this run."
        )
    u_norm = torch.cat([d.model.components(p).U.detach().norm(dim=1) for p in d.module_paths]).float().cpu()
    if not torch.allclose(u_norm, h.u_norm, rtol=1e-4, atol=1e-6):
        raise VpdError(
            "The harvest was counted on another decomposition of the same shape (its ‖u_c‖ differ); "
            "run `vpd harvest` on this run."
        )


def component_card(
    d: Decomposition, harvest: Harvest, key: str, *, list_size: int = 10, n_examples: int = 10
) -> ComponentCard:
    """The card of subcomponent `key` (e.g. `1.attn.q:31`) from a harvest of decomposition `d`.

    Args:
        d: The decomposition the harvest was counted on (for ‖u‖, ‖v‖ and the matrix shape).
        harvest: The harvest.
        key: A component key, `{block}.{attn|mlp}.{matrix}:{c}`.
        list_size: Entries per ranked token or partner list.
        n_examples: Top and random examples shown.

    Raises:
        VpdError: The key names no subcomponent, or the harvest belongs to another decomposition.
    """
    _check_same_decomposition(d, harvest)
    flat = harvest.flat_index(key)
    path, c = harvest.module_of(flat)
    comp = d.model.components(path)
    data = harvest.summary(flat, list_size=list_size, n_examples=n_examples, text=True)
    data |= {
        "C": comp.C,
        "d_in": comp.d_in,
        "d_out": comp.d_out,
        "u_norm": float(comp.U[c].detach().norm()),
        "v_norm": float(comp.V[:, c].detach().norm()),
        "tau_fire": harvest.tau_fire,
        "n_tokens": harvest.n_tokens,
        "alive": harvest.row(flat) is not None,
    }
    return ComponentCard(data, format_card(data))


def _show(token: str) -> str:
    """A token as a Python literal, so that spaces and newlines stay visible."""
    return repr(token)


def _name(entry: Mapping[str, Any]) -> str:
    return _show(entry["token"]) if entry.get("token") is not None else f"#{entry['id']}"


def example_text(example: Mapping[str, Any], *, context: int = 12) -> str:
    """An example window as one line: ±`context` tokens, the firing token in [[ ]], newlines as ⏎."""
    words = example.get("text") or [f"#{t}" for t in example["tokens"]]
    center = example["center"]
    lo, hi = max(0, center - context), min(len(words), center + context + 1)
    parts = [("[[" + w + "]]" if i == center else w) for i, w in enumerate(words) if lo <= i < hi]
    return "".join(parts).replace("\n", "⏎")


def _token_table(title: str, rows: Sequence[Mapping[str, Any]], count_name: str) -> list[str]:
    if not rows:
        return [f"{title}: none"]
    out = [f"{title:<36}{count_name:>10}{'recall':>9}{'precision':>11}{'lift':>9}{'PMI':>8}"]
    for r in rows:
        count = f"{r['count']:,}" if isinstance(r["count"], int) else f"{r['count']:.3g}"
        out.append(
            f"  {_name(r)[:34]:<34}{count:>10}{r['recall']:>9.4f}{r['precision']:>11.4f}{r['lift']:>9.2f}"
            f"{r['pmi']:>8.3f}"
        )
    return out


def format_card(data: Mapping[str, Any]) -> str:
    """The card as plain text (what `vpd component` prints)."""
    lines = [
        f"{data['key']} — {data['module']}, subcomponent {data['index']} of {data['C']}; "
        f"matrix {data['d_out']} × {data['d_in']} (d_out × d_in)",
        f"label: {data['label'] or '(none)'}",
        f"fires on {data['firing_count']:,} of {data['n_tokens']:,} tokens at CI > {data['tau_fire']}: "
        f"density {data['density']:.5f}; mean CI {data['mean_ci']:.5f}",
        f"‖u‖ {data['u_norm']:.4f}  ‖v‖ {data['v_norm']:.4f}  (‖u vᵀ‖ = {data['u_norm'] * data['v_norm']:.4f})",
    ]
    if not data["alive"]:
        lines.append("never fired in this harvest: no token statistics or examples")
        return "\n".join(lines)
    lines += ["", *_token_table("input tokens by recall", data["input"], "count")]
    lines += ["", *_token_table("input tokens by PMI (≥ 2 firings)", data["input_pmi"], "count")]
    lines += ["", *_token_table("output tokens by PMI", data["output"], "mass")]
    lines += ["", *_token_table("output tokens, lowest PMI", data["output_bottom"], "mass")]
    lines += [
        "",
        f"{'co-firing partners by Jaccard':<36}{'count':>10}{'prec.':>9}{'recall':>9}{'Jaccard':>9}{'PMI':>8}",
    ]
    for r in data["cofiring"]:
        lines.append(
            f"  {r['key']:<34}{r['count']:>10,}{r['precision']:>9.4f}{r['recall']:>9.4f}{r['jaccard']:>9.4f}"
            f"{r['pmi']:>8.3f}"
        )
    lines += ["", "top examples (CI, a·‖u‖ at the firing token [[ ]])"]
    lines += [f"  {e['ci']:.3f} {e['act']:+8.3f}  {example_text(e)}" for e in data["top_examples"]]
    lines += ["", "random examples"]
    lines += [f"  {e['ci']:.3f} {e['act']:+8.3f}  {example_text(e)}" for e in data["random_examples"]]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.4em 0 1.2em; font-size: 0.9em; }
th, td { padding: 2px 8px; text-align: right; border-bottom: 1px solid #eee; }
th:first-child, td:first-child { text-align: left; }
.tok { font-family: ui-monospace, monospace; white-space: pre; }
.ex { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 0.3em 0; line-height: 1.7; }
.ex span { border-radius: 2px; }
.fire { outline: 2px solid #c0392b; font-weight: bold; }
.meta { color: #666; font-size: 0.85em; margin-right: 0.8em; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html_token_table(title: str, rows: Sequence[Mapping[str, Any]], count_name: str) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in ("token", count_name, "recall", "precision", "lift", "PMI"))
    body = "".join(
        f"<tr><td class='tok'>{_esc(_name(r))}</td><td>{_esc(r['count'])}</td><td>{r['recall']:.4f}</td>"
        f"<td>{r['precision']:.4f}</td><td>{r['lift']:.2f}</td><td>{r['pmi']:.3f}</td></tr>"
        for r in rows
    )
    return f"<h3>{_esc(title)}</h3><table><tr>{head}</tr>{body}</table>"


def _html_example(e: Mapping[str, Any]) -> str:
    words = e.get("text") or [f"#{t}" for t in e["tokens"]]
    ci = e.get("ci_window")
    spans = []
    for i, w in enumerate(words):
        shade = ci[i] if ci is not None else (e["ci"] if i == e["center"] else 0.0)
        tip = f"CI {ci[i]:.3f}, a·‖u‖ {e['act_window'][i]:+.3f}" if ci is not None else ""
        cls = " class='fire'" if i == e["center"] else ""
        style = f"background: rgba(255, 140, 0, {max(0.0, min(1.0, shade)):.3f})"
        spans.append(f"<span{cls} style='{style}' title='{_esc(tip)}'>{_esc(w.replace(chr(10), '⏎'))}</span>")
    meta = f"<span class='meta'>CI {e['ci']:.3f} · a·‖u‖ {e['act']:+.3f}</span>"
    return f"<div class='ex'>{meta}{''.join(spans)}</div>"


def render_component_html(card: ComponentCard | Mapping[str, Any], path: str | Path) -> Path:
    """Write the card as a self-contained HTML page at `path`; returns the path.

    Every string from the model or the harvest goes through `html.escape`, and the page has no script
    and no remote asset, so a token such as `</script>` is shown, never run.
    """
    data = card.data if isinstance(card, ComponentCard) else card
    title = f"{data['key']} — {data['label'] or 'subcomponent'}"
    parts = [
        f"<h1>{_esc(data['key'])}</h1>",
        f"<p><b>{_esc(data['label'] or '(no label)')}</b></p>",
        f"<p>{_esc(data['module'])}, subcomponent {_esc(data['index'])} of {_esc(data['C'])}; matrix "
        f"{_esc(data['d_out'])} × {_esc(data['d_in'])}. Fires on {data['firing_count']:,} of "
        f"{data['n_tokens']:,} tokens at CI &gt; {_esc(data['tau_fire'])}: density {data['density']:.5f}, "
        f"mean CI {data['mean_ci']:.5f}. ‖u‖ {data['u_norm']:.4f}, ‖v‖ {data['v_norm']:.4f}.</p>",
    ]
    if data["alive"]:
        parts += [
            _html_token_table("Input tokens by recall", data["input"], "count"),
            _html_token_table("Input tokens by PMI", data["input_pmi"], "count"),
            _html_token_table("Output tokens by PMI", data["output"], "mass"),
            _html_token_table("Output tokens, lowest PMI", data["output_bottom"], "mass"),
        ]
        head = "".join(f"<th>{_esc(h)}</th>" for h in ("partner", "count", "precision", "recall", "Jaccard", "PMI"))
        body = "".join(
            f"<tr><td>{_esc(r['key'])}</td><td>{r['count']:,}</td><td>{r['precision']:.4f}</td>"
            f"<td>{r['recall']:.4f}</td><td>{r['jaccard']:.4f}</td><td>{r['pmi']:.3f}</td></tr>"
            for r in data["cofiring"]
        )
        parts.append(f"<h3>Co-firing partners by Jaccard</h3><table><tr>{head}</tr>{body}</table>")
        parts.append("<h3>Top examples (shading: CI per token; outlined: the firing token)</h3>")
        parts += [_html_example(e) for e in data["top_examples"]]
        parts.append("<h3>Random examples (uniform reservoir)</h3>")
        parts += [_html_example(e) for e in data["random_examples"]]
    else:
        parts.append("<p>Never fired in this harvest.</p>")
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    return atomic_write_text(path, page)
