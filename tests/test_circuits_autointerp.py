"""`vpd autointerp` against a local server that speaks the chat-completions protocol, scripted per subcomponent.

The server (`FakeLLM`, bound to 127.0.0.1 for one test) answers a label, a refusal, a malformed reply, a 429 with
`Retry-After`, a 401/404, or hangs past the client's timeout; it records every request and how many were in
flight at once. The examples artifact is built by hand (`make_examples`), so no trained run is needed.
"""

from __future__ import annotations

import http.server
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from attrgraph.examples import ComponentExamples, tensor_names
from attrgraph.labels import (
    AUTOINTERP_LABELS,
    LABELS_FORMAT,
    LABELS_FORMAT_VERSION,
    label_source,
    labels_for_run,
    read_label_file,
)
from circuits.autointerp import ChatClient, EndpointError, label_subcomponents, load_template, parse_label
from circuits.autointerp.cache import LabelCache
from circuits.autointerp.prompt import ReplyRejected, render_messages
from circuits.cli import main
from decomposer.errors import VpdError

VOCAB = ("<s>", " the", " princess", " lost", " her", " crown", ".", "\n", " she", " found")
N_KEYS, K, WINDOW, L, P = 6, 4, 2, 3, 2


def make_examples(n: int = N_KEYS) -> ComponentExamples:
    """`n` alive subcomponents `0.attn.q:i`; row i fires i+1 times (so the densest is the last), on token ' her'."""
    g = torch.Generator().manual_seed(0)
    w = 2 * WINDOW + 1
    ctx = torch.randint(0, len(VOCAB), (n, K, w), generator=g, dtype=torch.int32)
    ctx[:, :, WINDOW] = 4  # ' her'
    ctx[0, 1:] = -1  # row 0 has one context
    ctx[1, :, 0] = -1  # row 1's windows are cut at the sequence start
    ids = torch.tensor([[4, 8, -1]] * n, dtype=torch.int64)
    score = torch.tensor([[0.9, 0.3, 0.0]] * n)

    def none() -> torch.Tensor:
        return torch.full((n, L), -1, dtype=torch.int64)

    tensors = {
        "density": torch.arange(1, n + 1, dtype=torch.float32) / 100,
        "mean_ci": torch.full((n,), 0.05),
        "firing_count": torch.arange(1, n + 1, dtype=torch.int64),
        "context_tokens": ctx,
        "context_ci": torch.rand((n, K, w), generator=g).half(),
        "input_tokens": ids,
        "input_precision": score,
        "input_recall": score / 2,
        "output_tokens": torch.tensor([[5, -1, -1]] * n),
        "output_pmi": torch.tensor([[1.5, 0.0, 0.0]] * n),
        "output_bottom_tokens": none(),
        "output_bottom_pmi": torch.zeros(n, L),
        "promote_tokens": none(),
        "promote_logit": torch.zeros(n, L),
        "suppress_tokens": none(),
        "suppress_logit": torch.zeros(n, L),
        "cofire_rows": torch.full((n, P), -1, dtype=torch.int64),
        "cofire_jaccard": torch.zeros(n, P),
    }
    assert set(tensors) == set(tensor_names())
    tensors["promote_tokens"][2, 0] = 5  # row 2 writes the residual stream: ' crown' by the logit lens
    keys = tuple(f"0.attn.q:{i}" for i in range(n))
    return ComponentExamples(
        keys=keys,
        vocab=VOCAB,
        window=WINDOW,
        made={"n_tokens": 1000, "tau_fire": 0.1},
        words={keys[0]: [["her", 1.0]]},
        labels={k: f"fires on ' her' ({k})" for k in keys},
        tensors=tensors,
    )


@pytest.fixture
def run(tmp_path) -> Path:
    """A folder holding only an examples artifact, as `vpd harvest --out` leaves it."""
    make_examples().save(tmp_path / "h")
    return tmp_path / "h"


class FakeLLM:
    """A chat-completions server on 127.0.0.1, scripted per subcomponent key (read from the prompt).

    `script[key]` is a list of behaviours used one per request for that key (then `("ok",)` for good):
    ("ok",) / ("ok", text), ("refuse",), ("refusal_field",), ("malformed",), ("no_choices",),
    ("status", code, retry_after), ("hang", seconds).
    """

    def __init__(self, script=None, delay: float = 0.0) -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.delay = delay
        self.requests: list[dict] = []
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.after: tuple[int, tuple] | None = None  # from request n on, this behaviour for every key
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                with fake.lock:
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                try:
                    fake.handle(self)
                finally:
                    with fake.lock:
                        fake.inflight -= 1

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def keys(self) -> list[str]:
        return [r["key"] for r in self.requests]

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        key = re.search(r"Label one subcomponent \(([^)]+)\)", body["messages"][-1]["content"])[1]
        with self.lock:
            n = len(self.requests)
            self.requests.append(
                {"key": key, "path": h.path, "headers": dict(h.headers), "body": body, "t": time.time()}
            )
            queue = self.script.get(key)
            todo = queue.pop(0) if queue else ("ok",)
            if self.after is not None and n >= self.after[0]:
                todo = self.after[1]
        if self.delay:
            time.sleep(self.delay)
        kind = todo[0]
        if kind == "hang":
            self.release.wait(todo[1])
            todo = ("ok",)
        try:
            if kind == "status":
                payload = json.dumps({"error": {"message": f"status {todo[1]} for {key}"}}).encode()
                self.send(h, todo[1], payload, {"Retry-After": str(todo[2])} if len(todo) > 2 else {})
            elif kind == "malformed":
                self.send(h, 200, b'{"choices": [{"message": ')
            elif kind == "no_choices":
                self.send(h, 200, b'{"object": "chat.completion", "choices": []}')
            else:
                message = {"role": "assistant", "content": f"Label: 'her' in {key}"}
                if kind == "ok" and len(todo) > 1:
                    message["content"] = todo[1]
                if kind == "refuse":
                    message["content"] = "I'm sorry, but I can't help with that."
                if kind == "refusal_field":
                    message = {"role": "assistant", "content": None, "refusal": "I cannot help with this request."}
                reply = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": message}]}
                self.send(h, 200, json.dumps(reply).encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a hang past its timeout)

    @staticmethod
    def send(h, status: int, payload: bytes, headers: dict | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(payload)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def llm():
    servers: list[FakeLLM] = []

    def start(script=None, delay: float = 0.0) -> FakeLLM:
        servers.append(FakeLLM(script, delay))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def client_for(server: FakeLLM, **kw) -> ChatClient:
    return ChatClient(server.url, "tiny-model", **{"timeout": 5.0, "backoff": 0.01, **kw})


def labels_file(folder: Path) -> Path:
    return folder.joinpath(*AUTOINTERP_LABELS)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------------------------------
# The prompt and the reply parser


def test_template_is_versioned_and_filled_from_a_card():
    template = load_template()
    assert template.version == "1" and len(template.sha) == 12
    ex = make_examples()
    system, user = render_messages(template, ex.card("0.attn.q:2", n_contexts=30), max_contexts=30)
    assert system["role"] == "system" and user["role"] == "user"
    text = user["content"]
    assert "$" not in text  # every placeholder filled
    assert "Label one subcomponent (0.attn.q:2)" in text and "query projection (q) of attention in block 0" in text
    assert "CI > 0.1" in text and "3% of the 1,000 tokens" in text and "about 1 in 33 tokens" in text
    assert '" her": precision 90%, recall 45%' in text and '" crown": +1.50' in text  # inputs, outputs by PMI
    assert 'promotes: " crown"' in text  # logit lens of a matrix that writes the residual stream
    assert text.count("<< her>>") == K  # every context marks the firing token
    assert "at most 8 words" in text and '"unclear"' in text
    lone = render_messages(template, ex.card("0.attn.q:1"))[1]["content"]
    assert "not applicable" in lone  # no logit lens for this one
    first = render_messages(template, ex.card("0.attn.q:0"))[1]["content"]
    assert "1. " in first and "2. " not in first.split("contexts where")[-1]  # its only context
    assert render_messages(template, ex.card("0.attn.q:3"), max_contexts=2)[1]["content"].count("<< her>>") == 2


def test_a_custom_template_must_declare_its_version_and_known_placeholders(tmp_path):
    bad = tmp_path / "t.md"
    bad.write_text("=== system ===\nx\n=== user ===\n$key\n")
    with pytest.raises(VpdError, match="no `version: V` line"):
        load_template(bad)
    bad.write_text("version: 2\n=== system ===\nx\n=== user ===\n$key $nonsense\n")
    with pytest.raises(VpdError, match=r"unknown placeholder\(s\) \$nonsense"):
        load_template(bad)
    bad.write_text("version: 2\n=== system ===\nx\n=== user ===\nLabel $key, $$5\n")
    custom = load_template(bad)
    assert custom.version == "2" and custom.sha != load_template().sha
    assert render_messages(custom, make_examples().card("0.attn.q:0"))[1]["content"] == "Label 0.attn.q:0, $5"


@pytest.mark.parametrize(
    ("content", "label"),
    [
        ('Label: "second-person pronoun"\nextra words', "second-person pronoun"),
        ("**closing parenthesis**.", "closing parenthesis"),
        ("- ' her' after a verb", "' her' after a verb"),
        ('{"label": "plural -s endings", "confidence": "high"}', "plural -s endings"),
        ("<think>hmm, pronouns</think>\n\nher/his pronouns", "her/his pronouns"),
        ("x" * 100, "x" * 80),
        ("words " * 30, ("words " * 13).strip()),  # cut at a word boundary
    ],
)
def test_parse_label(content, label):
    assert parse_label(content) == label


@pytest.mark.parametrize(
    ("content", "kw", "kind"),
    [
        ("I'm sorry, but I can't help with that.", {}, "refusal"),
        ("I cannot label this.", {}, "refusal"),
        (None, {"refusal": "I can't assist."}, "refusal"),
        ("her", {"finish_reason": "content_filter"}, "refusal"),
        (None, {}, "malformed"),
        ("  \n ", {}, "malformed"),
        ("<think>still thinking about it", {}, "malformed"),
        ("Unclear.", {}, "unclear"),
    ],
)
def test_parse_rejects_what_is_no_label(content, kw, kind):
    with pytest.raises(ReplyRejected) as err:
        parse_label(content, **kw)
    assert err.value.kind == kind


# ---------------------------------------------------------------------------------------------------
# Against the local server


def test_labels_every_subcomponent_densest_first_and_writes_the_labels_file(llm, run, monkeypatch):
    server = llm()
    result = label_subcomponents(make_examples(), run, client_for(server, api_key="sk-test"), concurrency=1)
    assert server.keys() == [f"0.attn.q:{i}" for i in reversed(range(N_KEYS))]  # most firings first
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["headers"]["Authorization"] == "Bearer sk-test"
    assert first["body"]["model"] == "tiny-model" and first["body"]["temperature"] == 0.0
    assert first["body"]["max_tokens"] == 64 and [m["role"] for m in first["body"]["messages"]] == ["system", "user"]
    assert (result.labelled, result.cached, result.failed, result.requests) == (N_KEYS, 0, {}, N_KEYS)
    path = labels_file(run)
    assert result.labels_file == path and result.total_labels == N_KEYS
    data = json.loads(path.read_text())
    assert data["format"] == LABELS_FORMAT and data["format_version"] == LABELS_FORMAT_VERSION
    assert data["source"] == "llm" and data["model"] == "tiny-model" and data["template_version"] == "1"
    assert data["endpoint"] == server.url and "sk-test" not in path.read_text()
    assert data["labels"]["0.attn.q:3"] == "'her' in 0.attn.q:3"
    read = _read_labels(path)
    assert read == data["labels"]
    # No key from the environment: no Authorization header, as local servers expect.
    label_subcomponents(make_examples(), run / "again", client_for(server), limit=1)
    assert "Authorization" not in server.requests[-1]["headers"]


def _read_labels(path: Path) -> dict[str, str]:
    """The labels as `attrgraph.labels.read_label_file` returns them, each marked as an LLM label."""
    read = read_label_file(path)
    assert {getattr(label, "source", None) for label in read.values()} == {"llm"}
    return {k: str(v) for k, v in read.items()}


def test_refusal_malformed_429_and_hang(llm, run):
    script = {
        "0.attn.q:5": [("refuse",)],
        "0.attn.q:4": [("malformed",)],
        "0.attn.q:3": [("status", 429, 1)],  # Retry-After: 1 s, then a label
        "0.attn.q:2": [("hang", 10)],  # past the client's timeout, then a label on the retry
        "0.attn.q:1": [("no_choices",)],
        "0.attn.q:0": [("refusal_field",)],
    }
    server = llm(script)
    client = client_for(server, timeout=0.5, backoff=0.01, max_backoff=5)
    result = label_subcomponents(make_examples(), run, client, concurrency=3)
    assert result.labelled == 2 and result.retries == 2 and result.requests == N_KEYS + 2
    assert result.failed == {
        "0.attn.q:5": "refused: I'm sorry, but I can't help with that",
        "0.attn.q:4": "malformed reply: not JSON",
        "0.attn.q:1": "malformed reply: no choices[0].message",
        "0.attn.q:0": "refused: I cannot help with this request.",
    }
    times = [r["t"] for r in server.requests if r["key"] == "0.attn.q:3"]
    assert len(times) == 2 and 0.9 < times[1] - times[0] < 4  # the retry waited as Retry-After said
    hung = [r["t"] for r in server.requests if r["key"] == "0.attn.q:2"]
    assert len(hung) == 2 and 0.4 < hung[1] - hung[0] < 4  # given up after the 0.5 s timeout
    labels = json.loads(labels_file(run).read_text())["labels"]
    assert set(labels) == {"0.attn.q:3", "0.attn.q:2"}
    # Failures are kept in the cache for the record but are not finished: a rerun asks again, and only them.
    lines = [json.loads(s) for s in (run / "autointerp" / "cache.jsonl").read_text().splitlines()]
    assert sum("error" in line for line in lines) == 4
    again = label_subcomponents(make_examples(), run, client_for(server), concurrency=3)
    assert sorted(server.keys()[N_KEYS + 2 :]) == sorted(result.failed)
    assert (again.labelled, again.cached, again.failed) == (4, 2, {})


def test_a_server_that_keeps_hanging_fails_that_request_after_its_retries(llm, run):
    server = llm({"0.attn.q:5": [("hang", 10)] * 3})
    start = time.time()
    result = label_subcomponents(make_examples(), run, client_for(server, timeout=0.3, retries=1), limit=2)
    assert result.failed == {"0.attn.q:5": "no reply within 0.3 s, 2 tries"} and result.labelled == 1
    assert time.time() - start < 3


def test_server_errors_are_retried_with_backoff_until_the_retries_run_out(llm, run):
    server = llm({"0.attn.q:5": [("status", 503)] * 2, "0.attn.q:4": [("status", 500)] * 9})
    result = label_subcomponents(make_examples(), run, client_for(server, retries=3), limit=2)
    assert result.labelled == 1 and result.retries == 2 + 3
    assert result.failed == {"0.attn.q:4": "HTTP 500 (status 500 for 0.attn.q:4), 4 tries"}


@pytest.mark.parametrize("concurrency", [1, 3])
def test_no_more_requests_in_flight_than_the_concurrency(llm, tmp_path, concurrency):
    make_examples(12).save(tmp_path)
    from attrgraph.examples import load_examples

    server = llm(delay=0.15)
    result = label_subcomponents(load_examples(tmp_path), tmp_path, client_for(server), concurrency=concurrency)
    assert result.labelled == 12 and server.max_inflight == concurrency


@pytest.mark.parametrize(("status", "says"), [(401, "set $OPENAI_API_KEY to a key"), (404, "check `--endpoint`")])
def test_a_config_error_stops_the_run_and_keeps_the_labels_so_far(llm, run, status, says):
    server = llm()
    server.after = (2, ("status", status))
    with pytest.raises(EndpointError, match=f"answered HTTP {status}") as err:
        label_subcomponents(make_examples(), run, client_for(server, key_hint="$OPENAI_API_KEY"), concurrency=1)
    assert says in str(err.value) and "\n" not in str(err.value)
    assert len(server.requests) == 3  # no retries of a 4xx
    assert len(json.loads(labels_file(run).read_text())["labels"]) == 2


def test_an_interrupted_run_resumes_without_repeating_finished_requests(llm, run, monkeypatch, capsys):
    server = llm()
    calls = {"n": 0}
    append = LabelCache.append

    def interrupt_after_three(self, entry):
        append(self, entry)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C while the run waits for replies

    monkeypatch.setattr(LabelCache, "append", interrupt_after_three)
    args = ["autointerp", "--run", str(run), "--endpoint", server.url, "--model", "tiny-model", "--concurrency", "1"]
    assert main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    finished = server.keys()[:3]
    assert set(json.loads(labels_file(run).read_text())["labels"]) == set(finished)  # written on the way out
    monkeypatch.setattr(LabelCache, "append", append)
    with (run / "autointerp" / "cache.jsonl").open("a") as f:
        f.write('{"key": "0.attn.q:0", "templ')  # a line torn by a kill mid-write
    n_before = len(server.requests)
    assert main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["cached"] == 3 and summary["labelled"] == N_KEYS - 3 and summary["labels"] == N_KEYS
    resent = server.keys()[n_before:]
    assert not set(resent) & set(finished) and len(resent) == N_KEYS - 3
    cache = LabelCache(run / "autointerp" / "cache.jsonl")
    assert cache.skipped_lines == 1 and len(cache.entries) == N_KEYS  # the torn line is skipped, later ones read
    assert main(args) == 0 and len(server.requests) == n_before + N_KEYS - 3  # a third run asks for nothing
    assert "0 labelled by tiny-model, 6 from the cache" in capsys.readouterr().out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_a_stopped_process_resumes_without_repeating_finished_requests(llm, run, sig, capsys):
    server = llm({"0.attn.q:3": [("hang", 60)]})  # the third request hangs until the process is stopped
    args = ["autointerp", "--run", str(run), "--endpoint", server.url, "--model", "tiny-model", "--concurrency", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "circuits.cli", *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(server.requests) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert server.keys() == ["0.attn.q:5", "0.attn.q:4", "0.attn.q:3"]
        stopped = time.time()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "vpd autointerp: interrupted" in err and "Traceback" not in err
        assert time.time() - stopped < 10  # without waiting for the hung request
        assert set(json.loads(labels_file(run).read_text())["labels"]) == {"0.attn.q:5", "0.attn.q:4"}
    assert main(args) == 0
    assert server.keys()[3:] == ["0.attn.q:3", "0.attn.q:2", "0.attn.q:1", "0.attn.q:0"]  # the finished two not again
    assert f"wrote {N_KEYS} labels" in capsys.readouterr().out


def test_a_new_model_or_template_is_asked_again(llm, run, tmp_path):
    server = llm()
    label_subcomponents(make_examples(), run, client_for(server), limit=2)
    label_subcomponents(make_examples(), run, ChatClient(server.url, "other-model", backoff=0.01), limit=2)
    custom = tmp_path / "t.md"
    custom.write_text("version: 7\n=== system ===\ns\n=== user ===\nLabel one subcomponent ($key).\n")
    result = label_subcomponents(make_examples(), run, client_for(server), limit=2, template=load_template(custom))
    assert len(server.requests) == 6 and result.labelled == 2
    data = json.loads(labels_file(run).read_text())
    assert data["template_version"] == "7" and len(data["labels"]) == 2


# ---------------------------------------------------------------------------------------------------
# The command


def test_cli_labels_and_prints_a_summary(llm, run, capsys, monkeypatch):
    server = llm({"0.attn.q:5": [("refuse",)], "0.attn.q:4": [("ok", "unclear")]})
    monkeypatch.setenv("VPD_LLM_BASE_URL", server.url)  # the endpoint and model may come from the environment
    monkeypatch.setenv("VPD_LLM_MODEL", "tiny-model")
    monkeypatch.setenv("MY_KEY", "sk-mine")
    assert main(["autointerp", "--run", str(run), "--limit", "4", "--api-key-env", "MY_KEY"]) == 0
    out = capsys.readouterr().out
    assert "4 subcomponents: 2 labelled by tiny-model, 0 from the cache, 1 unclear, 1 failed (1 refused)" in out
    assert "0.attn.q:5: refused" in out and f"wrote 2 labels to {labels_file(run)}" in out
    assert server.requests[0]["headers"]["Authorization"] == "Bearer sk-mine"
    # The run's labels: the LLM's where it gave one, the offline label of the examples elsewhere.
    labels = labels_for_run(run)
    assert labels["0.attn.q:3"] == "'her' in 0.attn.q:3" and label_source(labels["0.attn.q:3"]) == "llm"
    assert labels["0.attn.q:4"] == "fires on ' her' (0.attn.q:4)" and label_source(labels["0.attn.q:4"]) == "stats"
    assert main(["autointerp", "--run", str(run), "--keys", "0.attn.q:0", "0.attn.q:4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["selected"], summary["cached"], summary["labelled"]) == (2, 1, 1)  # the unclear one is finished
    assert server.keys()[-1] == "0.attn.q:0"


def test_cli_reads_examples_from_harvest_and_needs_out_for_bundled(llm, run, tmp_path, capsys):
    server = llm()
    base = ["autointerp", "--endpoint", server.url, "--model", "tiny-model", "--limit", "1"]
    assert main([*base, "--run", "bundled"]) == 2  # it ships examples, but its folder is inside the package
    assert "`--out` is required because" in one_line_error(capsys)
    assert main([*base, "--run", "bundled", "--harvest", str(run), "--out", str(tmp_path / "o")]) == 0
    assert labels_file(tmp_path / "o").is_file()
    (tmp_path / "file").write_text("")
    capsys.readouterr()
    n = len(server.requests)
    assert main([*base, "--run", str(run), "--out", str(tmp_path / "file")]) == 2
    assert "Could not write into `--out`" in one_line_error(capsys) and len(server.requests) == n


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "m"], "`--endpoint` is required: the base URL of an OpenAI-compatible API"),
        (["--endpoint", "http://127.0.0.1:1/v1"], "`--model` is required"),
        (["--endpoint", "localhost:8000", "--model", "m"], "is not an http(s) URL"),
        (["--endpoint", "http://127.0.0.1:{closed}/v1", "--model", "m"], "cannot be reached"),
        (["--endpoint", "http://127.0.0.1:1/v1", "--model", "m", "--concurrency", "0"], "`--concurrency` must be"),
        (["--endpoint", "http://127.0.0.1:1/v1", "--model", "m", "--keys", "9.mlp.up:0"], "`--keys` 9.mlp.up:0 is not"),
        (["--endpoint", "http://127.0.0.1:1/v1", "--model", "m", "--api-key-env", "VPD_TEST_UNSET"], "is not set"),
    ],
)
def test_cli_bad_input_is_one_sentence_and_exit_2(args, message, run, capsys, monkeypatch):
    for name in ("VPD_LLM_BASE_URL", "VPD_LLM_MODEL", "VPD_TEST_UNSET"):
        monkeypatch.delenv(name, raising=False)
    args = [a.format(closed=_closed_port()) for a in args]
    assert main(["autointerp", "--run", str(run), *args]) == 2
    assert message in one_line_error(capsys)


def test_cli_run_without_a_harvest_says_how_to_make_one(tmp_path, capsys):
    assert main(["autointerp", "--run", str(tmp_path), "--endpoint", "http://127.0.0.1:1/v1", "--model", "m"]) == 2
    err = one_line_error(capsys)
    assert f"run `vpd harvest --run {tmp_path} --out DIR` and pass `--harvest DIR`" in err
    assert not (tmp_path / "autointerp").exists()
