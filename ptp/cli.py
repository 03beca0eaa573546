"""The `ptp` command: a thin argparse layer over the Python API.

Each subcommand has an ``add_<name>(subparsers)`` that declares its arguments and sets
``func`` to the function that runs it. Bad input raises ``ConfigError``: one line on
stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .config import ConfigError, PruneConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptp", description="Post-training pruning of causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ptp").setLevel(level)  # basicConfig is a no-op on a second main() in one process
    try:
        return args.func(args) or 0
    except ConfigError as err:
        print(f"ptp: error: {err}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- prune / export


def _quiet_libraries(args) -> None:
    """--quiet also silences the progress bars transformers and datasets draw on their own."""
    if getattr(args, "quiet", False):
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


def _emit(args, summary: dict, lines: list[str]) -> None:
    """--json: the summary as one line on stdout; otherwise readable lines (none with --quiet)."""
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        print("\n".join(lines))


def add_prune(sub) -> None:
    d = PruneConfig()
    p = sub.add_parser("prune", help="prune a model from calibration data and save it",
                       description="Prune MODEL layer by layer and save it to --out (atomically, with ptp.json).")
    p.add_argument("model", help="hub ID (org/name), local model directory, .gguf file, or smollm2-135m")
    p.add_argument("--method", default=d.method, help="magnitude, wanda or sparsegpt (default %(default)s)")
    p.add_argument("--sparsity", required=True, help="fraction (0.5, 50%%) or N:M (2:4, 4:8)")
    p.add_argument("--calib", default="wikitext2", metavar="SOURCE",
                   help="self, a recipe name in calib/ (wikitext2, c4, ptb), a recipe .json, or a local "
                        ".txt/.jsonl/.parquet file or directory (default %(default)s)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default %(default)s)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per window (default 2048, or the model's maximum positions if smaller)")
    p.add_argument("--seed", type=int, default=0, help="seed for window draws and self-calibration sampling")
    p.add_argument("--text-field", default="text", help="text column of .jsonl/.parquet files")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must be empty or absent)")
    p.add_argument("--format", default="dense", help="dense (plain safetensors) or compressed (values + bitmask)")
    p.add_argument("--blocksize", type=int, default=d.blocksize, help="SparseGPT lazy-update block width")
    p.add_argument("--damp", type=float, default=d.damp, help="SparseGPT relative dampening")
    p.add_argument("--true-sequential", action="store_true", help="prune attention, re-run, then the MLP")
    p.add_argument("--skip", action="append", default=[], metavar="LAYER",
                   help="leave layers dense: a name or dotted suffix (down_proj, layers.3); repeat or comma-separate")
    p.add_argument("--blocks", default=None, help="dotted path of the decoder blocks (found automatically)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="calibration samples per forward")
    p.add_argument("--device", default=None, help="compute device (default: cuda if present, else cpu)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-verify", action="store_true", help="skip reloading and checking the saved model")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary on stdout")
    p.set_defaults(func=run_prune)


def run_prune(args) -> int:
    """Validate everything cheap first, so bad input fails before minutes of work and writes nothing."""
    from . import data, io
    from .engine import find_blocks, linear_layers, weight_matrix, prune

    start = time.perf_counter()
    _quiet_libraries(args)
    config = PruneConfig(
        method=args.method, sparsity=args.sparsity, blocksize=args.blocksize, damp=args.damp,
        true_sequential=args.true_sequential, blocks=args.blocks, batch_size=args.batch_size, device=args.device,
        skip=tuple(s.strip() for item in args.skip for s in item.split(",") if s.strip()),
    )
    if args.format not in ("dense", "compressed"):
        raise ConfigError(f"unknown format {args.format!r}; choose dense or compressed")
    io.check_out_dir(args.out, args.overwrite)
    source = io.resolve_model(args.model)
    model, tokenizer = io.load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)

    blocks_name, blocks = find_blocks(model, config.blocks)
    if config.sparsity.is_nm:  # the engine checks too, but only after calibration, which can be slow
        for i, block in enumerate(blocks):
            for name, layer in linear_layers(block, f"{blocks_name}.{i}", config.skip).items():
                if weight_matrix(layer).shape[1] % config.sparsity.m:
                    raise ConfigError(
                        f"layer {name} has {weight_matrix(layer).shape[1]} inputs, not a multiple of "
                        f"M={config.sparsity.m}; leave it dense with --skip {name}"
                    )
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    seqlen = args.seqlen or min(2048, limit or 2048)
    if args.calib == "self" and args.device:
        model.to(args.device)  # sampling runs the whole model; do it where the user asked to compute
    tokens = data.calibration_batches(args.calib, tokenizer, args.nsamples, seqlen, args.seed,
                                      model=model, text_field=args.text_field)
    model.to("cpu")  # the engine moves one block at a time to the device
    report = prune(model, tokens, config)

    meta = {
        "model": args.model,
        "model_source": {"path": source[0], "gguf_file": source[1],
                         "revision": getattr(model.config, "_commit_hash", None)},
        "method": config.method,
        "sparsity": str(config.sparsity),
        "calibration": {"source": args.calib, "nsamples": args.nsamples, "seqlen": seqlen, "seed": args.seed,
                        "text_field": args.text_field},
        "config": config.to_dict(),
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
        "total_wall_time_s": time.perf_counter() - start,  # load + calibration + pruning
    }
    record = io.save(model, tokenizer, args.out, report=report, sparsity=config.sparsity, meta=meta,
                     format=args.format, overwrite=args.overwrite, verify=not args.no_verify)
    summary = {
        "out": str(args.out), "model": args.model, "method": config.method, "sparsity": str(config.sparsity),
        "calib": args.calib, "nsamples": args.nsamples, "seqlen": seqlen,
        "mean_sparsity": report.mean_sparsity, "layers": len(report.layers),
        "mean_error": sum(l.error for l in report.layers) / max(len(report.layers), 1),
        "prune_time_s": report.wall_time_s, "wall_time_s": time.perf_counter() - start,
        "peak_memory_bytes": record["peak_memory_bytes"], "format": args.format, "verified": not args.no_verify,
    }
    lines = [f"pruned {summary['layers']} layers of {args.model} with {config.method} {config.sparsity}: "
             f"achieved sparsity {report.mean_sparsity:.4f}, mean relative error {summary['mean_error']:.4g}",
             f"saved to {args.out} ({args.format}{', verified' if not args.no_verify else ''}) "
             f"in {summary['wall_time_s']:.1f} s"]
    if "compression" in record:
        summary["compression"] = c = record["compression"]
        lines.append(f"compressed: pruned linear weights {c['pruned_weights_ratio']:.3f}x of dense, "
                     f"whole checkpoint {c['checkpoint_ratio']:.3f}x")
    _emit(args, summary, lines)
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a compressed ptp directory as an ordinary dense checkpoint")
    p.add_argument("dir", help="a directory saved by ptp prune --format compressed")
    p.add_argument("--dense", required=True, metavar="OUT", help="output directory for the dense checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--no-verify", action="store_true", help="skip reloading and comparing OUT")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary on stdout")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from . import io

    _quiet_libraries(args)
    if not Path(args.dir).is_dir():
        raise ConfigError(f"model path not found: {args.dir}")
    record = io.export_dense(args.dir, args.dense, overwrite=args.overwrite, verify=not args.no_verify)
    summary = {"out": str(args.dense), "from": str(args.dir), "format": record["format"],
               "verified": not args.no_verify}
    _emit(args, summary, [f"exported {args.dir} to {args.dense} (dense{', verified' if not args.no_verify else ''})"])
    return 0


COMMANDS: list = []
COMMANDS += [add_prune, add_export]

if __name__ == "__main__":
    sys.exit(main())
