"""Time the prune of setup S (SmolLM2-135M fp32, 64x512 WikiText-2 validation tokens, seed 0)
for each solver: wall time of ``ptp.prune`` and peak RSS (model load included), one fresh
process per row, no evaluation.

    python scripts/bench_prune.py --data ../shared/data/wikitext2 [--true-sequential]

The same as ``reproduce_core.py --no-eval`` over the four solver rows.
"""

import subprocess
import sys
from pathlib import Path

ROWS = ["wanda:0.5", "wanda:2:4", "sparsegpt:0.5", "sparsegpt:2:4"]

if __name__ == "__main__":
    script = Path(__file__).with_name("reproduce_core.py")
    sys.exit(subprocess.call([sys.executable, str(script), "--no-eval", "--rows", *ROWS, *sys.argv[1:]]))
