"""Size and speed of the graph explorer in headless Chromium (Debian chromium + chromium-driver).

    python benchmarks/explorer.py [--nodes 1000] [--tokens 256] [--edges 10000] [--blocks 2] [--cards]
                                   [--demo-dir vpd-demo]

Builds a pruned-graph-shaped graph (the bundled model's 2 blocks × 7 matrices, nodes crowding
towards the target's end as influence pruning leaves them, edges from lower rows at the same or
earlier positions), writes it with `render_html` and measures, on a fresh page each time:

- ready: navigation start → first complete drawing (`window.vpdReady`), bound 2 s;
- click: selecting a node until the next frame is drawn, bound 0.3 s;
- slider: one move of the node-pruning slider until the next frame is drawn, bound 0.3 s;
- click, all edges: the same with every edge drawn (the first view draws the strongest 2,000);

and the size of the demo's HTML files (bound 2 MB) when `--demo-dir` holds them (`vpd demo --out DIR`).
With `--cards`, every subcomponent node gets its card (contexts, token lists, partners) from the bundled run's
examples, so a click also builds the node's dashboard. Prints the median of each and its ratio to the bound.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import networkx as nx

from attrgraph.render import render_html


def matrix_rows(n_blocks: int) -> list[tuple[int, str, str]]:
    """(block, part, matrix) of every decomposed matrix of an `n_blocks` Llama, bottom to top."""
    rows = [(b, "self_attn", s) for b in range(n_blocks) for s in "qkvo"]
    rows += [(b, "mlp", s) for b in range(n_blocks) for s in ("gate", "up", "down")]
    return sorted(
        rows, key=lambda r: (r[0], "qkvo".find(r[2]) if r[1] == "self_attn" else 4 + ("gate", "up", "down").index(r[2]))
    )


ROWS = matrix_rows(2)
TIMED_ACTION = """
const done = arguments[arguments.length - 1];
const t0 = performance.now();
(%s)();
requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - t0)));
"""


def synthetic_graph(n_nodes: int, n_tokens: int, n_edges: int, seed: int = 0, n_blocks: int = 2) -> nx.DiGraph:
    """A graph shaped like an influence-pruned one: embeddings, `n_nodes` in all, one logit, `n_edges` edges."""
    rows = matrix_rows(n_blocks)
    rng = random.Random(seed)
    tokens = [rng.choice([" the", " princess", " lost", ",", " her", " crown", "\n", " and"]) for _ in range(n_tokens)]
    G = nx.DiGraph(
        prompt="".join(tokens),
        prompt_tokens=tokens,
        target_pos=n_tokens - 1,
        target_token=" her",
        report={"target": 0.9, "ci": 0.8, "stochastic": 0.7, "adversarial": 0.4},
        qk_pairs=[],
        settings={},
    )
    base = {"ci": 1.0, "activation": 1.0, "index": None, "module": None, "block": None, "sublayer": None}
    for t, tok in enumerate(tokens):
        G.add_node(f"emb@{t}", **base, kind="emb", pos=t, row=0, token=tok, label=f"emb:{t}", influence=0.01)
    layer_of: dict[str, int] = {f"emb@{t}": 0 for t in range(n_tokens)}
    n_comp = n_nodes - n_tokens - 1
    for i in range(n_comp):
        # Half the nodes at the last few positions, the rest spread with a bias to the end.
        t = n_tokens - 1 - int(rng.expovariate(1 / 3)) if i % 2 else int(n_tokens * rng.random() ** 0.5)
        t = min(max(t, 0), n_tokens - 1)
        r = rng.randrange(len(rows))
        b, part, short = rows[r]
        module = f"model.layers.{b}.{part}.{short}_proj"
        node = f"comp/{module}/{i}@{t}"
        label = f"{b}.{'attn' if part == 'self_attn' else 'mlp'}.{short}:{t}:{i} fires on ' her' → writes ' crown'"
        G.add_node(
            node,
            **{**base, "module": module, "block": b, "sublayer": short, "index": i},
            kind="comp",
            pos=t,
            row=r + 1,
            token=tokens[t],
            label=label,
            influence=rng.random() ** 3,
        )
        layer_of[node] = r + 1
    logit = f"logit/7@{n_tokens - 1}"
    G.add_node(
        logit,
        **base,
        kind="logit",
        pos=n_tokens - 1,
        row=len(rows) + 1,
        token=tokens[-1],
        label="→ ' her'",
        prob=0.9,
        token_id=7,
        logit_token=" her",
        influence=0.0,
    )
    layer_of[logit] = len(rows) + 1
    by_pos: dict[int, list[str]] = {}
    for n, a in G.nodes(data=True):
        by_pos.setdefault(a["pos"], []).append(n)
    nodes = [n for n in G if not n.startswith("emb@")]
    while G.number_of_edges() < n_edges:
        v = rng.choice(nodes)
        tv = G.nodes[v]["pos"]
        ts = tv if rng.random() < 0.7 else rng.randrange(0, tv + 1)
        below = [u for u in by_pos.get(ts, []) if layer_of[u] < layer_of[v]]
        if below:
            u = rng.choice(below)
            G.add_edge(u, v, weight=rng.gauss(0, 1) * rng.random() ** 2, cross_position=ts != tv)
    return G


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False}
    )
    driver.set_script_timeout(30)
    return driver


def open_page(driver, path: Path) -> float:
    driver.get("about:blank")
    driver.get(path.as_uri())
    deadline = time.time() + 30
    while time.time() < deadline:
        ready = driver.execute_script("return window.vpdReady || 0")
        if ready:
            return float(ready)
        time.sleep(0.02)
    raise RuntimeError(f"{path} never finished drawing")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--edges", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--demo-dir", default="vpd-demo")
    parser.add_argument("--blocks", type=int, default=2, help="blocks of the synthetic model (30: SmolLM2's depth)")
    parser.add_argument("--cards", action="store_true", help="cards from the bundled run's examples on every node")
    args = parser.parse_args(argv)

    demo = sorted(Path(args.demo_dir).glob("*.html"))
    for html in demo:
        size = html.stat().st_size
        print(f"demo HTML {html.name}: {size / 1e6:.2f} MB ({size / 2e6:.2f}x of the 2 MB bound)")
    if not demo:
        print(f"no demo HTML under {args.demo_dir}; run `vpd demo --out {args.demo_dir}` to measure it")

    G = synthetic_graph(args.nodes, args.tokens, args.edges, n_blocks=args.blocks)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        harvest = None
        if args.cards:
            from decomposer.vpd.bundle import bundled_run_path

            harvest = bundled_run_path()
        path = render_html(G, Path(tmp) / "graph.html", max_edges=max(args.edges, 20_000), harvest=harvest)
        write_s = time.perf_counter() - t
        print(
            f"graph: {G.number_of_nodes():,} nodes, {G.number_of_edges():,} edges, {args.tokens} tokens; "
            f"HTML {path.stat().st_size / 1e6:.2f} MB written in {write_s:.2f} s"
            + (" (with the bundled run's cards)" if args.cards else "")
        )
        driver = browser()
        try:
            ready = [open_page(driver, path) for _ in range(args.repeats)]
            ids = driver.execute_script("return network.body.data.nodes.getIds()")
            rng = random.Random(1)
            clicks = [
                driver.execute_async_script(TIMED_ACTION % f"() => vpdExplorer.select({rng.choice(ids)!r})")
                for _ in range(10)
            ]
            moves = []
            for value in (0.9, 0.7, 0.5, 0.3, 0.6, 0.8, 0.95, 0.4, 0.2, 1.0):
                step = (
                    "() => { const s = document.getElementById('vpd-node-threshold');"
                    f" s.value = {value}; s.dispatchEvent(new Event('input')); }}"
                )
                moves.append(driver.execute_async_script(TIMED_ACTION % step))
            # The same clicks with every edge drawn (the edge slider at 1; the first view draws at most 2,000).
            driver.execute_script(
                "const s = document.getElementById('vpd-edge-threshold');"
                "s.value = 1; s.dispatchEvent(new Event('input'));"
            )
            all_edges = [
                driver.execute_async_script(TIMED_ACTION % f"() => vpdExplorer.select({rng.choice(ids)!r})")
                for _ in range(10)
            ]
            version = driver.capabilities.get("browserVersion", "?")
        finally:
            driver.quit()
    rows = [("ready", ready, 2000), ("click", clicks, 300), ("slider", moves, 300)]
    rows.append(("click, all edges", all_edges, 300))
    for name, values, bound in rows:
        med = statistics.median(values)
        print(
            f"{name:>16}: median {med:7.1f} ms (min {min(values):.1f}, max {max(values):.1f}, n={len(values)}) "
            f"= {med / bound:.2f}x of the {bound} ms bound"
        )
    print(f"Chromium {version}, headless, 1400x900")


if __name__ == "__main__":
    sys.exit(main())
