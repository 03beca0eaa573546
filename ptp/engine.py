"""The model-agnostic pruning engine: walks the decoder blocks of any causal LM one at a time.

This is the only module with hooks and devices. Per block: run the calibration activations
through it while hooks accumulate each linear layer's input statistics, prune every linear with
the chosen solver, then run the block again so the next block sees the *pruned* block's outputs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checks
from .config import ConfigError, PruneConfig, Sparsity
from .units import ExpertUnit, LinearUnit, block_units, is_linear, observe_inputs, skipped  # noqa: F401
from .reconstruct import tune_block
from .solvers import Hessian, InputNorms, admm, magnitude, outlier_share, owl_sparsities, relative_error, sparsegpt, wanda

logger = logging.getLogger("ptp")

# Reconstruction error of masks chosen without a Hessian (Wanda, magnitude) is measured on this
# many calibration tokens per layer: exact enough to compare layers, far cheaper than all of them.
ERROR_TOKENS = 4096
# An expert that saw fewer calibration tokens than this is still pruned from them, with a warning.
FEW_TOKENS = 16


@dataclass
class LayerReport:
    name: str  # full module name, e.g. "model.layers.3.mlp.down_proj"
    sparsity: float  # achieved fraction of zeros in the weight
    error: float  # ||WX - W'X||^2 / ||WX||^2 on the calibration inputs
    seconds: float = 0.0  # solver time
    target: str = ""  # the requested sparsity of this layer, e.g. "0.6" or "2:4"
    zeros: int = 0  # zero weights after pruning (the exact count behind ``sparsity``)
    tokens: int = 0  # calibration tokens its statistics came from (an expert: those routed to it)
    note: str = ""  # a fallback taken for this unit, e.g. "no calibration tokens: pruned by magnitude"


@dataclass
class PruneReport:
    method: str
    sparsity: str
    layers: list[LayerReport] = field(default_factory=list)
    mean_sparsity: float = 0.0  # zeros over all pruned layers' weights (not a mean of ratios)
    wall_time_s: float = 0.0
    # Zeros and weights of the pruned units, of the decoder blocks and of the whole model, and
    # what stayed dense and why (``WeightTally.result``).
    accounting: dict = field(default_factory=dict)
    # With ``reconstruct``: one ``BlockTuning`` dict per pruned block (held-out error before and
    # after, which weights were kept).
    reconstruction: list[dict] = field(default_factory=list)

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


def weight_matrix(layer) -> torch.Tensor:
    """The weight of a unit or a linear module as [out, in] (a view: Conv1D stores the transpose)."""
    if isinstance(layer, (LinearUnit, ExpertUnit)):
        return layer.matrix()
    return layer.weight.T if type(layer).__name__ == "Conv1D" else layer.weight


def as_unit(name: str, layer):
    """A weight unit for ``layer``: a unit already, or a linear module (``structured`` passes modules)."""
    return layer if isinstance(layer, (LinearUnit, ExpertUnit)) else LinearUnit(name, layer)


def linear_layers(block: nn.Module, prefix: str, skip: tuple[str, ...]) -> dict[str, object]:
    """Full name -> weight unit for everything the block multiplies activations by, in definition
    order (linear layers, and each expert of a fused expert stack); see ``ptp.units.block_units``."""
    return block_units(block, prefix, skip)[0]


# --------------------------------------------------------------------------- calibration inputs


class _Captured(Exception):
    pass


def move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a decoder block (embeddings, rotary
    tables, final norm, head) to ``device``, leaving the blocks where they are."""
    inside = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for tensors in (module._parameters, module._buffers):
            for key, tensor in tensors.items():  # meta tensors (not loaded, when streaming) stay
                if tensor is not None and tensor.device != device and not tensor.is_meta:
                    tensor.data = tensor.data.to(device)


def capture_block_inputs(model, blocks, tokens: torch.Tensor, batch_size: int, device: torch.device, alloc=None):
    """Run the model up to the first block for each batch of calibration tokens.

    tokens: LongTensor [n, L]. Returns (hidden [n, L, d] on device, one kwargs dict per batch).
    The kwargs (attention mask, position ids, rotary embeddings, ...) are whatever the model
    passed to its first block; they are replayed unchanged, so no model family is special-cased.
    ``alloc(shape, dtype, device)`` makes the buffer the inputs are written into (default
    ``torch.empty`` on device; ``BlockHooks.alloc`` may put it on disk).
    """
    hidden, batch_kwargs = None, []

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
            x = args[0] if args else kwargs.pop("hidden_states")
            kwargs.pop("hidden_states", None)
            batch_kwargs.append((args[1:], kwargs))
            if hidden is None:
                hidden = (alloc or _empty)((tokens.shape[0], *x.shape[1:]), x.dtype, device)
            hidden[start : start + x.shape[0]] = x
    finally:
        handle.remove()
    return hidden, batch_kwargs


def _empty(shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _on_block_device(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` where ``block``'s weights are (a no-op unless the activations live elsewhere, on disk)."""
    param = next(block.parameters(), None)
    return x if param is None else x.to(param.device)


class StatsDone(Exception):
    """Raised by a statistics hook once it has seen all it needs: the rest of the block's forward
    for that batch is skipped (``run_block`` moves on to the next batch)."""


def run_block(block, hidden: torch.Tensor, batch_kwargs, batch_size: int, batches=None, write=True) -> None:
    """Forward batches of ``hidden`` [n, L, d] through ``block``. With ``write``, overwrite each
    batch with its output (a batch's input is dead once its output exists: one buffer serves both)."""
    for b in range(len(batch_kwargs)) if batches is None else batches:
        args, kwargs = batch_kwargs[b]
        sl = slice(b * batch_size, (b + 1) * batch_size)
        try:
            result = block(_on_block_device(block, hidden[sl]), *args, **kwargs)
        except StatsDone:
            continue
        if write:
            hidden[sl] = result[0] if isinstance(result, (tuple, list)) else result


# --------------------------------------------------------------------------- pruning


class _Abort(Exception):
    pass


class Lockstep:
    """Runs every calibration batch through a block in lockstep, pausing them all at chosen points.

    Each batch runs in its own thread, but only one thread runs at any moment (no
    oversubscription of the cores, and a fixed, deterministic order). ``pause(point)``, called from
    a hook, hands control to the next batch; once every batch has paused at the same point,
    ``at_barrier(point)`` runs (it prunes the layers there) and the batches resume in order.
    So true-sequential pruning costs one pass over the data, not one pass per group of layers.
    """

    def __init__(self, nbatches: int):
        self.turns = [threading.Semaphore(0) for _ in range(nbatches)]
        self.back = threading.Semaphore(0)
        self.local = threading.local()
        self.points: list = [None] * nbatches  # where each batch paused; None once it has finished
        self.error: BaseException | None = None
        self.aborted = False

    def pause(self, point) -> None:
        b = self.local.batch
        self.points[b] = point
        self.back.release()
        self.turns[b].acquire()
        if self.aborted:
            raise _Abort

    def _main(self, b: int, work) -> None:
        self.local.batch = b
        self.turns[b].acquire()
        try:
            if not self.aborted:
                with torch.no_grad():  # grad mode is per thread
                    work(b)
        except _Abort:
            pass
        except BaseException as err:  # handed to the main thread, which re-raises it
            self.error = err
        self.points[b] = None
        self.back.release()

    def run(self, work, at_barrier) -> None:
        """Call ``work(b)`` for every batch b, stopping at each common pause point."""
        threads = [threading.Thread(target=self._main, args=(b, work), name=f"ptp-lockstep-{b}", daemon=True)
                   for b in range(len(self.turns))]
        for thread in threads:
            thread.start()
        running = list(range(len(threads)))
        try:
            while running:
                for b in running:
                    self.turns[b].release()
                    self.back.acquire()
                    if self.error is not None:
                        raise self.error
                running = [b for b in running if self.points[b] is not None]
                if running:
                    points = {self.points[b] for b in running}
                    if len(running) < len(threads) or len(points) > 1:
                        raise RuntimeError(f"calibration batches took different paths through the block: {points}")
                    at_barrier(points.pop())
        finally:
            self.aborted = True
            for b in running:
                self.turns[b].release()


def execution_order(block, layers: dict, hidden, batch_kwargs) -> list[tuple[str, torch.Tensor]]:
    """(layer name, input tensor) for every call of a linear layer in ``layers`` while one sample
    runs through the block, in call order. Experts are left out: which of them run depends on the
    sample (``input_groups`` places them in a fixed order)."""
    order: list[tuple[str, torch.Tensor]] = []
    linear = {name: as_unit(name, layer) for name, layer in layers.items()}
    linear = {name: unit for name, unit in linear.items() if unit.kind == "linear"}
    with observe_inputs(linear, lambda name, x: order.append((name, x))):
        args, kwargs = batch_kwargs[0]
        block(_on_block_device(block, hidden[:1]), *args, **_first_sample(kwargs))
    return order


def input_groups(block, layers: dict, hidden, batch_kwargs, order=None) -> list[list[str]]:
    """Layers grouped by the input they share, in execution order, e.g. [[q, k, v], [o], [gate, up], [down]].

    Found by running one sample through the block (or from ``execution_order``'s result):
    consecutive calls on the same input tensor form a group. Layers in a group share one set of
    statistics; layers never called, then each expert (in definition order, whatever the routing
    of that sample, so every process of a distributed run holds the same groups) come last, one
    per group.
    """
    if order is None:
        order = execution_order(block, layers, hidden, batch_kwargs)
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


def last_input(order: list[tuple[str, torch.Tensor]], layers: dict[str, nn.Module]) -> str | None:
    """The layer whose input is the last statistic the block's forward produces, when every layer
    runs exactly once (so nothing after its pre-hook is needed); else None."""
    names = [name for name, _ in order]
    if sorted(names) != sorted(layers):
        return None
    return names[-1]


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


def new_stats(layer, config: PruneConfig, device) -> dict:
    """The accumulators one input group needs: a Hessian (all tokens for SparseGPT and ADMM; a
    sample, for the error report, otherwise) and, for Wanda, the input norms."""
    columns = weight_matrix(layer).shape[1]
    exact = config.method in ("sparsegpt", "admm")
    stats = {"hessian": Hessian(columns, device, None if exact else ERROR_TOKENS)}
    if config.method == "wanda":
        stats["norms"] = InputNorms(columns, device)
    return stats


def solve(weight: torch.Tensor, stats: dict, config: PruneConfig, sparsity: Sparsity) -> torch.Tensor:
    """Call the configured solver on one [out, in] weight; returns the pruned weight."""
    if config.method == "magnitude":
        pruned, _ = magnitude(weight, sparsity)
    elif config.method == "wanda":
        pruned, _ = wanda(weight, stats["norms"].norm, sparsity)
    elif config.method == "admm":
        pruned, _ = admm(weight, stats["hessian"].hessian, sparsity, damp=config.damp)
    else:
        pruned, _ = sparsegpt(weight, stats["hessian"].hessian, sparsity, config.blocksize, config.damp)
    return pruned


def prune_layer(name: str, layer, stats: dict, config: PruneConfig, sparsity: Sparsity) -> LayerReport:
    """Prune one unit in place from its group's statistics.

    A unit that saw no calibration token (an expert the router never chose) has no statistics to
    solve from: it is pruned by magnitude, with a warning. One that saw fewer than
    ``FEW_TOKENS`` is pruned by the chosen solver from what it has (its Hessian is dampened like
    any other), with a warning: its error on other text is less certain.
    """
    start = time.perf_counter()
    weight = weight_matrix(layer)
    tokens = stats["hessian"].tokens
    note = ""
    if tokens == 0:
        pruned, _ = magnitude(weight, sparsity)
        note = "no calibration tokens: pruned by magnitude"
        logger.warning("%s received no calibration tokens; pruned by magnitude instead of %s", name, config.method)
        hessian = torch.eye(weight.shape[1], device=weight.device)
    else:
        if tokens < FEW_TOKENS:
            note = f"only {tokens} calibration tokens"
            logger.warning("%s received only %d calibration tokens; pruned by %s from those", name, tokens,
                           config.method)
        pruned = solve(weight, stats, config, sparsity)
        hessian = stats["hessian"].hessian
    error = relative_error(weight, pruned, hessian)
    weight.copy_(pruned)
    zeros = pruned == 0
    return LayerReport(name, float(zeros.float().mean()), error, time.perf_counter() - start, str(sparsity),
                       int(zeros.sum()), tokens, note)


def prune_block(block, layers, hidden, batch_kwargs, config: PruneConfig, device, reduce=None,
                sparsities=None, before_output=None) -> list[LayerReport]:
    """Prune every unit of one block in place, then overwrite ``hidden`` [n, L, d] with the
    pruned block's outputs. ``layers``: name -> unit (``linear_layers``); ``sparsities``:
    name -> Sparsity, default ``config.sparsity``.

    Default (both papers' code): every layer's statistics come from the dense block; then the
    block runs again with pruned weights. ``true_sequential``: each group of layers sees the
    inputs produced by the already-pruned groups before it, in one lockstep pass (``Lockstep``).
    ``reduce(accumulators)``, when given, combines a group's statistics before it is solved
    (``ptp.scale`` sums them over processes). ``before_output(layers)``, when given, runs once every
    layer is pruned and before the outputs are written (block reconstruction tunes the block there).
    """
    layers = {name: as_unit(name, layer) for name, layer in layers.items()}
    order = execution_order(block, layers, hidden, batch_kwargs)
    groups = input_groups(block, layers, hidden, batch_kwargs, order)
    stats = {tuple(group): new_stats(layers[group[0]], config, device) for group in groups}
    leader = {group[0]: group for group in stats}
    reports: list[LayerReport] = []
    # The statistics pass may stop at the last layer's input: the rest (e.g. down_proj's product
    # and the residual) would be thrown away, and is about a fifth of a Llama block's work.
    stop = last_input(order, layers) if not config.true_sequential else None

    def prune_group(group):
        if reduce is not None:
            reduce(list(stats[group].values()))
        reports.extend(
            prune_layer(name, layers[name], stats[group], config, (sparsities or {}).get(name, config.sparsity))
            for name in group
        )

    lockstep = Lockstep(len(batch_kwargs)) if config.true_sequential else None

    def accumulate(name, x):
        group = leader[name]
        for accumulator in stats[group].values():
            accumulator.add(x)
        if lockstep is not None:
            lockstep.pause(group)
        elif stop in group:
            raise StatsDone

    with observe_inputs({name: layers[name] for name in leader}, accumulate) as seen:
        if lockstep is None:
            run_block(block, hidden, batch_kwargs, config.batch_size, write=False)
        else:
            lockstep.run(lambda b: run_block(block, hidden, batch_kwargs, config.batch_size, [b]), prune_group)
    unseen = {layers[n].name.rpartition(".")[0] for n in leader
              if layers[n].kind == "expert" and id(layers[n].parameter()) not in seen}
    if unseen:
        first = sorted(unseen)[0]
        raise ConfigError(f"could not observe the inputs of the expert stack {first}: its module multiplies by it "
                          f"in a way ptp does not recognise; leave it dense with skip={first!r} (--skip {first})")
    if lockstep is None:
        for group in stats:
            prune_group(group)
        if before_output is not None:
            before_output(layers)
        run_block(block, hidden, batch_kwargs, config.batch_size)
    return reports


def tunable_weights(layers: dict) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, mask of its kept entries) for each parameter holding pruned units: a Linear's
    weight, or a fused expert stack (only its experts that were pruned; skipped ones stay fixed)."""
    out: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for unit in layers.values():
        param = unit.parameter()
        if id(param) not in out:
            out[id(param)] = (param, torch.zeros_like(param, dtype=torch.bool))
        mask = out[id(param)][1]
        if unit.kind == "expert":
            piece = mask[unit.index]
            piece.copy_(unit.matrix().T != 0 if unit.transposed else unit.matrix() != 0)
        else:
            mask.copy_(param.data != 0)
    return list(out.values())


def prunable_layers(model: nn.Module, config: PruneConfig) -> tuple[nn.ModuleList, list[dict[str, object]]]:
    """The decoder blocks and, per block, the weight units ``config`` will prune (name -> unit).

    Raises ConfigError before any work when a weight inside a block is not recognised (see
    ``ptp.units.block_units``) or a unit cannot take the N:M pattern, so the CLI can call this
    before spending minutes on calibration data.
    """
    blocks_name, blocks = find_blocks(model, config.blocks)
    found = [block_units(block, f"{blocks_name}.{i}", config.skip) for i, block in enumerate(blocks)]
    all_layers = [units for units, _ in found]
    every = [name for layers in all_layers for name in layers]
    every += [d["name"] for _, dense in found for d in dense if d["reason"] == "skipped"]
    checks.check_patterns(config.skip, every, "skip pattern")
    if isinstance(config.profile, dict):
        checks.check_patterns(config.profile, [n for layers in all_layers for n in layers], "profile pattern")
    bad = [(name, weight_matrix(layer).shape[1]) for layers in all_layers if config.sparsity.is_nm
           for name, layer in layers.items() if weight_matrix(layer).shape[1] % config.sparsity.m]
    if bad and len(bad) == sum(len(layers) for layers in all_layers):  # skipping them all would prune nothing
        raise ConfigError(f"no prunable layer has a number of inputs that is a multiple of M={config.sparsity.m} "
                          f"(inputs: {', '.join(map(str, sorted({w for _, w in bad})))}); choose another N:M")
    if bad:
        names = ",".join(name for name, _ in bad)
        widths = ", ".join(f"{name} ({width})" for name, width in bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ConfigError(
            f"{len(bad)} layer{'s' if len(bad) > 1 else ''} with a number of inputs not a multiple of "
            f"M={config.sparsity.m}: {widths}; leave {'them' if len(bad) > 1 else 'it'} dense with --skip {names}"
        )
    if config.true_sequential and any(u.kind == "expert" for layers in all_layers for u in layers.values()):
        raise ConfigError("true_sequential needs every calibration batch to take the same path through a block, "
                          "which routing to experts does not; prune this mixture-of-experts model without it")
    return blocks, all_layers


def _count(tensors) -> dict:
    params = sum(t.numel() for t in tensors)
    zeros = sum(int((t == 0).sum()) for t in tensors)
    return {"params": params, "zeros": zeros}


class WeightTally:
    """Counts zeros and weights of (a) the pruned units, (b) everything inside the decoder blocks,
    (c) the whole model, from the tensors themselves, and lists what stays dense and why.

    ``add_block`` counts one block as it is (call it once the block is pruned, while its weights
    are still in memory: a streamed run drops them right after); ``result`` adds the tensors
    outside the blocks (embeddings, head, final norm) and returns
    {"pruned": {"params", "zeros", "sparsity"}, "blocks": {...}, "model": {...},
    "dense": [{"name", "params", "reason"}]}, reason being "skipped" (by the user), "router",
    "vector" (norms, biases) or "outside blocks". Tied tensors are counted once.
    """

    def __init__(self, blocks_name: str, skip: tuple[str, ...]):
        self.blocks_name, self.skip = blocks_name, skip
        self.pruned, self.blocks, self.dense = {"params": 0, "zeros": 0}, {"params": 0, "zeros": 0}, []
        self.dense_by_block: dict[int, list[dict]] = {}
        self.outside, self.outside_dense = {"params": 0, "zeros": 0}, []
        self.complete = True

    def add_block(self, index: int, block: nn.Module) -> None:
        units, left = block_units(block, f"{self.blocks_name}.{index}", self.skip)
        self.dense_by_block[index] = left
        for total, part in ((self.pruned, _count([u.matrix() for u in units.values()])),
                            (self.blocks, _count([p.data for p in dict.fromkeys(block.parameters())]))):
            total["params"] += part["params"]
            total["zeros"] += part["zeros"]

    def add_outside(self, name: str, tensor: torch.Tensor) -> None:
        """Count one tensor outside the blocks (embeddings, head, final norm): dense by design."""
        self.outside["params"] += tensor.numel()
        if tensor.is_meta:  # not in memory (a streamed run): its zeros are counted from the files later
            self.complete = False
        else:
            self.outside["zeros"] += int((tensor == 0).sum())
        self.outside_dense.append({"name": name, "params": tensor.numel(), "reason": "outside blocks"})

    def result(self, model: nn.Module | None = None, blocks: nn.ModuleList | None = None) -> dict:
        """The totals; with ``model``, its tensors outside ``blocks`` are counted first (unless
        ``add_outside`` already did)."""
        if model is not None and not self.outside_dense:
            inside = {id(p) for p in blocks.parameters()}
            for name, p in model.named_parameters():  # tied tensors appear once
                if id(p) not in inside:
                    self.add_outside(name, p.data)
        whole = {k: self.blocks[k] + self.outside[k] for k in ("params", "zeros")}
        result = {"pruned": dict(self.pruned), "blocks": dict(self.blocks), "model": whole}
        for part in result.values():
            part["sparsity"] = part["zeros"] / part["params"] if part["params"] else 0.0
        result["dense"] = [d for i in sorted(self.dense_by_block) for d in self.dense_by_block[i]] + self.outside_dense
        result["complete"] = self.complete
        return result


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
    checks.check_token_dtype(tokens)
    return tokens.long()


class BlockHooks:
    """The extension points of ``prune``'s per-block loop; these defaults do nothing, which is the
    plain in-memory run. ``ptp.scale`` overrides them to stream weights from disk, keep the
    activations on disk, checkpoint after every block, and sum statistics across processes.
    """

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        """The buffer block 0's inputs [n, L, d] are captured into: a tensor, or any object that
        reads and writes slices along dim 0 like one."""
        return _empty(shape, dtype, device)

    def start(self, hidden, report: PruneReport) -> tuple[object, int]:
        """After the capture: the activations to run from and the first block to process (a resumed
        run returns the saved inputs of a later block, and adds the earlier layers to ``report``)."""
        return hidden, 0

    def load_block(self, index: int, block: nn.Module) -> None:
        """Before block ``index`` moves to the compute device: give it its weights."""

    def reduce(self, accumulators: list) -> None:
        """Before a group of layers is solved: combine its statistics (``Hessian``, ``InputNorms``)."""

    def block_done(self, index: int, block: nn.Module, hidden, report: PruneReport) -> None:
        """After block ``index`` is pruned and ``hidden`` holds its outputs (the next block's inputs)."""

    def dense_twin(self, hidden):
        """Block reconstruction, at the first block processed: a buffer like ``hidden`` for the
        dense model's activations, holding that block's dense inputs (on a fresh run a copy of
        ``hidden``; a resumed run reads the saved ones)."""
        return hidden.clone()

    def twin_written(self, twin) -> None:
        """``run_block`` just wrote a dense block's outputs into ``twin``; from here on reading
        ``twin`` must give them (activations on disk switch files here)."""


def for_each_block(model, blocks, tokens: torch.Tensor, batch_size: int, device, desc: str, work,
                   hooks: BlockHooks | None = None, report=None) -> None:
    """Capture the first block's inputs, then call ``work(i, block, hidden, batch_kwargs)`` for
    each block in order, with block i (alone) on ``device`` and ``hidden`` holding its inputs;
    ``work`` must leave the block's outputs in ``hidden``, and may replace ``blocks[i]`` (structured
    pruning puts in a block of the smaller config). Everything goes back where it was.
    ``hooks`` (see ``BlockHooks``) may stream weights, keep activations on disk and resume."""
    hooks = hooks or BlockHooks()
    use_cache = getattr(model.config, "use_cache", None)
    home = next(blocks[0].parameters()).device
    move_outside_blocks(model, blocks, device)
    try:
        hidden, batch_kwargs = capture_block_inputs(model, blocks, tokens, batch_size, device, hooks.alloc)
        hidden, first = hooks.start(hidden, report)
        show = logger.getEffectiveLevel() <= logging.INFO
        for i in tqdm(range(first, len(blocks)), desc=desc, disable=not show, initial=first, total=len(blocks)):
            block = blocks[i]
            hooks.load_block(i, block)
            block.to(device)
            work(i, block, hidden, batch_kwargs)
            block = blocks[i]
            hooks.block_done(i, block, hidden, report)
            block.to(home)
    finally:
        if home.type != "meta":  # weights streamed in by the hooks are theirs to drop
            move_outside_blocks(model, blocks, home)
        if use_cache is not None:
            model.config.use_cache = use_cache


def outlier_shares(model, tokens, config: PruneConfig, device, all_layers) -> list[float | None]:
    """OWL's outlier share of each block (None for a block with nothing to prune), from one
    pass of the calibration data through the dense model."""
    blocks = find_blocks(model, config.blocks)[1]
    shares: list[float | None] = []

    def measure(i, block, hidden, batch_kwargs):
        layers = all_layers[i]
        if not layers:
            shares.append(None)
            run_block(block, hidden, batch_kwargs, config.batch_size)
            return
        groups = input_groups(block, layers, hidden, batch_kwargs)
        norms = {tuple(g): InputNorms(weight_matrix(layers[g[0]]).shape[1], device) for g in groups}
        leader = {g[0]: g for g in norms}
        with observe_inputs({n: layers[n] for n in leader}, lambda name, x: norms[leader[name]].add(x)):
            run_block(block, hidden, batch_kwargs, config.batch_size)
        scores = [weight_matrix(layers[n]).abs() * norms[g].norm for g in norms for n in g]
        shares.append(outlier_share(scores, config.owl_m))

    for_each_block(model, blocks, tokens, config.batch_size, device, "OWL outliers", measure)
    return shares


def layer_sparsities(model, tokens, config: PruneConfig, device, all_layers) -> list[dict[str, Sparsity]]:
    """The sparsity of every layer to prune, per block: ``config.sparsity`` everywhere, or from
    the profile (``"owl"``: per block from outlier shares; a dict: by layer name pattern, the
    longest matching pattern winning)."""
    uniform = [{name: config.sparsity for name in layers} for layers in all_layers]
    if config.profile is None:
        return uniform
    if config.profile == "owl":
        shares = outlier_shares(model, tokens, config, device, all_layers)
        measured = [s for s in shares if s is not None]
        ratios = iter(owl_sparsities(measured, config.sparsity.ratio, config.owl_lambda))
        per_block = [None if s is None else next(ratios) for s in shares]
        logger.info("OWL block sparsities: %s", ", ".join(f"{r:.3f}" for r in per_block if r is not None))
        return [{name: Sparsity(r) for name in layers} for r, layers in zip(per_block, all_layers)]
    out = []
    for layers in uniform:
        for name in layers:
            matches = [p for p in config.profile if skipped(name, (p,))]
            if matches:
                layers[name] = Sparsity(config.profile[max(matches, key=len)])
        out.append(layers)
    return out


@torch.no_grad()
def prune(model: nn.Module, batches, config: PruneConfig, hooks: BlockHooks | None = None) -> PruneReport:
    """Prune ``model`` in place, block by block, from calibration tokens.

    batches: LongTensor [n, L] or a list of [1, L] token tensors.
    Only one decoder block is on the compute device at a time, together with the calibration
    activations; the embeddings and the head are never pruned. ``hooks`` (see ``BlockHooks``)
    lets ``ptp.scale`` stream, checkpoint and distribute this same loop.

    >>> report = ptp.prune(model, tokens, ptp.PruneConfig(method="wanda", sparsity="2:4"))
    >>> report.mean_sparsity
    0.5
    """
    start = time.perf_counter()
    hooks = hooks or BlockHooks()
    config = checks.as_config(config)
    tokens = as_token_batch(batches)
    checks.check_token_ids(model, tokens)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    blocks, all_layers = prunable_layers(model, config)
    if config.profile == "owl" and type(hooks) is not BlockHooks:
        raise ConfigError("profile 'owl' needs a plain in-memory run, not --stream, --resume or --nproc")
    sparsities = layer_sparsities(model, tokens, config, device, all_layers)
    report = PruneReport(config.method, str(config.sparsity))

    tally = WeightTally(find_blocks(model, config.blocks)[0], config.skip)
    if config.tunes_blocks:
        check_reconstruction(tokens, config)
    recon = Reconstruction(config, hooks, report.reconstruction) if config.tunes_blocks else None

    def prune_or_pass(i, block, hidden, batch_kwargs):
        tune = None
        if recon is not None:
            recon.dense_forward(block, hidden, batch_kwargs)
            tune = lambda layers: recon.tune(i, block, layers, hidden, batch_kwargs)  # noqa: E731
        if all_layers[i]:
            report.layers.extend(prune_block(block, all_layers[i], hidden, batch_kwargs, config, device,
                                             hooks.reduce, sparsities[i], tune))
        else:
            run_block(block, hidden, batch_kwargs, config.batch_size)
        tally.add_block(i, block)

    for_each_block(model, blocks, tokens, config.batch_size, device, f"{config.method} {config.sparsity}",
                   prune_or_pass, hooks, report)
    numel = sum(weight_matrix(layer).numel() for layers in all_layers for layer in layers.values())
    if numel:
        report.mean_sparsity = sum(layer.zeros for layer in report.layers) / numel
    report.accounting = tally.result(model, blocks)
    report.wall_time_s = time.perf_counter() - start
    log_accounting(report)
    return report


class Reconstruction:
    """Block reconstruction's share of the per-block loop (``ptp.reconstruct`` does the tuning):
    the dense model's activations, carried through each block beside the pruned ones, and each
    pruned block tuned towards them. One more forward of every block and a second activation
    buffer [n, L, d] (``hooks.dense_twin``: in memory, or on disk with the pruned ones)."""

    def __init__(self, config: PruneConfig, hooks: BlockHooks, records: list[dict]):
        self.config, self.hooks, self.records = config, hooks, records
        self.dense = None

    def dense_forward(self, block: nn.Module, hidden, batch_kwargs) -> None:
        """Before ``block`` is pruned: its dense outputs replace its dense inputs (``hidden``, the
        pruned model's inputs, seeds them at the first block processed)."""
        if self.dense is None:
            self.dense = self.hooks.dense_twin(hidden)
        run_block(block, self.dense, batch_kwargs, self.config.batch_size)
        self.hooks.twin_written(self.dense)

    def tune(self, index: int, block: nn.Module, layers: dict, hidden, batch_kwargs) -> None:
        """After the block is pruned, before its outputs are written: ``layers`` (name -> unit) are
        tuned with their zeros kept; the block's norm scales too with ``recon_norms``."""
        config = self.config
        extra = [p for n, p in block.named_parameters() if p.dim() == 1 and "norm" in n.lower()]
        self.records.append(tune_block(
            index, block, tunable_weights(layers), hidden, self.dense, batch_kwargs, config.batch_size,
            epochs=config.recon_epochs, lr=config.recon_lr, step_batch=config.recon_batch,
            holdout=config.recon_holdout, extra=extra if config.recon_norms else []).to_dict())


RECONSTRUCT_ONE_PROCESS = ("--reconstruct runs in one process: each process would tune the block on its own "
                           "windows and the copies would differ; drop --nproc")


def check_reconstruction(tokens: torch.Tensor, config: PruneConfig) -> None:
    """Refuse, before any work, a reconstruction that cannot run as asked."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ConfigError(RECONSTRUCT_ONE_PROCESS)
    if tokens.shape[0] <= config.recon_holdout:
        raise ConfigError(f"reconstruction holds out {config.recon_holdout} calibration windows and needs more "
                          f"than that; got {tokens.shape[0]} (raise nsamples or lower recon_holdout)")


def log_accounting(report: PruneReport) -> None:
    """One summary line: pruned units, decoder blocks, whole model, and what stayed dense."""
    acc = report.accounting
    logger.info("pruned %d weight matrices to %.4f sparsity in %.1f s", len(report.layers), report.mean_sparsity,
                report.wall_time_s)
    if acc and acc["complete"]:
        reasons: dict[str, int] = {}
        for d in acc["dense"]:
            reasons[d["reason"]] = reasons.get(d["reason"], 0) + d["params"]
        logger.info("sparsity: pruned weights %.4f, decoder blocks %.4f, whole model %.4f; left dense: %s",
                    acc["pruned"]["sparsity"], acc["blocks"]["sparsity"], acc["model"]["sparsity"],
                    ", ".join(f"{n:,} {r}" for r, n in reasons.items()) or "nothing")
