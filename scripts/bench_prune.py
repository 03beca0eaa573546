"""Pruning time and memory of ptp against the papers' loops, side by side, in one run.

Setup S: SmolLM2-135M fp32, 64 x 512 tokens of WikiText-2 validation, seed 0. For every row
(method:sparsity), the reference (``reference_prune.py``: per-sample forwards, two passes per
block, per-column/per-group Python loops) and ptp (``reproduce_core.py --no-eval``) each run in a
fresh process, alternating, ``--repeats`` times; the table gives the median prune wall time
(model load excluded), the peak RSS (load + prune), their ratio, and whether the pruned masks
are bit-identical.

    python scripts/bench_prune.py --data ../shared/data/wikitext2 [--rows wanda:2:4 ...] [--true-sequential]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROWS = ["wanda:0.5", "wanda:2:4", "sparsegpt:0.5", "sparsegpt:2:4"]
HERE = Path(__file__).parent


def run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with valid.tokens.txt")
    parser.add_argument("--rows", nargs="+", default=ROWS, metavar="METHOD:SPARSITY")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side per row (median reported)")
    parser.add_argument("--true-sequential", action="store_true", help="ptp in its one-pass mode")
    parser.add_argument("--no-reference", action="store_true", help="time ptp only")
    args = parser.parse_args()

    lines = ["| method | sparsity | reference wall | reference peak RSS | ptp wall | ptp peak RSS | ptp / reference time | masks |",
             "|---|---|---|---|---|---|---|---|"]
    for row in args.rows:
        method, sparsity = row.split(":", 1)
        common = ["--data", str(args.data)]
        ours_cmd = [sys.executable, str(HERE / "reproduce_core.py"), *common, "--run", method, sparsity, "--no-eval"]
        ours_cmd += ["--true-sequential"] if args.true_sequential else []
        ref_cmd = [sys.executable, str(HERE / "reference_prune.py"), *common, "--method", method, "--sparsity", sparsity]
        ours, ref = [], []
        for _ in range(args.repeats):
            if not args.no_reference:
                ref.append(run(ref_cmd))
                print(json.dumps(ref[-1]), file=sys.stderr, flush=True)
            ours.append(run(ours_cmd))
            print(json.dumps(ours[-1]), file=sys.stderr, flush=True)
        o_s = statistics.median(r["prune_s"] for r in ours)
        o_rss = max(r["peak_rss_gb"] for r in ours)
        if ref:
            r_s = statistics.median(r["prune_s"] for r in ref)
            r_rss = max(r["peak_rss_gb"] for r in ref)
            same = "identical" if ours[0]["masks"] == ref[0]["masks"] else "differ"
            lines.append(f"| {method} | {sparsity} | {r_s:.0f} s | {r_rss:.2f} GB | {o_s:.0f} s | {o_rss:.2f} GB | "
                         f"{o_s / r_s:.2f} | {same} |")
        else:
            lines.append(f"| {method} | {sparsity} | | | {o_s:.0f} s | {o_rss:.2f} GB | | |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
