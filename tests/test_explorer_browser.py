"""The graph explorer in a real browser: headless Chromium driven through chromedriver (Debian packages).

One browser serves every test; each test opens a freshly written page. `make test` installs
chromium and chromium-driver through apt when they are missing; without them these tests skip.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import networkx as nx
import pytest

from attrgraph.export import load_graph_json
from attrgraph.render import render_html

pytestmark = pytest.mark.browser

CHROMIUM, DRIVER = "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Each would run if the page let text through as markup or script.
XSS_SCRIPT = "</script><script>window.__pwned = 1</script>"
XSS_IMG = '<img src=x onerror="window.__pwned = 2">'
TOKENS = ["<|endoftext|>", " The", XSS_SCRIPT, XSS_IMG, " her"]
SUBLAYERS = (("self_attn", "q"), ("self_attn", "k"), ("self_attn", "o"), ("mlp", "up"), ("mlp", "down"))


def _module(block: int, part: str, short: str) -> str:
    return f"model.layers.{block}.{part}.{short}_proj"


def explorer_graph(n_blocks: int = 2, per_cell: int = 3) -> nx.DiGraph:
    """A small pruned graph over the hostile tokens: every matrix of every block at every position, chained."""
    T = len(TOKENS)
    G = nx.DiGraph(
        prompt="".join(TOKENS),
        prompt_tokens=list(TOKENS),
        target_pos=T - 1,
        target_token=" crown",
        report={"target": 0.75, "ci": 0.7, "stochastic": 0.6, XSS_IMG: 0.5},
        qk_pairs=[],
        settings={"model": XSS_SCRIPT},
    )
    base = {"module": None, "block": None, "sublayer": None, "index": None, "ci": 1.0, "activation": 1.0}
    below: dict[int, list[str]] = {}
    for t, tok in enumerate(TOKENS):
        G.add_node(f"emb@{t}", **base, kind="emb", pos=t, row=0, token=tok, label=f"emb:{t} {tok!r}", influence=0.1)
        below[t] = [f"emb@{t}"]
    row = 0
    for b in range(n_blocks):
        for part, short in SUBLAYERS:
            row += 1
            module = _module(b, part, short)
            for t, tok in enumerate(TOKENS):
                here = []
                for c in range(per_cell):
                    node = f"comp/{module}/{c}@{t}"
                    attrs = {**base, "module": module, "block": b, "sublayer": short, "index": c}
                    label = f"{b}.{'attn' if part == 'self_attn' else 'mlp'}.{short}:{t}:{c} {XSS_IMG}"
                    influence = 0.01 * (1 + c + t + row)
                    G.add_node(node, **attrs, kind="comp", pos=t, row=row, token=tok, label=label, influence=influence)
                    for j, src in enumerate(below[t]):
                        G.add_edge(src, node, weight=(-1) ** (j + c) * 0.1 * (1 + j), cross_position=False)
                    here.append(node)
                below[t] = here
    for t in range(T - 1):  # cross-position edges into the last position's first o node
        G.add_edge(
            f"comp/{_module(0, 'self_attn', 'k')}/0@{t}",
            f"comp/{_module(0, 'self_attn', 'o')}/0@{T - 1}",
            weight=0.3,
            cross_position=True,
        )
    logit = f"logit/7@{T - 1}"
    G.add_node(
        logit,
        **base,
        kind="logit",
        pos=T - 1,
        row=row + 1,
        token=TOKENS[-1],
        label="→ ' crown' p=0.75",
        prob=0.75,
        token_id=7,
        logit_token=" crown",
        influence=0.0,
    )
    for src in below[T - 1]:
        G.add_edge(src, logit, weight=1.0, cross_position=False)
    o_node = f"comp/{_module(0, 'self_attn', 'o')}/0@{T - 1}"
    G.graph["qk_pairs"] = [
        {
            "o_node": o_node,
            "q_node": f"comp/{_module(0, 'self_attn', 'q')}/0@{T - 1}",
            "k_node": f"comp/{_module(0, 'self_attn', 'k')}/1@1",
            "key_pos": 1,
            "strength": 0.5,
            "q_label": XSS_SCRIPT,
        }
    ]
    return G


HARVEST = {
    "0.mlp.down:0": {
        "density": 0.004,
        "input_precision": [{"id": 1, "token": " crown"}, {"id": 2, "token": XSS_SCRIPT}],
        "output": [{"id": 3, "token": " jewel"}],
        "top_examples": [{"tokens": [4, 1, 5], "center": 1, "ci": 0.99, "text": [" the", " crown", XSS_IMG]}],
        "label": "fires on ' crown'",
    }
}


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.skip("Debian chromium and chromium-driver are not installed; `make browser-deps` installs them.")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False}
    )
    yield driver
    driver.quit()


def _open(driver, path: Path) -> None:
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get_log("performance")
    driver.get(path.as_uri())
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return !!window.vpdReady"))


def _errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def _click_node(driver, node: str, *, ctrl: bool = False, hover_only: bool = False) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.execute_script("vpdExplorer.select(null); network.focus(arguments[0], {animation: false});", node)
    pos = driver.execute_script(
        "var p = network.getPositions([arguments[0]])[arguments[0]]; var d = network.canvasToDOM(p);"
        "var c = document.querySelector('#vpd-graph canvas');"
        "return [d.x - c.clientWidth / 2, d.y - c.clientHeight / 2];",
        node,
    )
    canvas = driver.find_element(By.CSS_SELECTOR, "#vpd-graph canvas")
    chain = ActionChains(driver).move_to_element_with_offset(canvas, int(pos[0]), int(pos[1])).pause(0.2)
    if not hover_only:
        chain = chain.key_down(Keys.CONTROL).click().key_up(Keys.CONTROL) if ctrl else chain.click()
    chain.perform()


def test_page_loads_nothing_and_runs_no_injected_code(browser, tmp_path):
    path = render_html(explorer_graph(), tmp_path / "g.html", title=XSS_SCRIPT, harvest=HARVEST)
    _open(browser, path)
    requests = [
        json.loads(e["message"])["message"]["params"]["request"]["url"]
        for e in browser.get_log("performance")
        if '"Network.requestWillBeSent"' in e["message"]
    ]
    assert requests == [path.as_uri()]
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert browser.execute_script("return window.__pwned") is None
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    assert browser.title == XSS_SCRIPT
    panel = browser.execute_script("return document.getElementById('vpd-panel').textContent")
    assert XSS_IMG in panel and "".join(TOKENS) in panel
    assert browser.execute_script("return document.querySelectorAll('#vpd-report th').length") == 4
    _click_node(browser, f"comp/{_module(1, 'mlp', 'down')}/0@4", hover_only=True)
    assert browser.execute_script("return window.__pwned") is None
    assert _errors(browser) == []


def test_hover_card_shows_an_activating_example(browser, tmp_path):
    _open(browser, render_html(explorer_graph(), tmp_path / "g.html", harvest=HARVEST))
    node = f"comp/{_module(0, 'mlp', 'down')}/0@2"
    _click_node(browser, node, hover_only=True)
    card = browser.execute_script(
        "var c = document.getElementById('vpd-card');"
        "var marks = Array.from(c.querySelectorAll('mark')).map(m => m.textContent);"
        "return [getComputedStyle(c).display, c.textContent, marks];"
    )
    assert card[0] == "block"
    assert "0.mlp.down:0" in card[1] and "Top activating examples" in card[1] and "0.004" in card[1]
    assert card[2] == ["\u2423crown"]  # the firing token highlighted, its space made visible
    assert XSS_IMG.replace(" ", "\u2423") in card[1] and "stats" in card[1]  # the label's kind is marked
    assert browser.execute_script("return window.__pwned") is None
    assert _errors(browser) == []


def test_click_shows_the_dashboard_and_the_link_keeps_it(browser, tmp_path):
    G = explorer_graph()
    node = f"comp/{_module(0, 'mlp', 'down')}/0@2"
    G.nodes[node]["label_source"] = "llm"
    G.nodes[node]["label"] = f"0.mlp.down:0 the crown {XSS_SCRIPT}"
    cards = {
        "0.mlp.down:0": {
            **HARVEST["0.mlp.down:0"],
            "input_precision": [{"id": 1, "token": " crown", "precision": 0.9, "recall": 0.5}],
            "cofiring": [{"key": "0.mlp.up:1", "jaccard": 0.4}, {"key": "3.mlp.up:9", "jaccard": 0.2}],
            "top_examples": [
                {"tokens": [4, 1, 5], "center": 1, "ci": 0.99, "text": [" the", " crown", XSS_IMG]},
                {"tokens": [1, 4], "center": 0, "ci": 0.5, "ci_window": [0.5, 0.25], "text": [" crown", " the"]},
            ],
        }
    }
    _open(browser, render_html(G, tmp_path / "g.html", harvest=cards))
    _click_node(browser, node)

    def dashboard():
        return browser.execute_script(
            "var p = document.getElementById('vpd-selected');"
            "return {text: p.textContent, heads: Array.from(p.querySelectorAll('h3')).map(h => h.textContent),"
            " marks: Array.from(p.querySelectorAll('.dash mark')).map(m => m.textContent),"
            " shade: Array.from(p.querySelectorAll('.dash .ex'))[1].children[1].style.background,"
            " badges: Array.from(p.querySelectorAll('.src')).map(b => b.textContent)}"
        )

    got = dashboard()
    assert "Top activating contexts (2, CI shaded)" in got["heads"] and "Co-fires with (Jaccard)" in got["heads"]
    assert got["marks"] == ["\u2423crown", "\u2423crown"]
    assert got["shade"].startswith("rgba(245, 158, 11")  # a non-firing token with CI 0.25 is shaded
    assert got["badges"] == ["LLM", "stats"]  # the LLM label, with the offline one beneath it
    assert "Fires on" in got["text"] and "90.0" in got["text"] and "\u2423jewel" in got["text"]
    assert f"the crown {XSS_SCRIPT}" in got["text"]
    # A partner in the graph is a link to it; one outside the graph is marked as such.
    items = browser.execute_script(
        "return Array.from(document.querySelectorAll('#vpd-selected .dash li')).map(li => [li.textContent, li.title])"
    )
    assert [title for _, title in items] == ["in this graph: click to select", "not in this graph"]
    url = browser.current_url
    browser.get("about:blank")
    _open_url(browser, url)
    assert dashboard()["heads"] == got["heads"]  # the selection, and so its dashboard, live in the link
    # A q node lists the keys it pairs with.
    q = f"comp/{_module(0, 'self_attn', 'q')}/0@4"
    _click_node(browser, q)
    text = browser.execute_script("return document.getElementById('vpd-selected').textContent")
    assert "Keys it pairs with (q/k strength)" in text and "0.attn.k:1 @1" in text
    assert browser.execute_script("return window.__pwned") is None
    assert _errors(browser) == []


def test_demo_pages_show_examples_and_dashboards(browser, demo_run, tmp_path):
    """The `vpd demo` pages with no flag: ≥ 80% of subcomponent nodes have examples on hover and a dashboard."""
    summary, out = demo_run
    for graph_type, g in summary["graphs"].items():
        _open(browser, out / Path(g["files"]["html"]).name)
        counts = browser.execute_script(
            "var ids = network.body.data.nodes.getIds().filter(id => id.indexOf('comp/') === 0), hover = 0, dash = 0;"
            "ids.forEach(function (id) {"
            "  var card = vpdExplorer.hoverCard(id);"
            "  if (card.querySelectorAll('.ex mark').length >= 2) { hover++; }"
            "  vpdExplorer.select(id);"
            "  var p = document.getElementById('vpd-selected');"
            "  if (p.querySelectorAll('.dash .ex').length >= 8 && p.querySelector('.dash-t')) { dash++; }"
            "});"
            "vpdExplorer.select(null);"
            "return [ids.length, hover, dash];"
        )
        n, hover, dash = counts
        assert n > 0 and hover >= 0.8 * n and dash >= 0.8 * n, (graph_type, counts)
        # And as a person does it: hover one node with the mouse, then click it.
        node = browser.execute_script(
            "return network.body.data.nodes.getIds().filter(id => id.indexOf('comp/') === 0"
            " && vpdExplorer.hoverCard(id).querySelectorAll('.ex mark').length)[0]"
        )
        _click_node(browser, node, hover_only=True)
        assert browser.execute_script("return document.querySelectorAll('#vpd-card .ex mark').length") >= 2
        _click_node(browser, node)
        assert browser.execute_script("return document.querySelectorAll('#vpd-selected .dash .ex').length") >= 8
        browser.save_screenshot(str(tmp_path / f"demo-{graph_type}.png"))
        assert _errors(browser) == []


def test_click_lists_inputs_and_outputs(browser, tmp_path):
    G = explorer_graph()
    _open(browser, render_html(G, tmp_path / "g.html"))
    node = f"comp/{_module(0, 'self_attn', 'o')}/0@4"
    _click_node(browser, node)
    assert browser.execute_script("return vpdExplorer.state.sel") == node
    heads = browser.execute_script(
        "return Array.from(document.querySelectorAll('#vpd-selected h3')).map(h => h.textContent)"
    )
    assert f"Inputs ({G.in_degree(node)})" in heads and f"Outputs ({G.out_degree(node)})" in heads
    assert "q/k pairs (1, dashed)" in heads
    weights = browser.execute_script(
        "var ul = document.querySelectorAll('#vpd-selected ul')[0];"
        "return Array.from(ul.querySelectorAll('.w')).map(w => parseFloat(w.textContent));"
    )
    positive, negative = [w for w in weights if w >= 0], [w for w in weights if w < 0]
    assert positive and negative and weights == positive + negative  # positive first, each strongest first
    assert positive == sorted(positive, reverse=True) and negative == sorted(negative)
    assert _errors(browser) == []


def test_sliders_change_the_visible_nodes(browser, tmp_path):
    G = explorer_graph()
    _open(browser, render_html(G, tmp_path / "g.html"))

    def visible() -> int:
        return browser.execute_script("return network.body.data.nodes.get({filter: n => !n.hidden}).length")

    assert visible() == G.number_of_nodes()
    browser.execute_script(
        "var s = document.getElementById('vpd-node-threshold'); s.value = 0.3; s.dispatchEvent(new Event('input'));"
    )
    fewer = visible()
    n_fixed = sum(1 for _, k in G.nodes(data="kind") if k in ("emb", "logit"))
    assert n_fixed < fewer < G.number_of_nodes()
    assert browser.execute_script("return +document.getElementById('vpd-counts').dataset.nodes") == fewer
    browser.execute_script(
        "var s = document.getElementById('vpd-edge-threshold'); s.value = 0.5; s.dispatchEvent(new Event('input'));"
    )
    assert browser.execute_script("return +document.getElementById('vpd-counts').dataset.edges") < G.number_of_edges()
    assert '"n":0.3' in browser.execute_script("return decodeURIComponent(location.hash)")
    assert _errors(browser) == []


def test_pin_group_export_reads_back_and_the_link_reopens_the_view(browser, tmp_path):
    G = explorer_graph()
    path = render_html(G, tmp_path / "g.html")
    _open(browser, path)
    pins = [f"comp/{_module(1, 'mlp', 'down')}/0@4", f"comp/{_module(1, 'mlp', 'up')}/0@4", "logit/7@4"]
    for node in pins:
        _click_node(browser, node, ctrl=True)
    assert browser.execute_script("return vpdExplorer.state.pins") == pins
    from selenium.webdriver.common.by import By

    for box in browser.find_elements(By.CSS_SELECTOR, ".vpd-pin-check")[:2]:
        box.click()
    browser.find_element(By.ID, "vpd-sn-name").send_keys(f"late MLP {XSS_IMG}")
    browser.find_element(By.ID, "vpd-group").click()
    _click_node(browser, pins[0])
    exported = tmp_path / "subgraph.json"
    exported.write_text(browser.execute_script("return vpdExplorer.exportJSON()"), encoding="utf-8")
    H = load_graph_json(exported)
    assert list(H.nodes) == pins
    assert set(H.edges) == {(u, v) for u, v in G.edges if u in pins and v in pins}
    assert H.graph["supernodes"] == [{"name": f"late MLP {XSS_IMG}", "members": pins[:2]}]
    assert H.nodes[pins[0]]["supernode"] == f"late MLP {XSS_IMG}" and "supernode" not in H.nodes["logit/7@4"]
    assert H.nodes[pins[0]]["label"] == G.nodes[pins[0]]["label"] and H.graph["prompt_tokens"] == TOKENS
    assert H.edges[pins[1], pins[0]]["weight"] == G.edges[pins[1], pins[0]]["weight"]

    url = browser.current_url
    assert "#" in url
    browser.get("about:blank")
    _open_url(browser, url)
    state = browser.execute_script("return vpdExplorer.state")
    assert state["pins"] == pins and state["sel"] == pins[0]
    assert state["groups"] == [[f"late MLP {XSS_IMG}", pins[:2]]]
    assert browser.execute_script("return network.getSelectedNodes()") == [pins[0]]
    assert browser.execute_script("return window.__pwned") is None
    assert _errors(browser) == []


def _open_url(driver, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return !!window.vpdReady"))


def test_svg_export_and_long_prompt_view(browser, tmp_path):
    """A 200-token prompt opens with readable columns (it scrolls rather than squashing) at the target's end."""
    G = nx.DiGraph(prompt="x" * 200, prompt_tokens=[f" w{t}" for t in range(200)], target_pos=199, target_token=" y")
    base = {"module": None, "block": None, "sublayer": None, "index": None, "ci": 1.0, "activation": 1.0}
    for t in range(200):
        G.add_node(f"emb@{t}", **base, kind="emb", pos=t, row=0, token=f" w{t}", label="", influence=0.0)
    _open(browser, render_html(G, tmp_path / "g.html"))
    view = browser.execute_script(
        "var c = document.querySelector('#vpd-graph canvas');"
        "return [network.getScale() * 96, network.DOMtoCanvas({x: c.clientWidth - 1, y: 0}).x];"
    )
    assert view[0] >= 40  # a column is at least 40 px wide on screen
    assert view[1] > 199 * 96  # the last column is in view
    svg = browser.execute_script("return vpdExplorer.exportSVG()")
    assert svg.startswith("<svg") and "\u2423w199" in svg and svg.count("<circle") == 200
    png = browser.execute_script("return document.querySelector('#vpd-graph canvas').toDataURL('image/png')")
    assert png.startswith("data:image/png;base64,") and len(png) > 10_000  # the PNG export's source
    assert _errors(browser) == []


def test_a_30_block_graph_opens_in_block_rows_and_expands(browser, tmp_path):
    """A deep model (30 blocks × 5 matrices in the graph): one row per block first, a button for matrix rows."""
    G = explorer_graph(n_blocks=30, per_cell=1)
    path = render_html(G, tmp_path / "g.html")
    _open(browser, path)

    def view():
        return browser.execute_script(
            "var ids = network.body.data.nodes.getIds(), ys = {};"
            "ids.forEach(function (id) { ys[network.getPositions([id])[id].y] = 1; });"
            "var button = document.getElementById('vpd-rows').textContent;"
            "return [button, Object.keys(ys).length, vpdExplorer.state.layout];"
        )

    assert view() == ["rows: per block", 32, "block"]  # Emb, L0…L29, Logits
    node = f"comp/{_module(12, 'mlp', 'down')}/0@4"
    _click_node(browser, node)
    text = browser.execute_script("return document.getElementById('vpd-selected').textContent")
    assert "L12 mlp down" in text  # the matrix is named though its row is the block's
    browser.find_element("id", "vpd-rows").click()
    assert view() == ["rows: per matrix", 30 * 5 + 2, "matrix"]
    url = browser.current_url
    browser.get("about:blank")
    _open_url(browser, url)
    assert view()[2] == "matrix"  # the choice lives in the link
    assert _errors(browser) == []
