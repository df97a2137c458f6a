"""`vpd serve`: the explorer with a local backend: new prompts, ablations, steering and comparisons in the page."""

from __future__ import annotations

import argparse
import ipaddress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the explorer with a backend on localhost: new graphs, ablations, steering")
    p.add_argument("--run", required=True, help="decomposition run folder, or `bundled`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--out", default="vpd-serve", help="folder for the graphs' pages (default ./vpd-serve)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest prompt accepted, in tokens (default 256)")
    p.add_argument("--max-waiting", type=int, default=4, help="requests that may wait for the model (default 4)")
    p.set_defaults(handler=_serve)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> None:
    import secrets
    import socket

    import uvicorn

    from circuits.serve import Session, create_app
    from decomposer.errors import VpdError

    if not 0 <= args.port <= 65535:
        raise VpdError(f"`--port` must be in [0, 65535]; got {args.port}.")
    if args.max_tokens < 1 or args.max_waiting < 0:
        raise VpdError(
            f"`--max-tokens` must be ≥ 1 and `--max-waiting` ≥ 0; got {args.max_tokens}, {args.max_waiting}."
        )
    if not _loopback(args.host):
        raise VpdError(
            f"`--host` {args.host!r} is not a loopback address; the server answers only this machine (127.0.0.1). "
            "Reach it from elsewhere through an SSH tunnel (ssh -L 8765:127.0.0.1:8765 HOST)."
        )
    # Bind first, so a port in use is one sentence before minutes of loading.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as err:
        sock.close()
        raise VpdError(f"`--port` {args.port} cannot be used on {args.host} ({err.strerror}); pass another.") from None
    try:
        session = Session(args.run, args.out, max_tokens=args.max_tokens, max_waiting=args.max_waiting)
    except BaseException:
        sock.close()
        raise
    token = secrets.token_urlsafe(24)
    host, port = sock.getsockname()[:2]
    app = create_app(session, token, allowed_hosts=("127.0.0.1", "localhost", "[::1]", args.host))
    print(f"serving run {args.run} at http://{'localhost' if args.host == 'localhost' else host}:{port}/?token={token}")
    print("the token is needed by every request; Ctrl-C stops the server", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
