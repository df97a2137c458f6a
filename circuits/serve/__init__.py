"""`vpd serve`: the explorer with a local backend that asks the model new questions.

`create_app(session, token)` is a Starlette app; `Session` holds the one loaded run and serialises every use
of the model. The contract (the README has curl examples):

    GET  /?token=T               the page: prompt, target and settings boxes over the explorer of the last graph
    GET  /graphs/{id}.html       one graph's explorer (the same offline file `vpd graph` writes)
    POST /api/graph              {"prompt", "target"?, "position"?, "optimize"?, "steps"?} → id, summary, payload
    POST /api/intervene          {"prompt", "nodes", "kind", "scale"?, "target"?, "position"?, "generate"?}
                                 → P(target), top-5 before and after, greedy text with and without
    GET  /api/progress           what the model is doing now: phase, steps done and total, requests waiting

Every /api call carries the token in an `X-VPD-Token` header (or `Authorization: Bearer`); the page gets it
from its URL and keeps it in a same-site cookie for the graph pages.
"""

from circuits.serve.app import create_app
from circuits.serve.session import Session

__all__ = ["Session", "create_app"]
