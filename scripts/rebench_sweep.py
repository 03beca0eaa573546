"""Re-measure the speed columns of a finished `ptp sweep` in one interleaved run.

A sweep benchmarks each cell against the dense model while it goes, one cell at a time; on a
shared machine the load can change between cells (the SmolLM2 sweep in the README ran beside the
test suite). This loads the dense model and every saved cell (plain and, for unstructured / N:M
cells, on the sparse runtime), times them all in one run — each model once per round, medians —
and rewrites the speed columns of sweep.json, sweep.md and sweep.png. Quality and size columns
are left as they are.

    python scripts/rebench_sweep.py runs/sweep-smollm2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields
from pathlib import Path

import ptp
from ptp import sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    state = json.loads((args.dir / sweep.RESULTS).read_text())
    known = {f.name for f in fields(sweep.SweepConfig)}
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in state["settings"].items() if k in known}
    result = sweep.Sweep(sweep.SweepConfig(out=str(args.dir), **settings), state["dense"], state["cells"])

    dense, _ = ptp.load_model(result.config.model, dtype=result.config.dtype)
    models = {"dense": dense.eval()}
    for row in result.cells:
        if row.get("status") != "ok":
            continue
        folder = args.dir / "cells" / row["name"]
        models[row["name"]] = ptp.load(folder).eval()
        if row["method"] != "structured":
            models[row["name"] + "+sparse"] = ptp.load(folder, runtime="sparse").eval()
    speeds = sweep.bench(models, args.repeats)

    base = speeds["dense"]
    result.dense.update(base, decode_x=1.0, prefill_x=1.0)
    for row in result.cells:
        if row["name"] not in speeds:
            continue
        for kind in ("decode_tok_s", "prefill_tok_s"):
            ratio = kind.replace("_tok_s", "_x")
            row[kind] = speeds[row["name"]][kind]
            row[ratio] = row[kind] / base[kind]
            if row["name"] + "+sparse" in speeds:
                row[f"sparse_{kind}"] = speeds[row["name"] + "+sparse"][kind]
                row[f"sparse_{ratio}"] = row[f"sparse_{kind}"] / base[kind]
    sweep._write(args.dir, result.config, result)
    print((args.dir / "sweep.md").read_text())


if __name__ == "__main__":
    main()
