"""`vpd serve` over real HTTP on 127.0.0.1: the contract, its refusals, a crowd of requests, and the page in Chromium.

One server (uvicorn in a thread, port chosen by the OS) serves the bundled run for the whole module.
"""

from __future__ import annotations

import json
import re
import resource
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from circuits.cli import main

TOKEN = "test-token-0123456789"
PROMPT = "The princess lost her crown."
XSS = '</script><script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import socket

    import uvicorn

    from circuits.serve import Session, create_app

    out = tmp_path_factory.mktemp("serve")
    session = Session("bundled", out, max_tokens=64, max_waiting=4)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(session, TOKEN), log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", session, out
    server.should_exit = True
    thread.join(timeout=10)


def call(url, path, body=None, *, token=TOKEN, headers=None, raw=None, method=None):
    """(status, JSON body, headers) of one request; errors are read like successes."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"))
    if token is not None:
        request.add_header("X-VPD-Token", token)
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as err:
        text = err.read().decode()
        return err.code, json.loads(text), err.headers


def test_graph_is_the_pipelines_and_its_page_is_served(server):
    from attrgraph.explorer.payload import explorer_payload
    from attrgraph.pipeline import attribute_prompt

    url, session, out = server
    status, data, _ = call(url, "/api/graph", {"prompt": PROMPT, "target": " her", "position": 2})
    assert status == 200 and data["summary"]["target_token"] == " her" and data["summary"]["target_pos"] == 2
    graph = attribute_prompt(session.d, session.tokenizer, PROMPT, target=" her", position=2, labels=session.labels)
    want = explorer_payload(graph.pruned, harvest=session.examples)
    assert [n["id"] for n in data["payload"]["nodes"]] == [n["id"] for n in want["nodes"]]
    assert data["payload"]["edges"] == want["edges"] and data["payload"]["cards"] == want["cards"]
    assert (out / "graphs" / f"{data['id']}.html").is_file()  # nothing else is written
    page = urllib.request.Request(url + data["html"], headers={"X-VPD-Token": TOKEN})
    with urllib.request.urlopen(page, timeout=30) as response:
        html = response.read().decode()
    embedded = json.loads(re.search(r'<script type="application/json" id="vpd-data">(.*?)</script>', html, re.S)[1])
    assert embedded == data["payload"]  # the page renders the payload the API returned
    for bad in ("..%2F..%2Fetc%2Fpasswd", "0123456789ab"):
        assert call(url, f"/graphs/{bad}.html")[0] == 404


def test_intervene_matches_vpd_ablate(server, capsys):
    url, _, _ = server
    nodes = ["0.attn.o:5", "comp/model.layers.1.mlp.down_proj/3@2"]
    status, data, _ = call(
        url, "/api/intervene", {"prompt": "The princess lost", "nodes": nodes, "kind": "zero", "generate": 4}
    )
    assert status == 200
    assert (
        main(
            [
                "ablate",
                "--run",
                "bundled",
                "--prompt",
                "The princess lost",
                "--nodes",
                *nodes,
                "--generate",
                "4",
                "--json",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert data["p_after"] == printed["p_after"] and data["p_before"] == printed["p_before"]
    assert data["top_after"] == printed["top_after"] and data["generation"] == printed["generation"]
    scaled = call(
        url, "/api/intervene", {"prompt": "The princess lost", "nodes": nodes[:1], "kind": "scale", "scale": 1.0}
    )[1]
    assert scaled["p_after"] == pytest.approx(scaled["p_before"], rel=1e-6)  # a scale of 1 changes nothing


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        ({"token": None}, 403, "missing or wrong token"),
        ({"token": "wrong"}, 403, "missing or wrong token"),
        ({"headers": {"Host": "evil.example:80"}}, 400, "is not this server's"),
        ({"raw": b"{not json"}, 400, "not valid JSON"),
        ({"raw": b"[1, 2]"}, 400, "must be one JSON object"),
        ({"raw": b'{"prompt": "' + b"a" * 70_000 + b'"}'}, 413, "larger than 64 KB"),
        ({"body": {"prompt": "word " * 200}}, 413, "more than this server's 64"),
        ({"body": {"prompt": ""}}, 400, "`prompt` must be non-empty text"),
        ({"body": {"prompt": PROMPT, "optimize": "magic"}}, 400, "`optimize` must be one of"),
        ({"body": {"prompt": PROMPT, "optimize": "adversarial"}}, 400, "`target` is required"),
        ({"body": {"prompt": PROMPT, "target": " her and more"}}, 400, "not one"),
        ({"body": {"prompt": PROMPT, "position": "two"}}, 400, "`position` must be"),
    ],
)
def test_bad_graph_requests_get_one_sentence(server, kwargs, status, words):
    url, _, _ = server
    kwargs = {"body": {"prompt": PROMPT}} | kwargs
    got, data, _ = call(url, "/api/graph", kwargs.pop("body"), **kwargs)
    assert got == status and words in data["error"], data
    assert "Traceback" not in data["error"] and data["error"].count(". ") <= 1


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"prompt": "The princess lost", "nodes": ["9.attn.o:5"]}, "names no decomposed matrix"),
        ({"prompt": "The princess lost", "nodes": ["0.attn.o:99999"]}, "0.attn.o:99999"),
        ({"prompt": "The princess lost", "nodes": []}, "`nodes` must be a list"),
        ({"prompt": "The princess lost", "nodes": ["0.attn.o:5"], "kind": "melt"}, "`kind` must be one of"),
        ({"prompt": "The princess lost", "nodes": ["0.attn.o:5"], "kind": "scale"}, "`scale` goes with kind scale"),
        ({"prompt": "The princess lost", "nodes": ["0.attn.o:5"], "generate": 1000}, "`generate` must be"),
    ],
)
def test_bad_interventions_get_one_sentence(server, body, words):
    url, _, _ = server
    status, data, _ = call(url, "/api/intervene", body)
    assert status == 400 and words in data["error"] and "Traceback" not in data["error"]


def test_unknown_routes_and_methods(server):
    url, _, _ = server
    assert call(url, "/api/nothing")[0] == 404
    assert call(url, "/api/graph", method="GET")[0] == 405
    assert call(url, "/", token=None)[0] == 403  # the page too needs the token


def test_progress_follows_a_fit(server):
    url, _, _ = server
    seen = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(call(url, "/api/progress")[1])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    status, _, _ = call(
        url, "/api/graph", {"prompt": PROMPT, "target": " her", "position": 2, "optimize": "ci", "steps": 40}
    )
    done.set()
    watcher.join()
    assert status == 200
    steps = [p["done"] for p in seen if p["phase"] == "optimize-ci" and p["total"] == 40]
    assert steps and max(steps) <= 40 and steps == sorted(steps)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_crowd_of_40_mixed_requests(server):
    """All complete or get 503 with Retry-After; answers are the sequential ones (no interleaved hooks)."""
    url, _, _ = server
    ablate = {"prompt": "The princess lost", "nodes": ["0.attn.o:5", "1.mlp.up:7"], "kind": "zero"}
    alone = call(url, "/api/intervene", ablate)[1]["p_after"]
    graph_alone = call(url, "/api/graph", {"prompt": "The prince lost his"})[1]["summary"]
    before = _rss_mb()
    jobs = [("/api/intervene", ablate), ("/api/graph", {"prompt": "The prince lost his"}), ("/api/progress", None)]

    def one(i):
        path, body = jobs[i % 3]
        return path, call(url, path, body)

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=40) as pool:
        results = list(pool.map(one, range(40)))
    assert time.monotonic() - start < 300
    statuses = [r[1][0] for r in results]
    assert set(statuses) <= {200, 503}, statuses
    for path, (status, data, headers) in results:
        if status == 503:
            assert headers.get("Retry-After") == "2" and "waiting for the model" in data["error"]
        elif path == "/api/intervene":
            assert data["p_after"] == alone
        elif path == "/api/graph":
            assert data["summary"]["pruned_nodes"] == graph_alone["pruned_nodes"]
    assert statuses.count(200) >= 14  # every progress call and at least the requests that fit in line
    assert call(url, "/api/progress")[0] == 200  # still up
    assert _rss_mb() - before < 1500


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--host", "0.0.0.0"], "is not a loopback address"),
        (["--port", "70000"], "`--port` must be in [0, 65535]"),
        (["--max-tokens", "0"], "`--max-tokens` must be ≥ 1"),
    ],
)
def test_cli_refusals(args, words, capsys):
    assert main(["serve", "--run", "bundled", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# The page, as a person uses it


@pytest.fixture(scope="module")
def browser():
    import shutil

    if not shutil.which("chromedriver") and not shutil.which("/usr/bin/chromedriver"):
        pytest.skip("chromium-driver is not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
        "--disable-background-networking",
        "--no-first-run",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


@pytest.mark.browser
def test_the_served_page_builds_ablates_and_keeps_text_as_text(server, browser, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, _ = server
    browser.get(f"{url}/?token={TOKEN}")
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    browser.find_element(By.ID, "target").send_keys(" her")
    browser.find_element(By.ID, "position").send_keys("2")
    browser.find_element(By.ID, "build").click()
    ready = "var f = document.getElementById('frame'); return !!(f.contentWindow && f.contentWindow.vpdReady)"
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(ready))
    # Select one node and pin another in the graph, then ablate both from the page.
    nodes = browser.execute_script(
        "var x = document.getElementById('frame').contentWindow;"
        "var ids = x.network.body.data.nodes.getIds().filter(id => id.indexOf('comp/') === 0).slice(0, 2);"
        "x.vpdExplorer.togglePin(ids[0]); x.vpdExplorer.togglePin(ids[1]); return ids;"
    )
    browser.find_element(By.ID, "ablate-pinned").click()
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return !!document.getElementById('p-after')"))
    shown = float(browser.find_element(By.ID, "p-after").text)
    assert (
        main(
            [
                "ablate",
                "--run",
                "bundled",
                "--prompt",
                PROMPT,
                "--target",
                " her",
                "--position",
                "2",
                "--nodes",
                *nodes,
                "--json",
            ]
        )
        == 0
    )
    assert shown == pytest.approx(json.loads(capsys.readouterr().out)["p_after"], abs=5e-5)
    # A hostile prompt is text: in the page, in the graph's title, in the intervention's echo.
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(XSS)
    browser.find_element(By.ID, "target").clear()
    browser.find_element(By.ID, "position").clear()
    browser.find_element(By.ID, "build").click()
    WebDriverWait(browser, 60).until(
        lambda d: d.execute_script(
            "return document.getElementById('status').textContent.indexOf('nodes') >= 0"
            " || document.getElementById('status').className === 'err'"
        )
    )
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(ready))
    assert browser.execute_script("return window.__pwned") is None
    assert browser.execute_script("return document.getElementById('frame').contentWindow.__pwned") is None
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
