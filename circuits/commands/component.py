"""`vpd component`: one subcomponent's card from a harvest, as text and an HTML page."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    component = sub.add_parser("component", help="one subcomponent's card from a harvest: text and an HTML page")
    component.add_argument("--run", required=True, help="decomposition run folder, or `bundled`")
    component.add_argument("key", help="component key, e.g. 1.attn.q:31")
    component.add_argument("--harvest", default=None, help="folder holding harvest/ (default: the run folder)")
    component.add_argument("--out", default=None, help="HTML page to write (default: <harvest folder>/components/)")
    component.add_argument("--json", action="store_true", help="print one JSON object")
    component.set_defaults(handler=_component)


def _component(args: argparse.Namespace) -> None:
    from attrgraph.harvest_format import harvest_meta_path
    from circuits.component import component_card, render_component_html
    from circuits.harvest import load_harvest
    from decomposer.errors import VpdError
    from decomposer.vpd.load import load_run
    from decomposer.vpd.report import resolve_run
    from decomposer.vpd.run import read_metadata

    run_dir = resolve_run(args.run)
    read_metadata(run_dir)  # a missing run is reported before a missing harvest
    where = Path(args.harvest) if args.harvest is not None else run_dir
    meta_path = harvest_meta_path(where)
    if meta_path is None:
        raise VpdError(f"No harvest in {str(where)!r}; run `vpd harvest --run {args.run}` first, or pass `--harvest`.")
    h = load_harvest(meta_path.parent)
    d, _, _ = load_run(args.run)
    card = component_card(d, h, args.key)
    key = card.data["key"]
    out = Path(args.out) if args.out else meta_path.parent.parent / "components" / f"{key.replace(':', '_')}.html"
    try:
        page = render_component_html(card, out)
    except OSError as err:
        raise VpdError(f"Could not write the page {str(out)!r} ({err.strerror}); pass `--out FILE.html`.") from None
    if args.json:
        json.dump({**card.data, "html": str(page)}, sys.stdout)
        print()
        return
    print(card.text)
    print(f"\nHTML: {page}")
