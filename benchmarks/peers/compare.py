"""vpd-circuits against circuit-tracer 0.5.0, side by side on one shape; prints one table and the ratios.

    .venv/bin/python benchmarks/peers/compare.py [--tokens 16 64 128 250] [--no-cap-tokens 16]
        [--max-rss-gb 12] [--json OUT.json]

Made to run through `make bench-peers`, which creates the peer environment first. For each prompt
length, one subprocess per graph, alternating sides so that both see the same load: ours in the
package's environment (`vpd_graph.py`) and circuit-tracer in `benchmarks/peers/.venv`
(`circuit_tracer_graph.py`), both on one thread, on the same prompt tokens. Each side first runs at
its default node budget (7,500 on both), then, at the `--no-cap-tokens` lengths, with no budget.

Reported per graph: the edge step and end-to-end wall time, the end-to-end CPU time of the graph's
process (less sensitive than wall time to other jobs on the machine), the child's peak RSS, the full
graph's nodes and nonzero edges and the pruned graph's. A child whose RSS passes `--max-rss-gb` is
stopped and reported as such. Ratios are circuit-tracer over ours, from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OURS = REPO / ".venv" / "bin" / "python"
PEER = HERE / ".venv" / "bin" / "python"


_PROMPT = """
import json, sys
from pathlib import Path
from transformers import AutoTokenizer
from decomposer.target.loading import resolve_target_path
path = resolve_target_path("bundled")
tokenizer = AutoTokenizer.from_pretrained(path)
text = (Path(path) / "heldout-sample.txt").read_text(encoding="utf-8")
ids = tokenizer(text, add_special_tokens=False)["input_ids"]
out = {}
for n in map(int, sys.argv[1:]):
    p = [tokenizer.eos_token_id] + ids[: n - 1]
    if tokenizer(tokenizer.decode(p), add_special_tokens=False)["input_ids"] != p:
        raise SystemExit(f"the {n}-token prompt does not survive decode and encode")
    out[n] = p
print(json.dumps(out))
"""


def prompt_ids(lengths: list[int]) -> dict[int, list[int]]:
    """`n` tokens each: the end-of-text token (both sides treat position 0 as a sink), then held-out text.

    Tokenized in a child process: Linux carries a process's peak RSS across fork and exec, so this
    process stays small for the children's peaks to be their own.
    """
    done = subprocess.run(
        [str(OURS), "-c", _PROMPT, *map(str, lengths)], capture_output=True, text=True, check=True, cwd=REPO
    )
    return {int(n): ids for n, ids in json.loads(done.stdout).items()}


def _rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 0.0


def run_child(cmd: list[str], max_rss_gb: float, timeout_s: float) -> dict:
    """Run one graph in its own process; its rusage gives peak RSS and CPU time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
        stopped = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if _rss_gb(proc.pid) > max_rss_gb:
                stopped = f"over {max_rss_gb:g} GB"
            elif time.perf_counter() - start > timeout_s:
                stopped = f"over {timeout_s:g} s"
            if stopped:
                proc.send_signal(signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("{")]
        result = json.loads(lines[-1]) if lines and not stopped and proc.returncode == 0 else {}
        if not result:
            tail = err.read().strip().splitlines()[-3:]
            result["error"] = stopped or f"exit {proc.returncode}: {' | '.join(tail)}"
    result["peak_rss_gb"] = usage.ru_maxrss / 1024**2  # the child's high-water mark, read by the kernel
    return result


def _fmt(r: dict | None, key: str, unit: str = "") -> str:
    if not r or "error" in r:
        return "–"
    value = r[key]
    if isinstance(value, float):
        return f"{value:.1f}{unit}" if unit == " s" else f"{value:.2f}{unit}"
    return f"{value:,}"


def table(rows: list[dict]) -> str:
    head = (
        "| tokens | side | node budget | edge step | end to end | CPU | peak RSS | nodes | edges | "
        "pruned nodes | pruned edges |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        cap = "none" if r["cap"] is None else f"{r['cap']:,}"
        if "error" in r:
            lines.append(
                f"| {r['tokens']} | {r['side']} | {cap} | {r['error']} | | | {r['peak_rss_gb']:.2f} GB | | | | |"
            )
            continue
        lines.append(
            f"| {r['tokens']} | {r['side']} | {cap} | {_fmt(r, 'edge_s', ' s')} | {_fmt(r, 'total_s', ' s')} | "
            f"{_fmt(r, 'total_cpu_s', ' s')} | {_fmt(r, 'peak_rss_gb', ' GB')} | {_fmt(r, 'full_nodes')} | "
            f"{_fmt(r, 'full_edges')} | {_fmt(r, 'pruned_nodes')} | {_fmt(r, 'pruned_edges')} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> str:
    lines = [
        "| tokens | node budget | edge step | end to end | CPU | peak RSS (ours / theirs) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["side"] != "vpd" or "error" in r:
            continue
        peer = next(
            (p for p in rows if p["side"] == "circuit-tracer" and p["tokens"] == r["tokens"] and p["cap"] == r["cap"]),
            None,
        )
        if peer is None or "error" in peer:
            continue
        cap = "none" if r["cap"] is None else f"{r['cap']:,}"
        lines.append(
            f"| {r['tokens']} | {cap} | {peer['edge_s'] / r['edge_s']:.1f}× | {peer['total_s'] / r['total_s']:.1f}× | "
            f"{peer['total_cpu_s'] / r['total_cpu_s']:.1f}× | {r['peak_rss_gb'] / peer['peak_rss_gb']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 128, 250])
    # circuit-tracer without a cap at 64 tokens takes over 12 GB and 7 CPU minutes: only on request.
    parser.add_argument("--no-cap-tokens", type=int, nargs="*", default=[16])
    parser.add_argument("--max-rss-gb", type=float, default=12.0, help="stop a graph whose RSS passes this")
    parser.add_argument("--timeout", type=float, default=1200.0, help="stop a graph that runs longer (seconds)")
    parser.add_argument("--json", type=Path, default=None, help="also write every result here")
    args = parser.parse_args()
    for python in (OURS, PEER):
        if not python.exists():
            raise SystemExit(f"{python} is missing; run `make bench-peers`, which creates both environments.")

    plan = [(n, False) for n in args.tokens] + [(n, True) for n in args.no_cap_tokens]
    ids = prompt_ids(sorted({n for n, _ in plan}))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        for n, no_cap in plan:
            prompt = Path(tmp) / f"prompt-{n}.json"
            prompt.write_text(json.dumps({"ids": ids[n]}))
            flag = ["--no-cap"] if no_cap else []
            for side, python, script in (
                ("vpd", OURS, "vpd_graph.py"),
                ("circuit-tracer", PEER, "circuit_tracer_graph.py"),
            ):
                cmd = [str(python), str(HERE / script), "--prompt-file", str(prompt), "--out", f"{tmp}/{side}-{n}"]
                result = run_child(cmd + flag, args.max_rss_gb, args.timeout)
                result.setdefault("side", side)
                result.setdefault("tokens", n)
                result.setdefault("cap", None if no_cap else 7500)
                rows.append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
    print(table(rows))
    print()
    print(ratios(rows))
    print(f"\none thread per graph; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
