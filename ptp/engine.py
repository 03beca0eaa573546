"""The model-agnostic pruning engine: walks the decoder blocks of any causal LM one at a time.

This is the only module with hooks and devices. Per block: run the calibration activations
through it while hooks accumulate each linear layer's input statistics, prune every linear with
the chosen solver, then run the block again so the next block sees the *pruned* block's outputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import ConfigError, PruneConfig
from .solvers import Hessian, InputNorms, magnitude, relative_error, sparsegpt, wanda

logger = logging.getLogger("ptp")

# Reconstruction error of masks chosen without a Hessian (Wanda, magnitude) is measured on this
# many calibration tokens per layer: exact enough to compare layers, far cheaper than all of them.
ERROR_TOKENS = 4096


@dataclass
class LayerReport:
    name: str  # full module name, e.g. "model.layers.3.mlp.down_proj"
    sparsity: float  # achieved fraction of zeros in the weight
    error: float  # ||WX - W'X||^2 / ||WX||^2 on the calibration inputs
    seconds: float = 0.0  # solver time


@dataclass
class PruneReport:
    method: str
    sparsity: str
    layers: list[LayerReport] = field(default_factory=list)
    mean_sparsity: float = 0.0  # zeros over all pruned layers' weights (not a mean of ratios)
    wall_time_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- finding layers


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the largest ModuleList whose elements' class is in the model's
    ``_no_split_modules`` (how transformers itself knows what a block is), or ``path``.

    Returns (dotted name, ModuleList). Raises ConfigError when nothing is found.
    """
    if path is not None:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            raise ConfigError(f"model has no module {path!r}") from None
        if not isinstance(blocks, nn.ModuleList):
            raise ConfigError(f"{path!r} is a {type(blocks).__name__}, not a ModuleList of decoder blocks")
        return path, blocks
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in block_classes
    ]
    if not found:
        raise ConfigError(
            f"no decoder blocks found in {type(model).__name__}; pass the blocks' path (e.g. 'model.layers')"
        )
    return max(found, key=lambda item: len(item[1]))


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer that stores its weight as [in, out])."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as [out, in] (a view: Conv1D stores the transpose)."""
    return layer.weight.T if type(layer).__name__ == "Conv1D" else layer.weight


def skipped(name: str, patterns: tuple[str, ...]) -> bool:
    """A pattern matches a whole dotted segment run: 'down_proj', 'layers.3', 'model.layers.3.mlp'."""
    return any(f".{pattern}." in f".{name}." for pattern in patterns)


def linear_layers(block: nn.Module, prefix: str, skip: tuple[str, ...]) -> dict[str, nn.Module]:
    """Full name -> module for each prunable linear layer of the block, in definition order."""
    return {
        f"{prefix}.{name}": module
        for name, module in block.named_modules()
        if is_linear(module) and not skipped(f"{prefix}.{name}", skip)
    }


# --------------------------------------------------------------------------- calibration inputs


class _Captured(Exception):
    pass


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a decoder block (embeddings, rotary
    tables, final norm, head) to ``device``, leaving the blocks where they are."""
    inside = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for tensors in (module._parameters, module._buffers):
            for key, tensor in tensors.items():
                if tensor is not None and tensor.device != device:
                    tensor.data = tensor.data.to(device)


def capture_block_inputs(model, blocks, tokens: torch.Tensor, batch_size: int, device: torch.device):
    """Run the model up to the first block for each batch of calibration tokens.

    tokens: LongTensor [n, L]. Returns (hidden [n, L, d] on device, one kwargs dict per batch).
    The kwargs (attention mask, position ids, rotary embeddings, ...) are whatever the model
    passed to its first block; they are replayed unchanged, so no model family is special-cased.
    """
    hidden, batch_kwargs = [], []

    def catch(module, args, kwargs):
        raise _Captured(args, kwargs)

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, tokens.shape[0], batch_size):
            try:
                model(input_ids=tokens[start : start + batch_size].to(device), use_cache=False)
            except _Captured as captured:
                args, kwargs = captured.args
            else:
                raise RuntimeError("the model never called its first decoder block")
            kwargs = dict(kwargs)
            hidden.append(args[0] if args else kwargs.pop("hidden_states"))
            kwargs.pop("hidden_states", None)
            batch_kwargs.append((args[1:], kwargs))
    finally:
        handle.remove()
    return torch.cat(hidden), batch_kwargs


def run_block(block, hidden: torch.Tensor, batch_kwargs, batch_size: int, out: torch.Tensor | None = None):
    """Forward every batch of ``hidden`` [n, L, d] through ``block``; write into ``out`` if given."""
    for b, (args, kwargs) in enumerate(batch_kwargs):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        result = block(hidden[sl], *args, **kwargs)
        if out is not None:
            out[sl] = result[0] if isinstance(result, (tuple, list)) else result


# --------------------------------------------------------------------------- pruning


def input_groups(block, layers: dict[str, nn.Module], hidden, batch_kwargs) -> list[list[str]]:
    """Layers grouped by the input they share, in execution order, e.g. [[q, k, v], [o], [gate, up], [down]].

    Found by running one sample through the block: consecutive calls on the same input tensor
    form a group. Layers in a group share one set of statistics, and true-sequential pruning
    handles one group at a time.
    """
    order: list[tuple[str, torch.Tensor]] = []
    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: order.append((name, args[0])))
        for name, module in layers.items()
    ]
    try:
        args, kwargs = batch_kwargs[0]
        block(hidden[:1], *args, **_first_sample(kwargs))
    finally:
        for hook in hooks:
            hook.remove()
    groups: list[list[str]] = []
    previous = None
    for name, inp in order:
        if any(name in group for group in groups):
            continue  # a layer called twice (weight sharing) keeps its first place
        if inp is previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = inp
    return groups + [[name] for name in layers if not any(name in g for g in groups)]


def _first_sample(kwargs: dict) -> dict:
    """kwargs for a batch of one: tensors with a batch dimension are sliced to their first row."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] > 1:
            value = value[:1]
        elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            value = tuple(v[:1] if v.dim() > 0 and v.shape[0] > 1 else v for v in value)
        out[key] = value
    return out


def collect_stats(block, layers, groups, hidden, batch_kwargs, config: PruneConfig, device) -> dict:
    """Run the calibration activations through ``block``; return each layer's input statistics.

    One accumulator per input group (q, k, v see the same input and share it).
    """
    stats, hooks = {}, []
    for group in groups:
        first = layers[group[0]]
        columns = weight_matrix(first).shape[1]
        acc = {"hessian": Hessian(columns, device, None if config.method == "sparsegpt" else ERROR_TOKENS)}
        if config.method == "wanda":
            acc["norms"] = InputNorms(columns, device)

        def accumulate(module, args, acc=acc):
            for accumulator in acc.values():
                accumulator.add(args[0])

        hooks.append(first.register_forward_pre_hook(accumulate))
        stats.update({name: acc for name in group})
    try:
        run_block(block, hidden, batch_kwargs, config.batch_size)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def solve(weight: torch.Tensor, stats: dict, config: PruneConfig) -> torch.Tensor:
    """Call the configured solver on one [out, in] weight; returns the pruned weight."""
    if config.method == "magnitude":
        pruned, _ = magnitude(weight, config.sparsity)
    elif config.method == "wanda":
        pruned, _ = wanda(weight, stats["norms"].norm, config.sparsity)
    else:
        pruned, _ = sparsegpt(weight, stats["hessian"].hessian, config.sparsity, config.blocksize, config.damp)
    return pruned


def prune_block(block, layers, hidden, batch_kwargs, config: PruneConfig, device) -> list[LayerReport]:
    """Prune every layer of one block in place; statistics come from ``hidden`` [n, L, d]."""
    groups = input_groups(block, layers, hidden, batch_kwargs)
    # Non-sequential: every layer's statistics come from the dense block, as in both papers' code.
    stages = [[name for group in groups for name in group]] if not config.true_sequential else groups
    reports = []
    for stage in stages:
        stage_layers = {name: layers[name] for name in stage}
        stats = collect_stats(block, stage_layers, _regroup(groups, stage), hidden, batch_kwargs, config, device)
        for name, layer in stage_layers.items():
            start = time.perf_counter()
            weight = weight_matrix(layer)
            pruned = solve(weight.data, stats[name], config)
            error = relative_error(weight.data, pruned, stats[name]["hessian"].hessian)
            weight.data.copy_(pruned)
            reports.append(
                LayerReport(name, float((pruned == 0).float().mean()), error, time.perf_counter() - start)
            )
    return reports


def _regroup(groups: list[list[str]], names: list[str]) -> list[list[str]]:
    return [[n for n in group if n in names] for group in groups if any(n in names for n in group)]


def _check_widths(layers: dict[str, nn.Module], config: PruneConfig) -> None:
    if not config.sparsity.is_nm:
        return
    for name, layer in layers.items():
        width = weight_matrix(layer).shape[1]
        if width % config.sparsity.m:
            raise ConfigError(
                f"layer {name} has {width} inputs, not a multiple of M={config.sparsity.m}; "
                f"leave it dense with skip={name!r} (--skip {name})"
            )


def as_token_batch(batches) -> torch.Tensor:
    """LongTensor [n, L], or a list of [1, L] / [L] tensors of equal length -> LongTensor [n, L]."""
    if isinstance(batches, torch.Tensor):
        tokens = batches if batches.dim() == 2 else batches.unsqueeze(0)
    else:
        rows = [torch.as_tensor(b).reshape(1, -1) for b in batches]
        if not rows:
            raise ConfigError("no calibration samples")
        if len({r.shape[1] for r in rows}) > 1:
            raise ConfigError("calibration samples must all have the same length")
        tokens = torch.cat(rows)
    if tokens.numel() == 0:
        raise ConfigError("no calibration samples")
    return tokens.long()


@torch.no_grad()
def prune(model: nn.Module, batches, config: PruneConfig) -> PruneReport:
    """Prune ``model`` in place, block by block, from calibration tokens.

    batches: LongTensor [n, L] or a list of [1, L] token tensors.
    Only one decoder block is on the compute device at a time, together with the calibration
    activations; the embeddings and the head are never pruned.

    >>> report = ptp.prune(model, tokens, ptp.PruneConfig(method="wanda", sparsity="2:4"))
    >>> report.mean_sparsity
    0.5
    """
    start = time.perf_counter()
    tokens = as_token_batch(batches)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    blocks_name, blocks = find_blocks(model, config.blocks)
    all_layers = [linear_layers(block, f"{blocks_name}.{i}", config.skip) for i, block in enumerate(blocks)]
    for layers in all_layers:
        _check_widths(layers, config)

    report = PruneReport(config.method, str(config.sparsity))
    use_cache = getattr(model.config, "use_cache", None)
    home = next(blocks[0].parameters()).device
    _move_outside_blocks(model, blocks, device)
    try:
        hidden, batch_kwargs = capture_block_inputs(model, blocks, tokens, config.batch_size, device)
        out = torch.empty_like(hidden)
        show = logger.getEffectiveLevel() <= logging.INFO
        for i, block in enumerate(tqdm(blocks, desc=f"{config.method} {config.sparsity}", disable=not show)):
            block.to(device)
            if all_layers[i]:
                report.layers += prune_block(block, all_layers[i], hidden, batch_kwargs, config, device)
            if i + 1 < len(blocks):  # the last block's outputs feed nothing we prune
                run_block(block, hidden, batch_kwargs, config.batch_size, out)
                hidden, out = out, hidden
            block.to(home)
    finally:
        _move_outside_blocks(model, blocks, home)
        if use_cache is not None:
            model.config.use_cache = use_cache
    pruned = [layer.weight for layers in all_layers for layer in layers.values()]
    if pruned:
        report.mean_sparsity = sum(int((w == 0).sum()) for w in pruned) / sum(w.numel() for w in pruned)
    report.wall_time_s = time.perf_counter() - start
    logger.info("pruned %d layers to %.4f sparsity in %.1f s", len(report.layers), report.mean_sparsity, report.wall_time_s)
    return report
