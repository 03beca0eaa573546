"""A/B two builds of the sparse kernels on this machine: the two shared libraries side by side.

    python scripts/ab_kernels.py OLD.so NEW.so                       # new/old time per call, interleaved
    python scripts/ab_kernels.py OLD.so NEW.so --rows --rounds 4     # kernel_bench rows with each in turn

A library is built by ``ptp.sparse.build.library_path()`` into ``~/.cache/ptp/sparse/HASH/``
(the hash covers the sources, so keep the old one's path before editing them). The default
mode times ``kernels.matmul`` over more than 128 MB of packed copies per call (from DRAM, as a
decode step reads its layers), the two libraries alternating call by call, and prints the median
new/old time per shape, pattern and dtype at batch 1. ``--rows`` runs ``ptp bench --kernels``'
rows (speedup against the fastest dense path, fraction of the copy bandwidth) with each library
in turn, per round, and prints the medians over rounds.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from ptp.sparse import bench, kernels
from ptp.sparse import format as fmt


def load(path: str) -> ctypes.CDLL:
    return kernels.bind(ctypes.CDLL(path))


def use(lib: ctypes.CDLL) -> None:
    kernels.library = lambda: lib


def interleaved(libs, patterns, dtypes, rounds: int) -> None:
    for shape in bench.SHAPES:
        for pattern in patterns:
            for name in dtypes:
                w = bench.random_pruned(*shape, pattern).to(getattr(torch, name))
                packed = fmt.pack(w)
                copies = [packed] + [fmt.pack(w) for _ in range(-(-bench.COPIES_BYTES // packed.nbytes) - 1)]
                x = torch.randn(1, shape[1]).to(w.dtype)
                times = [[], []]
                for _ in range(rounds + 3):  # the first 3 are warm-up
                    for k, lib in enumerate(libs):
                        use(lib)
                        start = time.perf_counter()
                        for packed in copies:
                            kernels.matmul(packed, x)
                        times[k].append((time.perf_counter() - start) / len(copies))
                old, new = (statistics.median(t[3:]) for t in times)
                print(f"{shape[0]}x{shape[1]} {pattern} {name}: old {old * 1e3:.3f} ms, new {new * 1e3:.3f} ms, "
                      f"new/old {new / old:.3f}", flush=True)


def rows(libs, patterns, dtypes, rounds: int) -> None:
    results: dict = {}
    for _ in range(rounds):
        for k, lib in enumerate(libs):
            use(lib)
            for row in bench.kernel_bench(patterns=patterns, dtypes=dtypes, tokens=(1,)):
                results.setdefault((row.out, row.inp, row.pattern, row.dtype), ([], []))[k].append(row)
    print("| shape | pattern | values | speedup old | speedup new | of copy old | of copy new |\n|---|---|---|---|---|---|---|")
    for (out, inp, pattern, dtype), (old, new) in results.items():
        med = [statistics.median(r.speedup for r in side) for side in (old, new)]
        bw = [statistics.median(r.of_copy for r in side) for side in (old, new)]
        print(f"| {out}×{inp} | {pattern} | {dtype} | {med[0]:.2f}× | {med[1]:.2f}× | {bw[0]:.2f} | {bw[1]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--patterns", default="0.7,0.5")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--rows", action="store_true", help="kernel_bench rows per library instead")
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    libs = [load(args.old), load(args.new)]
    run = rows if args.rows else interleaved
    run(libs, args.patterns.split(","), args.dtypes.split(","), args.rounds)


if __name__ == "__main__":
    main()
