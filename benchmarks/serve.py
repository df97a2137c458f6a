"""How live `vpd serve` feels on this machine: a warm server's graph and intervention latencies.

    python benchmarks/serve.py [--repeats 5]

Starts the server in this process on 127.0.0.1 (the bundled run), warms it with one graph, then times over
HTTP: the graph of a 16-token prompt without re-fitting CI (bound 1.5 s on the 2-core CPU) and an intervention
on two subcomponents (bound 0.5 s). Prints medians and their ratios to the bounds.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

PROMPT_16 = "When Mary and John went to the store, John gave a drink to"
TOKEN = "bench"


def _post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"X-VPD-Token": TOKEN}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from circuits.serve import Session, create_app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        session = Session("bundled", out)
        load_s = time.perf_counter() - t
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(session, TOKEN), log_level="error", access_log=False))
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        n_tokens = len(session.tokenizer(PROMPT_16, add_special_tokens=False)["input_ids"])
        _post(url, "/api/graph", {"prompt": PROMPT_16})  # warm
        graphs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            data = _post(url, "/api/graph", {"prompt": PROMPT_16})
            graphs.append(time.perf_counter() - t)
        body = {"prompt": PROMPT_16, "nodes": ["0.attn.o:5", "1.mlp.up:7"], "kind": "zero"}
        _post(url, "/api/intervene", body)
        interventions = []
        for _ in range(2 * args.repeats):
            t = time.perf_counter()
            _post(url, "/api/intervene", body)
            interventions.append(time.perf_counter() - t)
        server.should_exit = True
    print(f"server start (load the bundled run): {load_s:.2f} s")
    print(
        f"graph: {n_tokens}-token prompt, {data['summary']['nodes']:,} nodes before pruning, "
        f"{data['summary']['pruned_nodes']} after"
    )
    for name, values, bound in (("graph, no re-fit", graphs, 1.5), ("intervention", interventions, 0.5)):
        med = statistics.median(values)
        print(
            f"{name:>17}: median {med:.3f} s (min {min(values):.3f}, max {max(values):.3f}, n={len(values)}) "
            f"= {med / bound:.2f}x of the {bound} s bound"
        )


if __name__ == "__main__":
    sys.exit(main())
