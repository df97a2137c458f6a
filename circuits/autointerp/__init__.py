"""`vpd autointerp`: labels for subcomponents from an LLM behind any OpenAI-compatible chat-completions endpoint.

- `prompt`: the versioned template file (`prompt-v1.md`), filled from a subcomponent's card, and the reply parser;
- `client`: the HTTP client (standard library), with a timeout, retries with backoff and `Retry-After`;
- `cache`: `<out>/autointerp/cache.jsonl`, one line per finished request, so an interrupted run resumes;
- `label`: the run (`label_subcomponents`), which writes `<out>/autointerp/labels.json` (source `llm`).

The offline labels of the examples artifact stay the fallback: `attrgraph.labels.labels_for_run` lets an LLM
label win only where there is one.
"""

from circuits.autointerp.client import ChatClient, EndpointError, RequestFailed
from circuits.autointerp.label import AutointerpResult, label_subcomponents, select_keys
from circuits.autointerp.prompt import load_template, parse_label, render_messages

__all__ = [
    "AutointerpResult",
    "ChatClient",
    "EndpointError",
    "RequestFailed",
    "label_subcomponents",
    "load_template",
    "parse_label",
    "render_messages",
    "select_keys",
]
