"""``ptp sweep``: which kind of pruning, for this model on this machine? Every cell — a method at a
pattern, or a structured ratio — is pruned from the same calibration windows, evaluated on the same
text, benchmarked against the dense model in one interleaved run, and its size measured.

Cells run one after another, each from a fresh copy of the dense model; each result is written to
``sweep.json`` as soon as it exists, so an interrupted sweep resumes where it stopped and never
recomputes a finished cell. ``sweep.md`` (the table and one line per goal) and ``sweep.png``
(quality against decode speed, the Pareto front drawn) are rewritten after every cell.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ConfigError, PruneConfig, parse_sparsity

logger = logging.getLogger("ptp")

CALIB_FILE = "calibration.pt"
RESULTS = "sweep.json"


@dataclass
class SweepConfig:
    """Everything a sweep does; ``ptp sweep`` builds this same object.

    methods x sparsities are the unstructured / N:M cells; ``structured`` the structured ratios.
    ppl: evaluation texts (the first one ranks the cells). bench: measure tokens/s (dense kernels,
    the sparse runtime where it applies, structured models as they are). max_ppl_increase: the
    quality budget of the "fastest within" goal (0.25 = perplexity at most 25% above dense).
    """

    model: str
    out: str
    calib: str = "wikitext2"
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    methods: tuple[str, ...] = ("wanda", "sparsegpt")
    sparsities: tuple[str, ...] = ("0.5", "2:4")
    structured: tuple[float, ...] = ()
    ppl: tuple[str, ...] = ("wikitext2",)
    ppl_seqlen: int = 1024
    ppl_limit: int | None = 32
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    bench: bool = False
    bench_repeats: int = 3
    dtype: str = "auto"
    reconstruct: bool = False
    max_ppl_increase: float = 0.25
    resume: bool = False

    def __post_init__(self):
        self.methods = tuple(m.strip().lower() for m in self.methods if m.strip())
        self.sparsities = tuple(str(s).strip() for s in self.sparsities if str(s).strip())
        self.structured = tuple(float(r) for r in self.structured)
        for s in self.sparsities:
            parse_sparsity(s)
        for m in self.methods:
            PruneConfig(method=m)  # unknown method: one-line error now, not after the first cell
        if not self.ppl:
            raise ConfigError("a sweep needs at least one --ppl text to rank the cells")
        if not (self.methods and self.sparsities) and not self.structured:
            raise ConfigError("nothing to sweep: give --methods and --sparsities, or --structured ratios")

    def cells(self) -> list[dict]:
        out = [{"name": f"{m}-{s.replace(':', 'of')}", "method": m, "pattern": s}
               for m in self.methods for s in self.sparsities]
        return out + [{"name": f"structured-{r:g}", "method": "structured", "pattern": f"{r:g}"} for r in self.structured]

    def settings(self) -> dict:
        """What must not change between a sweep and its resumption."""
        keys = ("model", "calib", "nsamples", "seqlen", "seed", "ppl", "ppl_seqlen", "ppl_limit", "tasks",
                "task_limit", "bench", "bench_repeats", "dtype", "reconstruct")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(self, k)) for k in keys)}


@dataclass
class Sweep:
    config: SweepConfig
    dense: dict = field(default_factory=dict)
    cells: list[dict] = field(default_factory=list)

    def records(self) -> list[dict]:
        """The table as a list of flat records (dense first), as in sweep.md."""
        return [self.dense, *self.cells]

    def frame(self):
        """The records as a pandas DataFrame (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.records())


# --------------------------------------------------------------------------- measuring one model


def dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


def weight_bytes(model) -> int:
    from .bench import _weight_bytes

    return _weight_bytes(model)


def sparse_runtime(model):
    """A copy of ``model`` running ptp's sparse kernels, or None where the runtime is unavailable."""
    try:
        from . import sparse
    except ImportError:
        return None
    converted = copy.deepcopy(model)
    names = sparse.sparsify(converted)
    return converted if names else None


def bench(models: dict, repeats: int) -> dict[str, dict]:
    """Decode (batch 1, 32 new tokens) and prefill (1 x 128) tokens/s of each model, interleaved."""
    from .bench import throughput

    report = throughput(models, prefill_shapes=((1, 128),), decode_batches=(1,), repeats=repeats,
                        semi_structured=False)
    out: dict[str, dict] = {name: {} for name in models}
    for m in report.measurements:
        out[m.model][f"{m.kind}_tok_s"] = m.tokens_per_s
    return out


def evaluate(model, tokenizer, config: SweepConfig, tokens_by_source: dict) -> dict:
    from .evaluate import evaluate_tasks, perplexity_of_tokens

    row = {f"ppl[{Path(s).name}]": perplexity_of_tokens(model, t, config.ppl_seqlen, config.ppl_limit, 1, False)
           for s, t in tokens_by_source.items()}
    if config.tasks:
        for task, metrics in evaluate_tasks(model, tokenizer, list(config.tasks), limit=config.task_limit).items():
            row[f"{task}[acc]"] = metrics.get("acc", metrics.get("acc_norm"))
    return row


# --------------------------------------------------------------------------- the sweep


def _start(config: SweepConfig) -> tuple[Path, dict | None]:
    out = Path(config.out)
    previous = out / RESULTS
    if previous.is_file():
        if not config.resume:
            raise ConfigError(f"{out} holds a sweep: pass --resume to continue it, or choose another --out")
        try:
            state = json.loads(previous.read_text())
        except ValueError:
            raise ConfigError(f"{previous} is not valid JSON: not a sweep ptp wrote") from None
        if state.get("settings") != config.settings():
            diff = [k for k, v in config.settings().items() if state.get("settings", {}).get(k) != v]
            raise ConfigError(f"--resume with other settings than the sweep in {out}: {', '.join(diff)} differ")
        return out, state
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; a sweep writes into an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    return out, None


def _write(out: Path, config: SweepConfig, result: Sweep) -> None:
    state = {"settings": config.settings(), "dense": result.dense, "cells": result.cells}
    tmp = out / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(out / RESULTS)  # a kill never leaves half a file
    (out / "sweep.md").write_text(markdown(result) + "\n")
    if any("decode_tok_s" in r for r in result.records()):
        plot(result, out / "sweep.png")


def run_sweep(config: SweepConfig) -> Sweep:
    """Run (or resume) the sweep; returns every record. See the module docstring."""
    from . import io
    from .evaluate import eval_tokens
    from .pipeline import Job, calibrate, run

    out, state = _start(config)
    result = Sweep(config, **({"dense": state["dense"], "cells": state["cells"]} if state else {}))
    done = {c["name"] for c in result.cells}
    dense, tokenizer = io.load_model(config.model, dtype=config.dtype)
    dense.eval()
    first = Job(config.model, prune=PruneConfig(), calib=config.calib, nsamples=config.nsamples,
                seqlen=config.seqlen, seed=config.seed)
    if (out / CALIB_FILE).is_file():
        tokens = torch.load(out / CALIB_FILE)
    else:  # drawn once; every cell, and a resumed sweep, prunes from these very windows
        tokens = calibrate(first, dense, tokenizer)
        torch.save(tokens, out / CALIB_FILE)
    eval_sets = {s: eval_tokens(tokenizer, s, config.ppl_seqlen) for s in config.ppl}
    if not result.dense:
        result.dense = {"name": "dense", "method": "dense", "pattern": "-",
                        **evaluate(dense, tokenizer, config, eval_sets),
                        "weights_bytes": weight_bytes(dense), "status": "ok"}
        if config.bench:
            result.dense.update(bench({"dense": dense}, config.bench_repeats)["dense"], decode_x=1.0, prefill_x=1.0)
        _write(out, config, result)
    for cell in config.cells():
        if cell["name"] in done:
            logger.info("sweep: %s already measured, skipped", cell["name"])
            continue
        logger.info("sweep: %s", cell["name"])
        start = time.perf_counter()
        row = dict(cell)
        try:
            prune_config = None if cell["method"] == "structured" else PruneConfig(
                method=cell["method"], sparsity=cell["pattern"], reconstruct=config.reconstruct)
            structured = {"tuning": PruneConfig(reconstruct=True)} if config.reconstruct else {}
            job = Job(config.model, prune=prune_config,
                      structured_ratio=float(cell["pattern"]) if prune_config is None else None,
                      structured_options=structured if prune_config is None else {},
                      calib=config.calib, nsamples=config.nsamples, seqlen=config.seqlen, seed=config.seed,
                      out=str(out / "cells" / cell["name"]), format="dense" if prune_config is None else "compressed",
                      overwrite=True)
            model = copy.deepcopy(dense)
            pruned = run(job, tokens=tokens, loaded=(model, tokenizer))
            row.update(evaluate(model, tokenizer, config, eval_sets))
            row["prune_s"] = pruned.seconds["prune"]
            row["disk_bytes"] = dir_bytes(Path(job.out))
            row["weights_bytes"] = weight_bytes(model)
            row["sparsity_model"] = getattr(pruned.report, "accounting", {}).get("model", {}).get("sparsity")
            sparse = sparse_runtime(model) if prune_config is not None else None
            if sparse is not None:
                row["sparse_weights_bytes"] = weight_bytes(sparse)
            if config.bench:
                models = {"dense": dense, "pruned": model, **({"sparse": sparse} if sparse is not None else {})}
                speeds = bench(models, config.bench_repeats)
                for kind in ("decode_tok_s", "prefill_tok_s"):
                    base = speeds["dense"].get(kind)
                    row[kind] = speeds["pruned"].get(kind)
                    row[kind.replace("_tok_s", "_x")] = row[kind] / base if base and row[kind] else None
                    if sparse is not None:
                        row[f"sparse_{kind}"] = speeds["sparse"].get(kind)
                        row[f"sparse_{kind.replace('_tok_s', '_x')}"] = speeds["sparse"][kind] / base if base else None
            row["status"] = "ok"
            del model, sparse
        except ConfigError as err:
            row.update(status="error", error=str(err))
            logger.warning("sweep: %s failed: %s", cell["name"], err)
        row["seconds"] = time.perf_counter() - start
        result.cells.append(row)
        _write(out, config, result)
    return result


# --------------------------------------------------------------------------- the outputs


def _ppl_key(result: Sweep) -> str:
    return f"ppl[{Path(result.config.ppl[0]).name}]"


def decode_speed(row: dict) -> float | None:
    """A cell's decode speed-up over dense: the faster of its dense kernels and the sparse runtime."""
    xs = [row.get(k) for k in ("decode_x", "sparse_decode_x") if row.get(k)]
    return max(xs) if xs else (1.0 if row.get("method") == "dense" and "decode_tok_s" in row else None)


def goals(result: Sweep) -> list[str]:
    """One plain-language line per goal, naming the cell that wins on this machine."""
    key, dense_ppl = _ppl_key(result), result.dense.get(_ppl_key(result))
    ok = [r for r in result.cells if r.get("status") == "ok"]
    lines = []
    budget = result.config.max_ppl_increase
    within = [r for r in ok if r[key] <= dense_ppl * (1 + budget) and decode_speed(r)]
    if within:
        best = max(within, key=decode_speed)
        lines.append(f"Fastest at ≤ {budget:.0%} perplexity increase: {best['name']} "
                     f"({decode_speed(best):.2f}× decode, perplexity {best[key]:.2f} vs {dense_ppl:.2f}).")
    elif any(decode_speed(r) for r in ok):
        lines.append(f"Fastest at ≤ {budget:.0%} perplexity increase: no cell stays within it here.")
    sized = [r for r in ok if r.get("disk_bytes")]
    if sized:
        small = min(sized, key=lambda r: r["disk_bytes"])
        lines.append(f"Smallest: {small['name']} ({small['disk_bytes'] / 2**20:.1f} MiB on disk, perplexity {small[key]:.2f}).")
    fast = [r for r in ok if (decode_speed(r) or 0) >= 1.3]
    if fast:
        best = min(fast, key=lambda r: r[key])
        lines.append(f"Best quality at ≥ 1.3× decode speed: {best['name']} (perplexity {best[key]:.2f}, "
                     f"{decode_speed(best):.2f}×).")
    elif any(decode_speed(r) for r in ok):
        lines.append("Best quality at ≥ 1.3× decode speed: no cell reaches 1.3× here.")
    return lines


def _f(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else spec.format(value)


def markdown(result: Sweep) -> str:
    key, dense_ppl = _ppl_key(result), result.dense.get(_ppl_key(result))
    extra = [k for k in result.dense if k.startswith("ppl[") and k != key] + \
            [k for k in result.dense if k.endswith("[acc]")]
    head = (f"| cell | method | pattern | {key} | × dense | " + "".join(f"{k} | " for k in extra) +
            "decode tok/s | × | decode tok/s sparse | × | prefill tok/s | × | prefill sparse | × | "
            "disk MiB | weights in memory MiB (sparse) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result.records():
        if r.get("status") == "error":
            lines.append(f"| {r['name']} | {r['method']} | {r['pattern']} | error: {r['error'].replace('|', '/')} |")
            continue
        cells = [r["name"], r["method"], r["pattern"], _f(r.get(key), "{:.2f}"),
                 _f(r[key] / dense_ppl if r.get(key) and dense_ppl else None, "{:.3f}")]
        cells += [_f(r.get(k), "{:.3f}") for k in extra]
        for kind in ("decode", "prefill"):
            cells += [_f(r.get(f"{kind}_tok_s"), "{:.1f}"), _f(r.get(f"{kind}_x"), "{:.2f}"),
                      _f(r.get(f"sparse_{kind}_tok_s"), "{:.1f}"), _f(r.get(f"sparse_{kind}_x"), "{:.2f}")]
        memory = _f(r.get("weights_bytes", 0) / 2**20, "{:.1f}")
        if r.get("sparse_weights_bytes"):
            memory += f" ({r['sparse_weights_bytes'] / 2**20:.1f})"
        cells += [_f(r["disk_bytes"] / 2**20 if r.get("disk_bytes") else None, "{:.1f}"), memory]
        lines.append("| " + " | ".join(cells) + " |")
    c = result.config
    lines += ["", f"{c.model}; calibration {c.calib}, {c.nsamples} windows, seed {c.seed}; perplexity on "
              f"{', '.join(c.ppl)} ({c.ppl_limit or 'all'} windows of {c.ppl_seqlen}); decode: batch 1, 32 new "
              f"tokens; prefill: 1 × 128; × = ratio to dense in the same interleaved run.", ""]
    return "\n".join(lines + [f"- {g}" for g in goals(result)])


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both speed (higher) and perplexity (lower)."""
    front = []
    for i, (s, p) in enumerate(points):
        if not any((s2 >= s and p2 <= p) and (s2 > s or p2 < p) for j, (s2, p2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot(result: Sweep, path: Path) -> Path:
    """Perplexity (log) against decode speed-up, one point per cell, marker area ~ memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = _ppl_key(result)
    rows = [r for r in result.records() if r.get("status") == "ok" and decode_speed(r)]
    points = [(decode_speed(r), r[key]) for r in rows]
    memory = [r.get("sparse_weights_bytes") or r.get("weights_bytes") or 1 for r in rows]
    largest = max(memory)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r, (x, y), m in zip(rows, points, memory):
        colour = {"dense": "black", "structured": "tab:green"}.get(r["method"], "tab:blue")
        ax.scatter([x], [y], s=40 + 400 * m / largest, color=colour, alpha=0.6)
        ax.annotate(r["name"], (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    front = pareto(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="tab:red", label="Pareto front")
    ax.set_yscale("log")
    ax.set_xlabel("decode speed vs dense (batch 1; best of dense kernels and sparse runtime)")
    ax.set_ylabel(f"perplexity {key[4:-1]}")
    ax.set_title(f"{result.config.model}: quality vs speed (marker area ~ weights in memory)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
