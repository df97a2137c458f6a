"""A small client for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, a llama.cpp server).

Standard library only (`urllib`). One `ChatClient` is shared by the worker threads of a labelling run:

- `POST {endpoint}/chat/completions` with `Authorization: Bearer KEY` when a key is given;
- a per-request `timeout` (seconds without a byte from the server);
- retries with exponential backoff and jitter on 429, 408, 5xx, timeouts and dropped connections, honouring
  `Retry-After`; `stop` (a `threading.Event`) cuts the waits short when the run is interrupted;
- `EndpointError` (a `VpdError`, one sentence) for what no retry fixes and every request would hit: the
  endpoint refuses connections or has no such host, or it answers 4xx (a wrong key, path or model name);
- `RequestFailed` for one request that gave nothing usable: retries used up, or a reply that is not a chat
  completion. The run records it against that subcomponent and goes on.
"""

from __future__ import annotations

import email.utils
import http.client
import ipaddress
import json
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from decomposer.errors import VpdError

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})


class EndpointError(VpdError):
    """The endpoint cannot serve any request as configured (unreachable, wrong key, path or model)."""


class RequestFailed(Exception):
    """One request gave no usable reply; `reason` is a short phrase for the run's summary."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Cancelled(Exception):
    """The run was stopped while this request waited to retry."""


@dataclass(frozen=True)
class Reply:
    """The first choice of a chat completion: its text, why it stopped, and an explicit refusal if any."""

    content: Any
    finish_reason: Any
    refusal: Any


def normalize_endpoint(endpoint: str) -> str:
    """`http://host:8000/v1` (a trailing `/` or `/chat/completions` dropped).

    Raises:
        VpdError: Not an http(s) URL with a host.
    """
    url = endpoint.strip().rstrip("/")
    if url.endswith("/chat/completions"):
        url = url[: -len("/chat/completions")]
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise VpdError(
            f"`--endpoint` {endpoint!r} is not an http(s) URL; pass the base of an OpenAI-compatible API such as "
            "http://localhost:8000/v1."
        )
    return url


def public_endpoint(endpoint: str) -> str:
    """The endpoint without credentials or a query string, fit to be written into a labels file."""
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _is_loopback(host: str | None) -> bool:
    if host in (None, "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (a number of seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ChatClient:
    """Chat completions from one endpoint and model; safe to share between threads.

    Args:
        endpoint: The API base, e.g. `http://localhost:8000/v1` (the path before `/chat/completions`).
        model: The model name the endpoint expects.
        api_key: Sent as `Authorization: Bearer …`; None sends no header (local servers need none).
        key_hint: Where the key comes from, named in the sentence for a 401 (e.g. `$OPENAI_API_KEY`).
        timeout: Seconds a request may wait for the server before it counts as a timeout (and is retried).
        retries: Retries after the first try for 429, 5xx, timeouts and dropped connections.
        backoff: The first retry waits about this many seconds, doubling each time (with jitter) up to
            `max_backoff`; a `Retry-After` header sets the wait instead (also at most `max_backoff`).
        stop: When set, waits end at once and the request raises `Cancelled`.
    """

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api_key: str | None = None,
        key_hint: str = "the API key",
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: threading.Event | None = None,
    ) -> None:
        self.endpoint = normalize_endpoint(endpoint)
        self.url = self.endpoint + "/chat/completions"
        self.model, self.api_key, self.key_hint = model, api_key or None, key_hint
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.max_tokens, self.temperature = max_tokens, temperature
        self.stop = stop or threading.Event()
        self._lock = threading.Lock()
        self.n_requests = 0  # HTTP requests sent, retries included
        self.n_retries = 0
        # A proxy from the environment is for the outside world; a server on this machine is asked directly.
        local = _is_loopback(urllib.parse.urlsplit(self.url).hostname)
        self._opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if local else []))

    def body(self, messages: list[dict]) -> dict[str, Any]:
        """The JSON body of one request."""
        return {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def complete(self, messages: list[dict]) -> Reply:
        """Send one chat completion, retrying what a retry may fix.

        Raises:
            EndpointError: The endpoint is unreachable or rejects the configuration (401, 403, 404, other 4xx).
            RequestFailed: Retries used up, or the reply is not a chat completion.
            Cancelled: `stop` was set.
        """
        data = json.dumps(self.body(messages)).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempt = 0
        while True:
            if self.stop.is_set():
                raise Cancelled()
            wait, why = None, ""
            with self._lock:
                self.n_requests += 1
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with self._opener.open(request, timeout=self.timeout) as response:
                    raw = response.read()
                return self._parse(raw)
            except urllib.error.HTTPError as err:
                with err:
                    detail = self._detail(err)
                    if err.code not in RETRY_STATUS and 400 <= err.code < 500:
                        raise self._config_error(err.code, detail) from None
                    wait, why = _retry_after(err.headers.get("Retry-After")), f"HTTP {err.code}"
                    if detail:
                        why += f" ({detail})"
            except urllib.error.URLError as err:
                reason = err.reason
                if isinstance(reason, TimeoutError):
                    why = f"no reply within {self.timeout:g} s"
                elif isinstance(reason, ConnectionResetError | ConnectionAbortedError):
                    why = "connection dropped"
                else:
                    raise EndpointError(
                        f"The endpoint {self.url} cannot be reached ({getattr(reason, 'strerror', None) or reason}); "
                        "check `--endpoint` and that the server is running."
                    ) from None
            except TimeoutError:
                why = f"no reply within {self.timeout:g} s"
            except (ConnectionResetError, ConnectionAbortedError, http.client.HTTPException):
                why = "connection dropped"
            except OSError as err:  # e.g. a TLS failure while reading the reply
                raise EndpointError(
                    f"The request to {self.url} failed ({err}); check `--endpoint` and the connection."
                ) from None
            if attempt >= self.retries:
                raise RequestFailed(f"{why}, {attempt + 1} tries")
            if wait is None:
                cap = min(self.max_backoff, self.backoff * 2**attempt)
                wait = cap / 2 + random.uniform(0, cap / 2)
            attempt += 1
            with self._lock:
                self.n_retries += 1
            if self.stop.wait(min(wait, self.max_backoff)):
                raise Cancelled()

    @staticmethod
    def _detail(err: urllib.error.HTTPError) -> str:
        try:
            text = err.read(300).decode(errors="replace")
        except (OSError, http.client.HTTPException):
            return ""
        try:  # OpenAI-style {"error": {"message": ...}}
            obj = json.loads(text)
            message = obj["error"]["message"] if isinstance(obj.get("error"), dict) else obj.get("error")
            text = message if isinstance(message, str) else text
        except (ValueError, AttributeError, KeyError, TypeError):
            pass
        text = " ".join(text.split())
        return text if len(text) <= 120 else text[:119] + "…"

    def _config_error(self, code: int, detail: str) -> EndpointError:
        said = f"HTTP {code}" + (f" ({detail.rstrip('.')})" if detail else "")
        if code in (401, 403):
            fix = f"set {self.key_hint} to a key this endpoint accepts"
        elif code == 404:
            fix = (
                f"check `--endpoint` (the API base before /chat/completions, such as http://localhost:8000/v1) and "
                f"that the server serves `--model` {self.model!r}"
            )
        else:
            fix = f"check `--endpoint` and `--model` {self.model!r}"
        return EndpointError(f"The endpoint {self.url} answered {said}; {fix}.")

    def _parse(self, raw: bytes) -> Reply:
        try:
            obj = json.loads(raw)
        except ValueError:
            raise RequestFailed("malformed reply: not JSON") from None
        try:
            choice = obj["choices"][0]
            message = choice["message"]
            content = message.get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise RequestFailed("malformed reply: no choices[0].message") from None
        return Reply(content=content, finish_reason=choice.get("finish_reason"), refusal=message.get("refusal"))
