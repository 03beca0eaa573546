"""Choose block reconstruction's settings on calibration data only: prune the first blocks of
SmolLM2-135M (the rest removed, so each trial takes a minute) and report, per setting, the mean
held-out output error after tuning relative to the solver's (the held-out windows are the last
``--holdout`` calibration windows, never stepped on), and the tuning time.

    python scripts/probe_reconstruction.py --data ../shared/data/wikitext2 --method sparsegpt --sparsity 2:4 \\
        --settings 3e-4:4 1e-3:4 3e-3:4 1e-3:8 1e-3:4:norms

A setting is LR:EPOCHS[:norms][:bBATCH]. Nothing here reads the test split.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_core import load_smollm2, stream  # noqa: E402


def parse(setting: str) -> dict:
    lr, epochs, *rest = setting.split(":")
    out = {"recon_lr": float(lr), "recon_epochs": int(epochs), "recon_norms": "norms" in rest}
    for r in rest:
        if r.startswith("b"):
            out["recon_batch"] = int(r[1:])
    return out


def main() -> None:
    import ptp
    from ptp.data import random_windows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with valid.tokens.txt")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--blocks", type=int, default=4, help="how many of the first blocks to prune")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--holdout", type=int, default=4)
    parser.add_argument("--structured", type=float, default=None, help="structured ratio instead of --method")
    parser.add_argument("--settings", nargs="+", default=["3e-4:4"])
    args = parser.parse_args()

    torch.manual_seed(0)
    full, tokenizer = load_smollm2()
    full.model.layers = full.model.layers[: args.blocks]
    full.config.num_hidden_layers = args.blocks
    calib = random_windows(stream(tokenizer, args.data / "valid.tokens.txt"), args.nsamples, args.seqlen, 0)
    for setting in args.settings:
        model = copy.deepcopy(full)
        tuning = ptp.PruneConfig(method=args.method, sparsity=args.sparsity, reconstruct=True,
                                 recon_holdout=args.holdout, **parse(setting))
        if args.structured is None:
            records = ptp.prune(model, calib, tuning).reconstruction
        else:
            records = ptp.prune_structured(model, calib, args.structured, tuning=tuning).reconstruction
        ratio = [t["heldout_after"] / t["heldout_before"] for t in records]
        print(json.dumps({"setting": setting, "held_out_after_over_before": [round(r, 4) for r in ratio],
                          "mean": round(sum(ratio) / len(ratio), 4), "kept": [t["kept"] for t in records],
                          "tuning_s": round(sum(t["seconds"] for t in records), 1)}), flush=True)


if __name__ == "__main__":
    main()
