"""What a prune did, block by block: markdown tables and a plot from a run's ``ptp.json``.

``ptp.json`` (written by ``ptp prune``) holds, per pruned layer, its full name, achieved
sparsity, relative reconstruction error ‖WX − W'X‖²/‖WX‖² on the calibration inputs, and
seconds. Layers are grouped by decoder block (the first integer in the name:
``model.layers.3.mlp.down_proj`` -> block 3, kind ``mlp.down_proj``).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from .config import ConfigError

BLOCK = re.compile(r"\.(\d+)\.(.+)$")


def load_record(folder: str | Path) -> dict:
    """The ``ptp.json`` of a ptp output directory (or the path of the file itself)."""
    path = Path(folder)
    path = path / "ptp.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"no ptp.json in {folder}: not a directory written by ptp prune")
    return json.loads(path.read_text())


def layer_rows(record: dict) -> list[dict]:
    """The per-layer entries ``{name, sparsity, error, seconds}``, wherever the record keeps them."""
    layers = record.get("layers") or record.get("report", {}).get("layers")
    if not layers:
        raise ConfigError("ptp.json has no per-layer report (was the model pruned by ptp?)")
    return layers


def split_name(name: str) -> tuple[int, str]:
    """``model.layers.3.mlp.down_proj`` -> (3, "mlp.down_proj"); (-1, name) without a block index."""
    match = BLOCK.search(name)
    return (int(match.group(1)), match.group(2)) if match else (-1, name)


def by_block(layers: list[dict]) -> list[dict]:
    """One summary per block, in block order: mean sparsity and error over its layers,
    the worst layer, and the seconds spent. (Means are over layers, unweighted by size.)"""
    groups: dict[int, list[dict]] = defaultdict(list)
    for layer in layers:
        groups[split_name(layer["name"])[0]].append(layer)
    rows = []
    for block in sorted(groups):
        members = groups[block]
        worst = max(members, key=lambda l: l["error"])
        rows.append({
            "block": block,
            "layers": len(members),
            "sparsity": sum(l["sparsity"] for l in members) / len(members),
            "error": sum(l["error"] for l in members) / len(members),
            "worst_layer": split_name(worst["name"])[1],
            "worst_error": worst["error"],
            "seconds": sum(l.get("seconds", 0.0) for l in members),
        })
    return rows


def title(record: dict) -> str:
    """``smollm2-135m · sparsegpt · sparsity 2:4`` from whatever the record holds."""
    parts = [str(record[k]) for k in ("model", "method") if record.get(k)]
    if record.get("sparsity"):
        parts.append(f"sparsity {record['sparsity']}")
    return " · ".join(parts) or "ptp prune"


def structured_lines(record: dict) -> list[str]:
    """A structured pruning record: what shrank, and per block the output error of the
    consumers of the removed channels (o_proj, down_proj)."""
    info = record["structured"]
    changes = ", ".join(f"{k} {v}" for k, v in info.get("config", {}).items()) or "nothing"
    lines = [f"**{title(record)}** — removed {100 * info.get('removed', 0):.1f}% of the decoder blocks' "
             f"parameters ({changes})", "",
             "| block | attention output error | MLP output error |", "|---|---|---|"]
    fmt = lambda e: "—" if e is None else f"{e:.4g}"  # noqa: E731
    for b in info.get("blocks", []):
        lines.append(f"| {b['block']} | {fmt(b['attention_error'])} | {fmt(b['mlp_error'])} |")
    return lines


def markdown(record: dict) -> str:
    """A header line for the run and a per-block table."""
    if "structured" in record:
        return "\n".join(structured_lines(record) + reconstruction_lines(record))
    rows = by_block(layer_rows(record))
    lines = [f"**{title(record)}**", "",
             "| block | layers | sparsity | mean rel. error | worst layer (error) | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['layers']} | {r['sparsity']:.4f} | {r['error']:.4g} | "
                     f"{r['worst_layer']} ({r['worst_error']:.4g}) | {r['seconds']:.1f} |")
    return "\n".join(lines + accounting_lines(record) + reconstruction_lines(record))


def reconstruction_lines(record: dict) -> list[str]:
    """Per block: the held-out output error before and after tuning, and which weights were kept."""
    tunings = (record.get("report") or record.get("structured") or {}).get("reconstruction")
    if not tunings:
        return []
    lines = ["", "| block | held-out error, solver | held-out error, tuned | kept | train error first → last epoch | steps | seconds |",
             "|---|---|---|---|---|---|---|"]
    for t in tunings:
        lines.append(f"| {t['block']} | {t['heldout_before']:.4g} | {t['heldout_after']:.4g} | {t['kept']} | "
                     f"{t['train_before']:.4g} → {t['train_after']:.4g} | {t['steps']} | {t['seconds']:.1f} |")
    return lines


def accounting_lines(record: dict) -> list[str]:
    """The sparsity of the pruned weights, the decoder blocks and the whole model, and the weights
    left dense grouped by reason (markdown), from the record's ``report.accounting``."""
    acc = record.get("report", {}).get("accounting")
    if not acc:
        return []
    lines = ["", "| weights | count | zeros | sparsity |", "|---|---|---|---|"]
    for key, label in (("pruned", "pruned"), ("blocks", "all in decoder blocks"), ("model", "whole model")):
        part = acc[key]
        lines.append(f"| {label} | {part['params']:,} | {part['zeros']:,} | {part['sparsity']:.4f} |")
    reasons: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for d in acc.get("dense", []):
        reasons[d["reason"]][0] += 1
        reasons[d["reason"]][1] += d["params"]
    if reasons:
        lines += ["", "Left dense: " + "; ".join(f"{why} ({n} tensors, {p:,} weights)"
                                                 for why, (n, p) in reasons.items())]
    return lines


def plot(record: dict, path: str | Path) -> Path:
    """Per-block sparsity (top) and reconstruction error (bottom, log scale) as a PNG,
    one line per layer kind (q_proj, ..., down_proj)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for layer in layer_rows(record):
        block, kind = split_name(layer["name"])
        kind = re.sub(r"\.\d+$", "", kind)  # every expert of a stack is one series
        series[kind].append((block, layer["sparsity"], layer["error"]))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for kind, points in sorted(series.items()):
        points.sort()
        blocks = [p[0] for p in points]
        top.plot(blocks, [p[1] for p in points], marker=".", label=kind)
        bottom.plot(blocks, [max(p[2], 1e-12) for p in points], marker=".", label=kind)
    top.set_ylabel("achieved sparsity")
    bottom.set_ylabel("‖WX−W'X‖² / ‖WX‖²")
    bottom.set_yscale("log")
    bottom.set_xlabel("decoder block")
    top.legend(fontsize="small", ncol=2)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))  # blocks are whole numbers
    fig.suptitle(title(record))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
