"""The HTTP layer of `vpd serve` (Starlette): routes, the token, the Host check and the size limits.

Every refusal is a JSON object `{"error": one sentence}` with a 4xx or 5xx status, never a traceback. Work on
the model runs in a worker thread (`run_in_threadpool`), so the event loop keeps answering /api/progress and
refusing what it must while a graph is being fitted.
"""

from __future__ import annotations

import hmac
import json
from importlib.resources import files
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from circuits.serve.session import Busy, Session, TooLarge
from decomposer.errors import VpdError

MAX_BODY = 64 * 1024  # bytes of a request body
COOKIE = "vpd_token"
_PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "frame-src 'self'; img-src data:"
)


def _error(status: int, sentence: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": sentence}, status_code=status, headers=headers)


def create_app(session: Session, token: str, *, allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Any:
    """The app serving `session`; every request must name an allowed host, every API call carry `token`."""

    def host_ok(request: Request) -> bool:
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        return name in allowed_hosts

    def token_ok(request: Request, *, cookie: bool) -> bool:
        given = request.headers.get("x-vpd-token") or ""
        auth = request.headers.get("authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            given = request.query_params.get("token") or (request.cookies.get(COOKIE, "") if cookie else "")
        return hmac.compare_digest(given.encode(), token.encode())

    async def guard(request: Request, *, cookie: bool = False) -> Response | None:
        # DNS rebinding: a foreign page whose name now resolves to 127.0.0.1 still sends its own Host.
        if not host_ok(request):
            return _error(400, f"Host {request.headers.get('host', '')!r} is not this server's; open it as 127.0.0.1.")
        if not token_ok(request, cookie=cookie):
            return _error(403, "A missing or wrong token; open the URL that `vpd serve` printed, token included.")
        return None

    too_large = f"The request body is larger than {MAX_BODY // 1024} KB; send a shorter one."

    async def body_of(request: Request) -> dict | Response:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return _error(413, too_large)
        raw = b""
        async for chunk in request.stream():  # a body without a length is counted as it arrives
            raw += chunk
            if len(raw) > MAX_BODY:
                return _error(413, too_large)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return _error(400, 'The request body is not valid JSON; send one object such as {"prompt": "..."}.')
        if not isinstance(body, dict):
            return _error(400, 'The request body must be one JSON object such as {"prompt": "..."}.')
        return body

    async def work(request: Request, job: str) -> Response:
        refused = await guard(request)
        if refused is not None:
            return refused
        body = await body_of(request)
        if isinstance(body, Response):
            return body
        try:
            result = await run_in_threadpool(getattr(session, job), body)
        except Busy as err:
            return _error(503, str(err), {"Retry-After": "2"})
        except TooLarge as err:
            return _error(413, str(err))
        except VpdError as err:
            return _error(400, str(err))
        except MemoryError:
            return _error(507, "The request ran out of memory; shorten the prompt or lower the graph's size.")
        return JSONResponse(result)

    async def graph(request: Request) -> Response:
        return await work(request, "graph")

    async def intervene(request: Request) -> Response:
        return await work(request, "intervene")

    async def progress(request: Request) -> Response:
        refused = await guard(request)
        return refused or JSONResponse(session.progress())

    async def page(request: Request) -> Response:
        refused = await guard(request, cookie=True)
        if refused is not None:
            return refused
        html = (files("circuits.serve") / "assets" / "page.html").read_text(encoding="utf-8")
        config = {"run": session.run, "max_tokens": session.max_tokens}
        html = html.replace("{config}", json.dumps(config).replace("<", "\\u003c"))
        response = HTMLResponse(html, headers={"Content-Security-Policy": _PAGE_CSP, "Cache-Control": "no-store"})
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    async def graph_page(request: Request) -> Response:
        refused = await guard(request, cookie=True)
        if refused is not None:
            return refused
        path = session.graph_file(request.path_params["graph_id"])
        if path is None:
            return _error(404, f"No graph {request.path_params['graph_id']!r} on this server; build one first.")
        return FileResponse(path, media_type="text/html", headers={"Cache-Control": "no-store"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, f"Nothing at {request.url.path}; the API is /api/graph, /api/intervene and /api/progress.")

    async def bad_method(request: Request, exc: Exception) -> Response:
        return _error(405, f"{request.method} is not allowed on {request.url.path}.")

    async def crash(request: Request, exc: Exception) -> Response:
        return _error(500, f"The server failed on this request ({type(exc).__name__}); it keeps running.")

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/graphs/{graph_id}.html", graph_page, methods=["GET"]),
        Route("/api/graph", graph, methods=["POST"]),
        Route("/api/intervene", intervene, methods=["POST"]),
        Route("/api/progress", progress, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method, Exception: crash})
