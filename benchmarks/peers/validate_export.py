"""Check our circuit-tracer export against circuit-tracer 0.5.0's own graph-file model and its frontend's reads.

    benchmarks/peers/.venv/bin/python benchmarks/peers/validate_export.py [GRAPH.circuit-tracer.json ...]

Runs in the peer environment (`make bench-peers`). Without files it first writes one with the package's
own environment: `vpd graph --run bundled` on the princess prompt, whose `graph.circuit-tracer.json` is
what `to_circuit_tracer` makes of a real pruned graph. Each file must:

1. validate as `circuit_tracer.frontend.graph_models.Model` (pydantic), and survive its `model_dump_json`;
2. read as the bundled frontend (`frontend/assets/attribution_graph/util-cg.js`) reads it: every logit's
   `clerp` holds `"token"` and the probability after `(p=`, equal to its `token_prob` to three decimals;
   every link's ends are nodes; node ids are unique; exactly one target logit; `influence`, where
   present, is a cumulative share in [0, 1].

As a control, the same file without `metadata.transcoder_list` must fail the model (the export before
the fix did). Exits 1 on the first file that fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from circuit_tracer.frontend.graph_models import Model
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The princess lost her crown. She looked for it in the garden and then she went home to the"


def write_export(folder: Path) -> Path:
    """One real export, written by the package's own `vpd graph` in its own environment."""
    vpd = REPO / ".venv" / "bin" / "vpd"
    if not vpd.exists():
        raise SystemExit(f"{vpd} is missing; run `make bench-peers`, which installs the package first.")
    cmd = [str(vpd), "graph", "--run", "bundled", "--prompt", PROMPT, "--out", str(folder)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`vpd graph` failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    found = sorted(folder.glob("*.circuit-tracer.json"))
    if len(found) != 1:
        raise SystemExit(f"`vpd graph` wrote {len(found)} circuit-tracer files in {folder}; expected one.")
    return found[0]


def frontend_problems(data: dict) -> list[str]:
    """What util-cg.js would trip over, as sentences."""
    problems = []
    ids = [n["node_id"] for n in data["nodes"]]
    if len(set(ids)) != len(ids):
        problems.append("node ids are not unique")
    known = set(ids)
    dangling = [link for link in data["links"] if link["source"] not in known or link["target"] not in known]
    if dangling:
        problems.append(f"{len(dangling)} links name a node that is not in the file, e.g. {dangling[0]}")
    targets = [n for n in data["nodes"] if n.get("is_target_logit")]
    if len(targets) != 1:
        problems.append(f"{len(targets)} nodes have is_target_logit; expected one")
    for node in data["nodes"]:
        if node["feature_type"] == "logit":
            clerp = node.get("clerp", "")
            try:
                pct = float(clerp.split("(p=")[1].split(")")[0])  # logitPct in formatData
                token = clerp.split('"')[1]  # logitToken in addVirtualDiff
            except (IndexError, ValueError):
                problems.append(f"logit {node['node_id']} has clerp {clerp!r}; the frontend reads no (p=…) from it")
                continue
            if abs(pct - node["token_prob"]) > 5e-4 or not token:
                problems.append(f"logit {node['node_id']}: clerp {clerp!r} disagrees with {node['token_prob']=}")
        share = node.get("influence")
        if share is not None and not 0.0 <= share <= 1.0 + 1e-9:
            problems.append(f"node {node['node_id']} has influence {share}, not a cumulative share in [0, 1]")
    return problems


def check(path: Path) -> list[str]:
    data = json.loads(path.read_text(encoding="utf-8"))
    try:
        model = Model.model_validate(data)
        Model.model_validate_json(model.model_dump_json())
    except ValidationError as err:
        return [f"circuit_tracer.frontend.graph_models.Model rejects it: {err}"]
    problems = frontend_problems(data)
    control = copy.deepcopy(data)
    control["metadata"].pop("transcoder_list", None)
    try:
        Model.model_validate(control)
        problems.append("control: the model accepted a file without metadata.transcoder_list")
    except ValidationError:
        pass
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", type=Path, nargs="*", help="circuit-tracer JSON files (default: write one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ct-export-") as tmp:
        files = args.files or [write_export(Path(tmp))]
        for path in files:
            data = json.loads(path.read_text(encoding="utf-8"))
            problems = check(path)
            n_logits = sum(n["feature_type"] == "logit" for n in data["nodes"])
            if problems:
                print(f"{path.name}: FAILED", *problems, sep="\n  ")
                sys.exit(1)
            print(
                f"{path.name}: valid circuit-tracer graph file ({len(data['nodes']):,} nodes, {n_logits} logits, "
                f"{len(data['links']):,} links; frontend reads every logit's probability)"
            )


if __name__ == "__main__":
    main()
