"""The `ptp` command: a thin argparse layer over the Python API.

Each subcommand has an ``add_<name>(subparsers)`` that declares its arguments and sets
``func`` to the function that runs it. Bad input raises ``ConfigError``: one line on
stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from .config import ConfigError, PruneConfig

# lm-eval requests per forward for `ptp eval --tasks` (one at a time ran 2-13 requests/s on
# SmolLM2 on 2 CPU cores; lm-eval sorts them by length, so batches carry little padding).
TASK_BATCH = 16


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptp", description="Post-training pruning of causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # --nproc re-runs the same command under torchrun
    level = logging.DEBUG if args.verbose else logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ptp").setLevel(level)  # basicConfig is a no-op on a second main() in one process
    try:
        return args.func(args) or 0
    except ConfigError as err:
        print(f"ptp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # atomic writes have already removed their temporary directories
        print("ptp: interrupted; nothing was written", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- prune / export


def _quiet_libraries(args) -> None:
    """--quiet also silences the progress bars transformers and datasets draw on their own."""
    if getattr(args, "quiet", False):
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


@contextlib.contextmanager
def _silenced(quiet: bool):
    """With --quiet, hide stderr while loading: transformers' GGUF reader draws a progress bar
    that its own switch does not reach. Errors still arrive, as exceptions."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        yield


def _emit(args, summary: dict, lines: list[str]) -> None:
    """--json: the summary as one line on stdout; otherwise readable lines. --quiet silences
    progress and logs, never the result."""
    if args.json:
        print(json.dumps(summary))
    else:
        print("\n".join(lines))


def add_prune(sub) -> None:
    d = PruneConfig()
    p = sub.add_parser("prune", help="prune a model from calibration data and save it",
                       description="Prune MODEL layer by layer and save it to --out (atomically, with ptp.json).")
    p.add_argument("model", help="hub ID (org/name), local model directory, .gguf file, or smollm2-135m")
    p.add_argument("--method", default=d.method,
                   help="magnitude, wanda, sparsegpt, admm (most accurate), or structured (remove channels and "
                        "heads) (default %(default)s)")
    p.add_argument("--sparsity", default=None, help="fraction (0.5, 50%%) or N:M (2:4, 4:8); required except for structured")
    p.add_argument("--ratio", type=float, default=None,
                   help="structured: fraction of each decoder block's parameters to remove (e.g. 0.35)")
    p.add_argument("--attn-ratio", type=float, default=None,
                   help="structured: fraction of the key/value head groups to remove (default: --ratio, rounded)")
    p.add_argument("--experts-ratio", type=float, default=None,
                   help="structured, mixture-of-experts: fraction of the routed experts to remove, least used first "
                        "(default: keep every expert, shrink each one's width; --ratio 0 removes experts only)")
    p.add_argument("--importance", default="flap", help="structured: flap, wanda-sp or obs (default %(default)s)")
    p.add_argument("--compensation", default="ls",
                   help="structured: ls (least-squares update, standard config), bias or none (default %(default)s)")
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
    p.add_argument("--profile", default=None, metavar="owl|FILE",
                   help="non-uniform sparsity (unstructured only): owl (per block, from outlier activations; "
                        "mean = --sparsity), or a JSON file {layer pattern: sparsity} for layers that differ")
    p.add_argument("--owl-m", type=float, default=d.owl_m, help="OWL outlier threshold, times the mean score")
    p.add_argument("--owl-lambda", type=float, default=d.owl_lambda, help="OWL's largest deviation from --sparsity")
    p.add_argument("--true-sequential", action="store_true", help="prune each group of layers from the already-pruned ones before it (one pass, more memory)")
    p.add_argument("--reconstruct", action="store_true",
                   help="after each block is pruned, tune its kept weights (mask frozen) so its output matches "
                        "the dense block's; held-out windows decide per block whether the tuning is kept")
    p.add_argument("--recon-epochs", type=int, default=d.recon_epochs, help="reconstruction passes over the windows")
    p.add_argument("--recon-lr", type=float, default=d.recon_lr, help="reconstruction Adam learning rate")
    p.add_argument("--recon-batch", type=int, default=d.recon_batch, help="calibration windows per reconstruction step")
    p.add_argument("--recon-holdout", type=int, default=d.recon_holdout,
                   help="calibration windows held out of the steps, to check each block's tuning")
    p.add_argument("--recon-norms", action="store_true", help="also tune the blocks' norm scales")
    p.add_argument("--skip", action="append", default=[], metavar="LAYER",
                   help="leave layers dense: a name or dotted suffix (down_proj, layers.3); repeat or comma-separate")
    p.add_argument("--blocks", default=None, help="dotted path of the decoder blocks (found automatically)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="calibration samples per forward")
    p.add_argument("--device", default=None, help="compute device (default: cuda if present, else cpu)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reloading and checking the saved model, and the checksums of a MODEL ptp wrote")
    p.add_argument("--stream", action="store_true",
                   help="never hold the model: load one decoder block at a time from the safetensors shards, write "
                        "it pruned, checkpoint after every block (automatic when the model would not fit in memory)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted --stream run of this --out from its last finished block (implies --stream)")
    p.add_argument("--act-budget", default=None, metavar="SIZE",
                   help="with --stream: keep calibration activations in memory up to SIZE (512MB, 2GiB), "
                        "on disk above it (default: no limit)")
    p.add_argument("--nproc", type=int, default=1,
                   help="split the calibration samples over N processes on this machine (runs torchrun; "
                        "or launch `torchrun --nproc-per-node N -m ptp prune ...` yourself)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary on stdout")
    p.set_defaults(func=run_prune)


def run_prune(args) -> int:
    """Validate everything cheap first, so bad input fails before minutes of work and writes nothing."""
    from . import io, pipeline, scale

    if args.method.lower() == "structured":
        return run_prune_structured(args)
    if args.sparsity is None:
        raise ConfigError(f"--method {args.method} needs --sparsity")
    start = time.perf_counter()
    _quiet_libraries(args)
    config = PruneConfig(
        method=args.method, sparsity=args.sparsity, blocksize=args.blocksize, damp=args.damp,
        true_sequential=args.true_sequential, blocks=args.blocks, batch_size=args.batch_size, device=args.device,
        skip=tuple(s.strip() for item in args.skip for s in item.split(",") if s.strip()),
        profile=_read_profile(args.profile), owl_m=args.owl_m, owl_lambda=args.owl_lambda,
        reconstruct=args.reconstruct, recon_epochs=args.recon_epochs, recon_lr=args.recon_lr,
        recon_batch=args.recon_batch, recon_holdout=args.recon_holdout, recon_norms=args.recon_norms,
    )
    if args.reconstruct and args.nproc > 1:
        from .engine import RECONSTRUCT_ONE_PROCESS

        raise ConfigError(RECONSTRUCT_ONE_PROCESS)
    if args.format not in ("dense", "compressed"):
        raise ConfigError(f"unknown format {args.format!r}; choose dense or compressed")
    stream, budget = _stream_options(args)
    if stream and args.format != "dense":
        raise ConfigError("--stream writes dense checkpoints; --format compressed needs the model in memory")
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be positive, got {args.nproc}")
    _check_counts(args)
    if args.resume and _finished(args, config.method, str(config.sparsity)):
        return 0
    io.check_out_dir(args.out, args.overwrite)
    io.resolve_model(args.model)  # an unknown model name fails here, before anything loads
    if args.nproc > 1 and not scale.launched():
        return scale.launch(args.nproc, args.argv)
    config.device = scale.init_distributed(config.device)
    can_stream = args.format == "dense" and args.calib != "self"
    if stream or scale.any_rank(can_stream and scale.would_not_fit(args.model)):
        return run_prune_stream(args, config, budget, start)
    with _silenced(args.quiet):
        loaded = io.load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                               verify=not args.no_verify)
    result = pipeline.run(_job(args, prune=config), loaded=loaded, meta={"arguments": _arguments(args)})
    if scale.rank_world()[0] == 0:  # rank 0 saved
        _prune_summary(args, config, result.tokens.shape[1], result.report, result.record, start)
    return 0


def _stream_options(args) -> tuple[bool, int | None]:
    """(whether --stream / --resume was asked, the --act-budget in bytes), checked."""
    from . import scale

    budget = scale.parse_size(args.act_budget)
    stream = args.stream or args.resume
    if budget is not None and not stream:
        raise ConfigError("--act-budget applies to --stream runs")
    if stream and args.calib == "self":
        raise ConfigError("--calib self samples from the whole model, which --stream never loads; give calibration text")
    return stream, budget


def _job(args, **fields) -> "pipeline.Job":
    """The pipeline job of a ``ptp prune`` command line (everything but the pruning itself)."""
    from . import pipeline

    return pipeline.Job(args.model, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                        text_field=args.text_field, dtype=args.dtype, out=args.out, format=args.format,
                        overwrite=args.overwrite, verify=not args.no_verify,
                        trust_remote_code=args.trust_remote_code, **fields)


def _arguments(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "argv")}


def run_prune_stream(args, config: PruneConfig, budget: int | None, start: float, structured: dict | None = None) -> int:
    """``--stream`` / ``--resume``: ``ptp.scale.Stream`` reads one block at a time and checkpoints
    (``structured``: ``prune_structured``'s options, for ``--method structured``)."""
    from transformers import AutoTokenizer

    from . import data, integrity, pipeline, scale

    if not args.no_verify and Path(args.model).is_dir():
        integrity.check_files(args.model)  # a ptp output as input: its checksums, as a load would
    stream = scale.Stream(args.model, args.out, config, dtype=args.dtype, resume=args.resume,
                          overwrite=args.overwrite, act_budget=budget, trust_remote_code=args.trust_remote_code,
                          structured=structured)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the tokenizer of {args.model}: {str(err).strip().splitlines()[0]}") from None
    seqlen = pipeline.default_seqlen(stream.model, args.seqlen)
    tokens = data.calibration_batches(args.calib, tokenizer, args.nsamples, seqlen, args.seed,
                                      model=stream.model, text_field=args.text_field)
    meta = _prune_meta(args, config, seqlen, (str(stream.source), None), None)
    if structured is not None:  # recorded as pipeline.run records a structured prune
        meta = {**{k: v for k, v in meta.items() if k not in ("sparsity", "config", "processes")},
                "method": "structured"}
    report = stream.run(tokens, tokenizer=tokenizer, meta=meta, verify=not args.no_verify)
    if stream.rank != 0:
        return 0
    if structured is not None:
        _structured_summary(args, report, seqlen, start)
    else:
        _prune_summary(args, config, seqlen, report, stream.record, start)
    return 0


def _check_counts(args) -> None:
    """--nsamples and --seqlen, before the model is loaded (which takes minutes on large models):
    positive, and --seqlen within the positions of a local model directory's config.json (a GGUF
    file's config costs as much to read as the model, so that check waits for the model)."""
    if args.nsamples < 1 or (args.seqlen is not None and args.seqlen < 1):
        raise ConfigError(f"--nsamples and --seqlen must be positive, got {args.nsamples} and {args.seqlen}")
    config = Path(args.model).expanduser() / "config.json"
    if args.seqlen is None or not config.is_file():
        return
    try:
        fields = json.loads(config.read_text(encoding="utf-8"))
        limit = fields.get("max_position_embeddings") or fields.get("n_positions")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return  # loading the model will say what is wrong with it
    if isinstance(limit, int) and args.seqlen > limit:
        raise ConfigError(f"seqlen {args.seqlen} is above the model's maximum positions ({limit})")


def _finished(args, method: str, sparsity: str | None) -> bool:
    """--resume of a run that already finished: --out holds its result and nothing is left to do.
    True (and says so) when the record in --out is this same run; a different run is an error."""
    from . import integrity

    out = Path(args.out).expanduser()
    partial = out.parent / f".{out.name}.ptp-partial"
    if not out.is_dir() or (partial / "ptp-state.json").exists():
        return False
    record = integrity.read_record(out)
    if record is None:
        return False
    ran = {"model": record.get("model"), "method": record.get("method"), "sparsity": record.get("sparsity"),
           "calib": (record.get("calibration") or {}).get("source"),
           "nsamples": (record.get("calibration") or {}).get("nsamples"),
           "seed": (record.get("calibration") or {}).get("seed"), "ratio": (record.get("structured") or {}).get("ratio")}
    asked = {"model": args.model, "method": method, "sparsity": sparsity, "calib": args.calib,
             "nsamples": args.nsamples, "seed": args.seed, "ratio": args.ratio if method == "structured" else None}
    differ = [k for k in asked if ran[k] != asked[k]]
    if differ:
        raise ConfigError(f"--resume: {out} holds a finished run with different settings ({', '.join(differ)}); "
                          "choose another --out, or --overwrite without --resume to replace it")
    if args.json:
        print(json.dumps({"out": str(args.out), "complete": True}))
    else:
        print(f"{args.out}: the run is complete (nothing to resume)")
    return True


def _prune_meta(args, config: PruneConfig, seqlen: int, source: tuple, revision) -> dict:
    """What ptp.json records about a run, beyond what ``io.save`` adds."""
    from . import scale

    return {
        "model": args.model,
        "model_source": {"path": source[0], "gguf_file": source[1], "revision": revision},
        "method": config.method,
        "sparsity": str(config.sparsity),
        "calibration": {"source": args.calib, "nsamples": args.nsamples, "seqlen": seqlen, "seed": args.seed,
                        "text_field": args.text_field},
        "config": config.to_dict(),
        "processes": scale.rank_world()[1],  # calibration split over this many (torchrun / --nproc)
        "arguments": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
    }


def _prune_summary(args, config: PruneConfig, seqlen: int, report, record: dict, start: float) -> None:
    summary = {
        "out": str(args.out), "model": args.model, "method": config.method, "sparsity": str(config.sparsity),
        "calib": args.calib, "nsamples": args.nsamples, "seqlen": seqlen,
        "mean_sparsity": report.mean_sparsity, "layers": len(report.layers),
        "sparsity_blocks": report.accounting.get("blocks", {}).get("sparsity"),
        "sparsity_model": report.accounting.get("model", {}).get("sparsity"),
        "mean_error": sum(l.error for l in report.layers) / max(len(report.layers), 1),
        "prune_time_s": report.wall_time_s, "wall_time_s": time.perf_counter() - start,
        "peak_memory_bytes": record["peak_memory_bytes"], "format": args.format, "verified": not args.no_verify,
    }
    lines = [f"pruned {summary['layers']} layers of {args.model} with {config.method} {config.sparsity}: "
             f"achieved sparsity {report.mean_sparsity:.4f}, mean relative error {summary['mean_error']:.4g}",
             *_accounting_lines(report),
             f"saved to {args.out} ({args.format}{', verified' if not args.no_verify else ''}) "
             f"in {summary['wall_time_s']:.1f} s"]
    if "compression" in record:
        summary["compression"] = c = record["compression"]
        lines.append(f"compressed: pruned linear weights {c['pruned_weights_ratio']:.3f}x of dense, "
                     f"whole checkpoint {c['checkpoint_ratio']:.3f}x")
    _emit(args, summary, lines)


def _accounting_lines(report) -> list[str]:
    acc = report.accounting
    if not acc:
        return []
    summary = [f"{label} {acc[key]['sparsity']:.4f} of {acc[key]['params']:,}" for key, label in
               (("pruned", "pruned weights"), ("blocks", "decoder blocks"), ("model", "whole model"))]
    reasons: dict[str, int] = {}
    for d in acc["dense"]:
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + d["params"]
    return ["sparsity: " + ", ".join(summary),
            "left dense: " + (", ".join(f"{n:,} weights {r}" for r, n in reasons.items()) or "nothing")]


def _read_profile(spec: str | None):
    """``owl`` stays a name; anything else is a JSON file of {layer pattern: sparsity}."""
    if spec is None or spec.lower() == "owl":
        return spec
    try:
        profile = json.loads(Path(spec).read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read profile {spec}: {err.strerror}") from None
    except (UnicodeDecodeError, ValueError) as err:  # not text, or not JSON
        raise ConfigError(f"profile {spec} is not JSON: {err}") from None
    if not isinstance(profile, dict):
        raise ConfigError(f"profile {spec} must be a JSON object of layer pattern -> sparsity")
    return profile


def run_prune_structured(args) -> int:
    """``--method structured``: a smaller standard model (``ptp.prune_structured``), saved dense."""
    from . import io, pipeline, scale
    from .structured import check_options

    start = time.perf_counter()
    _quiet_libraries(args)
    if args.ratio is None:
        raise ConfigError("--method structured needs --ratio, the fraction of each block's parameters to remove")
    for flag, given in (("--sparsity", args.sparsity is not None), ("--skip", bool(args.skip)),
                        ("--format compressed", args.format != "dense"), ("--true-sequential", args.true_sequential),
                        ("--profile", args.profile is not None)):
        if given:
            raise ConfigError(f"{flag} does not apply to --method structured")
    if args.nproc != 1:
        raise ConfigError("--method structured runs in one process (its channel statistics are not summed across "
                          "processes); drop --nproc, and add --stream for a model larger than memory")
    check_options(args.ratio, args.attn_ratio, args.importance, args.compensation, args.experts_ratio)
    stream, budget = _stream_options(args)
    _check_counts(args)
    if args.resume and _finished(args, "structured", None):
        return 0
    io.check_out_dir(args.out, args.overwrite)
    io.resolve_model(args.model)  # an unknown model name fails here, before anything loads
    # The loop's settings and reconstruction's; the method is prune_structured's options.
    config = PruneConfig(batch_size=args.batch_size, device=args.device, blocks=args.blocks,
                         reconstruct=args.reconstruct, recon_epochs=args.recon_epochs, recon_lr=args.recon_lr,
                         recon_batch=args.recon_batch, recon_holdout=args.recon_holdout, recon_norms=args.recon_norms)
    options = dict(attn_ratio=args.attn_ratio, experts_ratio=args.experts_ratio, importance=args.importance,
                   compensation=args.compensation, damp=args.damp)
    if stream or (args.calib != "self" and scale.would_not_fit(args.model)):
        return run_prune_stream(args, config, budget, start, dict(ratio=args.ratio, **options))
    with _silenced(args.quiet):
        loaded = io.load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                               verify=not args.no_verify)
    options.update(batch_size=args.batch_size, device=args.device, blocks=args.blocks,
                   tuning=config if args.reconstruct else None)
    result = pipeline.run(_job(args, structured_ratio=args.ratio, structured_options=options), loaded=loaded,
                          meta={"arguments": _arguments(args)})
    _structured_summary(args, result.report, result.tokens.shape[1], start)
    return 0


def _structured_summary(args, report, seqlen: int, start: float) -> None:
    summary = {
        "out": str(args.out), "model": args.model, "method": "structured", "ratio": args.ratio,
        "importance": report.importance, "compensation": report.compensation, "removed": report.removed,
        "config": report.config, "calib": args.calib, "nsamples": args.nsamples, "seqlen": seqlen,
        "prune_time_s": report.wall_time_s, "wall_time_s": time.perf_counter() - start,
        "verified": not args.no_verify,
    }
    changes = ", ".join(f"{k} {v}" for k, v in report.config.items())
    lines = [f"structured {report.importance}/{report.compensation} on {args.model}: removed "
             f"{100 * report.removed:.1f}% of the decoder blocks' parameters ({changes})",
             f"saved to {args.out} (a standard checkpoint{', verified' if not args.no_verify else ''}) "
             f"in {summary['wall_time_s']:.1f} s"]
    _emit(args, summary, lines)


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a compressed ptp directory as an ordinary dense checkpoint")
    p.add_argument("dir", help="a directory saved by ptp prune --format compressed")
    p.add_argument("--dense", required=True, metavar="OUT", help="output directory for the dense checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking DIR against its ptp.json checksums, and reloading and comparing OUT")
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


# --------------------------------------------------------------------------- eval / bench / report


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_for_eval(args, name: str, runtime: str = "dense"):
    from . import io

    device = args.device or ("cpu" if runtime == "sparse" else _default_device())
    with _silenced(args.quiet):
        return io.load_model(name, dtype=args.dtype, trust_remote_code=args.trust_remote_code, device=device,
                             verify=not args.no_verify, runtime=runtime)


def _write_md(args, text: str, default_name: str) -> Path:
    """The markdown table goes to --md, else next to a local MODEL directory, else to cwd."""
    if args.md:
        path = Path(args.md)
    elif args.model and Path(args.model).is_dir():
        path = Path(args.model) / default_name
    else:
        path = Path(default_name)
    try:
        path.write_text(text + "\n")
    except OSError as err:
        raise ConfigError(f"cannot write the markdown report {path}: {err.strerror}") from None
    return path


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _common_model_args(p) -> None:
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")
    p.add_argument("--runtime", default="dense", choices=("dense", "sparse"),
                   help="sparse: run MODEL's pruned linear layers on ptp's packed CPU kernels (default dense)")
    p.add_argument("--md", default=None, metavar="PATH",
                   help="write the markdown table here (default: into MODEL if it is a directory, else the cwd)")
    p.add_argument("--no-verify", action="store_true",
                   help="load a directory ptp wrote without checking it against the checksums in its ptp.json")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, lm-eval tasks, and agreement with the dense model",
                       description="Evaluate MODEL. Without --ppl or --tasks, --ppl wikitext2.")
    p.add_argument("model", help="hub ID, local model directory, .gguf file, or smollm2-135m")
    p.add_argument("--ppl", default=None, metavar="SOURCES",
                   help="comma-separated: wikitext2, c4, ptb (through datasets) or paths of text files")
    p.add_argument("--seqlen", type=int, default=None, help="window length (default: min(2048, model max))")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first K windows")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"windows per forward pass (default 1); for --tasks, lm-eval requests per forward "
                        f"(default {TASK_BATCH}: lm-eval sorts requests by length, so a batch pads little)")
    p.add_argument("--compare", default=None, metavar="DENSE",
                   help="also report KL(dense||model) and top-1 agreement on the --ppl windows")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (arc_easy,hellaswag,...)")
    p.add_argument("--include-path", default=None, metavar="DIR", help="directory of local lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval few-shot examples")
    p.add_argument("--task-limit", type=float, default=None, help="lm-eval: only the first N documents per task")
    _common_model_args(p)
    p.set_defaults(func=run_eval)


def _check_eval_args(args) -> None:
    """Non-positive limits are mistakes, not "the default": refuse them before loading anything."""
    for flag, value, low in (("--seqlen", args.seqlen, 2), ("--limit", args.limit, 1),
                             ("--batch-size", args.batch_size, 1), ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    if args.task_limit is not None and not args.task_limit > 0:
        raise ConfigError(f"--task-limit must be positive, got {args.task_limit}")


def run_eval(args) -> int:
    from . import evaluate, pipeline

    _check_eval_args(args)
    _quiet_libraries(args)
    sources = _csv(args.ppl) or ([] if args.tasks else ["wikitext2"])
    if args.compare and not sources:
        raise ConfigError("--compare needs --ppl SOURCE: the windows to compare the two models on")
    if args.include_path and not Path(args.include_path).is_dir():
        raise ConfigError(f"--include-path {args.include_path} is not a directory")
    for source in sources:  # before minutes of model loading
        evaluate.check_source(source)
    model, tokenizer = _load_for_eval(args, args.model, args.runtime)
    dense = _load_for_eval(args, args.compare)[0] if args.compare else None
    seqlen = pipeline.default_seqlen(model, args.seqlen)  # GPT-2's n_positions too
    evaluate.check_seqlen(model, seqlen)
    progress = not args.quiet
    summary: dict = {"model": args.model, "seqlen": seqlen, "limit": args.limit, "perplexity": {}}
    lines = ["| source | perplexity | dense perplexity | KL(dense‖model) | top-1 agreement |", "|---|---|---|---|---|"]
    for source in sources:
        tokens = evaluate.eval_tokens(tokenizer, source, seqlen)
        if dense is None:
            ppl = evaluate.perplexity_of_tokens(model, tokens, seqlen, args.limit, args.batch_size or 1, progress)
            summary["perplexity"][source] = ppl
            lines.append(f"| {source} | {ppl:.4f} | | | |")
        else:
            a = evaluate.compare_on_tokens(model, dense, tokens, seqlen, args.limit, args.batch_size or 1, progress)
            summary["perplexity"][source] = a.ppl_pruned
            summary.setdefault("compare", {"dense": args.compare})[source] = a.to_dict()
            lines.append(f"| {source} | {a.ppl_pruned:.4f} | {a.ppl_dense:.4f} | {a.kl:.4f} | {a.top1:.4f} |")
    if args.tasks:
        summary["tasks"] = evaluate.evaluate_tasks(
            model, tokenizer, _csv(args.tasks), include_path=args.include_path, num_fewshot=args.num_fewshot,
            limit=int(args.task_limit) if args.task_limit and args.task_limit >= 1 else args.task_limit,
            batch_size=args.batch_size or TASK_BATCH,
        )
        lines += ["", "| task | metric | value |", "|---|---|---|"]
        lines += [f"| {t} | {k} | {v:.4f} |" for t, ms in summary["tasks"].items() for k, v in ms.items()]
    if not sources:
        lines = lines[3:]  # tasks only: drop the empty perplexity table
    table = f"`{args.model}`, windows of {seqlen} tokens" + (f", first {args.limit}" if args.limit else "")
    table += ", sparse runtime" if args.runtime == "sparse" else ""
    text = table + "\n\n" + "\n".join(lines)
    summary["markdown"] = str(_write_md(args, text, "eval.md"))
    _emit(args, summary, [text])
    return 0


def _shapes(value: str) -> tuple[tuple[int, int], ...]:
    """``1x128,4x128`` -> ((1, 128), (4, 128))."""
    try:
        return tuple((int(b), int(n)) for b, n in (s.lower().split("x") for s in _csv(value)))
    except ValueError:
        raise ConfigError(f"--prefill takes BATCHxLENGTH shapes like 1x128,4x128; got {value!r}") from None


def add_bench(sub) -> None:
    from .bench import DECODE_BATCHES, DECODE_PROMPT, NEW_TOKENS, PREFILL_SHAPES

    p = sub.add_parser("bench", help="prefill and decode throughput, interleaved with the dense model",
                       description="Measure MODEL's tokens/s (and DENSE's in the same run with --compare).")
    p.add_argument("model", nargs="?", help="hub ID, local model directory, .gguf file, or smollm2-135m")
    p.add_argument("--compare", default=None, metavar="DENSE", help="the dense original, measured interleaved")
    p.add_argument("--kernels", action="store_true",
                   help="no model: per-layer-shape time and GB/s of the sparse kernel, the dense linears and a "
                        "memory copy (see ptp.sparse.bench)")
    p.add_argument("--prefill", default=",".join(f"{b}x{n}" for b, n in PREFILL_SHAPES),
                   help="prefill shapes BATCHxLENGTH (default %(default)s)")
    p.add_argument("--decode-batches", default=",".join(map(str, DECODE_BATCHES)),
                   help="decode batch sizes (default %(default)s)")
    p.add_argument("--prompt-len", type=int, default=DECODE_PROMPT, help="decode prompt length (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="decode steps timed (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per shape and model (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported (default %(default)s)")
    p.add_argument("--no-2-4-kernels", action="store_true", help="CUDA: skip the semi-structured 2:4 variant")
    _common_model_args(p)
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from .bench import throughput

    _quiet_libraries(args)
    shapes = _shapes(args.prefill)
    try:
        decode = tuple(int(b) for b in _csv(args.decode_batches))
    except ValueError:
        raise ConfigError(f"--decode-batches must be integers like 1,8; got {args.decode_batches!r}") from None
    if min([args.repeats, args.new_tokens, args.prompt_len, *decode, *(x for s in shapes for x in s)]) < 1:
        raise ConfigError("shapes, batches, --prompt-len, --new-tokens and --repeats must be positive")
    if args.kernels:
        return run_kernel_bench(args)
    if not args.model:
        raise ConfigError("bench needs MODEL (or --kernels)")
    model = _load_for_eval(args, args.model)[0]
    models = {"dense": _load_for_eval(args, args.compare)[0], "pruned": model} if args.compare else {"model": model}
    if args.runtime == "sparse":  # the same checkpoint through the sparse runtime, next to it
        models[("pruned" if args.compare else "model") + "+sparse"] = _load_for_eval(args, args.model, "sparse")[0]
    report = throughput(models, prefill_shapes=shapes, decode_batches=decode, prompt_len=args.prompt_len,
                        new_tokens=args.new_tokens, warmup=args.warmup, repeats=args.repeats,
                        semi_structured=not args.no_2_4_kernels)
    text = report.markdown()
    summary = {"model": args.model, "compare": args.compare, **report.to_dict()}
    summary["markdown"] = str(_write_md(args, text, "bench.md"))
    _emit(args, summary, [text])
    return 0


def run_kernel_bench(args) -> int:
    from .sparse import bench

    rows = bench.kernel_bench(warmup=args.warmup, repeats=args.repeats)
    text = bench.markdown(rows)
    summary = {"kernels": bench.to_dicts(rows)}
    summary["markdown"] = str(_write_md(args, text, "bench-kernels.md"))
    _emit(args, summary, [text])
    return 0


def add_report(sub) -> None:
    p = sub.add_parser("report", help="per-block sparsity and reconstruction error of a pruned directory",
                       description="Summarise DIR/ptp.json as DIR/report.md (and DIR/layers.png with --plot).")
    p.add_argument("dir", help="a directory written by ptp prune")
    p.add_argument("--plot", action="store_true", help="also draw DIR/layers.png (matplotlib)")
    p.add_argument("--no-verify", action="store_true", help="skip the checksums in ptp.json (sparsities still "
                                                            "come from the stored weights)")
    p.add_argument("-q", "--quiet", action="store_true", help="no info logs")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run_report)


def run_report(args) -> int:
    from . import report

    from .integrity import measured_record

    record = measured_record(args.dir, verify=not args.no_verify)  # sparsities from the tensors, not the record's word
    text = report.markdown(record)
    folder = Path(args.dir)
    structured = "structured" in record
    if structured and args.plot:
        raise ConfigError("--plot draws per-layer sparsity; a structured model has none (its table is in report.md)")
    try:
        (folder / "report.md").write_text(text + "\n")
        png = str(report.plot(record, folder / "layers.png")) if args.plot else None
    except OSError as err:
        raise ConfigError(f"cannot write into {folder}: {err.strerror}") from None
    blocks = record["structured"]["blocks"] if structured else report.by_block(report.layer_rows(record))
    summary = {"dir": str(folder), "markdown": str(folder / "report.md"), "plot": png, "blocks": blocks}
    _emit(args, summary, [text] + ([f"\nplot: {png}"] if png else []))
    return 0


def add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="structured vs unstructured vs N:M on this model and this machine, measured",
                       description="Prune MODEL once per cell (method x pattern, and structured ratios) from the same "
                                   "calibration windows; evaluate, benchmark against dense and size every cell; "
                                   "write sweep.json, sweep.md and sweep.png to --out.")
    p.add_argument("model", help="hub ID, local model directory, .gguf file, or smollm2-135m")
    p.add_argument("--calib", default="wikitext2", metavar="SOURCE", help="calibration source, as for prune")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default %(default)s)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the window draw")
    p.add_argument("--methods", default="wanda,sparsegpt", help="comma-separated solvers (default %(default)s)")
    p.add_argument("--sparsities", default="0.5,2:4", help="comma-separated patterns (default %(default)s)")
    p.add_argument("--structured", default="", help="comma-separated structured ratios, e.g. 0.2,0.35")
    p.add_argument("--ppl", default="wikitext2", help="comma-separated evaluation texts; the first ranks the cells")
    p.add_argument("--ppl-seqlen", type=int, default=1024, help="evaluation window length")
    p.add_argument("--ppl-limit", type=int, default=32, help="evaluation windows per text (default %(default)s)")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval tasks")
    p.add_argument("--task-limit", type=int, default=None, help="examples per task")
    p.add_argument("--bench", action="store_true", help="measure decode and prefill tokens/s against dense")
    p.add_argument("--bench-repeats", type=int, default=3, help="timed repeats per measurement (median)")
    p.add_argument("--reconstruct", action="store_true", help="block reconstruction on every cell")
    p.add_argument("--max-ppl-increase", type=float, default=0.25,
                   help="quality budget of the 'fastest within' goal (default %(default)s = 25%%)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --out; finished cells are kept")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty, or --resume)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    p.set_defaults(func=run_sweep)


def run_sweep(args) -> int:
    from .sweep import SweepConfig, markdown, run_sweep as sweep

    for name in ("nsamples", "ppl_seqlen", "ppl_limit", "bench_repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    _quiet_libraries(args)
    config = SweepConfig(
        model=args.model, out=args.out, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        methods=tuple(_csv(args.methods)), sparsities=tuple(_csv(args.sparsities)),
        structured=tuple(float(r) for r in _csv(args.structured)), ppl=tuple(_csv(args.ppl)),
        ppl_seqlen=args.ppl_seqlen, ppl_limit=args.ppl_limit, tasks=tuple(_csv(args.tasks)),
        task_limit=args.task_limit, bench=args.bench, bench_repeats=args.bench_repeats, dtype=args.dtype,
        reconstruct=args.reconstruct, max_ppl_increase=args.max_ppl_increase, resume=args.resume)
    result = sweep(config)
    if not args.quiet:
        print(markdown(result))
    return 0


COMMANDS: list = []
COMMANDS += [add_prune, add_export]
COMMANDS += [add_eval, add_bench, add_report, add_sweep]

if __name__ == "__main__":
    sys.exit(main())
