"""Copy a decomposition run of the bundled target into the package as the `bundled` run.

    python -m decomposer.vpd.bundle runs/bundled-cpu [--examples DIR] [--labels FILE]

Only what readers need is copied: the decomposition (U, V, CI function, metadata), `eval.json`,
`metrics.jsonl` and the plots, plus optionally the examples artifact that `vpd harvest --out DIR` writes
(`DIR/examples/`: contexts, token statistics and offline labels of every alive subcomponent, a few MB) and a
`labels.json` (component key → label). The training
state (optimizer moments, PPGD sources) stays behind: it is several times the size of the
decomposition and only `--resume` needs it. The copy is refused above `MAX_BYTES`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from importlib.resources import files
from pathlib import Path

from decomposer.errors import VpdError
from decomposer.integrity import record_sha256
from decomposer.io import atomic_write_dir, atomic_write_json
from decomposer.vpd.run import EVAL_FILE, META_FILE, METRICS_FILE, PLOTS_DIR, STATE_DIR, WEIGHTS_FILE, read_metadata

MAX_BYTES = 30 * 1024 * 1024
LABELS_FILE = "labels.json"
EXAMPLES_DIR = "examples"  # the artifact's folder name (its format lives in attrgraph.examples)


def bundled_run_path() -> Path:
    return Path(str(files("decomposer") / "assets" / "decomposition"))


def bundle_run(
    run_dir: str | Path,
    *,
    labels: dict[str, str] | None = None,
    examples: str | Path | None = None,
    dest: str | Path | None = None,
) -> Path:
    """Write the shipped copy of `run_dir` (atomically) and return its folder.

    Args:
        run_dir: The run folder.
        labels: Component key → label, shipped as `labels.json`.
        examples: A folder holding `examples/` (e.g. `vpd harvest --out DIR`), shipped as `examples/`.
        dest: Where to write (default: inside the package).

    Raises:
        VpdError: The run is not of the bundled target, `examples` holds no `examples/`, or the copy would
            exceed `MAX_BYTES`.
    """
    run_dir = Path(run_dir)
    state, meta = read_metadata(run_dir)
    if meta["target"]["name"] != "bundled":
        raise VpdError(f"{run_dir} decomposes {meta['target']['name']!r}; only runs of `bundled` can be shipped.")
    dest = Path(dest) if dest is not None else bundled_run_path()
    if examples is not None and not (Path(examples) / EXAMPLES_DIR).is_dir():
        raise VpdError(
            f"`examples` {str(examples)!r} holds no {EXAMPLES_DIR}/ folder; pass a `vpd harvest --out` folder."
        )

    def fill(tmp: Path) -> None:
        (tmp / STATE_DIR).mkdir()
        shutil.copy2(state / WEIGHTS_FILE, tmp / STATE_DIR / WEIGHTS_FILE)
        # The training state stays behind, so the shipped metadata records the sha256 of the weights alone.
        atomic_write_json(
            tmp / STATE_DIR / META_FILE, {**meta, "files": record_sha256(tmp / STATE_DIR, [WEIGHTS_FILE])}
        )
        for name in (EVAL_FILE, METRICS_FILE):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        if (run_dir / PLOTS_DIR).is_dir():
            shutil.copytree(run_dir / PLOTS_DIR, tmp / PLOTS_DIR)
        if labels:
            atomic_write_json(tmp / LABELS_FILE, dict(sorted(labels.items())))
        if examples is not None:
            shutil.copytree(Path(examples) / EXAMPLES_DIR, tmp / EXAMPLES_DIR)
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        if size > MAX_BYTES:
            raise VpdError(f"The bundled run would be {size / 2**20:.1f} MiB, above {MAX_BYTES / 2**20:.0f} MiB.")

    return atomic_write_dir(dest, fill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--labels", default=None, help="JSON object component key → label to ship with the run")
    parser.add_argument("--examples", default=None, help="a `vpd harvest --out` folder whose examples/ to ship")
    args = parser.parse_args()
    labels = json.loads(Path(args.labels).read_text()) if args.labels else None
    print(bundle_run(args.run_dir, labels=labels, examples=args.examples))


if __name__ == "__main__":
    main()
